"""A tiny checkpoint whose greedy answer is a script: each token's successor is fixed by its weights.

Server features that read what a model writes (a reasoning model's ``<think>`` block, say) need a model that
writes it. A random model does not; this one does, whatever the prompt: its one layer adds nothing to the
residual stream (zero output projections), so the hidden state is the last token's embedding, and its LM head maps
each script token's embedding to the next script token. Every script token must be one token of the vocabulary
and appear once, so that its successor is well defined.

:func:`make_context_scripted_checkpoint` lifts that limit: its successors are read from the last few tokens (up to
5), so a script may repeat tokens (harmony's ``<|start|>assistant<|channel|>`` between messages, say), and one
checkpoint may hold several answers, each chosen by the prompt's last tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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

    tokenizer = _scripted_tokenizer(added_tokens, (), chat_template)
    ids = [_one_token(tokenizer, text) for text in [*script, SPECIAL_TOKENS[IM_END_ID]]]
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
    return _save(path, model, tokenizer, [])


_CONTEXT_HEADS = 4  # attention heads, head h reading the token h places back: a successor sees 5 tokens at most
_HEAD_DIM = 64
_ROPE_THETA = 100.0  # rotary frequencies spread wide enough that a head's score peaks sharply at its offset
_ATTENTION_MARGIN = 40.0  # the score's lead (in nats) at its offset over any other within the context length
_GATE_SCALE = 4.0  # a matching neuron's gate input is about +14, a neuron one token off about -14
_MAX_POSITIONS = 2048


@dataclass(frozen=True, slots=True)
class ScriptedAnswer:
    """One answer a context-scripted checkpoint gives: a prompt ending in ``prompt_tail`` (tokens given as text)
    gets ``answer`` (its last token should be an EOS token of ``eos_tokens``)."""

    prompt_tail: tuple[str, ...]
    answer: tuple[str, ...]


def _context_neurons(scripts: list[list[int]], starts: list[int], max_context: int,
                     ) -> list[tuple[tuple[int, ...], int]]:
    """``(context, successor)`` rules, a context being the current token then those before it, each as short as
    makes it safe: at every position the model predicts (from each script's prompt tail on), the rules that may
    match predict that position's successor; tokens before a script's first are unknown (any token may be there)."""
    positions = [(k, t) for k, script in enumerate(scripts) for t in range(starts[k], len(script) - 1)]

    def may_match(context: tuple[int, ...], k: int, s: int) -> bool:
        return all(s - i < 0 or scripts[k][s - i] == token for i, token in enumerate(context))

    rules: dict[tuple[int, ...], int] = {}
    for k, t in positions:
        script, successor = scripts[k], scripts[k][t + 1]
        for length in range(1, min(t + 1, max_context) + 1):
            context = tuple(script[t - i] for i in range(length))
            if all(scripts[j][s + 1] == successor or not may_match(context, j, s) for j, s in positions):
                rules[context] = successor
                break
        else:
            raise ValueError(f"script {k}: the successor of token {t} ({script[t]}) is not decided by the "
                             f"{min(t + 1, max_context)} tokens up to it")
    return list(rules.items())


def make_context_scripted_checkpoint(path: Path, answers: list[ScriptedAnswer], *,
                                     added_tokens: tuple[str, ...] = (), special_tokens: tuple[str, ...] = (),
                                     eos_tokens: tuple[str, ...] = (), chat_template: str | None = None) -> Path:
    """Write a one-layer Llama checkpoint into ``path`` whose greedy answer to a prompt ending in an answer's
    ``prompt_tail`` is that answer, exactly (float32), whatever came before the tail.

    Unlike :func:`make_scripted_checkpoint` a token may repeat: its successor is read from the last tokens (up to
    5), the fewest that decide it. The construction: each script token has an orthonormal embedding in a
    "current token" subspace, plus a constant component; attention head ``h`` (constant queries and keys,
    pre-rotated so that the rotary score peaks at offset ``h``) copies the token ``h`` places back into its own
    subspace; one MLP neuron per rule fires (a SwiGLU gate thresholded by the constant) only when every token of its
    context is in place, and writes the successor into an output subspace, which the LM head reads. ``ValueError``
    when a script token is not one token, or the last 5 tokens do not decide a successor.

    ``added_tokens`` are added to the tokenizer as plain tokens, ``special_tokens`` as special ones (decoded text
    leaves them out unless asked to keep them); ``eos_tokens`` join ``</s>`` and ``<|im_end|>`` as EOS in the
    generation config. ``chat_template`` replaces the tokenizer's.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _scripted_tokenizer(added_tokens, special_tokens, chat_template)
    scripts = [[_one_token(tokenizer, text) for text in (*a.prompt_tail, *a.answer)] for a in answers]
    starts = [len(a.prompt_tail) - 1 for a in answers]
    if min(starts, default=0) < 0:
        raise ValueError("each answer needs a prompt tail of one token at least")
    rules = _context_neurons(scripts, starts, _CONTEXT_HEADS + 1)
    known = sorted({token for script in scripts for token in script})
    slot = {token: i for i, token in enumerate(known)}  # a script token's axis in each subspace
    width = len(known)
    const, other, out = (_CONTEXT_HEADS + 1) * width, (_CONTEXT_HEADS + 1) * width + 1, (_CONTEXT_HEADS + 1) * width + 2
    hidden = (out + width + 63) // 64 * 64
    intermediate = (len(rules) + 63) // 64 * 64
    vocab_size = (len(tokenizer) + 7) // 8 * 8
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=1, num_attention_heads=_CONTEXT_HEADS, num_key_value_heads=_CONTEXT_HEADS,
                         head_dim=_HEAD_DIM, max_position_embeddings=_MAX_POSITIONS, rope_theta=_ROPE_THETA,
                         rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                         pad_token_id=PAD_ID, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    half = _HEAD_DIM // 2
    inv_freq = _ROPE_THETA ** (-torch.arange(0, _HEAD_DIM, 2, dtype=torch.float64) / _HEAD_DIM)
    offsets = torch.arange(-_CONTEXT_HEADS, _MAX_POSITIONS + 1, dtype=torch.float64)
    offsets = offsets[offsets != 0]
    margin = half - torch.cos(offsets[:, None] * inv_freq).sum(-1).max().item()
    amplitude = _ATTENTION_MARGIN * _HEAD_DIM ** 0.5 / margin  # score(d) = amplitude / sqrt(hd) * sum cos((d-h) f)
    gain = (hidden / 2) ** 0.5  # every embedding is 2 long: the input norm scales it by this
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        embed = model.model.embed_tokens.weight
        embed[:, const] = 1.0
        embed[:, other] = 1.0
        for token, i in slot.items():
            embed[token, other] = 0.0
            embed[token, i] = 1.0
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
        attn = model.model.layers[0].self_attn
        for h in range(1, _CONTEXT_HEADS + 1):
            rows = slice((h - 1) * _HEAD_DIM, h * _HEAD_DIM)
            q, k, v = attn.q_proj.weight[rows], attn.k_proj.weight[rows], attn.v_proj.weight[rows]
            q[:half, const] = (amplitude / gain) * torch.cos(-h * inv_freq).float()
            q[half:, const] = (amplitude / gain) * torch.sin(-h * inv_freq).float()
            k[:half, const] = 1.0 / gain
            for i in range(width):  # the value: the token's axis, written to subspace h
                v[i, i] = 1.0 / gain
                attn.o_proj.weight[h * width + i, (h - 1) * _HEAD_DIM + i] = 1.0
        mlp = model.model.layers[0].mlp
        for n, (context, successor) in enumerate(rules):
            for i, token in enumerate(context):
                mlp.gate_proj.weight[n, i * width + slot[token]] = _GATE_SCALE
            mlp.gate_proj.weight[n, const] = -_GATE_SCALE * (len(context) - 0.5)
            mlp.up_proj.weight[n, const] = 1.0
            mlp.down_proj.weight[out + slot[successor], n] = 1.0
        for token, i in slot.items():
            model.lm_head.weight[token, out + i] = _LOGIT_SCALE
    return _save(path, model, tokenizer, [_one_token(tokenizer, text) for text in eos_tokens])


def _scripted_tokenizer(added_tokens: tuple[str, ...], special_tokens: tuple[str, ...], chat_template: str | None):
    """The tiny tokenizer with ``added_tokens`` (plain) and ``special_tokens`` added, and ``chat_template`` (when
    given) in place of its own."""
    tokenizer = make_tiny_tokenizer(_VOCAB)
    if added_tokens:
        tokenizer.add_tokens(list(added_tokens))
    if special_tokens:
        tokenizer.add_tokens(list(special_tokens), special_tokens=True)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def _save(path: Path, model, tokenizer, extra_eos: list[int]) -> Path:
    """Write ``model`` and ``tokenizer`` into ``path`` with a generation config whose EOS ids are ``</s>``,
    ``<|im_end|>`` and ``extra_eos``; returns ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    generation = {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, IM_END_ID, *extra_eos], "pad_token_id": PAD_ID}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer.save_pretrained(path)
    return path


def _one_token(tokenizer, text: str) -> int:
    """The id of ``text``, which must be one token of the vocabulary."""
    encoded = tokenizer.encode(text, add_special_tokens=False)
    if len(encoded) != 1:
        raise ValueError(f"script token {text!r} is {len(encoded)} tokens of the vocabulary, not one")
    return encoded[0]
