"""Process-level settings that make CPU inference faster."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def keep_freed_memory_mapped() -> bool:
    """Stop glibc from returning large freed blocks to the OS after every engine step.

    Activations of a step are megabytes each; by default glibc serves them with fresh ``mmap`` calls and unmaps
    them on free, so every step pays page faults for memory it used a moment ago. Raising the mmap and trim
    thresholds keeps that memory in the heap for reuse (what tcmalloc or jemalloc would give). Linux/glibc only.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31) == 1
    except (OSError, AttributeError):
        return False
    logger.debug("glibc mallopt thresholds raised: %s", ok)
    return ok


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``): after a load that freed large blocks
    (the full-width layers a quantized model replaced), which the raised trim threshold would otherwise keep
    resident. Linux/glibc only; returns whether it ran."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True
