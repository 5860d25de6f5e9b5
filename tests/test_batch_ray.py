"""``inferneo batch --ray`` on the shared two-node local cluster, with its driver or one of its two replicas
killed (SIGKILL) at a seeded point and then re-run: every custom_id ends up exactly once, and the answers equal
the single-machine runner's (greedy). ``--shard I/N`` splits a file into resumable shards whose union is the
single-machine output."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inferneo.batch import BatchJob, OutputFileError, Sender
from inferneo.batch.in_process import InProcessServer
from inferneo.batch.job import Shard

ENGINE = ["--kv-cache-memory", "16MiB", "--num-threads", "1", "--max-num-seqs", "8"]
NUM_LINES = 16


def make_input(path: Path) -> Path:
    """Completions and chats (40 greedy tokens each), one line the server refuses, one that is not JSON."""
    lines = []
    for i in range(NUM_LINES):
        if i == 5:
            lines.append('{"custom_id": "req-05", "body": ')
            continue
        if i % 3 == 0:
            url, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": f"count to {i}"}]}
        else:
            url, body = "/v1/completions", {"prompt": f"story {i}: once upon a time"}
        body.update(model="tiny", max_tokens=40, ignore_eos=True, temperature=0)
        if i == 9:
            body["top_p"] = 5.0
        lines.append(json.dumps({"custom_id": f"req-{i:02d}", "method": "POST", "url": url, "body": body}))
    path.write_text("\n".join(lines) + "\n")
    return path


def answers(out: Path) -> dict[str | None, tuple]:
    """custom_id -> (status, error code, text, finish reason); fails on a line or custom_id written twice."""
    result: dict[str | None, tuple] = {}
    lines: set[str] = set()
    for raw in out.read_text().splitlines():
        record = json.loads(raw)
        assert record["id"] not in lines and record["custom_id"] not in result, f"{record['id']} written twice"
        lines.add(record["id"])
        response = record["response"]
        body = response["body"] if response else None
        choice = body["choices"][0] if body and "choices" in body else {}
        text = choice["message"]["content"] if "message" in choice else choice.get("text")
        result[record["custom_id"]] = (response and response["status_code"], (record["error"] or {}).get("code"),
                                       text, choice.get("finish_reason"))
    return result


def run_in_process(server: InProcessServer, input_path: Path, output: Path, shard: Shard | None = None):
    async def go():
        with BatchJob(input_path, output, shard=shard) as job:
            async with server.client() as http:
                return await job.run(Sender(http), concurrency=8, progress=False)
    return asyncio.run(go())


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    srv = InProcessServer(str(tiny_llama_dir), ["tiny"], kv_cache_memory="16MiB", num_threads=1, max_num_seqs=8)
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def job_input(tmp_path_factory) -> Path:
    return make_input(tmp_path_factory.mktemp("batch-ray") / "requests.jsonl")


@pytest.fixture(scope="module")
def reference(server, job_input, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("batch-ray-ref") / "single.jsonl"
    assert run_in_process(server, job_input, out).complete
    expected = answers(out)
    assert len(expected) == NUM_LINES and expected["req-09"][0] == 400 and expected[None][1] == "invalid_json"
    return expected


def start_on_ray(address: str, model: Path, input_path: Path, output: Path, log: Path,
                 replicas: int = 1) -> subprocess.Popen:
    args = [sys.executable, "-m", "inferneo.cli", "batch", "--ray", address, "-i", str(input_path),
            "-o", str(output), "--model", str(model), "--served-model-name", "tiny", "--replicas", str(replicas),
            "--replica-cpus", "0", "--batch-size", "2", "--no-progress", *ENGINE]
    with open(log, "ab") as f:
        return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT)


def records(out: Path) -> int:
    return out.read_bytes().count(b"\n") if out.exists() else 0


def wait_for_records(proc: subprocess.Popen, out: Path, count: int, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while records(out) < count:
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {count} records: " \
                                    f"{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def replica_pids() -> list[int]:
    import ray._private.state

    return [a["Pid"] for a in ray._private.state.actors().values()
            if "EngineReplica" in a["ActorClassName"] and a["State"] == "ALIVE"]


@pytest.mark.ray
@pytest.mark.slow  # two driver processes, each starting replicas: 125-150 s on the loaded 2-core host
@pytest.mark.parametrize("victim", ["driver", "replica"])
def test_batch_on_ray_killed_then_rerun_writes_each_custom_id_once(
        victim, ray_cluster, tiny_llama_dir, job_input, reference, tmp_path):
    out, log = tmp_path / "out.jsonl", tmp_path / "log.txt"
    kill_after = random.Random(f"batch-ray-{victim}").randint(2, 6)  # seeded: records written before the kill
    # two replicas when one is killed (its batches go to the other or to its restart), one when the driver is
    proc = start_on_ray(ray_cluster.address, tiny_llama_dir, job_input, out, log, 2 if victim == "replica" else 1)
    try:
        wait_for_records(proc, out, kill_after, log)
        if victim == "driver":
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        else:
            pids = replica_pids()  # the second replica may still be loading: kill one that answers
            assert pids, "no replica actor is alive"
            os.kill(pids[0], signal.SIGKILL)
        at_kill = records(out)
        assert at_kill < NUM_LINES, "the kill came after the job was done"
        if victim == "replica":
            assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rerun = start_on_ray(ray_cluster.address, tiny_llama_dir, job_input, out, log)
    assert rerun.wait(timeout=240) == 0, log.read_text()[-3000:]
    assert answers(out) == reference


def test_shards_split_the_file_and_together_equal_the_whole(server, job_input, reference, tmp_path):
    outputs = [tmp_path / f"shard-{i}.jsonl" for i in range(3)]
    for i, out in enumerate(outputs):
        summary = run_in_process(server, job_input, out, Shard(i, 3))
        assert summary.complete and summary.total == len(range(i, NUM_LINES, 3))
    merged: dict = {}
    for i, out in enumerate(outputs):
        part = answers(out)
        assert {int(cid[4:]) % 3 for cid in part if cid} <= {i}  # line n is in shard (n - 1) % 3
        assert not set(part) & set(merged)
        merged.update(part)
    assert merged == reference
    assert run_in_process(server, job_input, outputs[0], Shard(0, 3)).written == 0  # resumed: nothing left
    with pytest.raises(OutputFileError, match="not in shard 1/3"):
        BatchJob(job_input, outputs[0], shard=Shard(1, 3))


@pytest.mark.parametrize("shard", ["3/3", "1", "-1/2", "a/b"])
def test_a_bad_shard_is_refused(shard, job_input, tmp_path, capsys):
    from inferneo.cli.main import main

    assert main(["batch", "-i", str(job_input), "-o", str(tmp_path / "o.jsonl"), f"--shard={shard}"]) == 2
    assert "--shard must be I/N" in capsys.readouterr().err
