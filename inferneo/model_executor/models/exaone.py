"""EXAONE 4.0 (``Exaone4ForCausalLM``): OLMo 2's post-norm layers with per-head q/k norms and NoPE global layers.

What differs from Llama, as in Hugging Face's model:

- norms after the attention and the MLP, none before (``PostNormDecoderLayer``, OLMo 2's layout);
- per-head q/k RMSNorm before the rotary embedding (as Qwen3);
- with a ``sliding_window``, sliding-window layers (``layer_types``, or ``sliding_window_pattern``: every n-th layer
  global, or a string such as ``"LLLG"``) rotate and the global layers use no positional embedding at all; without
  one every layer is global and rotates.
"""

from __future__ import annotations

from torch import nn

from inferneo.attention import AttentionBackend
from inferneo.model_executor.models.llama import MLP, Attention, DecoderConfig, LlamaForCausalLM
from inferneo.model_executor.models.olmo import PostNormDecoderLayer
from inferneo.model_executor.models.smollm3 import NoPEAttention


def _layer_types(cfg: dict) -> tuple[str, ...] | None:
    """The layer types as transformers' Exaone4Config derives them; None without a sliding window."""
    if not cfg.get("sliding_window"):
        return None
    if cfg.get("layer_types"):
        return tuple(cfg["layer_types"])
    pattern = cfg.get("sliding_window_pattern", 4)
    num_layers = cfg["num_hidden_layers"]
    if isinstance(pattern, str):
        return tuple("sliding_attention" if pattern[i % len(pattern)] == "L" else "full_attention"
                     for i in range(num_layers))
    return tuple("sliding_attention" if (i + 1) % int(pattern) else "full_attention" for i in range(num_layers))


class Exaone4ForCausalLM(LlamaForCausalLM):
    """EXAONE 4.0: post-norm layers, per-head q/k norms, rotary positions on sliding layers only (when any)."""

    fuses_peer_norms = False  # the post norms read the row-parallel outputs before any residual is added

    @classmethod
    def config_from_hf(cls, cfg: dict) -> DecoderConfig:
        layer_types = _layer_types(cfg)
        return DecoderConfig.from_hf(cfg, qk_norm=True, layer_types=layer_types,
                                     sliding_window=cfg.get("sliding_window") if layer_types else None)

    def build_layer(self, config: DecoderConfig, backend: AttentionBackend, max_position: int,
                    layer_index: int) -> nn.Module:
        window = config.sliding_window_for(layer_index)
        if config.sliding_window is None or window is not None:
            attention = Attention(config, backend, max_position, sliding_window=window)
        else:  # a global layer of a model with sliding layers: no positions
            attention = NoPEAttention(config, backend, max_position)
        return PostNormDecoderLayer(attention, MLP(config), config)
