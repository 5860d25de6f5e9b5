"""``stream_batches``: complete an iterable of prompts of any length in batches, with bounded memory, in order."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from concurrent.futures import Future
from itertools import islice
from typing import Any

from inferneo.batching._calls import calls_for
from inferneo.batching._core import (
    BatchResult,
    Outcome,
    Prompt,
    acomplete_batch,
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
    calls = calls_for(client, max_in_flight)
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
