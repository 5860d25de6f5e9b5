"""OpenAI's Files and Batch APIs on ``inferneo serve``, with the openai client as its users call it: upload a batch
file, create the batch, poll it to ``completed``, read the output and error files. Each answer is what the endpoint
gives for the same body; bad lines, refused requests and lines for another endpoint land in the error file; a
cancelled batch stops and keeps what was answered; bad calls are 4xx in OpenAI's error shape."""

from __future__ import annotations

import json
import signal
import time

import openai
import pytest

from inferneo.testing.server import RemoteServer

KEY = "batch-key"


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("files")


@pytest.fixture(scope="module")
def client(tiny_llama_dir, files_dir):
    with RemoteServer(tiny_llama_dir, "--served-model-name", "tiny", "--kv-cache-memory", "16MiB", "--num-threads",
                      "1", "--no-enable-prefix-caching", "--api-key", KEY, "--files-dir", str(files_dir),
                      "--disable-access-log") as server:
        yield openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)


def _chat(i: int) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": f"count to {i}"}], "max_tokens": 4,
            "temperature": 0}


def _line(custom_id: str, body: dict, url: str = "/v1/chat/completions") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def _wait(client, batch_id: str, until: tuple[str, ...], timeout: float = 120.0, poll: float = 0.2):
    """The batch once its status is one of ``until`` (or at ``timeout``), polled with either client (openai's
    or ``InferneoClient``)."""
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until or time.monotonic() > deadline:
            return batch
        time.sleep(poll)


def _records(client, file_id: str) -> dict[str, dict]:
    return {r["custom_id"]: r for r in map(json.loads, client.files.content(file_id).text.splitlines())}


def _written(path) -> tuple[int, int] | None:
    """(successes, failures) among the whole records in a running batch's records file; None once it is gone."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    records = [json.loads(line) for line in data.splitlines(keepends=True) if line.endswith(b"\n")]
    failed = sum(1 for r in records if r["error"] is not None)
    return len(records) - failed, failed


def _file_lines(client, file_id: str | None) -> int:
    return 0 if file_id is None else len(client.files.content(file_id).text.splitlines())


def _mixed_lines(n: int, prefix: str, max_tokens: int) -> tuple[list[str], int]:
    """``n`` chat lines, every 8th of them bad (a line that is not JSON, or a request the server refuses), and how
    many are bad."""
    lines = []
    for i in range(n):
        if i % 16 == 0:
            lines.append('{"custom_id": ')
        elif i % 8 == 0:
            lines.append(_line(f"{prefix}{i}", {**_chat(i), "max_tokens": -1}))
        else:
            lines.append(_line(f"{prefix}{i}", {**_chat(i), "max_tokens": max_tokens, "ignore_eos": True}))
    return lines, len(range(0, n, 8))


def test_a_batch_runs_to_completion_and_answers_as_the_endpoint_does(client):
    lines = [_line(f"q{i}", _chat(i)) for i in range(5)]
    lines += [_line("too-long", {**_chat(9), "max_tokens": -1}),
              _line("other-endpoint", {"model": "tiny", "prompt": "x"}, url="/v1/completions"),
              '{"custom_id": "not json"']
    upload = client.files.create(file=("requests.jsonl", "\n".join(lines).encode()), purpose="batch")
    assert upload.purpose == "batch" and upload.bytes > 0 and upload.object == "file"
    assert client.files.retrieve(upload.id).filename == "requests.jsonl"
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"job": "test"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"job": "test"}
    batch = _wait(client, batch.id, ("completed", "failed"))
    assert batch.status == "completed", batch
    assert batch.request_counts.total == 8 and batch.request_counts.completed == 5
    assert batch.request_counts.failed == 3 and batch.completed_at >= batch.created_at
    output, errors = _records(client, batch.output_file_id), _records(client, batch.error_file_id)
    assert sorted(output) == [f"q{i}" for i in range(5)]
    for i in range(5):
        direct = client.chat.completions.create(**_chat(i))
        record = output[f"q{i}"]
        assert record["id"].startswith("batch_req_") and record["error"] is None
        assert record["response"]["status_code"] == 200
        assert record["response"]["body"]["choices"][0]["message"]["content"] == direct.choices[0].message.content
    assert errors["too-long"]["response"]["status_code"] == 400
    assert errors["other-endpoint"]["error"]["code"] == "invalid_url"
    assert sum(1 for r in errors.values() if r["custom_id"] is None) == 1  # the line that is not JSON
    assert {b.id for b in client.batches.list()} >= {batch.id}
    # files page as OpenAI's do (the openai client follows the cursor)
    first = client.files.list(limit=1)
    assert len(first.data) == 1 and first.has_more
    assert {f.id for f in client.files.list(limit=1)} >= {upload.id, batch.output_file_id, batch.error_file_id}
    assert client.files.delete(batch.output_file_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(batch.output_file_id)


def test_request_counts_while_in_progress_are_the_records_written(client, files_dir):
    """While a batch runs, ``completed`` counts the lines answered with a 2xx and ``failed`` the others, each as its
    records are written: every poll lies between two reads of the batch's records file, one before it and one
    after. At the end the counts are the output and error files' lines."""
    lines, num_bad = _mixed_lines(160, "m", 128)
    upload = client.files.create(file=("mixed.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    records = files_dir / f"{batch.id}.records.jsonl"
    samples = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        before = _written(records) or (0, 0)
        polled = client.batches.retrieve(batch.id)
        after = _written(records)
        if polled.status != "in_progress":
            if polled.status in ("completed", "failed", "cancelled"):
                break
            continue
        counts = polled.request_counts
        assert counts.total == 160
        if after is not None:
            assert before[0] <= counts.completed <= after[0], (before, counts, after)
            assert before[1] <= counts.failed <= after[1], (before, counts, after)
            samples.append((counts.completed, counts.failed))
        time.sleep(0.01)
    assert polled.status == "completed", polled
    # polls caught it midway, with failures already counted apart from the successes
    assert any(failed > 0 and completed + failed < 160 for completed, failed in samples), samples
    assert polled.request_counts.completed == _file_lines(client, polled.output_file_id) == 160 - num_bad
    assert polled.request_counts.failed == _file_lines(client, polled.error_file_id) == num_bad


def test_a_cancelled_batch_stops_and_keeps_what_was_answered(client):
    lines = [_line(f"c{i}", {**_chat(i), "max_tokens": 40, "ignore_eos": True}) for i in range(200)]
    upload = client.files.create(file=("many.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    _wait(client, batch.id, ("in_progress",))
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = _wait(client, batch.id, ("cancelled",))
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    assert batch.request_counts.completed < 200
    assert batch.request_counts.completed == _file_lines(client, batch.output_file_id)
    assert batch.request_counts.failed == _file_lines(client, batch.error_file_id) == 0


def test_bad_calls_are_4xx(client):
    upload = client.files.create(file=("r.jsonl", _line("a", _chat(1)).encode()), purpose="batch")
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.create(input_file_id=upload.id, endpoint="/v1/audio/speech", completion_window="24h")
    assert exc.value.body["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="1h")
    assert exc.value.body["param"] == "completion_window"
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("r.jsonl", b"x"), purpose="fine-tune")
    assert exc.value.body["param"] == "purpose"
    unkeyed = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        unkeyed.files.list()


def test_a_batch_survives_a_server_restart_on_the_same_files_dir(tiny_llama_dir, tmp_path):
    """Killed while a batch runs, the server leaves it in_progress in --files-dir with part of its records;
    started again there, it resumes it where it stopped and every line ends with exactly one record. Its counts
    agree with the records all along: before the kill, from the first poll after the restart, and at the end."""
    flags = ["--served-model-name", "tiny", "--kv-cache-memory", "16MiB", "--num-threads", "1", "--engine-in-process",
             "--files-dir", str(tmp_path), "--disable-access-log"]
    lines, num_bad = _mixed_lines(120, "r", 128)  # long answers: the kill comes while the batch runs
    with RemoteServer(tiny_llama_dir, *flags) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        upload = client.files.create(file=("many.jsonl", "\n".join(lines).encode()), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        deadline = time.monotonic() + 60
        while client.batches.retrieve(batch.id).request_counts.completed < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        polled = client.batches.retrieve(batch.id)
        assert polled.status == "in_progress"
        server.stop(signal.SIGKILL)
    # what the killed server left: the batch in progress, part of its records written (at least those it counted)
    assert json.loads((tmp_path / f"{batch.id}.json").read_text())["status"] == "in_progress"
    good, bad = _written(tmp_path / f"{batch.id}.records.jsonl")
    assert 5 <= good + bad < 120
    assert good >= polled.request_counts.completed >= 5 and bad >= polled.request_counts.failed >= 1
    with RemoteServer(tiny_llama_dir, *flags) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        resumed = client.batches.retrieve(batch.id)
        # the records written before the kill are counted from the first poll on, each as what it is
        assert resumed.request_counts.total == 120
        assert resumed.request_counts.completed >= good and resumed.request_counts.failed >= bad
        done = _wait(client, batch.id, ("completed", "failed", "cancelled"))
        assert done.status == "completed", done
        assert done.request_counts.total == 120
        assert done.request_counts.completed == _file_lines(client, done.output_file_id) == 120 - num_bad
        assert done.request_counts.failed == _file_lines(client, done.error_file_id) == num_bad
        ids = [json.loads(r)["custom_id"] for r in client.files.content(done.output_file_id).text.splitlines()]
        ids += [json.loads(r)["custom_id"] for r in client.files.content(done.error_file_id).text.splitlines()]
        assert sorted(i for i in ids if i is not None) == sorted(f"r{i}" for i in range(120) if i % 16)


def _one_line_batch(tmp_path):
    """Files and batches over ``tmp_path`` with no server behind them, and a batch of one chat line just created
    (call inside an event loop: the batch's task starts on it): ``(files, batches, upload, batch)``."""
    import httpx

    from inferneo.entrypoints.openai.batch_api import Batches, CreateBatchRequest, StoredFiles

    files = StoredFiles(tmp_path)
    upload = files.add(_line("a", _chat(1)).encode(), "r.jsonl", "batch")
    batches = Batches(files, lambda: httpx.AsyncClient(base_url="http://unused"))
    batch = batches.create(CreateBatchRequest(input_file_id=upload["id"], endpoint="/v1/chat/completions",
                                              completion_window="24h"))
    return files, batches, upload, batch


def test_a_batch_cancelled_before_it_starts_ends_cancelled(tmp_path):
    """Cancelled in the same turn of the event loop that created it (its task never ran), a batch still ends
    ``cancelled`` with no records, not ``cancelling`` for ever."""
    import asyncio

    async def scenario() -> dict:
        _, batches, _, batch = _one_line_batch(tmp_path)
        assert batches.cancel(batch["id"])["status"] == "cancelling"
        for _ in range(20):
            await asyncio.sleep(0)
        return batches.view(batch["id"])

    batch = asyncio.run(scenario())
    assert batch["status"] == "cancelled" and batch["cancelled_at"] is not None
    assert batch["request_counts"]["completed"] == 0 and batch["output_file_id"] is None
    assert json.loads((tmp_path / f"{batch['id']}.json").read_text())["status"] == "cancelled"



def test_a_batch_whose_input_is_gone_fails_and_says_why(tmp_path):
    """A batch that cannot open its input (deleted before the batch began) ends ``failed`` with the reason in
    ``errors``, written down, its counts zero."""
    import asyncio

    async def scenario() -> dict:
        files, batches, upload, batch = _one_line_batch(tmp_path)
        files.delete(upload["id"])
        for _ in range(200):
            await asyncio.sleep(0.01)
            if batches.view(batch["id"])["status"] == "failed":
                break
        return batches.view(batch["id"])

    batch = asyncio.run(scenario())
    assert batch["status"] == "failed" and batch["failed_at"] is not None, batch
    assert batch["errors"]["data"][0]["code"] == "batch_failed" and "no file" in batch["errors"]["data"][0]["message"]
    assert batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert json.loads((tmp_path / f"{batch['id']}.json").read_text())["status"] == "failed"

# ---- InferneoClient's files and batches, over the same server ---------------------------------------------------


@pytest.fixture(scope="module")
def iclient(client):
    from inferneo.client import InferneoClient

    with InferneoClient(str(client.base_url), api_key=KEY, max_retries=0) as inferneo_client:
        yield inferneo_client


def test_inferneo_client_files_and_batches(iclient, client, tmp_path):
    """``InferneoClient.files`` and ``.batches`` as the openai client's: upload (a path, bytes, a file object, a
    tuple), retrieve, list through every page, read and delete files; create, poll, list and cancel batches; each
    answer typed, and what they say is what the openai client reads from the same server."""
    from inferneo.client import Batch, BatchRequestCounts, FileContent, FileObject, NotFoundError
    from inferneo.client.errors import BadRequestError

    lines, num_bad = _mixed_lines(24, "i", 4)
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(lines))
    upload = iclient.files.create(file=path, purpose="batch")
    assert isinstance(upload, FileObject) and upload.filename == "requests.jsonl"
    assert upload.bytes == path.stat().st_size and upload.purpose == "batch"
    assert iclient.files.retrieve(upload.id) == upload
    openai_file = client.files.retrieve(upload.id)
    assert openai_file.model_dump(exclude_none=True) == upload.model_dump(exclude_none=True)
    with open(path, "rb") as f:
        assert iclient.files.create(file=f).filename == "requests.jsonl"
    assert iclient.files.create(file=("named.jsonl", path.read_bytes())).filename == "named.jsonl"
    assert iclient.files.content(iclient.files.create(file=path.read_bytes()).id).content == path.read_bytes()

    batch = iclient.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                   completion_window="24h", metadata={"by": "inferneo"})
    assert isinstance(batch, Batch) and batch.metadata == {"by": "inferneo"}
    assert batch.status in ("validating", "in_progress")
    done = _wait(iclient, batch.id, ("completed", "failed", "cancelled"), poll=0.05)
    assert done.status == "completed" and done.completed_at is not None, done
    assert done.request_counts == BatchRequestCounts(total=24, completed=24 - num_bad, failed=num_bad)
    openai_view = client.batches.retrieve(batch.id)
    assert openai_view.model_dump(exclude_none=True) == done.model_dump(exclude_none=True)
    output = iclient.files.content(done.output_file_id)
    assert isinstance(output, FileContent) and output.text == client.files.content(done.output_file_id).text
    assert len(output.text.splitlines()) == 24 - num_bad
    assert len(iclient.files.content(done.error_file_id).text.splitlines()) == num_bad
    output.write_to_file(tmp_path / "out.jsonl")
    assert (tmp_path / "out.jsonl").read_bytes() == output.content

    # lists page by cursor; iterating a page goes through every page
    first = iclient.files.list(limit=1)
    assert len(first) == 1 and first.has_more and first.last_id == first.data[0].id
    every = [f.id for f in iclient.files.list(limit=1)]
    assert every == [f.id for f in iclient.files.list()] and len(every) == len(set(every))
    assert {upload.id, done.output_file_id, done.error_file_id} <= set(every)
    assert [f.id for f in iclient.files.list(order="asc")] == every[::-1]
    assert {f.purpose for f in iclient.files.list(purpose="batch_output")} == {"batch_output"}
    batches = [b.id for b in iclient.batches.list(limit=1)]
    assert batch.id in batches and batches == [b.id for b in client.batches.list(limit=100)]

    # cancel: a long batch stops; one that ended stays as it is
    long = [_line(f"l{i}", {**_chat(i), "max_tokens": 40, "ignore_eos": True}) for i in range(200)]
    running = iclient.batches.create(input_file_id=iclient.files.create(file="\n".join(long).encode()).id,
                                     endpoint="/v1/chat/completions")
    _wait(iclient, running.id, ("in_progress",), poll=0.05)
    assert iclient.batches.cancel(running.id).status in ("cancelling", "cancelled")
    cancelled = _wait(iclient, running.id, ("cancelled",), poll=0.05)
    assert cancelled.status == "cancelled" and cancelled.request_counts.completed < 200
    assert iclient.batches.cancel(batch.id).status == "completed"

    assert iclient.files.delete(done.output_file_id).deleted
    with pytest.raises(NotFoundError):
        iclient.files.retrieve(done.output_file_id)
    with pytest.raises(NotFoundError):
        iclient.batches.retrieve("batch_nope")
    with pytest.raises(BadRequestError) as exc:
        iclient.files.create(file=b"x", purpose="fine-tune")
    assert exc.value.param == "purpose"
    with pytest.raises(BadRequestError) as exc:
        iclient.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="1h")
    assert exc.value.param == "completion_window"


def test_async_inferneo_client_files_and_batches(client):
    """``AsyncInferneoClient`` has the same files and batches; its pages are iterated with ``async for``."""
    import asyncio

    from inferneo.client import AsyncInferneoClient

    lines, num_bad = _mixed_lines(9, "a", 4)

    async def scenario() -> None:
        async with AsyncInferneoClient(str(client.base_url), api_key=KEY, max_retries=0) as aclient:
            upload = await aclient.files.create(file=("async.jsonl", "\n".join(lines).encode()), purpose="batch")
            assert (await aclient.files.retrieve(upload.id)).filename == "async.jsonl"
            batch = await aclient.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions")
            deadline = time.monotonic() + 120
            while batch.status not in ("completed", "failed", "cancelled") and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                batch = await aclient.batches.retrieve(batch.id)
            assert batch.status == "completed", batch
            assert (batch.request_counts.completed, batch.request_counts.failed) == (9 - num_bad, num_bad)
            errors = (await aclient.files.content(batch.error_file_id)).text.splitlines()
            assert len(errors) == num_bad
            assert batch.id in [b.id async for b in await aclient.batches.list(limit=1)]
            files = [f.id async for f in await aclient.files.list(limit=2)]
            assert upload.id in files and files == [f.id for f in client.files.list(limit=100)]
            page = await aclient.files.list(limit=1)
            with pytest.raises(TypeError, match="async for"):
                list(page)
            assert (await aclient.batches.cancel(batch.id)).status == "completed"
            assert (await aclient.files.delete(upload.id)).deleted

    asyncio.run(scenario())
