"""The arithmetic of pooling, split across chunked prefill.

The runner reduces each pooling sequence's rows of one step to a *partial* (:func:`pool_step`): the sum of its
rows for mean pooling, its first position's row for cls, its last position's row for last-token pooling (None
when this chunk holds no such position). The core folds the partials of successive chunks into the request
(:func:`fold_partial`) and, once the prompt is computed, turns the result into the embedding
(:func:`finish_embedding`): mean divides by the token count, then ``dimensions`` truncates and the vector is
L2-normalised when the model normalises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inferneo.pooling.config import PoolingMethod


@dataclass(slots=True, frozen=True)
class PoolingRow:
    """One pooling sequence of a step, as the runner sees it: its method, the first of its rows in the step's
    hidden states, how many rows it has, the position of the first one, and the prompt's length."""

    method: PoolingMethod
    row: int
    num_rows: int
    start: int
    num_tokens: int


def pool_step(hidden: torch.Tensor, rows: list[PoolingRow]) -> list[torch.Tensor | None]:
    """Each sequence's partial (float32, on ``hidden``'s device), in ``rows``' order."""
    partials: list[torch.Tensor | None] = []
    for r in rows:
        if r.method == "mean":
            partials.append(hidden[r.row : r.row + r.num_rows].float().sum(0))
        elif r.method == "cls":
            partials.append(hidden[r.row].float() if r.start == 0 else None)
        else:
            ends = r.start + r.num_rows == r.num_tokens
            partials.append(hidden[r.row + r.num_rows - 1].float() if ends else None)
    return partials


def apply_head(head, partials: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """``partials`` with each present one put through ``head`` (a cross-encoder's classifier, rows ``[n, hidden]``
    to float32 logits ``[n, labels]``), in one call."""
    present = [p for p in partials if p is not None]
    if not present:
        return partials
    rows = iter(head(torch.stack(present)))
    return [None if p is None else next(rows) for p in partials]


def fold_partial(method: PoolingMethod, state: torch.Tensor | None, partial: torch.Tensor | None,
                 chunk_start: int) -> torch.Tensor | None:
    """The request's pooled state after one more chunk. A chunk starting at position 0 starts afresh (a request
    recomputed after preemption runs its prompt again)."""
    if method == "mean":
        return partial if chunk_start == 0 or state is None else state + partial
    return partial if partial is not None else (None if chunk_start == 0 else state)


def finish_embedding(method: PoolingMethod, state: torch.Tensor, num_tokens: int, normalize: bool,
                     dimensions: int | None) -> list[float]:
    """The embedding of a fully computed prompt from its pooled state."""
    vector = state / num_tokens if method == "mean" else state
    if dimensions is not None:
        vector = vector[:dimensions]
    if normalize:
        vector = torch.nn.functional.normalize(vector, dim=0)
    return vector.tolist()
