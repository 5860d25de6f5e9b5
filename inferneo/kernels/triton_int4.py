"""A W4A16 GEMM/GEMV in Triton: ``y = x @ W.T`` with ``W`` in Inferneo's canonical int4 layout, de-quantized in
registers (layout: :mod:`inferneo.quantization.int4_layouts`).

One kernel serves every batch size. Each program owns ``BLOCK_N`` output features and walks K in tiles of
``BLOCK_K`` columns, each tile inside one group: it loads the tile's packed words ``[BLOCK_N/8, BLOCK_K]``, splits
every word into its eight 4-bit codes, subtracts the group's zero points and multiplies by its scales in float32
(the reference's ``(q - z) * s``). One row (``GEMV``) multiplies by ``x`` and sums along K in float32; more rows
(``BLOCK_M`` of them) go through ``tl.dot`` with the weights rounded to the activation dtype (float32 activations:
IEEE float32 products). Small batches split K over ``SPLIT_K`` programs per output tile (float32 atomic adds), so
a decode step keeps every SM streaming weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from inferneo.quantization.int4_layouts import Int4Weights

_MAX_BLOCK_K = 128


@functools.cache
def _triton():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return triton, tl


def tile_k(group_size: int) -> int:
    """The largest power-of-two K tile (16..128) that divides ``group_size``, or 0 when there is none."""
    bk = _MAX_BLOCK_K
    while bk >= 16:
        if group_size % bk == 0:
            return bk
        bk //= 2
    return 0


def triton_int4_available(group_size: int) -> bool:
    """Whether the kernel runs layers of this group size here (Triton installed, a K tile that fits a group)."""
    return _triton() is not None and tile_k(group_size) > 0


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
    64 rows, K is split while there are fewer than four programs per SM and the split keeps whole tiles."""
    bk = tile_k(group_size)
    if m == 1:
        bm, bn, warps = 1, 32, 4
    elif m <= 16:
        bm, bn, warps = 16, 64, 4
    elif m <= 32:
        bm, bn, warps = 32, 64, 4
    else:
        bm, bn, warps = 64, 128, 8
        bk = min(bk, 64)
    tiles = -(-n // bn) * -(-m // bm)
    split = 1
    while m <= 64 and tiles * split < 4 * num_sms and k % (bk * split * 2) == 0 and k // (bk * split * 2) >= 2:
        split *= 2
    return W4A16Config(bm, bn, bk, split, warps)


@functools.cache
def _kernel():
    triton, tl = _triton()

    @triton.jit
    def w4a16_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                     GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT_K: tl.constexpr, GEMV: tl.constexpr, IEEE: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rp = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        nmask = rn < N
        pmask = rp < N // 8
        shifts = tl.arange(0, 8) * 4
        k_span = K // SPLIT_K
        k_begin = pid_k * k_span
        if GEMV:
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_begin, k_begin + k_span, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            words = tl.load(qw_ptr + rp[:, None] * K + kk[None, :], mask=pmask[:, None], other=0)
            codes = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & 0xF, (BLOCK_N, BLOCK_K))
            g = k0 // GROUP
            s = tl.load(s_ptr + g * N + rn, mask=nmask, other=0.0)
            z = tl.load(z_ptr + g * N + rn, mask=nmask, other=0).to(tl.int32)
            w = (codes - z[:, None]).to(tl.float32) * s[:, None]  # [BLOCK_N, BLOCK_K]
            if GEMV:
                x = tl.load(x_ptr + pid_m * stride_xm + kk).to(tl.float32)
                acc += tl.sum(w * x[None, :], axis=1)
            else:
                x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm < M)[:, None], other=0.0)
                if IEEE:
                    acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision="ieee")
                else:
                    acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        if GEMV:
            ptrs = y_ptr + pid_m * stride_ym + rn
            if SPLIT_K == 1:
                tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=nmask)
            else:
                tl.atomic_add(ptrs, acc, mask=nmask)
        else:
            ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
            mask = (rm < M)[:, None] & nmask[None, :]
            if SPLIT_K == 1:
                tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
            else:
                tl.atomic_add(ptrs, acc, mask=mask)

    return w4a16_kernel


def w4a16_linear(x: torch.Tensor, weights: Int4Weights, config: W4A16Config | None = None) -> torch.Tensor:
    """``x [M, K] @ W.T`` (``x`` float16, bfloat16 or float32, columns already in ``weights``'s sorted order),
    in ``x``'s dtype."""
    triton, _ = _triton()
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
    _kernel()[grid](x, weights.packed, weights.scales, weights.zeros, y, m, n, k, x.stride(0), y.stride(0),
                    GROUP=weights.group_size, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                    BLOCK_K=config.block_k, SPLIT_K=config.split_k, GEMV=config.block_m == 1,
                    IEEE=x.dtype == torch.float32, num_warps=config.num_warps)
    return y if y.dtype == x.dtype else y.to(x.dtype)
