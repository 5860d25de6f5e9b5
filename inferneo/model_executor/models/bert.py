"""BERT-family encoders (``BertModel``, ``RobertaModel``, ``XLMRobertaModel``) as embedding-only models.

These are the models most sentence-transformers folders hold (all-MiniLM, bge, e5, gte, multilingual ones,
bge-m3): absolute position embeddings, token type embeddings (every token is type 0), post-LayerNorm blocks with a
GELU feed-forward, and bidirectional attention over the whole input. They have no language-model head and keep no
KV cache: the engine runs each input whole in one step (``docs/embeddings.md``, "Encoder models"), so attention
here reads the step's own keys and values, never the cache, and the attention backend is not used.

Inputs are flat like the decoders': ``input_ids`` and ``positions`` are ``[num_tokens]``; the attention metadata
says which tokens form which input (one-token inputs are its decode rows, longer ones its prefill spans). RoBERTa
numbers positions from ``pad_token_id + 1`` and gives padding tokens the position ``pad_token_id``, as Hugging
Face's ``create_position_ids_from_input_ids`` does. Checkpoints saved from a masked-LM or other head model
(``bert.``, ``roberta.`` prefixes) load too: the head's tensors and the unused ``pooler`` are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from inferneo.attention import AttentionBackend, AttentionMetadata
from inferneo.attention.kv_spec import KVCacheSpec
from inferneo.model_executor.models.llama import _copy, _lookup

# transformers' ``ACT2FN`` names of the activations computed here
_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass(slots=True)
class EncoderConfig:
    """The architecture values of a BERT-family encoder, read from a Hugging Face ``config.json``.

    ``position_offset`` is where the first token's position embedding sits (0 for BERT; ``pad_token_id + 1`` for
    RoBERTa, whose ``padding_idx`` is ``pad_token_id``), so ``max_input_tokens`` is what the position table holds.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float
    max_position_embeddings: int
    type_vocab_size: int
    hidden_act: str
    # RoBERTa's pad_token_id: positions count from it (None: BERT's 0, 1, 2, ...)
    padding_idx: int | None = None
    num_labels: int = 2  # a sequence classifier's outputs (``id2label``); unused by the embedding models

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_offset(self) -> int:
        return 0 if self.padding_idx is None else self.padding_idx + 1

    @property
    def max_input_tokens(self) -> int:
        """The longest input the position embeddings cover."""
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_hf(cls, cfg: dict, roberta_positions: bool) -> EncoderConfig:
        """The config of a Hugging Face ``config.json``; ValueError for settings not computed here (relative
        position embeddings, an activation other than GELU or ReLU, a width the heads do not divide)."""
        architecture = ", ".join(cfg.get("architectures") or ()) or cfg.get("model_type", "this model")
        position_type = cfg.get("position_embedding_type") or "absolute"
        if position_type != "absolute":
            raise ValueError(
                f"{architecture} with position_embedding_type {position_type!r} is not supported; "
                "supported: absolute"
            )
        activation = cfg.get("hidden_act") or "gelu"
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"{architecture} with hidden_act {activation!r} is not supported; supported: "
                f"{', '.join(_ACTIVATIONS)}"
            )
        if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
            raise ValueError(
                f"{architecture} configured as a decoder (is_decoder / add_cross_attention) is not "
                "supported: encoders only"
            )
        if cfg["hidden_size"] % cfg["num_attention_heads"]:
            raise ValueError(
                f"{architecture}: hidden_size {cfg['hidden_size']} is not a multiple of "
                f"num_attention_heads {cfg['num_attention_heads']}"
            )
        padding_idx = None
        if roberta_positions:
            padding_idx = cfg.get("pad_token_id")
            padding_idx = 1 if padding_idx is None else int(padding_idx)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
            max_position_embeddings=cfg.get("max_position_embeddings", 512),
            type_vocab_size=cfg.get("type_vocab_size", 2) or 1,
            hidden_act=activation,
            padding_idx=padding_idx,
            num_labels=len(cfg.get("id2label") or {}) or int(cfg.get("num_labels") or 2),
        )


class EncoderEmbeddings(nn.Module):
    """Word + position + token type embeddings (type 0 unless ``token_type_ids`` say otherwise), then LayerNorm."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        padding_idx = self.config.padding_idx
        if padding_idx is not None:
            positions = _roberta_positions(input_ids, positions, padding_idx)
        hidden = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if (
            token_type_ids is None or self.config.type_vocab_size == 1
        ):  # RoBERTa's one type: nothing to choose
            return self.norm(hidden + self.token_type_embeddings.weight[0])
        return self.norm(hidden + self.token_type_embeddings(token_type_ids))


def _roberta_positions(input_ids: torch.Tensor, positions: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """RoBERTa's position ids for a flat batch of whole inputs (each starts at position 0): within each input, the
    count of non-padding tokens up to and including this one, plus ``padding_idx``; ``padding_idx`` for padding."""
    mask = (input_ids != padding_idx).long()
    counts = mask.cumsum(0)
    starts = positions == 0
    before = (counts - mask)[starts]  # non-padding tokens of the inputs before each input
    which = starts.long().cumsum(0) - 1  # the input each token belongs to
    return (counts - before[which]) * mask + padding_idx


class EncoderLayer(nn.Module):
    """One post-LayerNorm block: bidirectional self-attention, then the GELU feed-forward, each followed by a
    residual add and LayerNorm."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        hidden = config.hidden_size
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.up = nn.Linear(hidden, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, hidden)
        self.mlp_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, hidden: torch.Tensor, groups: list[PaddedGroup], num_single: int) -> torch.Tensor:
        q, k, v = self.qkv(hidden).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        attn = torch.empty_like(q)
        attn[:num_single] = v[:num_single]  # a one-token input attends to itself alone
        for group in groups:
            # [inputs, heads, longest, head_dim]: every token of an input sees every other (no causal mask)
            q_g, k_g, v_g = (x[group.index].transpose(1, 2) for x in (q, k, v))
            out = F.scaled_dot_product_attention(
                q_g, k_g, v_g, attn_mask=group.mask, scale=self.head_dim**-0.5
            )
            attn[group.rows] = out.transpose(1, 2)[group.valid]
        hidden = self.attn_norm(hidden + self.attn_out(attn.reshape(hidden.shape)))
        return self.mlp_norm(hidden + self.down(self.act(self.up(hidden))))


# A padded batch of inputs holds at most this many attention scores per head (inputs x longest x longest).
GROUP_SCORES = 1 << 20


@dataclass(slots=True)
class PaddedGroup:
    """Inputs of similar lengths attended in one call, padded to the longest: ``index`` ``[inputs, longest]`` holds
    each position's row in the flat batch (padding repeats the input's first row), ``valid`` marks the real
    positions, ``rows`` is ``index[valid]`` and ``mask`` (``[inputs, 1, 1, longest]``; None when no input is padded)
    hides the padding keys."""

    index: torch.Tensor
    valid: torch.Tensor
    rows: torch.Tensor
    mask: torch.Tensor | None


def padded_groups(spans: list[tuple[int, int]], device: torch.device) -> list[PaddedGroup]:
    """The multi-token inputs ``(start, length)`` of a step in padded groups: sorted by length, and cut where a
    group would hold more than ``GROUP_SCORES`` scores per head (an input alone may hold more)."""
    groups: list[list[tuple[int, int]]] = []
    for span in sorted(spans, key=lambda s: s[1]):
        if groups and (len(groups[-1]) + 1) * span[1] ** 2 <= GROUP_SCORES:
            groups[-1].append(span)
        else:
            groups.append([span])
    built = []
    for group in groups:
        starts = torch.tensor([start for start, _ in group], device=device)
        lengths = torch.tensor([length for _, length in group], device=device)
        longest = group[-1][1]
        offsets = torch.arange(longest, device=device)
        valid = offsets < lengths[:, None]
        index = torch.where(valid, starts[:, None] + offsets, starts[:, None])
        padded = group[0][1] != longest
        built.append(PaddedGroup(index, valid, index[valid], valid[:, None, None, :] if padded else None))
    return built


# Hugging Face's names (after the model prefix) -> ours; ``{i}`` is the layer index
_WEIGHT_NAMES = [
    (r"embeddings\.LayerNorm\.(weight|bias)", r"embeddings.norm.\1"),
    (r"embeddings\.(word|position|token_type)_embeddings\.weight", r"embeddings.\1_embeddings.weight"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"layers.\1.attn_out.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)", r"layers.\1.attn_norm.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"layers.\1.up.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"layers.\1.down.\2"),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias)", r"layers.\1.mlp_norm.\2"),
]
_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)")
# tensors of heads and buffers that embeddings do not use
_SKIPPED = re.compile(r"(cls|lm_head|pooler|classifier|qa_outputs)\.|embeddings\.position_ids$")


class BertEmbeddingModel(nn.Module):
    """A BERT encoder serving embeddings only: ``forward`` returns the last hidden states (Hugging Face's
    ``last_hidden_state``), ``compute_logits`` has nothing to compute. ``is_encoder`` tells the engine to run each
    input whole in one step, without KV cache or prefix caching, and to refuse generation."""

    is_encoder = True
    roberta_positions = False
    checkpoint_prefixes: tuple[str, ...] = ("bert.",)

    def __init__(
        self, config: EncoderConfig, backend: AttentionBackend | None = None, max_position: int | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.embeddings = EncoderEmbeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))

    @classmethod
    def config_from_hf(cls, cfg: dict) -> EncoderConfig:
        """The model's config from its ``config.json`` (``cfg``)."""
        return EncoderConfig.from_hf(cfg, cls.roberta_positions)

    @property
    def num_kv_heads(self) -> int:
        return 0

    def kv_cache_specs(self) -> list[KVCacheSpec]:
        """No layer keeps anything in the KV cache."""
        return []

    def cast(self, dtype: torch.dtype) -> None:
        """Move the parameters to the compute dtype."""
        self.to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden states ``[num_tokens, hidden]`` of a flat batch of whole inputs (``token_type_ids``: each
        token's type, None: all type 0)."""
        spans = [(span.start, span.num_tokens) for span in metadata.prefills]
        if any(span.context_len for span in metadata.prefills):
            raise ValueError(
                "an encoder input must run whole in one step (it was split or read from a cache)"
            )
        groups = padded_groups(spans, input_ids.device)
        hidden = self.embeddings(input_ids, positions, token_type_ids)
        for layer in self.layers:
            hidden = layer(hidden, groups, metadata.num_decode_tokens)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """None: an encoder has no language-model head (the engine never samples from it)."""
        return None

    def head_weight(self, name: str) -> str | None:
        """The parameter a head's checkpoint tensor ``name`` (prefix removed) loads into; None: not a head tensor
        (an embedding model has no head: the checkpoint's heads are skipped)."""
        return None

    def expected_load_keys(self) -> set[str]:
        """Every load key a whole checkpoint writes (a fused q/k/v parameter's three shards as ``name#index``)."""
        return {f"{n}#{i}" if ".qkv." in n else n for n, _ in self.named_parameters() for i in range(3)}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], strict: bool = True) -> set[str]:
        """Copy checkpoint tensors (Hugging Face names, with or without the ``bert.`` / ``roberta.`` prefix) into
        the parameters; returns the names loaded. ValueError for an unknown weight or a wrong shape, and (with
        ``strict``) for a missing one."""
        params = dict(self.named_parameters())
        hidden = self.config.hidden_size
        loaded: set[str] = set()
        for original, tensor in weights:
            name = original
            for prefix in self.checkpoint_prefixes:
                name = name.removeprefix(prefix)
            name = re.sub(
                r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
            )
            if (target := self.head_weight(name)) is not None:
                _copy(_lookup(params, target, original).data, tensor, original)
                loaded.add(target)
                continue
            if _SKIPPED.match(name):
                continue
            if (match := _QKV.fullmatch(name)) is not None:
                layer, which, kind = match.groups()
                target = f"layers.{layer}.qkv.{kind}"
                index = ("query", "key", "value").index(which)
                _copy(
                    _lookup(params, target, original).data.narrow(0, index * hidden, hidden), tensor, original
                )
                loaded.add(f"{target}#{index}")
                continue
            for pattern, replacement in _WEIGHT_NAMES:
                if re.fullmatch(pattern, name):
                    target = re.sub(pattern, replacement, name)
                    _copy(_lookup(params, target, original).data, tensor, original)
                    loaded.add(target)
                    break
            else:
                raise ValueError(f"checkpoint weight {original!r} does not belong to this model")
        missing = sorted(self.expected_load_keys() - loaded) if strict else []
        if missing:
            raise ValueError(
                f"checkpoint is missing weights: {', '.join(missing[:8])}"
                + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            )
        return loaded


class RobertaEmbeddingModel(BertEmbeddingModel):
    """RoBERTa and XLM-RoBERTa: BERT's encoder with positions counted from ``pad_token_id + 1``."""

    roberta_positions = True
    checkpoint_prefixes = ("roberta.",)
