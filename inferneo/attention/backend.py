"""The attention-backend interface and the per-step metadata every backend reads.

A step's tokens are packed flat. Requests that compute exactly one token (decoding) come first, one token each;
requests computing several tokens (a prompt, or a chunk of one) follow, each as a contiguous span. Each backend
chooses the layout of one layer's KV cache tensor (``kv_cache_shape``); ``slot_mapping`` says where each new
token's key and value go (``block_id * block_size + offset``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class PrefillSpan:
    """One multi-token request in the step: tokens ``[start, start + num_tokens)`` of the flat batch."""

    start: int
    num_tokens: int
    context_len: int  # tokens already in the cache before this step
    block_table: torch.Tensor  # [num_blocks] int64 on the device


@dataclass(slots=True)
class AttentionMetadata:
    block_size: int
    num_decode_tokens: int
    slot_mapping: torch.Tensor  # [num_tokens] int64
    decode_block_tables: torch.Tensor | None  # [num_decode, max_blocks] int64, padded with 0
    decode_seq_lens: torch.Tensor | None  # [num_decode] int64, lengths including the new token
    prefills: list[PrefillSpan] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # backend-specific tensors built once per step by ``prepare``


class AttentionBackend(ABC):
    """Computes attention for one layer, reading and writing the paged KV cache."""

    name: str = "abstract"

    @abstractmethod
    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """Shape of one layer's KV cache tensor (keys and values together)."""

    def prepare(self, metadata: AttentionMetadata) -> None:  # noqa: B027 - optional hook
        """Build per-step tensors (masks, indices) once, before the layers run."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """``q``: [T, H, D], ``k``/``v``: [T, Hkv, D]. Writes k/v into the cache and returns [T, H, D]."""

