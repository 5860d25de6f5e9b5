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


def split_at_marker(text: str, marker: str) -> tuple[str, str | None, str]:
    """``text`` read up to ``marker``: ``(content, gap, rest)``. With the marker in ``text``: the text before it
    without its trailing whitespace, that whitespace (the blank before the marker, content again if no call
    follows), and what comes after the marker. Without it: what can go out now, None, and what must wait for the
    next piece (:func:`undecided_tail`)."""
    start = text.find(marker)
    if start < 0:
        cut = len(text) - undecided_tail(text, marker)
        return text[:cut], None, text[cut:]
    before = text[:start]
    kept = before.rstrip()
    return kept, before[len(kept):], text[start + len(marker):]
