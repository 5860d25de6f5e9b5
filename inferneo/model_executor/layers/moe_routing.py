"""Mixture-of-experts routing: from router logits to each token's experts and their weights.

A :data:`Router` maps router logits ``[T, E]`` to a :class:`RouterOutput` (``weights`` ``[T, k]`` float32 and ``ids``
``[T, k]``). The routing variants are small functions of ``(logits, top_k)`` registered by name in
:data:`ROUTING_FUNCTIONS`; :func:`make_router` binds one to a ``top_k`` (a :class:`NamedRouter`). Variants that need more than the logits and
``k`` (DeepSeek's grouped top-k: :func:`softmax_grouped_topk`, :func:`sigmoid_grouped_topk` with its score-correction
bias) are functions with keyword options that a model binds into a :data:`Router`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class RouterOutput:
    """The experts chosen for every token: ``weights`` ``[T, k]`` (float32) and expert ``ids`` ``[T, k]`` (int64)."""

    weights: torch.Tensor
    ids: torch.Tensor


Router = Callable[[torch.Tensor], RouterOutput]
"""Router logits ``[T, E]`` to the chosen experts and their weights."""

RoutingFunction = Callable[[torch.Tensor, int], RouterOutput]
"""A routing variant before its ``top_k`` is bound: ``(logits [T, E], top_k) -> RouterOutput``."""


def softmax_topk(router_logits: torch.Tensor, top_k: int) -> RouterOutput:
    """Softmax over all experts (float32), then the ``top_k`` largest probabilities as the weights.

    The weights are not renormalised (Qwen2-MoE / Qwen3-MoE with ``norm_topk_prob`` false).
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    return RouterOutput(weights=weights, ids=ids)


def softmax_topk_renormalized(router_logits: torch.Tensor, top_k: int) -> RouterOutput:
    """As :func:`softmax_topk`, with each token's ``top_k`` weights divided by their sum (Mixtral, and Qwen-MoE with
    ``norm_topk_prob`` true)."""
    routed = softmax_topk(router_logits, top_k)
    return RouterOutput(weights=routed.weights / routed.weights.sum(dim=-1, keepdim=True), ids=routed.ids)


def topk_softmax(router_logits: torch.Tensor, top_k: int) -> RouterOutput:
    """The ``top_k`` largest logits, then a softmax over just those (gpt-oss)."""
    logits, ids = torch.topk(router_logits, top_k, dim=-1)
    return RouterOutput(weights=torch.softmax(logits, dim=-1, dtype=torch.float32), ids=ids)


ROUTING_FUNCTIONS: dict[str, RoutingFunction] = {
    "softmax_topk": softmax_topk,
    "softmax_topk_renormalized": softmax_topk_renormalized,
    "topk_softmax": topk_softmax,
}


@dataclass(frozen=True, slots=True)
class NamedRouter:
    """A :data:`Router`: the routing variant ``routing`` (a key of :data:`ROUTING_FUNCTIONS`) with ``top_k`` bound.
    The name lets a device kernel recognise the variants it computes (``kernels/triton_routing.py``)."""

    routing: str
    top_k: int

    def __call__(self, router_logits: torch.Tensor) -> RouterOutput:
        return ROUTING_FUNCTIONS[self.routing](router_logits, self.top_k)


def make_router(routing: str, top_k: int) -> NamedRouter:
    """The routing variant named ``routing`` (a key of :data:`ROUTING_FUNCTIONS`) with ``top_k`` bound."""
    if routing not in ROUTING_FUNCTIONS:
        raise ValueError(f"unknown mixture-of-experts routing {routing!r}; supported: {sorted(ROUTING_FUNCTIONS)}")
    return NamedRouter(routing, top_k)


# ---- DeepSeek: top-k limited to the best groups of experts -------------------------------------------------------
# The experts split into ``num_groups`` equal groups, of which each token may use ``topk_groups``. These take more
# than ``(logits, top_k)``: a model binds their options (and, for V3, reads its correction bias) into a Router.


def _best_groups_mask(group_scores: torch.Tensor, topk_groups: int, num_experts: int) -> torch.Tensor:
    """``[T, E]`` bool: the experts of each token's ``topk_groups`` best groups (by ``group_scores`` ``[T, G]``)."""
    num_groups = group_scores.shape[-1]
    chosen = torch.topk(group_scores, k=topk_groups, dim=-1, sorted=False).indices
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
    return mask.unsqueeze(-1).expand(-1, num_groups, num_experts // num_groups).reshape(-1, num_experts)


def softmax_grouped_topk(logits: torch.Tensor, top_k: int, *, topk_method: str = "greedy", num_groups: int = 1,
                         topk_groups: int = 1, routed_scaling_factor: float = 1.0) -> RouterOutput:
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
    return RouterOutput(weights * routed_scaling_factor, ids)


def sigmoid_grouped_topk(logits: torch.Tensor, top_k: int, correction_bias: torch.Tensor, *, num_groups: int = 1,
                         topk_groups: int = 1, renormalize: bool = True,
                         routed_scaling_factor: float = 1.0) -> RouterOutput:
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
    return RouterOutput(weights * routed_scaling_factor, ids)
