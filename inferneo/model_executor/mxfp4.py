"""MXFP4 checkpoint tensors (OCP microscaling FP4), de-quantized at load.

An MXFP4 weight ``W`` of shape ``[..., rows, cols]`` is stored as two tensors:

- ``W_blocks``: uint8 ``[..., rows, cols // 32, 16]``, two e2m1 values per byte, the low nibble first (the value at
  the even column), the high nibble second;
- ``W_scales``: uint8 ``[..., rows, cols // 32]``, one e8m0 exponent per group of 32 values, biased by 127.

Each value is ``E2M1[nibble] * 2 ** (scale - 127)``. gpt-oss checkpoints store their expert weights this way
(``quantization_config: {"quant_method": "mxfp4"}``); the engine de-quantizes them into the model dtype while
loading, which is exact in float32 and bfloat16 (every e2m1 value times a power of two is representable).

:func:`pair_mxfp4_weights` turns a checkpoint's ``(name, tensor)`` stream into one where every blocks/scales pair
becomes a single :class:`Mxfp4Weight` under the weight's name, for the model to de-quantize where its parameter
lives. (It sits beside the models rather than in ``model_loader``, which already depends on ``model_executor``.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

BLOCK_SIZE = 32  # values per scale
SCALE_BIAS = 127
BLOCKS_SUFFIX = "_blocks"
SCALES_SUFFIX = "_scales"

# The 16 e2m1 codes: sign bit 3, exponent bits 2-1, mantissa bit 0.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True, slots=True)
class Mxfp4Weight:
    """One MXFP4 weight as stored: ``blocks`` uint8 ``[..., rows, groups, 16]``, ``scales`` uint8
    ``[..., rows, groups]``; it de-quantizes to ``[..., rows, groups * 32]``."""

    blocks: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        """The de-quantized shape."""
        return (*self.scales.shape[:-1], self.scales.shape[-1] * BLOCK_SIZE)

    def dequantize(self, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
        """The weight in ``dtype``, computed on ``device`` (default: where the blocks are)."""
        return dequantize_mxfp4(self.blocks.to(device), self.scales.to(device), dtype)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[..., rows, groups, 16]`` uint8 blocks and ``[..., rows, groups]`` uint8 scales to ``[..., rows, groups*32]``.

    Raises ValueError when the shapes do not pair up.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8; got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BLOCK_SIZE // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)} "
                         f"(expected blocks of shape [*scales.shape, {BLOCK_SIZE // 2}])")
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).to(torch.int64)  # [..., groups, 16, 2]
    values = table[codes].flatten(-3)  # [..., rows, groups * 32]: low nibble at the even column
    exponents = scales.to(torch.int32) - SCALE_BIAS
    values = torch.ldexp(values.unflatten(-1, (scales.shape[-1], BLOCK_SIZE)), exponents.unsqueeze(-1))
    return values.flatten(-2).to(dtype)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 ``(blocks, scales)`` of a ``[..., rows, cols]`` weight (``cols`` a multiple of 32), the inverse of
    :func:`dequantize_mxfp4` for weights made of MXFP4 values; other values round to the nearest e2m1 value of
    their group's scale (the smallest power of two that brings the group's largest magnitude within 6).

    For writing test checkpoints; the engine itself only de-quantizes.
    """
    if weight.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {BLOCK_SIZE}; got {weight.shape[-1]}")
    groups = weight.float().unflatten(-1, (weight.shape[-1] // BLOCK_SIZE, BLOCK_SIZE))
    largest = groups.abs().amax(dim=-1)
    exponents = torch.ceil(torch.log2(largest / 6.0)).nan_to_num(0.0, neginf=0.0).clamp(-SCALE_BIAS, SCALE_BIAS)
    scaled = torch.ldexp(groups, -exponents.unsqueeze(-1))
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=weight.device)
    codes = (scaled.unsqueeze(-1) - table).abs().argmin(dim=-1).to(torch.uint8)  # [..., groups, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exponents + SCALE_BIAS).to(torch.uint8)
    return blocks, scales


def pair_mxfp4_weights(
        weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor | Mxfp4Weight]]:
    """The checkpoint stream with each ``NAME_blocks`` / ``NAME_scales`` pair replaced by ``(NAME, Mxfp4Weight)``.

    Other tensors pass through unchanged, in order; a quantized weight is yielded once both halves were read.
    Raises ValueError for a half whose partner never comes.
    """
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        suffix = next((s for s in (BLOCKS_SUFFIX, SCALES_SUFFIX) if name.endswith(s)), None)
        if suffix is None:
            yield name, tensor
            continue
        base = name.removesuffix(suffix)
        halves = pending.setdefault(base, {})
        halves[suffix] = tensor
        if len(halves) == 2:
            del pending[base]
            yield base, Mxfp4Weight(blocks=halves[BLOCKS_SUFFIX], scales=halves[SCALES_SUFFIX])
    if pending:
        unpaired = ", ".join(base + next(iter(halves)) for base, halves in sorted(pending.items()))
        raise ValueError(f"MXFP4 checkpoint tensors without their blocks/scales partner: {unpaired}")
