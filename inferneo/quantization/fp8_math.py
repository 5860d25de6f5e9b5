"""FP8 (e4m3) arithmetic in plain PyTorch: quantizing activations and weights, de-quantizing scaled blocks.

These are the definitions the kernels are held to (``inferneo.kernels.triton_fp8`` computes the same scales) and
the math of the reference path (CPU emulation, a fallback for shapes the GPU GEMM refuses). Every function is
made of tensor operations only (no ``.item()``), so it can run inside a CUDA graph.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_FLOOR = 1e-12  # an all-zero group gets this scale (its values quantize to 0 either way)


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` clamped to the e4m3 range and rounded to e4m3 (``scale`` broadcasts against ``x``)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_groups(x: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values ``[M, K]`` and float32 scales ``[M, ceil(K / group)]`` of ``x [M, K]``: one scale,
    ``max(|x|) / 448`` (floored at :data:`SCALE_FLOOR`), per row and ``group`` columns (None: per row)."""
    m, k = x.shape
    group = k if group is None else group
    num_groups = -(-k // group)
    padded = torch.nn.functional.pad(x.float(), (0, num_groups * group - k)).view(m, num_groups, group)
    scales = (padded.abs().amax(dim=-1) / FP8_MAX).clamp_min(SCALE_FLOOR)
    q = quantize_with_scale(padded, scales.unsqueeze(-1)).view(m, num_groups * group)[:, :k]
    return q.contiguous(), scales


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values of ``x`` and one float32 scale (a 0-d tensor), ``max(|x|) / 448``."""
    scale = (x.abs().amax().float() / FP8_MAX).clamp_min(SCALE_FLOOR)
    return quantize_with_scale(x, scale), scale


def expand_blocks(scales: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """Per-element ``[rows, cols]`` scales from block scales ``[ceil(rows / block[0]), ceil(cols / block[1])]``."""
    return scales.repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None) -> torch.Tensor:
    """float32 ``q * scale``: ``scale`` broadcasts (a scalar, per-row ``[rows, 1]``), or with ``block`` is one scale
    per ``block[0] x block[1]`` tile of the 2-D ``q``."""
    scale = scale.float()
    if block is not None:
        scale = expand_blocks(scale, q.shape[0], q.shape[1], block)
    return q.float() * scale


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 ``[N, K]`` values and float32 ``[ceil(N / bn), ceil(K / bk)]`` scales of ``w``, one scale per tile
    (``max(|tile|) / 448``), the layout of block-wise FP8 checkpoints (their ``weight_scale_inv``)."""
    n, k = w.shape
    bn, bk = block
    nb, kb = -(-n // bn), -(-k // bk)
    padded = torch.nn.functional.pad(w.float(), (0, kb * bk - k, 0, nb * bn - n))
    tiles = padded.view(nb, bn, kb, bk)
    scales = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp_min(SCALE_FLOOR)
    return quantize_with_scale(w, expand_blocks(scales, n, k, block)), scales
