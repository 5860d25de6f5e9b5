"""Helpers for tests that kill parts of a running server: find its spawned processes, kill one while a stream is
open, and wait for processes to go."""

from __future__ import annotations

import signal
import time

import httpx
import psutil

from inferneo.testing.server import RemoteServer


def spawned_children(proc: psutil.Process) -> list[psutil.Process]:
    """``proc``'s children started by multiprocessing's spawn (not its resource tracker)."""
    return [c for c in proc.children() if "spawn_main" in " ".join(c.cmdline())
            and "resource_tracker" not in " ".join(c.cmdline())]


def gone(proc: psutil.Process, timeout: float) -> bool:
    try:
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        return False
    return True


def all_gone(procs: list[psutil.Process], timeout: float) -> bool:
    return all(gone(p, timeout) for p in procs)


def kill_during_stream(server: RemoteServer, victim: psutil.Process) -> tuple[list[str], float]:
    """Open a long streamed completion, SIGKILL ``victim`` after its first event, read the stream to its end.

    Returns the non-empty lines after the first event and the ``time.monotonic()`` of the kill.
    """
    with httpx.Client(timeout=60) as http, http.stream(
            "POST", server.url("/v1/completions"),
            json={"prompt": "streamed", "max_tokens": 2000, "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line).startswith("data: ")
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        return [line for line in lines if line], killed_at
