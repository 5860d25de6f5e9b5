"""``inferneo serve --tensor-parallel-size 2`` over real HTTP (gloo on CPU, the tiny model).

Greedy completions equal the single-process offline engine's; a tensor-parallel worker killed mid-stream ends the
stream with an error event at once, turns ``/health`` to 503 and makes the server exit with a failure status,
leaving no process behind.
"""

from __future__ import annotations

import json
import time

import httpx
import psutil
import pytest

from inferneo import LLM, SamplingParams
from inferneo.testing.server import RemoteServer
from tests.process_helpers import all_gone, kill_during_stream, spawned_children

ARGS = ("--tensor-parallel-size", "2", "--kv-cache-memory", "16MiB", "--num-threads", "1", "--disable-access-log")
PROMPTS = ["The capital of France is", "Once upon a time", "Water boils at", "def main():"]
MAX_TOKENS = 16


def tp_workers(server: RemoteServer) -> list[psutil.Process]:
    """The tensor-parallel workers: the spawned children of the server's engine core child."""
    cores = spawned_children(psutil.Process(server.proc.pid))
    assert len(cores) == 1, cores
    return spawned_children(cores[0])


def test_tp2_server_greedy_equals_offline_tp1(tiny_llama_dir):
    # The tiny model's tokens are often partial UTF-8 (the text shows U+FFFD): besides the text, compare each
    # token's own string and log-probability, which tell apart tokens that the text alone could not.
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    llm = LLM(str(tiny_llama_dir), num_threads=1)
    try:
        expected = [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    finally:
        llm.shutdown()
    with RemoteServer(tiny_llama_dir, *ARGS) as server:
        assert len(tp_workers(server)) == 1
        r = httpx.post(server.url("/v1/completions"), timeout=60,
                       json={"prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                             "logprobs": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert server.stop() == 0
    choices = sorted(body["choices"], key=lambda c: c["index"])
    assert [c["text"] for c in choices] == [e.text for e in expected]
    assert body["usage"]["completion_tokens"] == MAX_TOKENS * len(PROMPTS)
    for choice, want in zip(choices, expected, strict=True):
        sampled = [entry[token] for token, entry in zip(want.token_ids, want.logprobs, strict=True)]
        assert choice["logprobs"]["tokens"] == [lp.decoded_token for lp in sampled]
        assert choice["logprobs"]["token_logprobs"] == pytest.approx([lp.logprob for lp in sampled], abs=1e-3)


@pytest.mark.slow  # a two-rank server started for one kill (tests/test_server_process.py covers a killed core)
def test_a_killed_tp_worker_fails_the_stream_and_the_server_exits(tiny_llama_dir):
    with RemoteServer(tiny_llama_dir, *ARGS) as server:
        [worker] = tp_workers(server)
        descendants = psutil.Process(server.proc.pid).children(recursive=True)
        assert worker in descendants
        rest, started = kill_during_stream(server, worker)
        assert time.monotonic() - started < 10  # failed, not hung
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][len("data: "):])["error"]
        assert set(error) == {"message", "type", "param", "code"}
        try:
            health = httpx.get(server.url("/health"), timeout=5)
            assert health.status_code == 503, health.text
        except httpx.TransportError:
            pass  # already gone
        server.proc.wait(timeout=20)
        assert server.proc.returncode != 0, server.log()
        assert time.monotonic() - started < 20
        assert all_gone(descendants, 5), "a process outlived its server"
