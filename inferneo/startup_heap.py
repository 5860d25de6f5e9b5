"""Keep the garbage collector off the objects a process made while starting up.

Loading a model leaves hundreds of thousands of long-lived Python objects behind (torch, transformers, the
tokenizer, the model's modules, the server's routes). CPython's cyclic collector walks every tracked object of a
generation when it collects it, so each full (generation-2) collection of a loaded process walks all of them:
0.12-0.26 s for a front end of 263k-466k objects on a quiet 2-vCPU host, 0.46-0.59 s measured mid-run beside a
busy engine, in the middle of answering requests. Those objects live as long as the process, so after start-up
they are collected once and moved to the permanent generation (``gc.freeze``), which the collector never walks
(a full collection then takes under a millisecond); what requests allocate afterwards is collected as usual.

Only processes that Inferneo owns do this: the engine core's child process or Ray actor, tensor-parallel workers,
``inferneo serve``'s front end, ``inferneo batch`` and a Ray Data engine replica. ``LLM(...)`` in a user's own
process does not: a frozen object is never collected, so an engine that a notebook drops would keep its memory.

``INFERNEO_GC_FREEZE=0`` leaves the collector as Python sets it.
"""

from __future__ import annotations

import gc
import logging

from inferneo import envs

logger = logging.getLogger(__name__)


def freeze_startup_heap(stage: str) -> int:
    """Collect once, then move every object alive now to the permanent generation. Returns how many objects the
    permanent generation holds afterwards (0 when switched off). ``stage`` names the caller in the debug log.

    Safe to call more than once (each call moves what was made since); call it when start-up's objects are made
    and before traffic, never in a loop."""
    if not envs.gc_freeze():
        return 0
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.debug("%s: %d start-up objects moved out of the collector's reach", stage, frozen)
    return frozen
