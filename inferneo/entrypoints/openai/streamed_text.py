"""Streamed text read for markers (tool-call tags, thinking tags, harmony's special tokens): what must wait for the
next piece."""

from __future__ import annotations


def marker_tail(text: str, markers: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` may be the start of one of ``markers`` (held back until the next
    piece decides)."""
    for size in range(min(max(map(len, markers)) - 1, len(text)), 0, -1):
        tail = text[-size:]
        if any(marker.startswith(tail) for marker in markers):
            return size
    return 0


def undecided_tail(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` cannot go out yet: a possible start of ``marker`` and the
    whitespace before it (which the reader drops, or keeps, once it knows whether the marker follows)."""
    keep = marker_tail(text, (marker,))
    rest = text[:len(text) - keep]
    return keep + len(rest) - len(rest.rstrip())
