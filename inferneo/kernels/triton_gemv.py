"""Matrix-vector products for one-token decode steps on the GPU, in Triton.

At batch 1 a linear layer reads its whole weight to produce one row, so its time is the weight's bytes over the
memory bandwidth. cuBLAS reaches that for wide layers; for the narrower ones (a 4096 x 4096 output projection,
the 4096-row down projection) it picks split-K plans that read more slowly and add a reduction kernel. This kernel
gives each program ``BLOCK_N`` output features and streams their weight rows once, accumulating in float32 as
cuBLAS does. Only single-row inputs take it (``gemv_applies``); everything else stays with cuBLAS.

Measured on an H100 (``benchmarks/gpu/decode_sweep.py``, 2026-11-27): with one output feature per program and
1,024-wide K tiles it beats cuBLAS on all of Llama-2-7B's layers at one row: 33 vs 36 us (q/k/v), 13 vs 15 (output
projection), 58 vs 68 (gate/up), 33 vs 35 (down), 84 vs 97 (LM head).

Shapes tuned since take their own tiles from ``gemv_configs.json`` beside this file (:func:`gemv_config`): a map from
``"N,K"`` to ``{"block_n", "block_k", "num_warps"}``, written by ``benchmarks/gpu/moe_decode_sweep.py``; the rest
take :data:`DEFAULT_CONFIG`.

With LoRA adapters both kernels add a one-token step's LoRA delta in their epilogue, before the rounding to the
output dtype (before the SiLU for the gated MLP), from the low-rank vector ``kernels.triton_lora.lora_shrink_row``
computed (``lora=``; see that module).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from inferneo.kernels._pdl import launch_options, pdl_for, wait_for_previous_kernel
from inferneo.kernels._triton_elementwise import weighted_rms_norm
from inferneo.kernels.triton_lora import RowLoRA, lora_epilogue_args, lora_row_delta


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, stride_wn, lp_ptr, lb_ptr, seg_ptr, stride_ls, stride_ln, lora_r,
                 K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PDL: tl.constexpr, LORA: tl.constexpr, NUM_SLOTS: tl.constexpr, SPLIT: tl.constexpr,
                 BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_SPLIT: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    k = tl.arange(0, BLOCK_K)
    kmask = k < K
    # The first weight tile is read before waiting for the kernel that writes x (weights never change).
    w = tl.load(w_ptr + n[:, None] * stride_wn + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
    wait_for_previous_kernel(PDL, EARLY=True)  # what follows reads only weights before its own wait
    x = tl.load(x_ptr + k, mask=kmask, other=0.0).to(tl.float32)
    acc = w.to(tl.float32) * x[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):  # K is a constant: one compiled kernel per layer width
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        x = tl.load(x_ptr + k, mask=kmask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + n[:, None] * stride_wn + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)
    if LORA:  # the projection's output rounded, then the delta added, as the separate expand kernel does
        y = y.to(out_ptr.dtype.element_ty).to(tl.float32) + lora_row_delta(
            n, nmask, lp_ptr, lb_ptr, seg_ptr, stride_ls, stride_ln, lora_r, NUM_SLOTS, SPLIT, BLOCK_S, BLOCK_R,
            BLOCK_SPLIT)
    tl.store(out_ptr + n, y.to(out_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _gemv_silu_mul_kernel(x_ptr, w_ptr, out_ptr, D, stride_wn, lp_ptr, lb_ptr, seg_ptr, stride_ls, stride_ln, lora_r,
                          K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                          LORA: tl.constexpr, NUM_SLOTS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_SPLIT: tl.constexpr):
    # Output j of the gated MLP: rows j (gate) and D + j (up) of the fused gate/up weight, then silu(gate) * up.
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < D
    k = tl.arange(0, BLOCK_K)
    kmask = k < K
    wmask = nmask[:, None] & kmask[None, :]
    gate_rows = w_ptr + n[:, None] * stride_wn
    up_rows = w_ptr + (n + D)[:, None] * stride_wn
    wg = tl.load(gate_rows + k[None, :], mask=wmask, other=0.0)  # weights: read before the wait, as above
    wu = tl.load(up_rows + k[None, :], mask=wmask, other=0.0)
    wait_for_previous_kernel(PDL)
    x = tl.load(x_ptr + k, mask=kmask, other=0.0).to(tl.float32)
    acc_g = wg.to(tl.float32) * x[None, :]
    acc_u = wu.to(tl.float32) * x[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        wmask = nmask[:, None] & kmask[None, :]
        x = tl.load(x_ptr + k, mask=kmask, other=0.0).to(tl.float32)
        wg = tl.load(gate_rows + k[None, :], mask=wmask, other=0.0)
        wu = tl.load(up_rows + k[None, :], mask=wmask, other=0.0)
        acc_g += wg.to(tl.float32) * x[None, :]
        acc_u += wu.to(tl.float32) * x[None, :]
    dtype = out_ptr.dtype.element_ty
    # Rounded where the unfused path rounds: each projection's output, SiLU's output, the product.
    gate = tl.sum(acc_g, axis=1).to(dtype).to(tl.float32)
    up = tl.sum(acc_u, axis=1).to(dtype).to(tl.float32)
    if LORA:  # gate and up rows get their deltas before the activation, rounded as the unfused path rounds
        gate = (gate + lora_row_delta(n, nmask, lp_ptr, lb_ptr, seg_ptr, stride_ls, stride_ln, lora_r, NUM_SLOTS,
                                      SPLIT, BLOCK_S, BLOCK_R, BLOCK_SPLIT)).to(dtype).to(tl.float32)
        up = (up + lora_row_delta(n + D, nmask, lp_ptr, lb_ptr, seg_ptr, stride_ls, stride_ln, lora_r, NUM_SLOTS,
                                  SPLIT, BLOCK_S, BLOCK_R, BLOCK_SPLIT)).to(dtype).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + n, (silu * up).to(dtype), mask=nmask)


@triton.jit
def _norm_gemv_kernel(x_ptr, res_ptr, norm_w_ptr, w_ptr, b_ptr, out_ptr, res_out_ptr, normed_ptr, N, stride_wn,
                      n_cols, eps, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_NORMED: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    # Every program normalizes the whole row (as the RMSNorm kernel does: residual add rounded, float32 norm,
    # rounded where RMSNorm rounds), program 0 stores the residual sum (and with STORE_NORMED the normed row), and
    # each program multiplies the normed row by its BLOCK_N weight rows (whole rows in one tile).
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    k = tl.arange(0, BLOCK_H)
    kmask = k < n_cols
    w = tl.load(w_ptr + n[:, None] * stride_wn + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
    wait_for_previous_kernel(PDL, EARLY=True)  # the weight tile above is read before x's writer has finished
    x = tl.load(x_ptr + k, mask=kmask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + k, mask=kmask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)
        if pid == 0:
            tl.store(res_out_ptr + k, x, mask=kmask)
    y = weighted_rms_norm(x, norm_w_ptr, k, kmask, n_cols, eps).to(x.dtype)
    if STORE_NORMED:  # noqa: SIM102 (a compile-time switch around a run-time test)
        if pid == 0:
            tl.store(normed_ptr + k, y, mask=kmask)
    y = y.to(tl.float32)
    acc = tl.sum(w.to(tl.float32) * y[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + n, acc.to(out_ptr.dtype.element_ty), mask=nmask)


NORM_GEMV_CONFIG = (8, 8)  # BLOCK_N, num_warps: rows per program; every program also reads the input row
NORM_GEMV_MAX_COLS = 8192  # whole input rows in one tile up to this width


def norm_gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`norm_gemv` takes ``x`` and ``weight``: :func:`gemv_applies`, a contiguous row, and an
    input row narrow enough for one tile."""
    return gemv_applies(x, weight) and x.is_contiguous() and x.shape[1] <= NORM_GEMV_MAX_COLS


def norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
              weight: torch.Tensor, bias: torch.Tensor | None = None, config: tuple[int, int] | None = None,
              pdl: bool | None = None, store_normed: bool = False):
    """A one-row RMSNorm and the linear layer that reads it, in one launch: ``s = x + residual`` (rounded to the
    model dtype; ``s = x`` without a residual), ``normed = norm_weight * rmsnorm(s)`` rounded as the RMSNorm kernel
    rounds it, and ``normed @ weight.T (+ bias)``. Returns ``(product [1, N], s)``, ``s`` a new tensor (None without a
    residual); with ``store_normed`` ``(product, s, normed)``, ``normed`` [1, K] a new tensor too (for the kernels
    that read the normed row besides this linear: a mixture-of-experts layer's experts beside its router). ``x``
    and ``residual`` are not written. ``config``: ``(BLOCK_N, num_warps)`` (default: the shape's ``"norm N,K"``
    entry of ``gemv_configs.json``, else :data:`NORM_GEMV_CONFIG`)."""
    n, k = weight.shape
    assert x.shape == (1, k) and x.is_contiguous() and (residual is None or residual.is_contiguous())
    block_n, num_warps = config or _tuned_norm_configs().get((n, k), NORM_GEMV_CONFIG)
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    total = torch.empty_like(x) if residual is not None else None
    normed = torch.empty_like(x) if store_normed else None
    pdl = pdl_for(x, pdl)
    _norm_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, residual if residual is not None else x, norm_weight, weight, bias if bias is not None else x, out,
        total if total is not None else out, normed if normed is not None else out, n, weight.stride(0), k, eps,
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, STORE_NORMED=store_normed, BLOCK_N=block_n,
        BLOCK_H=triton.next_power_of_2(k), PDL=pdl, num_warps=num_warps, **launch_options(pdl))
    return (out, total, normed) if store_normed else (out, total)


DEFAULT_CONFIG = (1, 1024, 4)  # BLOCK_N, BLOCK_K, num_warps: the best of the H100 sweep on every layer shape
TUNED_CONFIG_FILE = Path(__file__).with_name("gemv_configs.json")


@functools.cache
def _tuned_configs() -> dict[tuple[int, int], tuple[int, int, int]]:
    if not TUNED_CONFIG_FILE.is_file():
        return {}
    table = json.loads(TUNED_CONFIG_FILE.read_text())
    return {tuple(int(d) for d in shape.split(",")): (int(e["block_n"]), int(e["block_k"]), int(e["num_warps"]))
            for shape, e in table.items() if not shape.startswith(NORM_KEY)}


NORM_KEY = "norm "


@functools.cache
def _tuned_norm_configs() -> dict[tuple[int, int], tuple[int, int]]:
    """:func:`norm_gemv`'s tuned ``(BLOCK_N, num_warps)`` per ``[n, k]`` weight: the file's ``"norm N,K"`` keys."""
    if not TUNED_CONFIG_FILE.is_file():
        return {}
    table = json.loads(TUNED_CONFIG_FILE.read_text())
    return {tuple(int(d) for d in shape.removeprefix(NORM_KEY).split(",")): (int(e["block_n"]), int(e["num_warps"]))
            for shape, e in table.items() if shape.startswith(NORM_KEY)}


def gemv_config(n: int, k: int) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_warps)`` for a ``[n, k]`` weight: its tuned entry, else :data:`DEFAULT_CONFIG`."""
    return _tuned_configs().get((n, k), DEFAULT_CONFIG)


def gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``F.linear(x, weight)`` should go through :func:`gemv`: one CUDA row, half precision."""
    return (x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and weight.stride(1) == 1)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: tuple[int, int, int] | None = None, out: torch.Tensor | None = None,
         pdl: bool | None = None, lora: RowLoRA | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for ``x`` [1, K], ``weight`` [N, K] (rows contiguous); returns [1, N] (``out``
    when given: a contiguous [1, N] tensor of ``x``'s dtype). ``pdl``: launch with programmatic dependent launch
    (None: decided from ``x``, see ``_pdl.pdl_for``). ``lora``: add the token's LoRA delta (``lora_shrink_row``,
    launched just before)."""
    n, k = weight.shape
    block_n, block_k, num_warps = config or gemv_config(n, k)
    x = x.contiguous()
    if out is None:
        out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    assert out.shape == (1, n) and out.is_contiguous() and out.dtype == x.dtype, "gemv: out must be [1, N]"
    pdl = pdl_for(x, pdl)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else x, out, n, weight.stride(0), K=k,
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl, num_warps=num_warps,
        **lora_epilogue_args(lora, x), **launch_options(pdl))
    return out


def gemv_silu_mul(x: torch.Tensor, weight: torch.Tensor, config: tuple[int, int, int] | None = None,
                  pdl: bool | None = None, lora: RowLoRA | None = None) -> torch.Tensor:
    """``silu(g) * u`` where ``[g, u] = x @ weight.T``, in one kernel: the gated MLP's gate/up projection and its
    activation for ``x`` [1, K] and the fused ``weight`` [2D, K] (gate rows first); returns [1, D], rounded as the
    two separate steps round. ``lora``: the token's LoRA delta is added to ``g`` and ``u`` first (as in
    :func:`gemv`)."""
    n2, k = weight.shape
    assert n2 % 2 == 0, "the fused gate/up weight has an even number of rows"
    d = n2 // 2
    block_n, block_k, num_warps = config or DEFAULT_CONFIG
    x = x.contiguous()
    out = torch.empty((1, d), dtype=x.dtype, device=x.device)
    pdl = pdl_for(x, pdl)
    _gemv_silu_mul_kernel[(triton.cdiv(d, block_n),)](
        x, weight, out, d, weight.stride(0), K=k, BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl, num_warps=num_warps,
        **lora_epilogue_args(lora, x), **launch_options(pdl))
    return out
