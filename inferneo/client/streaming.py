"""Server-sent event streams as iterators of typed chunks that always close their connection."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel

from inferneo.client.errors import APIError

T = TypeVar("T", bound=BaseModel)

__all__ = ["AsyncStream", "Stream"]


class _EventDecoder:
    """Turns SSE lines into the ``data`` payload of each event (other fields and comments are ignored)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        if not line:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None


def _chunk(cast_to: type[T], data: str, request: httpx.Request) -> T:
    try:
        payload: Any = json.loads(data)
    except ValueError as exc:
        raise APIError(f"the server sent an event that is not JSON: {data[:200]!r}", request) from exc
    if isinstance(payload, dict) and "error" in payload and "choices" not in payload:
        error = payload["error"]
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        raise APIError(message, request, body=error)
    return cast_to.model_validate(payload)


class Stream(Generic[T]):
    """The chunks of a streamed answer, in order.

    Iterate it (``for chunk in stream``), or use it as a context manager. The connection is closed when the
    stream ends, when the loop over it is left early (``break``, an exception), or on ``close()``; closing it
    early makes the server abort the request.
    """

    def __init__(self, cast_to: type[T], response: httpx.Response) -> None:
        self.response = response
        self._cast_to = cast_to
        self._iterator = self._chunks()

    def _chunks(self) -> Iterator[T]:
        decoder = _EventDecoder()
        try:
            for line in self.response.iter_lines():
                data = decoder.feed(line)
                if data is None:
                    continue
                if data == "[DONE]":
                    break
                yield _chunk(self._cast_to, data, self.response.request)
        finally:
            self.response.close()

    def __next__(self) -> T:
        return next(self._iterator)

    def __iter__(self) -> Iterator[T]:
        # A generator of its own: leaving a for-loop early drops it, and its ``finally`` closes the connection.
        try:
            yield from self._iterator
        finally:
            self.close()

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self.response.close()

    @property
    def closed(self) -> bool:
        """Whether the connection has been closed."""
        return self.response.is_closed

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncStream(Generic[T]):
    """The async twin of :class:`Stream`: ``async for chunk in stream``, ``async with stream``, ``aclose()``."""

    def __init__(self, cast_to: type[T], response: httpx.Response) -> None:
        self.response = response
        self._cast_to = cast_to
        self._iterator = self._chunks()

    async def _chunks(self) -> AsyncIterator[T]:
        decoder = _EventDecoder()
        try:
            async for line in self.response.aiter_lines():
                data = decoder.feed(line)
                if data is None:
                    continue
                if data == "[DONE]":
                    break
                yield _chunk(self._cast_to, data, self.response.request)
        finally:
            await self.response.aclose()

    async def __anext__(self) -> T:
        return await self._iterator.__anext__()

    async def __aiter__(self) -> AsyncIterator[T]:
        # Leaving an ``async for`` early drops this generator; the event loop then finalizes it, which closes the
        # connection (``async with`` closes it at once).
        try:
            async for chunk in self._iterator:
                yield chunk
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the connection (idempotent)."""
        await self.response.aclose()

    close = aclose

    @property
    def closed(self) -> bool:
        """Whether the connection has been closed."""
        return self.response.is_closed

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
