"""Mixture-of-experts routing of a few tokens as one Triton kernel (imported only where Triton is installed).

The PyTorch routers (``layers/moe_routing.py``) take four or five kernels per layer (softmax, top-k, the
renormalising sum and division); a batch-1 decode step pays each launch 48 times. :func:`route_topk` does the
softmax over the ``E`` router logits of a token, the ``k`` largest probabilities (in descending order; ties to the
lower expert id, as ``torch.topk`` gives them) and, with ``renormalize``, their division by their sum, in one
program per token. Top-k-then-softmax (gpt-oss) is the same computation as softmax-then-renormalised-top-k (both
are ``exp(l_i - max) / sum over the chosen j of exp(l_j - max)``), so one flag covers the three plain routers.
Shapes only decide the launch: it is CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inferneo.kernels._pdl import launch_options, pdl_for, wait_for_previous_kernel
from inferneo.model_executor.layers.moe_routing import NamedRouter, Router, RouterOutput

#: The routers this kernel replaces, by name (``moe_routing.ROUTING_FUNCTIONS``), with whether the chosen weights
#: are renormalised to sum to one.
RENORMALIZES = {"softmax_topk": False, "softmax_topk_renormalized": True, "topk_softmax": True}


@triton.jit
def _route_topk_kernel(logits_ptr, weights_ptr, ids_ptr, stride_l, n_experts, K: tl.constexpr,
                       BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, RENORMALIZE: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    valid = e < n_experts
    logits = tl.load(logits_ptr + t * stride_l + e, mask=valid, other=float("-inf")).to(tl.float32)
    exps = tl.exp(logits - tl.max(logits, axis=0))
    probs = exps / tl.sum(exps, axis=0)
    remaining = tl.where(valid, probs, -1.0)  # probabilities are >= 0: padding is never chosen
    slot = tl.arange(0, BLOCK_K)
    weights = tl.zeros([BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_K], dtype=tl.int64)
    for i in tl.static_range(K):
        best = tl.max(remaining, axis=0)
        chosen = tl.min(tl.where(remaining == best, e, BLOCK_E), axis=0)  # the lowest id among equals
        weights = tl.where(slot == i, tl.sum(tl.where(e == chosen, probs, 0.0), axis=0), weights)
        ids = tl.where(slot == i, chosen.to(tl.int64), ids)
        remaining = tl.where(e == chosen, -2.0, remaining)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, axis=0)
    out = slot < K
    tl.store(weights_ptr + t * K + slot, weights, mask=out)
    tl.store(ids_ptr + t * K + slot, ids, mask=out)


def route_topk(logits: torch.Tensor, top_k: int, *, renormalize: bool, pdl: bool | None = None) -> RouterOutput:
    """The ``top_k`` experts of each row of router ``logits`` ``[T, E]`` by softmax probability (descending) and
    their probabilities, divided by their sum when ``renormalize``: ``weights`` float32 and ``ids`` int64
    ``[T, top_k]``, as the PyTorch routers give them."""
    assert logits.dim() == 2 and logits.stride(-1) == 1
    n_tokens, n_experts = logits.shape
    weights = torch.empty(n_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(n_tokens, top_k, dtype=torch.int64, device=logits.device)
    if n_tokens:
        block = triton.next_power_of_2(n_experts)
        pdl = pdl_for(logits, pdl)
        _route_topk_kernel[(n_tokens,)](logits, weights, ids, logits.stride(0), n_experts, K=top_k,
                                        BLOCK_E=block, BLOCK_K=triton.next_power_of_2(top_k),
                                        RENORMALIZE=renormalize, PDL=pdl, num_warps=1 if block <= 256 else 4,
                                        **launch_options(pdl))
    return RouterOutput(weights=weights, ids=ids)


class TritonRouter:
    """A :data:`~inferneo.model_executor.layers.moe_routing.Router` through :func:`route_topk`, for one of the
    plain routers of :data:`RENORMALIZES`."""

    def __init__(self, top_k: int, renormalize: bool, pdl: bool) -> None:
        self.top_k, self.renormalize, self.pdl = top_k, renormalize, pdl

    def __call__(self, logits: torch.Tensor) -> RouterOutput:
        return route_topk(logits, self.top_k, renormalize=self.renormalize, pdl=self.pdl)

    def __repr__(self) -> str:
        return f"TritonRouter(top_k={self.top_k}, renormalize={self.renormalize})"


def triton_router_for(router: Router, pdl: bool) -> TritonRouter | None:
    """The kernel's replacement for ``router`` when it is one of the plain named routers (``make_router``); None
    for any other (DeepSeek's grouped routers stay PyTorch)."""
    if not isinstance(router, NamedRouter) or router.routing not in RENORMALIZES:
        return None
    return TritonRouter(router.top_k, RENORMALIZES[router.routing], pdl)
