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
from inferneo.kernels._triton_elementwise import weighted_rms_norm
from inferneo.model_executor.layers.moe_routing import NamedRouter, Router, RouterOutput

#: The routers this kernel replaces, by name (``moe_routing.ROUTING_FUNCTIONS``), with whether the chosen weights
#: are renormalised to sum to one.
RENORMALIZES = {"softmax_topk": False, "softmax_topk_renormalized": True, "topk_softmax": True}


@triton.jit
def _store_topk(logits, e, valid, weights_ptr, ids_ptr, t, K: tl.constexpr, BLOCK_E: tl.constexpr,
                BLOCK_K: tl.constexpr, RENORMALIZE: tl.constexpr):
    """Token ``t``'s routing from its float32 ``logits`` ``[BLOCK_E]`` (``-inf`` where not ``valid``): the ``K``
    largest softmax probabilities in descending order (ties to the lower id), renormalised with ``RENORMALIZE``."""
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


@triton.jit
def _route_topk_kernel(logits_ptr, weights_ptr, ids_ptr, stride_l, n_experts, K: tl.constexpr,
                       BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, RENORMALIZE: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL, EARLY=True)  # the gate/up experts kernel waits before reading anything
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    valid = e < n_experts
    logits = tl.load(logits_ptr + t * stride_l + e, mask=valid, other=float("-inf")).to(tl.float32)
    _store_topk(logits, e, valid, weights_ptr, ids_ptr, t, K, BLOCK_E, BLOCK_K, RENORMALIZE)


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


# ---- the post-attention RMSNorm, the router GEMV and the top-k in one launch (a few tokens) -------------------------

NORM_ROUTE_MAX_TOKENS = 4
"""Up to this many tokens (the few-token experts path's decode steps) :func:`norm_route_topk` replaces the RMSNorm,
router GEMV and routing launches of a mixture-of-experts layer; more tokens keep the three."""


@triton.jit
def _norm_route_kernel(x_ptr, res_ptr, norm_w_ptr, gate_w_ptr, gate_b_ptr, normed_ptr, res_out_ptr, logits_ptr,
                       tickets_ptr, weights_ptr, ids_ptr, stride_x, stride_r, stride_g, n_cols, n_experts, eps,
                       K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, RENORMALIZE: tl.constexpr, PDL: tl.constexpr):
    # Program (t, g): token t's residual sum and RMSNorm (every program computes them; program 0 stores them), then
    # router logits g * ROWS ... g * ROWS + ROWS - 1, rounded to the model dtype as the router linear's output is.
    # The last program of the token to finish (an atomic ticket) reads all the logits back and does the top-k.
    t = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    rows = g * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_experts
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < n_cols
    # The router weight rows are read before waiting for the kernel that writes x (weights never change).
    w = tl.load(gate_w_ptr + rows[:, None] * stride_g + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                other=0.0)
    wait_for_previous_kernel(PDL)
    x = tl.load(x_ptr + t * stride_x + cols, mask=col_ok, other=0.0)
    r = tl.load(res_ptr + t * stride_r + cols, mask=col_ok, other=0.0)
    total = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)  # rounded like the PyTorch sum (add_rms_norm_row)
    y = weighted_rms_norm(total, norm_w_ptr, cols, col_ok, n_cols, eps).to(normed_ptr.dtype.element_ty)
    if g == 0:
        tl.store(res_out_ptr + t * n_cols + cols, total, mask=col_ok)
        tl.store(normed_ptr + t * n_cols + cols, y, mask=col_ok)
    logit = tl.sum(w.to(tl.float32) * y.to(tl.float32)[None, :], axis=1)
    if HAS_BIAS:
        logit += tl.load(gate_b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(logits_ptr + t * n_experts + rows, logit.to(logits_ptr.dtype.element_ty), mask=row_ok)
    tl.debug_barrier()  # every thread's logits stored before the ticket is taken (release)
    ticket = tl.atomic_add(tickets_ptr + t, 1, sem="acq_rel")
    if ticket == tl.num_programs(1) - 1:  # the others have all stored theirs
        tl.store(tickets_ptr + t, 0)  # ready for the next launch (CUDA-graph replays included)
        e = tl.arange(0, BLOCK_E)
        valid = e < n_experts
        logits = tl.load(logits_ptr + t * n_experts + e, mask=valid, other=float("-inf"), volatile=True)
        _store_topk(logits.to(tl.float32), e, valid, weights_ptr, ids_ptr, t, K, BLOCK_E, BLOCK_K, RENORMALIZE)


def norm_route_rows(n_experts: int) -> int:
    """Router rows per program of :func:`norm_route_topk`: about 32 programs per token."""
    return max(1, triton.next_power_of_2(n_experts) // 32)


def norm_route_topk(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                    gate_weight: torch.Tensor, gate_bias: torch.Tensor | None, tickets: torch.Tensor, top_k: int, *,
                    renormalize: bool, rows: int | None = None,
                    pdl: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, RouterOutput]:
    """A mixture-of-experts layer's input and routing in one launch, for ``x`` and ``residual`` ``[T, H]`` (a few
    tokens): ``s = x + residual`` (rounded to the model dtype), ``normed = norm_weight * rmsnorm(s)`` as the
    RMSNorm kernel computes them, the router logits ``normed @ gate_weight.T (+ gate_bias)`` rounded to the model
    dtype, and :func:`route_topk` of them. Returns ``(normed, s, routing)``, new tensors (``x`` and ``residual`` are
    not written). ``tickets``: an int32 device tensor of at least ``T`` zeros that the kernel leaves at zero (one per
    layer, kept across calls: CUDA graphs replay it). ``rows``: router rows per program (default
    :func:`norm_route_rows`)."""
    n_tokens, n_cols = x.shape
    n_experts = gate_weight.shape[0]
    assert x.stride(-1) == 1 and residual.stride(-1) == 1 and gate_weight.stride(-1) == 1
    assert tickets.dtype == torch.int32 and tickets.numel() >= n_tokens
    normed = torch.empty(n_tokens, n_cols, dtype=x.dtype, device=x.device)
    total = torch.empty(n_tokens, n_cols, dtype=residual.dtype, device=x.device)
    logits = torch.empty(n_tokens, n_experts, dtype=x.dtype, device=x.device)
    weights = torch.empty(n_tokens, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(n_tokens, top_k, dtype=torch.int64, device=x.device)
    if n_tokens:
        rows = rows or norm_route_rows(n_experts)
        block_h = triton.next_power_of_2(n_cols)
        pdl = pdl_for(x, pdl)
        _norm_route_kernel[(n_tokens, triton.cdiv(n_experts, rows))](
            x, residual, norm_weight, gate_weight, gate_bias if gate_bias is not None else gate_weight, normed, total,
            logits, tickets, weights, ids, x.stride(0), residual.stride(0), gate_weight.stride(0), n_cols, n_experts,
            eps, K=top_k, HAS_BIAS=gate_bias is not None, BLOCK_H=block_h, ROWS=rows,
            BLOCK_E=triton.next_power_of_2(n_experts), BLOCK_K=triton.next_power_of_2(top_k),
            RENORMALIZE=renormalize, PDL=pdl, num_warps=min(max(block_h // 256, 1), 8), **launch_options(pdl))
    return normed, total, RouterOutput(weights=weights, ids=ids)


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


class NormRouter:
    """A mixture-of-experts layer's post-attention RMSNorm, router linear and :class:`TritonRouter` routing as one
    launch (:func:`norm_route_topk`) for up to :data:`NORM_ROUTE_MAX_TOKENS` tokens; holds the layer's tickets."""

    def __init__(self, router: TritonRouter, device: torch.device) -> None:
        self.router = router
        self.tickets = torch.zeros(NORM_ROUTE_MAX_TOKENS, dtype=torch.int32, device=device)

    def applies(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        """A few tokens ``[T, H]`` with contiguous rows."""
        return (x.dim() == 2 and 0 < x.shape[0] <= NORM_ROUTE_MAX_TOKENS and residual.shape == x.shape
                and x.stride(-1) == 1 and residual.stride(-1) == 1)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                 gate_weight: torch.Tensor, gate_bias: torch.Tensor | None):
        """``(normed, residual + x, routing)``: see :func:`norm_route_topk`."""
        return norm_route_topk(x, residual, norm_weight, eps, gate_weight, gate_bias, self.tickets, self.router.top_k,
                               renormalize=self.router.renormalize, pdl=self.router.pdl)
