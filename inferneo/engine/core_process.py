"""The child-process side of ``ProcessCoreClient``: build the core, then run the core loop over two pipes.

Commands arrive as msgpack-encoded lists of :data:`~inferneo.engine.protocol.CoreCommand`; every message back is
one encoded :data:`~inferneo.engine.protocol.CoreMessage`: ``CoreInfo`` once the model is loaded (or
``CoreStartFailed``), then a ``StepOutputs`` per turn, and ``CoreDead`` if the loop fails for good. Messages
are encoded and written by a thread of their own (:class:`PipeWriter`), so the loop never waits for a busy front
end to drain the pipe: it goes on stepping while the front end catches up. The child
exits on a ``Shutdown`` command, when the parent's end of the pipe closes, or when the parent disappears, so it
never outlives the server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
from multiprocessing.connection import Connection

from inferneo.config import EngineConfig
from inferneo.engine.core_builder import build_engine_core, shutdown_core
from inferneo.engine.core_loop import CoreLoop
from inferneo.engine.protocol import (
    CoreCommand,
    CoreDead,
    CoreMessage,
    CoreStartFailed,
    RequestFailure,
    decode_commands,
    encode,
)
from inferneo.startup_heap import freeze_startup_heap

logger = logging.getLogger(__name__)


class PipeInbox:
    """Commands from the parent's pipe; the parent is gone when the pipe closes or it is no longer our parent."""

    def __init__(self, commands: Connection, parent_pid: int) -> None:
        self._commands = commands
        self._parent_pid = parent_pid

    def wait(self, timeout: float) -> bool:
        return self._commands.poll(timeout)

    def take(self) -> list[CoreCommand | RequestFailure]:
        taken: list[CoreCommand | RequestFailure] = []
        while self._commands.poll(0):
            taken += decode_commands(self._commands.recv_bytes())
        return taken

    def front_end_alive(self) -> bool:
        return os.getppid() == self._parent_pid


class PipeWriter:
    """Encodes and sends messages to the parent from a thread of its own, in order."""

    def __init__(self, messages: Connection) -> None:
        self._messages = messages
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="inferneo-core-writer", daemon=True)
        self._thread.start()

    def put(self, message: CoreMessage) -> None:
        self._queue.put(message)

    def _run(self) -> None:
        while (message := self._queue.get()) is not None:
            try:
                self._messages.send_bytes(encode(message))
            except OSError:  # the parent is gone; the loop notices on its side
                return

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout)


def run_engine_core(config: EngineConfig, commands: Connection, messages: Connection,
                    max_consecutive_step_failures: int = 3, log_level: int = logging.INFO) -> None:
    """The child process's entry point (spawned by ``ProcessCoreClient``)."""
    # Ctrl-C and a SIGTERM sent to the whole process group (systemd, `timeout`, `kill -- -PGID`) reach this process
    # too: the parent decides (it drains, then sends Shutdown); without a parent the loop stops by itself.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s (core): %(message)s")
    parent = os.getppid()
    try:
        core, info = build_engine_core(config)
    except BaseException as exc:
        logger.exception("the engine core could not start")
        messages.send_bytes(encode(CoreStartFailed(str(exc), isinstance(exc, ValueError))))
        return
    messages.send_bytes(encode(info))
    freeze_startup_heap("engine core")  # while the front end finishes its own start-up
    loop = CoreLoop(core, max_consecutive_step_failures)
    writer = PipeWriter(messages)
    try:
        loop.run(PipeInbox(commands, parent), writer.put)
    except (EOFError, OSError):
        logger.info("the front end went away; the engine core stops")
    except BaseException as exc:
        logger.exception("the engine core failed")
        writer.put(CoreDead(repr(exc)))
    finally:
        with contextlib.suppress(Exception):
            writer.close()
        shutdown_core(core)  # tensor-parallel workers, if any
