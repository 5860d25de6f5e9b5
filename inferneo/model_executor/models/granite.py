"""IBM Granite (3.x dense): the Llama decoder with four scalar multipliers read from the config.

- ``embedding_multiplier``: the token embeddings are multiplied by it;
- ``attention_multiplier``: the attention scale, in place of ``head_dim ** -0.5``;
- ``residual_multiplier``: the attention and MLP outputs are multiplied by it before they join the residual stream;
- ``logits_scaling``: the final logits are divided by it.

The layer is Llama's; only the hand-over to the residual add is scaled (:class:`ScaledResidualLayer`), so the native
norms and attention kernels still apply (the fused whole-layer CPU path does not, being Llama's layer exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from inferneo.attention import AttentionBackend
from inferneo.model_executor.models.llama import DecoderConfig, DecoderLayer, LlamaForCausalLM


@dataclass(slots=True)
class GraniteConfig(DecoderConfig):
    """A :class:`DecoderConfig` with Granite's multipliers (1.0: Llama's behaviour)."""

    embedding_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0


class ScaledResidualLayer(DecoderLayer):
    """Llama's layer whose attention and MLP outputs are multiplied by ``residual_multiplier`` before the residual
    add (which happens inside the next norm, as in Llama's layer)."""

    residual_multiplier: float = 1.0

    def feed_forward(self, hidden, residual):
        hidden, residual = super().feed_forward(hidden * self.residual_multiplier, residual)
        return hidden * self.residual_multiplier, residual


class GraniteForCausalLM(LlamaForCausalLM):
    """Granite: Llama with scaled embeddings, attention, residual branches and logits."""

    # The peer-fused all-reduce + residual + norm kernel adds the row-parallel output unscaled.
    fuses_peer_norms = False

    @classmethod
    def config_from_hf(cls, cfg: dict) -> GraniteConfig:
        return GraniteConfig.from_hf(
            cfg, embedding_multiplier=float(cfg.get("embedding_multiplier", 1.0)),
            attention_multiplier=float(cfg.get("attention_multiplier", 1.0)),
            residual_multiplier=float(cfg.get("residual_multiplier", 1.0)),
            logits_scaling=float(cfg.get("logits_scaling", 1.0)))

    def build_layer(self, config: GraniteConfig, backend: AttentionBackend, max_position: int,
                    layer_index: int) -> nn.Module:
        layer = ScaledResidualLayer(config, backend, max_position, self.build_mlp(config, layer_index),
                                    layer_index=layer_index)
        layer.residual_multiplier = config.residual_multiplier
        layer.self_attn.scale = config.attention_multiplier
        return layer

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings times ``embedding_multiplier``."""
        return self.embed_tokens(input_ids) * self.config.embedding_multiplier

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Float32 logits divided by ``logits_scaling``; None on tensor-parallel ranks other than the driver."""
        logits = super().compute_logits(hidden)
        return None if logits is None else logits.div_(self.config.logits_scaling)
