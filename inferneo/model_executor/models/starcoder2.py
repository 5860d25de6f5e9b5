"""StarCoder2: the Llama decoder's attention and layer with GPT-style norms and MLP.

What differs from Llama, as in Hugging Face's ``Starcoder2ForCausalLM``:

- layer norms with a weight and a bias (``norm_epsilon``) in place of RMSNorm;
- an MLP that is not gated: ``c_proj(gelu(c_fc(x)))`` (``hidden_act``, GELU with the tanh approximation in the
  published checkpoints);
- bias on every projection (``use_bias``); a sliding window on every layer when ``sliding_window`` is set;
  embeddings tied to the LM head unless the config says otherwise.

Tensor parallelism shards Llama's gated MLP, not this one, so it is refused for now.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from inferneo.attention import AttentionBackend
from inferneo.model_executor.layers.basic import LayerNorm
from inferneo.model_executor.models.llama import DecoderConfig, DecoderLayer, LlamaForCausalLM

# Hugging Face ``hidden_act`` -> ``torch.nn.functional.gelu``'s ``approximate``
_GELU_APPROXIMATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}


@dataclass(slots=True)
class Starcoder2Config(DecoderConfig):
    """A :class:`DecoderConfig` with the MLP's GELU approximation (``rms_norm_eps`` holds ``norm_epsilon``)."""

    gelu_approximate: str = "tanh"


class GeluMLP(nn.Module):
    """The two-layer MLP ``c_proj(gelu(c_fc(x)))`` (with biases when the config has them)."""

    def __init__(self, config: DecoderConfig, approximate: str) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.approximate = approximate

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class Starcoder2ForCausalLM(LlamaForCausalLM):
    """StarCoder2: Llama's attention with biased projections, layer norms and a plain GELU MLP."""

    fuses_peer_norms = False  # the peer-fused kernel computes an RMSNorm
    supports_tensor_parallel = False  # shard_model splits a gated MLP's gate/up projection, not c_fc

    @classmethod
    def config_from_hf(cls, cfg: dict) -> Starcoder2Config:
        """StarCoder2's config; ValueError for an activation other than GELU."""
        activation = cfg.get("hidden_act") or "gelu_pytorch_tanh"
        if activation not in _GELU_APPROXIMATIONS:
            raise ValueError(f"Starcoder2ForCausalLM with hidden_act {activation!r} is not supported; supported: "
                             f"{', '.join(_GELU_APPROXIMATIONS)}")
        bias = bool(cfg.get("use_bias", True))
        return Starcoder2Config.from_hf(cfg, silu_mlp=False, qkv_bias=bias, o_bias=bias, mlp_bias=bias,
                                        rms_norm_eps=float(cfg.get("norm_epsilon", 1e-5)),
                                        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                                        gelu_approximate=_GELU_APPROXIMATIONS[activation])

    def __init__(self, config: Starcoder2Config, backend: AttentionBackend, max_position: int | None = None) -> None:
        super().__init__(config, backend, max_position)
        self.norm = LayerNorm(config.hidden_size, config.rms_norm_eps)

    def build_mlp(self, config: Starcoder2Config, layer_index: int) -> nn.Module:
        return GeluMLP(config, config.gelu_approximate)

    def build_layer(self, config: Starcoder2Config, backend: AttentionBackend, max_position: int,
                    layer_index: int) -> nn.Module:
        layer = DecoderLayer(config, backend, max_position, self.build_mlp(config, layer_index),
                             layer_index=layer_index)
        layer.input_layernorm = LayerNorm(config.hidden_size, config.rms_norm_eps)
        layer.post_attention_layernorm = LayerNorm(config.hidden_size, config.rms_norm_eps)
        return layer
