"""OpenAI's Files and Batch APIs on the server: ``client.files.create(purpose="batch")``, then
``client.batches.create(input_file_id=..., endpoint=..., completion_window="24h")``, polled with
``client.batches.retrieve`` until ``completed``, whose ``output_file_id`` (and ``error_file_id``) hold the records.
Files uploaded with purpose ``vision`` (or ``user_data``) are images that the Responses API's ``input_image`` parts
name by ``file_id`` (:meth:`StoredFiles.image_data_url`).

A batch runs in the server's own event loop as ``inferneo batch`` runs a file (``inferneo.batch.job.BatchJob``):
each line goes through the server's own routes (an in-process httpx transport over this app, so the same
validation, limits and answers as over HTTP), at most ``BATCH_CONCURRENCY`` at a time, beside the server's other
requests. Every line gets one record: the successes go to the output file and the failures (a line that is not a
request, a request the server refused, a line for another endpoint than the batch's) to the error file, in
OpenAI's record format. ``cancel`` stops the lines in flight; what was answered is kept in the files.

Files live in ``files_dir`` (``--files-dir``; default a temporary folder removed at shut-down), each batch's object
and records beside them. A server stopped while batches run leaves them ``in_progress``; started again on the same
``--files-dir``, it resumes them where they stopped (``BatchJob`` skips the lines already answered), so every line
still gets exactly one record.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import mimetypes
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import FileResponse
from pydantic import Field

from inferneo.batch.job import BatchJob
from inferneo.batch.records import SUPPORTED_URLS
from inferneo.batch.sender import Reply, Sender
from inferneo.entrypoints.openai.errors import APIError, bad_request
from inferneo.entrypoints.openai.protocol import _Body
from inferneo.multimodal.image_loading import MAX_IMAGE_BYTES

logger = logging.getLogger(__name__)

# What files are uploaded for: batch input, and images the Responses API's input_image parts name by file_id.
FILE_PURPOSES = ("batch", "vision", "user_data")
IMAGE_PURPOSES = ("vision", "user_data")
BATCH_CONCURRENCY = 64  # lines of one batch in flight at once
COMPLETION_WINDOW_S = 24 * 3600
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class CreateBatchRequest(_Body):
    """``POST /v1/batches``."""

    input_file_id: str = Field(max_length=64)
    endpoint: str = Field(max_length=64)
    completion_window: str = Field(max_length=16)
    metadata: dict[str, str] | None = Field(None, max_length=16)


class StoredFiles:
    """The uploaded and written files, each ``<root>/<id>`` with its OpenAI file object in ``<root>/<id>.json``
    (``root`` is made with the first file: a server that stores none leaves nothing behind)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        self.root.mkdir(parents=True, exist_ok=True)
        file_id = f"file-{secrets.token_hex(12)}"
        (self.root / file_id).write_bytes(data)
        record = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                  "filename": filename, "purpose": purpose, "status": "processed", "status_details": None,
                  "expires_at": None}
        (self.root / f"{file_id}.json").write_text(json.dumps(record))
        return record

    def get(self, file_id: str) -> dict[str, Any]:
        meta = self.root / f"{file_id}.json"
        if not _ID.match(file_id) or not meta.is_file():
            raise APIError(404, f"no file {file_id[:80]!r}", "file_id", code="file_not_found")
        return json.loads(meta.read_text())

    def path(self, file_id: str) -> Path:
        self.get(file_id)
        return self.root / file_id

    def delete(self, file_id: str) -> dict[str, Any]:
        self.get(file_id)
        (self.root / file_id).unlink(missing_ok=True)
        (self.root / f"{file_id}.json").unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    def image_data_url(self, file_id: str, field: str) -> str:
        """Uploaded file ``file_id`` (purpose ``vision`` or ``user_data``) as the ``data:`` URL of an image part;
        an ``APIError`` 400 naming ``field`` when there is no such file or it is not one an image is uploaded as."""
        meta = self.root / f"{file_id}.json"
        if not _ID.match(file_id) or not meta.is_file():
            raise APIError(400, f"{field}: no file {file_id[:80]!r} on this server (upload the image with "
                           "purpose 'vision')", "input", code="file_not_found")
        record = json.loads(meta.read_text())
        if record["purpose"] not in IMAGE_PURPOSES:
            raise APIError(400, f"{field}: file {file_id} was uploaded with purpose {record['purpose']!r}; images "
                           f"are uploaded with purpose {' or '.join(map(repr, IMAGE_PURPOSES))}", "input")
        if record["bytes"] > MAX_IMAGE_BYTES:
            raise APIError(400, f"{field}: file {file_id} is larger than an image may be "
                           f"({MAX_IMAGE_BYTES // 2**20} MiB)", "input")
        media = mimetypes.guess_type(record["filename"])[0] or ""
        data = base64.b64encode((self.root / file_id).read_bytes()).decode()
        return f"data:{media if media.startswith('image/') else 'image/unknown'};base64,{data}"

    def list(self, purpose: str | None = None) -> list[dict[str, Any]]:
        records = [json.loads(p.read_text()) for p in self.root.glob("file-*.json")]
        return sorted((r for r in records if purpose is None or r["purpose"] == purpose),
                      key=lambda r: r["created_at"], reverse=True)


class _EndpointSender:
    """A ``Sender`` that answers a line for another endpoint than the batch's with an error, as OpenAI does."""

    def __init__(self, sender: Sender, endpoint: str) -> None:
        self.sender = sender
        self.endpoint = endpoint

    @property
    def num_retries(self) -> int:
        return self.sender.num_retries

    async def post(self, url: str, body: dict[str, Any]) -> Reply:
        if url != self.endpoint:
            return Reply(400, None, {"error": {"message": f"the line's url {url} is not the batch's endpoint "
                                               f"{self.endpoint}", "type": "invalid_request_error",
                                               "param": "url", "code": "invalid_url"}})
        return await self.sender.post(url, body)


class Batches:
    """The server's batches: create, run in the background, retrieve, list, cancel."""

    def __init__(self, files: StoredFiles, client: Callable[[], httpx.AsyncClient]) -> None:
        self.files = files
        self._client = client
        self._batches: dict[str, dict[str, Any]] = {
            batch["id"]: batch for batch in map(_read_json, files.root.glob("batch_*.json"))}
        self._tasks: dict[str, asyncio.Task] = {}
        self._jobs: dict[str, BatchJob] = {}
        self._closing = False

    async def resume(self) -> None:
        """Start again the batches a stopped server left unfinished (at start-up, before requests are taken). Their
        jobs are opened first (the records already written read back), so that their ``request_counts`` agree with
        those records from the first poll on."""
        for batch in self._batches.values():
            if batch["status"] in ("validating", "in_progress", "finalizing", "cancelling"):
                logger.info("resuming batch %s (%s)", batch["id"], batch["status"])
                if batch["status"] in ("validating", "in_progress"):
                    with contextlib.suppress(Exception):  # _run opens it again and fails the batch with why
                        self._jobs[batch["id"]] = await asyncio.to_thread(self._open, batch)
                self._start(batch)

    def _open(self, batch: dict[str, Any]) -> BatchJob:
        return BatchJob(self.files.path(batch["input_file_id"]), self._work(batch))

    def _work(self, batch: dict[str, Any]) -> Path:
        """The batch's records while it runs (in input-line order of their answers), split at finalization."""
        return self.files.root / f"{batch['id']}.records.jsonl"

    def _start(self, batch: dict[str, Any]) -> None:
        task = self._tasks[batch["id"]] = asyncio.get_running_loop().create_task(self._run(batch))
        task.add_done_callback(lambda _: self._settle(batch))

    def _settle(self, batch: dict[str, Any]) -> None:
        """A batch cancelled before its task began (so ``_run`` never ran) ends cancelled, not cancelling; a job
        opened for it (at resumption) is closed, its records kept for the next start."""
        job = self._jobs.pop(batch["id"], None)
        if job is not None:
            job.close()
        if batch["status"] == "cancelling" and not self._closing:
            self._set(batch, "cancelled", "cancelled_at")

    def _set(self, batch: dict[str, Any], status: str, at: str | None = None) -> None:
        """Move ``batch`` to ``status`` (stamping ``at``) and write it down, so a restarted server finds it."""
        batch["status"] = status
        if at is not None:
            batch[at] = int(time.time())
        path = self.files.root / f"{batch['id']}.json"
        path.with_suffix(".tmp").write_text(json.dumps(batch))
        path.with_suffix(".tmp").replace(path)

    def create(self, req: CreateBatchRequest) -> dict[str, Any]:
        if req.endpoint not in SUPPORTED_URLS:
            raise bad_request(f"endpoint must be one of {', '.join(SUPPORTED_URLS)}, got {req.endpoint!r}",
                              "endpoint")
        if req.completion_window != "24h":
            raise bad_request(f"completion_window must be '24h', got {req.completion_window!r}", "completion_window")
        source = self.files.get(req.input_file_id)
        if source["purpose"] != "batch":
            raise bad_request(f"file {req.input_file_id} was uploaded with purpose {source['purpose']!r}, not "
                              "'batch'", "input_file_id")
        now = int(time.time())
        batch = {"id": f"batch_{secrets.token_hex(12)}", "object": "batch", "endpoint": req.endpoint, "errors": None,
                 "input_file_id": req.input_file_id, "completion_window": req.completion_window,
                 "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": now,
                 "in_progress_at": None, "expires_at": now + COMPLETION_WINDOW_S, "finalizing_at": None,
                 "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
                 "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
                 "metadata": req.metadata}
        self._batches[batch["id"]] = batch
        self._set(batch, "validating")
        self._start(batch)
        return self.view(batch["id"])

    def view(self, batch_id: str) -> dict[str, Any]:
        """The batch object as OpenAI returns it; while it runs, ``request_counts`` are those of the records written
        so far (``completed``: answered with a 2xx, bound for the output file; ``failed``: bound for the error
        file)."""
        batch = self._batches.get(batch_id)
        if batch is None:
            raise APIError(404, f"no batch {batch_id[:80]!r}", "batch_id", code="batch_not_found")
        job = self._jobs.get(batch_id)
        return dict(batch) if job is None else {**batch, "request_counts": _counts(job)}

    def list(self, limit: int, after: str | None) -> dict[str, Any]:
        ids = sorted(self._batches, key=lambda i: self._batches[i]["created_at"], reverse=True)
        return cursor_page([self.view(i) for i in ids], limit, after)

    def cancel(self, batch_id: str) -> dict[str, Any]:
        batch = self._batches.get(batch_id) or self.view(batch_id)
        if batch["status"] in ("validating", "in_progress"):
            self._set(batch, "cancelling", "cancelling_at")
            self._tasks[batch_id].cancel()
        return self.view(batch_id)

    async def close(self) -> None:
        """Stop the batches still running (at server shut-down), leaving them to resume at the next start."""
        self._closing = True
        for task in self._tasks.values():
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def _run(self, batch: dict[str, Any]) -> None:
        work = self._work(batch)
        cancelled = batch["status"] == "cancelling"
        failure: Exception | None = None
        try:
            if batch["status"] in ("validating", "in_progress"):
                job = self._jobs.get(batch["id"]) or await asyncio.to_thread(self._open, batch)
                self._jobs[batch["id"]] = job
                batch["request_counts"] = _counts(job)
                self._set(batch, "in_progress", "in_progress_at" if batch["in_progress_at"] is None else None)
                async with self._client() as client:
                    sender = _EndpointSender(Sender(client, retry_window=60.0), batch["endpoint"])
                    with job:
                        await job.run(sender, concurrency=BATCH_CONCURRENCY, progress=False)
        except asyncio.CancelledError:
            if self._closing:  # the server stops: the batch resumes at its next start
                return
            cancelled = True
        except Exception as exc:
            failure = exc
        finally:
            job = self._jobs.pop(batch["id"], None)
            if job is not None:
                job.close()  # (idempotent) a job opened at resumption and never run
                batch["request_counts"] = _counts(job)  # the counts as they stand, until finalization's
        if failure is not None:
            logger.warning("batch %s failed: %r", batch["id"], failure)
            batch["errors"] = {"object": "list", "data": [{"code": "batch_failed", "message": str(failure)[:1000],
                                                           "param": None, "line": None}]}
            self._set(batch, "failed", "failed_at")
            return
        self._set(batch, "finalizing", "finalizing_at")
        await asyncio.to_thread(self._finalize, batch, work)
        if cancelled:
            self._set(batch, "cancelled", "cancelled_at")
        else:
            self._set(batch, "completed", "completed_at")

    def _finalize(self, batch: dict[str, Any], work: Path) -> None:
        """Split the records into the output file (successes) and the error file (the rest); a second call (a
        server stopped while finalizing) finds the records gone and leaves the files as the first made them."""
        good, bad = [], []
        if not work.is_file():
            return
        for line in work.read_bytes().splitlines(keepends=True):
            if line.strip():
                (good if json.loads(line).get("error") is None else bad).append(line)
        batch["request_counts"] = {"total": max(len(good) + len(bad), batch["request_counts"]["total"]),
                                   "completed": len(good), "failed": len(bad)}
        if good:
            batch["output_file_id"] = self.files.add(b"".join(good), f"{batch['id']}_output.jsonl",
                                                     "batch_output")["id"]
        if bad:
            batch["error_file_id"] = self.files.add(b"".join(bad), f"{batch['id']}_error.jsonl",
                                                    "batch_output")["id"]
        self._set(batch, "finalizing")  # the files and their counts written down before the records go
        work.unlink()


def cursor_page(items: list[dict[str, Any]], limit: int, after: str | None) -> dict[str, Any]:
    """OpenAI's list page: the ``limit`` items after the one whose id is ``after`` (from the first when it is None
    or unknown), with ``first_id``, ``last_id`` and ``has_more`` for the next page's cursor."""
    ids = [item["id"] for item in items]
    if after is not None and after in ids:
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


def _counts(job: BatchJob) -> dict[str, int]:
    """``request_counts`` of a running batch: its lines and the records written so far, by file they go to."""
    return {"total": job.total, "completed": job.num_done - job.num_failed, "failed": job.num_failed}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def install_batch_routes(app: FastAPI, batches: Batches) -> None:
    """OpenAI's ``/v1/files`` and ``/v1/batches`` routes on ``app``."""
    files = batches.files

    @app.post("/v1/files")
    async def upload(file: UploadFile = File(...), purpose: str = Form(...)) -> dict[str, Any]:  # noqa: B008
        if purpose not in FILE_PURPOSES:
            raise bad_request(f"this server stores files of purpose {', '.join(map(repr, FILE_PURPOSES))} (batch "
                              f"input, and images for the Responses API's input_image file_id), got {purpose!r}",
                              "purpose")
        data = await file.read()
        if not data.strip():
            raise bad_request("the file is empty", "file")
        if purpose == "vision" and len(data) > MAX_IMAGE_BYTES:
            raise bad_request(f"an image may have at most {MAX_IMAGE_BYTES // 2**20} MiB", "file")
        default_name = "upload.jsonl" if purpose == "batch" else "upload"
        return await asyncio.to_thread(files.add, data, file.filename or default_name, purpose)

    @app.get("/v1/files")
    async def list_files(purpose: str | None = None, limit: int = 10000, after: str | None = None,
                         order: str = "desc") -> dict[str, Any]:
        if not 1 <= limit <= 10000 or order not in ("asc", "desc"):
            raise bad_request("limit must be between 1 and 10000 and order asc or desc", "limit")
        listed = files.list(purpose)
        return cursor_page(listed[::-1] if order == "asc" else listed, limit, after)

    @app.get("/v1/files/{file_id}")
    async def file_object(file_id: str) -> dict[str, Any]:
        return files.get(file_id)

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> FileResponse:
        record = files.get(file_id)
        media = ("application/jsonl" if record["purpose"] == "batch"
                 else mimetypes.guess_type(record["filename"])[0] or "application/octet-stream")
        return FileResponse(files.path(file_id), media_type=media)

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str) -> dict[str, Any]:
        return files.delete(file_id)

    @app.post("/v1/batches")
    async def create_batch(body: CreateBatchRequest) -> dict[str, Any]:
        return batches.create(body)

    @app.get("/v1/batches")
    async def list_batches(limit: int = 20, after: str | None = None) -> dict[str, Any]:
        if not 1 <= limit <= 100:
            raise bad_request(f"limit must be between 1 and 100, got {limit}", "limit")
        return batches.list(limit, after)

    @app.get("/v1/batches/{batch_id}")
    async def batch_object(batch_id: str) -> dict[str, Any]:
        return batches.view(batch_id)

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str) -> dict[str, Any]:
        return batches.cancel(batch_id)


def batch_service(app: FastAPI, api_key: str | None, files_dir: str | None) -> tuple[Batches, Callable[[], None]]:
    """The batches of ``app`` (their lines posted to ``app`` itself, with ``api_key`` when it needs one), with
    files in ``files_dir`` (None: a temporary folder), and what removes that temporary folder."""
    root = Path(files_dir) if files_dir else Path(tempfile.gettempdir()) / f"inferneo-files-{secrets.token_hex(8)}"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def client() -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        return httpx.AsyncClient(transport=transport, base_url="http://inferneo.batches", headers=headers,
                                 timeout=None)

    def cleanup() -> None:
        if not files_dir:
            shutil.rmtree(root, ignore_errors=True)

    return Batches(StoredFiles(root), client), cleanup
