"""The all-reduce after a row-parallel layer fused with the residual add and RMSNorm that follow it (Triton).

At tensor-parallel decode the two all-reduces of every layer are tiny (one row of the hidden size per token), so
each costs its launch and a round of synchronisation, not bandwidth; and each is followed by the residual add and
RMSNorm, one more launch. Here one kernel does all three. Every rank's row-parallel layer writes its partial sum
straight into a staging buffer the other GPUs can read (``PeerAllReduce``); the kernel then

1. meets the program of the same row on every other rank: it raises a flag in each peer's flag array ("my part is
   staged") and waits for each peer's flag in its own array, setting it back to zero as it takes it, so the flags
   are ready for the next call without another barrier;
2. sums the staged rows of all ranks in rank order (every rank gets the same bits), rounds the sum to the model
   dtype as an all-reduce would, adds the residual (rounded again, written back), and normalizes.

One barrier per call is enough because callers alternate between two staging buffers (see ``PeerAllReduce``):
a rank overwrites a buffer only after every peer has entered the following call, so after it finished reading.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inferneo.kernels._pdl import launch_options, pdl_for, wait_for_previous_kernel
from inferneo.kernels._triton_elementwise import add_rms_norm_row


@triton.jit
def _peer_reduce_add_rms_norm_kernel(stage_ptrs, flag_ptrs, res_ptr, w_ptr, out_ptr, n_cols, stride_r, stride_o,
                                     eps, flag_base, RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr,
                                     PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    pid = tl.program_id(0)
    # 1. The barrier with this row's program on every other rank (scalar atomics: one thread each).
    mine = tl.load(flag_ptrs + RANK).to(tl.pointer_type(tl.int32))
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            theirs = tl.load(flag_ptrs + peer).to(tl.pointer_type(tl.int32))
            # The flag is down: the peer took it two calls ago, before the signal this rank waited for last call.
            # So a plain exchange (no read-back loop) raises it; its result is never waited for.
            tl.atomic_xchg(theirs + flag_base + pid * WORLD + RANK, 1, sem="release", scope="sys")
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            while tl.atomic_cas(mine + flag_base + pid * WORLD + peer, 1, 0, sem="acquire", scope="sys") != 1:
                pass
    tl.debug_barrier()
    # 2. Sum (rounded to the model dtype, as an all-reduce's result is), add the residual, normalize.
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    row = pid.to(tl.int64)  # one program per row
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for peer in tl.static_range(WORLD):
        staged = tl.load(stage_ptrs + peer).to(out_ptr.dtype)
        part = tl.load(staged + row * n_cols + cols, mask=mask, other=0.0, volatile=True)
        total += part.to(tl.float32)
    add_rms_norm_row(total.to(out_ptr.dtype.element_ty), res_ptr + row * stride_r, w_ptr, out_ptr + row * stride_o,
                     cols, mask, n_cols, eps, True)


def peer_reduce_add_rms_norm(stage_ptrs: torch.Tensor, flag_ptrs: torch.Tensor, flag_base: int, rank: int,
                             world: int, rows: int, residual: torch.Tensor, weight: torch.Tensor,
                             eps: float) -> torch.Tensor:
    """Launch the fused kernel, one program per row; returns the normalized rows (``residual`` is updated in place).

    ``stage_ptrs`` / ``flag_ptrs``: int64 tensors on the device holding every rank's staging-buffer and flag-array
    addresses (int32 flags). Row ``i``'s program uses flags ``flag_base + i * world + r`` for ranks ``r``; the
    caller owns that layout (``PeerAllReduce``).
    """
    n_cols = residual.shape[-1]
    assert residual.is_contiguous() and residual.shape[0] == rows, "the residual must be [rows, hidden], contiguous"
    out = torch.empty_like(residual)
    block = triton.next_power_of_2(n_cols)
    pdl = pdl_for(residual)
    _peer_reduce_add_rms_norm_kernel[(rows,)](
        stage_ptrs, flag_ptrs, residual, weight, out, n_cols, residual.stride(0), out.stride(0), eps,
        flag_base, RANK=rank, WORLD=world, BLOCK=block, PDL=pdl,
        num_warps=min(max(block // 256, 1), 8), **launch_options(pdl))
    return out
