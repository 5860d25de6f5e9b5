"""One step's token bitmask: the allowed next tokens of every constrained sequence the step samples."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from inferneo.sampling.metadata import TokenBitmask
from inferneo.structured_output.compiler import SequenceGrammar


@dataclass(slots=True)
class ConstrainedRow:
    """A constrained sequence sampled by a step."""

    row: int  # its row among the step's sampled sequences
    grammar: SequenceGrammar
    output_token_ids: list[int]  # its output tokens on the host (the core's list, shared)
    pending_sample: int  # with asynchronous scheduling: its token's row in the step still in flight, else -1


@dataclass(slots=True)
class GrammarStats:
    """Time spent accepting tokens and filling bitmasks, and the rows filled (for mask time per token)."""

    seconds: float = 0.0
    rows: int = 0


class StepBitmask:
    """Computes a step's ``TokenBitmask`` when called (by the runner, once the forward pass is queued).

    Each matcher first takes its sequence's tokens it has not seen; a token still in flight (asynchronous
    scheduling) is read from the previous step through ``previous_tokens``, which waits only for that step's
    sampled ids to reach the host, while the device already runs this step.
    """

    def __init__(self, rows: list[ConstrainedRow], vocab_size: int,
                 previous_tokens: Callable[[], list[int]] | None, stats: GrammarStats) -> None:
        self.rows = rows
        self.width = (vocab_size + 31) // 32
        self.previous_tokens = previous_tokens
        self.stats = stats

    def __call__(self) -> TokenBitmask | None:
        start = time.perf_counter()
        previous: list[int] | None = None
        words = torch.empty(len(self.rows), self.width, dtype=torch.int32)
        rows: list[int] = []
        for entry in self.rows:
            grammar = entry.grammar
            grammar.catch_up(entry.output_token_ids)
            if entry.pending_sample >= 0:
                if previous is None:
                    if self.previous_tokens is None:
                        raise RuntimeError("a constrained row reads a token of a previous step that was not given")
                    previous = self.previous_tokens()
                grammar.accept_token(previous[entry.pending_sample])
            if grammar.constrains:
                grammar.fill(words, len(rows))
                rows.append(entry.row)
        self.stats.seconds += time.perf_counter() - start
        self.stats.rows += len(rows)
        if not rows:
            return None
        return TokenBitmask(rows, words[: len(rows)])
