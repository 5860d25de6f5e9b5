"""Draft tokens by prompt lookup: what followed the latest earlier occurrence of the sequence's last n tokens."""

from __future__ import annotations

import numpy as np

from inferneo.spec_decode.config import SpeculativeConfig


class NgramProposer:
    """Proposes drafts for one sequence from its own tokens (prompt and output so far).

    For ``n`` from ``prompt_lookup_max`` down to ``prompt_lookup_min``, it finds the latest position before the
    end where the last ``n`` tokens occurred already, and returns the tokens that followed them there (at most
    ``num_speculative_tokens``). Long matches come first: they predict better. Nothing found: no drafts.
    """

    def __init__(self, config: SpeculativeConfig) -> None:
        self.num_speculative_tokens = config.num_speculative_tokens
        self.max_n = config.prompt_lookup_max
        self.min_n = config.prompt_lookup_min

    def propose(self, token_ids: list[int], max_drafts: int | None = None,
                history: TokenHistory | None = None) -> list[int]:
        """Up to ``min(num_speculative_tokens, max_drafts)`` draft tokens to follow ``token_ids``; ``history``
        (the sequence's own, kept between calls) saves converting the whole list at every step."""
        limit = self.num_speculative_tokens if max_drafts is None else min(self.num_speculative_tokens, max_drafts)
        length = len(token_ids)
        if limit <= 0 or length < self.min_n + 1:
            return []
        tokens = history.array(token_ids) if history is not None else np.asarray(token_ids, dtype=np.int64)
        # Candidate match ends: earlier positions holding the last token (never the last position itself).
        ends = np.flatnonzero(tokens[:-1] == tokens[-1])
        if ends.size == 0:
            return []
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            valid = ends[ends >= n - 1]
            if valid.size == 0:
                continue
            if n > 1:
                window = valid[:, None] + np.arange(1 - n, 1)
                valid = valid[(tokens[window] == tokens[length - n :]).all(axis=1)]
                if valid.size == 0:
                    continue
            start = int(valid[-1]) + 1
            return tokens[start : start + limit].tolist()
        return []


class TokenHistory:
    """One sequence's tokens as an int64 array that grows with them: each call copies only the tokens appended
    since the last (the core's token lists only grow), so a step's lookup costs no conversion of a long context."""

    def __init__(self) -> None:
        self._buffer = np.empty(0, dtype=np.int64)
        self._length = 0

    def array(self, token_ids: list[int]) -> np.ndarray:
        """``token_ids`` as an array (a view of the buffer, valid until the next call)."""
        length = len(token_ids)
        if length < self._length:  # not the list this history followed: start again
            self._length = 0
        if length > len(self._buffer):
            grown = np.empty(max(2 * len(self._buffer), length, 64), dtype=np.int64)
            grown[: self._length] = self._buffer[: self._length]
            self._buffer = grown
        self._buffer[self._length : length] = token_ids[self._length : length]
        self._length = length
        return self._buffer[:length]
