"""A server restarted in the middle of a job (a rolling restart: SIGTERM, 503 while it drains, the port closed for a
while, a new server on the same port): ``inferneo batch`` and a client with a ``retry_window`` ride through it
instead of giving up after their retries, and every line is answered exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from inferneo.client import InferneoClient
from inferneo.testing.server import RemoteServer, free_port

ENGINE = ["--served-model-name", "tiny", "--kv-cache-memory", "32MiB", "--num-threads", "1",
          "--disable-access-log", "--shutdown-timeout", "1"]
NUM_LINES = 24
AWAY = 10.0  # seconds the port stays closed: past what --max-retries 1 waited before the job gave up (a 503 while
# the server drains asks for 5 s, then a refused connection ended the job)


def write_input(path: Path) -> list[str]:
    ids = [f"r{i:02d}" for i in range(NUM_LINES)]
    with open(path, "w") as f:
        for i, custom_id in enumerate(ids):
            body = {"model": "tiny", "prompt": f"line {i}", "max_tokens": 48, "ignore_eos": True, "temperature": 0}
            f.write(json.dumps({"custom_id": custom_id, "url": "/v1/completions", "body": body}) + "\n")
    return ids


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_batch_and_client_ride_through_a_server_restart(tiny_llama_dir, tmp_path):
    requests, out, log = tmp_path / "requests.jsonl", tmp_path / "results.jsonl", tmp_path / "batch.log"
    ids = write_input(requests)
    port = free_port()
    first = RemoteServer(tiny_llama_dir, *ENGINE, port=port)
    second = None
    args = ["-i", str(requests), "-o", str(out), "--url", first.base_url, "--concurrency", "4", "--max-retries", "1",
            "--retry-window", "120", "--no-progress"]
    with open(log, "wb") as log_file:
        # SIGINT back to its default in the child, as test_batch_kill's children have it
        proc = subprocess.Popen([sys.executable, "-m", "inferneo.cli", "batch", *args], stdout=log_file,
                                stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    client = InferneoClient(first.base_url, max_retries=1, retry_window=120)
    answers: list = []
    asker = threading.Thread(target=lambda: answers.append(
        client.completions.create(model="tiny", prompt="during the restart", max_tokens=3, ignore_eos=True)))
    try:
        deadline = time.monotonic() + 120
        while len(records(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        first.close()  # SIGTERM: 503 while it drains for a second, then the port is closed
        done_before = len(records(out))
        assert proc.poll() is None and done_before < NUM_LINES, log.read_text()
        asker.start()  # the server is away: a client without a retry_window gives up within a second
        time.sleep(AWAY)
        assert proc.poll() is None, log.read_text()  # before: "cannot reach the server ... after 2 attempts"
        assert asker.is_alive()
        second = RemoteServer(tiny_llama_dir, *ENGINE, port=port)
        assert proc.wait(180) == 0, log.read_text()
        asker.join(60)
    finally:
        proc.kill()
        first.close()
        if second is not None:
            second.close()
        client.close()
    final = records(out)
    assert sorted(r["custom_id"] for r in final) == ids  # every line exactly once
    assert all(r["error"] is None and r["response"]["body"]["usage"]["completion_tokens"] == 48 for r in final)
    assert len(final) > done_before  # the rest were answered by the second server
    assert f"{NUM_LINES} lines, {NUM_LINES} records" in log.read_text()
    assert "does not answer" in log.read_text() and "answers again" in log.read_text()  # what the user sees
    assert len(answers) == 1 and answers[0].usage.completion_tokens == 3
