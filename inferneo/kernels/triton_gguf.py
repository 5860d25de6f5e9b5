"""A Triton GEMM over GGUF blocks (CUDA): ``x [M, K] @ W.T`` with ``W`` de-quantized tile by tile in registers.

Each program computes a ``BLOCK_M x BLOCK_N`` tile of the output. It walks ``K`` in 32-weight steps (one Q4_0 /
Q4_1 / Q8_0 block, or one sub-block of a Q4_K / Q5_K / Q6_K block), gathers the bytes of those 32 weights of its
``BLOCK_N`` rows, de-quantizes them with the format's float32 formula (``quantization/gguf_blocks.py``) and
multiplies them into a float32 accumulator with ``tl.dot`` (float32 activations: IEEE float32 products;
half-precision activations: the weights rounded to the activations' dtype). The output is in ``x``'s dtype.

Tested on CPU under Triton's interpreter against ``F.linear`` on the de-quantized weights.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_QTYPES = {2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}
_TYPE_SIZE = {2: 18, 3: 20, 8: 34, 12: 144, 13: 176, 14: 210}
_BLOCK_SIZE = {2: 32, 3: 32, 8: 32, 12: 256, 13: 256, 14: 256}


@triton.jit
def _f16_at(ptr, offsets, mask):
    """The little-endian f16 at byte ``offsets`` as float32."""
    lo = tl.load(ptr + offsets, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + offsets + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _weights(w_ptr, row, mask_n, k0, QTYPE: tl.constexpr):
    """The float32 weights ``[BLOCK_N, 32]`` of columns ``k0 .. k0 + 31`` of the rows starting at byte ``row``."""
    kk = tl.arange(0, 32)
    m2 = mask_n[:, None]
    if QTYPE == 2 or QTYPE == 3:  # Q4_0 / Q4_1
        base = row + (k0 // 32) * (18 if QTYPE == 2 else 20)
        first = 2 if QTYPE == 2 else 4
        byte = tl.load(w_ptr + base[:, None] + first + (kk % 16)[None, :], mask=m2, other=0)
        q = tl.where(kk[None, :] < 16, byte & 15, byte >> 4).to(tl.float32)
        d = _f16_at(w_ptr, base, mask_n)[:, None]
        if QTYPE == 2:  # noqa: SIM108 - constexpr branches: one per compiled kernel
            w = d * (q - 8.0)
        else:
            w = d * q + _f16_at(w_ptr, base + 2, mask_n)[:, None]
    elif QTYPE == 8:  # Q8_0
        base = row + (k0 // 32) * 34
        q = tl.load(w_ptr + base[:, None] + 2 + kk[None, :], mask=m2, other=0).to(tl.int8, bitcast=True)
        w = q.to(tl.float32) * _f16_at(w_ptr, base, mask_n)[:, None]
    elif QTYPE == 12 or QTYPE == 13:  # Q4_K / Q5_K: sub-block j of a 256-weight block
        base = row + (k0 // 256) * (144 if QTYPE == 12 else 176)
        j = (k0 % 256) // 32
        s_j = tl.load(w_ptr + base + 4 + j, mask=mask_n, other=0).to(tl.int32)
        s_j4 = tl.load(w_ptr + base + 8 + j, mask=mask_n, other=0).to(tl.int32)
        s_jm4 = tl.load(w_ptr + base + 4 + tl.maximum(j - 4, 0), mask=mask_n, other=0).to(tl.int32)
        low_half = j < 4
        sc = tl.where(low_half, s_j & 63, (s_j4 & 15) | ((s_jm4 >> 6) << 4))
        mn = tl.where(low_half, s_j4 & 63, (s_j4 >> 4) | ((s_j >> 6) << 4))
        first = 16 if QTYPE == 12 else 48
        byte = tl.load(w_ptr + base[:, None] + first + 32 * (j // 2) + kk[None, :], mask=m2, other=0).to(tl.int32)
        q = (byte >> (4 * (j % 2))) & 15
        if QTYPE == 13:
            qh = tl.load(w_ptr + base[:, None] + 16 + kk[None, :], mask=m2, other=0).to(tl.int32)
            q = q | (((qh >> j) & 1) << 4)
        scale = _f16_at(w_ptr, base, mask_n) * sc.to(tl.float32)
        shift = _f16_at(w_ptr, base + 2, mask_n) * mn.to(tl.float32)
        w = scale[:, None] * q.to(tl.float32) - shift[:, None]
    else:  # Q6_K
        base = row + (k0 // 256) * 210
        e = (k0 % 256) + kk
        h, r = e // 128, e % 128
        low = tl.load(w_ptr + base[:, None] + (64 * h + r % 64)[None, :], mask=m2, other=0).to(tl.int32)
        high = tl.load(w_ptr + base[:, None] + (128 + 32 * h + r % 32)[None, :], mask=m2, other=0).to(tl.int32)
        q = ((low >> (4 * (r // 64))[None, :]) & 15) | (((high >> (2 * (r // 32))[None, :]) & 3) << 4)
        sc = tl.load(w_ptr + base[:, None] + (192 + e // 16)[None, :], mask=m2, other=0).to(tl.int8, bitcast=True)
        d = _f16_at(w_ptr, base + 208, mask_n)[:, None]
        w = (d * sc.to(tl.float32)) * (q - 32).to(tl.float32)
    return w


@triton.jit
def _gguf_matmul_kernel(x_ptr, w_ptr, out_ptr, M, N, K, row_bytes, stride_xm, stride_om,
                        QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = rm < M, rn < N
    row = rn.to(tl.int64) * row_bytes
    kk = tl.arange(0, 32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, 32):
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + (k0 + kk)[None, :], mask=mask_m[:, None], other=0)
        w = _weights(w_ptr, row, mask_n, k0, QTYPE)
        if IEEE:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def gguf_matmul(x: torch.Tensor, blocks: torch.Tensor, qtype: int, block_m: int = 16,
                block_n: int = 64) -> torch.Tensor:
    """``x [M, K] @ W.T`` for ``W`` in ggml blocks ``blocks`` (uint8 ``[N, row_bytes]``, type ``qtype``); the
    result ``[M, N]`` in ``x``'s dtype."""
    if qtype not in _QTYPES:
        raise ValueError(f"ggml type {qtype} has no Triton kernel; supported: {', '.join(_QTYPES.values())}")
    x = x.contiguous()
    m, k = x.shape
    n, row_bytes = blocks.shape
    if row_bytes != k // _BLOCK_SIZE[qtype] * _TYPE_SIZE[qtype] or k % _BLOCK_SIZE[qtype]:
        raise ValueError(f"{_QTYPES[qtype]}: rows of {row_bytes} bytes do not hold {k} weights")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _gguf_matmul_kernel[grid](x, blocks, out, m, n, k, row_bytes, x.stride(0), out.stride(0), QTYPE=qtype,
                              BLOCK_M=block_m, BLOCK_N=block_n, IEEE=x.dtype == torch.float32)
    return out
