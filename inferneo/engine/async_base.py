"""The front end's engine API, shared by both engine back ends: request checks, admission control, request
groups (what a caller iterates), per-request timing for metrics, and the hand-off of outputs to asyncio.

Outputs are cumulative (each ``RequestOutput`` holds everything generated so far), so a consumer that falls
behind only sees the newest one. A consumer that stops iterating aborts its requests, which frees their KV
blocks at the engine's next turn. Outputs reach each request's ``asyncio.Queue`` with one
``call_soon_threadsafe`` per engine step and event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

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
    """Engine counters as of the last step, published by the engine for metrics and admission control."""

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


def snapshot_of(scheduler, kv_cache, stats) -> EngineSnapshot:
    """The counters of an engine core (its scheduler, KV cache manager and ``EngineStats``) right now."""
    return EngineSnapshot(
        num_running=len(scheduler.running),
        num_waiting=len(scheduler.waiting),
        kv_usage=kv_cache.usage,
        prefix_cache_queries=kv_cache.prefix_cache_queries,
        prefix_cache_hits=kv_cache.prefix_cache_hits,
        num_preemptions=stats.num_preemptions,
        num_prompt_tokens=stats.num_prompt_tokens,
        num_generation_tokens=stats.num_generation_tokens,
        num_steps=stats.num_steps,
        max_batch_size=stats.max_batch_size,
        batch_size_histogram=dict(stats.batch_size_histogram),
    )


class RequestObserver(Protocol):
    """Per-request timing hooks (the server's metrics); called from an engine thread, not the event loop."""

    def on_first_token(self, seconds: float) -> None: ...
    def on_next_token(self, seconds: float) -> None: ...
    def on_finished(self, seconds: float, finish_reason: str) -> None: ...


@dataclass(slots=True)
class Tracked:
    """Where one request's outputs go, and its timing so far (for the metrics observer)."""

    group: RequestGroup
    index: int
    arrival: float
    num_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None


class RequestGroup:
    """Requests submitted together; async-iterate it for ``(index, RequestOutput)`` until all finish.

    Closing it (``abort()``, or the iterating task being cancelled) aborts whatever has not finished.
    """

    def __init__(self, engine: AsyncEngineBase, request_ids: list[str]) -> None:
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
            self._engine._abort_later([self.request_ids[i] for i in self._open])


class AsyncEngineBase:
    """What the server needs from an engine: request checks, submission, aborts, health and counters.

    Subclasses set ``tokenizer``, ``max_model_len``, ``vocab_size``, ``kv_capacity_tokens`` and
    ``generation_defaults`` and implement ``start``, ``shutdown``, ``_is_running``, ``_enqueue``, ``abort`` and
    ``_abort_later`` (which must be safe from any thread and from a garbage-collector callback).
    """

    tokenizer: object
    max_model_len: int
    vocab_size: int
    kv_capacity_tokens: int
    generation_defaults: SamplingParams

    def __init__(self, max_queued_requests: int | None, observer: RequestObserver | None,
                 max_consecutive_step_failures: int) -> None:
        self.max_queued_requests = max_queued_requests
        self.observer = observer
        self.max_consecutive_step_failures = max_consecutive_step_failures
        self._lock = threading.Lock()  # guards _pending and the dead check (and the back end's shared state)
        self._pending = 0  # sequences submitted, not yet taken by the engine
        self._tracked: dict[str, Tracked] = {}
        self._outbox: list[tuple[RequestGroup, object]] = []
        self._stopping = False
        self._dead: BaseException | None = None
        self.snapshot = EngineSnapshot()

    def start(self) -> None:
        """Start serving (idempotent)."""
        raise NotImplementedError

    def shutdown(self, timeout: float = 10.0) -> None:
        """Fail what is left and stop (idempotent)."""
        raise NotImplementedError

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests by id (thread-safe; unknown or finished ids are ignored)."""
        raise NotImplementedError

    def _abort_later(self, request_ids: list[str]) -> None:
        raise NotImplementedError

    def _is_running(self) -> bool:
        raise NotImplementedError

    def _enqueue(self, group: RequestGroup, requests: list[EngineRequest], num_seqs: int) -> None:
        """Hand a group to the engine; called with ``_lock`` held, after the admission checks."""
        raise NotImplementedError

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and not self._stopping and self._is_running()

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    def default_sampling_params(self) -> SamplingParams:
        """The model's sampling defaults (from its generation config)."""
        return self.generation_defaults.clone()

    # ---- requests ----------------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams, param: str = "prompt") -> None:
        """Raise InvalidRequestError for a request the engine would refuse (the same checks, done up front)."""
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty: give at least one token", param)
        vocab = self.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}", param)
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {n} tokens but the model's context length is {self.max_model_len} tokens "
                "(at least one token must be left to generate): shorten the prompt", param)
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            # As OpenAI and vLLM do: refuse, rather than silently stopping at the context length.
            raise InvalidRequestError(
                f"the model's context length is {self.max_model_len} tokens, but {n + params.max_tokens} were asked "
                f"for ({n} in the prompt, {params.max_tokens} in max_tokens): lower max_tokens or shorten the prompt",
                "max_tokens")
        max_tokens = self.max_model_len - n if params.max_tokens is None else params.max_tokens
        if n + max_tokens > self.kv_capacity_tokens:
            raise InvalidRequestError(
                f"the request needs up to {n + max_tokens} tokens of KV cache ({n} in the prompt, {max_tokens} to "
                f"generate) but the cache holds {self.kv_capacity_tokens}: lower max_tokens", "max_tokens")
        if (error := params.logit_bias_error(vocab)) is not None:
            raise InvalidRequestError(error, "logit_bias")
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
            self._enqueue(group, requests, num_seqs)
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

    def _dead_message(self) -> str:
        if self._stopping and self._dead is None:
            return "the server is shutting down"
        return f"the engine has stopped after a fatal error: {self._dead!r}"

    # ---- outputs -----------------------------------------------------------------------------------------

    def _route(self, outputs: list[RequestOutput]) -> None:
        """Queue one step's outputs for their groups, with per-request timing for the observer."""
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

    def _untrack(self, request_id: str, error: BaseException | None = None) -> None:
        """Stop following a request: an abort (``error`` None) is observed, an error is delivered."""
        tracked = self._tracked.pop(request_id, None)
        if tracked is None:
            return
        if error is not None:
            self._outbox.append((tracked.group, error))
        elif self.observer is not None:
            self.observer.on_finished(time.monotonic() - tracked.arrival, "abort")

    def _flush(self) -> None:
        """Hand the queued outputs to the event loop(s) in one call each."""
        with self._lock:
            if not self._outbox:
                return
            outbox, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestGroup, object]]] = {}
        for group, item in outbox:
            by_loop.setdefault(group._loop, []).append((group, item))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[RequestGroup, object]]) -> None:
    for group, item in items:
        group._put(item)
