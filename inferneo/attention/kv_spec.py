"""What one layer keeps in the KV cache: the per-layer record the model reports and the runner sizes and pages.

Most models hold the same keys and values in every layer (``num_kv_heads`` heads of ``head_size`` for keys and
as many for values, laid out by the engine's attention backend). Layers whose KV differs report it here: a
multi-head latent attention layer keeps one compressed latent per token, laid out by its own backend. The runner
allocates one tensor per layer of ``spec.shape(num_blocks, block_size)`` and counts ``spec.bytes_per_block`` of
every layer when it turns a memory budget into blocks; the KV cache manager pages block ids, whatever a block of
each layer holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from inferneo.attention.backend import AttentionBackend


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """One layer's KV cache: ``num_kv_heads`` heads of ``head_size`` values per token, in ``backend``'s layout."""

    backend: AttentionBackend
    num_kv_heads: int
    head_size: int

    def shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """The shape of this layer's cache tensor for ``num_blocks`` blocks of ``block_size`` tokens."""
        return tuple(self.backend.kv_cache_shape(num_blocks, block_size, self.num_kv_heads, self.head_size))

    def bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block of this layer takes in ``dtype``."""
        return math.prod(self.shape(1, block_size)) * torch.empty((), dtype=dtype).element_size()


def kv_bytes_per_block(specs: list[KVCacheSpec], block_size: int, dtype: torch.dtype) -> int:
    """Bytes of KV cache one block takes over all layers."""
    return sum(spec.bytes_per_block(block_size, dtype) for spec in specs)


def allocate_kv_caches(specs: list[KVCacheSpec], num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device, share: bool = False) -> list[torch.Tensor]:
    """One zeroed cache tensor per layer (zeros, not empty: masked-out slots are multiplied by zero weights and
    must not hold NaNs). ``share`` gives layers of the same shape one tensor (a scratch cache for profiling)."""
    made: dict[tuple[int, ...], torch.Tensor] = {}
    caches = []
    for spec in specs:
        shape = spec.shape(num_blocks, block_size)
        if share and shape in made:
            caches.append(made[shape])
            continue
        made[shape] = torch.zeros(shape, dtype=dtype, device=device)
        caches.append(made[shape])
    return caches
