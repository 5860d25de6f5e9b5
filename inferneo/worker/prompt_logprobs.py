"""Prompt log-probabilities on the device: score the prompt positions a step computes, batched over positions.

A sequence that asked for prompt log-probabilities says, in its :class:`PromptLogprobSpan`, which of the
positions this step runs are to be scored: the logits at position ``p`` give the log-probability of prompt token
``p + 1``. The runner gathers those rows of the hidden states for every such sequence of the step into one index,
and :func:`score_prompt_rows` runs them through the LM head in chunks of :data:`ROWS_PER_CHUNK` rows: a float32
log-softmax, the prompt token's own log-probability, its rank and the top-k alternatives. So at most
``ROWS_PER_CHUNK x vocab`` logits exist at once, whatever the prompt's length; nothing leaves the device until the
step's single copy to the host.

With tensor parallelism every rank runs the same chunks through its shard of the LM head (the logits are
gathered on the driver), so the workers call :func:`score_prompt_rows` on the same rows and get nothing back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

ROWS_PER_CHUNK = 256  # prompt positions whose logits exist at once (ROWS_PER_CHUNK x vocab float32)


@dataclass(slots=True, frozen=True)
class PromptLogprobSpan:
    """The prompt positions of one scheduled sequence to score this step: ``count`` positions from ``start``
    (absolute positions in the sequence, all among the tokens the step runs), each with ``num_top``
    alternatives."""

    start: int
    count: int
    num_top: int


@dataclass(slots=True)
class PromptScores:
    """The scored rows of one step, on the device, in the order of the step's sequences with a span.

    ``token_ids`` / ``logprobs`` are ``[R, 1 + max_k]``: the scored prompt token first, then the step-wide
    top-``max_k`` ids (a sequence that asked for fewer keeps the first columns); ``ranks`` is ``[R]`` (1 = most
    likely).
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    ranks: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.token_ids, self.logprobs, self.ranks]


def gather_prompt_rows(spans: list[tuple[int, int, list[int], PromptLogprobSpan]]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the step's flat hidden states to score and the prompt tokens they score.

    ``spans`` holds, per sequence with a span: the flat row of its first token this step, its first position
    this step, its token ids and the span.
    """
    rows = [np.arange(span.count, dtype=np.int64) + (first_row + span.start - first_position)
            for first_row, first_position, _, span in spans]
    targets = [np.asarray(token_ids[span.start + 1 : span.start + 1 + span.count], dtype=np.int64)
               for _, _, token_ids, span in spans]
    return np.concatenate(rows), np.concatenate(targets)


def score_prompt_rows(compute_logits: Callable[[torch.Tensor], torch.Tensor | None], hidden: torch.Tensor,
                      rows: torch.Tensor, targets: torch.Tensor | None, num_top: int) -> PromptScores | None:
    """Log-probabilities of ``targets`` at the hidden ``rows``, with the top ``num_top`` alternatives.

    ``compute_logits`` is the model's (float32, soft-capped where the model does it); it returns None on
    tensor-parallel workers, which only take part in the LM head's collectives (then None is returned here).
    """
    total = rows.shape[0]
    out: PromptScores | None = None
    for start in range(0, total, ROWS_PER_CHUNK):
        end = min(start + ROWS_PER_CHUNK, total)
        logits = compute_logits(hidden[rows[start:end]])
        if logits is None:
            continue
        if out is None:
            out = PromptScores(torch.empty(total, 1 + num_top, dtype=torch.int64, device=logits.device),
                               torch.empty(total, 1 + num_top, dtype=torch.float32, device=logits.device),
                               torch.empty(total, dtype=torch.int64, device=logits.device))
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        target = targets[start:end].unsqueeze(1)
        target_logprobs = logprobs.gather(1, target)
        out.token_ids[start:end, :1] = target
        out.logprobs[start:end, :1] = target_logprobs
        out.ranks[start:end] = (logprobs > target_logprobs).sum(dim=-1).add_(1)
        if num_top:
            top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)
            out.token_ids[start:end, 1:] = top_ids
            out.logprobs[start:end, 1:] = top_logprobs
    return out
