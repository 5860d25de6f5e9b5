"""How far two engines' greedy outputs agree (quantized KV cache or weights against full precision)."""

from __future__ import annotations


def greedy_agreement(candidate: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """``(prefix, positional)``: the fraction of reference tokens matched before each sequence's first
    divergence, and the fraction of positions holding the same token."""
    total = sum(len(r) for r in reference)
    prefix = positional = 0
    for c, r in zip(candidate, reference, strict=True):
        n = next((i for i, (a, b) in enumerate(zip(c, r, strict=False)) if a != b), min(len(c), len(r)))
        prefix += n
        positional += sum(a == b for a, b in zip(c, r, strict=False))
    return prefix / total, positional / total
