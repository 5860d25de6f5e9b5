"""The engine behind the server, as seen from asyncio: submit token ids, iterate outputs, abort.

The server codes against ``AsyncEngineBase`` (``inferneo.engine.async_base``), which has two back ends:
:class:`AsyncLLMEngine` here steps an in-process ``LLMEngine`` in a background thread (tests, ``inferneo batch``
in-process, ``inferneo serve --engine-in-process``), and ``inferneo.engine.core_client.AsyncMPEngine`` runs the
engine core in a child process (the default for ``inferneo serve``, so the model's Python does not share a GIL
with the HTTP server).

Here, requests and aborts go into a thread-safe inbox that the engine thread drains before every step, so the
``LLMEngine`` is only ever touched by that thread. The thread steps while there is work and sleeps on an event
otherwise; the heavy work runs in torch, which releases the GIL.

A step that raises fails only the requests in the running batch; the others go on. Repeated failures, or
bookkeeping found inconsistent after one, mark the engine dead: every pending request fails at once and new ones
are refused with :class:`EngineDeadError`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from inferneo.engine.async_base import (
    AsyncEngineBase,
    EngineDeadError,
    EngineRequest,
    EngineSnapshot,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
    RequestGroup,
    RequestObserver,
    Tracked,
    snapshot_of,
)
from inferneo.engine.llm_engine import LLMEngine

__all__ = ["AsyncEngineBase", "AsyncLLMEngine", "EngineDeadError", "EngineRequest", "EngineSnapshot",
           "InvalidRequestError", "QueueFullError", "RequestFailedError", "RequestGroup", "RequestObserver"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Add:
    group: RequestGroup
    requests: list[EngineRequest]
    arrival: float


class AsyncLLMEngine(AsyncEngineBase):
    """Serves many concurrent asyncio callers from one ``LLMEngine`` stepped in one background thread."""

    def __init__(
        self,
        engine: LLMEngine,
        max_queued_requests: int | None = None,
        observer: RequestObserver | None = None,
        max_consecutive_step_failures: int = 3,
    ) -> None:
        super().__init__(max_queued_requests, observer, max_consecutive_step_failures)
        self.engine = engine
        # The front end's own tokenizer: the engine thread decodes with the engine's at the same time.
        try:
            self.tokenizer = copy.deepcopy(engine.tokenizer)
        except Exception:
            self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.vocab_size
        self.generation_defaults = engine.default_sampling_params()
        self._inbox: deque[_Add | list[str]] = deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._consecutive_failures = 0
        self._publish()

    @property
    def kv_capacity_tokens(self) -> int:  # the engine's own figure (tests may shrink its cache)
        return self.engine.kv_capacity_tokens

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

    def _is_running(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    # ---- requests ----------------------------------------------------------------------------------------

    def _enqueue(self, group: RequestGroup, requests: list[EngineRequest], num_seqs: int) -> None:
        self._pending += num_seqs
        self._inbox.append(_Add(group, requests, time.monotonic()))
        self._wake.set()

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests by id (thread-safe; unknown or finished ids are ignored)."""
        self._inbox.append(list(request_ids))
        self._wake.set()

    def _abort_later(self, request_ids: list[str]) -> None:
        # The inbox append is lock-free, so this is safe wherever the collector runs.
        self._inbox.append(request_ids)

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
                    self._untrack(request_id)
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
                self._tracked[request.request_id] = Tracked(command.group, index, command.arrival)
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
        self._route(outputs)

    def _step_failed(self, exc: Exception) -> None:
        """Fail the requests of the running batch; die if this keeps happening or the books do not balance."""
        logger.exception("an engine step failed; failing the requests in its batch")
        self._consecutive_failures += 1
        engine = self.engine
        message = f"the engine failed while running this request: {exc!r}"
        for request_id in engine.running_request_ids():
            engine.abort_request(request_id)
            self._untrack(request_id, RequestFailedError(message))
        engine.kv_cache.check_integrity(list(engine.scheduler.requests.values()))
        if self._consecutive_failures >= self.max_consecutive_step_failures:
            raise EngineDeadError(f"{self._consecutive_failures} engine steps failed in a row") from exc

    def _publish(self) -> None:
        engine = self.engine
        self.snapshot = snapshot_of(engine.scheduler, engine.kv_cache, engine.core.stats)

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


