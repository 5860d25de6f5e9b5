"""The GPU attention backend: Triton kernels over a paged KV cache (float32, float16, bfloat16, or FP8 e4m3 with
per-head scales, de-quantized in registers).

Cache layout of one layer: ``[2, num_blocks, num_kv_heads, block_size, head_dim]`` (keys, then values). One KV
head of one block is a contiguous ``block_size x head_dim`` page, which is what the kernels read per tile.

A step runs as: store the new keys/values into their slots, then one decode launch over the decode tokens (plus
a reduction launch when the context is split), then one prefill launch over every multi-token span. New tokens
are written before attention, so prefill reads the cached prefix and the span's own keys alike through the
span's block table (chunked prefill and prefix-cache hits need no special path). Sliding windows, logit
soft-capping and attention sinks are compile-time switches of the same kernels.

CUDA graphs: for decode-only steps ``prepare`` does nothing and ``forward`` issues only kernel launches whose
grids depend on tensor shapes, with no host synchronisation, so both can be captured.
"""

from __future__ import annotations

import torch

from inferneo.attention.backend import AttentionBackend, AttentionFeature, AttentionMetadata
from inferneo.kernels import triton_attention as ops


class TritonBackend(AttentionBackend):
    """Paged attention with Triton kernels (``inferneo.kernels.triton_attention``).

    ``prefill_block_m``: query tokens per prefill tile (default 128 on CUDA, 32 elsewhere, i.e. under Triton's
    interpreter). ``decode_splits``: force the flash-decoding split count (default: chosen from shapes).
    ``pdl``: whether the decode-path kernels launch with programmatic dependent launch (the runner decides it once
    from its ``KernelConfig`` and GPU; None decides per launch from the tensor and ``INFERNEO_CUDA_PDL``).
    """

    name = "triton"
    supported_features = frozenset(AttentionFeature) - {AttentionFeature.IMAGE_BLOCKS}

    def __init__(self, prefill_block_m: int | None = None, decode_splits: int | None = None,
                 pdl: bool | None = None) -> None:
        if prefill_block_m is not None and (prefill_block_m < 16 or prefill_block_m & (prefill_block_m - 1)):
            raise ValueError(f"prefill_block_m must be a power of two >= 16; got {prefill_block_m}")
        self.prefill_block_m = prefill_block_m
        self.decode_splits = decode_splits
        self.pdl = pdl

    def kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_dim):
        """``(2, num_blocks, num_kv_heads, block_size, head_dim)``; ``block_size`` a power of two >= 16."""
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"the triton backend needs a power-of-two block size >= 16; got {block_size}")
        return (2, num_blocks, num_kv_heads, block_size, head_dim)

    def _block_m(self, device: torch.device) -> int:
        if self.prefill_block_m is not None:
            return self.prefill_block_m
        return 128 if device.type == "cuda" else 32

    def prepare(self, metadata: AttentionMetadata) -> None:
        """Concatenates the spans' block tables and builds the prefill tile schedule (nothing for decode-only)."""
        if not metadata.prefills:
            return
        device = metadata.slot_mapping.device
        block_m = self._block_m(device)
        tables, schedule = ops.build_prefill_schedule(metadata.prefills, block_m, device)
        metadata.extra["triton_prefill"] = (tables, schedule, block_m)

    def forward(self, q, k, v, kv_cache, metadata, scale, *, sliding_window=None, logit_softcap=None, sinks=None,
                kv_scales=None, kv_stored=False):
        """Stores ``k``/``v`` at ``metadata.slot_mapping`` (unless ``kv_stored``: a kernel before this one has
        written them, e.g. the fused q/k norm + rotary), then decode and prefill attention; returns [T, H, D]."""
        if not kv_stored:
            ops.store_kv(k, v, kv_cache, metadata.slot_mapping, pdl=self.pdl, kv_scales=kv_scales)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        options = dict(sliding_window=sliding_window, logit_softcap=logit_softcap, sinks=sinks, kv_scales=kv_scales)
        nd = metadata.num_decode_tokens
        if nd:
            ops.paged_decode(q[:nd], kv_cache, metadata.decode_block_tables, metadata.decode_seq_lens, scale,
                             out[:nd], num_splits=self.decode_splits, pdl=self.pdl, **options)
        if metadata.prefills:
            prepared = metadata.extra.get("triton_prefill")
            if prepared is None:
                self.prepare(metadata)
                prepared = metadata.extra["triton_prefill"]
            tables, schedule, block_m = prepared
            ops.paged_prefill(q, kv_cache, tables, schedule, scale, out, block_m, **options)
        return out
