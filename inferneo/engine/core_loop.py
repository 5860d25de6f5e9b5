"""The one loop that drives an engine core, whoever hosts it.

:class:`CoreLoop` owns what every host of a core needs: taking commands (new requests, aborts, shut-down),
stepping, isolating a failed step (its batch fails, the rest goes on), the KV-cache integrity check after a
failure, giving up after repeated failures or a dead tensor-parallel worker, and idling while there is no work.

The clients in ``inferneo.engine.core_client`` host it in three ways: turn by turn in the caller's thread
(:meth:`CoreLoop.turn`, the offline ``LLM``), or :meth:`CoreLoop.run` in a background thread or in a child
process, which differ only in their :class:`Inbox` (where commands come from, and how to tell that the front end
is gone) and in what they do with each :class:`~inferneo.engine.protocol.StepOutputs`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Protocol

from inferneo.engine.core import EngineCore
from inferneo.engine.engine_control import apply_control, refusal_of_new_requests
from inferneo.engine.protocol import (
    AbortRequests,
    AddRequests,
    ControlReply,
    CoreCommand,
    CoreOutput,
    EngineDeadError,
    FailureKind,
    RequestFailure,
    ResetPrefixCache,
    Shutdown,
    Sleep,
    StepOutputs,
    UpdateWeights,
    WakeUp,
)
from inferneo.engine.request import Request

logger = logging.getLogger(__name__)

IDLE_POLL_S = 1.0  # how often an idle loop checks that its front end and its workers are still there


class Inbox(Protocol):
    """Where a running loop's commands come from."""

    def wait(self, timeout: float) -> bool:
        """Block until a command may be there (True) or ``timeout`` seconds pass (False)."""

    def take(self) -> list[CoreCommand | RequestFailure]:
        """Every command that has arrived, without waiting (a request group that could not be decoded as a
        ``RequestFailure``: see ``protocol.decode_commands``)."""

    def front_end_alive(self) -> bool:
        """False once the front end is gone for good (the loop then stops)."""


class CoreLoop:
    """Commands in, step outputs out, around one ``EngineCore``."""

    def __init__(self, core: EngineCore, max_consecutive_step_failures: int = 3) -> None:
        self.core = core
        self.max_consecutive_step_failures = max_consecutive_step_failures
        self.stopped = False
        self._consecutive_failures = 0
        self._num_taken = 0  # sequences taken in so far
        self._failures: list[RequestFailure] = []
        self._replies: list[ControlReply] = []  # answers to control commands, sent with the next turn
        core.refuse_new_requests = functools.partial(refusal_of_new_requests, core)

    # ---- commands ------------------------------------------------------------------------------------------

    def handle(self, command: CoreCommand | RequestFailure) -> None:
        """Apply one command now; a ``RequestFailure`` (a request group the inbox could not decode) and the answer
        to a control command (``engine_control``) are reported back with the next turn's outputs."""
        if isinstance(command, AddRequests):
            self._add(command)
        elif isinstance(command, RequestFailure):
            logger.error("refusing requests %s: %s", command.request_ids, command.message)
            self._num_taken += len(command.request_ids)
            self._failures.append(command)
        elif isinstance(command, AbortRequests):
            self.core.abort_requests(command.request_ids)
        elif isinstance(command, Shutdown):
            self.stopped = True
        elif isinstance(command, ResetPrefixCache | UpdateWeights | Sleep | WakeUp):
            self._replies.append(apply_control(self.core, command))
        else:
            raise TypeError(f"not a core command: {command!r}")

    def _add(self, command: AddRequests) -> None:
        self._num_taken += len(command.requests)
        try:
            requests = [Request.from_core_request(spec) for spec in command.requests]
        except Exception as exc:  # refuse this group only
            kind = FailureKind.INVALID if isinstance(exc, ValueError) else FailureKind.FAILED
            self._failures.append(RequestFailure([spec.request_id for spec in command.requests], kind,
                                                 f"the engine could not take this request: {exc}"))
            return
        for request in requests:
            self.core.add_request(request)

    # ---- turns ---------------------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return self.core.has_unfinished_requests()

    def turn(self, with_snapshot: bool = True) -> StepOutputs:
        """One step if there is work (a failed step fails its batch); what it produced and what failed.

        Raises (after recording the batch's failures) ``EngineDeadError`` when steps keep failing, or the
        ``WorkerDiedError`` of a tensor-parallel worker that has died: no later step could succeed.
        """
        outputs: list[CoreOutput] = []
        if self.core.has_unfinished_requests():
            outputs = self._step()
        replies, self._replies = self._replies, []
        return StepOutputs(outputs, self.take_failures(), self._num_taken,
                           self.core.snapshot() if with_snapshot else None, replies)

    def take_reply(self, call_id: int) -> ControlReply:
        """The answer to the control command ``call_id`` just handled (a caller that runs the loop itself)."""
        for index, reply in enumerate(self._replies):
            if reply.call_id == call_id:
                return self._replies.pop(index)
        raise KeyError(f"no answer to control command {call_id}")

    def take_failures(self) -> list[RequestFailure]:
        """Failures recorded but not yet handed out (those of a turn that ended the loop), the core's own
        (requests it refused after taking them) included."""
        failures, self._failures = self._failures, []
        return failures + self.core.take_failures()

    def _step(self) -> list[CoreOutput]:
        core = self.core
        steps_before = core.stats.num_steps
        try:
            outputs = core.step()
        except Exception as exc:
            self._step_failed(exc)
            return []
        self._consecutive_failures = 0
        if core.stats.num_steps == steps_before:
            time.sleep(0.001)  # nothing could be scheduled (grammars still compiling): do not spin
        return outputs

    def _step_failed(self, exc: Exception) -> None:
        logger.exception("an engine step failed; failing the requests in its batch")
        self._consecutive_failures += 1
        core = self.core
        running = [r.request_id for r in core.scheduler.running]
        core.abort_requests(running)
        if running:
            self._failures.append(RequestFailure(running, FailureKind.FAILED,
                                                 f"the engine failed while running this request: {exc!r}"))
        core.scheduler.kv_cache.check_integrity(list(core.scheduler.requests.values()))
        died = self._worker_death(exc)
        if died is not None:  # no later step can succeed without that rank
            raise died
        if self._consecutive_failures >= self.max_consecutive_step_failures:
            raise EngineDeadError(f"{self._consecutive_failures} engine steps failed in a row") from exc

    def _worker_death(self, exc: Exception) -> Exception | None:
        """The error of a tensor-parallel worker that has exited, if that is why the step failed; else None."""
        from inferneo.worker.tensor_parallel import WorkerDiedError

        if isinstance(exc, WorkerDiedError):
            return exc
        try:
            # Returns at once if one has exited, else after the timeout (at once for a one-process runner).
            self.core.runner.check_workers(timeout=1.0)
        except WorkerDiedError as died:
            return died
        return None

    # ---- hosting -------------------------------------------------------------------------------------------

    def run(self, inbox: Inbox, emit: Callable[[StepOutputs], None]) -> None:
        """Serve commands until a shut-down command or until the front end is gone.

        Steps while there is work, taking every command that arrived before each step; idles on the inbox
        otherwise. ``emit`` gets every turn that produced outputs, failures or took commands. Raises what
        stopped the core (after emitting the failures of the last turn) when it cannot go on.
        """
        try:
            while not self.stopped:
                if not self.core.has_unfinished_requests():
                    while not inbox.wait(IDLE_POLL_S):
                        if not inbox.front_end_alive():
                            return
                        self.core.runner.check_workers()  # a worker that died while idle stops the engine now
                commands = inbox.take()
                for command in commands:
                    self.handle(command)
                if self.stopped:
                    break
                step = self.turn()
                if step.outputs or step.failures or commands:
                    emit(step)
        except Exception:  # the core cannot go on: the last turn's failures go out first
            failures = self.take_failures()
            if failures:
                emit(StepOutputs([], failures, self._num_taken, self.core.snapshot()))
            raise
        finally:
            self.core.abort_requests(list(self.core.scheduler.requests))
