"""One step's token bitmask: the allowed next tokens of every constrained sequence the step samples."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from inferneo.sampling.metadata import TokenBitmask
from inferneo.structured_output.compiler import MatcherBatch, SequenceMatcher


@dataclass(slots=True)
class ConstrainedRow:
    """A constrained sequence sampled by a step."""

    row: int  # its row among the step's sampled sequences
    grammar: SequenceMatcher
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
    sampled ids to reach the host while the device already runs this step. Taking the tokens and filling the rows
    then runs on ``batch``'s worker thread (xgrammar's batch calls, which let go of the GIL) while ``meanwhile``,
    if given, runs here: the core passes its processing of the previous step's outputs, so the two overlap.
    """

    def __init__(self, rows: list[ConstrainedRow], vocab_size: int,
                 previous_tokens: Callable[[], list[int]] | None, stats: GrammarStats, batch: MatcherBatch,
                 meanwhile: Callable[[], None] | None = None) -> None:
        self.rows = rows
        self.width = (vocab_size + 31) // 32
        self.previous_tokens = previous_tokens
        self.stats = stats
        self.batch = batch
        self.meanwhile = meanwhile
        self.mask: TokenBitmask | None = None  # what the call computed (the rows the sampler was held to)
        self._row_index: dict[int, int] | None = None

    def allowed(self, row: int, token_id: int) -> bool:
        """Whether the mask this step computed let row ``row`` (of the step's sampled rows) take ``token_id``:
        False when the row was constrained and its bit is clear, which happens only where no allowed token was
        left to sample (a dead end: the grammar allowed none, or none the request's other bans left)."""
        mask = self.mask
        if mask is None:
            return True
        if self._row_index is None:
            self._row_index = {r: i for i, r in enumerate(mask.rows)}
        index = self._row_index.get(row)
        if index is None or not 0 <= token_id < mask.words.shape[1] * 32:
            return index is None
        return bool((int(mask.words[index, token_id // 32]) >> (token_id % 32)) & 1)

    def __call__(self) -> TokenBitmask | None:
        previous: list[int] | None = None
        single: list[SequenceMatcher] = []
        single_tokens: list[int] = []
        behind: list[tuple[SequenceMatcher, list[int]]] = []
        for entry in self.rows:  # what each matcher has to take, read before ``meanwhile`` appends tokens
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
            elif backlog:  # several tokens behind (rare): taken one by one
                behind.append((grammar, backlog))
        job = self.batch.worker.submit(self._take_and_fill, single, single_tokens, behind)
        if self.meanwhile is not None:
            self.meanwhile()
        return job.result()

    def _take_and_fill(self, single: list[SequenceMatcher], single_tokens: list[int],
                       behind: list[tuple[SequenceMatcher, list[int]]]) -> TokenBitmask | None:
        start = time.perf_counter()
        for grammar, tokens in behind:
            for token in tokens:
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
        self.mask = TokenBitmask([entry.row for entry in active], words)
        return self.mask
