"""The numerics of an FP8 KV cache: float8 e4m3 elements with per-KV-head float32 scales.

A key (value) ``x`` of KV head ``h`` is stored as ``e4m3(clamp(x / k_scale[h], -448, 448))``: divided by its scale,
saturated to e4m3's largest finite value (448) and rounded to nearest even; it is read back as ``stored *
k_scale[h]``. A per-tensor scale is the same value for every head. The functions here are the reference the
backends' kernels are tested against: the kernels quantize in their store step and de-quantize in registers as
they read the cache, never into a de-quantized copy of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0  # the largest finite e4m3 value: stored values saturate to it


@dataclass(frozen=True, slots=True)
class KVCacheScales:
    """The scales of one layer's FP8 cache: ``k`` and ``v`` float32 ``[num_kv_heads]`` on the model's device
    (a per-tensor scale is repeated over the heads). The tensors are updated in place when checkpoint scales load,
    so captured CUDA graphs read the loaded values."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def ones(cls, num_kv_heads: int, device: torch.device) -> KVCacheScales:
        """Unit scales (the values are stored as they are, saturated to +-448)."""
        return cls(torch.ones(num_kv_heads, dtype=torch.float32, device=device),
                   torch.ones(num_kv_heads, dtype=torch.float32, device=device))

    def set(self, which: str, value: torch.Tensor) -> None:
        """Load a checkpoint scale into ``k`` or ``v`` (``which``): one value for every head, or one per head."""
        target = self.k if which == "k" else self.v
        value = value.detach().reshape(-1).float()
        if value.numel() not in (1, target.numel()):
            raise ValueError(f"a {which}_scale must hold 1 or {target.numel()} (one per KV head) values; "
                             f"got {value.numel()}")
        if not bool(torch.all(torch.isfinite(value) & (value > 0))):
            raise ValueError(f"a {which}_scale must be finite and positive; got {value.tolist()}")
        target.copy_(value.expand(target.numel()))


def is_fp8_kv_cache(kv_cache: torch.Tensor) -> bool:
    """Whether a layer's cache tensor holds FP8 elements."""
    return kv_cache.dtype == FP8_KV_DTYPE


def quantize_kv(x: torch.Tensor, scale: torch.Tensor, head_dim: int = 1) -> torch.Tensor:
    """``x`` stored in FP8: ``e4m3(clamp(x / scale, -448, 448))`` with ``scale`` ``[num_kv_heads]`` broadcast over
    the head axis ``head_dim`` of ``x`` (1 for ``[tokens, heads, dim]``)."""
    shape = [1] * x.dim()
    shape[head_dim] = -1
    return (x.float() / scale.view(shape)).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_KV_DTYPE)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, head_dim: int = 1) -> torch.Tensor:
    """FP8 ``x`` read back in ``dtype``: ``x * scale`` in float32, then rounded to ``dtype``."""
    shape = [1] * x.dim()
    shape[head_dim] = -1
    return (x.float() * scale.view(shape)).to(dtype)
