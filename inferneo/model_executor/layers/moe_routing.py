"""Mixture-of-experts routing: from router logits to each token's experts and their weights.

A :data:`Router` maps router logits ``[T, E]`` to a :class:`RouterOutput` (``weights`` ``[T, k]`` float32 and ``ids``
``[T, k]``). The routing variants are small functions of ``(logits, top_k)`` registered by name in
:data:`ROUTING_FUNCTIONS`; :func:`make_router` binds one to a ``top_k``. Variants that need more than the logits and
``k`` (grouped top-k with a score-correction bias) are callables of their own with the same signature.
"""

from __future__ import annotations

import functools
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


def make_router(routing: str, top_k: int) -> Router:
    """The routing variant named ``routing`` (a key of :data:`ROUTING_FUNCTIONS`) with ``top_k`` bound."""
    if routing not in ROUTING_FUNCTIONS:
        raise ValueError(f"unknown mixture-of-experts routing {routing!r}; supported: {sorted(ROUTING_FUNCTIONS)}")
    return functools.partial(ROUTING_FUNCTIONS[routing], top_k=top_k)
