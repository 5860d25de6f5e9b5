"""The 4-bit weight layouts: how AWQ, GPTQ and compressed-tensors ``pack-quantized`` checkpoints store ``W``, and
the one canonical layout Inferneo's kernels read.

Every layout stores, for a weight ``W [out, in]``, 4-bit codes ``q`` (0..15), and per group of ``group_size``
input columns of each output row a scale ``s`` and a zero point ``z``: ``W[n, k] = (q[n, k] - z[g, n]) * s[g, n]``
with ``g`` the group of column ``k`` (``k // group_size``, or ``g_idx[k]`` for GPTQ with ``desc_act``).

Checkpoint layouts (int32 words hold eight codes, code ``i`` in bits ``4i..4i+3``):

- AWQ (``version: gemm``): ``qweight [in, out/8]`` packs eight output columns per word in AWQ's interleaved
  order (code ``i`` is column ``8j + AWQ_PACK_ORDER[i]``), ``qzeros [in/g, out/8]`` the same way,
  ``scales [in/g, out]`` float16.
- GPTQ (``checkpoint_format: gptq``): ``qweight [in/8, out]`` packs eight consecutive input rows per word,
  ``qzeros [in/g, out/8]`` eight output columns per word holding ``z - 1`` (GPTQ v1's convention),
  ``scales [in/g, out]``, ``g_idx [in]`` (each input column's group).
- compressed-tensors ``pack-quantized``: ``weight_packed [out, in/8]`` packs eight consecutive input columns per
  word as signed codes offset by 8; ``weight_zero_point [out/8, in/g]`` (asymmetric only) packs eight output
  rows per word the same way; ``weight_scale [out, in/g]``; symmetric weights have ``z = 8`` (signed 0).

The canonical layout (:class:`Int4Weights`): ``packed`` int32 ``[out/8, in]`` whose word ``(p, k)`` holds rows
``8p..8p+7`` of column ``k`` (code ``j`` is row ``8p + j``), ``scales`` float32 ``[in/g, out]``, ``zeros`` uint8
``[in/g, out]``, and for ``desc_act`` a column permutation ``perm`` (the kernel multiplies ``x[:, perm]`` by the
weight whose columns were sorted by group, so that each group is ``group_size`` consecutive columns).

On CUDA the Triton kernels read the row layout instead (:class:`Int4RowWeights`, :func:`pack_rows`): ``packed``
int32 ``[out, in/8]`` whose word ``(n, w)`` holds columns ``8w..8w+7`` of row ``n`` (code ``j`` is column
``8w + j``), so one output row's codes are contiguous along K, and ``scales`` / ``zeros`` uint8
``[out, in/group_size]``, one row's groups contiguous as well. Its scales are float16 where every scale is a float16
value (AWQ and GPTQ store float16 scales): the same values in 2 bytes instead of 4, less memory (not measurably
faster: docs/benchmarks.md, "W4A16 scales held in float16"); else float32.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

#: AWQ's packing order: code ``i`` of a word holds output column ``8j + AWQ_PACK_ORDER[i]``.
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: Where column ``c`` (of eight) sits in an AWQ word: the inverse of :data:`AWQ_PACK_ORDER`.
AWQ_UNPACK_ORDER = tuple(AWQ_PACK_ORDER.index(c) for c in range(8))


@dataclass(frozen=True, slots=True)
class Int4Codes:
    """One weight unpacked from a checkpoint: ``W[n, k] = (codes[n, k] - zeros[group[k], n]) * scales[group[k], n]``.

    ``codes`` uint8 ``[out, in]`` (0..15); ``zeros`` uint8 ``[groups, out]`` (0..16: GPTQ v1 can store 16);
    ``scales`` float32 ``[groups, out]``; ``g_idx`` int64 ``[in]`` (each column's group) or None for consecutive
    groups of ``group_size`` columns.
    """

    codes: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    group_size: int
    g_idx: torch.Tensor | None = None


@dataclass(frozen=True, slots=True)
class Int4Weights:
    """A weight in the canonical layout the kernels read (see the module docstring).

    ``packed`` int32 ``[out/8, in]``; ``scales`` float32 ``[in/group_size, out]``; ``zeros`` uint8
    ``[in/group_size, out]``; ``perm`` int64 ``[in]`` or None: the kernel computes ``x[:, perm] @ Wp.T`` where
    ``Wp = W[:, perm]``.
    """

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    perm: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.packed.shape[0] * 8

    @property
    def in_features(self) -> int:
        return self.packed.shape[1]


def _codes(words: torch.Tensor) -> torch.Tensor:
    """The eight 4-bit codes of each int32 word, as uint8 ``[*words.shape, 8]`` (code ``i`` from bits 4i)."""
    shifts = _shifts(words.device)
    return ((words.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8)


def _shifts(device: torch.device) -> torch.Tensor:
    """The eight nibble shifts, made on ``device`` (no host copy: the reference path runs inside CUDA graphs)."""
    return torch.arange(0, 32, 4, dtype=torch.int32, device=device)


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor | None, scales: torch.Tensor,
               group_size: int) -> Int4Codes:
    """AWQ (GEMM) tensors -> codes. Without ``qzeros`` (``zero_point: false``) every zero point is 8."""
    in_features, words = qweight.shape
    order = list(AWQ_UNPACK_ORDER)
    codes = _codes(qweight)[..., order].reshape(in_features, words * 8).t().contiguous()
    if qzeros is None:
        zeros = torch.full(scales.shape, 8, dtype=torch.uint8, device=scales.device)
    else:
        zeros = _codes(qzeros)[..., order].reshape(qzeros.shape[0], qzeros.shape[1] * 8)
    return Int4Codes(codes, zeros.contiguous(), scales.float(), group_size)


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                g_idx: torch.Tensor | None) -> Int4Codes:
    """GPTQ (v1 ``checkpoint_format: gptq``) tensors -> codes; stored zero points are ``z - 1``."""
    words, out_features = qweight.shape
    codes = _codes(qweight).permute(1, 0, 2).reshape(out_features, words * 8).contiguous()
    zeros = _codes(qzeros).reshape(qzeros.shape[0], qzeros.shape[1] * 8) + 1
    return Int4Codes(codes, zeros.contiguous(), scales.float(), group_size,
                     None if g_idx is None else g_idx.to(torch.int64))


def unpack_compressed(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                      weight_zero_point: torch.Tensor | None, group_size: int,
                      g_idx: torch.Tensor | None = None) -> Int4Codes:
    """compressed-tensors ``pack-quantized`` tensors -> codes (signed codes offset by 8, as the library packs
    them); without a zero point (symmetric) every zero point is 8; ``g_idx``: ``weight_g_idx`` (act-order)."""
    out_features, words = weight_packed.shape
    codes = _codes(weight_packed).reshape(out_features, words * 8)
    if weight_zero_point is None:
        zeros = torch.full((weight_scale.shape[1], out_features), 8, dtype=torch.uint8, device=weight_scale.device)
    else:
        zrows, groups = weight_zero_point.shape
        zeros = _codes(weight_zero_point).permute(0, 2, 1).reshape(zrows * 8, groups).t()
    return Int4Codes(codes.contiguous(), zeros.contiguous(), weight_scale.float().t().contiguous(), group_size,
                     None if g_idx is None else g_idx.to(torch.int64))


def sorted_by_group(codes: Int4Codes) -> tuple[Int4Codes, torch.Tensor | None]:
    """The same weight with its columns sorted by group (``desc_act``), and the permutation (None when the groups
    are already consecutive). Raises ValueError when the groups are not ``group_size`` columns each."""
    in_features = codes.codes.shape[1]
    consecutive = torch.arange(in_features, device=codes.codes.device) // codes.group_size
    if codes.g_idx is None or torch.equal(codes.g_idx, consecutive):
        return Int4Codes(codes.codes, codes.zeros, codes.scales, codes.group_size), None
    perm = torch.argsort(codes.g_idx, stable=True)
    if not torch.equal(codes.g_idx[perm], consecutive):
        raise ValueError(f"int4 g_idx does not give every group {codes.group_size} columns; cannot run it")
    return Int4Codes(codes.codes[:, perm].contiguous(), codes.zeros, codes.scales, codes.group_size), perm


def pack_canonical(codes: Int4Codes) -> Int4Weights:
    """Codes -> the canonical layout (columns sorted by group first when ``g_idx`` scatters them)."""
    if sys.byteorder != "little":
        raise ValueError("int4 weights: the canonical layout assumes a little-endian host")
    codes, perm = sorted_by_group(codes)
    out_features, in_features = codes.codes.shape
    if out_features % 8:
        raise ValueError(f"int4 weights: {out_features} output rows are not a multiple of 8")
    rows = codes.codes.view(out_features // 8, 4, 2, in_features)
    # Byte b of word (p, k) holds rows 8p + 2b (low nibble) and 8p + 2b + 1 (high nibble): little-endian int32.
    byte_codes = (rows[:, :, 0] | (rows[:, :, 1] << 4)).permute(0, 2, 1).contiguous()
    packed = byte_codes.view(torch.int32).reshape(out_features // 8, in_features)
    return Int4Weights(packed, codes.scales.contiguous(), codes.zeros.contiguous(), codes.group_size, perm)


def canonical_codes(weights: Int4Weights) -> torch.Tensor:
    """The uint8 codes ``[out, in]`` of a canonical weight (columns in its sorted order)."""
    return _codes(weights.packed).permute(0, 2, 1).reshape(weights.out_features, weights.in_features)


def dequantize_codes(codes: Int4Codes) -> torch.Tensor:
    """``W`` float32 ``[out, in]`` from unpacked codes: ``(q - z) * s`` (exact subtraction, one rounding)."""
    in_features = codes.codes.shape[1]
    group = codes.g_idx if codes.g_idx is not None else (
        torch.arange(in_features, device=codes.codes.device) // codes.group_size)
    zeros = codes.zeros.float()[group].t()
    scales = codes.scales[group].t()
    return (codes.codes.float() - zeros) * scales


def dequantize(weights: Int4Weights) -> torch.Tensor:
    """``W`` float32 ``[out, in]`` of a canonical weight, in the checkpoint's column order."""
    sorted_w = dequantize_codes(Int4Codes(canonical_codes(weights), weights.zeros, weights.scales,
                                          weights.group_size))
    if weights.perm is None:
        return sorted_w
    w = torch.empty_like(sorted_w)
    w[:, weights.perm] = sorted_w
    return w


@dataclass(frozen=True, slots=True)
class Int4RowWeights:
    """A weight in the row layout the GPU kernels read (see the module docstring).

    ``packed`` int32 ``[out, in/8]``; ``scales`` float16 or float32 ``[out, in/group_size]`` (:func:`pack_rows`);
    ``zeros`` uint8 ``[out, in/group_size]``; ``perm`` as in :class:`Int4Weights` (columns sorted by group).
    """

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    perm: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def in_features(self) -> int:
        return self.packed.shape[1] * 8


def compact_scales(scales: torch.Tensor) -> torch.Tensor:
    """``scales`` as float16 when every one is a float16 value (the same numbers in half the bytes), else
    unchanged."""
    half = scales.to(torch.float16)
    return half if torch.equal(half.to(scales.dtype), scales) else scales


def pack_rows(weights: Int4Weights, compact: bool = True) -> Int4RowWeights:
    """A canonical weight -> the row layout (same codes, scale values, zero points and column order; with
    ``compact`` the scales float16 where :func:`compact_scales` finds them exact)."""
    codes = canonical_codes(weights).to(torch.int32)  # [out, in], columns in the sorted order
    out_features, in_features = codes.shape
    shifts = _shifts(codes.device)
    # Eight codes of one row: code j in bits 4j. The nibbles do not overlap, so the sum is their bitwise OR.
    packed = (codes.view(out_features, in_features // 8, 8) << shifts).sum(dim=-1, dtype=torch.int32)
    scales = weights.scales.t().contiguous()
    return Int4RowWeights(packed.contiguous(), compact_scales(scales) if compact else scales,
                          weights.zeros.t().contiguous(), weights.group_size, weights.perm)


def row_codes(weights: Int4RowWeights) -> torch.Tensor:
    """The uint8 codes ``[out, in]`` of a row-layout weight (columns in its sorted order)."""
    return _codes(weights.packed).reshape(weights.out_features, weights.in_features)


def dequantize_rows(weights: Int4RowWeights) -> torch.Tensor:
    """``W`` float32 ``[out, in]`` of a row-layout weight, in the checkpoint's column order."""
    group = torch.arange(weights.in_features, device=weights.packed.device) // weights.group_size
    sorted_w = (row_codes(weights).float() - weights.zeros.float()[:, group]) * weights.scales.float()[:, group]
    if weights.perm is None:
        return sorted_w
    w = torch.empty_like(sorted_w)
    w[:, weights.perm] = sorted_w
    return w


#: The checkpoint tensors (leaf names) of one weight in each layout.
CHECKPOINT_TENSORS = {
    "awq": ("qweight", "qzeros", "scales"),
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"),
}


def dequantize_checkpoint_tensors(layout: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``W`` float32 ``[out, in]`` of one weight from its checkpoint tensors in ``layout`` (leaf name -> tensor, as
    :data:`CHECKPOINT_TENSORS` names them; the group size follows from the shapes, a missing zero point is 8)."""
    if layout == "awq":
        qweight, scales = tensors["qweight"], tensors["scales"]
        codes = unpack_awq(qweight, tensors.get("qzeros"), scales, qweight.shape[0] // scales.shape[0])
    elif layout == "gptq":
        qweight, scales = tensors["qweight"], tensors["scales"]
        codes = unpack_gptq(qweight, tensors["qzeros"], scales, qweight.shape[0] * 8 // scales.shape[0],
                            tensors.get("g_idx"))
    else:
        packed, scale = tensors["weight_packed"], tensors["weight_scale"]
        codes = unpack_compressed(packed, scale, tensors.get("weight_zero_point"), packed.shape[1] * 8 // scale.shape[1],
                                  tensors.get("weight_g_idx"))
    return dequantize_codes(codes)
