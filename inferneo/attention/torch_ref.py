"""Pure-PyTorch paged attention: the CPU backend and the oracle that fast backends are tested against.

Decoding requests are handled in one batched call: their cached keys and values are gathered through the block
tables into a padded batch and masked by length. Multi-token spans are handled one request at a time; a span
with no earlier context attends to its own keys directly, otherwise to its cached prefix plus itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inferneo.attention.backend import AttentionBackend, AttentionMetadata, write_kv


class TorchReferenceBackend(AttentionBackend):
    name = "torch"

    def prepare(self, metadata: AttentionMetadata) -> None:
        if metadata.num_decode_tokens:
            assert metadata.decode_seq_lens is not None
            max_len = metadata.decode_block_tables.shape[1] * metadata.block_size
            positions = torch.arange(max_len, device=metadata.decode_seq_lens.device)
            mask = positions[None, :] < metadata.decode_seq_lens[:, None]
            metadata.extra["decode_mask"] = mask[:, None, None, :]  # [B, 1, 1, L]
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
        write_kv(kv_cache, k, v, metadata.slot_mapping)
        out = torch.empty_like(q)
        nd = metadata.num_decode_tokens
        num_heads, num_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
        gqa = num_heads != num_kv_heads
        if nd:
            out[:nd] = _decode_attention(q[:nd], kv_cache, metadata, scale)
        for span, mask in zip(metadata.prefills, metadata.extra["prefill_masks"], strict=True):
            s, e = span.start, span.start + span.num_tokens
            qs = q[s:e].transpose(0, 1)
            if mask is None:
                ks, vs = k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)
            else:
                total = span.context_len + span.num_tokens
                ks = _gather(kv_cache[0], span.block_table).view(-1, num_kv_heads, head_dim)[:total].transpose(0, 1)
                vs = _gather(kv_cache[1], span.block_table).view(-1, num_kv_heads, head_dim)[:total].transpose(0, 1)
            attn = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa
            )
            out[s:e] = attn.transpose(0, 1)
        return out


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Blocks of one cache half, in table order: ``[len(block_ids), block_size, Hkv, D]``.

    ``index_select`` on the flat table is several times faster on CPU than advanced indexing.
    """
    return cache.index_select(0, block_ids.reshape(-1))


def _decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float):
    """One query token per request against its cached keys, batched over requests with a length mask."""
    tables = metadata.decode_block_tables
    batch, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[3]
    keys = _gather(kv_cache[0], tables).view(batch, -1, num_kv_heads, head_dim)  # [B, L, Hkv, D]
    values = _gather(kv_cache[1], tables).view(batch, -1, num_kv_heads, head_dim)
    mask = metadata.extra["decode_mask"]  # [B, 1, 1, L]
    if q.dtype == torch.float32:
        attn = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )
        return attn.squeeze(2)
    # CPU SDPA kernels are slow in half precision for this shape: matmuls in the cache dtype, softmax in fp32.
    group = num_heads // num_kv_heads
    qg = q.view(batch, num_kv_heads, group, head_dim)
    scores = torch.matmul(qg, keys.permute(0, 2, 3, 1)).float() * scale  # [B, Hkv, G, L]
    scores.masked_fill_(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, values.transpose(1, 2)).view(batch, num_heads, head_dim)
