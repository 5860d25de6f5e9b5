"""Streamed text read for markers (tool-call tags, thinking tags): what must wait for the next piece."""

from __future__ import annotations


def undecided_tail(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` cannot go out yet: a possible start of ``marker`` and the
    whitespace before it (which the reader drops, or keeps, once it knows whether the marker follows)."""
    keep = 0
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            keep = size
            break
    rest = text[:len(text) - keep]
    return keep + len(rest) - len(rest.rstrip())
