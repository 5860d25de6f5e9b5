"""The Ray Dataset processor on the shared two-node local cluster: its greedy answers equal ``LLM.generate``'s
and ``LLM.chat``'s for the same requests, OpenAI bodies with structured-output fields come back valid, bad rows
carry their error, and killing one replica actor mid-run still gives every row exactly once."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from inferneo.entrypoints.llm import LLM
from inferneo.integrations.ray import EngineProcessorConfig, ReplicaResources, build_processor
from inferneo.sampling_params import SamplingParams

pytestmark = pytest.mark.ray

ENGINE = {"kv_cache_memory": "16MiB", "num_threads": 1, "max_num_seqs": 8}
MAX_TOKENS = 8


def prompts(n: int) -> list[str]:
    return [f"row {i}: the quick brown fox number {i * 7}" + " jumps" * (i % 5) for i in range(n)]


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), **ENGINE)
    yield llm
    llm.shutdown()


def config(model, replicas: int, **kwargs) -> EngineProcessorConfig:
    # zero CPUs a replica: the fixture's two nodes have one CPU each, and Ray Data's own tasks need them
    return EngineProcessorConfig(model=str(model), engine_options=ENGINE, served_model_name="tiny",
                                 sampling={"max_tokens": MAX_TOKENS, "temperature": 0}, batch_size=4,
                                 replicas=replicas, resources=ReplicaResources(num_cpus=0), **kwargs)


def test_processor_answers_equal_llm_generate(ray_cluster, tiny_llama_dir, reference):
    import ray.data

    texts = prompts(12)
    conversation = [{"role": "user", "content": "name a colour"}]
    schema = {"enum": ["on", "off"]}
    rows = [{"key": i, "prompt": t} for i, t in enumerate(texts)]
    rows.append({"key": 100, "messages": conversation})
    rows.append({"key": 101, "body": json.dumps({"prompt": texts[0], "max_tokens": 3})})
    rows.append({"key": 102, "body": json.dumps({
        "messages": conversation, "max_tokens": 16,
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}})})
    rows.append({"key": 103, "body": json.dumps({"prompt": "x", "top_p": 5.0})})
    rows.append({"key": 104, "nothing": "here"})
    out = {r["key"]: r for r in build_processor(config(tiny_llama_dir, 2))(ray.data.from_items(rows)).take_all()}
    assert sorted(out) == sorted(r["key"] for r in rows)

    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    expected = reference.generate(texts, greedy, use_tqdm=False)
    for i, want in enumerate(expected):
        assert out[i]["generated_text"] == want.outputs[0].text and out[i]["error"] is None
        assert out[i]["finish_reason"] == want.outputs[0].finish_reason
    (chat,) = reference.chat([conversation], greedy, use_tqdm=False)
    assert out[100]["generated_text"] == chat.outputs[0].text
    short = reference.generate([texts[0]], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert out[101]["generated_text"] == short[0].outputs[0].text
    assert json.loads(out[102]["generated_text"]) in ("on", "off")  # constrained to the schema
    assert json.loads(out[102]["response"])["object"] == "chat.completion"
    assert out[103]["status_code"] == 400 and "top_p" in out[103]["error"]
    assert out[104]["status_code"] == 400 and "'prompt'" in out[104]["error"]


def replica_pids() -> list[int]:
    import ray._private.state

    return [a["Pid"] for a in ray._private.state.actors().values()
            if "EngineReplica" in a["ActorClassName"] and a["State"] == "ALIVE"]


def test_killing_a_replica_mid_run_loses_and_repeats_nothing(ray_cluster, tiny_llama_dir, reference):
    import ray.data

    texts = prompts(24)
    rows = [{"key": i, "prompt": t, "max_tokens": 24 + i % 3} for i, t in enumerate(texts)]
    # one batch at a time a replica: with several at once all rows finish together, and the first rows out would
    # mean the replicas are already done
    dataset = build_processor(config(tiny_llama_dir, 2, request_fields=("max_tokens",), batches_per_replica=1))(
        ray.data.from_items(rows))
    seen: list[dict] = []
    killed: list[int] = []

    def consume() -> None:
        for row in dataset.iter_rows():
            seen.append(row)

    consumer = threading.Thread(target=consume)
    consumer.start()
    deadline = time.monotonic() + 120
    while not seen and time.monotonic() < deadline:  # both replicas are up and working once rows come out
        time.sleep(0.05)
    pids = replica_pids()
    assert pids, "no replica actor is alive"
    os.kill(pids[0], signal.SIGKILL)
    killed.append(len(seen))
    consumer.join(timeout=240)
    assert not consumer.is_alive()
    keys = [row["key"] for row in seen]
    assert sorted(keys) == list(range(len(rows))), "every row exactly once"
    assert killed[0] < len(rows), "the replica was killed mid-run, with rows still to answer"
    expected = reference.generate(texts, [SamplingParams(max_tokens=24 + i % 3, temperature=0)
                                          for i in range(len(texts))], use_tqdm=False)
    for row in seen:
        assert row["generated_text"] == expected[row["key"]].outputs[0].text, row["key"]


def test_endpoint_processor_posts_rows_to_a_running_server(ray_cluster, tiny_llama_dir, reference):
    import ray.data

    from inferneo.integrations.ray import EndpointProcessorConfig
    from inferneo.testing.server import RemoteServer

    texts = prompts(6)
    rows = [{"key": i, "prompt": t} for i, t in enumerate(texts)]
    rows.append({"key": 6, "body": json.dumps({"prompt": "x", "model": "not-served"})})
    engine = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE.items()]
    with RemoteServer(tiny_llama_dir, "--served-model-name", "tiny", *engine, "--disable-access-log") as server:
        processor = build_processor(EndpointProcessorConfig(
            urls=(server.base_url,), model="tiny", sampling={"max_tokens": MAX_TOKENS, "temperature": 0},
            batch_size=3, num_cpus=0))
        out = {r["key"]: r for r in processor(ray.data.from_items(rows)).take_all()}
    expected = reference.generate(texts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0), use_tqdm=False)
    assert [out[i]["generated_text"] for i in range(len(texts))] == [o.outputs[0].text for o in expected]
    assert out[6]["status_code"] == 404 and out[6]["error"].startswith("model_not_found"), out[6]


@pytest.mark.slow  # three model loads in Ray actors and two in the driver (not timed yet)
def test_overhead_benchmark_short_mode(ray_cluster, tmp_path):
    """``benchmarks/ray_processor_overhead.py --short`` on the shared cluster: alternating rounds, medians."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "overhead.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(repo / "benchmarks" / "ray_processor_overhead.py"), "--short",
                           "--address", ray_cluster.address, "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert [run["order"] for run in record["runs"]] == ["generate/processor", "processor/generate"]
    assert record["median"]["answer_ratio"] > 0 and isinstance(record["target_met"], bool)
