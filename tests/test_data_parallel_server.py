"""``inferneo serve --data-parallel-size 2`` over real HTTP (two engine-core child processes, the tiny model).

Greedy outputs equal one engine's; the prefix-aware router sends a conversation's second turn to the replica that
served its first (read from the per-replica prefix-hit and routing counters at ``/metrics``); a replica killed
mid-stream fails that stream cleanly, ``/health`` reports the reduced capacity and the server serves on.
One server for the module: the kill test runs last.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import re
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from inferneo import LLM, SamplingParams
from inferneo.testing.server import RemoteServer

DOCS = Path(__file__).resolve().parents[1] / "docs" / "distributed.md"

ARGS = ("--data-parallel-size", "2", "--kv-cache-memory", "16MiB", "--num-threads", "1", "--max-model-len", "512",
        "--disable-access-log")
PROMPTS = ["The capital of France is", "Once upon a time", "Water boils at", "def main():"]
MAX_TOKENS = 8
SYSTEM = ("You are a careful assistant who answers questions about geography, history and cooking in short, "
          "plain sentences, and who says so when a question has no clear answer. ")


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with RemoteServer(tiny_llama_dir, *ARGS, startup_timeout=300) as srv:
        yield srv


def replica_counter(server: RemoteServer, name: str, **labels: str) -> dict[str, float]:
    """``inferneo:replica_<name>`` by replica, for the series that carry ``labels``."""
    text = httpx.get(server.url("/metrics"), timeout=10).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(f"inferneo:replica_{name}{{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[:line.index("}")]))
        if all(found.get(k) == v for k, v in labels.items()):
            values[found["replica"]] = values.get(found["replica"], 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def test_dp2_greedy_equals_one_engine(server, tiny_llama_dir):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    llm = LLM(str(tiny_llama_dir), num_threads=1, kv_cache_memory="16MiB", max_model_len=512)
    try:
        expected = [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    finally:
        llm.shutdown()
    with httpx.Client(timeout=60) as http:  # one request per prompt, all in flight: both replicas serve
        def ask(prompt):
            return http.post(server.url("/v1/completions"), json={
                "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "logprobs": 0})

        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = list(pool.map(ask, PROMPTS))
    routed = replica_counter(server, "routed_requests_total")
    assert len(routed) == 2 and all(v >= 1 for v in routed.values()), routed  # both replicas took prompts
    for answer, want in zip(answers, expected, strict=True):
        assert answer.status_code == 200, answer.text
        choice = answer.json()["choices"][0]
        assert choice["text"] == want.text
        sampled = [entry[token] for token, entry in zip(want.token_ids, want.logprobs, strict=True)]
        assert choice["logprobs"]["tokens"] == [lp.decoded_token for lp in sampled]
        assert choice["logprobs"]["token_logprobs"] == pytest.approx([lp.logprob for lp in sampled], abs=1e-4)


def test_second_turn_goes_to_the_replica_of_the_first(server):
    conversations = [[{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": f"Question {i}: which river runs through city number {i}?"}]
                     for i in range(4)]
    first_replica = []
    with httpx.Client(timeout=60) as http:
        for messages in conversations:  # one at a time: equal loads, so first turns spread by load in turn
            before = replica_counter(server, "routed_requests_total")
            r = http.post(server.url("/v1/chat/completions"),
                          json={"messages": messages, "max_tokens": 6, "temperature": 0})
            assert r.status_code == 200, r.text
            messages.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
            messages.append({"role": "user", "content": "And what does that river flow into?"})
            after = replica_counter(server, "routed_requests_total")
            (replica,) = [k for k in after if after[k] != before.get(k, 0.0)]
            first_replica.append(replica)
        for messages, replica in zip(conversations, first_replica, strict=True):
            hits_before = replica_counter(server, "prefix_cache_hits_total")
            routed_before = replica_counter(server, "routed_requests_total", reason="prefix")
            r = http.post(server.url("/v1/chat/completions"),
                          json={"messages": messages, "max_tokens": 6, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16  # a KV hit
            hits = replica_counter(server, "prefix_cache_hits_total")
            routed = replica_counter(server, "routed_requests_total", reason="prefix")
            assert routed.get(replica, 0) == routed_before.get(replica, 0) + 1, (replica, routed_before, routed)
            gained = {k: hits[k] - hits_before.get(k, 0.0) for k in hits}
            assert gained[replica] >= 16 and all(v == 0 for k, v in gained.items() if k != replica), gained


def test_the_docs_health_example_runs(server):
    section = DOCS.read_text().split("## Data-parallel replicas behind a router")[1].split("\n## ")[0]
    (block,) = re.findall(r"^```python\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.replace("http://localhost:8000", server.base_url), "<doc example>", "exec"), {})
    assert out.getvalue().splitlines()[0] == "ok 2 of 2 replicas serving"


def test_a_killed_replica_fails_its_stream_and_the_server_serves_on(server):
    health = httpx.get(server.url("/health"), timeout=10).json()
    assert health["status"] == "ok" and health["live_replicas"] == 2
    prompt = "A prompt long enough to fill two blocks of the cache, so that the router remembers where it went. " * 2
    with httpx.Client(timeout=60) as http:
        before = replica_counter(server, "routed_requests_total")
        assert http.post(server.url("/v1/completions"), json={"prompt": prompt, "max_tokens": 1}).status_code == 200
        after = replica_counter(server, "routed_requests_total")
        (victim,) = [k for k in after if after[k] != before.get(k, 0.0)]
        victim_pid = health["replica_states"][int(victim)]["pid"]
        # The same prompt, streamed at length, goes to the same replica (its prefix is there): kill it mid-stream.
        with http.stream("POST", server.url("/v1/completions"), json={
                "prompt": prompt, "max_tokens": 300, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith("data: ")
            psutil.Process(victim_pid).send_signal(signal.SIGKILL)
            killed = time.monotonic()
            rest = [line for line in lines if line]
        assert time.monotonic() - killed < 20
        errors = [json.loads(line[6:]) for line in rest if line.startswith("data: {") and '"error"' in line]
        assert errors and f"replica {victim} died" in errors[0]["error"]["message"], rest[-3:]
        health = http.get(server.url("/health")).json()
        assert health["status"] == "degraded" and health["live_replicas"] == 1 and health["replicas"] == 2
        assert not health["replica_states"][int(victim)]["live"] and health["replica_states"][int(victim)]["error"]
        for i in range(4):  # every request now goes to the live replica, including the dead one's prefix
            r = http.post(server.url("/v1/completions"), json={"prompt": prompt if i == 0 else f"after {i}",
                                                               "max_tokens": 3})
            assert r.status_code == 200, r.text
        live = replica_counter(server, "live")
        assert live[victim] == 0.0 and sum(live.values()) == 1.0
