"""ERNIE 4.5 dense (``Ernie4_5ForCausalLM``, e.g. ERNIE-4.5-0.3B): Llama's layers with GLM-style rotary positions.

What differs from Llama, as in Hugging Face's model: the rotary embedding pairs interleaved dimensions (``2i`` and
``2i + 1``) over the whole head (``InterleavedRotaryEmbedding``), ``use_bias`` puts a bias on every projection, and
embeddings are tied to the LM head unless the config says otherwise.
"""

from __future__ import annotations

from torch import nn

from inferneo.attention import AttentionBackend
from inferneo.model_executor.models.cohere import InterleavedRotaryAttention
from inferneo.model_executor.models.llama import DecoderConfig, DecoderLayer, LlamaForCausalLM


class Ernie4_5ForCausalLM(LlamaForCausalLM):
    """ERNIE 4.5 dense: Llama with interleaved rotary positions and optional biases."""

    @classmethod
    def config_from_hf(cls, cfg: dict) -> DecoderConfig:
        bias = bool(cfg.get("use_bias", False))
        return DecoderConfig.from_hf(cfg, qkv_bias=bias, o_bias=bias, mlp_bias=bias,
                                     tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)))

    def build_layer(self, config: DecoderConfig, backend: AttentionBackend, max_position: int,
                    layer_index: int) -> nn.Module:
        layer = DecoderLayer(config, backend, max_position, self.build_mlp(config, layer_index),
                             layer_index=layer_index)
        layer.self_attn = InterleavedRotaryAttention(config, backend, max_position,
                                                     sliding_window=config.sliding_window_for(layer_index))
        return layer
