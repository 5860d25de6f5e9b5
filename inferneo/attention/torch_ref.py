"""Pure-PyTorch paged attention: the CPU backend and the oracle that fast backends are tested against.

The cache of one layer is ``[2, num_kv_heads, num_blocks, block_size, head_dim]``: head-major, so gathering a
request's blocks yields ``[heads, tokens, head_dim]`` directly, the layout batched matmuls and SDPA read without
a copy. Decoding requests are handled in one batched call over a padded, length-masked gather; multi-token spans
one request at a time (a span with no earlier context attends to its own keys, otherwise to its cached prefix).

With an FP8 cache (``fp8_kv``) the new keys and values are quantized as they are stored, and the gathered blocks
of a request are de-quantized to the model dtype as they are read; a span with no earlier context then reads its
own keys back from the cache too, so that every query sees the stored (quantized) values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inferneo.attention.backend import AttentionBackend, AttentionFeature, AttentionMetadata, PrefillSpan
from inferneo.attention.fp8_kv import KVCacheScales, dequantize_kv, is_fp8_kv_cache, quantize_kv


class TorchReferenceBackend(AttentionBackend):
    """Attention in plain PyTorch: SDPA for plain and windowed attention, an explicit softmax when soft-capping or
    sinks are asked for (SDPA has neither). Supports every :class:`AttentionFeature`."""

    name = "torch"
    needs_decode_mask = True
    supported_features = frozenset(AttentionFeature)

    def kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_dim):
        return (2, num_kv_heads, num_blocks, block_size, head_dim)

    def prepare(self, metadata: AttentionMetadata) -> None:
        if metadata.num_decode_tokens and self.needs_decode_mask:
            metadata.extra["decode_mask"] = decode_mask(metadata, None)
        masks = []
        for span in metadata.prefills:
            masks.append(None if span.context_len == 0 else span_mask(span, None))
        metadata.extra["prefill_masks"] = masks

    def forward(self, q, k, v, kv_cache, metadata, scale, *, sliding_window=None, logit_softcap=None, sinks=None,
                kv_scales=None):
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        fp8 = is_fp8_kv_cache(kv_cache)
        if fp8:
            if kv_scales is None:
                raise ValueError("an FP8 KV cache needs the layer's kv_scales")
            k, v = quantize_kv(k, kv_scales.k), quantize_kv(v, kv_scales.v)
        # Store the new keys and values: the cache viewed as [2, Hkv, slots, D] (FP8 through its bytes: index_copy_
        # has no float8 kernel).
        flat = _storage_view(kv_cache).view(2, num_kv_heads, -1, head_dim)
        flat[0].index_copy_(1, metadata.slot_mapping, _storage_view(k).transpose(0, 1))
        flat[1].index_copy_(1, metadata.slot_mapping, _storage_view(v).transpose(0, 1))
        reader = CacheReader(kv_cache, kv_scales if fp8 else None, q.dtype)
        out = torch.empty_like(q)
        nd = metadata.num_decode_tokens
        variant = AttentionVariant(sliding_window, logit_softcap, sinks)
        if nd:
            if variant.is_plain:
                out[:nd] = _decode_attention(q[:nd], reader, metadata, scale)
            else:
                out[:nd] = _decode_attention_variant(q[:nd], reader, metadata, scale, variant)
        if metadata.prefills and "prefill_masks" not in metadata.extra:
            TorchReferenceBackend.prepare(self, metadata)
        gqa = q.shape[1] != num_kv_heads
        for span, mask in zip(metadata.prefills, metadata.extra["prefill_masks"], strict=True):
            s, e = span.start, span.start + span.num_tokens
            qs = q[s:e].transpose(0, 1)
            if span.context_len == 0 and not fp8:
                ks, vs = k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)
            else:  # the cached prefix and the span's own tokens, as stored (FP8: quantized, like every read)
                total = span.context_len + span.num_tokens
                ks, vs = (x.reshape(num_kv_heads, -1, head_dim)[:, :total] for x in reader.gather(span.block_table))
            blocks = [(a - s, n) for a, n in metadata.image_blocks if s <= a < e]
            if blocks:  # an image's rows see the whole image (within the window), as transformers' Gemma 3
                mask = _cached(metadata, ("image_mask", span.start, sliding_window), image_block_mask, span,
                               sliding_window, blocks)
                out[s:e] = variant.attend(qs, ks, vs, mask, scale).transpose(0, 1)
                continue
            if not variant.is_plain:
                mask = _cached(metadata, ("span_mask", span.start, sliding_window), span_mask, span, sliding_window)
                out[s:e] = variant.attend(qs, ks, vs, mask, scale).transpose(0, 1)
                continue
            # A leading batch dimension keeps SDPA on its fused CPU kernel (a 3-D call with GQA takes the slow path).
            attn = F.scaled_dot_product_attention(
                qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0),
                attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa,
            )
            out[s:e] = attn[0].transpose(0, 1)
        return out

    def decode_attention(self, q, kv_cache, metadata, scale, kv_scales: KVCacheScales | None = None):
        """Plain attention of the decode queries ``q`` over ``kv_cache`` (read only; ``kv_scales`` for FP8)."""
        return _decode_attention(q, CacheReader(kv_cache, kv_scales if is_fp8_kv_cache(kv_cache) else None, q.dtype),
                                 metadata, scale)


@dataclass(frozen=True, slots=True)
class CacheReader:
    """Reads blocks of one layer's cache in the reference layout, as ``dtype``: FP8 caches (``scales`` given) are
    de-quantized block by block as they are gathered, per head (``fp8_kv.dequantize_kv``)."""

    kv_cache: torch.Tensor
    scales: KVCacheScales | None
    dtype: torch.dtype

    @property
    def num_kv_heads(self) -> int:
        return self.kv_cache.shape[1]

    def gather(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the given blocks, each ``[Hkv, len(block_ids), block_size, D]`` (``block_ids`` of
        any shape, flattened)."""
        keys, values = _gather(self.kv_cache[0], block_ids), _gather(self.kv_cache[1], block_ids)
        if self.scales is None:
            return keys, values
        return dequantize_kv(keys, self.scales.k, self.dtype, 0), dequantize_kv(values, self.scales.v, self.dtype, 0)


@dataclass(frozen=True, slots=True)
class AttentionVariant:
    """The per-layer options of one ``forward`` call, and the explicit-softmax attention that honours them."""

    sliding_window: int | None
    logit_softcap: float | None
    sinks: torch.Tensor | None

    @property
    def is_plain(self) -> bool:
        return self.sliding_window is None and self.logit_softcap is None and self.sinks is None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
               scale: float) -> torch.Tensor:
        """``q`` [..., H, Lq, D], ``k``/``v`` [..., Hkv, Lk, D], ``mask`` (True: attend; causality and the window
        already in it) broadcastable to [..., H, Lq, Lk]; returns [..., H, Lq, D] in q's dtype."""
        group = q.shape[-3] // k.shape[-3]
        if self.logit_softcap is None and self.sinks is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=group > 1)
        k = k.repeat_interleave(group, dim=-3).float()
        v = v.repeat_interleave(group, dim=-3).float()
        scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
        if self.logit_softcap is not None:
            scores = torch.tanh(scores / self.logit_softcap) * self.logit_softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        if self.sinks is not None:
            # The sink joins the denominator: append its logit as one more column, then drop that column.
            sink = self.sinks.float().view(-1, 1, 1).expand(*scores.shape[:-1], 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        return torch.matmul(probs, v).to(q.dtype)


def decode_mask(metadata: AttentionMetadata, sliding_window: int | None) -> torch.Tensor:
    """``[B, L]`` True where decode request ``b`` attends to cached position ``j`` (its window only, if given)."""
    assert metadata.decode_seq_lens is not None and metadata.decode_block_tables is not None
    max_len = metadata.decode_block_tables.shape[1] * metadata.block_size
    positions = torch.arange(max_len, device=metadata.decode_seq_lens.device)[None, :]
    lens = metadata.decode_seq_lens[:, None]
    mask = positions < lens
    if sliding_window is not None:
        mask &= positions >= lens - sliding_window
    return mask


def span_mask(span: PrefillSpan, sliding_window: int | None) -> torch.Tensor:
    """``[num_tokens, context_len + num_tokens]`` True where a span's token attends to a key of its request:
    causal, and within the last ``sliding_window`` positions if given."""
    device = span.block_table.device
    q_pos = torch.arange(span.num_tokens, device=device)[:, None] + span.context_len
    k_pos = torch.arange(span.context_len + span.num_tokens, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def image_block_mask(span: PrefillSpan, sliding_window: int | None, blocks: list[tuple[int, int]]) -> torch.Tensor:
    """:func:`span_mask` with each block ``(first row in the span, length)`` seeing all of itself: causal OR
    same block, AND within the window (transformers' Gemma 3 masks: a key ``j`` is in the window of the query at
    ``p`` when ``j > p - W``)."""
    device = span.block_table.device
    q_pos = torch.arange(span.num_tokens, device=device)[:, None] + span.context_len
    k_pos = torch.arange(span.context_len + span.num_tokens, device=device)[None, :]
    mask = k_pos <= q_pos
    for first, length in blocks:
        lo = span.context_len + first
        mask[first : first + length, lo : lo + length] = True
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def _cached(metadata: AttentionMetadata, key: tuple, build, *args) -> torch.Tensor:
    """``build(*args)``, built once per step: the layers of a step share their window's masks."""
    masks = metadata.extra.setdefault("torch_variant_masks", {})
    if key not in masks:
        masks[key] = build(*args)
    return masks[key]


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """The given blocks of one cache half, per head: ``[Hkv, len(block_ids), block_size, D]``.

    ``index_select`` on the flat table is several times faster on CPU than advanced indexing.
    """
    return cache.index_select(1, block_ids.reshape(-1))


def _storage_view(x: torch.Tensor) -> torch.Tensor:
    """FP8 tensors as their bytes (for copies PyTorch has no float8 kernel for); others unchanged."""
    return x.view(torch.uint8) if is_fp8_kv_cache(x) else x


def _decode_attention(q: torch.Tensor, reader: CacheReader, metadata: AttentionMetadata, scale: float):
    """One query token per request against its cached keys, batched over requests with a length mask."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = reader.num_kv_heads
    group = num_heads // num_kv_heads
    # [Hkv * B, L, D]: kv head major, then request; no copy beyond the gather itself.
    keys, values = reader.gather(metadata.decode_block_tables)
    keys, values = keys.view(num_kv_heads * batch, -1, head_dim), values.view(num_kv_heads * batch, -1, head_dim)
    qg = q.view(batch, num_kv_heads, group, head_dim).transpose(0, 1).reshape(num_kv_heads * batch, group, head_dim)
    mask = metadata.extra["decode_mask"]  # [B, L]
    if q.dtype == torch.float32:
        # SDPA's CPU kernel is the fastest here in float32 (but slow in half precision, hence the bmm path).
        attn = F.scaled_dot_product_attention(
            q.unsqueeze(2),
            keys.view(num_kv_heads, batch, -1, head_dim).transpose(0, 1),
            values.view(num_kv_heads, batch, -1, head_dim).transpose(0, 1),
            attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=group > 1,
        )
        return attn.squeeze(2)
    scores = torch.bmm(qg, keys.transpose(1, 2)).float().mul_(scale)  # [Hkv * B, G, L]
    scores = scores.view(num_kv_heads, batch, group, -1).masked_fill_(~mask[None, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype).view(num_kv_heads * batch, group, -1)
    out = torch.bmm(probs, values)  # [Hkv * B, G, D]
    return out.view(num_kv_heads, batch, group, head_dim).transpose(0, 1).reshape(batch, num_heads, head_dim)


def _decode_attention_variant(q: torch.Tensor, reader: CacheReader, metadata: AttentionMetadata, scale: float,
                              variant: AttentionVariant) -> torch.Tensor:
    """Decode attention with a window, soft-capping or sinks: the padded batch gather, the explicit softmax."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = reader.num_kv_heads
    keys, values = reader.gather(metadata.decode_block_tables)
    keys = keys.view(num_kv_heads, batch, -1, head_dim).transpose(0, 1)
    values = values.view(num_kv_heads, batch, -1, head_dim)
    mask = _cached(metadata, ("decode_mask", variant.sliding_window), decode_mask, metadata, variant.sliding_window)
    mask = mask[:, None, None, :]  # [B, 1, 1, L]
    out = variant.attend(q.unsqueeze(2), keys, values.transpose(0, 1), mask, scale)  # [B, H, 1, D]
    return out.squeeze(2)
