"""A W4A16 GEMM/GEMV in Triton: ``y = x @ W.T`` with ``W`` in Inferneo's canonical int4 layout, de-quantized in
registers (layout: :mod:`inferneo.quantization.int4_layouts`).

One kernel serves every batch size. Each program owns ``BLOCK_N`` output features (``BLOCK_N / 8`` rows of packed
words) and walks K in tiles of ``BLOCK_K`` columns, each tile inside one group. A word holds rows ``8p..8p+7`` of
one column, so the program keeps eight accumulators, one per code position ``j`` (rows ``8p + j``), and splits
codes off with a shift and a mask, never reshuffling them. One row (``GEMV``) computes
``s * (sum(q * x) - z * sum(x))`` per tile in float32; more rows (``BLOCK_M``) de-quantize ``(q - z) * s`` in
float32, round to the activation dtype and go through ``tl.dot`` (float32 activations: IEEE float32 products).
Up to 64 rows, K is split over ``SPLIT_K`` programs per output tile (float32 atomic adds), so that a decode step
keeps every SM streaming weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from inferneo.quantization.int4_layouts import Int4Weights

_MAX_BLOCK_K = 128


def tile_k(group_size: int) -> int:
    """The largest power-of-two K tile (16..128) that divides ``group_size``, or 0 when there is none."""
    bk = _MAX_BLOCK_K
    while bk >= 16:
        if group_size % bk == 0:
            return bk
        bk //= 2
    return 0


def triton_int4_available(group_size: int) -> bool:
    """Whether the kernel runs layers of this group size (a K tile that fits a group)."""
    return tile_k(group_size) > 0


@dataclass(frozen=True, slots=True)
class W4A16Config:
    """One launch: ``BLOCK_M`` rows (1: the GEMV path), ``BLOCK_N`` output features, ``BLOCK_K`` columns per
    step, ``SPLIT_K`` programs along K, ``num_warps``."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4


def choose_config(m: int, n: int, k: int, group_size: int, num_sms: int = 132) -> W4A16Config:
    """A launch configuration for ``[m, k] @ [n, k].T``: the GEMV for one row, ``tl.dot`` tiles otherwise; up to
    64 rows, K is split (at most 4 ways) while there are fewer than four programs per SM and the split keeps whole
    tiles. The one-row choice (32 features, split up to 4) was the fastest measured on an H200 for Llama-2-7B's
    4096-wide layers (``benchmarks/results/2026-12-03-h200-int4-check.jsonl``)."""
    bk = tile_k(group_size)
    if m == 1:
        bm, bn, warps = 1, 32, 4
    elif m <= 16:
        bm, bn, warps = 16, 128, 4
    elif m <= 32:
        bm, bn, warps = 32, 128, 4
    else:
        bm, bn, warps = 64, 128, 8
        bk = min(bk, 64)
    tiles = -(-n // bn) * -(-m // bm)
    split = 1
    while m <= 64 and split < 4 and tiles * split < 4 * num_sms and k % (bk * split * 2) == 0 and k // (bk * split * 2) >= 2:
        split *= 2
    return W4A16Config(bm, bn, bk, split, warps)


@triton.jit
def _gemv_rows(words, j: tl.constexpr, x, x_sum, z_ptr, s_ptr, base, rp, pmask):
    """One row's products for output rows ``8 * rp + j`` over one K tile (inside one group):
    ``s * (sum(q * x) - z * sum(x))``."""
    rows = rp * 8 + j
    z = tl.load(z_ptr + base + rows, mask=pmask, other=0).to(tl.float32)
    s = tl.load(s_ptr + base + rows, mask=pmask, other=0.0)
    q = ((words >> (4 * j)) & 0xF).to(tl.float32)
    return (tl.sum(q * x[None, :], axis=1) - z * x_sum) * s

@triton.jit
def _dot_rows(words, j: tl.constexpr, x, z_ptr, s_ptr, base, rp, pmask, IEEE: tl.constexpr):
    """``x @ W.T`` for output rows ``8 * rp + j`` over one K tile, the weights de-quantized in float32
    (``(q - z) * s``) and rounded to ``x``'s dtype."""
    rows = rp * 8 + j
    z = tl.load(z_ptr + base + rows, mask=pmask, other=0).to(tl.int32)
    s = tl.load(s_ptr + base + rows, mask=pmask, other=0.0)
    w = ((((words >> (4 * j)) & 0xF) - z[:, None]).to(tl.float32) * s[:, None]).to(x.dtype)
    if IEEE:
        return tl.dot(x, tl.trans(w), input_precision="ieee")
    return tl.dot(x, tl.trans(w))

@triton.jit
def _store_rows(y_ptr, acc, j: tl.constexpr, rm, rp, M, N, stride_ym, GEMV: tl.constexpr,
               SPLIT_K: tl.constexpr):
    rows = rp * 8 + j
    if GEMV:
        ptrs = y_ptr + rm * stride_ym + rows
        mask = rows < N
    else:
        ptrs = y_ptr + rm[:, None] * stride_ym + rows[None, :]
        mask = (rm < M)[:, None] & (rows < N)[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask)

@triton.jit
def _w4a16_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                 GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr, GEMV: tl.constexpr, IEEE: tl.constexpr):
    # Each packed word holds rows 8p..8p+7 of one column: the program keeps one accumulator per code position
    # j (rows 8p + j), so codes are split off with shifts alone, never reshuffled.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    P: tl.constexpr = BLOCK_N // 8
    rp = pid_n * P + tl.arange(0, P)
    pmask = rp < N // 8
    k_span = K // SPLIT_K
    k_begin = pid_k * k_span
    if GEMV:
        rm = pid_m
        acc0 = tl.zeros((P,), dtype=tl.float32)
    else:
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        acc0 = tl.zeros((BLOCK_M, P), dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    acc4 = acc0
    acc5 = acc0
    acc6 = acc0
    acc7 = acc0
    for k0 in range(k_begin, k_begin + k_span, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        words = tl.load(qw_ptr + rp[:, None] * K + kk[None, :], mask=pmask[:, None], other=0)
        base = (k0 // GROUP) * N
        if GEMV:
            x = tl.load(x_ptr + rm * stride_xm + kk).to(tl.float32)
            x_sum = tl.sum(x, axis=0)
            acc0 += _gemv_rows(words, 0, x, x_sum, z_ptr, s_ptr, base, rp, pmask)
            acc1 += _gemv_rows(words, 1, x, x_sum, z_ptr, s_ptr, base, rp, pmask)
            acc2 += _gemv_rows(words, 2, x, x_sum, z_ptr, s_ptr, base, rp, pmask)
            acc3 += _gemv_rows(words, 3, x, x_sum, z_ptr, s_ptr, base, rp, pmask)
            acc4 += _gemv_rows(words, 4, x, x_sum, z_ptr, s_ptr, base, rp, pmask)
            acc5 += _gemv_rows(words, 5, x, x_sum, z_ptr, s_ptr, base, rp, pmask)
            acc6 += _gemv_rows(words, 6, x, x_sum, z_ptr, s_ptr, base, rp, pmask)
            acc7 += _gemv_rows(words, 7, x, x_sum, z_ptr, s_ptr, base, rp, pmask)
        else:
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm < M)[:, None], other=0.0)
            acc0 += _dot_rows(words, 0, x, z_ptr, s_ptr, base, rp, pmask, IEEE)
            acc1 += _dot_rows(words, 1, x, z_ptr, s_ptr, base, rp, pmask, IEEE)
            acc2 += _dot_rows(words, 2, x, z_ptr, s_ptr, base, rp, pmask, IEEE)
            acc3 += _dot_rows(words, 3, x, z_ptr, s_ptr, base, rp, pmask, IEEE)
            acc4 += _dot_rows(words, 4, x, z_ptr, s_ptr, base, rp, pmask, IEEE)
            acc5 += _dot_rows(words, 5, x, z_ptr, s_ptr, base, rp, pmask, IEEE)
            acc6 += _dot_rows(words, 6, x, z_ptr, s_ptr, base, rp, pmask, IEEE)
            acc7 += _dot_rows(words, 7, x, z_ptr, s_ptr, base, rp, pmask, IEEE)
    _store_rows(y_ptr, acc0, 0, rm, rp, M, N, stride_ym, GEMV, SPLIT_K)
    _store_rows(y_ptr, acc1, 1, rm, rp, M, N, stride_ym, GEMV, SPLIT_K)
    _store_rows(y_ptr, acc2, 2, rm, rp, M, N, stride_ym, GEMV, SPLIT_K)
    _store_rows(y_ptr, acc3, 3, rm, rp, M, N, stride_ym, GEMV, SPLIT_K)
    _store_rows(y_ptr, acc4, 4, rm, rp, M, N, stride_ym, GEMV, SPLIT_K)
    _store_rows(y_ptr, acc5, 5, rm, rp, M, N, stride_ym, GEMV, SPLIT_K)
    _store_rows(y_ptr, acc6, 6, rm, rp, M, N, stride_ym, GEMV, SPLIT_K)
    _store_rows(y_ptr, acc7, 7, rm, rp, M, N, stride_ym, GEMV, SPLIT_K)


def w4a16_linear(x: torch.Tensor, weights: Int4Weights, config: W4A16Config | None = None) -> torch.Tensor:
    """``x [M, K] @ W.T`` (``x`` float16, bfloat16 or float32, columns already in ``weights``'s sorted order),
    in ``x``'s dtype."""
    m, k = x.shape
    n = weights.out_features
    if k != weights.in_features:
        raise ValueError(f"w4a16_linear: x has {k} columns, the weight {weights.in_features}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if m == 0:
        return x.new_empty((0, n))
    if config is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
        config = choose_config(m, n, k, weights.group_size, sms)
    if weights.group_size % config.block_k or k % (config.block_k * config.split_k):
        raise ValueError(f"w4a16_linear: config {config} does not tile K={k} in groups of {weights.group_size}")
    y = (torch.zeros((m, n), dtype=torch.float32, device=x.device) if config.split_k > 1
         else torch.empty((m, n), dtype=x.dtype, device=x.device))
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), config.split_k)
    _w4a16_kernel[grid](x, weights.packed, weights.scales, weights.zeros, y, m, n, k, x.stride(0), y.stride(0),
                    GROUP=weights.group_size, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                    BLOCK_K=config.block_k, SPLIT_K=config.split_k, GEMV=config.block_m == 1,
                    IEEE=x.dtype == torch.float32, num_warps=config.num_warps)
    return y if y.dtype == x.dtype else y.to(x.dtype)
