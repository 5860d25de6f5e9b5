"""One step's token bitmask: the allowed next tokens of every constrained sequence the step samples."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from inferneo.sampling.metadata import TokenBitmask
from inferneo.structured_output.compiler import MatcherBatch, SequenceGrammar


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
    sampled ids to reach the host, while the device already runs this step. Sequences with one new token (nearly
    all of them, every step) take it, and all rows are filled, through ``batch`` (xgrammar's threads).
    """

    def __init__(self, rows: list[ConstrainedRow], vocab_size: int,
                 previous_tokens: Callable[[], list[int]] | None, stats: GrammarStats, batch: MatcherBatch) -> None:
        self.rows = rows
        self.width = (vocab_size + 31) // 32
        self.previous_tokens = previous_tokens
        self.stats = stats
        self.batch = batch

    def __call__(self) -> TokenBitmask | None:
        start = time.perf_counter()
        previous: list[int] | None = None
        single: list[SequenceGrammar] = []
        single_tokens: list[int] = []
        for entry in self.rows:
            grammar = entry.grammar
            backlog = entry.output_token_ids[grammar.num_accepted:]
            if entry.pending_sample >= 0:
                if previous is None:
                    if self.previous_tokens is None:
                        raise RuntimeError("a constrained row reads a token of a previous step that was not given")
                    previous = self.previous_tokens()
                backlog.append(previous[entry.pending_sample])
            if len(backlog) == 1:
                single.append(grammar)
                single_tokens.append(backlog[0])
            else:  # the first sample (nothing to take) or, rarely, several tokens behind
                for token in backlog:
                    grammar.accept_token(token)
        if single:
            self.batch.accept(single, single_tokens)
        active = [entry for entry in self.rows if entry.grammar.constrains]
        words = torch.empty(len(active), self.width, dtype=torch.int32)
        if active:
            self.batch.fill([entry.grammar for entry in active], words)
        self.stats.seconds += time.perf_counter() - start
        self.stats.rows += len(active)
        if not active:
            return None
        return TokenBitmask([entry.row for entry in active], words)
