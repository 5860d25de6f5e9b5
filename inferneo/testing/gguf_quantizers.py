"""Simple quantizers to ggml K-quant blocks (Q4_K, Q5_K, Q6_K) for test checkpoints.

``gguf.quants.quantize`` writes Q4_0, Q4_1 and Q8_0 (and a few more) but no K-quants. These write valid blocks with
plain min/max (or abs-max) rounding, not llama.cpp's searched scales: what the tests check is the formats'
*decoding* (ours against ``gguf.quants.dequantize``), and a tiny model quantized this way stays close to its float
weights. Layouts are described in ``inferneo/quantization/gguf_blocks.py``.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, quants

QK_K = 256


def _f16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per block ``[n, 8]`` into the 12 packed bytes ``[n, 12]``."""
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _affine_k(blocks: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K/Q5_K quantization of ``blocks [n, 256]``: (d, dmin f16 [n, 1]; packed scales [n, 12]; q [n, 256])."""
    n = blocks.shape[0]
    sub = blocks.reshape(n, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0)
    hi = np.maximum(sub.max(axis=-1), lo)
    scale, neg_min = (hi - lo) / levels, -lo
    d, dmin = _f16(scale.max(axis=-1, keepdims=True) / 63), _f16(neg_min.max(axis=-1, keepdims=True) / 63)
    df, dminf = d.astype(np.float32), dmin.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df > 0, np.rint(scale / df), 0).clip(0, 63).astype(np.uint8)
        mn = np.where(dminf > 0, np.rint(neg_min / dminf), 0).clip(0, 63).astype(np.uint8)
        step = (df * sc)[..., None]
        q = np.where(step > 0, np.rint((sub + (dminf * mn)[..., None]) / step), 0)
    return d, dmin, _pack_k_scales(sc, mn), q.clip(0, levels).astype(np.uint8).reshape(n, QK_K)


def _nibble_pack(q: np.ndarray) -> np.ndarray:
    """Per 64 weights: byte i holds weight i in its low nibble and weight 32 + i in its high one."""
    q = q.reshape(q.shape[0], -1, 2, 32) & 0x0F
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], -1)


def quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, scales, q = _affine_k(blocks, 15)
    return np.concatenate([d.view(np.uint8), dmin.view(np.uint8), scales, _nibble_pack(q)], axis=-1)


def quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, scales, q = _affine_k(blocks, 31)
    high = (q.reshape(-1, 8, 32) >> 4) & 1
    qh = (high << np.arange(8, dtype=np.uint8).reshape(1, 8, 1)).sum(axis=1).astype(np.uint8)
    return np.concatenate([d.view(np.uint8), dmin.view(np.uint8), scales, qh, _nibble_pack(q)], axis=-1)


def quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    scale = np.abs(sub).max(axis=-1) / 31
    d = _f16(scale.max(axis=-1, keepdims=True) / 127)
    df = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df > 0, np.rint(scale / df), 0).clip(-128, 127).astype(np.int8)
        step = (df * sc)[..., None]
        q = np.where(step != 0, np.rint(sub / step), 0).clip(-32, 31)
    q = (q + 32).astype(np.uint8).reshape(n, 2, 128)  # per half of 128: low nibbles and 2-bit highs
    ql = np.zeros((n, 2, 64), dtype=np.uint8)
    qh = np.zeros((n, 2, 32), dtype=np.uint8)
    for part in range(2):  # weights 64 * part + i share ql byte i
        ql |= (q[:, :, 64 * part:64 * part + 64] & 0x0F) << (4 * part)
    for part in range(4):  # weights 32 * part + i share qh byte i
        qh |= ((q[:, :, 32 * part:32 * part + 32] >> 4) & 0x03) << (2 * part)
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), d.view(np.uint8)], axis=-1)


_K_QUANTIZERS = {GGMLQuantizationType.Q4_K: quantize_q4_k, GGMLQuantizationType.Q5_K: quantize_q5_k,
                 GGMLQuantizationType.Q6_K: quantize_q6_k}


def quantize_blocks(array: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """``array [*rows, K]`` (float) as ggml blocks of ``qtype``, uint8 ``[*rows, row_bytes]``: the K-quants by
    the quantizers here, other types by ``gguf.quants.quantize``."""
    quantizer = _K_QUANTIZERS.get(qtype)
    if quantizer is None:
        return quants.quantize(array, qtype)
    if array.shape[-1] % QK_K:
        raise ValueError(f"{qtype.name} rows must be a multiple of {QK_K}; got {array.shape[-1]}")
    blocks = np.ascontiguousarray(array, dtype=np.float32).reshape(-1, QK_K)
    return quantizer(blocks).reshape(*array.shape[:-1], -1)
