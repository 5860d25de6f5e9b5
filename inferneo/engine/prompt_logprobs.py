"""The core's side of prompt log-probabilities (``SamplingParams.prompt_logprobs``): which positions each step
scores, and the rows collected over the prompt's chunks until they go out with the request's first output.

Row ``i`` scores prompt token ``i + 1`` with the logits at position ``i``, so a prompt of ``P`` tokens has
``P - 1`` rows; the last prompt position's logits sample the first output token as usual. The rows are computed
on the device by the runner (``inferneo.worker.prompt_logprobs``) in the steps that run those positions, so a
prompt split over several chunks (chunked prefill) is scored chunk by chunk.

Prefix caching: a request that asks for prompt log-probabilities does not take cached blocks (the KV cache keeps
keys and values, not logits), so its whole prompt is computed, as vLLM does; its blocks still join the cache for
later requests. After a preemption the prompt is computed again, but positions already scored are not scored
twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from inferneo.engine.protocol import PromptLogprobs
from inferneo.worker.prompt_logprobs import PromptLogprobSpan


@dataclass(slots=True)
class PromptLogprobsCollector:
    """The prompt log-probabilities of one request, filled step by step."""

    num_prompt_tokens: int
    num_top: int
    rows: PromptLogprobs = field(default_factory=lambda: PromptLogprobs([], [], []))
    num_scheduled: int = 0  # rows asked of steps so far (some may still be in flight)
    sent: bool = False

    @property
    def num_rows(self) -> int:
        return max(self.num_prompt_tokens - 1, 0)

    def span(self, num_computed: int, num_new: int) -> PromptLogprobSpan | None:
        """The positions a step running ``num_new`` tokens after ``num_computed`` scores (None: none), counted
        as asked for."""
        start = max(num_computed, self.num_scheduled)
        end = min(num_computed + num_new, self.num_rows)
        if end <= start:
            return None
        self.num_scheduled = end
        return PromptLogprobSpan(start, end - start, self.num_top)

    def add(self, scores: PromptLogprobs, first: int, count: int) -> None:
        """Take rows ``first .. first + count`` of a step's scores (their columns cut to this request's top-k)."""
        width = 1 + self.num_top
        self.rows.token_ids.extend(ids[:width] for ids in scores.token_ids[first : first + count])
        self.rows.logprobs.extend(lps[:width] for lps in scores.logprobs[first : first + count])
        self.rows.ranks.extend(scores.ranks[first : first + count])

    def take(self) -> PromptLogprobs | None:
        """All the rows, once every prompt position is scored and they were not sent yet; else None."""
        if self.sent or len(self.rows.ranks) < self.num_rows:
            return None
        self.sent = True
        return self.rows


def collect_step_scores(scored: list[tuple[PromptLogprobsCollector, int]], scores: PromptLogprobs | None) -> None:
    """Hand a step's scored rows to the collectors of the sequences that asked (in the step's order, each with the
    number of rows it asked for)."""
    if not scored:
        return
    assert scores is not None, "a step with prompt log-probability spans returned no scores"
    first = 0
    for collector, count in scored:
        collector.add(scores, first, count)
        first += count
