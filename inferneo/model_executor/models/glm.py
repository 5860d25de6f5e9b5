"""GLM-4 (``GlmForCausalLM``, e.g. glm-4-9b) and GLM-4-0414 (``Glm4ForCausalLM``): the Llama decoder's modules with
GLM's rotary embedding and checkpoint layout.

What differs from Llama, as in Hugging Face's GLM models:

- a partial rotary embedding over interleaved pairs: the first ``partial_rotary_factor * head_dim`` dimensions of
  each head rotate (pairs ``2i``, ``2i + 1``), the rest pass through (``InterleavedRotaryEmbedding``);
- bias on q/k/v (``attention_bias``, true by default), none on the output projection;
- the checkpoint stores the MLP's gate and up projections fused (``mlp.gate_up_proj``, rows ``[gate; up]``), split
  into the engine's packed parameter at load as Phi-3's are;
- GLM-4-0414 only: two more norms per layer, on the attention output (``post_self_attn_layernorm``) and on the MLP
  output (``post_mlp_layernorm``) before each joins the residual stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from inferneo.attention import AttentionBackend
from inferneo.model_executor.layers.basic import RMSNorm
from inferneo.model_executor.layers.rotary import InterleavedRotaryEmbedding
from inferneo.model_executor.models.llama import Attention, DecoderConfig, DecoderLayer, LlamaForCausalLM
from inferneo.model_executor.models.phi3 import load_fused_checkpoint_weight

_GLM_PARTIAL_ROTARY = 0.5  # transformers' GlmConfig / Glm4Config default


@dataclass(slots=True)
class GlmConfig(DecoderConfig):
    """A :class:`DecoderConfig` with how many dimensions of each head rotate."""

    rotary_dim: int = 0


def _without_partial_rotary(cfg: dict) -> tuple[dict, float]:
    """``cfg`` without its ``partial_rotary_factor`` (top level or in ``rope_parameters``), and that factor."""
    params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    factor = cfg.get("partial_rotary_factor", params.get("partial_rotary_factor", _GLM_PARTIAL_ROTARY))
    stripped = {k: v for k, v in cfg.items() if k != "partial_rotary_factor"}
    if params:
        stripped["rope_parameters"] = {k: v for k, v in params.items() if k != "partial_rotary_factor"}
    return stripped, float(factor)


class GlmAttention(Attention):
    """Llama's attention with GLM's partial, interleaved rotary embedding."""

    def __init__(self, config: GlmConfig, backend: AttentionBackend, max_position: int, **options) -> None:
        super().__init__(config, backend, max_position, **options)
        self.rotary = InterleavedRotaryEmbedding(config.rotary_dim, max_position, config.rope_theta,
                                                 config.rope_scaling)


class SandwichNormLayer(DecoderLayer):
    """Llama's layer with a norm on the attention output and one on the MLP output, each applied before the output
    joins the residual stream (GLM-4-0414's ``post_self_attn_layernorm`` and ``post_mlp_layernorm``)."""

    def __init__(self, config: DecoderConfig, backend: AttentionBackend, max_position: int, mlp: nn.Module,
                 layer_index: int) -> None:
        super().__init__(config, backend, max_position, mlp, layer_index=layer_index)
        self.post_self_attn_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_mlp_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def feed_forward(self, hidden, residual):
        hidden, residual = super().feed_forward(self.post_self_attn_layernorm(hidden), residual)
        return self.post_mlp_layernorm(hidden), residual


class GlmForCausalLM(LlamaForCausalLM):
    """GLM-4: Llama's layers with the partial interleaved rotary embedding and a fused gate/up checkpoint tensor."""

    layer_class: type[DecoderLayer] = DecoderLayer  # GLM-4-0414's has two more norms

    @classmethod
    def config_from_hf(cls, cfg: dict) -> GlmConfig:
        stripped, factor = _without_partial_rotary(cfg)
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        attention_bias = bool(cfg.get("attention_bias", True))
        return GlmConfig.from_hf(stripped, head_dim=head_dim, qkv_bias=attention_bias, o_bias=False,
                                 rotary_dim=int(head_dim * factor))

    def build_layer(self, config: GlmConfig, backend: AttentionBackend, max_position: int,
                    layer_index: int) -> nn.Module:
        layer = self.layer_class(config, backend, max_position, self.build_mlp(config, layer_index),
                                 layer_index=layer_index)
        layer.self_attn = GlmAttention(config, backend, max_position,
                                       sliding_window=config.sliding_window_for(layer_index))
        return layer

    def load_special_weight(self, params: dict[str, nn.Parameter], name: str,
                            tensor: torch.Tensor) -> set[str]:
        """Split the checkpoint's fused ``gate_up_proj`` into the packed parameter's shards."""
        return load_fused_checkpoint_weight(self, params, name, tensor, ("gate_up_proj",))


class Glm4ForCausalLM(GlmForCausalLM):
    """GLM-4-0414: GLM-4 with the attention and MLP outputs normalized before the residual add."""

    fuses_peer_norms = False  # the extra norms read the row-parallel outputs before any residual is added
    layer_class = SandwichNormLayer
