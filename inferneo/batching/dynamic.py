"""``DynamicBatcher``: single prompts in, batched calls out, each answer back to its own future."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from inferneo.batching._calls import block_signals, calls_for
from inferneo.batching._core import (
    BatchResult,
    Outcome,
    Prompt,
    prepare_params,
    prompt_kind,
    to_result,
)
from inferneo.client import AsyncInferneoClient, InferneoClient
from inferneo.client.structured import OutputFormat


@dataclass(slots=True)
class _Item:
    index: int
    prompt: Prompt
    future: Future[BatchResult]
    arrival: float


@dataclass(slots=True)
class _Group:
    """Pending prompts that share their parameters and output format (and so may share a call)."""

    params: dict[str, Any]
    fmt: OutputFormat | None
    items: list[_Item] = field(default_factory=list)


class DynamicBatcher:
    """Collects prompts submitted one at a time (from any number of threads or coroutines) into batched calls.

    A background thread sends a batch as soon as ``max_batch_size`` prompts with the same parameters wait, or
    when the oldest of them has waited ``max_wait_time`` seconds, whether or not more requests come. Prompts
    with different parameters go in different calls. Up to ``max_concurrency`` calls are in flight at once (the
    server batches them together again). Each submitted prompt gets a future that resolves to its own
    :class:`BatchResult`, or fails with the error its call (or, for a prompt the server refused, that prompt
    alone) got. ``flush()`` sends everything now and waits; ``close()`` (or leaving a ``with`` block normally) does
    that and stops the thread: nothing submitted is lost. ``cancel()`` (or leaving a ``with`` block by an exception,
    Ctrl-C included) stops at once instead: every prompt not yet answered has its future cancelled, and the calls in
    flight are cancelled on the server too (with a client made on an ``http_client`` of yours, a call already sent
    runs to its end, its answers dropped).

    ``default_params`` (``max_tokens=64``, ``temperature=0``, ``priority=...``) apply to every prompt; those
    given to ``submit`` override them. A prompt is a string, a list of token ids or a conversation (a list of
    messages, answered by the chat endpoint). ``response_format=`` a pydantic model or JSON schema, for all
    prompts or for one ``submit``, constrains the answers to it and fills each result's ``parsed``.
    """

    def __init__(self, client: InferneoClient, model: str | None = None, max_batch_size: int = 32,
                 max_wait_time: float = 0.1, *, max_concurrency: int = 4, **default_params: Any) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1; got {max_batch_size}")
        if max_wait_time < 0:
            raise ValueError(f"max_wait_time must be >= 0; got {max_wait_time}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1; got {max_concurrency}")
        if isinstance(client, AsyncInferneoClient):
            raise TypeError("DynamicBatcher sends from worker threads and needs an InferneoClient; its asubmit() "
                            "serves asyncio code")
        self.client = client
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_wait_time = max_wait_time
        self.default_params = default_params
        self._cond = threading.Condition()
        self._groups: dict[str, _Group] = {}
        self._formats: dict[int, tuple[Any, dict[str, Any], OutputFormat | None]] = {}
        self._unresolved: set[Future[BatchResult]] = set()
        self._counter = itertools.count()
        self._flush_requested = False
        self._closed = False
        self._in_flight: set[Future[list[Outcome]]] = set()
        self._calls = calls_for(client, max_concurrency)
        self._calls_closed = False
        self._thread = threading.Thread(target=self._run, name="inferneo-batcher", daemon=True)
        self._thread.start()

    # ---- submitting ----------------------------------------------------------------------------------------------

    def submit(self, prompt: Prompt, **params: Any) -> Future[BatchResult]:
        """Queue one prompt (a string, a list of token ids or a conversation); the future resolves to its
        :class:`BatchResult`. Cancelling the future before its batch is sent leaves the prompt out; after, its answer
        is dropped."""
        merged, fmt = self._prepare({**self.default_params, **params})
        key = json.dumps([prompt_kind(prompt), merged, id(fmt)], sort_keys=True, default=repr)
        future: Future[BatchResult] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("this DynamicBatcher is closed")
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group(merged, fmt)
            group.items.append(_Item(next(self._counter), prompt, future, time.monotonic()))
            self._unresolved.add(future)
            if len(group.items) == 1 or len(group.items) >= self.max_batch_size:
                self._cond.notify()  # a new deadline, or a full batch
        future.add_done_callback(self._forget)
        return future

    def _prepare(self, params: dict[str, Any]) -> tuple[dict[str, Any], OutputFormat | None]:
        """:func:`prepare_params`, with one format per ``response_format`` object, so that prompts with the same
        model share their calls."""
        spec = params.get("response_format")
        if spec is None:
            return params, None
        with self._cond:
            known = self._formats.get(id(spec))
        if known is None or known[0] is not spec:
            wire, fmt = prepare_params({"response_format": spec})
            known = (spec, wire["response_format"], fmt)  # holding ``spec`` keeps its id from being reused
            with self._cond:
                self._formats[id(spec)] = known
        return {**params, "response_format": known[1]}, known[2]

    async def asubmit(self, prompt: Prompt, **params: Any) -> BatchResult:
        """``await batcher.asubmit(prompt)``: :meth:`submit` for asyncio code."""
        return await asyncio.wrap_future(self.submit(prompt, **params))

    def _forget(self, future: Future[BatchResult]) -> None:
        with self._cond:
            self._unresolved.discard(future)

    # ---- flushing ------------------------------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> None:
        """Send every pending prompt now and wait until all prompts submitted so far are answered."""
        with self._cond:
            waiting = list(self._unresolved)
            self._flush_requested = True
            self._cond.notify()
        wait_futures(waiting, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new prompts, send the pending ones, wait for every answer and stop the threads (idempotent). An
        exception while it waits (Ctrl-C) cancels what is not answered yet, as :meth:`cancel` does."""
        with self._cond:
            self._closed = True
            waiting = list(self._unresolved)
            self._cond.notify()
        try:
            self._thread.join(timeout)
            wait_futures(waiting, timeout)
        except BaseException:
            self.cancel()
            raise
        self._close_calls([], wait=timeout is None)

    def cancel(self) -> None:
        """Refuse new prompts and stop now: cancel the future of every prompt not yet answered (those waiting for a
        batch are not sent), cancel the calls in flight so that the server stops generating for them, and stop the
        threads (idempotent). Leaving a ``with`` block by an exception (Ctrl-C included) calls this instead of
        :meth:`close`."""
        with self._cond:
            self._closed = True
            self._groups.clear()
            unresolved = list(self._unresolved)
            in_flight = list(self._in_flight)
            self._cond.notify()
        for future in unresolved:
            future.cancel()
        self._thread.join()
        self._close_calls(in_flight)

    def _close_calls(self, cancel: list[Future[list[Outcome]]], wait: bool = True) -> None:
        with self._cond:
            if self._calls_closed:
                return
            self._calls_closed = True
        self._calls.close(cancel, wait)

    def __enter__(self) -> DynamicBatcher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.cancel()

    @property
    def pending(self) -> int:
        """Prompts submitted and not yet answered (waiting for a batch, or in a call)."""
        with self._cond:
            return len(self._unresolved)

    # ---- the background thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        block_signals()
        with self._cond:
            while True:
                now = time.monotonic()
                flush_all = self._flush_requested or self._closed
                self._flush_requested = False
                next_deadline: float | None = None
                for key in list(self._groups):
                    group = self._groups[key]
                    while len(group.items) >= self.max_batch_size:
                        self._send(group, group.items[:self.max_batch_size])
                        del group.items[:self.max_batch_size]
                    if group.items and (flush_all or now - group.items[0].arrival >= self.max_wait_time):
                        self._send(group, group.items)
                        group.items = []
                    if group.items:
                        deadline = group.items[0].arrival + self.max_wait_time
                        next_deadline = deadline if next_deadline is None else min(next_deadline, deadline)
                    else:
                        del self._groups[key]
                if self._closed and not self._groups:
                    return
                self._cond.wait(None if next_deadline is None else max(next_deadline - time.monotonic(), 0))

    def _send(self, group: _Group, items: Sequence[_Item]) -> None:
        # The futures stay pending while their call is in flight, so that cancel() can still cancel them.
        live = [item for item in items if not item.future.cancelled()]
        if not live:
            return
        call = self._calls.submit(self.model, [item.prompt for item in live], group.params)
        self._in_flight.add(call)
        call.add_done_callback(lambda done: self._resolve(done, group.fmt, live))

    def _resolve(self, call: Future[list[Outcome]], fmt: OutputFormat | None, items: Sequence[_Item]) -> None:
        with self._cond:
            self._in_flight.discard(call)
        if call.cancelled():
            for item in items:
                item.future.cancel()
            return
        failure = call.exception()  # a bug: it must not leave a future pending forever
        for k, item in enumerate(items):
            if failure is not None:
                _settle(item.future, error=failure)
                continue
            try:
                result = to_result(item.index, item.prompt, call.result()[k], fmt)
            except BaseException as exc:
                _settle(item.future, error=exc)
                continue
            _settle(item.future, result) if result.error is None else _settle(item.future, error=result.error)


def _settle(future: Future[BatchResult], result: BatchResult | None = None, error: BaseException | None = None) -> None:
    """Resolve ``future`` unless it was cancelled (its prompt's answer is then dropped)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled by its owner, or by DynamicBatcher.cancel()
        pass
