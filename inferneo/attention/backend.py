"""The attention-backend interface and the per-step metadata every backend reads.

A step's tokens are packed flat. Requests that compute exactly one token (decoding) come first, one token each;
requests computing several tokens (a prompt, or a chunk of one) follow, each as a contiguous span. Each backend
chooses the layout of one layer's KV cache tensor (``kv_cache_shape``); ``slot_mapping`` says where each new
token's key and value go (``block_id * block_size + offset``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from inferneo.attention.fp8_kv import KVCacheScales, is_fp8_kv_cache


class AttentionFeature(StrEnum):
    """Per-layer attention variations beyond plain causal attention; a backend declares the ones it computes."""

    SLIDING_WINDOW = "sliding_window"  # each query sees only its last W keys (itself included)
    LOGIT_SOFTCAP = "logit_softcap"  # scores squashed to ``c * tanh(s / c)`` before the softmax (Gemma 2)
    SINKS = "sinks"  # one learned logit per head in the softmax denominator, with no value (gpt-oss)
    FP8_KV_CACHE = "fp8_kv_cache"  # keys and values stored as float8 e4m3 with per-head scales (``fp8_kv``)
    # the prompt tokens of one image attend to each other both ways (Gemma 3): ``AttentionMetadata.image_blocks``
    IMAGE_BLOCKS = "image_blocks"


def attention_features(sliding_window: int | None = None, logit_softcap: float | None = None,
                       sinks: bool = False, fp8_kv_cache: bool = False) -> frozenset[AttentionFeature]:
    """The features a layer with these settings needs from its backend."""
    needed = set()
    if fp8_kv_cache:
        needed.add(AttentionFeature.FP8_KV_CACHE)
    if sliding_window is not None:
        needed.add(AttentionFeature.SLIDING_WINDOW)
    if logit_softcap is not None:
        needed.add(AttentionFeature.LOGIT_SOFTCAP)
    if sinks:
        needed.add(AttentionFeature.SINKS)
    return frozenset(needed)


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
    # Some request has several decode rows (it verifies draft tokens): row j of it attends to the keys the rows
    # before it store in this step, so every row's key and value must be stored before any row attends.
    decode_rows_share_requests: bool = False
    # Rows ``[start, start + length)`` of the flat batch that hold one whole image of a prompt whose model lets an
    # image's tokens attend to each other both ways (``AttentionFeature.IMAGE_BLOCKS``); each lies in one span.
    image_blocks: list[tuple[int, int]] = field(default_factory=list)


class AttentionBackend(ABC):
    """Computes attention for one layer, reading and writing the paged KV cache.

    ``supported_features``: the :class:`AttentionFeature` values ``forward`` implements; a backend must raise
    rather than ignore a keyword it does not support (the runner falls back to the PyTorch backend before that).
    """

    name: str = "abstract"
    supported_features: frozenset[AttentionFeature] = frozenset()

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
        *,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
        sinks: torch.Tensor | None = None,
        kv_scales: KVCacheScales | None = None,
    ) -> torch.Tensor:
        """``q``: [T, H, D], ``k``/``v``: [T, Hkv, D]. Writes k/v into the cache and returns [T, H, D].

        ``sliding_window=W``: the query at position ``p`` sees the keys at positions ``p - W < j <= p`` only.
        ``logit_softcap=c``: scores (after ``scale``) become ``c * tanh(score / c)``.
        ``sinks``: float ``[H]``, one extra logit per query head that joins the softmax denominator and carries
        no value.
        ``kv_scales``: the layer's per-head scales when ``kv_cache`` is FP8 (``inferneo.attention.fp8_kv``): the
        new keys and values are stored quantized and every attention read, a prompt's own tokens included, sees
        the stored values.
        """

    def check_features(self, sliding_window: int | None, logit_softcap: float | None,
                       sinks: torch.Tensor | None, kv_cache: torch.Tensor | None = None) -> None:
        """Raise NotImplementedError when a requested feature is outside ``supported_features`` (an FP8
        ``kv_cache`` asks for ``FP8_KV_CACHE``)."""
        fp8 = kv_cache is not None and is_fp8_kv_cache(kv_cache)
        missing = attention_features(sliding_window, logit_softcap, sinks is not None, fp8) - self.supported_features
        if missing:
            raise NotImplementedError(f"the {self.name} attention backend does not support "
                                      f"{', '.join(sorted(missing))}")

