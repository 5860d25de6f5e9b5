"""``stream_batches``: complete an iterable of prompts of any length in batches, with bounded memory, in order."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Any

from inferneo.batching._core import (
    BatchResult,
    Outcome,
    Prompt,
    acomplete_batch,
    complete_batch,
    prepare_params,
    prompt_source,
    to_result,
)
from inferneo.client import AsyncInferneoClient, InferneoClient
from inferneo.client.structured import OutputFormat


def _check(batch_size: int, max_in_flight: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1; got {max_in_flight}")


def stream_batches(client: InferneoClient, model: str | None, prompts: Iterable[Prompt], batch_size: int = 16,
                   max_in_flight: int = 4, **params: Any) -> Iterator[BatchResult]:
    """Yield a :class:`BatchResult` for each prompt of ``prompts`` (strings, token ids or conversations), in input
    order.

    ``prompts`` is read lazily, ``batch_size`` at a time: at most ``max_in_flight`` batches are in flight (and in
    memory) at once, so a generator over a file of any size works. Each batch is one call, retried by the client
    on transient failures; a prompt whose batch still failed carries the ``error`` (never a silent ``None``), and
    a prompt the server refused on its own fails alone. ``params`` (``max_tokens``, ``temperature``, ...) go with
    every call; ``response_format=`` a pydantic model (or a JSON schema) constrains every answer to it and fills
    each result's ``parsed``. Leaving the loop early (a ``break``, an exception, Ctrl-C) sends nothing more and
    cancels the batches in flight, whose connections close so the server stops generating for them (with a client
    made on an ``http_client`` of yours, a batch already sent runs to its end instead).
    """
    _check(batch_size, max_in_flight)
    wire, fmt = prepare_params(params)
    return _stream(client, model, iter(prompt_source(prompts)), batch_size, max_in_flight, wire, fmt)


def _stream(client: InferneoClient, model: str | None, source: Iterator[Prompt], batch_size: int,
            max_in_flight: int, params: dict[str, Any], fmt: OutputFormat | None) -> Iterator[BatchResult]:
    window: deque[tuple[int, list[Prompt], Future[list[Outcome]]]] = deque()
    calls = _LoopCalls(client) if getattr(client, "_plain_pool", False) else _ThreadCalls(client, max_in_flight)
    next_index = 0
    exhausted = False
    try:
        while True:
            while not exhausted and len(window) < max_in_flight:
                batch = list(islice(source, batch_size))
                if not batch:
                    exhausted = True
                    break
                window.append((next_index, batch, calls.submit(model, batch, params)))
                next_index += len(batch)
            if not window:
                return
            start, batch, future = window[0]
            outcomes = future.result()  # the batch stays in the window (cancelled on the way out) until answered
            window.popleft()
            for k, (prompt, outcome) in enumerate(zip(batch, outcomes, strict=True)):
                yield to_result(start + k, prompt, outcome, fmt)
    finally:
        calls.close([future for *_, future in window])


class _LoopCalls:
    """Batch calls on an event loop of their own thread, through an async twin of the client (same address, key,
    timeout, retries and headers). Closing cancels the calls still in flight, which closes their connections, so
    the server stops generating for them: leaving the loop early (a ``break``, an exception, Ctrl-C) leaves no
    request of the stream running on the server."""

    def __init__(self, client: InferneoClient) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="inferneo-stream", daemon=True)
        self.thread.start()
        self.client = AsyncInferneoClient(**client._options())

    def _run(self) -> None:
        # Ctrl-C goes to the caller's thread: a signal the kernel handed to this one would only be seen once the
        # caller's thread woke up for another reason.
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        self.loop.run_forever()

    def submit(self, model: str | None, batch: list[Prompt], params: dict[str, Any]) -> Future[list[Outcome]]:
        return asyncio.run_coroutine_threadsafe(acomplete_batch(self.client, model, batch, params), self.loop)

    def close(self, pending: list[Future[list[Outcome]]]) -> None:
        for future in pending:
            future.cancel()  # cancels its task on the loop
        try:
            asyncio.run_coroutine_threadsafe(self._drain(), self.loop).result(_CLOSE_TIMEOUT)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(_CLOSE_TIMEOUT)
            if not self.thread.is_alive():
                self.loop.close()

    async def _drain(self) -> None:
        """Wait until the cancelled calls have closed their connections, then close the client."""
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        await asyncio.gather(*others, return_exceptions=True)
        await self.client.close()


class _ThreadCalls:
    """Batch calls on worker threads, for a client that sends through an ``http_client`` of the caller's: closing
    drops the calls not yet started; one already sent runs to its end."""

    def __init__(self, client: InferneoClient, max_in_flight: int) -> None:
        self.client = client
        self.pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="inferneo-stream")

    def submit(self, model: str | None, batch: list[Prompt], params: dict[str, Any]) -> Future[list[Outcome]]:
        return self.pool.submit(complete_batch, self.client, model, batch, params)

    def close(self, pending: list[Future[list[Outcome]]]) -> None:
        for future in pending:
            future.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)


_CLOSE_TIMEOUT = 30.0


def astream_batches(client: AsyncInferneoClient, model: str | None,
                    prompts: Iterable[Prompt] | AsyncIterable[Prompt], batch_size: int = 16,
                    max_in_flight: int = 4, **params: Any) -> AsyncIterator[BatchResult]:
    """The async twin of :func:`stream_batches`: ``async for result in astream_batches(client, model, prompts)``.
    ``prompts`` may be a plain or an async iterable."""
    _check(batch_size, max_in_flight)
    wire, fmt = prepare_params(params)
    return _astream(client, model, prompt_source(prompts), batch_size, max_in_flight, wire, fmt)


async def _astream(client: AsyncInferneoClient, model: str | None, prompts: Iterable[Prompt] | AsyncIterable[Prompt],
                   batch_size: int, max_in_flight: int, params: dict[str, Any],
                   fmt: OutputFormat | None) -> AsyncIterator[BatchResult]:
    take = _async_taker(prompts)
    window: deque[tuple[int, list[Prompt], asyncio.Task[list[Outcome]]]] = deque()
    next_index = 0
    exhausted = False
    try:
        while True:
            while not exhausted and len(window) < max_in_flight:
                batch = await take(batch_size)
                if not batch:
                    exhausted = True
                    break
                task = asyncio.ensure_future(acomplete_batch(client, model, batch, params))
                window.append((next_index, batch, task))
                next_index += len(batch)
            if not window:
                return
            start, batch, task = window.popleft()
            outcomes = await task
            for k, (prompt, outcome) in enumerate(zip(batch, outcomes, strict=True)):
                yield to_result(start + k, prompt, outcome, fmt)
    finally:
        for *_, task in window:
            task.cancel()


def _async_taker(prompts: Iterable[Prompt] | AsyncIterable[Prompt]):
    """``await take(k)``: the next (up to) ``k`` prompts of a plain or async iterable."""
    if isinstance(prompts, AsyncIterable):
        source = prompts.__aiter__()

        async def take(k: int) -> list[Prompt]:
            batch: list[Prompt] = []
            for _ in range(k):
                try:
                    batch.append(await source.__anext__())
                except StopAsyncIteration:
                    break
            return batch
    else:
        sync_source = iter(prompts)

        async def take(k: int) -> list[Prompt]:
            return list(islice(sync_source, k))

    return take
