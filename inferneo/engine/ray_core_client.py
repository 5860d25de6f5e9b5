"""Engine cores as Ray actors: data-parallel replicas placed anywhere on a Ray cluster, driven by our front end.

``inferneo serve --data-parallel-size N --data-parallel-backend ray`` keeps its one OpenAI front end (HTTP,
tokenizer, router) on this machine and places each replica's engine core in a Ray actor
(:class:`EngineCoreActor`) on the cluster (spread over the nodes; ``num_gpus`` = the tensor-parallel size on
CUDA). The actor runs the same core loop as a child process does; the commands and messages that would cross a
pipe cross Ray calls instead, msgpack-encoded as in ``core_process``: a writer thread sends each batch of
commands (``send``, one call at a time, so they arrive in order) and a reader thread long-polls the actor for
messages (``poll``). A replica whose actor or node dies answers ``poll`` with an actor error: the client reports
``CoreDead`` and the data-parallel client takes the replica out of rotation.

Ray is imported only here, lazily: ``import inferneo`` stays light.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading

from inferneo.config import EngineConfig
from inferneo.engine.core_client import (
    STOP_WRITER,
    CommandInbox,
    MessageHandler,
    ReaderWriterClient,
    write_batches,
)
from inferneo.engine.protocol import (
    MESSAGE_DECODER,
    CoreDead,
    CoreInfo,
    CoreMessage,
    Shutdown,
    decode_commands,
    encode,
)

logger = logging.getLogger(__name__)

_POLL_S = 0.5  # how long one poll waits for a message in the actor


class EngineCoreActor:
    """One engine core in a Ray actor (made remote by :func:`start_ray_replicas`; see the module docstring)."""

    def __init__(self, config: EngineConfig, max_consecutive_step_failures: int = 3,
                 log_level: int = logging.INFO) -> None:
        from inferneo.engine.core_builder import build_engine_core
        from inferneo.engine.core_loop import CoreLoop
        from inferneo.startup_heap import freeze_startup_heap

        logging.basicConfig(level=log_level, format="%(levelname)s %(name)s (ray core): %(message)s")
        self._core, self._info = build_engine_core(config)
        freeze_startup_heap("engine core (Ray actor)")  # the actor's process is this core's alone
        self._inbox = CommandInbox()  # never closed: a Shutdown command or the actor's end stops the loop
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._loop = CoreLoop(self._core, max_consecutive_step_failures)
        self._thread = threading.Thread(target=self._run, name="inferneo-ray-core", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from inferneo.engine.core_builder import shutdown_core

        try:
            self._loop.run(self._inbox, self._outbox.put)
        except BaseException as exc:
            logger.exception("the engine core failed")
            self._outbox.put(CoreDead(repr(exc)))
        finally:
            shutdown_core(self._core)
            self._outbox.put(None)

    def info(self) -> bytes:
        return encode(self._info)

    def send(self, data: bytes) -> None:
        self._inbox.push(decode_commands(data))

    def poll(self, timeout: float) -> list[bytes | None]:
        """Messages since the last poll (waiting up to ``timeout`` for the first); None: the loop has ended."""
        messages: list[bytes | None] = []
        try:
            first = self._outbox.get(timeout=timeout)
        except queue.Empty:
            return messages
        messages.append(None if first is None else encode(first))
        while True:
            try:
                message = self._outbox.get_nowait()
            except queue.Empty:
                return messages
            messages.append(None if message is None else encode(message))


class RayCoreClient(ReaderWriterClient):
    """A :class:`~inferneo.engine.core_client.CoreClient` over an :class:`EngineCoreActor` handle."""

    def __init__(self, actor) -> None:
        import ray

        self._ray = ray
        self.actor = actor
        self.info: CoreInfo = MESSAGE_DECODER.decode(ray.get(actor.info.remote()))
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._alive = True
        self._closed = False

    def is_alive(self) -> bool:
        return self._alive

    def _write_loop(self) -> None:
        write_batches(self._queue, lambda batch: self._ray.get(self.actor.send.remote(encode(batch))), (Exception,))

    def _read_loop(self, on_message: MessageHandler) -> None:
        why = "the engine core's Ray actor stopped"
        ended = False
        while not ended:
            try:
                batch = self._ray.get(self.actor.poll.remote(_POLL_S))
            except Exception as exc:  # RayActorError, a lost node, ...
                why = f"the engine core's Ray actor died: {type(exc).__name__}"
                break
            for data in batch:
                if data is None:
                    ended = True
                    break
                message: CoreMessage = MESSAGE_DECODER.decode(data)
                try:
                    on_message(message)
                except Exception:
                    logger.exception("could not handle a message from the engine core")
                if isinstance(message, CoreDead):
                    self._alive = False
                    return
        self._alive = False
        on_message(None if self._closed else CoreDead(why))

    def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(Shutdown())
        self._queue.put(STOP_WRITER)
        if not self._threads:
            self._write_loop()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)
        with contextlib.suppress(Exception):
            self._ray.kill(self.actor)
        self._alive = False


def start_ray_replicas(config: EngineConfig, max_consecutive_step_failures: int = 3) -> list[RayCoreClient]:
    """Place ``config.data_parallel_size`` engine-core actors on the Ray cluster (``RAY_ADDRESS``, or a local one
    started here) spread over its nodes; returns their clients once every model is loaded."""
    import ray

    from inferneo.engine.data_parallel import replica_config

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, log_to_driver=True)
    one = replica_config(config)
    gpus = config.tensor_parallel_size if config.torch_device.type == "cuda" else 0
    env = {name: os.environ[name] for name in ("PYTHONPATH", "TORCH_EXTENSIONS_DIR") if name in os.environ}
    remote = ray.remote(EngineCoreActor).options(
        num_cpus=1, num_gpus=gpus, max_concurrency=2, scheduling_strategy="SPREAD",
        runtime_env={"env_vars": env} if env else None)
    actors = [remote.remote(one, max_consecutive_step_failures, logging.getLogger().getEffectiveLevel())
              for _ in range(config.data_parallel_size)]
    try:
        return [RayCoreClient(actor) for actor in actors]
    except BaseException:
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        raise
