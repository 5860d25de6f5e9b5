"""Leaving ``stream_batches`` early (a ``break``, Ctrl-C), or a ``DynamicBatcher`` block by an exception (Ctrl-C),
against a real ``inferneo serve`` on a tiny model: the batches still in flight are cancelled on the server too, instead
of running on to their end with nobody to read them."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

from inferneo.batching import DynamicBatcher, stream_batches
from inferneo.client import InferneoClient
from inferneo.testing.server import RemoteServer

MODEL = "tiny"
# Two sequences at a time and long answers: the batches in flight take many seconds to finish on their own.
LONG = {"max_tokens": 2000, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with RemoteServer(tiny_llama_dir, "--served-model-name", MODEL, "--max-num-seqs", "2", "--kv-cache-memory",
                      "32MiB", "--num-threads", "1", "--disable-access-log") as srv:
        yield srv


def requests_on_server(server) -> float:
    """Requests the server is running or has queued."""
    text = httpx.get(server.url("/metrics"), timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(("inferneo:num_requests_running", "inferneo:num_requests_waiting")))


def wait_for(server, condition, timeout: float) -> float:
    """Seconds until ``condition(requests_on_server)`` held; fails after ``timeout``."""
    start = time.monotonic()
    while not condition(requests_on_server(server)):
        assert time.monotonic() - start < timeout, f"server still has {requests_on_server(server)} requests"
        time.sleep(0.1)
    return time.monotonic() - start


def test_break_cancels_the_batches_in_flight(server):
    wait_for(server, lambda n: n == 0, 60)
    with InferneoClient(server.base_url, max_retries=0) as client:
        # 32 prompts in flight, two at a time on the server: the first batch is answered while others still wait.
        # The four batches reach the server concurrently, so the first one may have queued behind others (observed
        # on a loaded machine: 16, 8 or no requests left when it is answered, not 24).
        results = stream_batches(client, MODEL, [f"p{i}" for i in range(100)], batch_size=8, max_in_flight=4, **LONG)
        for result in results:
            assert result.ok and result.index == 0
            break
        left = requests_on_server(server)
        results.close()
    wait_for(server, lambda n: n == 0, 5)  # on their own, 8 answers of 2000 tokens two at a time take far longer
    if left < 8:  # (the SIGINT tests below wait for requests on the server before they interrupt)
        pytest.skip(f"the first batch was answered last ({left} requests left): nothing was in flight to cancel")


def interrupted(server, script: str) -> tuple[str, int, float]:
    """Run ``script`` in a child, send it SIGINT once 16 of its requests are on the server (four batches of four:
    two running, 14 waiting), and return what it printed, its exit status and the seconds it took to stop after the
    signal (at once when quiet; a loaded machine can take seconds).

    SIGINT is back to its default in the child, as a user's terminal has it: a suite started in the background
    (nohup ... &) ignores SIGINT, the child would inherit that, and Python then installs no KeyboardInterrupt
    handler."""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(server, lambda n: n >= 16, 60)
        proc.send_signal(signal.SIGINT)
        start = time.monotonic()
        out, _ = proc.communicate(timeout=60)
        stopped_in = time.monotonic() - start
    finally:
        proc.kill()
    return out, proc.returncode, stopped_in


def test_ctrl_c_cancels_the_batches_in_flight(server):
    wait_for(server, lambda n: n == 0, 60)
    script = textwrap.dedent(f"""
        from inferneo.batching import stream_batches
        from inferneo.client import InferneoClient
        client = InferneoClient({server.base_url!r}, max_retries=0)
        try:
            for result in stream_batches(client, {MODEL!r}, [f"p{{i}}" for i in range(40)], batch_size=4,
                                         max_in_flight=4, **{LONG!r}):
                print(result.index, flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    """)
    out, returncode, _ = interrupted(server, script)
    assert out.split() == ["interrupted"]
    assert returncode == 0
    wait_for(server, lambda n: n == 0, 5)  # on their own, 16 answers of 2000 tokens two at a time take far longer


def test_ctrl_c_in_a_dynamic_batcher_block_cancels_what_is_not_answered(server):
    """Ctrl-C inside ``with DynamicBatcher(...)`` once waited for every prompt submitted (minutes here) before the
    interrupt got out of the block; now it stops at once: the futures not answered are cancelled, the prompts still
    waiting are not sent, and the batches in flight are cancelled on the server."""
    wait_for(server, lambda n: n == 0, 60)
    script = textwrap.dedent(f"""
        import time
        from inferneo.batching import DynamicBatcher
        from inferneo.client import InferneoClient
        client = InferneoClient({server.base_url!r}, max_retries=0)
        futures = []
        try:
            with DynamicBatcher(client, {MODEL!r}, max_batch_size=4, max_wait_time=0.01, max_concurrency=4,
                                **{LONG!r}) as batcher:
                futures = [batcher.submit(f"p{{i}}") for i in range(40)]
                print("submitted", flush=True)
                for future in futures:
                    future.result()
        except KeyboardInterrupt:
            print("interrupted", sum(f.cancelled() for f in futures), batcher.pending, flush=True)
    """)
    out, returncode, stopped_in = interrupted(server, script)  # before: 40 answers of 2000 tokens, two at a time
    assert out.split() == ["submitted", "interrupted", "40", "0"], out
    assert returncode == 0 and stopped_in < 30
    wait_for(server, lambda n: n == 0, 5)  # the 16 sent were cancelled on the server


def test_an_exception_in_a_dynamic_batcher_block_cancels_and_a_normal_exit_still_answers_everything(server):
    wait_for(server, lambda n: n == 0, 60)
    with InferneoClient(server.base_url, max_retries=0) as client:
        with DynamicBatcher(client, MODEL, max_batch_size=2, max_wait_time=0.01, max_tokens=3,
                            ignore_eos=True) as batcher:
            short = [batcher.submit(f"q{i}") for i in range(5)]
        assert all(f.result().finish_reason == "length" for f in short)  # the normal exit waited for every answer
        with pytest.raises(RuntimeError, match="boom"), DynamicBatcher(client, MODEL, max_batch_size=4,
                                                                        max_wait_time=0.01, **LONG) as batcher:
            futures = [batcher.submit(f"p{i}") for i in range(12)]
            wait_for(server, lambda n: n >= 4, 60)
            raise RuntimeError("boom")
        assert all(f.cancelled() for f in futures) and batcher.pending == 0
        with pytest.raises(RuntimeError, match="closed"):
            batcher.submit("late")
    wait_for(server, lambda n: n == 0, 5)


def test_ctrl_c_while_the_block_end_waits_for_the_answers_cancels_them(server):
    """The usual shape: the block only submits, and leaving it normally waits (close()) for the answers. Ctrl-C
    during that wait once left the batches in flight running on the server; now it cancels them as cancel() does."""
    wait_for(server, lambda n: n == 0, 60)
    script = textwrap.dedent(f"""
        from inferneo.batching import DynamicBatcher
        from inferneo.client import InferneoClient
        client = InferneoClient({server.base_url!r}, max_retries=0)
        futures = []
        try:
            with DynamicBatcher(client, {MODEL!r}, max_batch_size=4, max_wait_time=0.01, max_concurrency=4,
                                **{LONG!r}) as batcher:
                futures = [batcher.submit(f"p{{i}}") for i in range(40)]
                print("submitted", flush=True)
        except KeyboardInterrupt:
            print("interrupted", sum(f.cancelled() for f in futures), flush=True)
    """)
    out, _, _ = interrupted(server, script)
    assert out.split() == ["submitted", "interrupted", "40"], out
    wait_for(server, lambda n: n == 0, 5)
