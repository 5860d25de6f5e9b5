"""``inferneo batch``: OpenAI batch files against a real server over HTTP and in-process, error records for bad
lines, resume, torn-line repair, refusing another input's output, and the sender's retries."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from inferneo.batch import BatchJob, OutputFileError, Sender, ServerUnreachableError
from inferneo.batch.records import error_record, response_record
from inferneo.batch.sender import ServerBusyError, parse_retry_after
from inferneo.cli.main import main
from inferneo.testing.server import RemoteServer

# No prefix caching, so that a request computes the same numbers whatever ran before it on the server.
ENGINE = ["--kv-cache-memory", "32MiB", "--num-threads", "1", "--no-enable-prefix-caching"]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with RemoteServer(tiny_llama_dir, "--served-model-name", "tiny", *ENGINE, "--disable-access-log") as srv:
        yield srv


def request_line(custom_id: str, i: int, chat: bool = False, **body) -> str:
    if chat:
        body = {"model": "tiny", "messages": [{"role": "user", "content": f"say {i}"}], "max_tokens": 4,
                "temperature": 0, **body}
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})
    body = {"model": "tiny", "prompt": f"hello number {i}", "max_tokens": 4, "temperature": 0, **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body})


def mixed_input(path: Path) -> Path:
    """Good completions and chats, a 400 from the server, and every kind of invalid line."""
    lines = [request_line(f"cmpl-{i}", i) for i in range(4)]
    lines += [request_line(f"chat-{i}", i, chat=True) for i in range(3)]
    lines += [
        request_line("bad-param", 0, max_tokens=-1),                       # the server answers 400
        request_line("bad-model", 0, model="no-such-model"),               # the server answers 404
        '{"custom_id": "broken", "method": "POST", ',                     # not JSON
        json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}),  # no custom_id
        json.dumps({"custom_id": "embed", "method": "POST", "url": "/v1/images/generations", "body": {"prompt": "x"}}),
        json.dumps({"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}}),
        request_line("cmpl-0", 9),                                         # duplicate custom_id
        json.dumps({"custom_id": "streamed", "method": "POST", "url": "/v1/completions",
                    "body": {"prompt": "x", "stream": True}}),
        "",                                                                # blank lines are not requests
        json.dumps([1, 2, 3]),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_records(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def check_mixed_output(records: list[dict]) -> dict[int, dict]:
    by_line = {int(r["id"].rsplit("_", 1)[1]): r for r in records}
    assert len(by_line) == len(records) == 16  # every non-blank input line exactly once
    assert sorted(by_line) == [*range(1, 16), 17]
    good = [r for r in records if r["error"] is None]
    assert sorted(r["custom_id"] for r in good) == sorted([f"cmpl-{i}" for i in range(4)]
                                                          + [f"chat-{i}" for i in range(3)])
    for r in good:
        assert r["response"]["status_code"] == 200
        body = r["response"]["body"]
        assert r["response"]["request_id"] == body["id"]
        assert body["object"] in ("text_completion", "chat.completion") and body["usage"]["completion_tokens"] <= 4
    bad_param = next(r for r in records if r["custom_id"] == "bad-param")
    assert bad_param["response"]["status_code"] == 400
    assert bad_param["response"]["body"]["error"]["param"] == "max_tokens"
    assert "max_tokens" in bad_param["error"]["message"]
    bad_model = next(r for r in records if r["custom_id"] == "bad-model")
    assert bad_model["response"]["status_code"] == 404 and bad_model["error"]["code"] == "model_not_found"
    codes = {line: by_line[line]["error"]["code"] for line in (10, 11, 12, 13, 14, 15, 17)}
    assert codes == {10: "invalid_json", 11: "missing_custom_id", 12: "invalid_url", 13: "invalid_method",
                     14: "duplicate_custom_id", 15: "invalid_body", 17: "invalid_request"}
    assert by_line[14]["custom_id"] == "cmpl-0" and by_line[10]["custom_id"] is None
    for line in codes:
        assert by_line[line]["response"] is None and by_line[line]["error"]["message"]
    return by_line


def test_batch_against_a_server(server, tmp_path, capsys):
    requests = mixed_input(tmp_path / "requests.jsonl")
    out = tmp_path / "results.jsonl"
    assert main(["batch", "-i", str(requests), "-o", str(out), "--url", server.base_url, "--concurrency", "4",
                 "--no-progress"]) == 0
    check_mixed_output(read_records(out))
    assert "16 lines, 16 records" in capsys.readouterr().err
    # Rerun: nothing left to do, nothing written twice.
    before = out.read_bytes()
    assert main(["batch", "-i", str(requests), "-o", str(out), "--url", server.base_url, "--no-progress"]) == 0
    assert out.read_bytes() == before
    assert "nothing to do" in capsys.readouterr().err


def test_a_line_that_cannot_be_sent_gets_its_error_record_and_the_job_goes_on(server, tmp_path, capsys):
    # Each of these once stopped the whole job (a traceback, no record for any line, the same on every rerun):
    # JSON that reads into a body the request cannot carry, and JSON nested too deeply to read.
    lines = [
        request_line("good-0", 0),
        request_line("surrogate", 1).replace('"hello number 1"', '"bad \\ud800 half"'),
        request_line("nan", 2).replace('"temperature": 0', '"temperature": NaN'),
        request_line("huge-float", 3).replace('"temperature": 0', '"temperature": 1e999'),
        '{"custom_id": "deep", "url": "/v1/completions", "body": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}",
        request_line("good-1", 5, chat=True),
        '{"custom_id": "cut", "url": "/v1/completions", "body": {"prompt": "x"',
    ]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(lines) + "\n")
    out = tmp_path / "results.jsonl"
    assert main(["batch", "-i", str(requests), "-o", str(out), "--url", server.base_url, "--no-progress"]) == 0
    assert "7 lines, 7 records" in capsys.readouterr().err
    by_line = {int(r["id"].rsplit("_", 1)[1]): r for r in read_records(out)}
    assert sorted(by_line) == [1, 2, 3, 4, 5, 6, 7]
    assert by_line[1]["error"] is None and by_line[6]["error"] is None
    for line, custom_id in ((2, "surrogate"), (3, "nan"), (4, "huge-float"), (5, None)):
        record = by_line[line]
        assert record["custom_id"] == custom_id and record["response"] is None
        assert record["error"]["code"] == ("invalid_json" if custom_id is None else "invalid_body")
        assert f"line {line}" in record["error"]["message"]
    assert "surrogate" in by_line[2]["error"]["message"] and "NaN" in by_line[3]["error"]["message"]
    # A line cut short: where it breaks off is told within that line (not as "line 2" of a one-line text).
    assert by_line[7]["error"] == {"code": "invalid_json", "message": "line 7 is not valid JSON: Expecting ',' "
                                   "delimiter (column 70)"}  # just past its end


def test_batch_in_process_answers_as_the_server_does(server, tiny_llama_dir, tmp_path):
    requests = mixed_input(tmp_path / "requests.jsonl")
    remote, local = tmp_path / "remote.jsonl", tmp_path / "local.jsonl"
    # One request at a time on both sides: the same batch shapes, so the same greedy tokens.
    assert main(["batch", "-i", str(requests), "-o", str(remote), "--url", server.base_url, "--no-progress",
                 "--concurrency", "1"]) == 0
    assert main(["batch", "-i", str(requests), "-o", str(local), "--model", str(tiny_llama_dir),
                 "--served-model-name", "tiny", *ENGINE, "--no-progress", "--concurrency", "1"]) == 0
    remote_lines = check_mixed_output(read_records(remote))
    local_lines = check_mixed_output(read_records(local))

    def comparable(record: dict) -> dict:
        record = json.loads(json.dumps(record))
        if record["response"] is not None:
            record["response"]["request_id"] = None
            body = record["response"]["body"]
            body.pop("id", None)
            body.pop("created", None)
        return record

    for line, record in remote_lines.items():  # same greedy text, same usage, same errors, same ids
        assert comparable(local_lines[line]) == comparable(record)


def test_resume_after_partial_output_and_torn_last_line(server, tmp_path, capsys):
    requests = mixed_input(tmp_path / "requests.jsonl")
    out = tmp_path / "results.jsonl"
    assert main(["batch", "-i", str(requests), "-o", str(out), "--url", server.base_url, "--no-progress"]) == 0
    lines = out.read_text().splitlines(keepends=True)
    # Keep 9 records, then half of the 10th without its newline, as a kill in the middle of a write leaves it.
    out.write_text("".join(lines[:9]) + lines[9][: len(lines[9]) // 2])
    capsys.readouterr()
    assert main(["batch", "-i", str(requests), "-o", str(out), "--url", server.base_url, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "unfinished last line" in err and "9 of 16 lines already done" in err
    records = read_records(out)
    check_mixed_output(records)
    assert [r["id"] for r in records[:9]] == [json.loads(x)["id"] for x in lines[:9]]


def test_retry_failed_sends_the_lines_the_server_answered_with_an_error_again(server, tiny_llama_dir, tmp_path,
                                                                                capsys):
    """A line answered with an error (here a model the first server did not serve) once kept its failed record for
    good: a rerun had nothing to do. --retry-failed sends such lines again, and only them; lines that could not be
    sent keep their records, and every line still has exactly one."""
    requests = mixed_input(tmp_path / "requests.jsonl")
    with open(requests, "a") as f:
        f.write(request_line("other-model", 5, model="tiny2") + "\n")
    out = tmp_path / "results.jsonl"
    assert main(["batch", "-i", str(requests), "-o", str(out), "--url", server.base_url, "--no-progress"]) == 0
    first = {r["custom_id"]: r for r in read_records(out) if r["custom_id"]}
    assert first["other-model"]["response"]["status_code"] == 404
    capsys.readouterr()
    # The same file again, answered by a server that serves tiny2 as well (here in this process).
    assert main(["batch", "-i", str(requests), "-o", str(out), "--model", str(tiny_llama_dir), "--served-model-name",
                 "tiny", "tiny2", *ENGINE, "--no-progress", "--retry-failed"]) == 0
    assert "sending 3 lines the server answered with an error again" in capsys.readouterr().err
    records = read_records(out)
    assert len(records) == len({r["id"] for r in records}) == 17  # every non-blank line once
    again = {r["custom_id"]: r for r in records if r["custom_id"]}
    assert again["other-model"]["error"] is None and again["other-model"]["response"]["status_code"] == 200
    assert again["bad-param"]["response"]["status_code"] == 400  # sent again, refused again
    for custom_id in ("cmpl-0", "chat-1", "embed", "get"):  # answered, or never sendable: untouched
        assert again[custom_id] == first[custom_id]
    assert not list(tmp_path.glob(".results.jsonl.*"))  # no temporary file left
    assert main(["batch", "-i", str(requests), "-o", str(out), "--url", server.base_url, "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().err


def test_output_of_another_input_is_refused(server, tmp_path, capsys):
    first = tmp_path / "first.jsonl"
    first.write_text(request_line("a", 1) + "\n")
    second = tmp_path / "second.jsonl"
    second.write_text(request_line("b", 2) + "\n")
    out = tmp_path / "results.jsonl"
    assert main(["batch", "-i", str(first), "-o", str(out), "--url", server.base_url, "--no-progress"]) == 0
    before = out.read_bytes()
    assert main(["batch", "-i", str(second), "-o", str(out), "--url", server.base_url, "--no-progress"]) == 2
    assert "different input file" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(["batch", "-i", str(second), "-o", str(out), "--url", server.base_url, "--no-progress",
                 "--overwrite"]) == 0
    assert [r["custom_id"] for r in read_records(out)] == ["b"]


def test_resuming_with_another_model_is_refused(server, tiny_llama_dir, tmp_path, capsys):
    """Every answer carries the server's system_fingerprint (the checkpoint, dtype, quantization, KV cache type, chat
    template, adapter). A job resumed against the same name served from other weights or settings would mix two
    models' answers in one file: it stops before writing one, and the same settings as the first run finish it."""
    requests = mixed_input(tmp_path / "requests.jsonl")
    out = tmp_path / "results.jsonl"
    assert main(["batch", "-i", str(requests), "-o", str(out), "--url", server.base_url, "--no-progress"]) == 0
    fingerprints = {r["response"]["body"]["system_fingerprint"] for r in read_records(out) if r["error"] is None}
    assert len(fingerprints) == 1 and next(iter(fingerprints)).startswith("inferneo-")
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(line for line in lines if '"cmpl-' in line or '"chat-0"' in line))  # 5 answers kept
    before = out.read_bytes()
    capsys.readouterr()
    for other in (["--dtype", "bfloat16"], ["--hf-overrides", '{"rms_norm_eps": 0.01}']):
        assert main(["batch", "-i", str(requests), "-o", str(out), "--model", str(tiny_llama_dir),
                     "--served-model-name", "tiny", *ENGINE, *other, "--no-progress", "--concurrency", "1"]) == 2
        err = capsys.readouterr().err
        assert "holds answers of model 'tiny' with system_fingerprint inferneo-" in err, err
        assert out.read_bytes() == before  # nothing of the other model's written
    assert main(["batch", "-i", str(requests), "-o", str(out), "--model", str(tiny_llama_dir),
                 "--served-model-name", "tiny", *ENGINE, "--no-progress"]) == 0
    records = read_records(out)
    check_mixed_output(records)
    assert {r["response"]["body"]["system_fingerprint"] for r in records if r["error"] is None} == fingerprints


def test_every_kind_of_endpoint_in_one_batch(tiny_llama_dir, tmp_path):
    """A batch may mix OpenAI's batch endpoints (completions, chat, Responses, embeddings) and vLLM's (scores,
    reranks, classes: here refused by this generative model with the endpoint's own 400); each record's body is what
    the endpoint itself answers for the same body."""
    from inferneo.testing.server import RemoteServer

    lines = {
        "cmpl": ("/v1/completions", {"prompt": "hello", "max_tokens": 3, "temperature": 0}),
        "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                          "temperature": 0}),
        "resp": ("/v1/responses", {"input": "hi", "max_output_tokens": 3, "temperature": 0}),
        "embed": ("/v1/embeddings", {"input": ["one", "two"]}),
        "score": ("/v1/score", {"text_1": "a", "text_2": ["b", "c"]}),
        "rerank": ("/v1/rerank", {"query": "a", "documents": ["b", "c"]}),
        "classify": ("/classify", {"input": "a"}),
    }
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"custom_id": k, "method": "POST", "url": url,
                                            "body": {"model": "tiny", **body}}) + "\n"
                                for k, (url, body) in lines.items()))
    out = tmp_path / "results.jsonl"
    with RemoteServer(tiny_llama_dir, "--served-model-name", "tiny", *ENGINE, "--disable-access-log") as srv:
        assert main(["batch", "-i", str(requests), "-o", str(out), "--url", srv.base_url, "--no-progress",
                     "--concurrency", "1"]) == 0  # every line has its record (three of them refusals)
        records = {r["custom_id"]: r for r in read_records(out)}
        for custom_id, (url, body) in lines.items():
            direct = httpx.post(srv.base_url + url, json={"model": "tiny", **body}, timeout=60)
            record = records[custom_id]["response"]
            assert record["status_code"] == direct.status_code, custom_id
            if direct.status_code != 200:
                assert record["body"]["error"] == direct.json()["error"]
                continue
            mine, theirs = record["body"], direct.json()
            for volatile in ("id", "created", "created_at", "completed_at", "usage"):
                mine.pop(volatile, None), theirs.pop(volatile, None)
            if custom_id == "resp":  # item ids are random
                for item in mine["output"] + theirs["output"]:
                    item.pop("id", None)
            assert mine == theirs, custom_id
    assert {k for k, r in records.items() if r["error"] is None} == {"cmpl", "chat", "resp", "embed"}
    # the Ray processor's answer columns read each kind of answer: text where there is one, never a 2xx as an error
    from inferneo.integrations.rows import answer_of

    columns = {k: answer_of(r["response"]["status_code"], r["response"]["request_id"], r["response"]["body"])
               for k, r in records.items()}
    assert columns["cmpl"]["generated_text"] == records["cmpl"]["response"]["body"]["choices"][0]["text"]
    assert columns["chat"]["generated_text"] == records["chat"]["response"]["body"]["choices"][0]["message"]["content"]
    resp_text = records["resp"]["response"]["body"]["output"][-1]["content"][0]["text"]
    assert columns["resp"]["generated_text"] == resp_text
    assert columns["resp"]["finish_reason"] == records["resp"]["response"]["body"]["status"]
    assert columns["embed"]["error"] is None and columns["embed"]["generated_text"] is None
    assert json.loads(columns["embed"]["response"])["data"][1]["embedding"]
    refusal = records["score"]["response"]["body"]["error"]
    assert columns["score"]["error"] == f"{refusal['code'] or refusal['type']}: {refusal['message']}"


def test_foreign_or_damaged_output_is_refused_and_left_alone(tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(request_line("a", 1) + "\n")
    foreign = tmp_path / "notes.txt"
    foreign.write_text("my precious notes, no newline at the end")
    with pytest.raises(OutputFileError, match="does not look like"):
        BatchJob(requests, foreign)
    assert foreign.read_text() == "my precious notes, no newline at the end"
    other_json = tmp_path / "other.jsonl"
    other_json.write_text('{"id": 1}\n')
    with pytest.raises(OutputFileError, match="not written by 'inferneo batch'"):
        BatchJob(requests, other_json)
    with pytest.raises(OutputFileError, match="must not be the input"):
        BatchJob(requests, requests)
    with BatchJob(requests, tmp_path / "out.jsonl") as job:
        digest = job.digest
    damaged = tmp_path / "damaged.jsonl"
    good = json.dumps({"id": f"batch_req_{digest[:16]}_1", "custom_id": "a", "response": None, "error": None},
                      separators=(",", ":"))
    damaged.write_text("garbage\n" + good + "\n")
    with pytest.raises(OutputFileError, match="line 1 is not a batch record"):
        BatchJob(requests, damaged)


def test_a_second_run_on_the_same_output_is_refused(tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(request_line("a", 1) + "\n")
    with BatchJob(requests, tmp_path / "out.jsonl"), pytest.raises(OutputFileError, match="in use"):
        BatchJob(requests, tmp_path / "out.jsonl")


def test_the_output_counts_its_failed_lines_apart(tmp_path):
    """``OutputFile.failed`` (what the Batch API's ``request_counts.failed`` reads) holds the lines whose record is
    an error, as read back and as appended; --retry-failed takes out those it sends again."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(request_line(c, i) + "\n" for i, c in enumerate("abcd")))
    out = tmp_path / "out.jsonl"
    with BatchJob(requests, out) as job:
        digest = job.digest
        job.output.append(response_record(digest, 1, "a", 200, None, {"ok": True}))
        job.output.append(response_record(digest, 2, "b", 404, None, {"error": {"message": "no", "code": "x"}}))
        job.output.append(error_record(digest, 3, "c", "invalid_body", "bad"))
        assert (job.num_done, job.num_failed) == (3, 2) and job.output.failed == {2, 3}
    with BatchJob(requests, out) as job:
        assert (job.num_done, job.num_failed) == (3, 2) and job.output.failed == {2, 3}
    with BatchJob(requests, out, retry_failed=True) as job:  # line 2 is sent again; line 3 could not be sent
        assert (job.num_done, job.num_failed) == (2, 1) and job.output.failed == {3}


def test_unreachable_server_stops_the_run_and_the_rerun_finishes(server, tmp_path, capsys):
    requests = mixed_input(tmp_path / "requests.jsonl")
    out = tmp_path / "results.jsonl"
    dead = "http://127.0.0.1:9"  # the discard port: nothing listens there
    assert main(["batch", "-i", str(requests), "-o", str(out), "--url", dead, "--max-retries", "1",
                 "--retry-window", "0.5", "--no-progress"]) == 1
    assert "run the same command again" in capsys.readouterr().err
    partial = read_records(out)
    assert all(r["response"] is None for r in partial)  # only the invalid lines: nothing was answered
    assert main(["batch", "-i", str(requests), "-o", str(out), "--url", server.base_url, "--no-progress"]) == 0
    check_mixed_output(read_records(out))


def test_more_in_flight_than_the_server_queues_still_finishes(tiny_llama_dir, tmp_path, capsys):
    # The server queues 2 requests and runs 2; the job sends 16 at a time. The ones turned away with 429 once ran
    # out of retries while the server was busy answering the others, and stopped the whole job.
    with RemoteServer(tiny_llama_dir, "--served-model-name", "tiny", *ENGINE, "--disable-access-log",
                      "--max-num-seqs", "2", "--max-queued-requests", "2") as busy_server:
        requests = tmp_path / "requests.jsonl"
        requests.write_text("".join(request_line(f"r{i}", i, max_tokens=32, ignore_eos=True) + "\n"
                                    for i in range(60)))
        out = tmp_path / "results.jsonl"
        assert main(["batch", "-i", str(requests), "-o", str(out), "--url", busy_server.base_url, "--no-progress",
                     "--concurrency", "16", "--max-retries", "1"]) == 0
    records = read_records(out)
    assert sorted(r["custom_id"] for r in records) == sorted(f"r{i}" for i in range(60))
    assert all(r["error"] is None and r["response"]["body"]["usage"]["completion_tokens"] == 32 for r in records)
    assert "60 lines, 60 records" in capsys.readouterr().err


def test_a_wrong_api_key_stops_the_job_instead_of_recording_a_401_for_every_line(tiny_llama_dir, tmp_path, capsys):
    """A 401 is the job's key, not a line's fault: it once gave every line a failed record, and the rerun with the
    right key then had nothing to do (every line "done")."""
    with RemoteServer(tiny_llama_dir, "--served-model-name", "tiny", *ENGINE, "--disable-access-log",
                      "--api-key", "right-key") as keyed:
        requests = mixed_input(tmp_path / "requests.jsonl")
        out = tmp_path / "results.jsonl"
        for key in ([], ["--api-key", "wrong-key"]):
            assert main(["batch", "-i", str(requests), "-o", str(out), "--url", keyed.base_url, "--no-progress",
                         *key]) == 1
            err = capsys.readouterr().err
            assert "refused the API key (401" in err and "--api-key" in err and "run the same command again" in err
            assert all(r["response"] is None for r in read_records(out))  # only the lines that cannot be sent
        assert main(["batch", "-i", str(requests), "-o", str(out), "--url", keyed.base_url, "--no-progress",
                     "--api-key", "right-key"]) == 0
    check_mixed_output(read_records(out))


def test_url_with_v1_or_without_scheme_is_the_same_server(server, tmp_path, capsys):
    """As InferneoClient takes it: the lines name /v1/... paths, so a --url ending in /v1 must not double it."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(request_line(f"r{i}", i) + "\n" for i in range(3)))
    host = server.base_url.removeprefix("http://")
    for i, url in enumerate((server.base_url + "/v1", server.base_url + "/v1/", host)):
        out = tmp_path / f"out{i}.jsonl"
        assert main(["batch", "-i", str(requests), "-o", str(out), "--url", url, "--no-progress"]) == 0, url
        records = read_records(out)
        assert len(records) == 3 and all(r["error"] is None for r in records), records[0]
        assert all(r["response"]["status_code"] == 200 for r in records)


def test_an_output_that_cannot_be_created_is_an_error_not_a_traceback(tmp_path, capsys):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(request_line("a", 1) + "\n")
    for out in (requests / "out.jsonl", tmp_path):  # under a file (as a read-only place refuses), a folder
        assert main(["batch", "-i", str(requests), "-o", str(out), "--url", "http://127.0.0.1:9",
                     "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"inferneo batch: error: cannot write the results to {out}: "), err
    assert main(["batch", "-i", str(tmp_path), "-o", str(tmp_path / "o.jsonl"), "--url", "http://x"]) == 2
    assert "no input file" in capsys.readouterr().err


def test_url_and_model_together_are_refused(tmp_path, capsys):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(request_line("a", 1) + "\n")
    assert main(["batch", "-i", str(requests), "-o", str(tmp_path / "o.jsonl"), "--url", "http://x",
                 "--model", "m"]) == 2
    assert "not both" in capsys.readouterr().err


# ---- the sender's retries, against scripted replies -------------------------------------------------------


def scripted(replies: list) -> tuple[httpx.AsyncClient, list[float]]:
    """A client whose answers are ``replies`` in turn (an exception is raised); records when each came."""
    seen: list[float] = []
    loop_time = asyncio.get_running_loop().time

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(loop_time())
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    return httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://test"), seen


def test_sender_retries_429_and_5xx_honouring_retry_after():
    async def go():
        client, seen = scripted([httpx.Response(429, headers={"Retry-After": "0.3"}, json={"error": {}}),
                                 httpx.Response(503, json={"error": {}}),
                                 httpx.Response(200, json={"id": "cmpl-1", "choices": []})])
        sender = Sender(client, max_retries=3, backoff=0.01)
        reply = await sender.post("/v1/completions", {"prompt": "x"})
        assert reply.status_code == 200 and reply.request_id == "cmpl-1" and sender.num_retries == 2
        assert seen[1] - seen[0] >= 0.29  # waited as Retry-After asked

    asyncio.run(go())


def test_sender_does_not_retry_4xx_and_gives_up_on_5xx():
    async def go():
        client, seen = scripted([httpx.Response(400, json={"error": {"message": "bad", "code": None}})])
        reply = await Sender(client, max_retries=3, backoff=0.01).post("/v1/completions", {})
        assert reply.status_code == 400 and len(seen) == 1
        client, seen = scripted([httpx.Response(500, text="oops")] * 3)
        reply = await Sender(client, max_retries=2, backoff=0.01).post("/v1/completions", {})
        assert reply.status_code == 500 and reply.body == "oops" and len(seen) == 3

    asyncio.run(go())


def test_sender_connection_errors_then_unreachable():
    async def go():
        refused = httpx.ConnectError("refused")
        client, _ = scripted([refused, httpx.Response(200, json={})])
        assert (await Sender(client, max_retries=2, backoff=0.01).post("/x", {})).status_code == 200
        client, seen = scripted([refused, refused, refused])
        with pytest.raises(ServerUnreachableError):
            await Sender(client, max_retries=2, backoff=0.01, retry_window=0).post("/x", {})
        assert len(seen) == 3
        client, _ = scripted([httpx.ReadTimeout("slow"), httpx.ReadTimeout("slow")])
        reply = await Sender(client, max_retries=1, backoff=0.01).post("/x", {})
        assert reply.status_code == 408 and reply.body["error"]["code"] == "timeout"

    asyncio.run(go())


def test_sender_stops_on_a_server_still_busy_after_its_retries():
    """429 / 503 after every retry: the batch stops (the line stays undone for the rerun) rather than writing a
    record that only says the server was busy; 500 and timeouts stay that request's answer."""
    async def go():
        busy = httpx.Response(429, headers={"Retry-After": "0"},
                              json={"error": {"message": "the queue is full", "code": "queue_full"}})
        client, seen = scripted([busy] * 3)
        with pytest.raises(ServerBusyError, match="429 \\(the queue is full\\) after 3 attempts"):
            await Sender(client, max_retries=2, backoff=0.01, retry_window=0).post("/v1/completions", {})
        assert len(seen) == 3
        client, _ = scripted([httpx.Response(503, text="down")] * 2)
        with pytest.raises(ServerUnreachableError, match="503"):  # ServerBusyError is one
            await Sender(client, max_retries=1, backoff=0.01, retry_window=0).post("/v1/completions", {})

    asyncio.run(go())


def test_sender_waits_out_a_server_that_is_away_for_its_retry_window():
    """Refused connections, 502 and 503 past --max-retries (a server restarting behind its port or a proxy) are
    retried until the server has been silent for the whole window; a 500 is still that request's answer."""
    async def go():
        refused = httpx.ConnectError("refused")
        away = [refused] * 4 + [httpx.Response(502, text="bad gateway"),
                                httpx.Response(503, headers={"Retry-After": "0"}, json={"error": {}}), refused]
        client, seen = scripted([*away, httpx.Response(200, json={"id": "cmpl-1"})])
        notes: list[str] = []
        sender = Sender(client, max_retries=1, backoff=0.01, max_backoff=0.05, retry_window=30, notify=notes.append)
        reply = await sender.post("/v1/completions", {"prompt": "x"})
        assert reply.status_code == 200 and len(seen) == 8 and sender.num_retries == 7
        assert len(notes) == 2  # once when it goes away, once when it is back
        assert "does not answer (ConnectError); waiting for it up to 30 s (--retry-window)" in notes[0]
        assert "answers again" in notes[1]
        client, seen = scripted([refused] * 100)
        sender = Sender(client, max_retries=1, backoff=0.01, max_backoff=0.05, retry_window=0.3)
        with pytest.raises(ServerUnreachableError, match="attempts in 0 s"):
            await sender.post("/v1/completions", {})
        assert 0.3 <= seen[-1] - seen[0] < 1.0 and len(seen) > 4
        # A 503 for a request that ran past the server's --request-timeout is that request's failure, not the
        # server's absence: it once kept the job retrying (minutes an attempt) and stopped it with no record.
        timed_out = httpx.Response(503, headers={"Retry-After": "0"},
                                   json={"error": {"message": "too slow", "code": "request_timeout"}})
        client, seen = scripted([timed_out] * 2)
        reply = await Sender(client, max_retries=1, backoff=0.01, retry_window=30).post("/v1/completions", {})
        assert reply.status_code == 503 and reply.body["error"]["code"] == "request_timeout" and len(seen) == 2
        client, seen = scripted([httpx.Response(500, text="oops")] * 2)
        reply = await Sender(client, max_retries=1, backoff=0.01, retry_window=30).post("/v1/completions", {})
        assert reply.status_code == 500 and len(seen) == 2

    asyncio.run(go())


def test_retry_window_flag(tmp_path, capsys):
    from inferneo.batch.sender import DEFAULT_RETRY_WINDOW
    from inferneo.cli.batch import DEFAULT_RETRY_WINDOW as CLI_DEFAULT

    assert CLI_DEFAULT == DEFAULT_RETRY_WINDOW >= 120  # rides through a rolling restart
    requests = tmp_path / "requests.jsonl"
    requests.write_text(request_line("a", 1) + "\n")
    for bad in ("-1", "nan", "soon"):
        with pytest.raises(SystemExit):
            main(["batch", "-i", str(requests), "-o", str(tmp_path / "o.jsonl"), "--retry-window", bad])
        assert "--retry-window" in capsys.readouterr().err


def test_parse_retry_after():
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("100000") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no wait


def test_parse_line_edge_cases():
    from inferneo.batch import BatchRequest, InvalidLine, parse_line

    good = b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}'
    assert isinstance(parse_line(1, b"\xef\xbb\xbf" + good + b"\r\n", set()), BatchRequest)  # BOM, CRLF
    assert isinstance(parse_line(1, good.replace(b'"method": "POST", ', b""), set()), BatchRequest)  # POST implied
    cases = {
        b'{"custom_id": "a", "url": "/v1/completions", "body": {}, "extra": 1}': "invalid_request",
        b'{"custom_id": 7, "url": "/v1/completions", "body": {}}': "missing_custom_id",
        b'{"custom_id": "", "url": "/v1/completions", "body": {}}': "missing_custom_id",
        b'{"custom_id": "a", "url": "/v1/completions", "body": "x"}': "invalid_body",
        b'{"custom_id": "a", "url": "/v1/completions"}': "invalid_body",
        b'{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "\xff"}}': "invalid_json",
        b'"just a string"': "invalid_request",
    }
    for raw, code in cases.items():
        result = parse_line(3, raw, set())
        assert isinstance(result, InvalidLine) and result.code == code and "line 3" in result.message, raw


def test_a_full_disk_mid_job_leaves_an_output_the_rerun_resumes(tmp_path):
    """A disk that fills up mid-job takes part of a record and refuses the rest (here a file size limit does it:
    EFBIG where a full disk says ENOSPC). The part once stayed, the next record continued its line, and no later run
    would resume the file ("line N is not a batch record"). Now the job stops with the error, the part is cut off,
    and the rerun finishes with every line once."""
    import errno
    import resource
    import signal

    from inferneo.batch.records import error_record

    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(request_line(f"r{i}", i) + "\n" for i in range(40)))
    out = tmp_path / "results.jsonl"

    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        return httpx.Response(200, json={"id": "cmpl-" + body["prompt"][-2:].strip(), "object": "text_completion",
                                         "choices": [{"index": 0, "text": "x" * 150}]})

    async def run_job() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://test") as http:
            with BatchJob(requests, out) as job:
                await job.run(Sender(http), concurrency=8, progress=False)

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal past the limit
    try:
        # Space that comes back after a failed write (another process freed some): the next record starts a line.
        with BatchJob(requests, out) as job:
            resource.setrlimit(resource.RLIMIT_FSIZE, (100, hard))
            with pytest.raises(OSError):
                job.output.append(error_record(job.digest, 1, "r0", "x", "y" * 200))
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            job.output.append(error_record(job.digest, 2, "r1", "x", "y"))
        with BatchJob(requests, out, overwrite=False) as job:
            assert job.num_done == 1
        out.unlink()
        resource.setrlimit(resource.RLIMIT_FSIZE, (4000, hard))  # room for about a dozen records
        with pytest.raises(OSError) as info:
            asyncio.run(run_job())
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert info.value.errno == errno.EFBIG
    written = read_records(out)  # whole lines only: the part of the record that did not fit was cut off
    assert 5 < len(written) < 40 and out.stat().st_size <= 4000
    asyncio.run(run_job())
    records = read_records(out)
    assert sorted(r["custom_id"] for r in records) == sorted(f"r{i}" for i in range(40))
    assert all(r["error"] is None for r in records)
