"""A tiny checkpoint whose greedy answer is a script: each token's successor is fixed by its weights.

Server features that read what a model writes (a reasoning model's ``<think>`` block, say) need a model that
writes it. A random model does not; this one does, whatever the prompt: its one layer adds nothing to the
residual stream (zero output projections), so the hidden state is the last token's embedding, and its LM head maps
each script token's embedding to the next script token. Every script token must be one token of the vocabulary
and appear once, so that its successor is well defined.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from inferneo.testing.tiny_models import (
    BOS_ID,
    EOS_ID,
    IM_END_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    make_tiny_tokenizer,
)

_VOCAB = 384  # the trained tokenizer's size; added tokens come after it
_HIDDEN = 64
_LOGIT_SCALE = 10.0  # the successor's logit is about 80 (the normed embedding is 8 long), the others under 30


def make_scripted_checkpoint(path: Path, script: list[str], *, added_tokens: tuple[str, ...] = (),
                             chat_template: str | None = None, seed: int = 0) -> Path:
    """Write a one-layer Llama checkpoint into ``path`` whose greedy answer to a prompt is ``script``.

    ``script`` starts with a prompt's last token (``"\\n"`` after ChatML's ``<|im_start|>assistant``) and goes on
    with the answer's tokens, each given as its text; the answer ends at ``<|im_end|>`` when the script does. A
    prompt ending in any script token gets the rest of the script. ``added_tokens`` are added to the tokenizer
    (not special: they stay in decoded text), e.g. ``<think>``. ``chat_template`` replaces the tokenizer's
    (ChatML after ``<s>``).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tiny_tokenizer(_VOCAB)
    if added_tokens:
        tokenizer.add_tokens(list(added_tokens))
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    ids = []
    for text in [*script, SPECIAL_TOKENS[IM_END_ID]]:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"script token {text!r} is {len(encoded)} tokens of the vocabulary, not one")
        ids.append(encoded[0])
    if len(set(ids)) != len(ids):
        raise ValueError("each script token may appear once (its successor must be one token)")
    vocab_size = (len(tokenizer) + 7) // 8 * 8
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=_HIDDEN, intermediate_size=2 * _HIDDEN,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        embeddings = torch.randn(vocab_size, _HIDDEN)
        model.model.embed_tokens.weight.copy_(embeddings / embeddings.norm(dim=-1, keepdim=True))
        for layer in model.model.layers:  # the layer adds nothing: the residual stream stays the embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
        head = torch.zeros(vocab_size, _HIDDEN)
        for token, successor in zip(ids, ids[1:], strict=False):
            head[successor] = _LOGIT_SCALE * model.model.embed_tokens.weight[token]
        model.lm_head.weight.copy_(head)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    generation = {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, IM_END_ID], "pad_token_id": PAD_ID}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer.save_pretrained(path)
    return path
