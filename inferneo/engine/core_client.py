"""The three ways a front end hosts the engine core, behind one interface.

- :class:`InlineCoreClient`: the core in the caller's thread, one turn per call (the offline ``LLM``).
- :class:`ThreadCoreClient`: the core loop in a background thread of this process (``inferneo serve
  --engine-in-process``, in-process batch jobs, tests).
- :class:`ProcessCoreClient`: the core loop in a child process (``inferneo serve``'s default), so the model's
  Python does not share a GIL with the HTTP server. A writer thread sends commands (everything queued since its
  last send goes as one message); a reader thread receives one message per turn.

The last two are the :class:`CoreClient` interface the async front end codes against: ``start(on_message)``,
``send(command)``, ``close()``. ``on_message`` is called (from a thread of the client's) with each
``StepOutputs``, with ``CoreDead`` when the core stopped after a fatal error, and with ``None`` when it is gone
for any other reason (an orderly shut-down, or a child process that died).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from inferneo import envs
from inferneo.config import EngineConfig
from inferneo.engine.core import EngineCore
from inferneo.engine.core_builder import build_engine_core, shutdown_core
from inferneo.engine.core_loop import CoreLoop
from inferneo.engine.core_process import run_engine_core
from inferneo.engine.protocol import (
    MESSAGE_DECODER,
    ControlCommand,
    ControlReply,
    CoreCommand,
    CoreDead,
    CoreInfo,
    CoreStartFailed,
    Shutdown,
    StepOutputs,
    encode,
)

logger = logging.getLogger(__name__)

MessageHandler = Callable[[StepOutputs | CoreDead | None], None]


class CoreClient(Protocol):
    """What the async front end needs from a running core."""

    info: CoreInfo

    def start(self, on_message: MessageHandler) -> None:
        """Start the core loop; ``on_message`` gets its output (see the module docstring). Idempotent."""

    def send(self, command: CoreCommand) -> None:
        """Queue a command for the core (thread-safe, never blocks)."""

    def is_alive(self) -> bool:
        """Whether the core can still take commands."""

    def close(self, timeout: float = 10.0) -> None:
        """Stop the core and wait for it (idempotent)."""


class InlineCoreClient:
    """The core in the caller's thread: commands apply at once, ``turn()`` runs one step."""

    def __init__(self, core: EngineCore, info: CoreInfo, max_consecutive_step_failures: int = 3) -> None:
        self.core = core
        self.info = info
        self.loop = CoreLoop(core, max_consecutive_step_failures)

    @classmethod
    def from_config(cls, config: EngineConfig) -> InlineCoreClient:
        return cls(*build_engine_core(config))

    def send(self, command: CoreCommand) -> None:
        self.loop.handle(command)

    def call(self, command: ControlCommand) -> ControlReply:
        """Apply a control command now (between turns) and return the core's answer."""
        self.loop.handle(command)
        return self.loop.take_reply(command.call_id)

    def turn(self) -> StepOutputs:
        """One step (counters are not gathered: nobody reads them here)."""
        return self.loop.turn(with_snapshot=False)

    def has_work(self) -> bool:
        return self.loop.has_work()

    def close(self) -> None:
        shutdown_core(self.core)


class ThreadCoreClient:
    """The core loop in a background thread; ``on_message`` runs in that thread."""

    def __init__(self, core: EngineCore, info: CoreInfo, max_consecutive_step_failures: int = 3) -> None:
        self.core = core
        self.info = info
        self.loop = CoreLoop(core, max_consecutive_step_failures)
        self._inbox = CommandInbox()
        self._thread: threading.Thread | None = None
        self._closed = False

    @classmethod
    def from_config(cls, config: EngineConfig, max_consecutive_step_failures: int = 3) -> ThreadCoreClient:
        return cls(*build_engine_core(config), max_consecutive_step_failures)

    def start(self, on_message: MessageHandler) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, args=(on_message,), name="inferneo-engine",
                                            daemon=True)
            self._thread.start()

    def _run(self, on_message: MessageHandler) -> None:
        try:
            self.loop.run(self._inbox, on_message)
        except BaseException as exc:
            logger.exception("the engine loop failed; the engine is now dead")
            on_message(CoreDead(repr(exc)))
            return
        on_message(None)

    def send(self, command: CoreCommand) -> None:
        self._inbox.push((command,))

    def is_alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        self.send(Shutdown())
        self._inbox.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)


class CommandInbox:
    """The core loop's inbox (:class:`~inferneo.engine.core_loop.Inbox`) for a loop in a thread of this process:
    commands pushed from any thread, a wake-up event, and a flag set when the front end is gone."""

    def __init__(self) -> None:
        self._commands: deque[CoreCommand] = deque()
        self._wake = threading.Event()
        self._closed = False

    def push(self, commands: Iterable[CoreCommand]) -> None:
        """Add ``commands`` (in order) and wake the loop; safe from any thread and the garbage collector
        (deque appends are atomic)."""
        self._commands.extend(commands)
        self._wake.set()

    def close(self) -> None:
        """The front end is gone: the loop stops when it next idles."""
        self._closed = True

    def wait(self, timeout: float) -> bool:
        if self._commands:
            return True
        woken = self._wake.wait(timeout)
        self._wake.clear()
        return woken or bool(self._commands)

    def take(self) -> list[CoreCommand]:
        self._wake.clear()
        taken = []
        while self._commands:
            taken.append(self._commands.popleft())
        return taken

    def front_end_alive(self) -> bool:
        return not self._closed


STOP_WRITER = object()  # tells the writer thread to finish


def write_batches(commands: queue.SimpleQueue, send: Callable[[list[CoreCommand]], object],
                  gone: tuple[type[BaseException], ...]) -> None:
    """A writer thread's loop: send everything queued since the last send as one batch, until ``STOP_WRITER`` is
    queued or ``send`` raises one of ``gone`` (the core is gone; the reader thread reports it)."""
    while True:
        batch = [commands.get()]
        while True:
            try:
                batch.append(commands.get_nowait())
            except queue.Empty:
                break
        done = any(item is STOP_WRITER for item in batch)
        batch = [item for item in batch if item is not STOP_WRITER]
        try:
            if batch:
                send(batch)
        except gone:
            return
        if done:
            return


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


class ReaderWriterClient:
    """A core client whose commands go out from a writer thread (``_write_loop``, reading ``_queue``) and whose
    messages come in on a reader thread (``_read_loop(on_message)``): the transport is the subclass's."""

    _queue: queue.SimpleQueue
    _threads: list[threading.Thread]

    def start(self, on_message: MessageHandler) -> None:
        if self._threads:
            return
        self._threads = [threading.Thread(target=self._read_loop, args=(on_message,), name="inferneo-core-reader",
                                          daemon=True),
                         threading.Thread(target=self._write_loop, name="inferneo-core-writer", daemon=True)]
        for thread in self._threads:
            thread.start()

    def send(self, command: CoreCommand) -> None:
        self._queue.put(command)

    def _read_loop(self, on_message: MessageHandler) -> None:
        raise NotImplementedError

    def _write_loop(self) -> None:
        raise NotImplementedError


class ProcessCoreClient(ReaderWriterClient):
    """Starts the engine core in a child process and carries commands to it and messages from it.

    Building it starts the child; :meth:`wait_ready` blocks until the model is loaded (the caller can load the
    tokenizer meanwhile). ``extra_env`` is added to the child's environment (a data-parallel replica's GPUs).
    """

    def __init__(self, config: EngineConfig, max_consecutive_step_failures: int = 3,
                 extra_env: dict[str, str] | None = None) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no copied threads or locks
        commands_in, self._commands = context.Pipe(duplex=False)
        self._messages, messages_out = context.Pipe(duplex=False)
        self.process = context.Process(
            # Not a daemon: it may start tensor-parallel workers of its own. It exits when its pipes close or
            # its parent disappears (it checks), so it never outlives the server.
            target=run_engine_core, name="inferneo-engine-core", daemon=False,
            args=(config, commands_in, messages_out, max_consecutive_step_failures,
                  logging.getLogger().getEffectiveLevel()))
        environment = {**engine_core_environment(config.torch_device.type, os.environ), **(extra_env or {})}
        with _environment(environment):
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
        self.info: CoreInfo | None = None

    def wait_ready(self) -> CoreInfo:
        """Block until the child has loaded the model; returns its facts, or raises why it could not."""
        while True:
            if self._messages.poll(0.2):
                try:
                    message = MESSAGE_DECODER.decode(self._messages.recv_bytes())
                except EOFError:
                    break
                if isinstance(message, CoreInfo):
                    self.info = message
                    return message
                if isinstance(message, CoreStartFailed):
                    self.close()
                    raise (ValueError if message.invalid_config else RuntimeError)(message.message)
            elif not self.process.is_alive():
                break
        self.close()
        raise RuntimeError(f"the engine core process exited while starting (exit code {self.process.exitcode})")

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def _write_loop(self) -> None:
        write_batches(self._queue, lambda batch: self._commands.send_bytes(encode(batch)), (OSError,))

    def _read_loop(self, on_message: MessageHandler) -> None:
        while True:
            try:
                data = self._messages.recv_bytes()
            except (EOFError, OSError):
                break
            try:
                on_message(MESSAGE_DECODER.decode(data))
            except Exception:
                logger.exception("could not handle a message from the engine core")
        if self._closed:
            on_message(None)
            return
        self.process.join(1.0)
        on_message(CoreDead(f"the engine core process exited unexpectedly (exit code {self.process.exitcode})"))

    def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(Shutdown())
        self._queue.put(STOP_WRITER)
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
