"""``InferneoClient`` and ``AsyncInferneoClient``: the resources over one request core each."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

import httpx

from inferneo.client._base import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    AsyncAPIClient,
    SyncAPIClient,
    Timeout,
)
from inferneo.client.resources import (
    AsyncBatches,
    AsyncChat,
    AsyncCompletions,
    AsyncFiles,
    AsyncModels,
    Batches,
    Chat,
    Completions,
    Files,
    Models,
)


class InferneoClient(SyncAPIClient):
    """A client for an Inferneo server (or any OpenAI-compatible one).

    ``InferneoClient("http://localhost:8000")``; the base URL may end in ``/v1`` or not, and defaults to
    ``$INFERNEO_BASE_URL``, then ``http://localhost:8000``. ``api_key`` defaults to ``$INFERNEO_API_KEY``.
    ``timeout`` (seconds, or an ``httpx.Timeout``) bounds each attempt; ``max_retries`` is how many times a
    connection error, timeout, 408, 409, 429 or 5xx is retried, with exponential backoff and jitter, or after the
    ``Retry-After`` the server sent. ``retry_window`` (seconds, default 0) keeps retrying, once those retries are
    used up, what says the server is away rather than that the request failed (connection errors, 429, 502, 503)
    until that long after the first failure: ``retry_window=300`` rides through a server's restart. The client is
    thread-safe; close it (or use ``with``) to free its connections.
    """

    completions: Completions
    chat: Chat
    models: Models
    files: Files
    batches: Batches

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: Timeout = DEFAULT_TIMEOUT,
                 max_retries: int = DEFAULT_MAX_RETRIES, *, default_headers: Mapping[str, str] | None = None,
                 http_client: httpx.Client | None = None, retry_window: float = 0.0) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, default_headers, http_client, retry_window)
        self.completions = Completions(self)
        self.chat = Chat(self)
        self.models = Models(self)
        self.files = Files(self)
        self.batches = Batches(self)

    def with_options(self, **options: Any) -> InferneoClient:
        """A client like this one with some options changed (``timeout``, ``max_retries``, ``api_key``, ...),
        sharing its connection pool: ``client.with_options(max_retries=5).completions.create(...)``."""
        return InferneoClient(**{**self._options(), **options}, http_client=self._http)

    def __enter__(self) -> InferneoClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"InferneoClient({self.base_url!r})"


class AsyncInferneoClient(AsyncAPIClient):
    """The asyncio twin of :class:`InferneoClient`: the same resources, whose methods are awaited, and streams
    read with ``async for``. Close it with ``await client.close()`` or ``async with``."""

    completions: AsyncCompletions
    chat: AsyncChat
    models: AsyncModels
    files: AsyncFiles
    batches: AsyncBatches

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: Timeout = DEFAULT_TIMEOUT,
                 max_retries: int = DEFAULT_MAX_RETRIES, *, default_headers: Mapping[str, str] | None = None,
                 http_client: httpx.AsyncClient | None = None, retry_window: float = 0.0) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, default_headers, http_client, retry_window)
        self.completions = AsyncCompletions(self)
        self.chat = AsyncChat(self)
        self.models = AsyncModels(self)
        self.files = AsyncFiles(self)
        self.batches = AsyncBatches(self)

    def with_options(self, **options: Any) -> AsyncInferneoClient:
        """A client like this one with some options changed, sharing its connection pool."""
        return AsyncInferneoClient(**{**self._options(), **options}, http_client=self._http)

    async def __aenter__(self) -> AsyncInferneoClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncInferneoClient({self.base_url!r})"
