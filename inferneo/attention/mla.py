"""Multi-head latent attention (DeepSeek-V2/V3) over a compressed paged cache, in pure PyTorch.

The cache of one MLA layer holds, per token, one vector of ``kv_lora_rank + qk_rope_head_dim`` values (512 + 64 =
576 in DeepSeek-V3): the normalised KV latent followed by the rotated rope part of the key, shared by every query
head. Its layout is ``[num_blocks, block_size, latent_dim]``: a block of one layer is one contiguous tile.

The model calls this backend in the *absorbed* form, in every phase (decode, prompt and chunked prompt): each
query head's non-rope part has already gone through the key half of ``kv_b_proj`` into latent space and is
followed by its rotated rope part, so ``q`` is ``[T, H, latent_dim]``; ``k`` is ``[T, 1, latent_dim]`` (latent and
rope key of the new tokens) and ``v`` is ``k[..., :kv_lora_rank]`` (the latent alone, a view of ``k``). Attention
is then multi-query attention with one shared KV head whose values are the first ``kv_lora_rank`` channels of its
keys; the output ``[T, H, kv_lora_rank]`` goes through the value half of ``kv_b_proj`` in the model. Only ``k`` is
written to the cache: the values are read back out of it.

This is the reference implementation (and the oracle for a fused kernel): float32 softmax, explicit matmuls; a
prompt span's queries go in passes of rows whose scores stay within ``SCORE_BYTES``.
"""

from __future__ import annotations

import torch

from inferneo.attention.backend import AttentionBackend, AttentionMetadata


class TorchMLABackend(AttentionBackend):
    """Latent attention over the compressed cache: one shared KV head, values = the keys' first channels."""

    name = "mla-torch"
    SCORE_BYTES = 256 * 2**20  # the most one pass of a prompt span's float32 scores may take

    def kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_dim):
        if num_kv_heads != 1:
            raise ValueError(f"a latent attention cache holds one shared KV head; got num_kv_heads={num_kv_heads}")
        return (num_blocks, block_size, head_dim)

    def forward(self, q, k, v, kv_cache, metadata: AttentionMetadata, scale, *, sliding_window=None,
                logit_softcap=None, sinks=None, kv_scales=None):
        """``q`` ``[T, H, D]``, ``k`` ``[T, 1, D]``, ``v`` ``[T, 1, Dv]`` a view of ``k[..., :Dv]``. Writes ``k``
        into the cache; returns ``[T, H, Dv]``."""
        self.check_features(sliding_window, logit_softcap, sinks, kv_cache)  # none supported: NotImplementedError
        latent_dim, value_dim = k.shape[-1], v.shape[-1]
        if k.shape[1] != 1 or v.data_ptr() != k.data_ptr() or value_dim > latent_dim:
            raise ValueError("latent attention takes one KV head whose values are its keys' first channels "
                             "(v = k[..., :Dv])")
        kv_cache.view(-1, latent_dim).index_copy_(0, metadata.slot_mapping, k[:, 0])
        out = q.new_empty(q.shape[0], q.shape[1], value_dim)
        nd = metadata.num_decode_tokens
        if nd:
            out[:nd] = self._decode(q[:nd], kv_cache, metadata, scale, value_dim)
        for span in metadata.prefills:
            s, e = span.start, span.start + span.num_tokens
            if span.context_len == 0:
                keys = k[s:e, 0]
            else:
                total = span.context_len + span.num_tokens
                keys = kv_cache.index_select(0, span.block_table).view(-1, latent_dim)[:total]
            # Query rows in passes, so that one pass's float32 scores [H, rows, total] stay within SCORE_BYTES.
            rows = max(1, self.SCORE_BYTES // (4 * q.shape[1] * keys.shape[0]))
            key_pos = torch.arange(keys.shape[0], device=q.device)
            for r in range(s, e, rows):
                r_end = min(r + rows, e)
                q_pos = torch.arange(r - s, r_end - s, device=q.device)[:, None] + span.context_len
                scores = torch.matmul(q[r:r_end].transpose(0, 1), keys.t())  # [H, rows, total]
                attn = _attend(scores, (key_pos[None, :] <= q_pos)[None], keys[:, :value_dim], scale)
                out[r:r_end] = attn.transpose(0, 1)
        return out

    @staticmethod
    def _decode(q: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                value_dim: int) -> torch.Tensor:
        """One query token per request against its cached latents, batched over requests with a length mask."""
        batch, latent_dim = q.shape[0], kv_cache.shape[-1]
        tables = metadata.decode_block_tables
        keys = kv_cache.index_select(0, tables.reshape(-1)).view(batch, -1, latent_dim)  # [B, L, D]
        positions = torch.arange(keys.shape[1], device=q.device)
        visible = positions[None, :] < metadata.decode_seq_lens[:, None]  # [B, L]
        scores = torch.bmm(q, keys.transpose(1, 2))  # [B, H, L]
        return _attend(scores, visible[:, None, :], keys[..., :value_dim], scale)


def _attend(scores: torch.Tensor, visible: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax (float32) of the scaled ``scores`` over the ``visible`` keys, times ``values``."""
    scores = scores.float().mul_(scale).masked_fill_(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probs, values)
