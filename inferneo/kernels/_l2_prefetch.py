"""L2 prefetches issued from inside a kernel, for the batch-1 decode chain (Hopper; compiled only when asked).

A batch-1 decode step alternates kernels that stream weights at the memory bandwidth (the GEMV, the expert
kernels) with kernels bound by latency (q/k norm + rotary, decode attention over a short context, routing) while
device memory idles. A weight-streaming kernel can ask, at the end of each of its programs, for the next weight it
knows of (the attention output projection's, from the q/k/v GEMV) to be brought into L2: the copy then runs
during the latency-bound kernels, and the GEMV that reads it finds it in L2. Weights never change during
inference, so the prefetch needs no ordering with any other kernel; it is a hint (no result, no completion), and
the data stays correct whatever happens to it.

``MODE``: 0 none; 1 ``cp.async.bulk.prefetch.L2`` (the bulk copy engine, one instruction per thread for a
16-byte-aligned chunk); 2 ``prefetch.global.L2::evict_last`` per 128-byte line. The launchers pass mode 0 under
Triton's interpreter (no inline assembly there) and off CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LINE = tl.constexpr(128)


@triton.jit
def prefetch_l2(ptr, nbytes, pid, num_programs, MODE: tl.constexpr, LANES: tl.constexpr):
    """Prefetch program ``pid``'s share (of ``num_programs`` equal shares) of the ``nbytes`` at ``ptr`` into L2.
    ``nbytes`` and ``ptr`` are multiples of 16; ``LANES``: the threads of the program (a power of two)."""
    if MODE != 0:
        base = ptr.to(tl.pointer_type(tl.uint8))
        lane = tl.arange(0, LANES)
        if MODE == 1:
            per = tl.cdiv(tl.cdiv(nbytes, num_programs), 16 * LANES) * (16 * LANES)
            sub = per // LANES
            start = pid.to(tl.int64) * per + lane * sub
            size = tl.minimum(tl.maximum(nbytes - start, 0), sub).to(tl.int32)
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
                "=r,l,r", [base + start, size], dtype=tl.int32, is_pure=False, pack=1)
        else:
            per = tl.cdiv(tl.cdiv(nbytes, num_programs), LINE * LANES) * (LINE * LANES)
            start = pid.to(tl.int64) * per
            for off in range(0, per, LINE * LANES):
                at = start + off + lane * LINE
                tl.inline_asm_elementwise(
                    "{ .reg .pred p; setp.lt.s64 p, $2, $3; @p prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0; }",
                    "=r,l,l,l", [base + at, at, nbytes.to(tl.int64)], dtype=tl.int32, is_pure=False, pack=1)


PREFETCH_MODE = 1
"""The mode the engine's kernels use (``moe_l2_prefetch.py`` measured them)."""


def prefetch_args(target: torch.Tensor | None, like: torch.Tensor, mode: int | None = None) -> tuple:
    """``(pointer, nbytes, MODE)`` for a kernel that prefetches ``target`` (None: nothing): mode 0 off CUDA, for a
    tensor that is not contiguous or whose size or address is not a multiple of 16 bytes."""
    if target is None or not like.is_cuda or not target.is_cuda or not target.is_contiguous():
        return like, 0, 0
    nbytes = target.numel() * target.element_size()
    if nbytes % 16 or target.data_ptr() % 16:
        return like, 0, 0
    return target, nbytes, PREFETCH_MODE if mode is None else mode
