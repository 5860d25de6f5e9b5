"""W4A16 through PyTorch's own int4 weight-only kernel ("tinygemm": ``torch.ops.aten._weight_int4pack_mm`` on CUDA,
``_weight_int4pack_mm_for_cpu`` on CPU), as one more launch beside the Triton kernels of :mod:`triton_int4`.

tinygemm's convention: codes ``q`` (0..15) and, per group of ``group_size`` input columns of each output row, a
bf16 scale and a bf16 *float* zero, ``w = (q - 8) * scale + zero``; its weight is packed once by
``_convert_weight_to_int4pack`` (CUDA: uint8 ``[N, K/2]``, two codes a byte, column ``2i`` in the high nibble; CPU:
int32 codes ``[N, K]``) into an opaque tiled layout, and ``scales_and_zeros`` is bf16 ``[K/group, N, 2]``.

AWQ/GPTQ/compressed-tensors store an integer zero point ``z``: ``w = (q - z) * s = (q - 8) * s + (8 - z) * s``,
so ``scale = bf16(s)`` and ``zero = bf16((8 - z) * s)`` (the product exact in float32). The rounding this adds:
each scale and each zero rounded once to bf16 (relative 2^-8 each: 8 significant bits), so a weight moves by at
most ``(|q - 8| + |8 - z|) * s * 2^-8 <= 16 * s * 2^-8`` (``s / 16``, a sixteenth of a code step), beside the
de-quantized value tinygemm itself forms in bf16 (once more at most ``s / 16``) and the bf16 output. Documented tolerance of the W4A16
kernels in bf16: 1.5e-2 relative (``benchmarks/gpu/int4_check.py``); measured in the tests and on the GPU.

Where it runs (:func:`tinygemm_available`): CUDA devices of compute capability 8.0 or more (not ROCm), bf16
activations only (the CUDA kernel takes bf16), groups of 32, 64, 128 or 256 columns, ``N`` a multiple of 8 and
``K`` of ``16 * inner_k_tiles``; ``INFERNEO_INT4_TINYGEMM=0`` switches it off.

A layer holds one layout (the weight is held once): the tinygemm one where ``int4_configs.json`` has a
``"layout,N,K,G"`` entry of kind ``"tinygemm"`` (written by ``int4_check.py --write-configs`` where tinygemm's
times at 1 and 32 rows, which the two decode steps of the issue's targets run, add up to less than the Triton
kernels' best, the fused gate/up + SiLU included), else the Triton row layout. ``INFERNEO_INT4_LAYOUT=tinygemm``
or ``rows`` overrides the table (for A/Bs).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

LAYOUT_FILE = Path(__file__).with_name("int4_configs.json")
GROUP_SIZES = (32, 64, 128, 256)
INNER_K_TILES = (2, 4, 8)
#: The CUDA packing input: column 2i of a byte's pair in the high nibble (the order PyTorch's packing reads;
#: :func:`cuda_packing_ok` checks it once per device, the input of this op having changed across versions).
HIGH_NIBBLE_EVEN = True


@dataclass(frozen=True, slots=True)
class Int4TinyGemmWeights:
    """A weight in tinygemm's layout: ``packed`` (``_convert_weight_to_int4pack``'s output on CUDA,
    ``_convert_weight_to_int4pack_for_cpu``'s on CPU), ``scales_and_zeros`` bf16 ``[in/group, out, 2]``, and
    ``perm`` as in :class:`~inferneo.quantization.int4_layouts.Int4Weights` (columns sorted by group)."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    group_size: int
    inner_k_tiles: int
    out_features: int
    in_features: int
    perm: torch.Tensor | None = None


def _has_ops() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm") and hasattr(torch.ops.aten, "_convert_weight_to_int4pack")


def tinygemm_shape_ok(n: int, k: int, group_size: int, inner_k_tiles: int) -> bool:
    """Whether tinygemm packs an ``[n, k]`` weight of this group size with ``inner_k_tiles``."""
    return (group_size in GROUP_SIZES and inner_k_tiles in INNER_K_TILES and n % 8 == 0
            and k % (16 * inner_k_tiles) == 0 and k % group_size == 0)


def tinygemm_available(device: torch.device, dtype: torch.dtype, n: int, k: int, group_size: int,
                       inner_k_tiles: int = 8) -> bool:
    """Whether the CUDA tinygemm kernel runs this layer (see the module docstring)."""
    if os.environ.get("INFERNEO_INT4_TINYGEMM", "1") == "0" or not _has_ops():
        return False
    if device.type != "cuda" or dtype != torch.bfloat16 or torch.version.hip is not None:
        return False
    if not tinygemm_shape_ok(n, k, group_size, inner_k_tiles):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (8, 0) and cuda_packing_ok(index)


@functools.cache
def cuda_packing_ok(index: int) -> bool:
    """Whether packing and multiplying a small weight on CUDA device ``index`` gives back ``(q - z) * s`` (each
    code at its column: the packing's input order as :func:`pack_codes_u8` writes it), within the bf16
    roundings; checked once per device (outside any CUDA-graph capture: the engine finalizes its layers first)."""
    try:
        device = torch.device("cuda", index)
        n, k, group = 16, 64, 32
        codes = (torch.arange(n * k, device=device).reshape(n, k) * 7 + torch.arange(n, device=device)[:, None]) % 16
        scales = torch.full((k // group, n), 0.5, device=device)
        zeros = torch.tensor([[3] * n, [11] * n], device=device, dtype=torch.uint8)
        w = dequantize_tinygemm(pack_tinygemm(codes, scales, zeros, group, 2))
        ref = (codes.float() - zeros.float().t().repeat_interleave(group, 1)) * 0.5
        return bool(torch.equal(w, ref))  # small integers and halves: exact in bf16
    except (RuntimeError, TypeError, ValueError):
        return False


@functools.cache
def _layout_table() -> dict[str, dict]:
    if not LAYOUT_FILE.is_file():
        return {}
    table = json.loads(LAYOUT_FILE.read_text())
    return {key: entry for key, entry in table.items() if key.startswith("layout,")}


def layout_key(n: int, k: int, group_size: int) -> str:
    return f"layout,{n},{k},{group_size}"


def tinygemm_layout(device: torch.device, dtype: torch.dtype, n: int, k: int, group_size: int) -> int | None:
    """``inner_k_tiles`` when a layer of this shape on ``device`` in ``dtype`` is to hold tinygemm's layout (the
    table's ``"layout"`` entry, or ``INFERNEO_INT4_LAYOUT``), else None (the Triton row layout)."""
    forced = os.environ.get("INFERNEO_INT4_LAYOUT", "")
    entry = _layout_table().get(layout_key(n, k, group_size))
    if forced == "rows":
        return None
    if forced == "tinygemm":
        inner = int(entry.get("inner_k_tiles", 8)) if entry and entry.get("kind") == "tinygemm" else 8
    elif entry and entry.get("kind") == "tinygemm":
        inner = int(entry.get("inner_k_tiles", 8))
    else:
        return None
    return inner if tinygemm_available(device, dtype, n, k, group_size, inner) else None


# ---- conversion ------------------------------------------------------------------------------------------------


def tinygemm_scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """bf16 ``[groups, out, 2]`` from float32 scales ``s`` and integer zero points ``z`` (both ``[groups, out]``):
    ``(bf16(s), bf16((8 - z) * s))``, so that ``(q - 8) * scale + zero`` is ``(q - z) * s`` up to the two
    roundings to bf16."""
    s = scales.float()
    zero = (8.0 - zeros.float()) * s  # exact in float32: |8 - z| <= 8 (a 4-bit integer times s)
    return torch.stack([s, zero], dim=-1).to(torch.bfloat16).contiguous()


def pack_codes_u8(codes: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, K/2]`` from uint8/int codes ``[N, K]``: the CUDA packing's input (two codes a byte)."""
    c = codes.to(torch.uint8)
    even, odd = c[:, 0::2], c[:, 1::2]
    return ((even << 4) | odd) if HIGH_NIBBLE_EVEN else ((odd << 4) | even)


def pack_tinygemm(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                  inner_k_tiles: int, perm: torch.Tensor | None = None) -> Int4TinyGemmWeights:
    """Codes ``[out, in]`` (columns sorted by group), scales float32 and zero points ``[groups, out]`` ->
    tinygemm's layout on the codes' device (CUDA: ``_convert_weight_to_int4pack``; CPU: its CPU twin)."""
    n, k = codes.shape
    if not tinygemm_shape_ok(n, k, group_size, inner_k_tiles):
        raise ValueError(f"tinygemm: cannot pack a [{n}, {k}] weight of group {group_size} with inner_k_tiles "
                         f"{inner_k_tiles}")
    if codes.device.type == "cuda":
        packed = torch.ops.aten._convert_weight_to_int4pack(pack_codes_u8(codes).contiguous(), inner_k_tiles)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), inner_k_tiles)
    return Int4TinyGemmWeights(packed, tinygemm_scales_and_zeros(scales, zeros), group_size, inner_k_tiles, n, k, perm)


def tinygemm_from(weights, inner_k_tiles: int) -> Int4TinyGemmWeights:
    """tinygemm's layout of a canonical (:class:`Int4Weights`) or row-layout (:class:`Int4RowWeights`) weight."""
    from inferneo.quantization.int4_layouts import Int4RowWeights, Int4Weights, canonical_codes, row_codes

    if isinstance(weights, Int4RowWeights):
        codes, scales, zeros = row_codes(weights), weights.scales.t(), weights.zeros.t()
    elif isinstance(weights, Int4Weights):
        codes, scales, zeros = canonical_codes(weights), weights.scales, weights.zeros
    else:
        raise TypeError(f"tinygemm_from: {type(weights).__name__}")
    return pack_tinygemm(codes, scales, zeros, weights.group_size, inner_k_tiles, weights.perm)


# ---- compute -----------------------------------------------------------------------------------------------------


def tinygemm_linear(x: torch.Tensor, weights: Int4TinyGemmWeights) -> torch.Tensor:
    """``x [M, K] @ W.T`` (columns already in the weight's sorted order) in bf16 through tinygemm (``x`` of another
    dtype is computed in bf16 and returned in its own)."""
    if x.dim() != 2 or x.shape[1] != weights.in_features:
        raise ValueError(f"tinygemm_linear: x has shape {tuple(x.shape)}, the weight {weights.in_features} inputs")
    xb = x.to(torch.bfloat16).contiguous()
    if x.shape[0] == 0:
        return x.new_empty((0, weights.out_features))
    op = torch.ops.aten._weight_int4pack_mm if xb.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
    y = op(xb, weights.packed, weights.group_size, weights.scales_and_zeros)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def dequantize_tinygemm(weights: Int4TinyGemmWeights, chunk: int = 2048) -> torch.Tensor:
    """``W`` float32 ``[out, in]`` as tinygemm computes it (the product with the identity, ``chunk`` columns at a
    time; bf16 values), in the checkpoint's column order."""
    k = weights.in_features
    device = weights.packed.device
    parts = []
    for k0 in range(0, k, chunk):
        rows = min(chunk, k - k0)
        eye = torch.zeros(rows, k, dtype=torch.bfloat16, device=device)
        eye[torch.arange(rows, device=device), k0 + torch.arange(rows, device=device)] = 1
        parts.append(tinygemm_linear(eye, weights).float().t())
    sorted_w = torch.cat(parts, dim=1)
    if weights.perm is None:
        return sorted_w
    w = torch.empty_like(sorted_w)
    w[:, weights.perm] = sorted_w
    return w
