"""Mixture-of-experts: routing functions and a batched-PyTorch expert computation over stacked expert weights.

The experts of a layer live in two stacked tensors, ``w13`` ``[E, 2*I, H]`` (gate rows, then up rows, as one fused
gate/up projection per expert) and ``w2`` ``[E, H, I]`` (the down projections). Routing picks ``top_k`` experts and
their weights for every token; :func:`fused_experts` sorts the (token, expert) pairs by expert, runs each expert's
tokens through it in one matmul chain and scatters the weighted results back with ``index_add_``. The Python loop
runs over the experts that received tokens, never over tokens.

Routing variants are small functions (:data:`ROUTERS`), not copies of the layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, slots=True)
class MoeConfig:
    """The mixture-of-experts values of a decoder config.

    A layer is sparse when it is not in ``mlp_only_layers`` and ``(index + 1) % sparse_step == 0``; the others keep
    the dense MLP. ``shared_expert_intermediate_size`` 0 means no shared expert.
    """

    num_experts: int
    top_k: int
    intermediate_size: int
    renormalize: bool
    shared_expert_intermediate_size: int = 0
    sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def is_sparse(self, layer_index: int) -> bool:
        """Whether layer ``layer_index`` holds experts (else a dense MLP)."""
        return layer_index not in self.mlp_only_layers and (layer_index + 1) % self.sparse_step == 0


def softmax_topk(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts (float32), then the ``top_k`` largest: weights ``[T, k]`` and expert ids ``[T, k]``.

    The weights are the full-softmax probabilities, not renormalised (Qwen2-MoE / Qwen3-MoE with
    ``norm_topk_prob`` false).
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    return torch.topk(probs, top_k, dim=-1)


def softmax_topk_renormalized(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`softmax_topk`, with the ``top_k`` weights of each token divided by their sum (Mixtral, and
    Qwen-MoE with ``norm_topk_prob`` true)."""
    weights, ids = softmax_topk(router_logits, top_k)
    return weights / weights.sum(dim=-1, keepdim=True), ids


Router = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
ROUTERS: dict[str, Router] = {"softmax": softmax_topk, "softmax_renormalized": softmax_topk_renormalized}


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """``sum_k weight[t, k] * expert_{ids[t, k]}(x[t])`` for every token, with SiLU-gated experts.

    ``x`` is ``[T, H]``, ``w13`` ``[E, 2*I, H]``, ``w2`` ``[E, H, I]``, ``topk_weights`` and ``topk_ids`` ``[T, k]``.
    Returns ``[T, H]`` in ``x``'s dtype.
    """
    num_tokens, top_k = topk_ids.shape
    out = torch.zeros_like(x)
    if num_tokens == 0:
        return out
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # (token, slot) pairs grouped by expert
    token_of = order // top_k
    weight_of = topk_weights.reshape(-1)[order].to(x.dtype)
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = token_of[start : start + count]
        gate, up = F.linear(x[rows], w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert])
        out.index_add_(0, rows, y * weight_of[start : start + count, None])
        start += count
    return out


class FusedMoE(nn.Module):
    """A router (gate linear, no bias) and ``num_experts`` SiLU-gated experts as stacked weights.

    ``shared_expert`` (an MLP module) and ``shared_expert_gate`` (a linear to one logit) add Qwen2-MoE's shared
    expert: its output, scaled by the sigmoid of the gate, is added to the routed experts' sum.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, renormalize: bool,
                 shared_expert: nn.Module | None = None, shared_expert_gate: bool = False) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts ({num_experts}); got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.intermediate_size = intermediate_size
        self.router: Router = softmax_topk_renormalized if renormalize else softmax_topk
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.experts.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.shared_expert = shared_expert
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.router(self.gate(x), self.top_k)
        out = fused_experts(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out
