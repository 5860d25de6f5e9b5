"""The batched LoRA apply on CUDA: two Triton kernels over a step's tokens grouped by adapter slot.

``shrink``: ``s[t] = x[t] @ A[slot].T`` (float32, ``[tokens, shards * max_rank]``); ``expand``: ``y[t] += s[t] @
B[slot].T``. The tokens of slot ``k`` are ``sorted_tokens[seg_starts[k] : seg_starts[k + 1]]``; each program takes
``BLOCK_M`` of one slot's tokens (programs past their slot's segment do nothing), so a step mixing adapters runs
as one launch per kernel whatever the mix, and tokens without an adapter (in no segment) cost nothing. The grid
depends only on the number of tokens and slots and the grouping is read on the device, so the kernels are
captured in CUDA graphs with static grouping buffers. ``shrink`` splits its reduction over the input width across
programs (float32 atomic adds) when there are few tokens, where one program per slot would be too little work in
flight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inferneo.lora.layers import LoRABatch


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, s_ptr, sorted_ptr, seg_ptr, K, R, stride_xm, stride_as, stride_ar, stride_sm,
                   K_PER_SPLIT, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   ATOMIC: tl.constexpr):
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
        out = s_ptr + tok[:, None] * stride_sm + offs_r[None, :]
        mask = mask_m[:, None] & mask_r[None, :]
        if ATOMIC:
            tl.atomic_add(out, acc, mask=mask)
        else:
            tl.store(out, acc, mask=mask)


@triton.jit
def _expand_kernel(s_ptr, b_ptr, y_ptr, sorted_ptr, seg_ptr, N, R, stride_sm, stride_bs, stride_bn, stride_ym,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
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
        sv = tl.load(s_ptr + tok[:, None] * stride_sm + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :],
                     other=0.0)
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
    shrunk = (torch.zeros if split > 1 else torch.empty)(tokens, width, dtype=torch.float32, device=x.device)
    block_r = _block(width)
    _shrink_kernel[(m_blocks, num_slots, split)](
        x, lora_a, shrunk, batch.sorted_tokens, batch.seg_starts, k, width, x.stride(0), lora_a.stride(0),
        lora_a.stride(1), shrunk.stride(0), per_split, BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=SHRINK_BLOCK_K,
        ATOMIC=split > 1)
    _expand_kernel[(m_blocks, num_slots, triton.cdiv(n, EXPAND_BLOCK_N))](
        shrunk, lora_b, y, batch.sorted_tokens, batch.seg_starts, n, width, shrunk.stride(0), lora_b.stride(0),
        lora_b.stride(1), y.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=EXPAND_BLOCK_N, BLOCK_R=block_r)
