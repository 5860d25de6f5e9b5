"""The batched LoRA apply on CUDA: two Triton kernels over a step's tokens grouped by adapter slot.

``shrink``: ``s[t] = x[t] @ A[slot].T`` (float32, ``[split, tokens, shards * max_rank]``: partial sums over
``split`` slices of the input width); ``expand``: ``y[t] += s[t] @ B[slot].T``, ``s[t]`` the sum of its partials. The tokens of slot ``k`` are ``sorted_tokens[seg_starts[k] : seg_starts[k + 1]]``; each program takes
``BLOCK_M`` of one slot's tokens (programs past their slot's segment do nothing), so a step mixing adapters runs
as one launch per kernel whatever the mix, and tokens without an adapter (in no segment) cost nothing. The grid
depends only on the number of tokens and slots and the grouping is read on the device, so the kernels are
captured in CUDA graphs with static grouping buffers. ``shrink`` splits its reduction over the input width across
programs when there are few tokens, where one program per slot would be too little work in flight; each writes
its own partial sum (no atomics, no zeroed buffer to launch first).

One-row steps (batch-1 decode) take a shorter path, two launches per projection instead of the base GEMV plus
two: :func:`lora_shrink_row` computes the token's low-rank vector (as float32 partial sums over slices of the
input width, so that many programs share the reduction without atomics or a zeroed buffer), and the base
projection's GEMV (``triton_gemv``) adds ``s @ B[slot].T`` in its epilogue (:func:`lora_row_delta`), before the
fused gate/up GEMV's SiLU where the MLP uses it. Both find the token's slot in ``seg_starts`` on the device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import triton
import triton.language as tl

from inferneo.kernels._pdl import launch_options, wait_for_previous_kernel

if TYPE_CHECKING:
    from inferneo.lora.layers import LoRABatch


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, s_ptr, sorted_ptr, seg_ptr, K, R, stride_xm, stride_as, stride_ar, stride_sp,
                   stride_sm, K_PER_SPLIT, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    slot = tl.program_id(1)
    pid_k = tl.program_id(2)
    start = tl.load(seg_ptr + slot)
    end = tl.load(seg_ptr + slot + 1)
    rows = start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < end
    tok = tl.load(sorted_ptr + rows, mask=mask_m, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    if start + pid_m * BLOCK_M < end:
        for k0 in range(0, K_PER_SPLIT, BLOCK_K):
            kk = k_begin + k0 + tl.arange(0, BLOCK_K)
            mask_k = (kk < K) & (k0 + tl.arange(0, BLOCK_K) < K_PER_SPLIT)
            xv = tl.load(x_ptr + tok[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None] & mask_k[None, :],
                         other=0.0)
            av = tl.load(a_ptr + slot * stride_as + offs_r[None, :] * stride_ar + kk[:, None],
                         mask=mask_r[None, :] & mask_k[:, None], other=0.0)
            acc += tl.dot(xv, av)
        out = s_ptr + pid_k * stride_sp + tok[:, None] * stride_sm + offs_r[None, :]
        tl.store(out, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _expand_kernel(s_ptr, b_ptr, y_ptr, sorted_ptr, seg_ptr, N, R, stride_sp, stride_sm, stride_bs, stride_bn,
                   stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   SPLIT: tl.constexpr):
    pid_m = tl.program_id(0)
    slot = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.load(seg_ptr + slot)
    end = tl.load(seg_ptr + slot + 1)
    if start + pid_m * BLOCK_M < end:
        rows = start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = rows < end
        tok = tl.load(sorted_ptr + rows, mask=mask_m, other=0).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        s_rows = s_ptr + tok[:, None] * stride_sm + offs_r[None, :]
        mask_s = mask_m[:, None] & mask_r[None, :]
        sv = tl.load(s_rows, mask=mask_s, other=0.0)
        for part in tl.static_range(1, SPLIT):
            sv += tl.load(s_rows + part * stride_sp, mask=mask_s, other=0.0)
        bv = tl.load(b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None],
                     mask=mask_n[None, :] & mask_r[:, None], other=0.0)
        delta = tl.dot(sv.to(bv.dtype), bv)
        out = y_ptr + tok[:, None] * stride_ym + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        yv = tl.load(out, mask=mask, other=0.0)
        tl.store(out, (yv.to(tl.float32) + delta).to(yv.dtype), mask=mask)


BLOCK_M = 16
SHRINK_BLOCK_K = 64
EXPAND_BLOCK_N = 64
FEW_TOKENS = 64  # at most this many tokens: split the shrink's reduction


def _block(width: int) -> int:
    return max(16, triton.next_power_of_2(width))


def lora_apply_triton(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      batch: LoRABatch) -> None:
    """``y[t] += x[t] @ lora_a[s].T @ lora_b[s].T`` for the tokens of each slot ``s`` (see the module doc); ``y``
    is ``[tokens, out]`` and ``x`` ``[tokens, in]``, both contiguous in their last dimension."""
    tokens, k = x.shape
    num_slots, width, _ = lora_a.shape
    n = y.shape[1]
    m_blocks = triton.cdiv(tokens, BLOCK_M)
    split = max(1, min(8, k // 512)) if tokens <= FEW_TOKENS else 1
    per_split = triton.cdiv(triton.cdiv(k, split), SHRINK_BLOCK_K) * SHRINK_BLOCK_K
    shrunk = torch.empty(split, tokens, width, dtype=torch.float32, device=x.device)
    block_r = _block(width)
    _shrink_kernel[(m_blocks, num_slots, split)](
        x, lora_a, shrunk, batch.sorted_tokens, batch.seg_starts, k, width, x.stride(0), lora_a.stride(0),
        lora_a.stride(1), shrunk.stride(0), shrunk.stride(1), per_split, BLOCK_M=BLOCK_M, BLOCK_R=block_r,
        BLOCK_K=SHRINK_BLOCK_K)
    _expand_kernel[(m_blocks, num_slots, triton.cdiv(n, EXPAND_BLOCK_N))](
        shrunk, lora_b, y, batch.sorted_tokens, batch.seg_starts, n, width, shrunk.stride(0), shrunk.stride(1),
        lora_b.stride(0), lora_b.stride(1), y.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=EXPAND_BLOCK_N, BLOCK_R=block_r,
        SPLIT=split)


# ---- one-row steps: shrink, then the delta in the base GEMV's epilogue ------------------------------------------


@triton.jit
def _row_slot(seg_ptr, NUM_SLOTS: tl.constexpr, BLOCK_S: tl.constexpr):
    """The slot of a one-token step's token: the number of segments ending at 0 (``seg_starts[s + 1] == 0`` for
    every slot before it); ``NUM_SLOTS`` when the token runs the base model (every segment empty)."""
    offs = tl.arange(0, BLOCK_S)
    ends = tl.load(seg_ptr + 1 + offs, mask=offs < NUM_SLOTS, other=1)
    return tl.sum((ends == 0).to(tl.int32), axis=0)


@triton.jit
def _shrink_row_kernel(x_ptr, a_ptr, part_ptr, seg_ptr, K, R, stride_as, stride_ar,
                       K_PER_SPLIT: tl.constexpr, NUM_SLOTS: tl.constexpr, BLOCK_S: tl.constexpr,
                       BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    # Program (r, split): part[split, r] = x[k-slice] . A[slot, r, k-slice]. The grouping is written before the
    # step (never by a kernel), so it and the adapter weights may be read before the wait.
    r = tl.program_id(0)
    pid_k = tl.program_id(1)
    slot = _row_slot(seg_ptr, NUM_SLOTS, BLOCK_S)
    wait_for_previous_kernel(PDL)
    if slot < NUM_SLOTS:
        a_row = a_ptr + slot.to(tl.int64) * stride_as + r * stride_ar
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K_PER_SPLIT, BLOCK_K):
            kk = pid_k * K_PER_SPLIT + k0 + tl.arange(0, BLOCK_K)
            mask = kk < K
            av = tl.load(a_row + kk, mask=mask, other=0.0)
            xv = tl.load(x_ptr + kk, mask=mask, other=0.0)
            acc += av.to(tl.float32) * xv.to(tl.float32)
        tl.store(part_ptr + pid_k * R + r, tl.sum(acc, axis=0))


@triton.jit
def lora_row_delta(n, nmask, part_ptr, b_ptr, seg_ptr, stride_bs, stride_bn, R, NUM_SLOTS: tl.constexpr,
                   SPLIT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_SPLIT: tl.constexpr):
    """``s @ B[slot, n].T`` (float32, ``[BLOCK_N]``) for a one-token step, ``s`` the sum of the shrink's partials
    rounded to B's dtype as the expand kernel rounds it; zeros for a base-model token. Call after the PDL wait."""
    slot = _row_slot(seg_ptr, NUM_SLOTS, BLOCK_S)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = (offs_r < R) & (slot < NUM_SLOTS)
    offs_p = tl.arange(0, BLOCK_SPLIT)
    parts = tl.load(part_ptr + offs_p[:, None] * R + offs_r[None, :],
                    mask=(offs_p < SPLIT)[:, None] & mask_r[None, :], other=0.0)
    bv = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + n[:, None] * stride_bn + offs_r[None, :],
                 mask=nmask[:, None] & mask_r[None, :], other=0.0)
    s = tl.sum(parts, axis=0).to(bv.dtype).to(tl.float32)
    return tl.sum(bv.to(tl.float32) * s[None, :], axis=1)


class RowLoRA(NamedTuple):
    """What a GEMV's LoRA epilogue reads (see :func:`lora_row_delta`): the shrink's partial sums ``[split,
    width]`` (float32), the projection's ``lora_b`` ``[slots, out, width]`` and the step's ``seg_starts``."""

    partials: torch.Tensor
    lora_b: torch.Tensor
    seg_starts: torch.Tensor


ROW_BLOCK_K = 1024
ROW_SPLIT_BLOCKS = 2  # K tiles a shrink program reduces: input width 4096 -> 2 partial sums per rank row


def lora_shrink_row(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, seg_starts: torch.Tensor,
                    pdl: bool = False) -> RowLoRA:
    """The shrink of a one-row step (``x`` ``[1, in]``, contiguous): ``x @ A[slot].T`` as partial sums over
    slices of the input width, for the GEMV epilogue that adds ``@ B[slot].T`` (nothing is computed for a
    base-model token). ``pdl``: launch with programmatic dependent launch."""
    k = x.shape[1]
    num_slots, width, _ = lora_a.shape
    block_k = min(ROW_BLOCK_K, triton.next_power_of_2(k))
    per_split = block_k * min(ROW_SPLIT_BLOCKS, triton.cdiv(k, block_k))
    split = triton.cdiv(k, per_split)
    partials = torch.empty(split, width, dtype=torch.float32, device=x.device)
    _shrink_row_kernel[(width, split)](
        x, lora_a, partials, seg_starts, k, width, lora_a.stride(0), lora_a.stride(1), K_PER_SPLIT=per_split,
        NUM_SLOTS=num_slots, BLOCK_S=triton.next_power_of_2(num_slots), BLOCK_K=block_k, PDL=pdl,
        num_warps=4, **launch_options(pdl))
    return RowLoRA(partials, lora_b, seg_starts)


def lora_epilogue_args(lora: RowLoRA | None, dummy: torch.Tensor) -> dict:
    """The LoRA arguments of a GEMV kernel with a :func:`lora_row_delta` epilogue (``LORA`` off, and ``dummy``
    in the pointers' places, without ``lora``)."""
    if lora is None:
        return dict(lp_ptr=dummy, lb_ptr=dummy, seg_ptr=dummy, stride_ls=0, stride_ln=0, lora_r=0, LORA=False,
                    NUM_SLOTS=1, SPLIT=1, BLOCK_S=1, BLOCK_R=1, BLOCK_SPLIT=1)
    split, width = lora.partials.shape
    num_slots = lora.lora_b.shape[0]
    return dict(lp_ptr=lora.partials, lb_ptr=lora.lora_b, seg_ptr=lora.seg_starts, stride_ls=lora.lora_b.stride(0),
                stride_ln=lora.lora_b.stride(1), lora_r=width, LORA=True, NUM_SLOTS=num_slots, SPLIT=split,
                BLOCK_S=triton.next_power_of_2(num_slots), BLOCK_R=triton.next_power_of_2(width),
                BLOCK_SPLIT=triton.next_power_of_2(split))
