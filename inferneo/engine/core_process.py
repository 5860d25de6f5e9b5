"""The engine core in a process of its own: token ids in, token ids out, over two one-way pipes.

The child loads the model from the ``EngineConfig`` it is given and runs a busy loop: take every command that
has arrived (without waiting while there is work), run one step, send one message with what the step produced.
While idle it blocks on the command pipe. It exits on a shut-down command or when the parent's end of the pipe
closes (the parent died), so it never outlives the server.

Commands, parent to child (one pickled list of them per message):
  ``("add", [CoreRequestSpec, ...])``  requests that enter the core together (a group)
  ``("abort", [core_id, ...])``        stop these sequences and free their KV blocks
  ``("shutdown",)``

Messages, child to parent (one pickled tuple each):
  ``("ready", info)``                            once the model is loaded (``info``: figures the front end needs)
  ``("out", outputs, snapshot, events, added)``   after a turn: packed ``CoreOutput`` tuples, the counters,
                                                  refused or failed sequences, sequences taken so far
  ``("dead", message)``                          a fatal error; the child exits after it
  ``("error", message, is_value_error)``         the model could not be loaded
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import time
from multiprocessing.connection import Connection

from inferneo import envs
from inferneo.config import EngineConfig
from inferneo.engine.core import CoreOutput

logger = logging.getLogger(__name__)

_IDLE_POLL_S = 1.0  # how often an idle core checks that its parent is still there


def pack_outputs(outputs: list[CoreOutput]) -> list[tuple]:
    """``CoreOutput`` objects as plain tuples in field order (compact to pickle; ``CoreOutput(*t)`` restores)."""
    return [(o.request_id, o.new_token_ids, o.finished, o.finish_reason, o.stop_reason, o.logprob_token_ids,
             o.logprobs, o.ranks, o.num_cached_tokens) for o in outputs]


def snapshot_tuple(engine) -> tuple:
    """The engine's counters as a tuple in ``EngineSnapshot`` field order."""
    from inferneo.engine.async_base import snapshot_of

    snap = snapshot_of(engine.scheduler, engine.kv_cache, engine.core.stats)
    return tuple(getattr(snap, name) for name in snap.__dataclass_fields__)


def run_engine_core(config: EngineConfig, commands: Connection, messages: Connection,
                    max_consecutive_step_failures: int = 3, log_level: int = logging.INFO) -> None:
    """The child process's entry point (spawned by ``CoreClient``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s (core): %(message)s")
    parent = os.getppid()
    try:
        from inferneo.engine.llm_engine import LLMEngine

        engine = LLMEngine(config)
    except BaseException as exc:
        logger.exception("the engine core could not start")
        messages.send(("error", str(exc), isinstance(exc, ValueError)))
        return
    runner = engine.runner
    _install_test_fault(engine)
    messages.send(("ready", {
        "max_model_len": engine.max_model_len, "vocab_size": engine.vocab_size,
        "kv_capacity_tokens": engine.kv_capacity_tokens, "num_blocks": engine.kv_cache.num_blocks,
        "block_size": engine.kv_cache.block_size, "kv_bytes_per_block": runner.kv_bytes_per_block,
        "dtype": str(engine.dtype), "device": str(engine.device), "pid": os.getpid(),
    }))
    try:
        _CoreLoop(engine, commands, messages, max_consecutive_step_failures, parent).run()
    except (EOFError, OSError):
        logger.info("the front end went away; the engine core stops")
    except BaseException as exc:
        logger.exception("the engine core failed")
        with contextlib.suppress(OSError):
            messages.send(("dead", repr(exc)))
    finally:
        engine.shutdown()  # tensor-parallel workers, if any


class _CoreLoop:
    """The busy loop of the core process."""

    def __init__(self, engine, commands: Connection, messages: Connection, max_failures: int, parent: int) -> None:
        self.engine = engine
        self.core = engine.core
        self.commands = commands
        self.messages = messages
        self.max_failures = max_failures
        self.parent = parent
        self.failures = 0
        self.num_added = 0  # sequences taken into the core so far
        self.events: list[tuple] = []
        self.stop = False
        self.check_workers = getattr(engine.runner, "check_workers", None)  # tensor-parallel runners only

    def run(self) -> None:
        core, commands = self.core, self.commands
        while not self.stop:
            if not core.has_unfinished_requests():
                while not commands.poll(_IDLE_POLL_S):
                    if os.getppid() != self.parent:
                        return
                    if self.check_workers is not None:
                        self.check_workers()  # a worker that died while idle stops the engine now (it raises)
            changed = False
            while commands.poll(0):
                for command in pickle.loads(commands.recv_bytes()):
                    self._handle(command)
                changed = True
            if self.stop:
                break
            outputs: list[CoreOutput] = []
            if core.has_unfinished_requests():
                outputs = self._step()
            if outputs or changed or self.events:
                self._send(outputs)
        self.core.abort_requests(list(self.core.scheduler.requests))

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            self._add(command[1])
        elif kind == "abort":
            self.core.abort_requests(command[1])
        elif kind == "shutdown":
            self.stop = True

    def _add(self, specs: list) -> None:
        from inferneo.engine.request import Request

        self.num_added += len(specs)
        try:
            requests = [Request(*spec) for spec in specs]
        except Exception as exc:  # refuse this group only
            self.events.append(("refused", [spec[0] for spec in specs], str(exc), isinstance(exc, ValueError)))
            return
        for request in requests:
            self.core.add_request(request)

    def _step(self) -> list[CoreOutput]:
        core = self.core
        steps_before = core.stats.num_steps
        try:
            outputs = core.step()
        except Exception as exc:
            self._step_failed(exc)
            return []
        self.failures = 0
        if core.stats.num_steps == steps_before:
            time.sleep(0.001)  # nothing could be scheduled (should not happen): do not spin
        return outputs

    def _step_failed(self, exc: Exception) -> None:
        """Fail the sequences of the running batch; raise (fatal) if this keeps happening or the books are off."""
        logger.exception("an engine step failed; failing the requests in its batch")
        self.failures += 1
        engine = self.engine
        running = [r.request_id for r in engine.scheduler.running]
        self.core.abort_requests(running)
        self.events.append(("failed", running, f"the engine failed while running this request: {exc!r}"))
        engine.kv_cache.check_integrity(list(engine.scheduler.requests.values()))
        died = self._worker_death(exc)
        if died is not None or self.failures >= self.max_failures:
            self._send([])  # the batch's own errors first
            if died is not None:  # no later step can succeed without that rank
                raise died
            raise RuntimeError(f"{self.failures} engine steps failed in a row") from exc

    def _worker_death(self, exc: Exception) -> Exception | None:
        """The WorkerDiedError behind a failed step, if a tensor-parallel worker has exited; else None."""
        from inferneo.worker.tensor_parallel import WorkerDiedError

        if isinstance(exc, WorkerDiedError):
            return exc
        if self.check_workers is None:
            return None
        try:
            self.check_workers(timeout=1.0)  # returns at once if one has exited, else after the timeout
        except WorkerDiedError as died:
            return died
        return None

    def _send(self, outputs: list[CoreOutput]) -> None:
        events, self.events = self.events, []
        message = ("out", pack_outputs(outputs), snapshot_tuple(self.engine), events, self.num_added)
        self.messages.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _install_test_fault(engine) -> None:
    """The INFERNEO_TEST_FAULT hook (see ``envs.test_fault``): wrap the runner so that chosen steps raise."""
    spec = envs.test_fault()
    if not spec:
        return
    logger.warning("INFERNEO_TEST_FAULT=%s: model steps will fail on purpose", spec)
    always = spec == "always"
    poison = [] if always else [int(t) for t in spec.removeprefix("prompt:").split(",")]
    runner = getattr(engine.runner, "driver", engine.runner)  # the rank-0 ModelRunner behind a TP runner
    launch = runner.launch

    def faulty_launch(sched, previous=None):
        if always or any(item.request.prompt_token_ids[: len(poison)] == poison for item in sched.scheduled):
            raise RuntimeError("injected fault (INFERNEO_TEST_FAULT)")
        return launch(sched, previous)

    runner.launch = faulty_launch  # ``execute`` (synchronous scheduling) goes through ``launch`` as well
