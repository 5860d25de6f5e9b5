"""The (query, document) pairs a scoring call names, in vLLM's shapes (``LLM.score``, ``POST /v1/score``)."""

from __future__ import annotations

from collections.abc import Sequence


def score_pairs(data_1: str | Sequence[str], data_2: str | Sequence[str]) -> list[tuple[str, str]]:
    """The (query, document) pairs of ``LLM.score``'s arguments: one text against each of the others (1 to N), or
    two lists of one length pairwise. ValueError for lists of different lengths, TypeError for what is not text."""
    firsts = [data_1] if isinstance(data_1, str) else list(data_1)
    seconds = [data_2] if isinstance(data_2, str) else list(data_2)
    if not all(isinstance(t, str) for t in firsts + seconds):
        raise TypeError("data_1 and data_2 must be strings or lists of strings")
    if not firsts or not seconds:
        raise ValueError("data_1 and data_2 must each hold at least one text")
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    if len(firsts) != len(seconds):
        raise ValueError(
            f"data_1 has {len(firsts)} texts and data_2 {len(seconds)}: give one text to score against "
            "every text of data_2, or lists of one length"
        )
    return list(zip(firsts, seconds, strict=True))
