"""FP8 (e4m3) kernels for the GPU, in Triton: activation quantization per token (or per token and column group)
and the block-scaled GEMM that block-wise 128x128 checkpoints (DeepSeek-V3 style) need.

- :func:`quantize_per_token_group` turns ``x [M, K]`` into e4m3 values and float32 scales, one scale per row and
  ``group`` consecutive columns (``group = K``: one per token). The scale is ``max(|x|) / 448`` over the group
  (floored at a tiny value so an all-zero row divides safely), exactly as
  :func:`inferneo.quantization.fp8_math.quantize_groups` computes it in PyTorch. No host synchronisation: the
  kernel runs inside CUDA graphs.
- :func:`block_scaled_mm` computes ``y = (a * a_scale) @ (b * b_scale).T`` for e4m3 ``a [M, K]`` with one scale per
  row and ``block_k`` columns, and e4m3 ``b [N, K]`` with one scale per ``block_n x block_k`` tile. Each K step is
  one ``block_k``-wide tile: its fp8 product is taken on the tensor cores in float32 and scaled by the row's and
  the tile's scales before it joins the float32 accumulator.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0  # largest finite float8_e4m3fn value
SCALE_FLOOR = 1e-12  # a group of zeros gets this scale (its values quantize to 0 either way)


@triton.jit
def _quant_group_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm, GROUP: tl.constexpr,
                        BLOCK: tl.constexpr, FP8_MAX_C: tl.constexpr, FLOOR: tl.constexpr):
    row = tl.program_id(0)
    grp = tl.program_id(1)
    cols = grp * GROUP + tl.arange(0, BLOCK)
    mask = (tl.arange(0, BLOCK) < GROUP) & (cols < K)
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) / FP8_MAX_C, FLOOR)
    q = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX_C, FP8_MAX_C)  # IEEE division, as PyTorch divides
    tl.store(q_ptr + row * stride_qm + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_sm + grp, scale)


def quantize_per_token_group(x: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values ``[M, K]`` and float32 scales ``[M, ceil(K / group)]`` of ``x [M, K]`` (``group`` None: the
    whole row, one scale per token)."""
    m, k = x.shape
    group = k if group is None else group
    if x.stride(-1) != 1:
        x = x.contiguous()
    num_groups = triton.cdiv(k, group)
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((m, num_groups), dtype=torch.float32, device=x.device)
    if m:
        _quant_group_kernel[(m, num_groups)](x, q, scales, k, x.stride(0), q.stride(0), scales.stride(0),
                                             GROUP=group, BLOCK=triton.next_power_of_2(group), FP8_MAX_C=FP8_MAX,
                                             FLOOR=SCALE_FLOOR)
    return q, scales


@triton.jit
def _block_scaled_mm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K,
                            stride_am, stride_bn, stride_cm, stride_asm, stride_bsn,
                            BLOCK_SCALE_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering of the output tiles, so neighbouring programs share rows of a and columns of b in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_mask = rows < M
    col_mask = cols < N
    a_rows = a_ptr + rows[:, None] * stride_am
    b_cols = b_ptr + cols[None, :] * stride_bn
    as_rows = as_ptr + rows * stride_asm
    bs_cols = bs_ptr + (cols // BLOCK_SCALE_N) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):  # one K step = one scale block (BLOCK_K is the checkpoint's block_k)
        k = kb * BLOCK_K + ks
        k_mask = k < K
        a = tl.load(a_rows + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_cols + k[:, None], mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        a_s = tl.load(as_rows + kb, mask=row_mask, other=0.0)
        b_s = tl.load(bs_cols + kb, mask=col_mask, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def block_scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                    block: tuple[int, int], out_dtype: torch.dtype, block_m: int | None = None,
                    block_n: int = 128) -> torch.Tensor:
    """``(a * a_scale) @ (b * b_scale).T`` in ``out_dtype``.

    ``a`` is e4m3 ``[M, K]`` with float32 ``a_scale [M, ceil(K / block_k)]`` (one per row and K block); ``b`` is
    e4m3 ``[N, K]`` with float32 ``b_scale [ceil(N / block_n), ceil(K / block_k)]`` for ``block = (block_n,
    block_k)``. ``block_m`` / ``block_n`` are the output tile (default: 16 rows up to 16 tokens, else 64).
    """
    scale_n, scale_k = block
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k or a_scale.shape != (m, triton.cdiv(k, scale_k)) or \
            b_scale.shape != (triton.cdiv(n, scale_n), triton.cdiv(k, scale_k)):
        raise ValueError(f"block_scaled_mm: shapes a {tuple(a.shape)}, a_scale {tuple(a_scale.shape)}, "
                         f"b {tuple(b.shape)}, b_scale {tuple(b_scale.shape)} do not fit block {block}")
    if a.stride(1) != 1 or b.stride(1) != 1:
        raise ValueError("block_scaled_mm: a and b must be row-major")
    block_m = block_m or (16 if m <= 16 else 64)
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _block_scaled_mm_kernel[grid](a, b, out, a_scale, b_scale, m, n, k, a.stride(0), b.stride(0), out.stride(0),
                                  a_scale.stride(0), b_scale.stride(0), BLOCK_SCALE_N=scale_n, BLOCK_M=block_m,
                                  BLOCK_N=block_n, BLOCK_K=scale_k, GROUP_M=8)
    return out
