"""FP8 weight-only matrix-vector products for decode steps of a few rows (batch 1 to ``max_rows``), in Triton.

A decode step at batch 1 reads every weight once to produce one row, so its linear layers cost their weight bytes
over the memory bandwidth: e4m3 weights (one byte each) halve bf16's. The W8A8 path (per-token activation
quantization, then ``torch._scaled_mm``) pays a second kernel per layer and cuBLAS plans made for larger products;
at a few rows neither pays off. Here each program streams ``BLOCK_N`` weight rows once, converts the e4m3 values to
float32 in registers and multiplies them with the bf16/fp16 activations, accumulating in float32; the scale is
applied once per output row (per-tensor and per-channel weights) or per element (128 x 128 block scales).

Accuracy: the activations are **not** quantized (weight-only). Each e4m3 value times its scale is exact in float32,
so the result is ``F.linear(x.float(), W)`` on the de-quantized weight ``W`` up to float32 summation order, then
one rounding to the output dtype (the ``h2`` option below also rounds partial sums to float16): closer to
the full-precision layer than the W8A8 path, which also rounds the
activations to e4m3 (``Fp8LinearMethod.reference`` states which math each row count takes).

:func:`fp8_gemv_silu_mul` is the gated MLP's gate/up projection and SiLU-and-multiply in one kernel, rounded
where the unfused path rounds (as ``triton_gemv.gemv_silu_mul`` for bf16 weights).

Two kernels compute the same products. The CUDA-core one (float32 products, ``BLOCK_N`` weight rows times every
input row per program) runs at one row; the tensor-core one (``_fp8_dot_kernel``) widens each e4m3 tile to the
activations' 16-bit type (exact) and multiplies 16-row (up to 64-row) tiles with ``tl.dot``, summing in float32, so
its cost hardly changes up to 16 rows; it runs where the tiling file names it (a tile with ``num_stages``).

Options per tiling (:data:`OPTIONS`). ``h2`` (CUDA-core kernel, one bfloat16 row, per-tensor or per-row scales:
:func:`takes_h2`) runs :func:`_fp8_gemv_h2_kernel`, which multiplies in packed half precision: each lane of an
f16x2 sums four products of e4m3 codes and activations scaled by 2^-8, rounded to float16 at each step, and the
two lanes are widened to float32 once per eight codes (about half the SASS instructions per weight byte of the
float32 kernel). Its extra error is the float16 rounding of those sums: on Llama-2-7B's layers on an H200 the
relative error against float32 on the exact weights went from 1.63-1.71e-3 (the float32 kernel, the bf16 output
rounding) to 1.66-1.80e-3; a row whose float16 sum overflows (activations in the tens of thousands) is recomputed
in float32 in the same program. The shipped one-row tilings use it (2026-12-04: 57.3 against 65.6 us over the
four layer shapes; the gate/up + SiLU entry since in whole rows, 2 x 4096 codes a program: 23.4 against 24.7 us).
``h2p`` (four numbers, the fourth the pipeline's depth; ``pre``) runs the same products through a shared-memory
pipeline (:func:`_fp8_gemv_h2p_kernel`): measured slower, kept for further work, named by no shipped tiling. ``bits``, which changes no result bit (tensor-core kernel, bfloat16
activations) widens e4m3 to bfloat16 by integer operations in inline PTX instead of Triton's conversion, which goes
e4m3 -> float16 -> float32 -> bfloat16 and so spends one slow float32 -> bfloat16 conversion per weight: each byte
``s eeee mmm`` is placed into a bfloat16 as sign, low exponent bits and top mantissa bits, which is the value times
2^-120 exactly (subnormal codes included), and multiplied by 2^120 (:func:`_e4m3_to_bf16`).

Tiles: ``fp8_gemv_configs.json`` beside this file maps ``"N,K,BLOCK_M"`` (``BLOCK_M`` the row count rounded up to a
power of two) to ``{"block_n", "block_k", "num_warps"}`` (plus ``"num_stages"``: the tensor-core kernel; plus
``"options"``) and says up to how many rows the GEMV runs (``"max_rows"``); ``"epilogue_shapes"`` maps ``"N,K"`` to
the one-row tiling of launches with an RMSNorm epilogue (:func:`fp8_epilogue_config`).
``benchmarks/gpu/fp8_gemv_sweep.py`` writes it from timings on the GPU (``--dot``: the tensor-core tilings at 1, 4
and 16 rows; ``--options``: the options at 1 row and the tensor-core tilings at 16-64 rows). Shapes without an entry
take :func:`default_config`.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from inferneo.kernels._pdl import launch_options, pdl_for, wait_for_previous_kernel
from inferneo.kernels.scaled_row import ResidualNorm, RowScale, epilogue_arguments

SCALE_TENSOR, SCALE_ROW, SCALE_BLOCK = 0, 1, 2
# Rows up to which the GEMV runs when the tuned file does not say: on an H200 (2026-12-03) it beat the W8A8 path at
# one row (0.51x its time over Llama-2-7B's four layers) and lost from two rows on (1.15x at 2, 1.9x at 4).
DEFAULT_MAX_ROWS = 1
CONFIG_FILE = Path(__file__).with_name("fp8_gemv_configs.json")


# Triton's CPU interpreter runs no PTX: there the "bits" widening (_e4m3_to_bf16) takes the same steps in Triton ops.
_INTERPRETED: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
TWO_120: tl.constexpr = tl.constexpr(2.0**120)


@triton.jit
def _weight_tile(w_ptr, s_ptr, rows, nmask, k, K: tl.constexpr, stride_wn, stride_sn, SCALE: tl.constexpr,
                 BSN: tl.constexpr, BSK: tl.constexpr):
    # e4m3 rows x k as float32; block-scaled weights take their tile's scale per element here.
    mask = nmask[:, None] & (k < K)[None, :]
    w = tl.load(w_ptr + rows[:, None] * stride_wn + k[None, :], mask=mask, other=0.0).to(tl.float32)
    if SCALE == 2:
        s = tl.load(s_ptr + (rows // BSN)[:, None] * stride_sn + (k // BSK)[None, :], mask=mask, other=0.0)
        w = w * s
    return w


@triton.jit
def _products(w, x_ptr, k, K: tl.constexpr, M, stride_xm, BLOCK_M: tl.constexpr):
    # w [BLOCK_N, BLOCK_K] times the activations' k columns: [BLOCK_N, BLOCK_K] for one row, else
    # [BLOCK_M, BLOCK_N, BLOCK_K] (summed over K at the end).
    if BLOCK_M == 1:
        x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        p = w * x[None, :]
    else:
        m = tl.arange(0, BLOCK_M)
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=(m < M)[:, None] & (k < K)[None, :],
                    other=0.0).to(tl.float32)
        p = w[None, :, :] * x[:, None, :]
    return p


@triton.jit
def _row_scaled(y, s_ptr, rows, nmask, SCALE: tl.constexpr):
    # y [BLOCK_M, BLOCK_N] times the per-tensor or per-row weight scale (block scales are applied per K step).
    if SCALE == 0:
        y = y * tl.load(s_ptr)
    elif SCALE == 1:
        y = y * tl.load(s_ptr + rows, mask=nmask, other=0.0)[None, :]
    return y


@triton.jit
def _scaled_sum(acc, s_ptr, rows, nmask, SCALE: tl.constexpr, BLOCK_M: tl.constexpr):
    # [BLOCK_M, BLOCK_N] float32 outputs, with the per-tensor or per-row weight scale applied.
    if BLOCK_M == 1:  # noqa: SIM108 - a compile-time branch: the two shapes differ
        y = tl.sum(acc, axis=1)[None, :]
    else:
        y = tl.sum(acc, axis=2)
    return _row_scaled(y, s_ptr, rows, nmask, SCALE)


@triton.jit
def _silu_mul_rounded(g, u, dtype: tl.constexpr):
    # silu(g) * u rounded where the unfused path rounds: each projection's output, SiLU's output, the product.
    g = g.to(dtype).to(tl.float32)
    u = u.to(dtype).to(tl.float32)
    return (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32) * u


@triton.jit
def _store_rows(out_ptr, y, rows, nmask, M, stride_om, BLOCK_M: tl.constexpr):
    m = tl.arange(0, BLOCK_M)
    tl.store(out_ptr + m[:, None] * stride_om + rows[None, :], y.to(out_ptr.dtype.element_ty),
             mask=(m < M)[:, None] & nmask[None, :])


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, stride_xm, stride_wn, stride_sn, stride_om,
                     K: tl.constexpr, SCALE: tl.constexpr, BSN: tl.constexpr, BSK: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rows < N
    k = tl.arange(0, BLOCK_K)
    # The first weight tile is read before waiting for the kernel that writes x (weights never change).
    w = _weight_tile(w_ptr, s_ptr, rows, nmask, k, K, stride_wn, stride_sn, SCALE, BSN, BSK)
    wait_for_previous_kernel(PDL, EARLY=True)  # what follows reads only weights before its own wait
    acc = _products(w, x_ptr, k, K, M, stride_xm, BLOCK_M)
    for k0 in range(BLOCK_K, K, BLOCK_K):  # K is a constant: one compiled kernel per layer width
        k = k0 + tl.arange(0, BLOCK_K)
        w = _weight_tile(w_ptr, s_ptr, rows, nmask, k, K, stride_wn, stride_sn, SCALE, BSN, BSK)
        acc += _products(w, x_ptr, k, K, M, stride_xm, BLOCK_M)
    y = _scaled_sum(acc, s_ptr, rows, nmask, SCALE, BLOCK_M)
    _store_rows(out_ptr, y, rows, nmask, M, stride_om, BLOCK_M)


@triton.jit
def _fp8_gemv_silu_mul_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, D, stride_xm, stride_wn, stride_sn, stride_om,
                              K: tl.constexpr, SCALE: tl.constexpr, BSN: tl.constexpr, BSK: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              PDL: tl.constexpr):
    # Output j of the gated MLP: rows j (gate) and D + j (up) of the fused gate/up weight, then silu(gate) * up.
    gate = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    up = gate + D
    nmask = gate < D
    k = tl.arange(0, BLOCK_K)
    wg = _weight_tile(w_ptr, s_ptr, gate, nmask, k, K, stride_wn, stride_sn, SCALE, BSN, BSK)
    wu = _weight_tile(w_ptr, s_ptr, up, nmask, k, K, stride_wn, stride_sn, SCALE, BSN, BSK)
    wait_for_previous_kernel(PDL, EARLY=True)  # the down projection's GEMV after it reads only weights first
    acc_g = _products(wg, x_ptr, k, K, M, stride_xm, BLOCK_M)
    acc_u = _products(wu, x_ptr, k, K, M, stride_xm, BLOCK_M)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        wg = _weight_tile(w_ptr, s_ptr, gate, nmask, k, K, stride_wn, stride_sn, SCALE, BSN, BSK)
        wu = _weight_tile(w_ptr, s_ptr, up, nmask, k, K, stride_wn, stride_sn, SCALE, BSN, BSK)
        acc_g += _products(wg, x_ptr, k, K, M, stride_xm, BLOCK_M)
        acc_u += _products(wu, x_ptr, k, K, M, stride_xm, BLOCK_M)
    y = _silu_mul_rounded(_scaled_sum(acc_g, s_ptr, gate, nmask, SCALE, BLOCK_M),
                          _scaled_sum(acc_u, s_ptr, up, nmask, SCALE, BLOCK_M), out_ptr.dtype.element_ty)
    _store_rows(out_ptr, y, gate, nmask, M, stride_om, BLOCK_M)



# ---- one row in packed half precision ("h2") ---------------------------------------------------------------------
# The CUDA-core kernel above spends about five SASS instructions per weight byte (one e4m3x2 -> f16x2 conversion per
# two codes, one f16 -> f32 widening and one FFMA per code, and the activation's widening): at one row it is bound
# by instructions, not bytes. The "h2" form multiplies in packed half precision: eight codes (one 64-bit load
# element) become four f16x2 pairs (``cvt.rn.f16x2.e4m3x2``, exact), meet eight activations in one HMUL2 and three
# HFMA2 (each lane sums four products, rounded to float16 at each step), and the two lanes are widened to float32
# once per eight codes: 12 instructions per 8 bytes. The activations are converted to float16 once per program
# column (shared by every weight row a thread holds), times 2^-8 so that the half-precision sums stay in range
# (exact: a power of two; bf16 values above 2^-6 keep every bit). A row whose float16 sum overflowed anyway (|x| in
# the thousands) is recomputed in float32 by the plain kernel's products in the same program.
H2_SHIFT: tl.constexpr = tl.constexpr(2.0**-8)
H2_UNSHIFT: tl.constexpr = tl.constexpr(2.0**8)


@triton.jit
def _bf16x4_to_f16x4(x):
    # four bf16 (an int64) -> the same values times 2^-8 as four f16 (an int64)
    if _INTERPRETED:
        out = tl.zeros_like(x)
        for i in tl.static_range(4):
            bits = ((x >> (16 * i)) & 0xFFFF).to(tl.int32) << 16
            f = (bits.to(tl.float32, bitcast=True) * H2_SHIFT).to(tl.float16)
            out = out | ((f.to(tl.int16, bitcast=True).to(tl.int64) & 0xFFFF) << (16 * i))
    else:
        out = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 a, b, lo, hi, p, q;
            mov.b64 {a, b}, $1;
            shl.b32 lo, a, 16;
            and.b32 hi, a, 0xFFFF0000;
            mul.rn.f32 lo, lo, 0f3B800000;
            mul.rn.f32 hi, hi, 0f3B800000;
            cvt.rn.f16x2.f32 p, hi, lo;
            shl.b32 lo, b, 16;
            and.b32 hi, b, 0xFFFF0000;
            mul.rn.f32 lo, lo, 0f3B800000;
            mul.rn.f32 hi, hi, 0f3B800000;
            cvt.rn.f16x2.f32 q, hi, lo;
            mov.b64 $0, {p, q};
            }""",
            constraints="=l,l", args=[x], dtype=tl.int64, is_pure=True, pack=1)
    return out


@triton.jit
def _h2_dot8(w, xa, xb):
    # eight e4m3 codes (int64 w) times eight float16 activations (xa: the first four, xb: the next four, as from
    # _bf16x4_to_f16x4), summed: each half lane in float16 (one HMUL2, three HFMA2), then the two lanes in float32
    if _INTERPRETED:  # the same products in float32 (the interpreter runs no PTX): plumbing, not rounding
        acc = tl.zeros(w.shape, tl.float32)
        for i in tl.static_range(8):
            c = ((w >> (8 * i)) & 0xFF).to(tl.int32)
            wv = (((c & 0x80) << 24) | ((c & 0x7F) << 20)).to(tl.float32, bitcast=True) * TWO_120
            if i < 4:  # noqa: SIM108 - a compile-time branch
                h = (xa >> (16 * i)) & 0xFFFF
            else:
                h = (xb >> (16 * (i - 4))) & 0xFFFF
            xv = h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            acc += wv * xv
    else:
        acc = tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 w0, w1, x0, x1, x2, x3, h0, h1, h2, h3, s;
            .reg .b16 c0, c1, c2, c3, lo, hi;
            .reg .f32 f0, f1;
            mov.b64 {w0, w1}, $1;
            mov.b64 {x0, x1}, $2;
            mov.b64 {x2, x3}, $3;
            mov.b32 {c0, c1}, w0;
            mov.b32 {c2, c3}, w1;
            cvt.rn.f16x2.e4m3x2 h0, c0;
            cvt.rn.f16x2.e4m3x2 h1, c1;
            cvt.rn.f16x2.e4m3x2 h2, c2;
            cvt.rn.f16x2.e4m3x2 h3, c3;
            mul.rn.f16x2 s, h0, x0;
            fma.rn.f16x2 s, h1, x1, s;
            fma.rn.f16x2 s, h2, x2, s;
            fma.rn.f16x2 s, h3, x3, s;
            mov.b32 {lo, hi}, s;
            cvt.f32.f16 f0, lo;
            cvt.f32.f16 f1, hi;
            add.f32 $0, f0, f1;
            }""",
            constraints="=f,l,l,l", args=[w, xa, xb], dtype=tl.float32, is_pure=True, pack=1)
    return acc


@triton.jit
def _h2_tile(w8_ptr, rows, nmask, j, K8: tl.constexpr, stride_wn8, EVEN: tl.constexpr):
    # EVEN: the tiles cover the weight exactly (no mask: vector loads)
    ptrs = w8_ptr + rows[:, None] * stride_wn8 + j[None, :]
    if EVEN:  # noqa: SIM108 - a compile-time branch
        w = tl.load(ptrs)
    else:
        w = tl.load(ptrs, mask=nmask[:, None] & (j < K8)[None, :], other=0)
    return w


@triton.jit
def _h2_x(x8_ptr, j, K8: tl.constexpr, EVEN: tl.constexpr, X_HALF: tl.constexpr = False):
    # the activations of int64 weight columns j: eight each, as two int64 of four float16 (times 2^-8); X_HALF:
    # x8 is the row's scaled float16 copy (see scaled_half), loaded as it is
    if EVEN:
        xa = tl.load(x8_ptr + 2 * j)
        xb = tl.load(x8_ptr + 2 * j + 1)
    else:
        xa = tl.load(x8_ptr + 2 * j, mask=j < K8, other=0)
        xb = tl.load(x8_ptr + 2 * j + 1, mask=j < K8, other=0)
    if X_HALF:
        return xa[None, :], xb[None, :]
    return _bf16x4_to_f16x4(xa)[None, :], _bf16x4_to_f16x4(xb)[None, :]


@triton.jit
def scaled_half_values(y):
    """Values rounded to bfloat16, as the h2 kernel's float16 activations: times 2^-8, rounded to float16 (the
    conversion of :func:`_bf16x4_to_f16x4`)."""
    return (y.to(tl.bfloat16).to(tl.float32) * H2_SHIFT).to(tl.float16)


@triton.jit
def _f32_rows(x_ptr, w_ptr, s_ptr, rows, nmask, K: tl.constexpr, stride_wn, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    # the plain kernel's float32 products for one row (the overflow fallback of the h2 kernel; BLOCK_K small enough
    # that this rare branch does not raise the kernel's registers)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        w = _weight_tile(w_ptr, s_ptr, rows, nmask, k, K, stride_wn, 0, 0, 1, 1)
        acc += _products(w, x_ptr, k, K, 1, 0, 1)
    return tl.sum(acc, axis=1)


@triton.jit
def _h2_finish(acc, x_ptr, w_ptr, s_ptr, rows, nmask, K: tl.constexpr, stride_wn, BLOCK_N: tl.constexpr,
               FB_K: tl.constexpr, SCALE: tl.constexpr):
    return _h2_finish_sum(tl.sum(acc, axis=1), x_ptr, w_ptr, s_ptr, rows, nmask, K, stride_wn, BLOCK_N, FB_K, SCALE)


@triton.jit
def _h2_finish_sum(y, x_ptr, w_ptr, s_ptr, rows, nmask, K: tl.constexpr, stride_wn, BLOCK_N: tl.constexpr,
                   FB_K: tl.constexpr, SCALE: tl.constexpr):
    # y: the rows' float32 sums of the lanes' float16 partials (times 2^-8)
    y = y * H2_UNSHIFT
    bad = (y != y) | (tl.abs(y) == float("inf"))
    if tl.max(bad.to(tl.int32), axis=0) > 0:  # a float16 sum overflowed: these rows again in float32
        y = tl.where(bad, _f32_rows(x_ptr, w_ptr, s_ptr, rows, nmask, K, stride_wn, BLOCK_N, FB_K), y)
    return _row_scaled(y[None, :], s_ptr, rows, nmask, SCALE)


@triton.jit
def _fp8_gemv_h2_kernel(x_ptr, x8_ptr, w_ptr, w8_ptr, s_ptr, out_ptr, N, stride_wn, stride_wn8,
                        K: tl.constexpr, SCALE: tl.constexpr, GATED: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, FB_K: tl.constexpr, EVEN_N: tl.constexpr, PDL: tl.constexpr,
                        yh_ptr=None, Y_HALF: tl.constexpr = False, X_HALF: tl.constexpr = False,
                        sq_ptr=None, num_sq=0, eps=0.0, res_ptr=None, nw_ptr=None, sq_out_ptr=None,
                        ROW_SCALE: tl.constexpr = False, SQ_BLOCK: tl.constexpr = 1,
                        RES_NORM: tl.constexpr = False, EARLY_RES: tl.constexpr = False):
    # One row: out[rows] = W[rows] . x (GATED: silu(W[rows] . x) * W[rows + N] . x); w8/x8: the weight and the row
    # as int64 (eight codes, four bf16; X_HALF: x8 is the row's scaled float16 copy, see scaled_half, x still the
    # row itself for the float32 fallback); BLOCK_K counts codes. Y_HALF: the outputs' scaled float16 copy to yh.
    # The RMSNorm in the epilogues (kernels/scaled_row.py): ROW_SCALE: x is the norm's input times the norm weight,
    # and the sums (both of GATED's) are multiplied by 1 / rms from the num_sq (<= SQ_BLOCK) partial sums of squares
    # at sq, summed in order; RES_NORM (not GATED): the output, rounded, is added to the residual (in place: each
    # program reads and writes only its rows), out takes that sum times the norm weight nw, rounded, and the
    # program's sum of the squared sums goes to sq_out[program_id(0)]. EARLY_RES: the norm weight is read before the
    # wait and the residual right after it, so neither load waits at the program's end (the W4A16 kernel's
    # measured slower so; off unless a benchmark asks).
    BK8: tl.constexpr = BLOCK_K // 8
    K8: tl.constexpr = K // 8
    EVEN: tl.constexpr = EVEN_N and K % BLOCK_K == 0
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rows < N
    j = tl.arange(0, BK8)
    w = _h2_tile(w8_ptr, rows, nmask, j, K8, stride_wn8, EVEN)
    wu = w
    if GATED:
        wu = _h2_tile(w8_ptr, rows + N, nmask, j, K8, stride_wn8, EVEN)
    if RES_NORM and EARLY_RES:  # a constant, like the weights
        norm_w = tl.load(nw_ptr + rows[None, :], mask=nmask[None, :], other=0.0).to(tl.float32)
    wait_for_previous_kernel(PDL, EARLY=True)  # what follows reads only weights before its own wait
    if RES_NORM and EARLY_RES:
        res = tl.load(res_ptr + rows[None, :], mask=nmask[None, :], other=0.0).to(tl.float32)
    if ROW_SCALE:  # read now, summed at the end
        sq_i = tl.arange(0, SQ_BLOCK)
        squares = tl.load(sq_ptr + sq_i, mask=sq_i < num_sq, other=0.0)
    xa, xb = _h2_x(x8_ptr, j, K8, EVEN, X_HALF)
    acc = _h2_dot8(w, xa, xb)
    acc_u = acc
    if GATED:
        acc_u = _h2_dot8(wu, xa, xb)
    for j0 in range(BK8, K8, BK8):
        j = j0 + tl.arange(0, BK8)
        xa, xb = _h2_x(x8_ptr, j, K8, EVEN, X_HALF)
        acc += _h2_dot8(_h2_tile(w8_ptr, rows, nmask, j, K8, stride_wn8, EVEN), xa, xb)
        if GATED:
            acc_u += _h2_dot8(_h2_tile(w8_ptr, rows + N, nmask, j, K8, stride_wn8, EVEN), xa, xb)
    y = _h2_finish(acc, x_ptr, w_ptr, s_ptr, rows, nmask, K, stride_wn, BLOCK_N, FB_K, SCALE)  # [1, BLOCK_N]
    if ROW_SCALE:
        inv_rms = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)  # the norm's expression (weighted_rms_norm)
        y = y * inv_rms
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    if GATED:
        u = _h2_finish(acc_u, x_ptr, w_ptr, s_ptr, rows + N, nmask, K, stride_wn, BLOCK_N, FB_K, SCALE)
        if ROW_SCALE:
            u = u * inv_rms
        y = _silu_mul_rounded(y, u, dtype)
    if RES_NORM:  # rounded as the projection's output, then as the residual sum (the fused add + RMSNorm)
        if not EARLY_RES:
            res = tl.load(res_ptr + rows[None, :], mask=nmask[None, :], other=0.0).to(tl.float32)
        total = (y.to(dtype).to(tl.float32) + res).to(dtype)
        tl.store(res_ptr + rows[None, :], total, mask=nmask[None, :])
        t = total.to(tl.float32)
        tl.store(sq_out_ptr + tl.program_id(0), tl.sum(tl.sum(tl.where(nmask[None, :], t * t, 0.0), axis=1), axis=0))
        if not EARLY_RES:
            norm_w = tl.load(nw_ptr + rows[None, :], mask=nmask[None, :], other=0.0).to(tl.float32)
        y = t * norm_w
    if Y_HALF:
        tl.store(yh_ptr + rows[None, :], scaled_half_values(y), mask=nmask[None, :])
    _store_rows(out_ptr, y, rows, nmask, 1, 0, 1)


# ---- one row in packed half precision, weights streamed through a shared-memory pipeline ("h2p") ----------------
# The h2 kernel above loads a whole K tile into registers, waits for it, multiplies it, and only then has the next
# tile's loads in flight (SASS: the second tile's LDGs are issued among the first tile's HFMA2s): each program
# exposes the memory latency once per tile, and the bytes a program keeps in flight are bounded by its registers.
# "h2p" runs the same products (the same rounding: float16 sums of four codes a lane, float32 across groups of eight)
# over narrow K steps in a ``STAGES``-deep software pipeline (``tl.range(num_stages=...)``: Triton turns the loads
# into ``cp.async`` copies into shared memory, ``STAGES - 1`` steps ahead), so each program keeps that many steps of
# weight bytes outstanding whatever its registers. Weights read before the PDL wait: with ``PRE`` (codes, 0 for
# none), the first ``PRE`` columns of each row go to registers before the wait (as the h2 kernel's first tile does)
# and are multiplied after the loop; the pipeline's own prologue reads x too, so it starts after the wait.
# Measured on an H200 (2026-12-04, benchmarks/gpu/fp8_h2p_check.py, docs/benchmarks.md): slower than the h2 kernel on
# every Llama-2-7B layer (q/k/v 16.6 against 13.9 us at best, o 8.2 against 5.4, down 18.7 against 13.3; gate/up
# 24.6 against 24.9, and there 1.2 us a layer slower in the engine): its time follows the number of K steps (each a
# CTA-wide barrier and a shared-memory round trip), not the bytes in flight. No shipped tiling names it.


@triton.jit
def _fp8_gemv_h2p_kernel(x_ptr, x8_ptr, w_ptr, w8_ptr, s_ptr, out_ptr, N, stride_wn, stride_wn8,
                         K: tl.constexpr, SCALE: tl.constexpr, GATED: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, STAGES: tl.constexpr, PRE: tl.constexpr, FB_K: tl.constexpr,
                         EVEN_N: tl.constexpr, PDL: tl.constexpr):
    # One row: as _fp8_gemv_h2_kernel; BLOCK_K: codes a pipeline step; PRE: codes per row read before the wait.
    BK8: tl.constexpr = BLOCK_K // 8
    K8: tl.constexpr = K // 8
    PRE8: tl.constexpr = PRE // 8
    EVEN: tl.constexpr = EVEN_N and (K - PRE) % BLOCK_K == 0
    PRE_EVEN: tl.constexpr = EVEN_N and PRE <= K
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rows < N
    if PRE8 > 0:
        jp = tl.arange(0, PRE8)
        wp = _h2_tile(w8_ptr, rows, nmask, jp, K8, stride_wn8, PRE_EVEN)
        wpu = wp
        if GATED:
            wpu = _h2_tile(w8_ptr, rows + N, nmask, jp, K8, stride_wn8, PRE_EVEN)
    wait_for_previous_kernel(PDL, EARLY=True)  # what follows reads only weights before its own wait
    acc = tl.zeros((BLOCK_N, BK8), tl.float32)
    acc_u = acc
    for j0 in tl.range(PRE8, K8, BK8, num_stages=STAGES):
        j = j0 + tl.arange(0, BK8)
        xa, xb = _h2_x(x8_ptr, j, K8, EVEN)
        acc += _h2_dot8(_h2_tile(w8_ptr, rows, nmask, j, K8, stride_wn8, EVEN), xa, xb)
        if GATED:
            acc_u += _h2_dot8(_h2_tile(w8_ptr, rows + N, nmask, j, K8, stride_wn8, EVEN), xa, xb)
    y = tl.sum(acc, axis=1)
    u = tl.sum(acc_u, axis=1)
    if PRE8 > 0:
        xa, xb = _h2_x(x8_ptr, jp, K8, PRE_EVEN)
        y += tl.sum(_h2_dot8(wp, xa, xb), axis=1)
        if GATED:
            u += tl.sum(_h2_dot8(wpu, xa, xb), axis=1)
    y = _h2_finish_sum(y, x_ptr, w_ptr, s_ptr, rows, nmask, K, stride_wn, BLOCK_N, FB_K, SCALE)
    if GATED:
        u = _h2_finish_sum(u, x_ptr, w_ptr, s_ptr, rows + N, nmask, K, stride_wn, BLOCK_N, FB_K, SCALE)
        y = _silu_mul_rounded(y, u, out_ptr.dtype.element_ty)
    _store_rows(out_ptr, y, rows, nmask, 1, 0, 1)


@triton.jit
def _summed_tile(x_ptr, res_ptr, res_out_ptr, nw_ptr, k, K: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    # Columns k of the row the norm reads (x + residual, rounded as the RMSNorm kernel rounds the sum; program 0
    # stores it) as float32, and the same times the norm weight.
    kmask = k < K
    x = tl.load(x_ptr + k, mask=kmask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + k, mask=kmask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)
        if tl.program_id(0) == 0:
            tl.store(res_out_ptr + k, x, mask=kmask)
    xf = x.to(tl.float32)
    return xf, xf * tl.load(nw_ptr + k, mask=kmask, other=0.0).to(tl.float32)


@triton.jit
def _fp8_norm_gemv_kernel(x_ptr, res_ptr, nw_ptr, w_ptr, s_ptr, out_ptr, res_out_ptr, N, stride_wn, stride_sn, eps,
                          K: tl.constexpr, SCALE: tl.constexpr, BSN: tl.constexpr, BSK: tl.constexpr,
                          HAS_RESIDUAL: tl.constexpr, GATED: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    # One row: y = (W . (nw * s)) / rms(s), s = x + residual. Each program streams the row s with its weight rows
    # (the K loop it runs anyway) and sums s^2 as it goes, so the row is read once and 1 / rms multiplies each
    # output once at the end. (GATED: gate rows and up rows D apart, then SiLU-and-mul.)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rows < N
    k = tl.arange(0, BLOCK_K)
    w = _weight_tile(w_ptr, s_ptr, rows, nmask, k, K, stride_wn, stride_sn, SCALE, BSN, BSK)
    wu = w
    if GATED:
        wu = _weight_tile(w_ptr, s_ptr, rows + N, nmask, k, K, stride_wn, stride_sn, SCALE, BSN, BSK)
    wait_for_previous_kernel(PDL, EARLY=True)  # rotary or the down projection's GEMV follow: they wait first
    xf, xw = _summed_tile(x_ptr, res_ptr, res_out_ptr, nw_ptr, k, K, HAS_RESIDUAL)
    squares = xf * xf
    acc = w * xw[None, :]
    acc_u = wu * xw[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xf, xw = _summed_tile(x_ptr, res_ptr, res_out_ptr, nw_ptr, k, K, HAS_RESIDUAL)
        squares += xf * xf
        acc += _weight_tile(w_ptr, s_ptr, rows, nmask, k, K, stride_wn, stride_sn, SCALE, BSN, BSK) * xw[None, :]
        if GATED:
            acc_u += _weight_tile(w_ptr, s_ptr, rows + N, nmask, k, K, stride_wn, stride_sn, SCALE, BSN,
                                  BSK) * xw[None, :]
    rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
    y = _scaled_sum(acc, s_ptr, rows, nmask, SCALE, 1) * rstd
    if GATED:
        u = _scaled_sum(acc_u, s_ptr, rows + N, nmask, SCALE, 1) * rstd
        y = _silu_mul_rounded(y, u, out_ptr.dtype.element_ty)
    _store_rows(out_ptr, y, rows, nmask, 1, 0, 1)


# _e4m3_to_bf16's PTX, four bytes to four bfloat16 (two registers); the SIGN form replicates each byte's sign with
# the permute instead of masking it apart.
_E4M3_ASM: tl.constexpr = tl.constexpr("""{
    .reg .b32 a, b, t, c;
    mov.b32 c, 0x7B807B80;
    prmt.b32 a, $2, 0, 0x1404;
    prmt.b32 b, $2, 0, 0x3424;
    shr.b32 t, a, 4;
    and.b32 t, t, 0x07F007F0;
    and.b32 a, a, 0x80008000;
    or.b32 a, a, t;
    mul.rn.bf16x2 $0, a, c;
    shr.b32 t, b, 4;
    and.b32 t, t, 0x07F007F0;
    and.b32 b, b, 0x80008000;
    or.b32 b, b, t;
    mul.rn.bf16x2 $1, b, c;
    }""")
_E4M3_SIGN_ASM: tl.constexpr = tl.constexpr("""{
    .reg .b32 a, b, c;  mov.b32 c, 0x7B807B80;
    prmt.b32 a, $2, 0, 0x9180;  prmt.b32 b, $2, 0, 0xB3A2;  // bytes 0, 1 (2, 3), each with its sign byte above it
    shl.b32 a, a, 4;  shl.b32 b, b, 4;
    and.b32 a, a, 0x87F087F0;  and.b32 b, b, 0x87F087F0;  // sign, exponent and mantissa of each bfloat16 half
    mul.rn.bf16x2 $0, a, c;  mul.rn.bf16x2 $1, b, c;
    }""")


@triton.jit
def _e4m3_to_bf16(codes, PURE: tl.constexpr = True, SIGN: tl.constexpr = False):
    # e4m3 bytes (uint8) to bfloat16, exactly, without conversion instructions: each byte ``s eeee mmm`` is placed
    # into a bfloat16 as sign, low exponent bits and top mantissa bits (the value times 2^-120; zero-exponent codes
    # become bfloat16 subnormals), then multiplied by 2^120. On the GPU four bytes at a time in PTX: two byte
    # permutes, a shift and two masks per pair of values, and one packed bfloat16 multiply (the conversion Triton
    # emits goes e4m3 -> float16 -> float32 -> bfloat16, one slow float32 -> bfloat16 conversion per value).
    # PURE=False pins the widening where it is written: Triton then does not move it past a layout change (e.g. to
    # after a tile's shared-memory staging, where a transposed dot operand of bytes is gathered one byte a load).
    # SIGN: a candidate in fewer instructions (the decode attention's ``fp8_widen=1``; not yet timed on a GPU): one
    # byte permute that also replicates each byte's sign into the byte above it, then ``(u << 4) & 0x87F0`` per half
    # (sign to bit 15, exponent and mantissa to bits 4-10) and the multiply: four instructions a pair, not five.
    if _INTERPRETED:
        u = codes.to(tl.uint32)
        f = (((u & 0x80) << 24) | ((u & 0x7F) << 20)).to(tl.float32, bitcast=True)  # the value times 2^-120
        w = (f * TWO_120).to(tl.bfloat16)  # exact: every e4m3 value is a bfloat16
    else:
        w = tl.inline_asm_elementwise(asm=_E4M3_SIGN_ASM if SIGN else _E4M3_ASM, constraints="=r,=r,r", args=[codes],
                                      dtype=tl.bfloat16, is_pure=PURE, pack=4)
    return w


# _e4m3_to_f16's PTX: four bytes to four float16 (two registers), two native conversions (sm_89 and later).
_E4M3_F16_ASM: tl.constexpr = tl.constexpr("""{
    .reg .b16 lo, hi;
    mov.b32 {lo, hi}, $2;
    cvt.rn.f16x2.e4m3x2 $0, lo;
    cvt.rn.f16x2.e4m3x2 $1, hi;
    }""")


@triton.jit
def _e4m3_to_f16(codes, PURE: tl.constexpr = True):
    # e4m3 bytes (uint8) to float16, exactly (every e4m3 value, subnormals included, is a float16), by the hardware
    # conversion, one instruction per pair of values: about a fifth of the instructions of _e4m3_to_bf16's integer
    # widening. PURE=False pins it where it is written, as in _e4m3_to_bf16. Under the interpreter (no PTX) the
    # bit placement of _e4m3_to_bf16, then an exact cast.
    if _INTERPRETED:
        u = codes.to(tl.uint32)
        f = (((u & 0x80) << 24) | ((u & 0x7F) << 20)).to(tl.float32, bitcast=True)  # the value times 2^-120
        w = (f * TWO_120).to(tl.float16)
    else:
        w = tl.inline_asm_elementwise(asm=_E4M3_F16_ASM, constraints="=r,=r,r", args=[codes], dtype=tl.float16,
                                      is_pure=PURE, pack=4)
    return w


@triton.jit
def _dot_step(acc, x, w_ptr, s_ptr, rows, nmask, k, k0, K: tl.constexpr, stride_wn, stride_sn,
              SCALE: tl.constexpr, BSN: tl.constexpr, BSK: tl.constexpr, BITS: tl.constexpr):
    # acc += x @ W[rows, k].T on the tensor cores: the e4m3 tile widened to x's 16-bit type (exact), float32 sums.
    # BITS (bfloat16 x, uint8 codes): widened by integer operations (_e4m3_to_bf16), the same values.
    w = tl.load(w_ptr + rows[:, None] * stride_wn + k[None, :], mask=nmask[:, None] & (k < K)[None, :], other=0.0)
    if BITS:  # noqa: SIM108 - a compile-time branch
        w = _e4m3_to_bf16(w)
    else:
        w = w.to(x.dtype)
    w = tl.trans(w)
    if SCALE == 2:  # one scale block per K step (BLOCK_K divides the block's width)
        s = tl.load(s_ptr + (rows // BSN) * stride_sn + k0 // BSK, mask=nmask, other=0.0)
        acc += tl.dot(x, w) * s[None, :]
    else:
        acc = tl.dot(x, w, acc)
    return acc


@triton.jit
def _fp8_dot_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, stride_xm, stride_wn, stride_sn, stride_om,
                    K: tl.constexpr, SCALE: tl.constexpr, BSN: tl.constexpr, BSK: tl.constexpr, GATED: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                    BITS: tl.constexpr):
    # The same products for up to BLOCK_M (>= 16) rows as tensor-core tiles: output features rows (with GATED,
    # silu(rows) * (rows + N) of a fused gate/up weight, N = D).
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rows < N
    m = tl.arange(0, BLOCK_M)
    mmask = m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    wait_for_previous_kernel(PDL, EARLY=True)  # what follows reads only weights before its own wait
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & (k < K)[None, :], other=0.0)
        acc = _dot_step(acc, x, w_ptr, s_ptr, rows, nmask, k, k0, K, stride_wn, stride_sn, SCALE, BSN, BSK, BITS)
        if GATED:
            acc_u = _dot_step(acc_u, x, w_ptr, s_ptr, rows + N, nmask, k, k0, K, stride_wn, stride_sn, SCALE, BSN,
                              BSK, BITS)
    y = _row_scaled(acc, s_ptr, rows, nmask, SCALE)
    if GATED:
        y = _silu_mul_rounded(y, _row_scaled(acc_u, s_ptr, rows + N, nmask, SCALE), out_ptr.dtype.element_ty)
    _store_rows(out_ptr, y, rows, nmask, M, stride_om, BLOCK_M)


# ---- configuration ---------------------------------------------------------------------------------------------


# (BLOCK_N, BLOCK_K, num_warps): CUDA-core kernel; + num_stages: tensor-core kernel; then any of the OPTIONS
Tile = tuple[int | str, ...]
# "bits": the tensor-core kernel widens e4m3 to bfloat16 by integer operations (see _dot_step); the same result bits.
# It applies to per-tensor and per-row scales with bfloat16 activations; other layers and the CUDA-core kernel
# ignore it. "h2": the CUDA-core kernel at one row in packed half precision (_fp8_gemv_h2_kernel; float16 sums of
# four products per lane, not float32: see takes_h2 for where it applies and the module doc for its error).
# "h2p": the same products through a shared-memory pipeline (_fp8_gemv_h2p_kernel): the fourth number is then the
# pipeline's depth (num_stages), BLOCK_K the codes a step; where h2 does not apply the tiling's first three numbers
# run the plain CUDA-core kernel. "pre" (with "h2p"): the first 2 * BLOCK_K codes of each row are read into
# registers before the PDL wait.
OPTIONS = ("bits", "h2", "h2p", "pre")


def split_tile(config: Tile) -> tuple[tuple[int, ...], frozenset[str]]:
    """A tiling's numbers and its options (:data:`OPTIONS`)."""
    numbers = tuple(int(v) for v in config if not isinstance(v, str))
    options = frozenset(v for v in config if isinstance(v, str))
    if unknown := options - set(OPTIONS):
        raise ValueError(f"fp8 GEMV: unknown tiling options {sorted(unknown)}; known: {list(OPTIONS)}")
    if len(numbers) not in (3, 4):
        raise ValueError(f"fp8 GEMV: a tiling has 3 or 4 numbers; got {config}")
    return numbers, options


def tile_from_json(entry: dict) -> Tile:
    """A tiling file entry (``block_n``, ``block_k``, ``num_warps``, optional ``num_stages`` and ``options``)."""
    numbers = tuple(int(entry[f]) for f in ("block_n", "block_k", "num_warps", "num_stages") if f in entry)
    return numbers + tuple(o for o in OPTIONS if o in entry.get("options", ()))


def tile_to_json(config: Tile) -> dict:
    """The tiling file entry of ``config`` (inverse of :func:`tile_from_json`)."""
    numbers, options = split_tile(config)
    entry = dict(zip(("block_n", "block_k", "num_warps", "num_stages"), numbers, strict=False))
    if options:
        entry["options"] = [o for o in OPTIONS if o in options]
    return entry


def config_file() -> Path:
    """The tiling file read: ``INFERNEO_FP8_GEMV_CONFIGS`` when set (a benchmark's alternative tilings), else
    :data:`CONFIG_FILE`."""
    return Path(os.environ.get("INFERNEO_FP8_GEMV_CONFIGS") or CONFIG_FILE)


@functools.cache
def _tuned() -> tuple[int, dict[tuple[int, int, int], Tile], dict[tuple[int, int], Tile],
                      dict[tuple[int, int], Tile]]:
    # (max_rows, GEMV tilings by "N,K,BLOCK_M", the norm-fused kernel's tilings by "N,K": "norm_shapes", the
    # one-row tilings of launches with an RMSNorm epilogue by "N,K": "epilogue_shapes")
    path = config_file()
    if not path.is_file():
        return DEFAULT_MAX_ROWS, {}, {}, {}
    table = json.loads(path.read_text())

    def tiles(section: str) -> dict:
        return {tuple(int(d) for d in key.split(",")): tile_from_json(e) for key, e in table.get(section, {}).items()}

    limit = int(table.get("max_rows", DEFAULT_MAX_ROWS))
    return limit, tiles("shapes"), tiles("norm_shapes"), tiles("epilogue_shapes")


def max_rows() -> int:
    """Rows up to which FP8 linear layers take the GEMV (the tuned file's ``max_rows``, else
    :data:`DEFAULT_MAX_ROWS`); above it they run the W8A8 GEMM."""
    return _tuned()[0]


def block_rows(m: int) -> int:
    """``BLOCK_M`` for ``m`` rows: ``m`` rounded up to a power of two (the key of the tuned tiles)."""
    return triton.next_power_of_2(max(m, 1))


_DEFAULT_CONFIGS = {1: (4, 1024, 4), 2: (4, 512, 4), 4: (4, 256, 4), 8: (8, 256, 8)}


def default_config(block_m: int) -> Tile:
    """``(BLOCK_N, BLOCK_K, num_warps)`` untuned: a few output rows per program, so that each activation tile read
    (two bytes a column in bf16) serves several one-byte weight rows, and K tiles that keep the float32 products of
    every row at about 32 registers a thread (at one row: four rows of 1,024 columns, the best or within 10% of it
    on Llama-2-7B's layers on an H200)."""
    return _DEFAULT_CONFIGS.get(block_m, (8, 128, 8))


def fp8_gemv_config(n: int, k: int, m: int) -> Tile:
    """The tiling for an ``[n, k]`` e4m3 weight at ``m`` rows: its tuned entry, else :func:`default_config`. Three
    numbers ``(BLOCK_N, BLOCK_K, num_warps)`` select the CUDA-core kernel (float32 products, one row set per
    program); a fourth, ``num_stages``, the tensor-core kernel (the e4m3 tile widened to the activations' 16-bit
    type for ``tl.dot``, 16 rows per tile, loads pipelined over ``num_stages`` K steps); option names
    (:data:`OPTIONS`) may follow."""
    block_m = block_rows(m)
    return _tuned()[1].get((n, k, block_m), default_config(block_m))



def fp8_epilogue_config(n: int, k: int) -> Tile:
    """The one-row tiling of an ``[n, k]`` e4m3 weight's launches with an RMSNorm epilogue (:func:`fp8_gemv`'s
    ``row_scale``, :func:`fp8_residual_norm`): the tiling file's ``epilogue_shapes`` entry ``"N,K"``, else the
    GEMV's one-row tiling. A reader's programs each load the producer's partial sums of squares, so fewer, wider
    programs can pay where the plain launch loses (the gate/up + SiLU reader, docs/benchmarks.md)."""
    return _tuned()[3].get((n, k)) or fp8_gemv_config(n, k, 1)


def fp8_norm_gemv_config(n: int, k: int) -> Tile:
    """The norm-fused GEMV's tiling for an ``[n, k]`` e4m3 weight: the tiling file's ``norm_shapes`` entry
    ``"N,K"``, else the GEMV's one-row tiling (:func:`fp8_gemv_config`). A tensor-core tiling there means
    :func:`default_config` (the norm-fused kernel is a CUDA-core one)."""
    return _tuned()[2].get((n, k)) or fp8_gemv_config(n, k, 1)

def _scale_mode(scale: torch.Tensor, n: int, block: tuple[int, int] | None) -> tuple[int, int, int, int]:
    """(mode, block rows, block cols, scale row stride) for ``scale``: one value, one per output row, or a grid of
    ``block`` tiles."""
    if block is not None:
        if scale.dim() != 2:
            raise ValueError(f"fp8 GEMV: block scales must be a 2-D grid; got shape {tuple(scale.shape)}")
        return SCALE_BLOCK, block[0], block[1], scale.stride(0)
    if scale.numel() == 1:
        return SCALE_TENSOR, 1, 1, 0
    if scale.numel() != n:
        raise ValueError(f"fp8 GEMV: {scale.numel()} weight scales for {n} output rows (need 1 or {n})")
    return SCALE_ROW, 1, 1, 0


def takes_h2(x: torch.Tensor, weight: torch.Tensor, mode: int, block_k: int) -> bool:
    """Whether a tiling with the ``h2`` option runs the packed-half kernel: one contiguous bfloat16 row whose
    width is a multiple of eight and starts 16-byte aligned, e4m3 weights with 8-byte aligned rows, per-tensor or
    per-row scales, ``BLOCK_K`` a multiple of 16 codes; elsewhere the tiling's plain CUDA-core kernel runs."""
    m, k = x.shape
    return (m == 1 and x.dtype == torch.bfloat16 and x.is_contiguous() and k % 8 == 0
            and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0 and weight.stride(0) % 8 == 0
            and mode != SCALE_BLOCK and block_k % 16 == 0)


def scaled_half(x: torch.Tensor) -> torch.Tensor:
    """The scaled float16 copy of bfloat16 rows ``x`` that the one-row h2 kernel reads with ``x_half`` and writes
    with ``half_out``: the values times 2^-8 as float16, as the kernel converts its activations itself (see
    ``H2_SHIFT``). Exact for bfloat16 values above 2^-6 and below 2^24."""
    return (x.float() * 2.0**-8).to(torch.float16)


def h2_epilogue_tile(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None,
                     gated: bool = False) -> tuple[int, int, int] | None:
    """``(BLOCK_N, BLOCK_K, num_warps)`` of the h2 launch that takes an RMSNorm in its epilogue for ``x`` (see
    :func:`fp8_residual_norm`), or None: one row under a one-row tiling with the ``h2`` option, which the h2
    kernel takes (:func:`takes_h2`: a contiguous bfloat16 row, per-tensor or per-row scales)."""
    if x.dim() != 2 or x.shape[0] != 1 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        return None
    numbers, options = split_tile(fp8_epilogue_config(weight.shape[0], x.shape[1]))
    if len(numbers) != 3 or "h2" not in options:
        return None
    try:
        mode = _scale_mode(scale, weight.shape[0], block)[0]
    except ValueError:
        return None
    if gated and weight.shape[0] % 2:
        return None
    return numbers if takes_h2(x, weight, mode, numbers[1]) else None


def _launch(x, weight, scale, block, outputs, config, pdl, gated, x_half=None, half_out=None,
            row_scale: RowScale | None = None, residual_norm: ResidualNorm | None = None):
    m, k = x.shape
    if weight.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(f"fp8 GEMV: weight {tuple(weight.shape)} (rows contiguous) does not fit x {tuple(x.shape)}")
    if scale.dtype != torch.float32:
        raise ValueError(f"fp8 GEMV: weight scales must be float32; got {scale.dtype}")
    if x.stride(1) != 1:
        x = x.contiguous()
    for copy, rows, what in ((x_half, k, "x_half"), (half_out, outputs, "half_out")):
        if copy is not None and (x.dtype != torch.bfloat16 or copy.dtype != torch.float16 or copy.shape != (m, rows)
                                 or not copy.is_contiguous() or copy.data_ptr() % 16):
            raise ValueError(f"fp8 GEMV: {what} must be a contiguous, 16-byte aligned float16 [{m}, {rows}] beside "
                             f"bfloat16 rows; got {copy.dtype} {tuple(copy.shape)} beside {x.dtype}")
    out = torch.empty((m, outputs), dtype=x.dtype, device=x.device)
    if not m:
        return out
    mode, bsn, bsk, stride_sn = _scale_mode(scale, weight.shape[0], block)
    if mode != SCALE_BLOCK:
        scale = scale.contiguous()
    epilogue = row_scale is not None or residual_norm is not None
    numbers, options = split_tile(config or (fp8_epilogue_config(weight.shape[0], k) if epilogue and m == 1
                                             else fp8_gemv_config(weight.shape[0], k, m)))
    if epilogue:
        if len(numbers) != 3 or "h2" not in options or not takes_h2(x, weight, mode, numbers[1]):
            raise ValueError("fp8 GEMV: an RMSNorm epilogue needs one bfloat16 row through an h2 tiling "
                             "(see h2_epilogue_tile)")
        if residual_norm is not None and (gated or residual_norm.residual.shape != (1, outputs)
                                          or not residual_norm.residual.is_contiguous()
                                          or residual_norm.residual.dtype != x.dtype):
            raise ValueError(f"fp8 GEMV: the residual must be a contiguous {x.dtype} [1, {outputs}] row beside an "
                             "ungated projection")
    if len(numbers) == 4 and mode == SCALE_BLOCK and bsk % numbers[1]:
        # the tensor-core kernel takes one block scale per K tile: a tile tuned on per-channel weights (e.g.
        # BLOCK_K 256) narrows to a divisor of the blocks' width, or the CUDA-core kernel (per-column scales) runs
        block_k = math.gcd(numbers[1], bsk)
        numbers = (numbers[0], block_k, *numbers[2:]) if block_k >= 16 else default_config(block_rows(m))
    if "h2p" in options and len(numbers) == 4 and takes_h2(x, weight, mode, numbers[1]):
        block_n, block_k, num_warps, num_stages = numbers
        pre = 2 * block_k if "pre" in options and 2 * block_k < k else 0
        pdl = pdl_for(x, pdl)
        _fp8_gemv_h2p_kernel[(triton.cdiv(outputs, block_n),)](
            x, x.view(torch.int64), weight, weight.view(torch.int64), scale, out, outputs, weight.stride(0),
            weight.stride(0) // 8, K=k, SCALE=mode, GATED=gated, BLOCK_N=block_n, BLOCK_K=block_k,
            STAGES=num_stages, PRE=pre, FB_K=max(16, min(block_k, 512 * num_warps // block_n)),
            EVEN_N=outputs % block_n == 0, PDL=pdl, num_warps=num_warps, **launch_options(pdl))
        if half_out is not None:
            half_out.copy_(scaled_half(out))
        return out
    if "h2p" in options:  # h2p does not apply here: the plain CUDA-core kernel with the tiling's first numbers
        numbers, options = numbers[:3], options - {"h2p", "pre"}
    dot = len(numbers) == 4  # the tensor-core kernel
    # "bits": the tensor-core kernel with per-tensor/per-row scales and bfloat16 activations (the bits form
    # bfloat16 values)
    bits = "bits" in options and dot and mode != SCALE_BLOCK and x.dtype == torch.bfloat16
    if bits:
        weight = weight.view(torch.uint8)
    pdl = pdl_for(x, pdl)
    common = dict(K=k, SCALE=mode, BSN=bsn, BSK=bsk, PDL=pdl, **launch_options(pdl))
    args = (x, weight, scale, out, m, outputs, x.stride(0), weight.stride(0), stride_sn, out.stride(0))
    if dot:
        block_n, block_k, num_warps, num_stages = numbers
        if x.dtype not in (torch.bfloat16, torch.float16) or m > 64:
            raise ValueError(f"fp8 GEMV: the tensor-core tiling takes up to 64 rows of bf16/fp16; got {m} of {x.dtype}")
        if mode == SCALE_BLOCK and bsk % block_k:
            raise ValueError(f"fp8 GEMV: BLOCK_K {block_k} must divide the scale blocks' width {bsk}")
        _fp8_dot_kernel[(triton.cdiv(outputs, block_n),)](
            *args, GATED=gated, BLOCK_M=max(16, block_rows(m)), BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=num_warps, num_stages=num_stages, BITS=bits, **common)
        if half_out is not None:
            half_out.copy_(scaled_half(out))
        return out
    block_n, block_k, num_warps = numbers
    if "h2" in options and takes_h2(x, weight, mode, block_k):
        copies = {}
        if x_half is not None:
            copies.update(X_HALF=True)
        if half_out is not None:
            copies.update(yh_ptr=half_out, Y_HALF=True)
        copies.update(epilogue_arguments(row_scale, residual_norm))
        _fp8_gemv_h2_kernel[(triton.cdiv(outputs, block_n),)](
            x, (x if x_half is None else x_half).view(torch.int64), weight, weight.view(torch.int64), scale, out,
            outputs, weight.stride(0), weight.stride(0) // 8, K=k, SCALE=mode, GATED=gated, BLOCK_N=block_n,
            BLOCK_K=block_k, PDL=pdl, FB_K=max(16, min(block_k, 512 * num_warps // block_n)),
            EVEN_N=outputs % block_n == 0, num_warps=num_warps, **copies, **launch_options(pdl))
        return out
    kernel = _fp8_gemv_silu_mul_kernel if gated else _fp8_gemv_kernel
    kernel[(triton.cdiv(outputs, block_n),)](*args, BLOCK_M=block_rows(m), BLOCK_N=block_n, BLOCK_K=block_k,
                                             num_warps=num_warps, **common)
    if half_out is not None:  # (a kernel without the h2 epilogue ran) the copy from its output
        half_out.copy_(scaled_half(out))
    return out


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None,
             config: Tile | None = None, pdl: bool | None = None, *, x_half: torch.Tensor | None = None,
             half_out: torch.Tensor | None = None, row_scale: RowScale | None = None) -> torch.Tensor:
    """``x @ (weight * scale).T`` for ``x [M, K]`` (bf16/fp16/float32, ``M`` small), e4m3 ``weight [N, K]`` (rows
    contiguous) and float32 ``scale``: one value, one per output row (``[N]`` or ``[N, 1]``), or with ``block =
    (rows, cols)`` a ``[ceil(N / rows), ceil(K / cols)]`` grid. Returns ``[M, N]`` in ``x``'s dtype, rounded once
    from the float32 sum; ``pdl``: launch with programmatic dependent launch (None: decided from ``x``).

    Scaled float16 copies of bfloat16 rows (:func:`scaled_half`): ``x_half``, ``x``'s, which the one-row h2 kernel
    reads in place of converting ``x`` (other kernels ignore it: the same values); ``half_out`` ``[M, N]``, always
    written with the output's (by the h2 kernel's epilogue, else from the output). The same bits either way.

    ``row_scale`` (one bfloat16 row under an h2 tiling: :func:`h2_epilogue_tile`; else ValueError): ``x`` is an
    RMSNorm's input times its weight (a ``ScaledRow``'s ``scaled``, ``kernels/scaled_row.py``), and the products
    are multiplied by the norm's ``1 / rms`` before the rounding."""
    return _launch(x, weight, scale, block, weight.shape[0], config, pdl, gated=False, x_half=x_half,
                   half_out=half_out, row_scale=row_scale)


def fp8_gemv_silu_mul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      block: tuple[int, int] | None = None, config: Tile | None = None,
                      pdl: bool | None = None, *, x_half: torch.Tensor | None = None,
                      half_out: torch.Tensor | None = None, row_scale: RowScale | None = None) -> torch.Tensor:
    """``silu(g) * u`` where ``[g, u] = x @ (weight * scale).T``, in one kernel: the gated MLP's fused gate/up
    projection (``weight [2D, K]``, gate rows first; scales as :func:`fp8_gemv`) and its activation. Returns
    ``[M, D]`` in ``x``'s dtype, rounded as the projection followed by SiLU-and-multiply rounds. ``x_half``,
    ``half_out`` and ``row_scale`` (both projections' sums) as in :func:`fp8_gemv`."""
    n2 = weight.shape[0]
    if n2 % 2:
        raise ValueError("fp8 GEMV: the fused gate/up weight has an even number of rows")
    if block is not None and (n2 // 2) % block[0]:
        raise ValueError(f"fp8 GEMV: gate rows ({n2 // 2}) must fill whole {block[0]}-row scale blocks")
    return _launch(x, weight, scale, block, n2 // 2, config, pdl,
                   gated=True, x_half=x_half, half_out=half_out, row_scale=row_scale)


def fp8_residual_norm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, residual: torch.Tensor,
                      norm_weight: torch.Tensor, pdl: bool | None = None, *, x_half: torch.Tensor | None = None,
                      half_out: torch.Tensor | None = None,
                      config: Tile | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``x @ (weight * scale).T`` of one bfloat16 row added to ``residual`` ``[1, N]`` in place (rounded as the
    fused add + RMSNorm rounds: the product to bfloat16, then the sum), in one h2 launch whose epilogue also returns
    what the next layer's GEMV needs to apply the RMSNorm of that sum itself (:func:`fp8_gemv` with ``row_scale``):
    ``(scaled, square_sums)``, the sum times ``norm_weight`` rounded to bfloat16 ``[1, N]``, and float32 sums of
    the squared sum, one per program. None where :func:`h2_epilogue_tile` has no launch (nothing written: the
    caller projects, then normalizes). ``x_half`` and ``half_out`` (the returned row's scaled float16 copy) as in
    :func:`fp8_gemv`. ``config``: an h2 tiling in place of the tiling file's (tests, A/Bs; another tiling is refused).
    """
    if config is not None:
        numbers, options = split_tile(config)
        if len(numbers) != 3 or "h2" not in options:
            raise ValueError(f"fp8 residual norm: config must be a CUDA-core tiling with the h2 option; got {config}")
        tile = numbers
    else:
        tile = h2_epilogue_tile(x, weight, scale, None)
    if tile is None:
        return None
    square_sums = torch.empty(triton.cdiv(weight.shape[0], tile[0]), dtype=torch.float32, device=x.device)
    scaled = _launch(x, weight, scale, None, weight.shape[0], tile + ("h2",), pdl, gated=False, x_half=x_half,
                     half_out=half_out, residual_norm=ResidualNorm(residual, norm_weight, square_sums))
    return scaled, square_sums


NORM_MAX_COLS = 16384  # the widest row the norm-fused GEMV takes (its K loop holds no whole row)


def fp8_norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                  weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None,
                  gated: bool = False, config: Tile | None = None,
                  pdl: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A one-row RMSNorm and the FP8 layer that reads it, in one launch: ``s = x + residual`` (rounded to ``x``'s
    dtype as the RMSNorm kernel rounds it; ``s = x`` without a residual), then ``(W . (norm_weight * s)) / rms(s)``
    in float32 (:func:`fp8_gemv`'s products; ``gated``: :func:`fp8_gemv_silu_mul`'s) rounded once. Returns
    ``(product, s)``, ``s`` a new tensor (None without a residual); ``x`` and ``residual`` are not written.

    The normed row is never stored: each program streams ``s`` beside its weight rows and sums ``s^2`` in the same
    K loop, and ``1 / rms`` scales each output once. So the normed row is not rounded to the model dtype first, as
    the RMSNorm kernel rounds it: the result differs from the unfused path's by that rounding (relative error of
    the same size as the GEMV's own, below 6e-3 against float32 in bf16). ``config``: the CUDA-core tiling
    (default: the tiling file's ``norm_shapes`` entry for ``"N,K"``, else the GEMV's one-row tiling, else
    :func:`default_config`).
    """
    m, k = x.shape
    if m != 1 or not x.is_contiguous() or k > NORM_MAX_COLS or (residual is not None and not residual.is_contiguous()):
        raise ValueError(f"fp8 norm GEMV: one contiguous row of at most {NORM_MAX_COLS} columns; got {tuple(x.shape)}")
    if weight.shape[1] != k or weight.stride(1) != 1 or scale.dtype != torch.float32:
        raise ValueError(f"fp8 norm GEMV: weight {tuple(weight.shape)} / scales {scale.dtype} do not fit x {(m, k)}")
    outputs = weight.shape[0] // 2 if gated else weight.shape[0]
    mode, bsn, bsk, stride_sn = _scale_mode(scale, weight.shape[0], block)
    if mode != SCALE_BLOCK:
        scale = scale.contiguous()
    numbers, _ = split_tile(config or fp8_norm_gemv_config(weight.shape[0], k))
    block_n, block_k, num_warps = numbers if len(numbers) == 3 else default_config(1)
    out = torch.empty((1, outputs), dtype=x.dtype, device=x.device)
    total = torch.empty_like(x) if residual is not None else None
    pdl = pdl_for(x, pdl)
    _fp8_norm_gemv_kernel[(triton.cdiv(outputs, block_n),)](
        x, residual if residual is not None else x, norm_weight, weight, scale, out,
        total if total is not None else out, outputs, weight.stride(0), stride_sn, eps, K=k, SCALE=mode, BSN=bsn,
        BSK=bsk, HAS_RESIDUAL=residual is not None, GATED=gated, BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl,
        num_warps=num_warps, **launch_options(pdl))
    return out, total
