"""OLMo and OLMo 2 (AI2): the Llama decoder's modules with norms after the attention and MLP instead of before them.

OLMo (1): Llama's layers with a layer norm that learns no weight or bias (``eps`` 1e-5) in place of every RMSNorm,
and the q/k/v projection outputs clamped to ``[-clip_qkv, clip_qkv]`` when the config sets ``clip_qkv``.

What OLMo 2 changes from Llama, as in Hugging Face's ``Olmo2ForCausalLM``:

- no input norm: each layer adds ``post_attention_layernorm(attention(x))`` and then
  ``post_feedforward_layernorm(mlp(h))`` to the residual stream (the final norm is Llama's);
- q/k norms over the whole query and key projections (``q_norm`` of ``heads * head_dim``, ``k_norm`` of
  ``kv_heads * head_dim``), not per head, before the rotary embedding.

The norms are Llama's RMSNorm (OLMo 2 multiplies by the weight before casting back, the same in float32). A q/k
norm over every head needs all of them on one rank, so tensor parallelism is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from inferneo.attention import AttentionBackend, AttentionMetadata
from inferneo.model_executor.layers.basic import LayerNorm, RMSNorm
from inferneo.model_executor.models.llama import MLP, Attention, DecoderConfig, DecoderLayer, LlamaForCausalLM

_OLMO_NORM_EPS = 1e-5  # Hugging Face's OlmoLayerNorm: fixed, not read from the config


@dataclass(slots=True)
class OlmoConfig(DecoderConfig):
    """A :class:`DecoderConfig` with OLMo's q/k/v clamp (None: none)."""

    clip_qkv: float | None = None


class ClippedQKVAttention(Attention):
    """Attention whose q/k/v projection output is clamped to ``[-clip_qkv, clip_qkv]`` first."""

    clip_qkv: float = float("inf")

    def attend_qkv(self, positions, qkv, kv_cache, metadata: AttentionMetadata) -> torch.Tensor:
        return super().attend_qkv(positions, qkv.clamp(-self.clip_qkv, self.clip_qkv), kv_cache, metadata)


def _non_parametric_norm(hidden_size: int) -> LayerNorm:
    return LayerNorm(hidden_size, _OLMO_NORM_EPS, weight=False, bias=False)


class OlmoForCausalLM(LlamaForCausalLM):
    """OLMo (1): Llama's layers with weightless layer norms and, when configured, clamped q/k/v."""

    fuses_peer_norms = False  # the peer-fused kernel computes an RMSNorm

    @classmethod
    def config_from_hf(cls, cfg: dict) -> OlmoConfig:
        clip = cfg.get("clip_qkv")
        return OlmoConfig.from_hf(cfg, clip_qkv=None if clip is None else float(clip))

    def __init__(self, config: OlmoConfig, backend: AttentionBackend, max_position: int | None = None) -> None:
        super().__init__(config, backend, max_position)
        self.norm = _non_parametric_norm(config.hidden_size)

    def build_layer(self, config: OlmoConfig, backend: AttentionBackend, max_position: int,
                    layer_index: int) -> nn.Module:
        layer = DecoderLayer(config, backend, max_position, self.build_mlp(config, layer_index),
                             layer_index=layer_index)
        if config.clip_qkv is not None:
            layer.self_attn = ClippedQKVAttention(config, backend, max_position,
                                                  sliding_window=config.sliding_window_for(layer_index))
            layer.self_attn.clip_qkv = config.clip_qkv
        layer.input_layernorm = _non_parametric_norm(config.hidden_size)
        layer.post_attention_layernorm = _non_parametric_norm(config.hidden_size)
        return layer


class WholeProjectionQKNormAttention(Attention):
    """Attention whose q/k norms run over the whole query and key projections (all heads together), before the
    rotary embedding."""

    def __init__(self, config: DecoderConfig, backend: AttentionBackend, max_position: int) -> None:
        super().__init__(config, backend, max_position)
        self.q_norm = RMSNorm(self.q_size, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.kv_size, config.rms_norm_eps)

    def attend_qkv(self, positions, qkv, kv_cache, metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # contiguous inputs: the device's norm kernels (Triton on CUDA) read rows densely
        q = self.q_norm(q.contiguous()).view(-1, self.num_heads, self.head_dim)
        k = self.k_norm(k.contiguous()).view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        return self.attend_heads(q, k, v.view(-1, self.num_kv_heads, self.head_dim), kv_cache,
                                 metadata).reshape(-1, self.q_size)


class PostNormDecoderLayer(nn.Module):
    """One layer with its norms after the attention and the MLP (OLMo 2, EXAONE 4): ``h = x + norm(attention(x))``,
    then ``h + norm(mlp(h))``. Like Llama's layer it hands ``(mlp output, residual)`` on; the next layer (or the
    final norm) adds them."""

    def __init__(self, attention: Attention, mlp: nn.Module, config: DecoderConfig) -> None:
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, kv_cache, metadata: AttentionMetadata):
        if residual is not None:
            hidden = residual + hidden
        hidden = hidden + self.post_attention_layernorm(self.self_attn(positions, hidden, kv_cache, metadata))
        return self.post_feedforward_layernorm(self.mlp(hidden)), hidden


class Olmo2ForCausalLM(LlamaForCausalLM):
    """OLMo 2: Llama's model and loading with OLMo 2's post-norm layers and whole-projection q/k norms."""

    fuses_peer_norms = False
    # q_norm / k_norm normalize over all heads at once, which a rank holding some heads cannot compute alone
    supports_tensor_parallel = False

    @classmethod
    def config_from_hf(cls, cfg: dict) -> DecoderConfig:
        return DecoderConfig.from_hf(cfg)

    def build_layer(self, config: DecoderConfig, backend: AttentionBackend, max_position: int,
                    layer_index: int) -> nn.Module:
        return PostNormDecoderLayer(WholeProjectionQKNormAttention(config, backend, max_position), MLP(config), config)
