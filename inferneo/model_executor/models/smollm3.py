"""SmolLM3: the Llama decoder with rotary positions left out of some layers (NoPE).

``no_rope_layers`` lists one flag per layer (1: rotary positions, 0: none); transformers' default drops them on
every ``no_rope_layer_interval``-th layer (4). With ``use_sliding_window`` the NoPE layers slide (``layer_types``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from inferneo.attention import AttentionBackend, AttentionMetadata
from inferneo.model_executor.models.llama import Attention, DecoderConfig, DecoderLayer, LlamaForCausalLM


@dataclass(slots=True)
class SmolLM3Config(DecoderConfig):
    """A :class:`DecoderConfig` with which layers rotate q and k (None: all of them)."""

    rope_layers: tuple[bool, ...] | None = None

    def uses_rope(self, layer_index: int) -> bool:
        """Whether layer ``layer_index`` applies rotary positions."""
        return self.rope_layers is None or self.rope_layers[layer_index]


class NoPEAttention(Attention):
    """Attention without rotary positions: queries and keys go to the backend as projected."""

    def attend_qkv(self, positions, qkv, kv_cache, metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.split_heads(qkv)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # contiguous, as the rotary embedding leaves them on the other layers (the backends' kernels expect it)
        return self.attend_heads(q.contiguous(), k.contiguous(), v, kv_cache, metadata).reshape(-1, self.q_size)


def _rope_layers(cfg: dict) -> tuple[bool, ...]:
    num_layers = cfg["num_hidden_layers"]
    flags = cfg.get("no_rope_layers")
    if flags is None:
        interval = int(cfg.get("no_rope_layer_interval", 4))
        return tuple((i + 1) % interval != 0 for i in range(num_layers))
    if len(flags) < num_layers:
        raise ValueError(f"no_rope_layers has {len(flags)} entries for {num_layers} layers")
    return tuple(bool(flag) for flag in flags[:num_layers])


class SmolLM3ForCausalLM(LlamaForCausalLM):
    """SmolLM3: Llama's layers, NoPE attention on the layers ``no_rope_layers`` marks 0."""

    @classmethod
    def config_from_hf(cls, cfg: dict) -> SmolLM3Config:
        rope_layers = _rope_layers(cfg)
        window: dict = dict(sliding_window=None, layer_types=None)
        if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
            layer_types = cfg.get("layer_types") or [
                "full_attention" if rope else "sliding_attention" for rope in rope_layers]
            window = dict(sliding_window=cfg["sliding_window"], layer_types=layer_types)
        return SmolLM3Config.from_hf(cfg, rope_layers=rope_layers,
                                     tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)), **window)

    def build_layer(self, config: SmolLM3Config, backend: AttentionBackend, max_position: int,
                    layer_index: int) -> nn.Module:
        layer = DecoderLayer(config, backend, max_position, self.build_mlp(config, layer_index),
                             layer_index=layer_index)
        if not config.uses_rope(layer_index):
            layer.self_attn = NoPEAttention(config, backend, max_position,
                                            sliding_window=config.sliding_window_for(layer_index))
        return layer
