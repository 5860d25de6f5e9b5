"""Process-level settings that make CPU inference faster, and the one call that keeps their memory cost in check."""

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
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc on Linux (``mallopt``/``malloc_trim`` exist), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both symbols must exist (musl lacks malloc_trim)
    except (OSError, AttributeError):
        return None
    return libc


@functools.cache
def keep_freed_memory_mapped() -> bool:
    """Stop glibc from returning large freed blocks to the OS after every engine step.

    Activations of a step are megabytes each; by default glibc serves them with fresh ``mmap`` calls and unmaps
    them on free, so every step pays page faults for memory it used a moment ago. Raising the mmap and trim
    thresholds keeps that memory in the heap for reuse (what tcmalloc or jemalloc would give). Linux/glibc only.
    Memory that loading frees stays resident too, until :func:`release_freed_memory`.
    """
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31) == 1
    logger.debug("glibc mallopt thresholds raised: %s", ok)
    return ok


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the OS once (glibc ``malloc_trim(0)``); returns whether it ran.

    Under :func:`keep_freed_memory_mapped`'s thresholds glibc never trims on its own, so what loading frees (a
    layer's checkpoint layout once packed, an untied head the tied embedding replaced, de-quantized temporaries)
    would stay resident for the life of the process. Call once the weights are final: the steps that follow grow
    the heap back to their working size and keep it (the thresholds still hold), so steady-state speed is
    unchanged. Linux/glibc only; elsewhere a no-op returning False.
    """
    libc = _glibc()
    if libc is None:
        return False
    logger.debug("malloc_trim released memory: %s", bool(libc.malloc_trim(0)))
    return True
