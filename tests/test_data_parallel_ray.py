"""``inferneo serve --data-parallel-size 2 --data-parallel-backend ray``: the engine cores are Ray actors on the
session's local two-node cluster, the front end is ours. Greedy outputs equal one engine's; a killed actor is
taken out of rotation and ``/health`` reports the reduced capacity while the server serves on."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
import pytest

from inferneo import LLM, SamplingParams
from inferneo.testing.server import RemoteServer

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPTS = ["The capital of France is", "Once upon a time"]


def test_ray_replicas_serve_greedy_like_one_engine_and_survive_a_killed_actor(ray_cluster, tiny_llama_dir):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = LLM(str(tiny_llama_dir), num_threads=1, kv_cache_memory="16MiB", max_model_len=256)
    try:
        expected = [o.outputs[0].text for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    finally:
        llm.shutdown()
    env = {"RAY_ADDRESS": ray_cluster.address, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    with RemoteServer(tiny_llama_dir, "--data-parallel-size", "2", "--data-parallel-backend", "ray",
                      "--kv-cache-memory", "16MiB", "--num-threads", "1", "--max-model-len", "256",
                      "--disable-access-log", env=env, startup_timeout=300) as server, httpx.Client(timeout=60) as http:
        health = http.get(server.url("/health")).json()
        assert health["live_replicas"] == 2
        pids = [s["pid"] for s in health["replica_states"]]
        assert server.proc.pid not in pids and len(set(pids)) == 2  # the cores run in Ray's worker processes
        for prompt, want in zip(PROMPTS, expected, strict=True):
            r = http.post(server.url("/v1/completions"),
                          json={"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want
        psutil.Process(pids[0]).send_signal(signal.SIGKILL)
        for _ in range(100):
            health = http.get(server.url("/health")).json()
            if health["live_replicas"] == 1:
                break
            time.sleep(0.1)
        assert health["status"] == "degraded" and health["live_replicas"] == 1, health
        for i in range(3):
            r = http.post(server.url("/v1/completions"), json={"prompt": f"after {i}", "max_tokens": 3})
            assert r.status_code == 200, r.text
