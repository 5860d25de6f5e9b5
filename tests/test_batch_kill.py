"""``inferneo batch`` killed at random points (SIGKILL, ten runs, seeded) and interrupted with Ctrl-C, then
resumed: the output ends with every input line exactly once, each a valid response or an error record, and
no kill leaves a file that the next run cannot resume."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inferneo.testing.server import RemoteServer

NUM_LINES = 40
NUM_KILLS = 10
ENGINE = ["--kv-cache-memory", "32MiB", "--num-threads", "1"]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with RemoteServer(tiny_llama_dir, "--served-model-name", "tiny", *ENGINE, "--disable-access-log") as srv:
        yield srv


def make_input(path: Path) -> list[str]:
    """40 lines: completions and chats of different lengths, two the server refuses, one that is not JSON.

    Each answer is 600+ tokens so that the job lasts long enough for ten kills mid-run (at about 200 tokens a
    line, the tiny model once finished fourteen lines inside the first random pause)."""
    custom_ids = []
    lines = []
    for i in range(NUM_LINES):
        custom_id = f"req-{i:02d}"
        if i == 13:
            lines.append('{"custom_id": "req-13", "body": ')  # not JSON: an error record without a custom_id
            continue
        if i % 3 == 0:
            url, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": f"count to {i}"}]}
        else:
            url, body = "/v1/completions", {"prompt": f"story number {i}: once upon a time"}
        body.update(model="tiny", max_tokens=600 + i % 17, ignore_eos=True, temperature=0)
        if i in (7, 29):
            body["top_p"] = 5.0  # out of range: the server answers 400
        lines.append(json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}))
        custom_ids.append(custom_id)
    path.write_text("\n".join(lines) + "\n")
    return custom_ids


def start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        # SIGINT back to its default in the child: a suite started in the background (nohup ... &) ignores SIGINT,
        # the child would inherit that, and Python installs no KeyboardInterrupt handler for an ignored signal
        return subprocess.Popen([sys.executable, "-m", "inferneo.cli", "batch", *args, "--no-progress"],
                                stdout=f, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def complete_lines(out: Path) -> int:
    return out.read_bytes().count(b"\n") if out.exists() else 0


def check_resumable(out: Path) -> set[int]:
    """What a killed run may leave: complete records, no line twice, at worst a torn last line."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    body, _, tail = data.rpartition(b"\n")
    assert not tail or tail.startswith(b'{"id":"batch_req_'), tail[:80]
    lines = set()
    for raw in body.split(b"\n") if body else []:
        record = json.loads(raw)
        line = int(record["id"].rsplit("_", 1)[1])
        assert line not in lines, f"line {line} written twice"
        lines.add(line)
    return lines


def check_final(out: Path, custom_ids: list[str]) -> None:
    text = out.read_text()
    assert text.endswith("\n")
    records = [json.loads(line) for line in text.splitlines()]  # parses line by line
    assert len(records) == NUM_LINES
    assert sorted(int(r["id"].rsplit("_", 1)[1]) for r in records) == list(range(1, NUM_LINES + 1))
    named = [r["custom_id"] for r in records if r["custom_id"] is not None]
    assert sorted(named) == sorted(custom_ids)  # each custom_id exactly once
    for r in records:
        if r["error"] is None:
            assert r["response"]["status_code"] == 200 and r["response"]["body"]["choices"]
        else:
            assert r["error"]["code"] and r["error"]["message"]
    failed = {r["custom_id"]: r for r in records if r["error"] is not None}
    assert set(failed) == {None, "req-07", "req-29"}
    assert failed["req-07"]["response"]["status_code"] == 400


def wait_for(proc: subprocess.Popen, out: Path, lines: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and complete_lines(out) < lines and time.monotonic() < deadline:
        time.sleep(0.002)


@pytest.mark.slow  # CI time: covered by faster tests of the same path
def test_sigkill_at_random_points_then_resume(server, tmp_path):
    requests, out, log = tmp_path / "requests.jsonl", tmp_path / "results.jsonl", tmp_path / "batch.log"
    custom_ids = make_input(requests)
    args = ["-i", str(requests), "-o", str(out), "--url", server.base_url, "--concurrency", "3"]
    rng = random.Random(1234)
    killed_mid_run = 0
    for run in range(NUM_KILLS):
        done = len(check_resumable(out))
        proc = start(args, log)
        if run % 3 == 0:  # a random moment: start-up, reading the output, or sending
            time.sleep(rng.uniform(0.0, 0.45))
        else:  # a random point in the work: after some more records, plus a little jitter
            wait_for(proc, out, done + rng.randint(1, max(1, (NUM_LINES - done) // 6)))
            time.sleep(rng.uniform(0.0, 0.02))
        running = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        if running:
            killed_mid_run += 1
            assert proc.returncode == -signal.SIGKILL
        after = check_resumable(out)
        assert len(after) >= done  # nothing lost
    assert killed_mid_run >= NUM_KILLS - 2, log.read_text()

    # Ctrl-C: a clean stop that says how to resume.
    done = len(check_resumable(out))
    proc = start(args, log)
    if done < NUM_LINES:
        wait_for(proc, out, done + 1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) in (0, 130)
    else:
        proc.wait(30)
    check_resumable(out)

    proc = start(args, log)
    assert proc.wait(120) == 0, log.read_text()
    check_final(out, custom_ids)
    assert "resuming" in log.read_text()


@pytest.mark.slow  # the message after Ctrl-C; exactly-once after a kill is what the two tests above show
def test_ctrl_c_says_how_to_resume(server, tmp_path):
    requests, out, log = tmp_path / "requests.jsonl", tmp_path / "results.jsonl", tmp_path / "batch.log"
    custom_ids = make_input(requests)
    args = ["-i", str(requests), "-o", str(out), "--url", server.base_url, "--concurrency", "2"]
    proc = start(args, log)
    wait_for(proc, out, 3)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130, log.read_text()
    assert "interrupted" in log.read_text() and "again to resume" in log.read_text()
    assert 3 <= len(check_resumable(out)) < NUM_LINES
    assert start(args, log).wait(120) == 0
    check_final(out, custom_ids)


def test_sigkill_in_process_then_resume(tiny_llama_dir, tmp_path):
    requests, out, log = tmp_path / "requests.jsonl", tmp_path / "results.jsonl", tmp_path / "batch.log"
    custom_ids = make_input(requests)
    args = ["-i", str(requests), "-o", str(out), "--model", str(tiny_llama_dir), "--served-model-name", "tiny",
            *ENGINE, "--concurrency", "4"]
    for target in (5, 20):
        proc = start(args, log)
        wait_for(proc, out, target, timeout=120)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        check_resumable(out)
    assert start(args, log).wait(120) == 0, log.read_text()
    check_final(out, custom_ids)
