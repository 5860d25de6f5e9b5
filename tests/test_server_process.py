"""The engine core in its own process (``inferneo serve``'s default): what happens when either process dies, and
the in-process switch (``--engine-in-process``)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import psutil
import pytest

from inferneo.testing.server import RemoteServer
from tests.process_helpers import all_gone, kill_during_stream, spawned_children

ARGS = ("--kv-cache-memory", "16MiB", "--num-threads", "1", "--disable-access-log")


def core_process(server: RemoteServer) -> psutil.Process:
    """The server's engine core child (not multiprocessing's resource tracker, its other child)."""
    children = spawned_children(psutil.Process(server.proc.pid))
    assert len(children) == 1, children
    return children[0]


def test_killed_core_fails_requests_promptly_health_turns_503_and_the_server_exits_1(tiny_llama_dir):
    # The grace period between the engine's death and the server's exit, raised from its 2 s default so that the
    # checks below surely run inside it on a busy machine.
    grace = 5
    with RemoteServer(tiny_llama_dir, *ARGS, env={"INFERNEO_ENGINE_DEATH_EXIT_S": str(grace)}) as server:
        core = core_process(server)
        descendants = psutil.Process(server.proc.pid).children(recursive=True)
        assert httpx.get(server.url("/health")).status_code == 200
        results: dict[str, object] = {}

        def long_request() -> None:
            r = httpx.post(server.url("/v1/completions"), timeout=60,
                           json={"prompt": "a long one", "max_tokens": 2000, "ignore_eos": True})
            results["whole"] = (r.status_code, r.json())

        worker = threading.Thread(target=long_request)
        worker.start()
        rest, started = kill_during_stream(server, core)
        worker.join(30)
        assert time.monotonic() - started < grace  # everything below runs inside the grace period
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][len("data: "):])["error"]
        assert error["code"] == "engine_unavailable" and "exited unexpectedly" in error["message"]
        status, body = results["whole"]
        assert status == 503 and set(body["error"]) == {"message", "type", "param", "code"}
        health = httpx.get(server.url("/health"))
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_unavailable"
        after = httpx.post(server.url("/v1/completions"), json={"prompt": "x", "max_tokens": 2}, timeout=10)
        assert after.status_code == 503
        assert set(after.json()["error"]) == {"message", "type", "param", "code"}
        assert httpx.get(server.url("/metrics")).text.count("inferneo:engine_healthy") >= 1
        # Then the server stops by itself, with a failure status, and leaves no process behind.
        server.proc.wait(timeout=15)
        assert server.proc.returncode == 1, server.log()
        assert grace - 0.5 <= time.monotonic() - started < 15
        assert all_gone(descendants, 5), "a child outlived its server"
        assert "the engine has died" in server.log()


def test_core_exits_when_the_server_is_killed(tiny_llama_dir):
    server = RemoteServer(tiny_llama_dir, *ARGS)
    children = psutil.Process(server.proc.pid).children()
    core_process(server)
    server.close(signal.SIGKILL)
    assert all_gone(children, 15), "a child outlived its server"


def test_core_exits_with_the_server_on_sigterm(tiny_llama_dir):
    server = RemoteServer(tiny_llama_dir, *ARGS)
    children = psutil.Process(server.proc.pid).children()
    # The CPU engine core starts with a short OpenMP spin (engine_core_environment), the server without one.
    assert core_process(server).environ().get("GOMP_SPINCOUNT") == "2000"
    assert "GOMP_SPINCOUNT" not in psutil.Process(server.proc.pid).environ()
    assert httpx.post(server.url("/v1/completions"), json={"prompt": "hi", "max_tokens": 3}).status_code == 200
    assert server.stop(signal.SIGTERM) == 0
    assert all_gone(children, 5)
    server.close()


def test_sigterm_to_the_whole_process_group_drains_and_exits_0(tiny_llama_dir):
    """systemd's default stop, `timeout` and `kill -- -PGID` signal the engine core too: it leaves the decision to
    the server, which lets the stream in flight finish, then exits 0 with no process left."""
    server = RemoteServer(tiny_llama_dir, *ARGS, own_session=True)
    children = psutil.Process(server.proc.pid).children(recursive=True)
    try:
        body = {"prompt": "to the end", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as http, http.stream("POST", server.url("/v1/completions"), json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith("data: ")
            os.killpg(server.proc.pid, signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length", rest[-2]
        assert server.proc.wait(timeout=60) == 0, server.log()
        assert all_gone(children, 10), "a child outlived its server"
        assert "exited unexpectedly" not in server.log()
    finally:
        server.close(signal.SIGKILL)


@pytest.mark.parametrize("flag", ["--engine-in-process"])
def test_engine_in_process_switch(tiny_llama_dir, flag):
    with RemoteServer(tiny_llama_dir, *ARGS, flag) as server:
        assert psutil.Process(server.proc.pid).children() == []
        r = httpx.post(server.url("/v1/completions"), json={"prompt": "hi", "max_tokens": 3, "temperature": 0},
                       timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_a_core_that_cannot_start_raises_its_error(tiny_llama_dir):
    from inferneo.config import EngineConfig
    from inferneo.engine.async_engine import AsyncEngine

    before = set(psutil.Process().children())
    with pytest.raises(ValueError, match="kv_cache_memory"):
        AsyncEngine.in_child_process(EngineConfig(model=str(tiny_llama_dir), dtype="float32", kv_cache_memory=1, num_threads=1))
    assert all_gone([c for c in psutil.Process().children() if c not in before and "spawn_main" in
                     " ".join(c.cmdline())], 5)


def test_engine_core_environment_respects_the_users_openmp_choice(monkeypatch):
    from inferneo.engine.core_client import _environment, engine_core_environment

    assert engine_core_environment("cpu", {}) == {"GOMP_SPINCOUNT": "2000"}
    assert engine_core_environment("cuda", {}) == {}
    assert engine_core_environment("cpu", {"GOMP_SPINCOUNT": "300000"}) == {}
    assert engine_core_environment("cpu", {"OMP_WAIT_POLICY": "active"}) == {}
    monkeypatch.setenv("INFERNEO_ENGINE_OMP_SPINCOUNT", "")
    assert engine_core_environment("cpu", {}) == {}
    monkeypatch.setenv("INFERNEO_ENGINE_OMP_SPINCOUNT", "lots")
    with pytest.raises(ValueError, match="INFERNEO_ENGINE_OMP_SPINCOUNT must be a whole number"):
        engine_core_environment("cpu", {})
    monkeypatch.setenv("INFERNEO_TEST_KEPT", "mine")
    monkeypatch.delenv("INFERNEO_TEST_ADDED", raising=False)
    with _environment({"INFERNEO_TEST_KEPT": "theirs", "INFERNEO_TEST_ADDED": "1"}):
        assert os.environ["INFERNEO_TEST_KEPT"] == "theirs" and os.environ["INFERNEO_TEST_ADDED"] == "1"
    assert os.environ["INFERNEO_TEST_KEPT"] == "mine" and "INFERNEO_TEST_ADDED" not in os.environ
