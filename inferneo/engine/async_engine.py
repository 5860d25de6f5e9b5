"""The engine behind the server, as seen from asyncio: submit token ids, iterate output deltas, abort.

:class:`AsyncEngine` is the one async front end. It checks requests (``InputProcessor``), admits them (a bounded
queue, ``QueueFullError`` past it), sends them to a core client (``inferneo.engine.core_client``: the core loop
in a background thread, or in a child process), turns the core's outputs into per-request deltas
(``OutputProcessor``), times them for the metrics observer and hands each step's outputs to the event loop(s)
with one ``call_soon_threadsafe`` each.

A step that fails fails only the requests in its batch (``RequestFailedError``); when the core cannot go on
(repeated failures, a dead worker, a child process that exited) every pending request fails with
``EngineDeadError``, new ones are refused and ``is_healthy`` turns False.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from inferneo.config import EngineConfig
from inferneo.engine.core_client import CoreClient, ProcessCoreClient, ThreadCoreClient
from inferneo.engine.input_processor import FrontEndFacts, InputProcessor, check_cache_salt
from inferneo.engine.output_processor import OutputKind, OutputProcessor
from inferneo.engine.protocol import (
    AbortRequests,
    AddRequests,
    ControlCommand,
    ControlReply,
    CoreDead,
    EngineBusyError,
    EngineDeadError,
    EngineSleepingError,
    EngineSnapshot,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
    RequestFailure,
    ResetPrefixCache,
    Sleep,
    StepOutputs,
    UpdateWeights,
    WakeUp,
)
from inferneo.engine.request_group import EngineRequest, RequestGroup
from inferneo.engine.weight_transfer import to_wire_all
from inferneo.multimodal.prompts import ImagePrompts
from inferneo.outputs import RequestOutput
from inferneo.sampling_params import SamplingParams

__all__ = ["AsyncEngine", "EngineBusyError", "EngineDeadError", "EngineRequest", "EngineSleepingError",
           "EngineSnapshot", "InvalidRequestError", "QueueFullError", "RequestFailedError", "RequestGroup",
           "RequestObserver"]

logger = logging.getLogger(__name__)


class RequestObserver(Protocol):
    """Per-request timing hooks (the server's metrics); called from an engine thread, not the event loop."""

    def on_first_token(self, seconds: float) -> None: ...
    def on_next_token(self, seconds: float) -> None: ...
    def on_finished(self, seconds: float, finish_reason: str) -> None: ...


@dataclass(slots=True)
class _Tracked:
    """Where one request's outputs go, and its timing so far (for the metrics observer)."""

    group: RequestGroup
    index: int
    arrival: float
    first_token_at: float | None = None
    last_token_at: float | None = None


# What one entry of a submission is called in its refusal, by the request field that holds the entries.
ENTRY_NAMES = {"messages": "conversation"}


class AsyncEngine(FrontEndFacts):
    """Serves many concurrent asyncio callers from one engine core (see the module docstring).

    Build it with :meth:`in_thread` or :meth:`in_child_process` (or over a core client of your own).
    """

    def __init__(self, client: CoreClient, tokenizer, generation_config: dict,
                 max_queued_requests: int | None = None, observer: RequestObserver | None = None,
                 max_consecutive_step_failures: int = 3, image_prompts: ImagePrompts | None = None) -> None:
        self.client = client
        self.info = client.info
        self.input = InputProcessor(tokenizer, generation_config, client.info, image_prompts)
        self.max_queued_requests = max_queued_requests
        self.observer = observer
        self.max_consecutive_step_failures = max_consecutive_step_failures
        self._decoding_tokenizer = self.input.decoding_tokenizer()
        self._processor = OutputProcessor(self._decoding_tokenizer)
        self._lock = threading.Lock()  # guards the processor, the tracked requests, the counts and the outbox
        self._sent = 0  # sequences sent to the core
        self._pending = 0  # sequences sent, not yet taken by the core
        self._tracked: dict[str, _Tracked] = {}
        self._outbox: list[tuple[RequestGroup, object]] = []
        self._late_aborts: deque[list[str]] = deque()  # from garbage-collected groups (lock-free)
        self._stopping = False
        self._dead: BaseException | None = None
        self.snapshot = EngineSnapshot()
        # Control commands on their way to the core, by call id; and sleep mode as the core last said.
        self._calls: dict[int, concurrent.futures.Future[ControlReply]] = {}
        self._call_ids = itertools.count(1)
        self._sleeping = False

    @classmethod
    def in_thread(cls, config: EngineConfig, max_queued_requests: int | None = None,
                  observer: RequestObserver | None = None, max_consecutive_step_failures: int = 3) -> AsyncEngine:
        """Load the model here and run its core loop in a background thread of this process."""
        client = ThreadCoreClient.from_config(config, max_consecutive_step_failures)
        tokenizer, generation_config = InputProcessor.load_tokenizer(config)
        return cls(client, tokenizer, generation_config, max_queued_requests, observer,
                   max_consecutive_step_failures, InputProcessor.load_image_prompts(config, tokenizer))

    @classmethod
    def in_child_process(cls, config: EngineConfig, max_queued_requests: int | None = None,
                         observer: RequestObserver | None = None,
                         max_consecutive_step_failures: int = 3) -> AsyncEngine:
        """Start the core in a child process (the tokenizer loads here while the model loads there)."""
        client = ProcessCoreClient(config, max_consecutive_step_failures)
        try:
            tokenizer, generation_config = InputProcessor.load_tokenizer(config)
            client.wait_ready()
        except BaseException:
            client.close()
            raise
        return cls(client, tokenizer, generation_config, max_queued_requests, observer,
                   max_consecutive_step_failures, InputProcessor.load_image_prompts(config, tokenizer))

    @classmethod
    def data_parallel(cls, config: EngineConfig, max_queued_requests: int | None = None,
                      observer: RequestObserver | None = None,
                      max_consecutive_step_failures: int = 3) -> AsyncEngine:
        """``config.data_parallel_size`` cores (child processes or Ray actors) behind one router
        (``inferneo.engine.data_parallel``), all loaded before this returns."""
        from inferneo.engine.data_parallel import start_replicas

        client = start_replicas(config, max_consecutive_step_failures)
        try:
            tokenizer, generation_config = InputProcessor.load_tokenizer(config)
        except BaseException:
            client.close()
            raise
        return cls(client, tokenizer, generation_config, max_queued_requests, observer,
                   max_consecutive_step_failures, InputProcessor.load_image_prompts(config, tokenizer))

    # ---- facts -------------------------------------------------------------------------------------------

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and not self._stopping and self.client.is_alive()

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    # ---- life cycle --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the core (idempotent)."""
        self.client.start(self._on_message)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Fail what is left, stop the core and wait for it (idempotent)."""
        self._stopping = True
        self.client.close(timeout)
        self._die(None)

    # ---- requests ----------------------------------------------------------------------------------------

    def submit(self, requests: list[EngineRequest], param: str = "prompt") -> RequestGroup:
        """Queue requests to run together (call from the event loop). Raises at once, queueing nothing, with
        InvalidRequestError (naming ``param`` for a bad prompt), QueueFullError or EngineDeadError."""
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise InvalidRequestError("request ids within one submission must differ")
        for r in requests:
            check_cache_salt(r.cache_salt)
        resolved = [self.input.resolve(r.params) if r.pooling is None else None for r in requests]
        budgets = []
        for i, (r, params) in enumerate(zip(requests, resolved, strict=True)):
            try:
                budgets.append(self.input.check(r.prompt_token_ids, params, param, r.priority) if r.pooling is None
                               else self.input.check_embedding(r.prompt_token_ids, r.pooling, param, r.priority))
            except InvalidRequestError as exc:
                if len(requests) == 1 or exc.param not in (param, "max_tokens"):
                    raise  # (the other checks are of settings all the prompts share)
                # several prompts, one too long (or with token ids outside the vocabulary, or no room for the
                # answer): say which ("prompt 3: the prompt has 5000 tokens ...")
                where = ENTRY_NAMES.get(param, param)
                raise InvalidRequestError(f"{where} {i}: {exc}", exc.param) from None
        group = RequestGroup(self.abort, self._late_aborts.append, ids)
        num_seqs = sum(r.params.n if r.pooling is None else 1 for r in requests)
        arrival = time.monotonic()
        with self._lock:
            if self._dead is not None or self._stopping:
                raise EngineDeadError(self._dead_message())
            if self._sleeping:
                raise EngineSleepingError()
            if self.max_queued_requests is not None:
                queued = self._pending + self.snapshot.num_waiting
                if queued >= self.max_queued_requests:
                    raise QueueFullError(
                        f"the server is busy: {queued} requests are waiting (the limit is "
                        f"{self.max_queued_requests}); retry later")
            planned = []
            for request, params, max_tokens in zip(requests, resolved, budgets, strict=True):
                try:
                    if request.pooling is not None:
                        planned.append(self._processor.prepare_embedding(
                            request.request_id, request.prompt_token_ids, request.pooling, request.priority,
                            arrival))
                        continue
                    planned.append(self._processor.prepare(
                        request.request_id, None, request.prompt_token_ids, params, max_tokens,
                        self.input.eos_token_ids, request.priority, arrival, OutputKind.DELTA, request.lora,
                        request.cache_salt, request.images, request.prompt_embeds))
                except ValueError as exc:
                    raise InvalidRequestError(str(exc)) from None
            specs = []
            for index, (parent, parent_specs) in enumerate(planned):
                self._processor.register(parent)
                self._tracked[parent.request_id] = _Tracked(group, index, arrival)
                specs.extend(parent_specs)
            self._sent += num_seqs
            self._pending += num_seqs
            late = self._take_late_aborts()
        if late:
            self.client.send(AbortRequests(late))
        self.client.send(AddRequests(specs))
        return group

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Stream the output deltas of one request; leaving the loop early aborts it."""
        prompt_ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        group = self.submit([EngineRequest(request_id, prompt_ids, params, priority)])
        try:
            async for _, output in group:
                yield output
        finally:
            group.abort()

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests by id (thread-safe; unknown or finished ids are ignored)."""
        core_ids: list[str] = []
        with self._lock:
            for request_id in request_ids:
                core_ids += self._processor.abort(request_id)
                self._untrack(request_id)
        if core_ids:
            self.client.send(AbortRequests(core_ids))

    def _take_late_aborts(self) -> list[str]:
        """Core ids of requests whose groups were dropped unclosed (call with ``_lock`` held)."""
        core_ids: list[str] = []
        while self._late_aborts:
            for request_id in self._late_aborts.popleft():
                core_ids += self._processor.abort(request_id)
                self._untrack(request_id)
        return core_ids

    # ---- weights, prefix cache and sleep mode (``engine.engine_control`` has the rules) --------------------

    @property
    def is_sleeping(self) -> bool:
        """Whether the engine sleeps (as of the last control command's answer)."""
        return self._sleeping

    async def _control(self, command: ControlCommand) -> ControlReply:
        """Send a control command and wait for the core's answer (between two of its steps)."""
        future: concurrent.futures.Future[ControlReply] = concurrent.futures.Future()
        with self._lock:
            if self._dead is not None or self._stopping:
                raise EngineDeadError(self._dead_message())
            self._calls[command.call_id] = future
        try:
            self.client.send(command)
        except BaseException:
            with self._lock:
                self._calls.pop(command.call_id, None)
            raise
        reply = await asyncio.wrap_future(future)
        self._sleeping = reply.sleeping
        reply.raise_if_refused()
        return reply

    async def reset_prefix_cache(self) -> bool:
        """Forget every prefix-cache block no running request holds; True when none is left cached."""
        return (await self._control(ResetPrefixCache(next(self._call_ids)))).value

    async def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load ``(name, tensor)`` pairs into the model, all or none, then reset the prefix cache (ValueError for
        a bad name or shape; ``EngineBusyError`` while requests are unfinished or the engine sleeps)."""
        records = await asyncio.to_thread(to_wire_all, weights)
        await self._control(UpdateWeights(next(self._call_ids), records))

    async def sleep(self, level: int = 1) -> None:
        """Free the KV cache (level 1) or the weights too (level 2); new requests are refused until ``wake_up``
        (``EngineSleepingError``). ``EngineBusyError`` while requests are unfinished."""
        await self._control(Sleep(next(self._call_ids), level))

    async def wake_up(self) -> None:
        """End sleep mode."""
        await self._control(WakeUp(next(self._call_ids)))

    # ---- messages from the core (a client thread) --------------------------------------------------------

    def _on_message(self, message: StepOutputs | CoreDead | None) -> None:
        if message is None:
            if self._stopping:
                self._die(None)
            else:
                logger.error("the engine core stopped unexpectedly")
                self._die(EngineDeadError("the engine core stopped unexpectedly (its process or thread exited)"))
            return
        if isinstance(message, CoreDead):
            if not self._stopping:
                logger.error("the engine core has stopped: %s", message.message)
            self._die(EngineDeadError(message.message))
            return
        with self._lock:
            if message.snapshot is not None:
                self.snapshot = message.snapshot
            self._pending = self._sent - message.num_taken
            to_abort = self._apply_failures(message.failures)
            outputs, stopped = self._processor.process(message.outputs)
            self._route(outputs)
            to_abort += stopped + self._take_late_aborts()
        if to_abort:
            self.client.send(AbortRequests(to_abort))
        self._flush()
        for reply in message.replies:
            with self._lock:
                future = self._calls.pop(reply.call_id, None)
            if future is not None:
                with contextlib.suppress(concurrent.futures.InvalidStateError):  # its caller gave up
                    future.set_result(reply)

    def _apply_failures(self, failures: list[RequestFailure]) -> list[str]:
        """Fail the requests the core refused or lost in a failed step; returns sibling core ids to abort."""
        to_abort: list[str] = []
        for failure in failures:
            error = failure.to_exception()
            for core_id in failure.request_ids:
                request_id = self._processor.parent_id(core_id)
                if request_id is not None:
                    to_abort += self._processor.abort(request_id)
                    self._untrack(request_id, error)
        return to_abort

    def _die(self, exc: BaseException | None) -> None:
        """Stop for good: fail everything pending (``exc`` None: an orderly shut-down)."""
        with self._lock:
            if exc is not None and self._dead is None:
                self._dead = exc
            self._stopping = True
            message = self._dead_message()
            for tracked in self._tracked.values():
                self._outbox.append((tracked.group, EngineDeadError(message)))
            self._tracked.clear()
            self._processor = OutputProcessor(self._decoding_tokenizer)
            calls, self._calls = self._calls, {}
        self._flush()
        for future in calls.values():
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                future.set_exception(EngineDeadError(message))

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
            if observer is not None and isinstance(output, RequestOutput) and any(c.token_ids for c in output.outputs):
                if tracked.first_token_at is None:
                    tracked.first_token_at = now
                    observer.on_first_token(now - tracked.arrival)
                else:
                    observer.on_next_token(now - tracked.last_token_at)
                tracked.last_token_at = now
            self._outbox.append((tracked.group, (tracked.index, output)))
            if output.finished:
                del self._tracked[output.request_id]
                if observer is not None:
                    reasons = ({c.finish_reason for c in output.outputs} if isinstance(output, RequestOutput)
                               else {"stop"})
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
            by_loop.setdefault(group.loop, []).append((group, item))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[RequestGroup, object]]) -> None:
    for group, item in items:
        group.put(item)
