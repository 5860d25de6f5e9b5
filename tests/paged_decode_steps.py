"""A prefill and greedy decode steps of a built model straight through its layers and attention backend (no
engine): each prompt in its own cache block, the decode steps one token a prompt. For tests that compare a model
after the CUDA device transform (its Triton kernels under the interpreter) with the plain PyTorch model."""

from __future__ import annotations

import torch

from inferneo.attention import AttentionMetadata, PrefillSpan

BLOCK = 16


def prefill_inputs(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """``(ids, positions, metadata)`` of one packed prefill step over ``prompts``, prompt ``i`` in cache block ``i``."""
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    spans, slots, start = [], [], 0
    for i, p in enumerate(prompts):
        spans.append(PrefillSpan(start, len(p), 0, torch.tensor([i])))
        slots.extend(i * BLOCK + j for j in range(len(p)))
        start += len(p)
    meta = AttentionMetadata(block_size=BLOCK, num_decode_tokens=0, slot_mapping=torch.tensor(slots),
                             decode_block_tables=None, decode_seq_lens=None, prefills=spans)
    return ids, positions, meta


def generate(model, prompts: list[list[int]], steps: int, forced: list[torch.Tensor] | None = None,
             cache_dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(logits, caches)``: the prefill's last-position logits of each prompt, then each decode step's; the next
    tokens are the argmax, or ``forced[step]`` (another model's choices, so both read the same tokens). Each
    prompt and its ``steps`` new tokens must fit one ``BLOCK``-token block."""
    backend, cfg = model.layers[0].self_attn.backend, model.config
    caches = [torch.zeros(backend.kv_cache_shape(len(prompts), BLOCK, cfg.num_kv_heads, cfg.head_dim),
                          dtype=cache_dtype) for _ in model.layers]
    ids, positions, meta = prefill_inputs(prompts)
    lengths = [len(p) for p in prompts]
    ends = torch.tensor(lengths).cumsum(0) - 1
    out = []
    for step in range(steps + 1):
        backend.prepare(meta)
        with torch.inference_mode():
            logits = model.compute_logits(model(ids, positions, caches, meta))
        logits = logits[ends] if step == 0 else logits  # the prefill: each prompt's last position
        out.append(logits)
        ids = forced[step] if forced is not None else logits.argmax(-1)
        positions = torch.tensor(lengths)
        meta = AttentionMetadata(block_size=BLOCK, num_decode_tokens=len(prompts),
                                 slot_mapping=torch.tensor([i * BLOCK + n for i, n in enumerate(lengths)]),
                                 decode_block_tables=torch.arange(len(prompts))[:, None],
                                 decode_seq_lens=torch.tensor(lengths) + 1)
        lengths = [n + 1 for n in lengths]
    return out, caches
