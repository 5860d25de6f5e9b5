"""Pipeline parallelism (gloo on CPU) against one rank on the same checkpoint: greedy token ids must be identical.

Three layers split 2 + 1 (the even split with a remainder); 16 mixed prompts with a shared prefix, in small
chunks (chunked prefill), run twice (the second run hits the prefix cache). PP=2 on two local processes,
TP=2 x PP=2 on four (a tied LM head on the last stage, an uneven partition chosen by the environment), and PP=2
with its worker rank a Ray actor on the session's local Ray cluster.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inferneo import LLM, SamplingParams
from inferneo.config import EngineConfig
from inferneo.model_executor.pipeline import stage_layer_ranges
from tests.test_docs_examples import python_blocks
from tests.test_hf_parity import mixed_prompts

REPO = Path(__file__).resolve().parents[1]

PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
ENGINE = dict(dtype="float32", max_model_len=256, kv_cache_memory="16MiB", max_num_batched_tokens=16,
              num_threads=1)
PROMPTS = mixed_prompts(16, 384, seed=3, shared_prefix=20)


def _ids(llm: LLM, prompts=PROMPTS) -> list[list[int]]:
    outputs = llm.generate(prompts, PARAMS, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    llm.engine.kv_cache.check_integrity([])
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.num_blocks, "KV blocks leaked"
    return [o.outputs[0].token_ids for o in outputs]


def _one_rank_ids(checkpoint, prompts) -> list[list[int]]:
    """The greedy ids one rank gives (the reference)."""
    llm = LLM(str(checkpoint), **ENGINE)
    try:
        return _ids(llm, prompts)
    finally:
        llm.shutdown()


def _run_twice(llm: LLM, prompts=PROMPTS) -> list[list[int]]:
    """Generate twice and check both runs agree; the second one reads the first one's prefix blocks."""
    try:
        first = _ids(llm, prompts)
        hits_before = llm.engine.kv_cache.prefix_cache_hits
        assert _ids(llm, prompts) == first
        assert llm.engine.kv_cache.prefix_cache_hits > hits_before
        return first
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("llama", num_layers=3)


@pytest.fixture(scope="module")
def expected(checkpoint):
    llm = LLM(str(checkpoint), **ENGINE)
    try:
        return _ids(llm)
    finally:
        llm.shutdown()


def test_stage_layer_ranges():
    assert stage_layer_ranges(32, 2, "") == [(0, 16), (16, 32)]
    assert stage_layer_ranges(3, 2, "") == [(0, 2), (2, 3)]
    assert stage_layer_ranges(10, 4, "") == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert stage_layer_ranges(32, 2, "14,18") == [(0, 14), (14, 32)]
    for partition in ("14,17", "32,0", "a,b", "32"):
        with pytest.raises(ValueError, match="layer partition"):
            stage_layer_ranges(32, 2, partition)
    with pytest.raises(ValueError, match="larger than the model's 3 layers"):
        stage_layer_ranges(3, 4, "")


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="pipeline_parallel_size must be a positive integer"):
        EngineConfig(pipeline_parallel_size=0)
    with pytest.raises(ValueError, match="distributed_executor_backend must be one of mp, ray"):
        EngineConfig(distributed_executor_backend="slurm")


def test_pp2_greedy_equals_pp1(checkpoint, expected):
    llm = LLM(str(checkpoint), pipeline_parallel_size=2, **ENGINE)
    runner = llm.engine.runner
    assert (runner.world_size, runner.tp_size, runner.pp_size) == (2, 1, 2)
    driver = runner.driver.model
    assert len(driver.layers) == 2 and len(runner.driver.kv_caches) == 2  # stage 0: layers 0 and 1, their KV
    assert type(driver.lm_head).__name__ == "HeldByAnotherStage"
    core = llm.engine.core
    assert _run_twice(llm) == expected
    assert core.max_steps_in_flight == 2  # two micro-batches in flight: one per stage


@pytest.mark.slow  # four processes on two cores: ~110 s on the shared CI-sized machine, most of it spawning
def test_tp2_pp2_greedy_equals_pp1(tiny_checkpoint_factory, monkeypatch):
    checkpoint = tiny_checkpoint_factory("llama", num_layers=3, tie_word_embeddings=True)
    prompts = PROMPTS[:6]
    expected = _one_rank_ids(checkpoint, prompts)
    monkeypatch.setenv("INFERNEO_PP_LAYER_PARTITION", "1,2")  # the spawned workers inherit it
    llm = LLM(str(checkpoint), tensor_parallel_size=2, pipeline_parallel_size=2, **ENGINE)
    runner = llm.engine.runner
    assert (runner.world_size, len(runner._procs)) == (4, 3)
    assert len(runner.driver.model.layers) == 1
    attn = runner.driver.model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
    core = llm.engine.core
    assert _run_twice(llm, prompts) == expected
    assert core.max_steps_in_flight == 2


@pytest.mark.ray
def test_pp2_on_ray_actors_equals_pp1(checkpoint, expected, ray_cluster, monkeypatch):
    monkeypatch.setenv("INFERNEO_RAY_WORKER_CPUS", "0.25")  # the test cluster has one CPU a node
    llm = LLM(str(checkpoint), pipeline_parallel_size=2, distributed_executor_backend="ray", **ENGINE)
    assert llm.engine.runner.executor_backend == "ray"
    assert _run_twice(llm) == expected


@pytest.mark.slow  # two engines in fresh processes
def test_docs_example_runs(checkpoint, tmp_path):
    """The pipeline example of docs/distributed.md, run as a program (its workers import the file again), on the
    tiny checkpoint instead of Llama-2-7B."""
    (block,) = [b for b in python_blocks(REPO / "docs" / "distributed.md") if "pipeline_parallel_size" in b]
    script = tmp_path / "pp_example.py"
    script.write_text(block.replace('"meta-llama/Llama-2-7b-hf"', repr(str(checkpoint))))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    tokens = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert 1 <= len(tokens) <= 8 and all(isinstance(t, int) for t in tokens)


@pytest.mark.slow  # three engines and four process start-ups
def test_pp_suite_smoke(tmp_path):
    """benchmarks/gpu/pp_suite.py --smoke on CPU: every section runs and PP=2 equals one rank."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu" / "pp_suite.py"), "--smoke",
                           "--layouts", "1x1,1x2", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "pp_suite.json").read_text())
    assert results["sections"]["equality"]["tp1xpp2"]["equal"] is True
    assert results["sections"]["w1_tp1xpp2"]["output_tokens"] > 0


def test_pp2_with_a_4bit_checkpoint_equals_pp1(checkpoint, tmp_path, monkeypatch):
    """Each stage quantizes its layers under their checkpoint numbers: layer 1, full precision in the file
    (``modules_to_not_convert``), is stage 1's first layer, and stays a plain linear there."""
    from inferneo.quantization.base import QuantizedLinear
    from inferneo.testing.int4_checkpoints import write_int4_checkpoint

    quantized, _ = write_int4_checkpoint(checkpoint, tmp_path / "awq", tmp_path / "deq", "awq",
                                         not_converted=["layers.1.mlp"])
    prompts = PROMPTS[:6]
    expected = _one_rank_ids(quantized, prompts)
    monkeypatch.setenv("INFERNEO_PP_LAYER_PARTITION", "1,2")  # stage 1 holds layers 1 and 2
    llm = LLM(str(quantized), pipeline_parallel_size=2, **ENGINE)
    layer = llm.engine.runner.driver.model.layers[0]
    assert isinstance(layer.mlp.down_proj, QuantizedLinear) and len(llm.engine.runner.driver.model.layers) == 1
    assert _run_twice(llm, prompts) == expected
