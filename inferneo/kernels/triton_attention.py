"""Triton kernels for paged attention, with thin launchers.

The KV cache of one layer is ``[2, num_blocks, num_kv_heads, block_size, head_dim]`` (keys, then values): one
KV head of one block is a contiguous ``block_size x head_dim`` tile, so a kernel reading a request's context
touches whole contiguous pages. Three operations:

* ``store_kv``: writes the step's new keys and values into their slots (one launch for both halves).
* ``paged_decode``: one query token per request; each program serves every query head of one KV group, so a
  KV tile is read once per group. Long contexts with few requests are split over several programs
  (flash-decoding) and merged by a small reduction kernel; the split count depends only on tensor shapes.
* ``paged_prefill``: causal attention of multi-token spans over their cached prefix plus their own tokens (which
  ``store_kv`` has already written), flash-attention style, all spans in one launch driven by a tile schedule.

All softmax arithmetic is in float32 (base-2 exponentials); float32 inputs use IEEE dot products, not TF32.

An FP8 cache (float8 e4m3 with per-KV-head scales, ``inferneo.attention.fp8_kv``) is a compile-time switch too:
``store_kv`` quantizes (``x / scale``, saturated to +-448, rounded to nearest even), and the attention kernels
convert each loaded tile to the query dtype in registers, fold the key scale into the score scale and apply the
value scale to the output, so that no de-quantized copy of the cache is ever made.

Per-layer options, each a compile-time switch so the plain kernels are unchanged without them: a sliding window
(a query at position ``p`` sees keys ``p - W < j <= p``; decode scans and splits only the window), logit
soft-capping (``c * tanh(score / c)``) and attention sinks (one logit per head added to the softmax denominator;
with split decoding it joins once, in the reduction).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from inferneo import envs
from inferneo.attention.fp8_kv import KVCacheScales, is_fp8_kv_cache
from inferneo.kernels._pdl import early_extra_options, launch_options, pdl_for, wait_for_previous_kernel
from inferneo.kernels.triton_fp8_gemv import _INTERPRETED, _e4m3_to_bf16, _e4m3_to_f16

_LOG2E = 1.4426950408889634
# The float16 dots of an FP8 cache read with bfloat16 queries (``fp8_widen`` 2): the queries times 2^-4 in float16
# (exact from 2^-13 in magnitude, finite up to about 2^20), the score scale times 2^4.
F16_Q_SHIFT: tl.constexpr = tl.constexpr(2.0**-4)
F16_Q_UNSHIFT: tl.constexpr = tl.constexpr(2.0**4)
# Two bfloat16 (one register) to float16 times 2^-4: widened to float32, multiplied, then rounded once.
_BF16_TO_F16_SHIFTED_ASM: tl.constexpr = tl.constexpr("""{
    .reg .b32 lo, hi;
    shl.b32 lo, $1, 16;
    and.b32 hi, $1, 0xFFFF0000;
    mul.rn.f32 lo, lo, 0f3D800000;
    mul.rn.f32 hi, hi, 0f3D800000;
    cvt.rn.f16x2.f32 $0, hi, lo;
    }""")


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a fixed 8 elsewhere, e.g. under Triton's interpreter)."""
    if device.type != "cuda":
        return 8
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


# ---- store ----------------------------------------------------------------------------------------------------


@triton.jit
def _round_to_e4m3(x):
    """float32 ``x`` rounded to nearest even on e4m3's grid (3 mantissa bits; steps of 2^-9 below 2^-6), so that
    the cast to float8 that follows is exact: the same rounding as PyTorch's on every device (Triton's
    interpreter rounds its own float8 casts differently)."""
    bits = x.to(tl.int32, bitcast=True)
    magnitude = bits & 0x7FFFFFFF
    sign = bits ^ magnitude  # the sign bit alone (kept through the rounding: -0.0 stays -0.0)
    normal = (magnitude + 0x7FFFF + ((magnitude >> 20) & 1)) & -0x100000  # 3 mantissa bits, ties to even
    magic = 24576.0  # 1.5 * 2^14: its float32 spacing is 2^-9, e4m3's subnormal step
    small = ((magnitude.to(tl.float32, bitcast=True) + magic) - magic).to(tl.int32, bitcast=True)
    rounded = tl.where(magnitude < 0x3C800000, small, normal)  # below 2^-6: e4m3's subnormals
    return (rounded | sign).to(tl.float32, bitcast=True)


@triton.jit
def to_cache(x, scale, cache_ptr, FP8: tl.constexpr):
    """``x`` as the cache stores it: FP8 ``e4m3(clamp(x / scale, -448, 448))`` (``fp8_kv``), else a cast."""
    if FP8:
        y = _round_to_e4m3(x.to(tl.float32) / scale)
        return tl.minimum(tl.maximum(y, -448.0), 448.0).to(cache_ptr.dtype.element_ty)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_half, stride_blk, stride_ch, stride_off,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr, FP8: tl.constexpr = False,
                     EARLY: tl.constexpr = False):
    wait_for_previous_kernel(PDL, EARLY=EARLY)  # EARLY: INFERNEO_PDL_EARLY_EXTRA=store
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]  # this program's BLOCK_H heads of the token
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM) & (slot >= 0)
    key = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    value = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    if FP8:  # one scale per KV head
        k_scale = tl.load(k_scale_ptr + h, mask=h < NUM_KV_HEADS, other=1.0)
        v_scale = tl.load(v_scale_ptr + h, mask=h < NUM_KV_HEADS, other=1.0)
    else:
        k_scale = 1.0
        v_scale = 1.0
    dst = cache_ptr + blk * stride_blk + h * stride_ch + off * stride_off + d
    tl.store(dst, to_cache(key, k_scale, cache_ptr, FP8), mask=mask)
    tl.store(dst + stride_half, to_cache(value, v_scale, cache_ptr, FP8), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             pdl: bool | None = None, kv_scales: KVCacheScales | None = None) -> None:
    """Write ``k``/``v`` ([T, Hkv, D], last dim contiguous) into ``kv_cache`` at ``slot_mapping`` ([T] int64).

    A negative slot skips its token. ``pdl``: launch with programmatic dependent launch (None: decided from ``k``,
    see ``_pdl.pdl_for``). An FP8 cache stores ``k / kv_scales.k`` (per KV head) quantized, as
    ``fp8_kv.quantize_kv`` does.
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    pdl = pdl_for(k, pdl)
    k_scale, v_scale = kv_scale_args(kv_cache, kv_scales, num_kv_heads)
    block_h = store_kv_heads_per_program(num_tokens, num_kv_heads)
    _store_kv_kernel[(num_tokens, triton.cdiv(num_kv_heads, block_h))](
        k, v, kv_cache, slot_mapping, k_scale, v_scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *_cache_strides(kv_cache),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=kv_cache.shape[3],
        BLOCK_H=block_h, BLOCK_D=_block_d(head_dim), PDL=pdl,
        FP8=is_fp8_kv_cache(kv_cache), num_warps=4 if block_h * head_dim >= 2048 else 1,
        **early_extra_options("store", pdl), **launch_options(pdl),
    )


STORE_KV_MIN_PROGRAMS = 16


def store_kv_heads_per_program(num_tokens: int, num_kv_heads: int) -> int:
    """KV heads a ``store_kv`` program writes (a power of two): all of a token's heads once there are enough
    tokens to fill the GPU, fewer at a few tokens (a decode step at batch 1), so that at least
    ``STORE_KV_MIN_PROGRAMS`` programs share the work instead of one program converting every element (the
    FP8 cache's e4m3 rounding is a dozen instructions an element). ``INFERNEO_STORE_KV_HEADS`` (read at each launch)
    forces a count; every split writes the same bytes."""
    every = triton.next_power_of_2(num_kv_heads)
    forced = envs.store_kv_heads()
    if forced:
        return min(triton.next_power_of_2(forced), every)
    per_token = -(-STORE_KV_MIN_PROGRAMS // num_tokens)  # programs wanted for each token (num_tokens >= 1)
    return max(1, every // triton.next_power_of_2(per_token))


# ---- shared tile step -----------------------------------------------------------------------------------------


@triton.jit
def _from_cache(x, q, FP8: tl.constexpr, VALUES: tl.constexpr = False, WIDEN: tl.constexpr = 0):
    """A loaded cache tile in ``q``'s dtype: FP8 elements converted in registers (their scales are applied to the
    scores and the output), other caches unchanged.

    For bfloat16 queries the e4m3 bytes are widened by integer operations (``triton_fp8_gemv._e4m3_to_bf16``: the
    same values, exactly; Triton's own cast goes e4m3 -> float16 -> float32 -> bfloat16, one slow float32 ->
    bfloat16 conversion per element). ``VALUES``: a value tile, the second dot's operand transposed (its reduction
    runs over tokens, not over contiguous bytes): widened where it is loaded, so that it is staged in shared memory
    as bfloat16 and read back by the transposing matrix loads; left to Triton, the widening moves after the
    staging and the transposed byte operand is gathered one byte a load. Key tiles are widened after the staging,
    in the dot operand's layout (their bytes are contiguous along the reduction). ``WIDEN`` 1: the candidate
    widening in fewer instructions (``_e4m3_to_bf16``'s ``SIGN``). ``WIDEN`` 2: the queries were made float16 by
    :func:`_f16_queries`; the tiles are converted to float16 by the hardware conversion (``_e4m3_to_f16``: one
    instruction a pair of values, exact), values again where they are loaded."""
    if FP8:
        if q.dtype == tl.bfloat16:
            x = _e4m3_to_bf16(x.to(tl.uint8, bitcast=True), not VALUES, WIDEN == 1)
        elif WIDEN == 2:
            if q.dtype == tl.float16:
                x = _e4m3_to_f16(x.to(tl.uint8, bitcast=True), not VALUES)
            else:
                x = x.to(q.dtype)
        else:
            x = x.to(q.dtype)
    return x  # one return: Triton types every return of a function alike, constexpr branches included


@triton.jit
def _f16_queries(q, qk_scale, FP8: tl.constexpr, WIDEN: tl.constexpr):
    """``WIDEN`` 2 with an FP8 cache: bfloat16 queries as float16 times 2^-4 (exact for magnitudes from 2^-13 up to
    about 10^6, where the float16 form would overflow; smaller ones keep an absolute error under 2^-21, beside
    bfloat16's own rounding of the query) and the score scale times 2^4, so that both dots run in float16 on tiles the hardware converts from e4m3 (every e4m3
    value is a float16) and the probabilities are rounded to float16 (3 more bits than bfloat16) for the second
    dot. Other cases: unchanged."""
    if FP8 and WIDEN == 2 and q.dtype == tl.bfloat16:
        if _INTERPRETED:
            q = (q.to(tl.float32) * F16_Q_SHIFT).to(tl.float16)
        else:  # in PTX: written as Triton ops, the compiler converted to float16 first and multiplied after
            # (HMUL2 by 0.0625), so queries above 65504 became inf (seen on an H200, 2026-12-04)
            q = tl.inline_asm_elementwise(asm=_BF16_TO_F16_SHIFTED_ASM, constraints="=r,r", args=[q],
                                          dtype=tl.float16, is_pure=True, pack=2)
        qk_scale = qk_scale * F16_Q_UNSHIFT
    return q, qk_scale


@triton.jit
def _attend_tile(q, m_i, l_i, acc, key, value, valid, qk_scale, softcap_log2,
                 USE_DOT: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr = False,
                 MAY_BE_EMPTY: tl.constexpr = False):
    """One online-softmax step: ``q`` [M, D] against ``key``/``value`` [N, D] with ``valid`` [M, N].

    Scores come out in base-2 units: ``s * qk_scale``, or with ``SOFTCAP`` ``softcap_log2 * tanh(s * qk_scale)``
    (the launcher passes ``qk_scale = scale / c`` and ``softcap_log2 = c * log2(e)``). ``MAY_BE_EMPTY``: a row
    may have no valid key in this tile and none before (a sliding window), so a running max of -inf is guarded.
    """
    if USE_DOT:
        s = tl.dot(q, tl.trans(key), input_precision=PRECISION)
    else:
        s = tl.sum(q[:, None, :].to(tl.float32) * key[None, :, :].to(tl.float32), axis=2)
    if SOFTCAP:
        x = s * qk_scale
        s = softcap_log2 * (1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0))  # c * tanh(x), base 2
    else:
        s = s * qk_scale
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if MAY_BE_EMPTY:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
    else:
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if USE_DOT:
        pv = tl.dot(p.to(value.dtype), value, input_precision=PRECISION)
    else:
        pv = tl.sum(p[:, :, None] * value[None, :, :].to(tl.float32), axis=1)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


# ---- decode ---------------------------------------------------------------------------------------------------


@triton.jit
def _merge_splits(part_ptr, lse_ptr, out_ptr, sinks_ptr, b, h, stride_ob, stride_oh, NUM_HEADS: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                  SINKS: tl.constexpr, VOLATILE: tl.constexpr, PARALLEL: tl.constexpr = False):
    """Head ``h`` of request ``b``: its splits' partial outputs weighted by their log-sum-exps, into ``out``. Empty
    splits (log-sum-exp -inf, partial output 0) weigh 0, and their partial rows are not read, or with ``PARALLEL``
    read beside the log-sum-exps (not after them: one dependent load less; every split stores its rows, an empty
    one zeros) and taken as 0. ``VOLATILE``: the partials were written by other programs of the same kernel (read
    from L2, not L1)."""
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < NUM_SPLITS
    row = (b * NUM_HEADS + h) * NUM_SPLITS + s
    lse = tl.load(lse_ptr + row, mask=smask, other=float("-inf"), volatile=VOLATILE)
    if PARALLEL:
        every = tl.load(part_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=smask[:, None] & (d < HEAD_DIM)[None, :],
                        other=0.0, volatile=VOLATILE)
    if SINKS:  # the sink joins the denominator once, here, not in every split
        sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
        top = tl.maximum(tl.max(lse, axis=0), sink)
        weight = tl.exp2(lse - top)
        weight = weight / (tl.sum(weight, axis=0) + tl.exp2(sink - top))
    else:
        weight = tl.exp2(lse - tl.max(lse, axis=0))
        weight = weight / tl.sum(weight, axis=0)
    has = smask & (lse != float("-inf"))
    if PARALLEL:
        part = tl.where(has[:, None] & (d < HEAD_DIM)[None, :], every, 0.0)
    else:
        part = tl.load(part_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=has[:, None] & (d < HEAD_DIM)[None, :],
                       other=0.0, volatile=VOLATILE)
    out = tl.sum(part * weight[:, None], axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _norm_rope_rows(x_ptrs, d, dmask, w_ptr, cos, sin, eps, HEAD_DIM: tl.constexpr, WEIGHT_OFFSET: tl.constexpr,
                    row_mask):
    """Rows ``[R, D]`` of heads at ``x_ptrs + d`` through the per-head RMSNorm of weight ``w_ptr`` and the rotary
    embedding (rotate-half layout, ``cos``/``sin`` ``[1, D]`` indexed by ``d % (D / 2)``), with the arithmetic and
    roundings of ``_triton_elementwise._rotary_kernel`` (its two half sums, ``RMSNorm``'s rounding to the model
    dtype, the rotation in float32); returns them in the model dtype."""
    half: tl.constexpr = HEAD_DIM // 2
    first = d < half
    partner = tl.where(first, d + half, d - half)
    mask = row_mask & dmask
    x = tl.load(x_ptrs + d, mask=mask, other=0.0)
    p = tl.load(x_ptrs + partner, mask=mask, other=0.0)
    xf, pf = x.to(tl.float32), p.to(tl.float32)
    sq = xf * xf
    total = tl.sum(tl.where(first & dmask, sq, 0.0), axis=1) + tl.sum(tl.where(first | ~dmask, 0.0, sq), axis=1)
    rstd = 1.0 / tl.sqrt(total / HEAD_DIM + eps)[:, None]
    w = tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    wp = tl.load(w_ptr + partner, mask=dmask, other=0.0).to(tl.float32)
    if WEIGHT_OFFSET:
        xn = (xf * rstd * (1.0 + w)).to(x.dtype).to(tl.float32)
        pn = (pf * rstd * (1.0 + wp)).to(x.dtype).to(tl.float32)
    else:
        xn = (w * (xf * rstd).to(x.dtype).to(tl.float32)).to(x.dtype).to(tl.float32)
        pn = (wp * (pf * rstd).to(x.dtype).to(tl.float32)).to(x.dtype).to(tl.float32)
    return tl.where(first, xn * cos - pn * sin, xn * cos + pn * sin).to(x.dtype)


@triton.jit
def _prefetch_blocks(table, head_base, stride_blk, stride_half, start, end, row_bytes, BLOCK_N: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr):
    """Ask L2 for the key and value rows of tokens ``[start, min(start + BLOCK_N, end))`` of one KV head: one bulk
    prefetch per cache block and half, from the block's first row (a block's rows of one head are ``row_bytes``
    apart, 16-byte multiples). A hint only: what the kernel then reads is unchanged, rows written meanwhile included
    (L2 is where writes land)."""
    NB: tl.constexpr = (BLOCK_N + BLOCK_SIZE - 1) // BLOCK_SIZE
    j = tl.arange(0, NB)
    first = start + j * BLOCK_SIZE  # blocks start at multiples of BLOCK_SIZE (the splits do: BLOCK_N multiples)
    rows = tl.minimum(end - first, BLOCK_SIZE)
    blk = tl.load(table + first // BLOCK_SIZE, mask=rows > 0, other=0)
    nbytes = tl.maximum(rows, 0) * row_bytes
    for half in tl.static_range(2):
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [head_base + blk * stride_blk + half * stride_half, nbytes.to(tl.int32)], dtype=tl.int32,
            is_pure=False, pack=1)


@triton.jit
def _decode_kernel(q_ptr, cache_ptr, table_ptr, lens_ptr, out_ptr, part_ptr, lse_ptr, sinks_ptr, k_scale_ptr,
                   v_scale_ptr, tickets_ptr, qk_scale, softcap_log2, window,
                   stride_qb, stride_qh, stride_ob, stride_oh, stride_tb,
                   stride_half, stride_blk, stride_ch, stride_off, tokens_per_split,
                   NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr,
                   PRECISION: tl.constexpr, PDL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                   SINKS: tl.constexpr, FP8: tl.constexpr = False, FUSED_REDUCE: tl.constexpr = False,
                   WIDEN: tl.constexpr = 0, BLOCK_S: tl.constexpr = 1, k_ptr=None, v_ptr=None, pos_ptr=None,
                   cos_ptr=None, sin_ptr=None, qw_ptr=None, kw_ptr=None, slot_ptr=None, stride_kb=0, stride_cos=0,
                   rope_eps=0.0,
                   ROTARY: tl.constexpr = False, WEIGHT_OFFSET: tl.constexpr = False, PRELOAD: tl.constexpr = False,
                   L2_PREFETCH: tl.constexpr = False, PREFETCH_N: tl.constexpr = 64):
    if not PRELOAD:
        wait_for_previous_kernel(PDL, EARLY=True)  # the reduction or the output GEMV after it may launch now
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if FP8:  # the head's key scale joins the score scale; its value scale multiplies the output
        qk_scale = qk_scale * tl.load(k_scale_ptr + kvh)
        v_scale = tl.load(v_scale_ptr + kvh)
    seq_len = tl.load(lens_ptr + b).to(tl.int32)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    start = split * tokens_per_split
    if WINDOW:  # the splits cover the window only: [seq_len - window, seq_len)
        start += tl.maximum(seq_len - window, 0)
    end = tl.minimum(start + tokens_per_split, seq_len)
    if ROTARY:  # q/k/v straight from the projection: the q/k norms and rotary here, the new K/V into the cache
        last = seq_len - 1
        pos = tl.load(pos_ptr + b).to(tl.int64)
        half: tl.constexpr = HEAD_DIM // 2
        dr = tl.where(d < half, d, d - half)[None, :]
        cos = tl.load(cos_ptr + pos * stride_cos + dr, mask=dmask[None, :], other=0.0)
        sin = tl.load(sin_ptr + pos * stride_cos + dr, mask=dmask[None, :], other=0.0)
        q = _norm_rope_rows(q_ptr + b * stride_qb + heads[:, None] * stride_qh, d[None, :], dmask[None, :], qw_ptr,
                            cos, sin, rope_eps, HEAD_DIM, WEIGHT_OFFSET, gmask[:, None])
        one = tl.arange(0, 1)[:, None]
        new_key = _norm_rope_rows(k_ptr + b * stride_kb + kvh * HEAD_DIM + one * 0, d[None, :], dmask[None, :], kw_ptr,
                                  cos, sin, rope_eps, HEAD_DIM, WEIGHT_OFFSET, one == 0)
        new_value = tl.load(v_ptr + b * stride_kb + kvh * HEAD_DIM + one * 0 + d[None, :], mask=dmask[None, :],
                            other=0.0)
        slot = tl.load(slot_ptr + b)
        if (start <= last) & (last < end) & (slot >= 0):  # this split holds the new token: it writes its K/V
            page = cache_ptr + kvh * stride_ch + (slot // BLOCK_SIZE) * stride_blk + (slot % BLOCK_SIZE) * stride_off
            tl.store(page + one * 0 + d[None, :], new_key.to(cache_ptr.dtype.element_ty), mask=dmask[None, :])
            tl.store(page + stride_half + one * 0 + d[None, :], new_value.to(cache_ptr.dtype.element_ty),
                     mask=dmask[None, :])
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = table_ptr + b * stride_tb
    head_base = cache_ptr + kvh * stride_ch
    if PRELOAD:  # (not with ROTARY) the length read above, before the wait; with L2_PREFETCH the first tile's
        # block ids read and its cache blocks asked into L2 there too (see paged_decode); then as usual
        if L2_PREFETCH:  # PREFETCH_N tokens from the split's start
            _prefetch_blocks(table, head_base, stride_blk, stride_half, start, end,
                             stride_off * (cache_ptr.dtype.element_ty.primitive_bitwidth // 8), PREFETCH_N,
                             BLOCK_SIZE)
        wait_for_previous_kernel(PDL, EARLY=True)
    if not ROTARY:
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0)
    q, qk_scale = _f16_queries(q, qk_scale, FP8, WIDEN)
    for kv0 in range(start, end, BLOCK_N):
        tok = kv0 + tl.arange(0, BLOCK_N)
        tmask = tok < end
        blk = tl.load(table + tok // BLOCK_SIZE, mask=tmask, other=0)
        rows = head_base + blk * stride_blk + (tok % BLOCK_SIZE) * stride_off
        lmask = tmask[:, None] & dmask[None, :]
        key = _from_cache(tl.load(rows[:, None] + d[None, :], mask=lmask, other=0.0), q, FP8, False, WIDEN)
        value = _from_cache(tl.load(rows[:, None] + stride_half + d[None, :], mask=lmask, other=0.0), q, FP8,
                            True, WIDEN)
        if ROTARY:  # the new token's K/V from registers (its cache row is written by this program, maybe not yet)
            is_new = (tok == last)[:, None]
            key = tl.where(is_new, new_key, key)
            value = tl.where(is_new, new_value, value)
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, key, value, tmask[None, :], qk_scale, softcap_log2,
                                     USE_DOT, PRECISION, SOFTCAP)
    if FP8:
        acc = acc * v_scale
    omask = gmask[:, None] & dmask[None, :]
    if NUM_SPLITS == 1:
        if SINKS:  # base-2 sink logits join the denominator
            sink = tl.load(sinks_ptr + heads, mask=gmask, other=0.0).to(tl.float32) * 1.4426950408889634
            l_i = l_i + tl.exp2(sink - m_i)
        out = acc / l_i[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        has = l_i > 0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        row = (b * NUM_HEADS + heads) * NUM_SPLITS + split
        tl.store(part_ptr + row[:, None] * HEAD_DIM + d[None, :], out, mask=omask)
        tl.store(lse_ptr + row, tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf")), mask=gmask)
        if FUSED_REDUCE:  # the last split of (b, kvh) to finish (an atomic ticket) merges the group's heads
            tl.debug_barrier()  # every thread's partials stored before the ticket is taken (release)
            slot = tickets_ptr + b * tl.num_programs(1) + kvh
            ticket = tl.atomic_add(slot, 1, sem="acq_rel")
            if ticket == NUM_SPLITS - 1:  # the others have all stored theirs
                tl.store(slot, 0)  # ready for the next launch (CUDA-graph replays included)
                for gi in tl.static_range(GROUP):
                    _merge_splits(part_ptr, lse_ptr, out_ptr, sinks_ptr, b, kvh * GROUP + gi, stride_ob, stride_oh,
                                  NUM_HEADS, NUM_SPLITS, HEAD_DIM, BLOCK_S, BLOCK_D, SINKS, True)


@triton.jit
def _decode_reduce_kernel(part_ptr, lse_ptr, out_ptr, sinks_ptr, stride_ob, stride_oh,
                          NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr, SINKS: tl.constexpr,
                          PARALLEL: tl.constexpr = False):
    wait_for_previous_kernel(PDL, EARLY=True)  # the output GEMV may launch and read its weights now
    _merge_splits(part_ptr, lse_ptr, out_ptr, sinks_ptr, tl.program_id(0), tl.program_id(1), stride_ob, stride_oh,
                  NUM_HEADS, NUM_SPLITS, HEAD_DIM, BLOCK_S, BLOCK_D, SINKS, False, PARALLEL)


class QKRotary(NamedTuple):
    """What :func:`paged_decode` needs to apply a layer's q/k norms and rotary embedding itself (``qk_rotary``):
    the raw key and value heads ``[B, Hkv, D]`` (views of the projection output, like the query), each request's
    position and cache slot ``[B]``, the rotary tables ``[P, D/2]``, the norms' weights ``[D]`` and ``eps``;
    ``weight_offset``: Gemma's ``x * (1 + w)``."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    q_weight: torch.Tensor
    k_weight: torch.Tensor
    eps: float
    weight_offset: bool = False


_TICKETS = 4096
"""(request, KV head) pairs the fused split merge keeps tickets for (more: the separate reduction kernel)."""


@functools.cache
def _decode_tickets(device: torch.device) -> torch.Tensor:
    """The fused split merge's atomic tickets on ``device``: zeros, left at zero by every launch (a launch's
    programs of one (request, KV head) pair count their finished splits in one slot, the last one resets it).
    Launches on one stream run one after another (a dependent launch waits for its predecessor before it takes a
    ticket), so every layer shares them."""
    return torch.zeros(_TICKETS, dtype=torch.int32, device=device)


def decode_block_n(max_len: int) -> int:
    """Tokens per decode tile: 64, or the context width rounded up to a power of two when smaller (>= 16)."""
    return max(16, min(64, triton.next_power_of_2(max_len)))


# Programs per SM below which an FP8 cache's unsplit decode takes 32-token tiles and 2 warps (see below).
_FP8_NARROW_TILES_BELOW = 16


def narrow_fp8_decode_tiles(kv_cache: torch.Tensor, num_programs: int, num_sms: int) -> bool:
    """Whether an FP8 cache's decode takes 32-token tiles with 2 warps: when its (request, KV head) programs need
    no split (at least one per SM) but are few a SM (under 16). Measured on an H100 (Llama-2-7B's 32 KV heads,
    e4m3 cache): at 32 requests x 1,040 tokens (8 programs a SM) 118 us a layer against 138 for 64-token tiles and
    4 warps, and the batch-32 decode step, as shipped, 7.40 ms against 7.74 with W4A16 weights, 8.34 against 8.85
    with FP8 weights; at 200 requests x 640 tokens (48 a SM) 410 us against 392, so not there (docs/benchmarks.md, "The
    decode launch for an FP8 cache at 32 requests"). More programs in flight a SM, each with fewer registers, keep
    more of the narrow FP8 loads in the air."""
    return is_fp8_kv_cache(kv_cache) and num_sms <= num_programs < _FP8_NARROW_TILES_BELOW * num_sms


def default_fp8_widen(kv_cache: torch.Tensor, q: torch.Tensor) -> int:
    """How a decode launch widens an FP8 cache's tiles (``fp8_widen``; ``INFERNEO_FP8_KV_WIDEN`` when set): float16
    dots on hardware-converted tiles (2) for bfloat16 queries, else 0. Measured on an H100 (Llama-2-7B, 1,040 tokens
    of context, W4A16 weights + FP8 KV): the batch-32 step 6.94 against 7.13 ms, the batch-1 step 2.17 against
    2.20 ms (decode kernels 318 against 348 us a step); 32 launches in a CUDA graph at one request 9.1-10.1 against
    11.3-11.5 us each, at four 22.7-24.8 against 29.8 (docs/benchmarks.md, "The FP8 KV cache's float16 dots in
    decode")."""
    forced = envs.fp8_kv_widen()
    if forced is not None:
        return forced
    return 2 if is_fp8_kv_cache(kv_cache) and q.dtype == torch.bfloat16 else 0


def _prefill_fp8_widen() -> int:
    """The prefill kernel's widening of an FP8 cache: ``INFERNEO_FP8_KV_WIDEN`` when set, else 0 (the float16 form
    measured 2% slower there on an H200)."""
    forced = envs.fp8_kv_widen()
    return 0 if forced is None else forced


def choose_num_splits(batch: int, num_kv_heads: int, max_len: int, block_n: int, num_sms: int,
                      split_tiles: int | None = None) -> int:
    """Splits of the context for flash-decoding, from static shapes only.

    No split once there are about as many (request, KV head) programs as SMs; otherwise enough splits to give
    every SM four programs, each split at least one tile, at most 64 splits, but splits of two tiles where that
    still leaves two programs per SM. The width is the block table's (the longest context a CUDA graph may see),
    so short contexts leave trailing splits empty; four programs per SM keeps enough of them busy (H100, batch 1:
    two per SM left a 1040-token context on 5 of 8 splits). Measured at batch 1 on an H200 (2 warps, a 2,048-token
    table, 1,040 tokens of context): 16 KV heads (one rank's at TP=2), 16 splits of two tiles 7.9 us a layer
    against 8.6 for 32 of one; 32 heads, 10.5 against 12.9; but 8 KV heads (Llama-3-8B), 7.2 for 32 splits of
    one tile against 8.0 for 16 of two.

    ``split_tiles`` (``INFERNEO_DECODE_SPLIT_TILES`` when None; 0: the rule above alone): at least that many tiles
    a split whenever the rule splits (a benchmark's override).
    """
    programs = batch * num_kv_heads
    tiles = triton.cdiv(max_len, block_n)
    if programs >= num_sms or tiles < 2:
        return 1
    want = min(triton.cdiv(4 * num_sms, programs), tiles, 64)
    want = min(want, max(tiles // 2, triton.cdiv(2 * num_sms, programs)))  # two tiles a split, if SMs stay busy
    if split_tiles is None:
        split_tiles = envs.decode_split_tiles()
    if split_tiles > 1:
        want = min(want, triton.cdiv(tiles, split_tiles))
    return triton.cdiv(tiles, triton.cdiv(tiles, want))


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 scale: float, out: torch.Tensor, num_splits: int | None = None, use_dot: bool | None = None,
                 block_n: int | None = None, num_warps: int | None = None, pdl: bool | None = None, *,
                 sliding_window: int | None = None, logit_softcap: float | None = None,
                 sinks: torch.Tensor | None = None, kv_scales: KVCacheScales | None = None,
                 fused_reduce: bool | None = None, qk_rotary: QKRotary | None = None, fp8_widen: int | None = None,
                 num_stages: int | None = None) -> None:
    """Attention of one query token per request (``q`` [B, H, D]) over its cached context, into ``out``.

    ``block_tables`` [B, W] int64, ``seq_lens`` [B] int64 (>= 1). Capturable in a CUDA graph: the grid and split
    count depend only on shapes. ``num_splits`` and ``use_dot`` (tensor-core scores, padding the query group to
    16 rows; default for groups > 1 and for half precision), ``block_n`` (tokens per tile), ``num_warps`` and
    ``num_stages`` (Triton's pipelining depth, 2 unless set) override the heuristics, for benchmarks, as does
    ``INFERNEO_DECODE_LAUNCH`` (``envs.decode_launch``) for what the call leaves unset. ``pdl``: launch with
    programmatic dependent launch (None: decided from ``q``, see ``_pdl.pdl_for``). ``sliding_window``,
    ``logit_softcap`` and ``sinks`` (``[H]``) as in ``AttentionBackend.forward``; with a window the splits cover
    only the last ``sliding_window`` tokens. An FP8 cache is read as ``stored * kv_scales`` (per KV head),
    converted in registers tile by tile. ``fused_reduce``
    (``INFERNEO_DECODE_FUSED_REDUCE`` when None; unset: at one request with one query head per KV head): a split
    decode merges its splits in the decode kernel itself (the last split of each request and KV head to finish, by
    an atomic ticket, merges that group's heads) instead of a second launch; the same arithmetic as the reduction kernel. ``qk_rotary`` (a :class:`QKRotary`): ``q`` is
    the q/k/v projection's raw query heads; every program applies the per-head q/k RMSNorms and the rotary
    embedding to its own query heads (as ``_triton_elementwise.qk_norm_rotary_inplace`` does), and the program
    whose split holds the new token writes its rotated key and its value to the cache at ``slot_mapping`` and
    attends to them from registers: that launch is not needed at a decode-only step. ``fp8_widen`` (None:
    ``INFERNEO_FP8_KV_WIDEN``), an FP8 cache read with bfloat16 queries: 0 widened to bfloat16 by integer operations,
    1 the same by the candidate ``_e4m3_to_bf16(SIGN=True)`` (same bits), 2 float16 dots on tiles converted by the
    hardware (``_f16_queries``).

    ``INFERNEO_PREWAIT_LOADS`` with ``decode`` (the default; read at each launch): each program reads its request's
    length and block table before it waits for the kernel before it (programmatic dependent launch), and on CUDA
    asks L2 for its first tile's cache blocks there (a bulk prefetch: a hint, so the row the step itself writes is
    still read as written); the same bits as without. Not that prefetch on an FP8 cache at more than one request
    (``_l2_prefetch_ok``); ``INFERNEO_DECODE_PREFETCH_TILES`` sets how many of the split's tiles that prefetch
    covers (default 1; 0 the whole split). With ``reduce`` (opt-in), the split reduction reads its partials beside
    their log-sum-exps: the same terms, summed in another order (one bf16 ulp apart at times).
    """
    batch, num_heads, head_dim = q.shape
    if batch == 0:
        return
    q = _last_dim_contiguous(q)
    num_kv_heads, block_size = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    max_len = block_tables.shape[1] * block_size
    if sliding_window is not None:
        max_len = min(max_len, sliding_window)  # the longest span a query scans
    tuned = envs.decode_launch()  # INFERNEO_DECODE_LAUNCH: benchmark A/Bs of the launch
    block_n = block_n or tuned.get("block_n")
    num_splits = num_splits or tuned.get("num_splits")
    num_warps = num_warps or tuned.get("num_warps")
    num_stages = num_stages or tuned.get("num_stages", 2)
    num_sms = device_sm_count(q.device)
    if block_n is None and narrow_fp8_decode_tiles(kv_cache, batch * num_kv_heads, num_sms):
        block_n, num_warps = min(32, decode_block_n(max_len)), num_warps or 2
    block_n = block_n or decode_block_n(max_len)
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, max_len, block_n, num_sms)
    num_splits = max(1, min(num_splits, triton.cdiv(max_len, block_n)))
    tokens_per_split = triton.cdiv(triton.cdiv(max_len, num_splits), block_n) * block_n
    num_splits = triton.cdiv(max_len, tokens_per_split)
    if use_dot is None:  # on the H100 the padded tensor-core path beat elementwise scores for MHA in half precision
        use_dot = group > 1 or q.dtype != torch.float32
    if num_warps is None:  # split steps (few requests) in half precision: 2 warps beat 4 by 0.3-0.9 us a layer
        num_warps = 2 if use_dot and q.dtype != torch.float32 and num_splits > 1 else 4  # (H200, batch 1)
    block_g = max(16, triton.next_power_of_2(group)) if use_dot else 1
    block_d = _block_d(head_dim)
    pdl = pdl_for(q, pdl)
    if fused_reduce is None:
        fused_reduce = envs.decode_fused_reduce()
    if fused_reduce is None:  # the default (envs.decode_fused_reduce): one request, one query head per KV head
        fused_reduce = batch == 1 and group == 1
    fused_reduce = fused_reduce and num_splits > 1 and batch * num_kv_heads <= _TICKETS
    if num_splits > 1:
        part = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        part = lse = out  # unused
    tickets = _decode_tickets(q.device) if fused_reduce else lse
    qk_scale, softcap_log2 = _score_scales(scale, logit_softcap)
    sinks_arg = _sinks_arg(sinks, num_heads, q)
    k_scale, v_scale = kv_scale_args(kv_cache, kv_scales, num_kv_heads)
    rotary = {}
    if qk_rotary is not None:
        r = qk_rotary
        assert not is_fp8_kv_cache(kv_cache) and kv_cache.dtype == q.dtype and head_dim % 2 == 0
        assert r.k.stride(-1) == 1 and r.v.stride(0) == r.k.stride(0) and r.k.stride(1) == head_dim
        assert r.cos.stride(-1) == 1 and r.cos.stride() == r.sin.stride() and q.stride(1) == head_dim
        rotary = dict(k_ptr=r.k, v_ptr=r.v, pos_ptr=r.positions, cos_ptr=r.cos, sin_ptr=r.sin, qw_ptr=r.q_weight,
                      kw_ptr=r.k_weight, slot_ptr=r.slot_mapping, stride_kb=r.k.stride(0), stride_cos=r.cos.stride(0),
                      rope_eps=r.eps, ROTARY=True, WEIGHT_OFFSET=r.weight_offset)
    prewait = envs.prewait_loads()
    preload = "decode" in prewait and qk_rotary is None
    prefetch_tiles = envs.decode_prefetch_tiles()  # L2-prefetched tokens: that many tiles, 0 the whole split
    prefetch_n = triton.next_power_of_2(min(block_n * prefetch_tiles, tokens_per_split) if prefetch_tiles
                                        else tokens_per_split)
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, kv_cache, block_tables, seq_lens, out, part, lse, sinks_arg, k_scale, v_scale, tickets, qk_scale,
        softcap_log2,
        sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        *_cache_strides(kv_cache), tokens_per_split,
        NUM_HEADS=num_heads, NUM_SPLITS=num_splits, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n, USE_DOT=use_dot, PRECISION=_precision(q.dtype),
        PDL=pdl, WINDOW=sliding_window is not None, SOFTCAP=logit_softcap is not None, SINKS=sinks is not None,
        FP8=is_fp8_kv_cache(kv_cache), FUSED_REDUCE=fused_reduce, BLOCK_S=triton.next_power_of_2(num_splits),
        WIDEN=default_fp8_widen(kv_cache, q) if fp8_widen is None else fp8_widen,
        PRELOAD=preload, L2_PREFETCH=preload and _l2_prefetch_ok(kv_cache, batch),
        PREFETCH_N=prefetch_n, num_warps=num_warps,
        num_stages=num_stages,
        **rotary,
        **launch_options(pdl),
    )
    if num_splits > 1 and not fused_reduce:
        _decode_reduce_kernel[(batch, num_heads)](
            part, lse, out, sinks_arg, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, NUM_SPLITS=num_splits, HEAD_DIM=head_dim,
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d, PDL=pdl, SINKS=sinks is not None,
            PARALLEL="reduce" in prewait, num_warps=1 if head_dim <= 64 else 2, **launch_options(pdl),
        )


# ---- prefill --------------------------------------------------------------------------------------------------


@triton.jit
def _prefill_kernel(q_ptr, cache_ptr, table_ptr, sched_ptr, out_ptr, sinks_ptr, k_scale_ptr, v_scale_ptr, qk_scale,
                    softcap_log2, window,
                    stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_half, stride_blk, stride_ch, stride_off,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr, WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
                    SINKS: tl.constexpr = False, FP8: tl.constexpr = False, WIDEN: tl.constexpr = 0):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    if FP8:  # the head's key scale joins the score scale; its value scale multiplies the output
        qk_scale = qk_scale * tl.load(k_scale_ptr + kvh)
        v_scale = tl.load(v_scale_ptr + kvh)
    q_start = tl.load(sched_ptr + tile * 4)  # flat index of the tile's first query
    q_end = tl.load(sched_ptr + tile * 4 + 1)  # flat end of its span
    pos0 = tl.load(sched_ptr + tile * 4 + 2)  # position of the tile's first query in its sequence
    table = table_ptr + tl.load(sched_ptr + tile * 4 + 3)
    m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    qmask = (q_start + m) < q_end
    q = tl.load(q_ptr + (q_start + m)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=qmask[:, None] & dmask[None, :], other=0.0)
    q, qk_scale = _f16_queries(q, qk_scale, FP8, WIDEN)
    q_pos = pos0 + m
    kv_end = pos0 + tl.minimum(q_end - q_start, BLOCK_M)  # one past the tile's last query position
    full_end = (pos0 // BLOCK_N) * BLOCK_N  # keys below every query of the tile: no mask needed
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    head_base = cache_ptr + kvh * stride_ch
    n = tl.arange(0, BLOCK_N)
    if WINDOW:
        # Keys from the first query's window on, each masked by causality and by its query's window.
        kv_start = (tl.maximum(pos0 - window + 1, 0) // BLOCK_N) * BLOCK_N
        full_end = kv_start
    else:
        kv_start = 0
    all_rows = tl.full([BLOCK_M, BLOCK_N], 1, tl.int1)
    for kv0 in range(kv_start, full_end, BLOCK_N):
        tok = kv0 + n
        blk = tl.load(table + tok // BLOCK_SIZE)
        rows = head_base + blk * stride_blk + (tok % BLOCK_SIZE) * stride_off
        key = _from_cache(tl.load(rows[:, None] + d[None, :], mask=dmask[None, :], other=0.0), q, FP8, False, WIDEN)
        value = _from_cache(tl.load(rows[:, None] + stride_half + d[None, :], mask=dmask[None, :], other=0.0), q,
                            FP8, True, WIDEN)
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, key, value, all_rows, qk_scale, softcap_log2, True,
                                     PRECISION, SOFTCAP)
    for kv0 in range(full_end, kv_end, BLOCK_N):
        tok = kv0 + n
        tmask = tok < kv_end
        blk = tl.load(table + tok // BLOCK_SIZE, mask=tmask, other=0)
        rows = head_base + blk * stride_blk + (tok % BLOCK_SIZE) * stride_off
        lmask = tmask[:, None] & dmask[None, :]
        key = _from_cache(tl.load(rows[:, None] + d[None, :], mask=lmask, other=0.0), q, FP8, False, WIDEN)
        value = _from_cache(tl.load(rows[:, None] + stride_half + d[None, :], mask=lmask, other=0.0), q, FP8,
                            True, WIDEN)
        valid = (tok[None, :] <= q_pos[:, None]) & tmask[None, :]
        if WINDOW:
            valid = valid & (tok[None, :] > q_pos[:, None] - window)
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, key, value, valid, qk_scale, softcap_log2, True,
                                     PRECISION, SOFTCAP, WINDOW)
    if SINKS:  # the head's base-2 sink logit joins the denominator
        sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
        l_i = l_i + tl.exp2(sink - m_i)
    if FP8:
        acc = acc * v_scale
    out = acc / l_i[:, None]
    tl.store(out_ptr + (q_start + m)[:, None] * stride_ot + h * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=qmask[:, None] & dmask[None, :])


def build_prefill_schedule(spans, block_m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The block tables of ``spans`` (PrefillSpan-like) concatenated, and one int32 row per query tile:
    ``(first flat query, flat end of its span, position of its first query, offset of its block table)``."""
    rows: list[int] = []
    table_offset = 0
    for span in spans:
        for t0 in range(0, span.num_tokens, block_m):
            rows += (span.start + t0, span.start + span.num_tokens, span.context_len + t0, table_offset)
        table_offset += span.block_table.shape[0]
    tables = torch.cat([span.block_table.reshape(-1) for span in spans]) if spans else None
    schedule = torch.tensor(rows, dtype=torch.int32).view(-1, 4).to(device, non_blocking=True)
    return tables, schedule


def prefill_config(head_dim: int) -> tuple[int, int, int]:
    """``(BLOCK_N, num_warps, num_stages)`` of the prefill kernel for a head size (tuned for H100)."""
    if head_dim <= 64:
        return 64, 4, 3
    if head_dim <= 128:
        return 64, 8, 3
    return 32, 8, 2


def paged_prefill(q: torch.Tensor, kv_cache: torch.Tensor, tables: torch.Tensor, schedule: torch.Tensor,
                  scale: float, out: torch.Tensor, block_m: int,
                  config: tuple[int, int, int] | None = None, *, sliding_window: int | None = None,
                  logit_softcap: float | None = None, sinks: torch.Tensor | None = None,
                  kv_scales: KVCacheScales | None = None, fp8_widen: int | None = None) -> None:
    """Causal attention of the scheduled query tiles (``q`` [T, H, D], flat) over their paged keys, into ``out``.

    ``tables``/``schedule`` come from ``build_prefill_schedule`` with the same ``block_m``; ``config`` overrides
    ``prefill_config`` (for benchmarks). ``sliding_window``, ``logit_softcap`` and ``sinks`` (``[H]``) as in
    ``AttentionBackend.forward``; an FP8 cache is read as ``stored * kv_scales`` (per KV head), in registers,
    widened as ``paged_decode``'s ``fp8_widen`` says.
    """
    num_tiles = schedule.shape[0]
    if num_tiles == 0:
        return
    q = _last_dim_contiguous(q)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, block_size = kv_cache.shape[2], kv_cache.shape[3]
    block_n, num_warps, num_stages = config or prefill_config(head_dim)
    qk_scale, softcap_log2 = _score_scales(scale, logit_softcap)
    k_scale, v_scale = kv_scale_args(kv_cache, kv_scales, num_kv_heads)
    _prefill_kernel[(num_tiles, num_heads)](
        q, kv_cache, tables, schedule, out, _sinks_arg(sinks, num_heads, q), k_scale, v_scale, qk_scale,
        softcap_log2, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *_cache_strides(kv_cache),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(head_dim),
        PRECISION=_precision(q.dtype), WINDOW=sliding_window is not None, SOFTCAP=logit_softcap is not None,
        SINKS=sinks is not None, FP8=is_fp8_kv_cache(kv_cache),
        WIDEN=_prefill_fp8_widen() if fp8_widen is None else fp8_widen, num_warps=num_warps, num_stages=num_stages,
    )


# ---- helpers --------------------------------------------------------------------------------------------------


def _l2_prefetch_ok(kv_cache: torch.Tensor, batch: int = 1) -> bool:
    """Whether the decode kernel of ``batch`` requests may bulk-prefetch ``kv_cache``'s blocks (CUDA; 16-byte aligned
    base and strides). Not an FP8 cache at more than one request: on an H200 (2026-12-04) the prefetch made the FP8
    decode kernel 11% slower at 200-256 requests (402 against 359 us at 200 x 640; 1.4% at 32 x 1,040; the reads
    before the wait alone cost nothing there), and with the decode kernel's reads before the wait off (prefetch
    included) W2 with FP8 weights + FP8 KV gave 3.4% more tokens a second in the same process."""
    if batch > 1 and is_fp8_kv_cache(kv_cache):
        return False
    size = kv_cache.element_size()
    return (kv_cache.is_cuda and kv_cache.data_ptr() % 16 == 0
            and all(st * size % 16 == 0 for st in kv_cache.stride()[:4]))


def _cache_strides(kv_cache: torch.Tensor) -> tuple[int, int, int, int]:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.stride(4) != 1:
        raise ValueError(f"expected a [2, blocks, kv_heads, block_size, head_dim] cache; got {tuple(kv_cache.shape)}")
    return kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3)


def _score_scales(scale: float, logit_softcap: float | None) -> tuple[float, float]:
    """``(qk_scale, softcap_log2)`` for ``_attend_tile``: base-2 scores, or the soft-capped form's two factors."""
    if logit_softcap is None:
        return scale * _LOG2E, 1.0
    if logit_softcap <= 0:
        raise ValueError(f"logit_softcap must be positive; got {logit_softcap}")
    return scale / logit_softcap, logit_softcap * _LOG2E


def _sinks_arg(sinks: torch.Tensor | None, num_heads: int, like: torch.Tensor) -> torch.Tensor:
    """The sink logits as a contiguous ``[H]`` tensor, or ``like`` as an unread placeholder pointer."""
    if sinks is None:
        return like
    if sinks.shape != (num_heads,):
        raise ValueError(f"sinks must have one logit per query head ({num_heads}); got shape {tuple(sinks.shape)}")
    return sinks.contiguous()


def kv_scale_args(kv_cache: torch.Tensor, kv_scales: KVCacheScales | None,
                  num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-head key and value scales of an FP8 cache as float32 ``[Hkv]`` tensors (the cache itself as an
    unread placeholder pointer otherwise)."""
    if not is_fp8_kv_cache(kv_cache):
        return kv_cache, kv_cache
    if kv_scales is None:
        raise ValueError("an FP8 KV cache needs the layer's kv_scales")
    for name, scale in (("k", kv_scales.k), ("v", kv_scales.v)):
        if scale.shape != (num_kv_heads,) or scale.dtype != torch.float32 or scale.device != kv_cache.device:
            raise ValueError(f"kv_scales.{name} must be float32 [{num_kv_heads}] on {kv_cache.device}; got "
                             f"{scale.dtype} {tuple(scale.shape)} on {scale.device}")
    return kv_scales.k, kv_scales.v


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dimension >= 16


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
