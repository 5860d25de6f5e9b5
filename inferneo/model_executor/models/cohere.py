"""Cohere Command-R (``CohereForCausalLM``, ``Cohere2ForCausalLM``): the Llama decoder's modules in a parallel block.

What differs from Llama, as in Hugging Face's Cohere model:

- one norm per layer, a layer norm with a weight and no bias (``layer_norm_eps``); attention and MLP both read its
  output and both add to the residual stream: ``x + attention(norm(x)) + mlp(norm(x))``;
- rotary embeddings over interleaved pairs (``InterleavedRotaryEmbedding``);
- logits multiplied by ``logit_scale``; embeddings tied to the LM head unless the config says otherwise.

Command-R+'s q/k layer norms (``use_qk_norm``) are refused for now. Cohere 2 (Command R7B, Command A) alternates
sliding-window layers, which rotate, with full-attention layers, which have no positional embedding at all (NoPE):
``layer_types``, or without it every ``sliding_window_pattern``-th layer (4) full.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from inferneo.attention import AttentionBackend, AttentionMetadata
from inferneo.model_executor.layers.basic import LayerNorm
from inferneo.model_executor.layers.rotary import InterleavedRotaryEmbedding
from inferneo.model_executor.models.llama import MLP, Attention, DecoderConfig, LlamaForCausalLM
from inferneo.model_executor.models.smollm3 import NoPEAttention


@dataclass(slots=True)
class CohereConfig(DecoderConfig):
    """A :class:`DecoderConfig` with Cohere's logit scale (``rms_norm_eps`` holds its ``layer_norm_eps``)."""

    logit_scale: float = 1.0


class CohereLayerNorm(LayerNorm):
    """Cohere's layer norm: a weight, no bias, the mean and variance computed in float32 as Hugging Face does."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__(hidden_size, eps, bias=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        centered = xf - xf.mean(-1, keepdim=True)
        variance = centered.pow(2).mean(-1, keepdim=True)
        return (self.weight.float() * (centered * torch.rsqrt(variance + self.eps))).to(x.dtype)


class InterleavedRotaryAttention(Attention):
    """Llama's attention with the rotary embedding over interleaved pairs."""

    def __init__(self, config: DecoderConfig, backend: AttentionBackend, max_position: int, **options) -> None:
        super().__init__(config, backend, max_position, **options)
        self.rotary = InterleavedRotaryEmbedding(self.head_dim, max_position, config.rope_theta, config.rope_scaling)


class ParallelBlockLayer(nn.Module):
    """One layer whose attention and MLP read the same normalized input. It hands ``(mlp output, residual +
    attention output)`` on, so the next norm's addition gives ``residual + attention + mlp`` in Hugging Face's
    order."""

    def __init__(self, attention: Attention, mlp: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
        self.input_layernorm = norm

    def forward(self, positions, hidden, residual, kv_cache, metadata: AttentionMetadata):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        attended = self.self_attn(positions, hidden, kv_cache, metadata)
        return self.mlp(hidden), residual + attended


class CohereForCausalLM(LlamaForCausalLM):
    """Command-R: parallel attention and MLP blocks, Cohere's layer norm, interleaved rotary, scaled logits."""

    fuses_peer_norms = False  # the peer-fused kernel computes an RMSNorm after one row-parallel output

    @classmethod
    def config_from_hf(cls, cfg: dict) -> CohereConfig:
        """Command-R's config; ValueError for q/k norms (``use_qk_norm``)."""
        if cfg.get("use_qk_norm"):
            raise ValueError("CohereForCausalLM with use_qk_norm=true is not supported")
        return CohereConfig.from_hf(cfg, rms_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
                                    tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                                    logit_scale=float(cfg.get("logit_scale") or 1.0))

    def __init__(self, config: CohereConfig, backend: AttentionBackend, max_position: int | None = None) -> None:
        super().__init__(config, backend, max_position)
        self.norm = CohereLayerNorm(config.hidden_size, config.rms_norm_eps)

    def build_layer(self, config: CohereConfig, backend: AttentionBackend, max_position: int,
                    layer_index: int) -> nn.Module:
        attention = InterleavedRotaryAttention(config, backend, max_position,
                                               sliding_window=config.sliding_window_for(layer_index))
        return ParallelBlockLayer(attention, MLP(config), CohereLayerNorm(config.hidden_size, config.rms_norm_eps))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Float32 logits times ``logit_scale``; None on tensor-parallel ranks other than the driver."""
        logits = super().compute_logits(hidden)
        return None if logits is None else logits.mul_(self.config.logit_scale)


class Cohere2ForCausalLM(CohereForCausalLM):
    """Cohere 2: Command-R's layers, rotary sliding-window layers and NoPE full-attention layers."""

    @classmethod
    def config_from_hf(cls, cfg: dict) -> CohereConfig:
        """Cohere 2's config (its layer types as transformers' Cohere2Config derives them); ValueError for q/k
        norms."""
        pattern = int(cfg.get("sliding_window_pattern", 4))
        layer_types = cfg.get("layer_types") or [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(cfg["num_hidden_layers"])]
        return dataclasses.replace(super().config_from_hf(cfg), layer_types=tuple(layer_types),
                                   sliding_window=cfg.get("sliding_window", 4096))

    def build_layer(self, config: CohereConfig, backend: AttentionBackend, max_position: int,
                    layer_index: int) -> nn.Module:
        window = config.sliding_window_for(layer_index)
        attention = (InterleavedRotaryAttention(config, backend, max_position, sliding_window=window)
                     if window is not None else NoPEAttention(config, backend, max_position))
        return ParallelBlockLayer(attention, MLP(config), CohereLayerNorm(config.hidden_size, config.rms_norm_eps))
