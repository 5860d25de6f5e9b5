"""Quantized checkpoints under tensor parallelism (two ranks over gloo on CPU) against one rank.

Each rank keeps its part of every quantized layer in the format's own layout: its heads' rows of ``qkv_proj``,
its slice of ``gate_up_proj``, its input columns of ``o_proj`` and ``down_proj`` (whose partial sums are
all-reduced). Where the arithmetic does not depend on the split (4-bit weights with activations in the model dtype;
FP8 with static or block-wise activation scales) greedy tokens equal one rank's. What cannot be split is refused
at load, naming the layer: act-order groups scattered over a row-parallel layer, FP8 blocks cut by a rank.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inferneo import LLM, SamplingParams
from inferneo.distributed.parallel_state import TensorParallelGroup
from inferneo.model_loader.hf_files import hf_config
from inferneo.model_loader.loader import iter_weights
from inferneo.model_loader.source import resolve_model
from inferneo.quantization.base import QuantizedLinear, RowParallelQuantizedLinear
from inferneo.testing.int4_checkpoints import write_int4_checkpoint
from inferneo.testing.quantized_checkpoints import write_fp8_checkpoint
from inferneo.testing.tiny_models import make_tiny_checkpoint
from inferneo.worker.model_runner import ModelRunner

PROMPTS = [[5, 17, 33, 2, 9, 100, 250, 7] * 3, [40, 41, 42, 43, 44], list(range(60, 97))]
PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
ENGINE = dict(dtype="float32", max_model_len=256, kv_cache_memory="32MiB", max_num_batched_tokens=32,
              num_threads=1)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """hidden 64, 4 query heads and 2 kv heads of 16: every rank's rows and columns are whole 4-bit groups of 32."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tpq") / "llama", "llama", num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """hidden 256 with 4 kv heads of 64: every rank's rows and columns are whole FP8 blocks of 128."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tpq") / "wide", "llama", hidden_size=256, num_heads=4,
                                num_kv_heads=4)


def _greedy(path: Path, tp: int, sleep: bool = False) -> tuple[list[list[int]], dict[str, int]]:
    """Greedy ids of PROMPTS, and how many quantized layers of each kind the driver's model holds. ``sleep``: the
    engine sleeps at level 1 (the KV cache alone: quantized weights stay) and wakes before generating; level 2,
    which drops weights a quantized model cannot load again, is refused on every rank's behalf."""
    llm = LLM(str(path), tensor_parallel_size=tp, **ENGINE)
    try:
        model = llm.engine.runner.driver.model if tp > 1 else llm.engine.runner.model
        kinds = {"column": sum(type(m) is QuantizedLinear for m in model.modules()),
                 "row": sum(type(m) is RowParallelQuantizedLinear for m in model.modules())}
        if sleep:
            with pytest.raises(ValueError, match="sleep level 2 drops the weights"):
                llm.sleep(level=2)
            llm.sleep(level=1)
            llm.wake_up()
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)], kinds
    finally:
        llm.shutdown()


@pytest.mark.parametrize("layout", ["awq", "gptq", "compressed-tensors"])
def test_int4_checkpoints_give_one_ranks_tokens(small, tmp_path, layout):
    quantized, _ = write_int4_checkpoint(small, tmp_path / "q", tmp_path / "deq", layout)
    expected, one_rank = _greedy(quantized, 1)
    assert one_rank == {"column": 8, "row": 0}
    got, two_ranks = _greedy(quantized, 2, sleep=layout == "awq")
    assert two_ranks == {"column": 4, "row": 4}  # q/k/v and gate/up split by rows, o and down by columns
    assert got == expected


@pytest.mark.parametrize("scheme", ["tensor-static", "block"])
def test_fp8_checkpoints_give_one_ranks_tokens(wide, tmp_path, monkeypatch, scheme):
    """FP8 layers on CPU through the emulation switch (the workers inherit it); static per-tensor and block-wise
    activation scales quantize a rank's columns as one rank quantizes them, so the tokens are identical."""
    monkeypatch.setenv("INFERNEO_FP8_CPU_EMULATION", "1")
    quantized = write_fp8_checkpoint(wide, tmp_path / "fp8", scheme)
    expected, _ = _greedy(quantized, 1)
    got, two_ranks = _greedy(quantized, 2)
    assert two_ranks == {"column": 4, "row": 4}
    assert got == expected


def _load_as_rank_0_of_2(path: Path) -> None:
    """Build and load rank 0's half of the model in this process (loading needs no other rank)."""
    runner = ModelRunner(hf_config=hf_config(path), dtype=torch.float32, device=torch.device("cpu"), max_model_len=64,
                         block_size=16, tp_group=TensorParallelGroup(rank=0, world_size=2))
    runner.load_weights(iter_weights(resolve_model(str(path))))


def test_act_order_over_row_parallel_layers_is_refused(small, tmp_path):
    quantized, _ = write_int4_checkpoint(small, tmp_path / "q", tmp_path / "deq", "gptq", desc_act=True)
    with pytest.raises(ValueError, match=r"layers\.0\.\w+\.(o|down)_proj: act-order \(desc_act\) scatters .* "
                                         r"tensor_parallel_size 1"):
        _load_as_rank_0_of_2(quantized)


def test_fp8_blocks_cut_by_a_rank_are_refused(small, tmp_path, monkeypatch):
    monkeypatch.setenv("INFERNEO_FP8_CPU_EMULATION", "1")
    quantized = write_fp8_checkpoint(small, tmp_path / "fp8", "block")  # 64 of 128 input columns per rank
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.down_proj \(input columns\): 64 is not a whole number "
                                         r"of the format's groups of 128"):
        _load_as_rank_0_of_2(quantized)
