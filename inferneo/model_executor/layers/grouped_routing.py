"""DeepSeek's routers: top-k over experts limited to the best groups of experts.

Both take the router logits ``[T, E]`` (float32) and return the chosen experts' weights ``[T, k]`` (float32) and
ids ``[T, k]``, the experts split into ``num_groups`` equal groups of which each token may use ``topk_groups``:

- :func:`softmax_grouped_topk` (DeepSeek-V2): softmax scores; ``topk_method`` "greedy" is the plain top-k, and
  "group_limited_greedy" first keeps the groups with the highest maximum score.
- :func:`sigmoid_grouped_topk` (DeepSeek-V3, "noaux_tc"): sigmoid scores plus a learned correction bias choose the
  experts (a group scores the sum of its two best corrected scores); the weights are the uncorrected scores,
  optionally renormalised over the chosen experts.

Both multiply the weights by ``routed_scaling_factor``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class RoutedExperts:
    """The experts each token goes to: ``weights`` ``[T, k]`` float32 and ``ids`` ``[T, k]`` int64."""

    weights: torch.Tensor
    ids: torch.Tensor


def _best_groups_mask(group_scores: torch.Tensor, topk_groups: int, num_experts: int) -> torch.Tensor:
    """``[T, E]`` bool: the experts of each token's ``topk_groups`` best groups (by ``group_scores`` ``[T, G]``)."""
    num_groups = group_scores.shape[-1]
    chosen = torch.topk(group_scores, k=topk_groups, dim=-1, sorted=False).indices
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
    return mask.unsqueeze(-1).expand(-1, num_groups, num_experts // num_groups).reshape(-1, num_experts)


def softmax_grouped_topk(logits: torch.Tensor, top_k: int, *, topk_method: str = "greedy", num_groups: int = 1,
                         topk_groups: int = 1, routed_scaling_factor: float = 1.0) -> RoutedExperts:
    """DeepSeek-V2 routing: softmax over all experts, then the ``top_k`` best, within the ``topk_groups`` groups of
    highest maximum score for ``topk_method`` "group_limited_greedy" (experts of other groups score 0)."""
    scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    if topk_method == "group_limited_greedy":
        num_experts = scores.shape[-1]
        group_scores = scores.view(-1, num_groups, num_experts // num_groups).amax(dim=-1)
        scores = scores.masked_fill(~_best_groups_mask(group_scores, topk_groups, num_experts), 0.0)
    elif topk_method != "greedy":
        raise ValueError(f"unsupported topk_method {topk_method!r}; supported: greedy, group_limited_greedy")
    weights, ids = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    return RoutedExperts(weights * routed_scaling_factor, ids)


def sigmoid_grouped_topk(logits: torch.Tensor, top_k: int, correction_bias: torch.Tensor, *, num_groups: int = 1,
                         topk_groups: int = 1, renormalize: bool = True,
                         routed_scaling_factor: float = 1.0) -> RoutedExperts:
    """DeepSeek-V3 routing ("noaux_tc"): experts chosen by ``sigmoid(logits) + correction_bias`` within the
    ``topk_groups`` groups whose two best corrected scores sum highest; weighted by the uncorrected sigmoid scores
    (divided by their sum when ``renormalize``)."""
    scores = logits.float().sigmoid()
    corrected = scores + correction_bias.float()
    num_experts = scores.shape[-1]
    group_scores = corrected.view(-1, num_groups, num_experts // num_groups).topk(2, dim=-1).values.sum(dim=-1)
    corrected = corrected.masked_fill(~_best_groups_mask(group_scores, topk_groups, num_experts), float("-inf"))
    ids = torch.topk(corrected, k=top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return RoutedExperts(weights * routed_scaling_factor, ids)
