"""Faults inside the engine process of a real server (the default layout), injected with INFERNEO_TEST_FAULT.

A model step that raises fails the requests of that step with a 500 in the OpenAI error shape while the engine
goes on serving; an engine whose every step fails stops, turns /health to 503 and fails what is pending at once.
"""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from inferneo.testing.server import RemoteServer

ARGS = ("--kv-cache-memory", "32MiB", "--num-threads", "1", "--disable-access-log")
# The synchronous loop runs in CI; the asynchronous one (the GPU default, same fault handling) is marked slow.
SCHEDULING = pytest.mark.parametrize("scheduling", ["--no-async-scheduling",
                                                    pytest.param("--async-scheduling", marks=pytest.mark.slow)])
POISON = [7, 7, 7, 7]


def _complete(server: RemoteServer, prompt, max_tokens: int = 4) -> httpx.Response:
    return httpx.post(server.url("/v1/completions"), timeout=60,
                      json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


@SCHEDULING
def test_a_failing_step_gives_500_and_the_engine_serves_on(tiny_llama_dir, scheduling):
    with RemoteServer(tiny_llama_dir, *ARGS, scheduling, env={"INFERNEO_TEST_FAULT": "prompt:7,7,7,7"}) as server:
        assert _complete(server, "before").status_code == 200
        r = _complete(server, [*POISON, 20, 21])
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "server_error" and "injected fault" in error["message"]
        for i in range(3):  # the engine is still serving, and healthy
            assert _complete(server, f"after {i}").status_code == 200
        assert httpx.get(server.url("/health"), timeout=10).status_code == 200


@SCHEDULING
def test_an_engine_that_cannot_go_on_turns_health_503_and_fails_requests_promptly(tiny_llama_dir, scheduling):
    with RemoteServer(tiny_llama_dir, *ARGS, scheduling, env={"INFERNEO_TEST_FAULT": "always"}) as server:
        # Every step fails; after three failures in a row the engine gives up.
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # some requests share a step, some do not
            answers = list(pool.map(lambda i: _complete(server, f"pending {i}", 50), range(4)))
        answers += [_complete(server, f"one more {i}") for i in range(3)]
        assert time.monotonic() - start < 30  # failed, not hung
        assert all(r.status_code in (500, 503) for r in answers), [r.status_code for r in answers]
        assert all(set(r.json()["error"]) == {"message", "type", "param", "code"} for r in answers)
        deadline = time.monotonic() + 10
        while httpx.get(server.url("/health"), timeout=10).status_code != 503:
            assert time.monotonic() < deadline, "health never turned 503"
            time.sleep(0.1)
        r = _complete(server, "after death")
        assert r.status_code == 503 and "Retry-After" in r.headers
