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

The pushed variant (16-bit dtypes) has no flags and reads no other GPU's memory: each program writes its rank's
row into that rank's slot of every peer's receive buffer, then waits for the peers' rows to arrive in its own.
Receive buffers hold negative zero (the "empty" mark; a pushed -0 is sent as +0, the same number) wherever nothing
has arrived yet. The program sums the slots in rank order and marks them empty again for the next call that uses
this buffer. That call is two calls later (callers alternate buffers), and no peer can push into the buffer again
before it has received this rank's next row, which this rank sends only after this kernel finished.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inferneo.kernels._pdl import launch_options, pdl_for, wait_for_previous_kernel
from inferneo.kernels._triton_elementwise import add_rms_norm_row

EMPTY = tl.constexpr(-32768)  # the bits of a 16-bit negative zero: "nothing pushed here yet"


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
                             eps: float, pdl: bool | None = None) -> torch.Tensor:
    """Launch the fused kernel, one program per row; returns the normalized rows (``residual`` is updated in place).

    ``stage_ptrs`` / ``flag_ptrs``: int64 tensors on the device holding every rank's staging-buffer and flag-array
    addresses (int32 flags). Row ``i``'s program uses flags ``flag_base + i * world + r`` for ranks ``r``; the
    caller owns that layout (``PeerAllReduce``).
    """
    n_cols = residual.shape[-1]
    assert residual.is_contiguous() and residual.shape[0] == rows, "the residual must be [rows, hidden], contiguous"
    out = torch.empty_like(residual)
    block = triton.next_power_of_2(n_cols)
    pdl = pdl_for(residual, pdl)
    _peer_reduce_add_rms_norm_kernel[(rows,)](
        stage_ptrs, flag_ptrs, residual, weight, out, n_cols, residual.stride(0), out.stride(0), eps,
        flag_base, RANK=rank, WORLD=world, BLOCK=block, PDL=pdl,
        num_warps=min(max(block // 256, 1), 8), **launch_options(pdl))
    return out


@triton.jit
def _nth(i: tl.constexpr, p0, p1, p2, p3, p4, p5, p6, p7):
    """The ``i``-th of eight pointer arguments (``i`` known at compile time)."""
    if i == 0:
        p = p0
    elif i == 1:
        p = p1
    elif i == 2:
        p = p2
    elif i == 3:
        p = p3
    elif i == 4:
        p = p4
    elif i == 5:
        p = p5
    elif i == 6:
        p = p6
    else:
        p = p7
    return p


@triton.jit
def _pushed_reduce_add_rms_norm_kernel(stage_ptr, r0, r1, r2, r3, r4, r5, r6, r7, res_ptr, w_ptr, out_ptr, n_cols,
                                       rows, stride_r, stride_o, eps, RANK: tl.constexpr, WORLD: tl.constexpr,
                                       BLOCK: tl.constexpr, PDL: tl.constexpr):
    # r0..r7: every rank's receive buffer as 16-bit words (kernel arguments rather than a table in memory, so the
    # compiler knows their alignment and writes 16-byte vectors across the link).
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    # This rank's partial row (written locally by the layer before), with -0 made +0: -0 marks "empty".
    own = tl.load(stage_ptr + row * n_cols + cols, mask=mask, other=0.0)
    own = tl.where(own == 0, tl.zeros_like(own), own)
    own_bits = own.to(tl.int16, bitcast=True)
    # 1. Push it into this rank's slot of every peer's receive buffer.
    for dst in tl.static_range(WORLD):
        if dst != RANK:
            theirs = _nth(dst, r0, r1, r2, r3, r4, r5, r6, r7)
            tl.store(theirs + (RANK * rows + row) * n_cols + cols, own_bits, mask=mask)
    # 2. Sum in rank order (every rank adds the same numbers in the same order), waiting for each peer's row to
    # arrive in this rank's own buffer.
    mine = _nth(RANK, r0, r1, r2, r3, r4, r5, r6, r7)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for src in tl.static_range(WORLD):
        if src == RANK:
            total += own.to(tl.float32)
        else:
            slot = mine + (src * rows + row) * n_cols + cols
            bits = tl.load(slot, mask=mask, other=0, volatile=True)
            while tl.sum((bits == EMPTY).to(tl.int32), axis=0) > 0:
                bits = tl.load(slot, mask=mask, other=0, volatile=True)
            total += bits.to(own.dtype, bitcast=True).to(tl.float32)
    tl.debug_barrier()  # every thread has its values before any slot is marked empty again
    for src in tl.static_range(WORLD):
        if src != RANK:
            tl.store(mine + (src * rows + row) * n_cols + cols, tl.full([BLOCK], EMPTY, tl.int16), mask=mask)
    add_rms_norm_row(total.to(out_ptr.dtype.element_ty), res_ptr + row * stride_r, w_ptr, out_ptr + row * stride_o,
                     cols, mask, n_cols, eps, True)


class DevicePointer:
    """A raw device address passed to a Triton kernel as a typed pointer (Triton reads ``data_ptr()`` and
    ``dtype``, and specializes on the address's 16-byte alignment as for a tensor)."""

    def __init__(self, address: int, dtype: torch.dtype) -> None:
        self.address, self.dtype = address, dtype

    def data_ptr(self) -> int:
        return self.address


def pushed_reduce_add_rms_norm(staged: torch.Tensor, recv: list, rank: int, residual: torch.Tensor,
                               weight: torch.Tensor, eps: float, pdl: bool | None = None) -> torch.Tensor:
    """The pushed variant, one program per row: send this rank's ``staged`` rows ([rows, cols], 16-bit, local) to
    every peer's receive buffer, wait for theirs in this rank's own buffer, mark those slots empty again, add the
    sum to ``residual`` (in place) and return its RMSNorm.

    ``recv``: every rank's receive buffer (int16 tensors, or :class:`DevicePointer` s of dtype int16, at most 8),
    each of ``len(recv) * rows * cols`` words, all -0 (``-32768``) when unused. Every rank must make the same call.
    """
    rows, n_cols = staged.shape
    world = len(recv)
    assert 2 <= world <= 8 and all(r.dtype == torch.int16 for r in recv), "2 to 8 int16 receive buffers"
    assert staged.is_contiguous() and staged.element_size() == 2 and residual.dtype == staged.dtype
    assert residual.is_contiguous() and residual.shape == (rows, n_cols), "the residual must be [rows, cols]"
    out = torch.empty_like(residual)
    block = triton.next_power_of_2(n_cols)
    pdl = pdl_for(residual, pdl)
    ptrs = list(recv) + [recv[rank]] * (8 - world)
    _pushed_reduce_add_rms_norm_kernel[(rows,)](
        staged, *ptrs, residual, weight, out, n_cols, rows, residual.stride(0), out.stride(0), eps,
        RANK=rank, WORLD=world, BLOCK=block, PDL=pdl, num_warps=min(max(block // 256, 1), 8), **launch_options(pdl))
    return out
