"""Pure-PyTorch paged attention: the CPU backend and the oracle that fast backends are tested against.

The cache of one layer is ``[2, num_kv_heads, num_blocks, block_size, head_dim]``: head-major, so gathering a
request's blocks yields ``[heads, tokens, head_dim]`` directly, the layout batched matmuls and SDPA read without
a copy. Decoding requests are handled in one batched call over a padded, length-masked gather; multi-token spans
one request at a time (a span with no earlier context attends to its own keys, otherwise to its cached prefix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inferneo.attention.backend import AttentionBackend, AttentionMetadata


class TorchReferenceBackend(AttentionBackend):
    name = "torch"
    needs_decode_mask = True

    def kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_dim):
        return (2, num_kv_heads, num_blocks, block_size, head_dim)

    def prepare(self, metadata: AttentionMetadata) -> None:
        if metadata.num_decode_tokens and self.needs_decode_mask:
            assert metadata.decode_seq_lens is not None
            max_len = metadata.decode_block_tables.shape[1] * metadata.block_size
            positions = torch.arange(max_len, device=metadata.decode_seq_lens.device)
            metadata.extra["decode_mask"] = positions[None, :] < metadata.decode_seq_lens[:, None]  # [B, L]
        masks = []
        for span in metadata.prefills:
            if span.context_len == 0:
                masks.append(None)
                continue
            q_pos = torch.arange(span.num_tokens, device=span.block_table.device)[:, None] + span.context_len
            k_pos = torch.arange(span.context_len + span.num_tokens, device=span.block_table.device)[None, :]
            masks.append(k_pos <= q_pos)
        metadata.extra["prefill_masks"] = masks

    def forward(self, q, k, v, kv_cache, metadata, scale):
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        # Store the new keys and values: the cache viewed as [2, Hkv, slots, D].
        flat = kv_cache.view(2, num_kv_heads, -1, head_dim)
        flat[0].index_copy_(1, metadata.slot_mapping, k.transpose(0, 1))
        flat[1].index_copy_(1, metadata.slot_mapping, v.transpose(0, 1))
        out = torch.empty_like(q)
        nd = metadata.num_decode_tokens
        if nd:
            out[:nd] = self.decode_attention(q[:nd], kv_cache, metadata, scale)
        gqa = q.shape[1] != num_kv_heads
        for span, mask in zip(metadata.prefills, metadata.extra["prefill_masks"], strict=True):
            s, e = span.start, span.start + span.num_tokens
            qs = q[s:e].transpose(0, 1)
            if mask is None:
                ks, vs = k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)
            else:
                total = span.context_len + span.num_tokens
                ks = _gather(kv_cache[0], span.block_table).view(num_kv_heads, -1, head_dim)[:, :total]
                vs = _gather(kv_cache[1], span.block_table).view(num_kv_heads, -1, head_dim)[:, :total]
            # A leading batch dimension keeps SDPA on its fused CPU kernel (a 3-D call with GQA takes the slow path).
            attn = F.scaled_dot_product_attention(
                qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0),
                attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa,
            )
            out[s:e] = attn[0].transpose(0, 1)
        return out

    def decode_attention(self, q, kv_cache, metadata, scale):
        return _decode_attention(q, kv_cache, metadata, scale)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """The given blocks of one cache half, per head: ``[Hkv, len(block_ids), block_size, D]``.

    ``index_select`` on the flat table is several times faster on CPU than advanced indexing.
    """
    return cache.index_select(1, block_ids.reshape(-1))


def _decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float):
    """One query token per request against its cached keys, batched over requests with a length mask."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[1]
    group = num_heads // num_kv_heads
    # [Hkv * B, L, D]: kv head major, then request; no copy beyond the gather itself.
    keys = _gather(kv_cache[0], metadata.decode_block_tables).view(num_kv_heads * batch, -1, head_dim)
    values = _gather(kv_cache[1], metadata.decode_block_tables).view(num_kv_heads * batch, -1, head_dim)
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
