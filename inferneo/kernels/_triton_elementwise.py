"""The Triton kernels behind ``triton_ops`` and their launchers (imported only where Triton is installed)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inferneo import envs
from inferneo.attention.fp8_kv import KVCacheScales, is_fp8_kv_cache
from inferneo.kernels._pdl import early_extra_options, launch_options, pdl_for, wait_for_previous_kernel
from inferneo.kernels.triton_attention import kv_scale_args, to_cache


@triton.jit
def add_rms_norm_row(x, res_row_ptr, w_ptr, out_row_ptr, cols, mask, n_cols, eps, HAS_RESIDUAL: tl.constexpr):
    """One row: with a residual, ``residual += x`` (stored back), then ``out = w * rmsnorm(residual or x)``;
    returns ``out``'s values as stored."""
    if HAS_RESIDUAL:
        r = tl.load(res_row_ptr + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)  # rounded like the PyTorch sum
        tl.store(res_row_ptr + cols, x, mask=mask)
    out = weighted_rms_norm(x, w_ptr, cols, mask, n_cols, eps).to(out_row_ptr.dtype.element_ty)
    tl.store(out_row_ptr + cols, out, mask=mask)
    return out


@triton.jit
def weighted_rms_norm(x, w_ptr, cols, mask, n_cols, eps):
    """``w * rmsnorm(x)`` of one row ``x`` (the model dtype), float32: the normalized row rounded to ``x``'s dtype
    before the weight multiplies it, as ``RMSNorm`` rounds; the caller rounds the product. Kernels that fuse the
    norm into what reads it (``triton_gemv.norm_gemv``, ``triton_routing.norm_route_topk``) share it."""
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    return tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) * normed


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr = False,
                     half_ptr=None, HALF: tl.constexpr = False):
    # HALF: each row's values also as the FP8 h2 GEMV's float16 activations (times 2^-8; rows of n_cols at half)
    wait_for_previous_kernel(PDL, EARLY=EARLY)  # EARLY: INFERNEO_PDL_EARLY_EXTRA=norm (a GEMV follows)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    out = add_rms_norm_row(x, res_ptr + row * stride_r, w_ptr, out_ptr + row * stride_o, cols, mask, n_cols, eps,
                           HAS_RESIDUAL)
    if HALF:
        tl.store(half_ptr + row * n_cols + cols, (out.to(tl.float32) * 0.00390625).to(tl.float16), mask=mask)


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
             pdl: bool | None = None, half_out: torch.Tensor | None = None):
    """RMSNorm over the last dimension. With ``residual``: ``residual += x`` in place, then normalize the sum;
    returns ``(normalized, residual)``. The normalized rows overwrite ``x`` when a residual is given.
    ``pdl``: launch with programmatic dependent launch (None: decided from ``x``, see ``_pdl.pdl_for``).
    ``half_out`` (bfloat16 rows; float16, ``[rows, cols]`` contiguous): also written with the normalized rows'
    scaled float16 copy, what the FP8 one-row GEMV reads (``triton_fp8_gemv.scaled_half``)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n_rows, n_cols = x2.shape
    block = triton.next_power_of_2(n_cols)
    warps = min(max(block // 256, 1), 8)
    pdl = pdl_for(x, pdl)
    early = early_extra_options("norm", pdl)
    if half_out is not None:
        if x.dtype != torch.bfloat16 or half_out.dtype != torch.float16 or half_out.shape != (n_rows, n_cols) \
                or not half_out.is_contiguous():
            raise ValueError(f"rms_norm: half_out must be a contiguous float16 [{n_rows}, {n_cols}] beside bfloat16 "
                             f"rows; got {half_out.dtype} {tuple(half_out.shape)} beside {x.dtype}")
        early = dict(early, half_ptr=half_out, HALF=True)
    if residual is None:
        out = torch.empty_like(x2)
        _rms_norm_kernel[(n_rows,)](x2, x2, weight, out, x2.stride(0), 0, out.stride(0), n_cols, eps,
                                    HAS_RESIDUAL=False, BLOCK=block, PDL=pdl, num_warps=warps, **early,
                                    **launch_options(pdl))
        return out.view(shape)
    r2 = residual.view(-1, shape[-1])
    assert r2.stride(-1) == 1, "the residual must be contiguous in its last dimension"
    _rms_norm_kernel[(n_rows,)](x2, r2, weight, x2, x2.stride(0), r2.stride(0), x2.stride(0), n_cols, eps,
                                HAS_RESIDUAL=True, BLOCK=block, PDL=pdl, num_warps=warps, **early,
                                **launch_options(pdl))
    return x2.view(shape), residual


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)  # rounded like F.silu's output
    tl.store(out_ptr + row * stride_o + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, pdl: bool | None = None) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x`` of last dimension ``2d``."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n_rows, d = x2.shape[0], x2.shape[1] // 2
    out = torch.empty(n_rows, d, dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(d), 1024)
    pdl = pdl_for(x, pdl)
    _silu_and_mul_kernel[(n_rows, triton.cdiv(d, block))](x2, out, x2.stride(0), out.stride(0), d,
                                                          BLOCK=block, PDL=pdl, num_warps=4, **launch_options(pdl))
    return out.view(*shape[:-1], d)


@triton.jit
def _rotary_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, cache_ptr, slot_ptr, stride_t, stride_c,
                   n_heads, n_q_heads, head_dim, half, eps, stride_half, stride_blk, stride_ch, stride_off,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, NORM: tl.constexpr, WEIGHT_OFFSET: tl.constexpr,
                   PDL: tl.constexpr, STORE_KV: tl.constexpr = False, N_KV_HEADS: tl.constexpr = 1,
                   BLOCK_SIZE: tl.constexpr = 16, BLOCK_V: tl.constexpr = 1, BLOCK_HD: tl.constexpr = 1,
                   PRELOAD: tl.constexpr = False, k_scale_ptr=None, v_scale_ptr=None, FP8: tl.constexpr = False):
    # PRELOAD: the positions, rotary rows, norm weights and slots (no kernel of the step writes them) are read
    # before the wait, the projection output after it
    if not PRELOAD:
        wait_for_previous_kernel(PDL, EARLY=True)  # the KV store or decode attention after it waits before reading
    t = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)  # this program's BLOCK_H rotated heads (and BLOCK_V value heads) of the token
    pos = tl.load(pos_ptr + t).to(tl.int64)
    h = group * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    dmask = d < half
    mask = (h < n_heads) & dmask
    cos = tl.load(cos_ptr + pos * stride_c + d, mask=dmask, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_c + d, mask=dmask, other=0.0)
    is_q = h < n_q_heads
    if NORM:  # the query heads' weight or the key heads', for each half
        w_first = _head_norm_weight(qw_ptr, kw_ptr, d, dmask, is_q)
        w_second = _head_norm_weight(qw_ptr + half, kw_ptr + half, d, dmask, is_q)
    if STORE_KV:
        slot = tl.load(slot_ptr + t)
    if PRELOAD:
        wait_for_previous_kernel(PDL, EARLY=True)
    base = qkv_ptr + t * stride_t + h * head_dim
    a = tl.load(base + d, mask=mask, other=0.0)
    b = tl.load(base + half + d, mask=mask, other=0.0)
    af, bf = a.to(tl.float32), b.to(tl.float32)
    if NORM:  # per-head RMSNorm first: the query heads with one weight, the key heads with the other
        rstd = 1.0 / tl.sqrt((tl.sum(af * af, axis=1) + tl.sum(bf * bf, axis=1)) / head_dim + eps)[:, None]
        af = _head_rms_norm(af * rstd, a, w_first, WEIGHT_OFFSET)
        bf = _head_rms_norm(bf * rstd, a, w_second, WEIGHT_OFFSET)
    first = (af * cos - bf * sin).to(a.dtype)
    second = (bf * cos + af * sin).to(a.dtype)
    tl.store(base + d, first, mask=mask)
    tl.store(base + half + d, second, mask=mask)
    if STORE_KV:  # the rotated keys and the value heads into the paged cache at the token's slot, as store_kv does
        # (FP8: each KV head's values over its scale, rounded to e4m3 by the same function)
        page = cache_ptr + (slot // BLOCK_SIZE) * stride_blk + (slot % BLOCK_SIZE) * stride_off
        is_key = (h >= n_q_heads) & (h < n_heads)
        key_mask = mask & is_key & (slot >= 0)
        key = page + (h - n_q_heads) * stride_ch + d
        vh = group * BLOCK_V + tl.arange(0, BLOCK_V)[:, None]
        vd = tl.arange(0, BLOCK_HD)[None, :]
        v_mask = (vh < N_KV_HEADS) & (vd < head_dim) & (slot >= 0)
        value = tl.load(qkv_ptr + t * stride_t + (n_heads + vh) * head_dim + vd, mask=v_mask)
        if FP8:
            k_scale = tl.load(k_scale_ptr + (h - n_q_heads), mask=is_key, other=1.0)
            v_scale = tl.load(v_scale_ptr + vh, mask=vh < N_KV_HEADS, other=1.0)
        else:
            k_scale = 1.0
            v_scale = 1.0
        tl.store(key, to_cache(first, k_scale, cache_ptr, FP8), mask=key_mask)
        tl.store(key + half, to_cache(second, k_scale, cache_ptr, FP8), mask=key_mask)
        tl.store(page + stride_half + vh * stride_ch + vd, to_cache(value, v_scale, cache_ptr, FP8), mask=v_mask)


@triton.jit
def _head_norm_weight(qw_ptr, kw_ptr, d, dmask, is_q):
    """One half of the per-head norm weights in float32: the query weight on the ``is_q`` rows, else the key's."""
    return tl.where(is_q, tl.load(qw_ptr + d, mask=dmask, other=0.0).to(tl.float32),
                    tl.load(kw_ptr + d, mask=dmask, other=0.0).to(tl.float32))


@triton.jit
def _head_rms_norm(normed, like, w, WEIGHT_OFFSET: tl.constexpr):
    """One half ``[H, D/2]`` of every head, already over its root mean square (float32), times its weight ``w``
    (``_head_norm_weight``), rounded to the model dtype (``like``'s) as ``RMSNorm`` rounds; ``WEIGHT_OFFSET``:
    Gemma's ``x * (1 + w)``, all in float32. Returns float32 values."""
    dtype = like.dtype
    if WEIGHT_OFFSET:
        return (normed * (1.0 + w)).to(dtype).to(tl.float32)
    return (w * normed.to(dtype).to(tl.float32)).to(dtype).to(tl.float32)


def _launch_rotary(qkv, positions, cos_cache, sin_cache, num_heads, head_dim, pdl, q_weight=None, k_weight=None,
                   num_q_heads=0, eps=0.0, weight_offset=False, kv_cache=None, slot_mapping=None,
                   kv_scales=None) -> None:
    assert qkv.dim() == 2 and qkv.stride(-1) == 1
    assert cos_cache.stride(-1) == 1 and cos_cache.stride() == sin_cache.stride()
    n_tokens = qkv.shape[0]
    if n_tokens == 0:
        return
    half = head_dim // 2
    pdl = pdl_for(qkv, pdl)
    norm = q_weight is not None
    store = {}
    if kv_cache is not None:  # [2, blocks, kv_heads, block_size, head_dim], the Triton attention backend's layout
        num_kv_heads = num_heads - num_q_heads
        assert kv_cache.dim() == 5 and kv_cache.shape[0] == 2 and kv_cache.shape[2] == num_kv_heads
        assert kv_cache.shape[4] == head_dim and kv_cache.stride(4) == 1
        k_scale, v_scale = kv_scale_args(kv_cache, kv_scales, num_kv_heads)
        store = dict(STORE_KV=True, N_KV_HEADS=num_kv_heads, BLOCK_SIZE=kv_cache.shape[3],
                     BLOCK_V=triton.next_power_of_2(num_kv_heads), BLOCK_HD=triton.next_power_of_2(head_dim),
                     k_scale_ptr=k_scale, v_scale_ptr=v_scale, FP8=is_fp8_kv_cache(kv_cache))
    strides = kv_cache.stride()[:4] if kv_cache is not None else (0, 0, 0, 0)
    block_d = triton.next_power_of_2(half)
    groups = rotary_head_groups(n_tokens, num_heads - num_q_heads, norm, num_heads) if store else 1
    block_h = triton.next_power_of_2(triton.cdiv(num_heads, groups))
    if store:
        block_v = triton.next_power_of_2(triton.cdiv(store["N_KV_HEADS"], groups))
        store["BLOCK_V"] = block_v
        groups = max(triton.cdiv(num_heads, block_h), triton.cdiv(store["N_KV_HEADS"], block_v))
    # 8 warps from [64, 64] head tiles up: 4 spill there (H200, Qwen3-30B-A3B's 36 heads: 2.0 us a layer less on
    # the batch-1 chain's critical path with the reads before the wait, same outputs); a token's heads split over
    # several programs: a warp for each 128 pairs, up to 4
    tile = block_h * block_d
    warps = (8 if tile >= 4096 else 4) if groups == 1 else max(1, min(4, tile // 128))
    _rotary_kernel[(n_tokens, groups)](qkv, positions, cos_cache, sin_cache, q_weight if norm else cos_cache,
                                k_weight if norm else cos_cache, kv_cache if kv_cache is not None else qkv,
                                slot_mapping if slot_mapping is not None else positions, qkv.stride(0),
                                cos_cache.stride(0), num_heads, num_q_heads, head_dim, half, eps, *strides,
                                BLOCK_H=block_h, BLOCK_D=block_d, NORM=norm, WEIGHT_OFFSET=weight_offset, PDL=pdl,
                                PRELOAD="rotary" in envs.prewait_loads(), num_warps=envs.rotary_warps() or warps,
                                **store, **launch_options(pdl))


ROTARY_SPLIT_MIN_PROGRAMS = 16
#: Rotated heads per program of the q/k norm + rotary kernel under ``ROTARY_SPLIT_MIN_PROGRAMS`` tokens: in the
#: Qwen3-30B-A3B batch-1 layer chain on an H100 (36 heads), 18 programs added 1.18 us a layer to the critical path
#: against 2.05 for one (docs/benchmarks.md, "The q/k norm + rotary kernel over several programs").
NORM_ROTARY_HEADS_PER_PROGRAM = 2


def rotary_head_groups(num_tokens: int, num_kv_heads: int, norm: bool, num_heads: int = 0) -> int:
    """Programs a token's heads are spread over when the rotary kernel also writes the cache, under 16 tokens
    (``ROTARY_SPLIT_MIN_PROGRAMS``; one from there on):

    - without q/k norms, enough for 16 programs, at most one a KV head (at batch 1 one program would otherwise
      convert every key and value element of the token, as ``triton_attention.store_kv_heads_per_program`` avoids
      for the separate store);
    - the q/k norm + rotary kernel, ``NORM_ROTARY_HEADS_PER_PROGRAM`` of its ``num_heads`` (query and key heads) a
      program (its per-head sums then run in another order than in one program: the same to the last bits or
      one rounding apart).

    ``INFERNEO_ROTARY_HEAD_GROUPS``, for A/Bs, forces the count, up to one program per rotated head (``num_heads``;
    0: per KV head)."""
    forced = envs.rotary_head_groups()
    if forced:
        return max(1, min(forced, num_heads or num_kv_heads))
    if num_tokens >= ROTARY_SPLIT_MIN_PROGRAMS:
        return 1
    if norm:
        return max(1, triton.cdiv(num_heads or num_kv_heads, NORM_ROTARY_HEADS_PER_PROGRAM))
    return max(1, min(triton.cdiv(ROTARY_SPLIT_MIN_PROGRAMS, num_tokens), num_kv_heads))


def rotary_inplace(qkv: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                   num_heads: int, head_dim: int, pdl: bool | None = None, *, num_q_heads: int = 0,
                   kv_cache: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None,
                   kv_scales: KVCacheScales | None = None) -> None:
    """Rotate (rotate-half layout) the first ``num_heads`` heads of each row of ``qkv`` in place: the query
    and key heads of a fused projection output ``[T, (Hq + 2 Hkv) * D]``. ``cos/sin_cache``: ``[P, D/2]``.

    With ``kv_cache`` (the Triton attention backend's ``[2, blocks, Hkv, block_size, D]``), ``slot_mapping`` ``[T]``
    and ``num_q_heads`` (``Hq``; the heads after them are keys): the rotated keys and the values are also written
    to the cache at each token's slot (negative: skipped), exactly what ``triton_attention.store_kv`` writes, an
    FP8 cache through ``kv_scales`` included, so that launch is not needed."""
    if kv_cache is not None and not 0 < num_q_heads < num_heads:
        raise ValueError(f"rotary_inplace: writing the cache needs 0 < num_q_heads < {num_heads}; got {num_q_heads}")
    _launch_rotary(qkv, positions, cos_cache, sin_cache, num_heads, head_dim, pdl, num_q_heads=num_q_heads,
                   kv_cache=kv_cache, slot_mapping=slot_mapping, kv_scales=kv_scales)


def qk_norm_rotary_inplace(qkv: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                           sin_cache: torch.Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int,
                           q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float, *, weight_offset: bool = False,
                           pdl: bool | None = None, kv_cache: torch.Tensor | None = None,
                           slot_mapping: torch.Tensor | None = None, kv_scales: KVCacheScales | None = None) -> None:
    """In place on a fused projection output ``qkv`` ``[T, (Hq + 2 Hkv) * D]``: each query head through the
    per-head RMSNorm of weight ``q_weight`` ``[D]``, each key head through ``k_weight``'s, then both rotated as
    :func:`rotary_inplace` does; the value heads are untouched. ``weight_offset``: Gemma's norm, ``x * (1 + w)``.
    With ``kv_cache`` (the Triton attention backend's ``[2, blocks, Hkv, block_size, D]``; an FP8 one with its
    ``kv_scales``) and ``slot_mapping`` ``[T]``: the rotated keys and the values are also written to the cache at
    each token's slot (negative: skipped), exactly what ``triton_attention.store_kv`` writes, so that launch is not
    needed."""
    _launch_rotary(qkv, positions, cos_cache, sin_cache, num_q_heads + num_kv_heads, head_dim, pdl,
                   q_weight=q_weight, k_weight=k_weight, num_q_heads=num_q_heads, eps=eps,
                   weight_offset=weight_offset, kv_cache=kv_cache, slot_mapping=slot_mapping, kv_scales=kv_scales)
