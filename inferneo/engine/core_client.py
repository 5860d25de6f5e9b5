"""The front end of an engine core that runs in a child process (``inferneo serve``'s default).

:class:`CoreClient` owns the child (``inferneo.engine.core_process``) and its two pipes: a writer thread sends
commands (everything queued since its last send goes as one message), a reader thread receives one message per
engine step. :class:`AsyncMPEngine` is the server's engine on top of it: it tokenizes nothing itself (the
server does) but keeps every other front-end duty here, in the API process: request ids, ``n > 1`` fan-out,
incremental detokenization, stop strings (which abort the sequence in the core), per-request timing and the
hand-off of each step's outputs to the event loop in one ``call_soon_threadsafe``.

If the child dies, the reader thread sees the pipe close: every pending request fails at once with
:class:`EngineDeadError`, new ones are refused and ``/health`` answers 503.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

from inferneo import envs
from inferneo.config import EngineConfig
from inferneo.engine.async_base import (
    AsyncEngineBase,
    EngineDeadError,
    EngineRequest,
    EngineSnapshot,
    InvalidRequestError,
    RequestFailedError,
    RequestGroup,
    RequestObserver,
    Tracked,
)
from inferneo.engine.core import CoreOutput
from inferneo.engine.core_process import run_engine_core
from inferneo.engine.llm_engine import default_sampling_params, eos_token_ids
from inferneo.engine.output_processor import OutputProcessor
from inferneo.model_loader import load_generation_config, load_hf_config, load_tokenizer, resolve_model

logger = logging.getLogger(__name__)

_STOP = object()  # tells the writer thread to finish


def engine_core_environment(device_type: str, environ) -> dict[str, str]:
    """Variables to add to the engine core process's environment, given the server's ``environ``.

    On CPU: a short OpenMP spin (``GOMP_SPINCOUNT``, see ``envs.engine_omp_spin_count``) unless the user chose
    the OpenMP wait behaviour already. Measured on 2 cores (docs/benchmarks.md): one-token requests about 15%
    faster, steady generation unchanged.
    """
    if device_type != "cpu" or "GOMP_SPINCOUNT" in environ or "OMP_WAIT_POLICY" in environ:
        return {}
    spins = envs.engine_omp_spin_count()
    return {"GOMP_SPINCOUNT": spins} if spins else {}


@contextlib.contextmanager
def _environment(extra: dict[str, str]):
    """``os.environ`` with ``extra`` added for the duration of the block."""
    saved = {name: os.environ.get(name) for name in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class CoreClient:
    """Starts the engine core process and carries commands to it and messages from it."""

    def __init__(self, config: EngineConfig, max_consecutive_step_failures: int = 3) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no copied threads or locks
        commands_in, self._commands = context.Pipe(duplex=False)
        self._messages, messages_out = context.Pipe(duplex=False)
        self.process = context.Process(
            # Not a daemon: it may start tensor-parallel workers of its own. It exits when its pipes close or
            # its parent disappears (it checks), so it never outlives the server.
            target=run_engine_core, name="inferneo-engine-core", daemon=False,
            args=(config, commands_in, messages_out, max_consecutive_step_failures,
                  logging.getLogger().getEffectiveLevel()))
        with _environment(engine_core_environment(config.torch_device.type, os.environ)):
            self.process.start()  # a spawned child takes this process's environment as it is now
        if config.torch_device.type == "cpu" and envs.api_process_nice():
            # Measured on 2 cores (docs/benchmarks.md): the engine's OpenMP threads stall whenever the front end
            # takes one of their cores in the middle of a parallel region; a lower priority for the front end
            # made one-token requests about 9% faster.
            # Linux applies niceness per thread: this lowers the calling (event-loop) thread and threads it starts
            # later, not the child. Idempotent: a second engine in the same process does not lower it further.
            with contextlib.suppress(OSError):
                os.nice(max(0, envs.api_process_nice() - os.nice(0)))
        commands_in.close()  # the child's ends: once it exits, our reads see end-of-file
        messages_out.close()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def wait_ready(self) -> dict:
        """Block until the child has loaded the model; returns its figures, or raises why it could not."""
        while True:
            if self._messages.poll(0.2):
                try:
                    message = pickle.loads(self._messages.recv_bytes())
                except EOFError:
                    break
                if message[0] == "ready":
                    return message[1]
                if message[0] == "error":
                    self.close()
                    raise (ValueError if message[2] else RuntimeError)(message[1])
            elif not self.process.is_alive():
                break
        self.close()
        raise RuntimeError(f"the engine core process exited while starting (exit code {self.process.exitcode})")

    def start(self, on_message: Callable[[tuple | None], None]) -> None:
        """Start the reader and writer threads; ``on_message(None)`` means the child is gone."""
        if self._threads:
            return
        self._threads = [threading.Thread(target=self._read_loop, args=(on_message,), name="inferneo-core-reader",
                                          daemon=True),
                         threading.Thread(target=self._write_loop, name="inferneo-core-writer", daemon=True)]
        for thread in self._threads:
            thread.start()

    def send(self, command: tuple) -> None:
        """Queue a command for the child (thread-safe, never blocks)."""
        self._queue.put(command)

    def _write_loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            done = any(item is _STOP for item in batch)
            batch = [item for item in batch if item is not _STOP]
            try:
                if batch:
                    self._commands.send_bytes(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
            except OSError:  # the child is gone; the reader reports it
                return
            if done:
                return

    def _read_loop(self, on_message: Callable[[tuple | None], None]) -> None:
        while True:
            try:
                data = self._messages.recv_bytes()
            except (EOFError, OSError):
                break
            try:
                on_message(pickle.loads(data))
            except Exception:
                logger.exception("could not handle a message from the engine core")
        on_message(None)

    def close(self, timeout: float = 10.0) -> None:
        """Ask the child to stop, wait for it (killing it if it does not stop in time) and for the threads."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(("shutdown",))
        self._queue.put(_STOP)
        if not self._threads:  # never started: write the shut-down ourselves
            self._write_loop()
        self.process.join(timeout)
        if self.process.is_alive():
            logger.warning("the engine core did not stop in %.0f s; killing it", timeout)
            self.process.kill()
            self.process.join(5)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(5)
        self._commands.close()


class AsyncMPEngine(AsyncEngineBase):
    """The server's engine with the core in a child process; same API as ``AsyncLLMEngine``.

    Building it starts the child and waits until the model is loaded (the tokenizer loads here meanwhile).
    """

    def __init__(
        self,
        config: EngineConfig,
        max_queued_requests: int | None = None,
        observer: RequestObserver | None = None,
        max_consecutive_step_failures: int = 3,
    ) -> None:
        super().__init__(max_queued_requests, observer, max_consecutive_step_failures)
        self.config = config
        self._client = CoreClient(config, max_consecutive_step_failures)
        try:
            self.source = resolve_model(config.model)
            self.hf_config = load_hf_config(self.source)
            generation_config = load_generation_config(self.source)
            self.tokenizer = load_tokenizer(self.source, config.tokenizer)
            self.generation_defaults = default_sampling_params(generation_config)
            self.eos_token_ids = eos_token_ids(generation_config, self.tokenizer)
            self.info = self._client.wait_ready()
        except BaseException:
            self._client.close()
            raise
        self.max_model_len = self.info["max_model_len"]
        self.vocab_size = self.info["vocab_size"]
        self.kv_capacity_tokens = self.info["kv_capacity_tokens"]
        self._processor = OutputProcessor(self.tokenizer)
        self._sent = 0  # sequences sent to the core
        self._late_aborts: deque[list[str]] = deque()  # from garbage-collected groups (lock-free)
        self._shut = False

    # ---- life cycle --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start talking to the core (idempotent)."""
        self._client.start(self._on_message)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Fail what is left, stop the core process and wait for it (idempotent)."""
        if self._shut:
            return
        self._shut = True
        self._stopping = True
        self._client.close(timeout)
        self._die(None)

    def _is_running(self) -> bool:
        return self._client.process.is_alive()

    # ---- requests ----------------------------------------------------------------------------------------

    def _enqueue(self, group: RequestGroup, requests: list[EngineRequest], num_seqs: int) -> None:
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise InvalidRequestError("request ids within one submission must differ")
        arrival = time.monotonic()
        planned = []
        for request in requests:
            prompt_ids, params = request.prompt_token_ids, request.params
            max_tokens = self.max_model_len - len(prompt_ids)
            if params.max_tokens is not None:
                max_tokens = min(max_tokens, params.max_tokens)
            try:
                planned.append(self._processor.prepare(request.request_id, None, prompt_ids, params, max_tokens,
                                                       self.eos_token_ids, request.priority, arrival))
            except ValueError as exc:
                raise InvalidRequestError(str(exc)) from None
        specs = []
        for index, (parent, parent_specs) in enumerate(planned):
            self._processor.register(parent)
            self._tracked[parent.request_id] = Tracked(group, index, arrival)
            specs.extend(parent_specs)
        self._sent += num_seqs
        self._pending += num_seqs
        late = self._take_late_aborts()
        if late:
            self._client.send(("abort", late))
        self._client.send(("add", specs))

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests by id (thread-safe; unknown or finished ids are ignored)."""
        core_ids: list[str] = []
        with self._lock:
            for request_id in request_ids:
                core_ids += self._processor.abort(request_id)
                self._untrack(request_id)
        if core_ids:
            self._client.send(("abort", core_ids))

    def _abort_later(self, request_ids: list[str]) -> None:
        self._late_aborts.append(request_ids)

    def _take_late_aborts(self) -> list[str]:
        """Core ids of requests whose groups were dropped unclosed (call with ``_lock`` held)."""
        core_ids: list[str] = []
        while self._late_aborts:
            for request_id in self._late_aborts.popleft():
                core_ids += self._processor.abort(request_id)
                self._untrack(request_id)
        return core_ids

    # ---- messages from the core (reader thread) ----------------------------------------------------------

    def _on_message(self, message: tuple | None) -> None:
        if message is None:
            if not self._stopping:
                code = self._client.process.exitcode
                logger.error("the engine core process exited unexpectedly (exit code %s)", code)
                self._die(EngineDeadError(f"the engine core process exited unexpectedly (exit code {code})"))
            else:
                self._die(None)
            return
        if message[0] == "dead":
            self._die(EngineDeadError(message[1]))
            return
        _, packed, snapshot, events, num_added = message
        with self._lock:
            self.snapshot = EngineSnapshot(*snapshot)
            self._pending = self._sent - num_added
            to_abort = self._apply_events(events)
            outputs, stopped = self._processor.process([CoreOutput(*fields) for fields in packed])
            self._route(outputs)
            to_abort += stopped + self._take_late_aborts()
        if to_abort:
            self._client.send(("abort", to_abort))
        self._flush()

    def _apply_events(self, events: list[tuple]) -> list[str]:
        """Fail the requests the core refused or lost in a failed step; returns sibling core ids to abort."""
        to_abort: list[str] = []
        for kind, core_ids, message, *rest in events:
            if kind == "refused":
                error: Exception = (InvalidRequestError(message) if rest and rest[0]
                                    else RequestFailedError(f"the engine could not take this request: {message}"))
            else:
                error = RequestFailedError(message)
            for core_id in core_ids:
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
            self._processor = OutputProcessor(self.tokenizer)
        self._flush()
