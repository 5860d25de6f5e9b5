"""``client.files``: OpenAI's Files API (``/v1/files``), where batch inputs are uploaded and batch results read."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any, Literal
from urllib.parse import quote

from inferneo.client.types import FileContent, FileDeleted, FileList, FileObject

if TYPE_CHECKING:
    from inferneo.client._base import AsyncAPIClient, SyncAPIClient, Timeout

# What ``files.create(file=...)`` takes, as the openai client does: the bytes, a binary file object, a path, or a
# tuple ``(filename, bytes or file object[, content type])``.
FileInput = bytes | IO[bytes] | os.PathLike[str] | tuple[str | None, Any] | tuple[str | None, Any, str | None]


@contextlib.contextmanager
def _upload_form(file: FileInput, purpose: str) -> Iterator[dict[str, Any]]:
    """The multipart form of an upload (httpx's ``files`` and ``data``); a path is opened for the request's
    duration, and sent under its own name."""
    with contextlib.ExitStack() as stack:
        if isinstance(file, os.PathLike):
            part: tuple[Any, ...] = (os.path.basename(os.fspath(file)), stack.enter_context(open(file, "rb")))
        elif isinstance(file, tuple):
            part = file
        elif isinstance(file, (bytes, bytearray)):
            part = ("upload.jsonl", bytes(file))
        elif hasattr(file, "read"):
            name = getattr(file, "name", None)
            part = (os.path.basename(name) if isinstance(name, str) else "upload.jsonl", file)
        else:
            raise TypeError(f"file must be bytes, a binary file object, a path or a (filename, content) tuple; got "
                            f"{type(file).__name__}")
        yield {"files": {"file": part}, "data": {"purpose": purpose}}


def _list_query(purpose: str | None, limit: int | None, after: str | None, order: str | None) -> dict[str, Any]:
    return {"purpose": purpose, "limit": limit, "after": after, "order": order}


def _path(file_id: str) -> str:
    return f"/files/{quote(file_id, safe='')}"


class Files:
    """The server's stored files: batch inputs and batch results."""

    def __init__(self, client: SyncAPIClient) -> None:
        self._client = client

    def create(self, *, file: FileInput, purpose: Literal["batch"] | str = "batch",
               timeout: Timeout | None = None) -> FileObject:
        """Upload ``file`` (bytes, a binary file object, a path, or ``(filename, content)``) for ``purpose``
        (``batch``: an Inferneo server stores no other); its ``id`` is a batch's ``input_file_id``."""
        with _upload_form(file, purpose) as form:
            return self._client.request("POST", "/files", FileObject, timeout=timeout, **form)

    def list(self, *, purpose: str | None = None, limit: int | None = None, after: str | None = None,
             order: Literal["asc", "desc"] | None = None, timeout: Timeout | None = None) -> FileList:
        """The stored files, newest first (``order="asc"``: oldest first), ``limit`` to a page from ``after`` (a
        file id); iterating the answer goes through every page."""
        page = self._client.request("GET", "/files", FileList, query=_list_query(purpose, limit, after, order),
                                    timeout=timeout)
        page._fetch = lambda cursor: self.list(purpose=purpose, limit=limit, after=cursor, order=order,
                                               timeout=timeout)
        return page

    def retrieve(self, file_id: str, *, timeout: Timeout | None = None) -> FileObject:
        """One file's object; :class:`~inferneo.client.errors.NotFoundError` for an id the server does not have."""
        return self._client.request("GET", _path(file_id), FileObject, timeout=timeout)

    def content(self, file_id: str, *, timeout: Timeout | None = None) -> FileContent:
        """One file's bytes (``.content``, ``.text``): a batch's records, one JSON object a line."""
        return self._client.request("GET", _path(file_id) + "/content", FileContent, timeout=timeout,
                                    headers={"Accept": "*/*"})

    def delete(self, file_id: str, *, timeout: Timeout | None = None) -> FileDeleted:
        """Delete one file."""
        return self._client.request("DELETE", _path(file_id), FileDeleted, timeout=timeout)


class AsyncFiles:
    """The async twin of :class:`Files`."""

    def __init__(self, client: AsyncAPIClient) -> None:
        self._client = client

    async def create(self, *, file: FileInput, purpose: Literal["batch"] | str = "batch",
                     timeout: Timeout | None = None) -> FileObject:
        """Upload ``file`` for ``purpose``; see :meth:`Files.create`."""
        with _upload_form(file, purpose) as form:
            return await self._client.request("POST", "/files", FileObject, timeout=timeout, **form)

    async def list(self, *, purpose: str | None = None, limit: int | None = None, after: str | None = None,
                   order: Literal["asc", "desc"] | None = None, timeout: Timeout | None = None) -> FileList:
        """The stored files; see :meth:`Files.list` (iterate every page with ``async for``)."""
        page = await self._client.request("GET", "/files", FileList,
                                          query=_list_query(purpose, limit, after, order), timeout=timeout)
        page._afetch = lambda cursor: self.list(purpose=purpose, limit=limit, after=cursor, order=order,
                                                timeout=timeout)
        return page

    async def retrieve(self, file_id: str, *, timeout: Timeout | None = None) -> FileObject:
        """One file's object; see :meth:`Files.retrieve`."""
        return await self._client.request("GET", _path(file_id), FileObject, timeout=timeout)

    async def content(self, file_id: str, *, timeout: Timeout | None = None) -> FileContent:
        """One file's bytes; see :meth:`Files.content`."""
        return await self._client.request("GET", _path(file_id) + "/content", FileContent, timeout=timeout,
                                          headers={"Accept": "*/*"})

    async def delete(self, file_id: str, *, timeout: Timeout | None = None) -> FileDeleted:
        """Delete one file."""
        return await self._client.request("DELETE", _path(file_id), FileDeleted, timeout=timeout)
