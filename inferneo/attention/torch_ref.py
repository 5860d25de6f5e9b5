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
            tables = metadata.decode_block_tables
            keys = kv_cache[0][tables].flatten(1, 2).transpose(1, 2)  # [B, Hkv, L, D]
            values = kv_cache[1][tables].flatten(1, 2).transpose(1, 2)
            attn = F.scaled_dot_product_attention(
                q[:nd].unsqueeze(2), keys, values, attn_mask=metadata.extra["decode_mask"], scale=scale,
                enable_gqa=gqa,
            )
            out[:nd] = attn.squeeze(2)
        for span, mask in zip(metadata.prefills, metadata.extra["prefill_masks"], strict=True):
            s, e = span.start, span.start + span.num_tokens
            qs = q[s:e].transpose(0, 1)
            if mask is None:
                ks, vs = k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)
            else:
                total = span.context_len + span.num_tokens
                ks = kv_cache[0][span.block_table].reshape(-1, num_kv_heads, head_dim)[:total].transpose(0, 1)
                vs = kv_cache[1][span.block_table].reshape(-1, num_kv_heads, head_dim)[:total].transpose(0, 1)
            attn = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa
            )
            out[s:e] = attn.transpose(0, 1)
        return out
