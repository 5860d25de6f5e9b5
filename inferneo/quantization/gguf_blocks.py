"""The ggml block formats Inferneo keeps quantized in memory, and their de-quantization in PyTorch.

A GGUF tensor of one of these types is a sequence of fixed-size blocks along each row (32 weights for the legacy
formats, 256 for the K-quants); a row of ``K`` weights is ``K / block_size * type_size`` bytes. The decoders here
reproduce ``gguf.quants.dequantize`` bit for bit (the same float32 operations in the same order), on any device:

- ``Q4_0`` (18 bytes / 32): f16 ``d``; 16 bytes of nibbles (low nibbles are weights 0-15, high 16-31);
  ``w = d * (q - 8)``.
- ``Q4_1`` (20 / 32): f16 ``d``, f16 ``m``, nibbles as Q4_0; ``w = d * q + m``.
- ``Q8_0`` (34 / 32): f16 ``d``, 32 int8; ``w = q * d``.
- ``Q4_K`` (144 / 256): f16 ``d``, f16 ``dmin``, 12 bytes of eight 6-bit scales and mins, 128 bytes of nibbles
  (byte group ``g`` of 32: low nibbles are sub-block ``2g``, high ``2g + 1``); ``w = (d * sc) * q - dmin * m``.
- ``Q5_K`` (176 / 256): as Q4_K plus 32 bytes ``qh`` whose bit ``j`` is the fifth bit of sub-block ``j``.
- ``Q6_K`` (210 / 256): 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales (one per 16 weights),
  f16 ``d``; ``w = (d * scale) * (q - 32)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K = 256


@dataclass(frozen=True, slots=True)
class BlockFormat:
    """One ggml block type: ``block_size`` weights in ``type_size`` bytes."""

    qtype: int
    name: str
    block_size: int
    type_size: int

    def row_bytes(self, in_features: int) -> int:
        """Bytes of one row of ``in_features`` weights (which must fill whole blocks)."""
        if in_features % self.block_size:
            raise ValueError(f"GGUF {self.name}: rows of {in_features} weights do not fill {self.block_size}-weight "
                             "blocks")
        return in_features // self.block_size * self.type_size


def _format(name: str) -> BlockFormat:
    qtype = GGMLQuantizationType[name]
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return BlockFormat(int(qtype), name, block_size, type_size)


#: the types whose weights stay in their blocks in memory (other GGUF types are de-quantized at load), by ggml id
KEPT_FORMATS: dict[int, BlockFormat] = {f.qtype: f for f in map(_format, ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K",
                                                                          "Q6_K"))}


def block_format(qtype: int) -> BlockFormat:
    """The kept format with ggml id ``qtype``; ValueError naming the supported ones otherwise."""
    try:
        return KEPT_FORMATS[int(qtype)]
    except KeyError:
        raise ValueError(f"ggml type {qtype} is not kept quantized; kept: "
                         f"{', '.join(f.name for f in KEPT_FORMATS.values())}") from None


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The f16 at byte ``start`` of each block, as float32 ``[n, 1]``."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Nibbles of ``qs [n, groups * group]``: per group of ``group`` bytes, the low nibbles then the high ones.
    (No constant tensor is built from host data here or below: a GGUF embedding de-quantizes its rows inside the
    CUDA graphs' capture, where a host-to-device copy is refused.)"""
    qs = qs.reshape(qs.shape[0], -1, group)
    return torch.stack((qs & 0x0F, qs >> 4), dim=2).reshape(qs.shape[0], -1)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    q = (_nibbles(blocks[:, 2:], 16).to(torch.int8) - 8).float()
    return _f16(blocks, 0) * q


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0) * _nibbles(blocks[:, 4:], 16).float() + _f16(blocks, 2)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:].contiguous().view(torch.int8).float() * _f16(blocks, 0)


def k_scales_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins of Q4_K/Q5_K blocks from their 12 packed bytes ``[n, 12]``."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_scaled(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``(d * sc) * q - dmin * m`` per 32-weight sub-block of Q4_K/Q5_K blocks, ``q`` ``[n, 8, 32]`` float32."""
    n = blocks.shape[0]
    sc, mn = k_scales_mins(blocks[:, 4:16])
    d = (_f16(blocks, 0) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(blocks, 2) * mn.float()).reshape(n, 8, 1)
    return (d * q - dm).reshape(n, QK_K)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    return _k_scaled(blocks, _nibbles(blocks[:, 16:], 32).reshape(-1, 8, 32).float())


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    low = _nibbles(blocks[:, 48:], 32).reshape(n, 8, 32)
    shifts = torch.arange(8, dtype=torch.uint8, device=blocks.device).reshape(1, 8, 1)
    high = (blocks[:, 16:48].reshape(n, 1, 32) >> shifts) & 0x01
    return _k_scaled(blocks, (low | (high << 4)).float())


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(blocks, 208) * scales).reshape(n, 16, 1)
    low = _nibbles(blocks[:, :128], 64).reshape(n, 8, 32)
    qh = blocks[:, 128:192].reshape(n, 2, 32)
    high = torch.stack([(qh >> shift) & 0x03 for shift in (0, 2, 4, 6)], dim=2).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (d * q).reshape(n, QK_K)


_DECODERS = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


def dequantize_blocks(data: torch.Tensor, qtype: int) -> torch.Tensor:
    """De-quantize rows of ggml blocks: ``data`` uint8 ``[*rows, row_bytes]`` -> float32 ``[*rows, weights]``,
    equal bit for bit to ``gguf.quants.dequantize``."""
    fmt = block_format(qtype)
    if data.dtype != torch.uint8 or data.shape[-1] % fmt.type_size:
        raise ValueError(f"GGUF {fmt.name}: expected uint8 rows of whole {fmt.type_size}-byte blocks; got "
                         f"{data.dtype} {tuple(data.shape)}")
    rows = data.shape[:-1]
    blocks = data.reshape(-1, fmt.type_size)
    values = _DECODERS[fmt.name](blocks) if blocks.shape[0] else blocks.new_empty((0, fmt.block_size), dtype=torch.float)
    return values.reshape(*rows, data.shape[-1] // fmt.type_size * fmt.block_size)


# scale fields (byte offset of each f16) of each kept format, for random weights
_SCALE_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(blocks: torch.Tensor, fmt: BlockFormat, generator: torch.Generator) -> None:
    """Fill ``blocks`` (uint8 ``[rows, row_bytes]``) with random quants and small positive f16 scales."""
    blocks.copy_(torch.randint(0, 256, blocks.shape, generator=generator, device=blocks.device, dtype=torch.uint8))
    view = blocks.view(blocks.shape[0], -1, fmt.type_size)
    scale = torch.tensor([2e-3 if fmt.block_size == 32 else 2e-4], dtype=torch.float16).view(torch.uint8)
    for offset in _SCALE_OFFSETS[fmt.name]:
        view[..., offset:offset + 2] = scale.to(blocks.device)
