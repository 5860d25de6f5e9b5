"""The contract between an attention layer and a fused q/k/v projection that applies the layer's rotary embedding
(and, with a cache, stores the step's keys and values) in its own epilogue: one row, a batch-1 decode step, no
rotary launch between the projection and the attention.

The projection writes the query heads rotated (rotate-half over whole heads, from its outputs rounded to the model
dtype, with the same float32 arithmetic as the rotary kernel), the key heads rotated and the value heads as they
are; with ``kv_cache`` it also writes the keys and values to the paged cache at the row's slot, as the rotary
kernel's store does, so the attention reads them from there.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from inferneo.attention.fp8_kv import KVCacheScales


class RotaryStore(NamedTuple):
    """What a fused q/k/v projection of one row needs to rotate its query and key heads and store the keys and
    values: ``positions`` (``[1]``, the row's position), the rotary ``cos_cache``/``sin_cache``
    (``[max_position, head_dim / 2]``), the head counts and size, and optionally the Triton backend's paged
    ``kv_cache`` (``[2, blocks, kv_heads, block_size, head_dim]``) with the row's ``slot_mapping`` (``[1]``) and,
    for an FP8 cache, the layer's ``kv_scales``."""

    positions: torch.Tensor
    cos_cache: torch.Tensor
    sin_cache: torch.Tensor
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    kv_cache: torch.Tensor | None = None
    slot_mapping: torch.Tensor | None = None
    kv_scales: KVCacheScales | None = None

    @property
    def rotated_rows(self) -> int:
        """Output rows of the query and key heads (the value heads follow them)."""
        return (self.num_q_heads + self.num_kv_heads) * self.head_dim

    @property
    def out_features(self) -> int:
        """Output rows of the whole q/k/v projection."""
        return (self.num_q_heads + 2 * self.num_kv_heads) * self.head_dim
