"""What the engine core does with a control command (prefix-cache reset, new weights, sleep and wake-up), and
the rules that keep running requests safe.

The core loop applies commands between steps, never during one. Beyond that:

- ``ResetPrefixCache`` always runs: blocks no request holds forget their contents; the reply's ``value`` says
  whether the cache is now empty (False: running requests hold cached blocks, which stay cached).
- ``UpdateWeights`` and ``Sleep`` need an idle engine: while any request is unfinished (queued, running, or
  waiting for its grammar) they are refused as ``busy`` (the front end raises ``EngineBusyError``) and nothing
  changes, so no request ever sees two sets of weights or loses its KV cache. Finish or abort requests first.
- New weights are checked whole before any is written (names, shapes), then loaded, then the prefix cache is
  reset (cached keys and values were computed with the old weights).
- Sleep resets the prefix cache (the KV memory is freed). While the engine sleeps, new requests fail with
  ``FailureKind.SLEEPING``, and so do they after a level-2 sleep until every dropped weight has been loaded again.
"""

from __future__ import annotations

import logging

from inferneo.engine.core import EngineCore
from inferneo.engine.protocol import (
    ControlCommand,
    ControlReply,
    ResetPrefixCache,
    Sleep,
    UpdateWeights,
    WakeUp,
)
from inferneo.engine.weight_transfer import from_wire

logger = logging.getLogger(__name__)


class _Busy(Exception):
    """A command that must wait for an idle (or awake) engine."""


def apply_control(core: EngineCore, command: ControlCommand) -> ControlReply:
    """Run ``command`` on ``core`` now (between steps) and say how it went."""
    try:
        value = _apply(core, command)
    except _Busy as exc:
        return ControlReply(command.call_id, False, message=str(exc), busy=True, sleeping=is_sleeping(core))
    except ValueError as exc:
        return ControlReply(command.call_id, False, message=str(exc), sleeping=is_sleeping(core))
    except Exception as exc:  # a failure of the machine, not of the command: reported, the engine goes on
        logger.exception("the engine core could not apply %s", type(command).__name__)
        return ControlReply(command.call_id, False, message=f"the engine failed: {exc!r}",
                            sleeping=is_sleeping(core), failed=True)
    return ControlReply(command.call_id, True, value=value, sleeping=is_sleeping(core))


def is_sleeping(core: EngineCore) -> bool:
    return core.runner.sleep_level > 0


def refusal_of_new_requests(core: EngineCore) -> str | None:
    """Why the core takes no new request now (sleeping, or weights dropped and not loaded again); None if it does."""
    runner = core.runner
    if runner.sleep_level:
        return f"the engine is sleeping (level {runner.sleep_level}): wake it up before sending requests"
    if runner.missing_weights:
        return (f"the engine's weights were dropped by sleep(level=2) and {len(runner.missing_weights)} are not "
                "loaded again yet: load them with update_weights")
    return None


def _apply(core: EngineCore, command: ControlCommand) -> bool:
    if isinstance(command, ResetPrefixCache):
        return core.scheduler.kv_cache.reset_prefix_cache()
    if isinstance(command, WakeUp):
        core.runner.wake_up()
        return True
    if isinstance(command, UpdateWeights):
        weights = [from_wire(record) for record in command.tensors]
        refusal = core.runner.weights_update_refusal()
        if refusal is not None:
            raise ValueError(refusal)
        if is_sleeping(core):
            raise _Busy("the engine is sleeping: wake it up before updating its weights")
        _check_idle(core, "weights change")
        core.runner.update_weights(weights)
        core.scheduler.kv_cache.reset_prefix_cache()
        return True
    if isinstance(command, Sleep):
        if is_sleeping(core):
            raise ValueError(f"the engine is already sleeping (level {core.runner.sleep_level})")
        _check_idle(core, "the engine sleeps")
        core.runner.sleep(command.level)
        core.scheduler.kv_cache.reset_prefix_cache()
        return True
    raise TypeError(f"not a control command: {command!r}")


def _check_idle(core: EngineCore, what: str) -> None:
    if core.has_unfinished_requests():
        raise _Busy(f"{core.num_unfinished_requests} request(s) are unfinished; {what} only between requests: let them finish or abort "
                    "them, then try again")
