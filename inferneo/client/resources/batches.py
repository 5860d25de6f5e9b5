"""``client.batches``: OpenAI's Batch API (``/v1/batches``): run an uploaded file of requests on the server."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

from inferneo.client.types import Batch, BatchList

if TYPE_CHECKING:
    from inferneo.client._base import AsyncAPIClient, SyncAPIClient, Timeout


def _create_body(input_file_id: str, endpoint: str, completion_window: str, metadata: Mapping[str, str] | None,
                 extra_body: Mapping[str, Any] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"input_file_id": input_file_id, "endpoint": endpoint,
                            "completion_window": completion_window}
    if metadata is not None:
        body["metadata"] = dict(metadata)
    return {**body, **(extra_body or {})}


def _path(batch_id: str) -> str:
    return f"/batches/{quote(batch_id, safe='')}"


class Batches:
    """Batches run by the server: each line of an uploaded file sent to ``endpoint``, its answers written to an
    output file (2xx) and an error file (the rest)."""

    def __init__(self, client: SyncAPIClient) -> None:
        self._client = client

    def create(self, *, input_file_id: str, endpoint: str, completion_window: Literal["24h"] | str = "24h",
               metadata: Mapping[str, str] | None = None, extra_body: Mapping[str, Any] | None = None,
               timeout: Timeout | None = None) -> Batch:
        """Run the file ``input_file_id`` (uploaded with ``files.create(purpose="batch")``), whose lines are
        requests to ``endpoint`` (``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, ...). Poll it
        with :meth:`retrieve` until its ``status`` is ``completed``, ``failed`` or ``cancelled``."""
        return self._client.request("POST", "/batches", Batch, timeout=timeout,
                                    body=_create_body(input_file_id, endpoint, completion_window, metadata,
                                                      extra_body))

    def retrieve(self, batch_id: str, *, timeout: Timeout | None = None) -> Batch:
        """The batch as it stands: ``status``, ``request_counts`` (as its records are written), and once it ends
        ``output_file_id`` and ``error_file_id``."""
        return self._client.request("GET", _path(batch_id), Batch, timeout=timeout)

    def list(self, *, limit: int | None = None, after: str | None = None,
             timeout: Timeout | None = None) -> BatchList:
        """The batches, newest first, ``limit`` (1 to 100, default 20) to a page from ``after`` (a batch id);
        iterating the answer goes through every page."""
        page = self._client.request("GET", "/batches", BatchList, query={"limit": limit, "after": after},
                                    timeout=timeout)
        page._fetch = lambda cursor: self.list(limit=limit, after=cursor, timeout=timeout)
        return page

    def cancel(self, batch_id: str, *, timeout: Timeout | None = None) -> Batch:
        """Stop a batch: it goes ``cancelling``, then ``cancelled`` with what was answered kept in its files."""
        return self._client.request("POST", _path(batch_id) + "/cancel", Batch, timeout=timeout)


class AsyncBatches:
    """The async twin of :class:`Batches`."""

    def __init__(self, client: AsyncAPIClient) -> None:
        self._client = client

    async def create(self, *, input_file_id: str, endpoint: str, completion_window: Literal["24h"] | str = "24h",
                     metadata: Mapping[str, str] | None = None, extra_body: Mapping[str, Any] | None = None,
                     timeout: Timeout | None = None) -> Batch:
        """Run the file ``input_file_id``; see :meth:`Batches.create`."""
        return await self._client.request("POST", "/batches", Batch, timeout=timeout,
                                          body=_create_body(input_file_id, endpoint, completion_window, metadata,
                                                            extra_body))

    async def retrieve(self, batch_id: str, *, timeout: Timeout | None = None) -> Batch:
        """The batch as it stands; see :meth:`Batches.retrieve`."""
        return await self._client.request("GET", _path(batch_id), Batch, timeout=timeout)

    async def list(self, *, limit: int | None = None, after: str | None = None,
                   timeout: Timeout | None = None) -> BatchList:
        """The batches; see :meth:`Batches.list` (iterate every page with ``async for``)."""
        page = await self._client.request("GET", "/batches", BatchList, query={"limit": limit, "after": after},
                                          timeout=timeout)
        page._afetch = lambda cursor: self.list(limit=limit, after=cursor, timeout=timeout)
        return page

    async def cancel(self, batch_id: str, *, timeout: Timeout | None = None) -> Batch:
        """Stop a batch; see :meth:`Batches.cancel`."""
        return await self._client.request("POST", _path(batch_id) + "/cancel", Batch, timeout=timeout)
