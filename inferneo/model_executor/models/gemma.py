"""Gemma 1, Gemma 2 and Gemma 3 (text): the Llama decoder's modules with Gemma's changes.

Gemma 1 (:class:`GemmaForCausalLM`) is Llama's layer with Gemma's RMSNorm, scaled and tied embeddings and the
GELU-gated MLP below (``hidden_act`` ``gelu`` means the tanh approximation, as transformers reads it). What Gemma 2
and 3 change from Llama, all read from the Hugging Face ``config.json``:

- four norms per layer: the attention output and the MLP output are each normalized before they join the
  residual stream (``post_attention_layernorm``, ``post_feedforward_layernorm``), and the MLP input has its own
  norm (``pre_feedforward_layernorm``); every norm is Gemma's RMSNorm (``x * (1 + weight)`` in float32);
- embeddings scaled by ``sqrt(hidden_size)`` (in the model dtype, as Hugging Face does) and tied to the LM head
  unless the config says otherwise;
- a GELU-gated MLP (``hidden_activation``: ``gelu_pytorch_tanh``, or exact ``gelu``);
- attention scaled by ``query_pre_attn_scalar ** -0.5`` rather than ``head_dim ** -0.5``, and layers that
  alternate between a sliding window and full attention (``layer_types``; without it, Gemma 2's every other
  layer and Gemma 3's five sliding layers to one full layer, ``sliding_window_pattern``);
- Gemma 2: attention logits soft-capped (``attn_logit_softcapping``); both: final logits soft-capped when
  ``final_logit_softcapping`` is set (Gemma 2's default is 30);
- Gemma 3: per-head q/k norms, and two rotary bases: ``rope_local_base_freq`` on sliding layers, ``rope_theta``
  (with its ``rope_scaling``, linear in the larger checkpoints) on full layers. Hugging Face's Gemma 3 ignores
  ``attn_logit_softcapping``, and so does this model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from inferneo.attention import AttentionBackend, AttentionMetadata
from inferneo.model_executor.layers.basic import GeluAndMul, GemmaRMSNorm
from inferneo.model_executor.layers.rotary import rope_scaling_from_hf
from inferneo.model_executor.models.llama import MLP, Attention, DecoderConfig, DecoderLayer, LlamaForCausalLM

# Hugging Face ``hidden_activation`` -> ``torch.nn.functional.gelu``'s ``approximate``
_GELU_APPROXIMATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}


@dataclass(slots=True)
class GemmaConfig(DecoderConfig):
    """A :class:`DecoderConfig` with the values only Gemma 2 and Gemma 3 have."""

    query_pre_attn_scalar: float = 256.0
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    gelu_approximate: str = "tanh"
    # Gemma 3: the rotary base (and scaling) of sliding-window layers; None: the same as the full layers'.
    local_rope_theta: float | None = None
    local_rope_scaling: dict | None = None

    def attention_config(self, layer_index: int) -> DecoderConfig:
        """The config layer ``layer_index``'s :class:`Attention` is built from: the local rotary base on a
        sliding-window layer, and no q/k norms (Gemma's own are put in after)."""
        values = dict(qk_norm=False)
        if self.local_rope_theta is not None and self.sliding_window_for(layer_index) is not None:
            values.update(rope_theta=self.local_rope_theta, rope_scaling=self.local_rope_scaling)
        return dataclasses.replace(self, **values)


def _common_values(cfg: dict, family: str, *, pattern: int, max_position: int) -> dict:
    """Config values shared by Gemma 2 and 3 (``pattern``: every ``pattern``-th layer is full attention when
    the config has no ``layer_types``); ValueError for what the engine does not support."""
    if cfg.get("use_bidirectional_attention"):
        raise ValueError(f"{family} with use_bidirectional_attention=true is not supported; only causal attention")
    activation = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
    if activation not in _GELU_APPROXIMATIONS:
        raise ValueError(f"{family} hidden_activation {activation!r} is not supported; supported: "
                         f"{', '.join(_GELU_APPROXIMATIONS)}")
    num_layers = cfg["num_hidden_layers"]
    layer_types = cfg.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)
    ]
    return dict(
        head_dim=cfg.get("head_dim") or 256,
        max_position_embeddings=cfg.get("max_position_embeddings", max_position),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        mlp_bias=False,
        qk_norm=False,
        sliding_window=cfg.get("sliding_window", 4096),
        layer_types=tuple(layer_types),
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
        gelu_approximate=_GELU_APPROXIMATIONS[activation],
    )


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def _gemma3_rope(cfg: dict) -> dict:
    """The two rotary settings of a Gemma 3 config, from transformers 5's ``rope_parameters`` (one entry per
    layer type) or the older ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling``."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
        global_theta, local_theta = full.get("rope_theta", 1_000_000.0), local.get("rope_theta", 10_000.0)
    else:
        scaling = cfg.get("rope_scaling") or {}
        full, local = scaling, {}
        global_theta = cfg.get("rope_theta", 1_000_000.0)
        local_theta = cfg.get("rope_local_base_freq", 10_000.0)

    def scaling_of(entry: dict) -> dict | None:  # completed as for any other model's rope_scaling
        scaling = {key: value for key, value in entry.items() if key != "rope_theta"}
        return rope_scaling_from_hf({**cfg, "rope_scaling": scaling, "rope_parameters": None})

    return dict(rope_theta=float(global_theta), rope_scaling=scaling_of(full), local_rope_theta=float(local_theta),
                local_rope_scaling=scaling_of(local))


class GemmaMLP(MLP):
    """The gated MLP with GELU in place of SiLU."""

    def __init__(self, config: GemmaConfig) -> None:
        super().__init__(config)
        self.act_fn = GeluAndMul(config.gelu_approximate)


class GemmaDecoderLayer(nn.Module):
    """One Gemma layer: normalized input -> attention -> norm -> residual, then normalized -> MLP -> norm ->
    residual. Like Llama's layer it hands ``(hidden, residual)`` on, so each residual addition happens inside
    the next norm."""

    def __init__(self, config: GemmaConfig, backend: AttentionBackend, max_position: int, layer_index: int) -> None:
        super().__init__()
        self.self_attn = Attention(config.attention_config(layer_index), backend, max_position,
                                   sliding_window=config.sliding_window_for(layer_index),
                                   logit_softcap=config.attn_logit_softcap,
                                   scale=config.query_pre_attn_scalar ** -0.5)
        if config.qk_norm:
            self.self_attn.q_norm = GemmaRMSNorm(config.head_dim, config.rms_norm_eps)
            self.self_attn.k_norm = GemmaRMSNorm(config.head_dim, config.rms_norm_eps)
        self.mlp = GemmaMLP(config)
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, kv_cache, metadata: AttentionMetadata):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, kv_cache, metadata))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma 1: Llama's layers with Gemma's RMSNorm (``x * (1 + weight)``) and GELU-gated MLP, embeddings scaled by
    ``sqrt(hidden_size)`` and tied to the LM head unless the config says otherwise."""

    # The peer-fused all-reduce + residual + norm kernel computes Llama's norm, not Gemma's ``1 + weight``.
    fuses_peer_norms = False

    @classmethod
    def config_from_hf(cls, cfg: dict) -> GemmaConfig:
        """Gemma 1's config; ValueError for an activation other than GELU (``gelu`` is read as the tanh
        approximation, as transformers' GemmaConfig does)."""
        activation = cfg.get("hidden_act") or cfg.get("hidden_activation") or "gelu_pytorch_tanh"
        if activation == "gelu":
            activation = "gelu_pytorch_tanh"
        if activation not in _GELU_APPROXIMATIONS:
            raise ValueError(f"Gemma hidden_act {activation!r} is not supported; supported: "
                             f"{', '.join(_GELU_APPROXIMATIONS)}")
        return GemmaConfig.from_hf(cfg, silu_mlp=False, head_dim=cfg.get("head_dim") or 256,
                                   max_position_embeddings=cfg.get("max_position_embeddings", 8192),
                                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                                   gelu_approximate=_GELU_APPROXIMATIONS[activation])

    def __init__(self, config: GemmaConfig, backend: AttentionBackend, max_position: int | None = None) -> None:
        super().__init__(config, backend, max_position)
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def build_layer(self, config: GemmaConfig, backend: AttentionBackend, max_position: int,
                    layer_index: int) -> nn.Module:
        layer = DecoderLayer(config, backend, max_position, GemmaMLP(config), layer_index=layer_index)
        layer.input_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        layer.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        return layer

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings times ``sqrt(hidden_size)``, the factor rounded to the model dtype first (a Python
        number, so that no host-to-device copy happens while a CUDA graph is captured)."""
        return self._scale(self.embed_tokens(input_ids))

    def _scale(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden * torch.tensor(self.config.hidden_size ** 0.5, dtype=hidden.dtype).item()

    def prompt_embeds_to_hidden(self, embeds: torch.Tensor) -> torch.Tensor:
        """Gemma's and Gemma 2's given embeddings are the table's rows before the ``sqrt(hidden_size)`` scaling, as
        vLLM reads ``prompt_embeds`` (it scales them inside the model): scaled here as ``embed`` scales the
        table's."""
        return self._scale(embeds)


class Gemma2ForCausalLM(GemmaForCausalLM):
    """Gemma 2: Gemma 1's embeddings, attention and loading with Gemma 2's layers and soft-capped logits."""

    @classmethod
    def config_from_hf(cls, cfg: dict) -> GemmaConfig:
        """Gemma 2's config; ValueError for bidirectional attention or an unsupported activation."""
        values = _common_values(cfg, "Gemma 2", pattern=2, max_position=8192)
        values.update(attn_logit_softcap=_optional_float(cfg.get("attn_logit_softcapping", 50.0)),
                      final_logit_softcap=_optional_float(cfg.get("final_logit_softcapping", 30.0)))
        return GemmaConfig.from_hf(cfg, silu_mlp=False, **values)

    def build_layer(self, config: GemmaConfig, backend: AttentionBackend, max_position: int,
                    layer_index: int) -> nn.Module:
        return GemmaDecoderLayer(config, backend, max_position, layer_index)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Float32 logits, soft-capped (``c * tanh(logits / c)``) when the config sets
        ``final_logit_softcapping``; None on tensor-parallel ranks other than the driver."""
        logits = super().compute_logits(hidden)
        cap = self.config.final_logit_softcap
        if logits is None or cap is None:
            return logits
        return logits.div_(cap).tanh_().mul_(cap)  # in place: the logits are this call's own tensor


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 text: Gemma 2's layers with per-head q/k norms, a local and a global rotary base, and no attention
    soft-capping."""

    @classmethod
    def config_from_hf(cls, cfg: dict) -> GemmaConfig:
        """Gemma 3's text config; ValueError for bidirectional attention or an unsupported activation."""
        values = _common_values(cfg, "Gemma 3", pattern=int(cfg.get("sliding_window_pattern", 6)),
                                max_position=131_072)
        values.update(qk_norm=True, attn_logit_softcap=None,
                      final_logit_softcap=_optional_float(cfg.get("final_logit_softcapping")), **_gemma3_rope(cfg))
        return GemmaConfig.from_hf(cfg, silu_mlp=False, **values)

    def prompt_embeds_to_hidden(self, embeds: torch.Tensor) -> torch.Tensor:
        """Gemma 3's given embeddings are already scaled: Hugging Face's ``get_input_embeddings()`` is a scaled
        embedding (``Gemma3TextScaledWordEmbedding``), and vLLM's Gemma 3 scales inside its embedding lookup, not
        after given embeddings. Taken as they are."""
        return embeds


# Checkpoint name prefixes of a multimodal Gemma 3's language model (transformers 4 and 5 layouts) -> the text-only
# names; every other tensor (vision tower, projector) is left out.
_LANGUAGE_MODEL_PREFIXES = (
    ("language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
)


class Gemma3TextOfMultimodal(Gemma3ForCausalLM):
    """The language model of a multimodal ``Gemma3ForConditionalGeneration`` checkpoint (Gemma 3 4B-27B as
    published), served as text only: the loader hands over its ``text_config`` (``hf_files.language_model_config``)
    and this class its language-model tensors; the vision tower and projector are not loaded."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], strict: bool = True) -> set[str]:
        """The language model's tensors under their text-only names, loaded as Gemma 3's."""
        return super().load_weights(_language_model_weights(weights), strict)


def _language_model_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        for prefix, replacement in _LANGUAGE_MODEL_PREFIXES:
            if name.startswith(prefix):
                yield replacement + name.removeprefix(prefix), tensor
                break
