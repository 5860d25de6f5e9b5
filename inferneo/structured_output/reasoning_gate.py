"""A constraint that waits for a reasoning model to finish thinking.

A reasoning model (Qwen3, DeepSeek-R1) writes ``<think> ... </think>`` before its answer. A JSON schema, regex or
forced tool call constrains the answer, not the thinking: :class:`ReasoningGate` wraps a sequence's matcher and
leaves every token free until the thinking's closing token has been sampled, then hands the sequence to the
matcher. Where the prompt leaves no block open, the first token may open one (or begin the constrained answer).
"""

from __future__ import annotations

import enum

import torch

from inferneo.sampling_params import ReasoningSpan
from inferneo.structured_output.compiler import SequenceMatcher


class _Phase(enum.Enum):
    MAY_OPEN = "may_open"  # the first token: the thinking's start token, or the answer's first
    THINKING = "thinking"  # every token allowed until the end token
    ANSWER = "answer"  # the wrapped matcher decides


class ReasoningGate(SequenceMatcher):
    """``inner`` (a sequence's matcher) applied only after the thinking that ``span`` describes."""

    def __init__(self, inner: SequenceMatcher, span: ReasoningSpan) -> None:
        super().__init__()
        self.inner = inner
        self.span = span
        if span.open_at_start:
            self.phase = _Phase.THINKING
        else:
            self.phase = _Phase.MAY_OPEN if span.start_token_id is not None else _Phase.ANSWER

    @property
    def thinking(self) -> bool:
        """Whether the sequence is still inside its thinking (or may yet open it)."""
        return self.phase is not _Phase.ANSWER

    def accept_token(self, token_id: int) -> None:
        """Take the sequence's next output token."""
        self.num_accepted += 1
        self.take(token_id)

    def take(self, token_id: int) -> None:
        """Take a token (not counted: :meth:`accept_token` and the batch count)."""
        if self.phase is _Phase.THINKING:
            if token_id == self.span.end_token_id:
                self.phase = _Phase.ANSWER
        elif self.phase is _Phase.MAY_OPEN and token_id == self.span.start_token_id:
            self.phase = _Phase.THINKING
        else:
            self.phase = _Phase.ANSWER
            self.inner.accept_token(token_id)

    @property
    def constrains(self) -> bool:
        """Whether the sequence takes tokens and fills a row: while thinking (a row of every token), then as long
        as the wrapped matcher does."""
        return self.thinking or self.inner.constrains

    @property
    def in_force(self) -> bool:
        """Whether the constraint decides the sequence's tokens now: not inside the thinking (at a first token that
        may open it, the matcher decides every other token)."""
        return self.phase is not _Phase.THINKING and self.inner.in_force

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]``: all of them while thinking; the wrapped matcher's
        (plus the start token) at a first token that may open the thinking; the wrapped matcher's after it."""
        if self.phase is _Phase.THINKING:
            bitmask[row] = -1
            return
        self.inner.fill(bitmask, row)
        if self.phase is _Phase.MAY_OPEN:
            start = self.span.start_token_id
            if start // 32 < bitmask.shape[1]:
                word = bitmask[row, start // 32].item() | (1 << (start % 32))
                bitmask[row, start // 32] = word - (1 << 32) if word >= 1 << 31 else word
