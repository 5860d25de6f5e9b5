"""The engine behind the server: one ``LLMEngine`` stepped by one background thread, fed from asyncio.

Requests and aborts go into a thread-safe inbox that the engine thread drains before every step, so the
``LLMEngine`` is only ever touched by that thread. The thread steps while there is work and sleeps on an event
otherwise; the heavy work runs in torch, which releases the GIL, so the event loop stays responsive. Outputs go
back to each request's ``asyncio.Queue`` with one ``call_soon_threadsafe`` per step.

Outputs are cumulative (each ``RequestOutput`` holds everything generated so far), so a consumer that falls
behind only sees the newest one. A consumer that stops iterating aborts its requests, which frees their KV
blocks at the engine thread's next turn.

A step that raises fails only the requests in the running batch; the others go on. Repeated failures, or
bookkeeping found inconsistent after one, mark the engine dead: every pending request fails at once and new ones
are refused with :class:`EngineDeadError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from inferneo.engine.llm_engine import LLMEngine
from inferneo.outputs import RequestOutput
from inferneo.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_MAX_LOGPROBS = 20


class EngineDeadError(RuntimeError):
    """The engine has stopped (a fatal fault or shut-down) and serves no more requests."""


class RequestFailedError(RuntimeError):
    """An engine step holding this request failed; the engine itself goes on."""


class QueueFullError(RuntimeError):
    """Too many requests are already waiting; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidRequestError(ValueError):
    """A request the model cannot take; ``param`` names the offending field when one does."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class EngineRequest:
    """One prompt (already tokenized) to generate for."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0


@dataclass(slots=True, frozen=True)
class EngineSnapshot:
    """Engine counters as of the last step, published by the engine thread for metrics and admission."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_steps: int = 0
    max_batch_size: int = 0
    batch_size_histogram: dict[int, int] = field(default_factory=dict)


class RequestObserver(Protocol):
    """Per-request timing hooks (the server's metrics); called from the engine thread."""

    def on_first_token(self, seconds: float) -> None: ...
    def on_next_token(self, seconds: float) -> None: ...
    def on_finished(self, seconds: float, finish_reason: str) -> None: ...


@dataclass(slots=True)
class _Tracked:
    """Engine-thread state of one request."""

    group: RequestGroup
    index: int
    arrival: float
    num_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None


@dataclass(slots=True)
class _Add:
    group: RequestGroup
    requests: list[EngineRequest]
    arrival: float


class RequestGroup:
    """Requests submitted together; async-iterate it for ``(index, RequestOutput)`` until all finish.

    Closing it (``abort()``, or the iterating task being cancelled) aborts whatever has not finished.
    """

    def __init__(self, engine: AsyncLLMEngine, request_ids: list[str]) -> None:
        self._engine = engine
        self.request_ids = request_ids
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._open = set(range(len(request_ids)))
        self._ready: deque[tuple[int, RequestOutput]] = deque()
        self._closed = False

    def __aiter__(self) -> RequestGroup:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if self._ready:
            return self._ready.popleft()
        if not self._open or self._closed:
            raise StopAsyncIteration
        try:
            items = [await self._queue.get()]
        except BaseException:  # cancelled: the client went away
            self.abort()
            raise
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        latest: dict[int, RequestOutput] = {}
        for item in items:
            if isinstance(item, BaseException):
                self.abort()
                raise item
            index, output = item
            latest[index] = output  # outputs are cumulative: the newest one says it all
        for index, output in latest.items():
            if output.finished:
                self._open.discard(index)
        self._ready.extend(latest.items())
        return self._ready.popleft()

    def abort(self) -> None:
        """Stop every request of the group that has not finished; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._open:
            self._engine.abort([self.request_ids[i] for i in sorted(self._open)])

    async def aclose(self) -> None:
        self.abort()

    def _put(self, item: object) -> None:  # on the event loop
        self._queue.put_nowait(item)

    def __del__(self) -> None:
        # Safety net for a group dropped without being closed (e.g. a response that never started): the
        # inbox append is lock-free, so this is safe wherever the collector runs.
        if not self._closed and self._open:
            self._engine._inbox.append([self.request_ids[i] for i in self._open])


class AsyncLLMEngine:
    """Serves many concurrent asyncio callers from one ``LLMEngine`` stepped in one background thread."""

    def __init__(
        self,
        engine: LLMEngine,
        max_queued_requests: int | None = None,
        observer: RequestObserver | None = None,
        max_consecutive_step_failures: int = 3,
    ) -> None:
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self.observer = observer
        self.max_consecutive_step_failures = max_consecutive_step_failures
        # The front end's own tokenizer: the engine thread decodes with the engine's at the same time.
        try:
            self.tokenizer = copy.deepcopy(engine.tokenizer)
        except Exception:
            self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self._inbox: deque[_Add | list[str]] = deque()
        self._lock = threading.Lock()  # guards _pending and the dead check against the inbox
        self._pending = 0  # sequences in the inbox, not yet handed to the engine
        self._wake = threading.Event()
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._outbox: list[tuple[RequestGroup, object]] = []  # engine thread only
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: BaseException | None = None
        self._consecutive_failures = 0
        self.snapshot = EngineSnapshot()
        self._publish()

    # ---- life cycle --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="inferneo-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is left, stop the engine thread and wait for it (idempotent)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and not self._stopping and (self._thread is None or self._thread.is_alive())

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    # ---- requests ----------------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams, param: str = "prompt") -> None:
        """Raise InvalidRequestError for a request the engine would refuse (the same checks, done up front)."""
        engine = self.engine
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty: give at least one token", param)
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or isinstance(t, bool)
               or not 0 <= t < engine.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {engine.vocab_size}); got {bad[:5]}",
                                      param)
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {n} tokens but the model's context length is {self.max_model_len} tokens "
                "(at least one token must be left to generate): shorten the prompt", param)
        max_tokens = self.max_model_len - n
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        if n + max_tokens > engine.kv_capacity_tokens:
            raise InvalidRequestError(
                f"the request needs up to {n + max_tokens} tokens of KV cache ({n} in the prompt, {max_tokens} to "
                f"generate) but the cache holds {engine.kv_capacity_tokens}: lower max_tokens", "max_tokens")
        if params.logprobs is not None and params.logprobs > _MAX_LOGPROBS:
            raise InvalidRequestError(f"logprobs must be at most {_MAX_LOGPROBS}, got {params.logprobs}", "logprobs")

    def submit(self, requests: list[EngineRequest], param: str = "prompt") -> RequestGroup:
        """Queue requests to run together (call from the event loop). Raises at once, queueing nothing, with
        InvalidRequestError (naming ``param`` for a bad prompt), QueueFullError or EngineDeadError."""
        for request in requests:
            self.check_request(request.prompt_token_ids, request.params, param)
        group = RequestGroup(self, [r.request_id for r in requests])
        num_seqs = sum(r.params.n for r in requests)
        with self._lock:
            if self._dead is not None or self._stopping:
                raise EngineDeadError(self._dead_message())
            if self.max_queued_requests is not None:
                queued = self._pending + self.snapshot.num_waiting
                if queued >= self.max_queued_requests:
                    raise QueueFullError(
                        f"the server is busy: {queued} requests are waiting (the limit is "
                        f"{self.max_queued_requests}); retry later")
            self._pending += num_seqs
            self._inbox.append(_Add(group, requests, time.monotonic()))
        self._wake.set()
        return group

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of one request; leaving the loop early aborts it."""
        prompt_ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        group = self.submit([EngineRequest(request_id, prompt_ids, params, priority)])
        try:
            async for _, output in group:
                yield output
        finally:
            group.abort()

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests by id (thread-safe; unknown or finished ids are ignored)."""
        self._inbox.append(list(request_ids))
        self._wake.set()

    def _dead_message(self) -> str:
        if self._stopping and self._dead is None:
            return "the server is shutting down"
        return f"the engine has stopped after a fatal error: {self._dead!r}"

    # ---- the engine thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                if not self._inbox and not engine.has_unfinished_requests():
                    self._wake.wait()
                self._wake.clear()
                self._drain_inbox()
                if engine.has_unfinished_requests() and not self._stopping:
                    self._step()
                self._publish()
                self._flush()
        except BaseException as exc:
            logger.exception("the engine loop failed; the engine is now dead")
            self._die(exc)
            return
        self._die(None)

    def _drain_inbox(self) -> None:
        engine = self.engine
        added_any = False
        while self._inbox:
            command = self._inbox.popleft()
            if isinstance(command, list):
                for request_id in command:
                    engine.abort_request(request_id)
                    tracked = self._tracked.pop(request_id, None)
                    if tracked is not None and self.observer is not None:
                        self.observer.on_finished(time.monotonic() - tracked.arrival, "abort")
                continue
            with self._lock:
                self._pending -= sum(r.params.n for r in command.requests)
            added: list[str] = []
            for index, request in enumerate(command.requests):
                try:
                    engine.add_request(request.request_id, request.prompt_token_ids, request.params,
                                       request.priority, command.arrival)
                except Exception as exc:  # refuse this group only; the engine goes on
                    for request_id in added:
                        engine.abort_request(request_id)
                        self._tracked.pop(request_id, None)
                    error = (InvalidRequestError(str(exc)) if isinstance(exc, ValueError)
                             else RequestFailedError(f"the engine could not take this request: {exc!r}"))
                    self._outbox.append((command.group, error))
                    break
                added.append(request.request_id)
                self._tracked[request.request_id] = _Tracked(command.group, index, command.arrival)
            added_any = True
        if added_any:
            self._publish()  # so admission control sees the new waiting requests before the step ends

    def _step(self) -> None:
        stats = self.engine.core.stats
        steps_before = stats.num_steps
        try:
            outputs = self.engine.step()
        except Exception as exc:
            self._step_failed(exc)
            return
        self._consecutive_failures = 0
        if stats.num_steps == steps_before:
            # Nothing could be scheduled (should not happen with admitted requests): do not spin on the CPU.
            self._wake.wait(0.001)
        now = time.monotonic()
        observer = self.observer
        for output in outputs:
            tracked = self._tracked.get(output.request_id)
            if tracked is None:
                continue
            if observer is not None:
                num_tokens = sum(len(o.token_ids) for o in output.outputs)
                if num_tokens > tracked.num_tokens:
                    if tracked.first_token_at is None:
                        tracked.first_token_at = now
                        observer.on_first_token(now - tracked.arrival)
                    else:
                        observer.on_next_token(now - tracked.last_token_at)
                    tracked.last_token_at = now
                    tracked.num_tokens = num_tokens
            self._outbox.append((tracked.group, (tracked.index, output)))
            if output.finished:
                del self._tracked[output.request_id]
                if observer is not None:
                    reasons = {o.finish_reason for o in output.outputs}
                    observer.on_finished(now - tracked.arrival, "stop" if "stop" in reasons else reasons.pop())

    def _step_failed(self, exc: Exception) -> None:
        """Fail the requests of the running batch; die if this keeps happening or the books do not balance."""
        logger.exception("an engine step failed; failing the requests in its batch")
        self._consecutive_failures += 1
        engine = self.engine
        message = f"the engine failed while running this request: {exc!r}"
        for request_id in engine.running_request_ids():
            engine.abort_request(request_id)
            tracked = self._tracked.pop(request_id, None)
            if tracked is not None:
                self._outbox.append((tracked.group, RequestFailedError(message)))
        engine.kv_cache.check_integrity(list(engine.scheduler.requests.values()))
        if self._consecutive_failures >= self.max_consecutive_step_failures:
            raise EngineDeadError(f"{self._consecutive_failures} engine steps failed in a row") from exc

    def _flush(self) -> None:
        """Hand this turn's outputs to the event loop(s) in one call each."""
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestGroup, object]]] = {}
        for group, item in outbox:
            by_loop.setdefault(group._loop, []).append((group, item))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(_deliver, items)

    def _publish(self) -> None:
        engine = self.engine
        scheduler, kv, stats = engine.scheduler, engine.kv_cache, engine.core.stats
        self.snapshot = EngineSnapshot(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            kv_usage=kv.usage,
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            num_preemptions=stats.num_preemptions,
            num_prompt_tokens=stats.num_prompt_tokens,
            num_generation_tokens=stats.num_generation_tokens,
            num_steps=stats.num_steps,
            max_batch_size=stats.max_batch_size,
            batch_size_histogram=dict(stats.batch_size_histogram),
        )

    def _die(self, exc: BaseException | None) -> None:
        """Stop for good: fail everything pending (``exc`` None: an orderly shut-down)."""
        with self._lock:
            if exc is not None:
                self._dead = exc
            self._stopping = True
            leftovers = list(self._inbox)
            self._inbox.clear()
        message = self._dead_message()
        for command in leftovers:
            if isinstance(command, _Add):
                self._outbox.append((command.group, EngineDeadError(message)))
        for request_id, tracked in list(self._tracked.items()):
            try:
                self.engine.abort_request(request_id)
            except Exception:  # the engine may be broken; the requests fail regardless
                logger.exception("could not abort %s", request_id)
            self._outbox.append((tracked.group, EngineDeadError(message)))
        self._tracked.clear()
        with contextlib.suppress(Exception):  # the engine may be broken; the snapshot is only for metrics
            self._publish()
        self._flush()


def _deliver(items: list[tuple[RequestGroup, object]]) -> None:
    for group, item in items:
        group._put(item)
