"""gpt-oss (``GptOssForCausalLM``): the Llama decoder with attention sinks, alternating sliding-window and full
attention layers, and a mixture-of-experts block with biases and a clamped SwiGLU.

What differs from Llama, layer by layer:

- attention: q/k/v/o projections with biases; a learned sink logit per query head (``self_attn.sinks``) joins each
  softmax; the layers ``layer_types`` marks ``sliding_attention`` (the even ones in the released models) see the
  last ``sliding_window`` (128) tokens, the others the whole context; yarn rope scaling;
- feed-forward: every layer is a :class:`~inferneo.model_executor.layers.moe.FusedMoE` whose router linear has a
  bias, routes to the ``top_k`` largest logits with a softmax over just those, and whose experts have biases and
  the ``swigluoai`` activation (``(clamp(up, -7, 7) + 1) * g * sigmoid(1.702 * g)``, ``g = clamp(gate, max=7)``).

Checkpoint layout (Hugging Face's names). The router is ``mlp.router`` (the engine's ``mlp.gate``). Experts are
stacked per layer: ``mlp.experts.gate_up_proj`` ``[E, H, 2I]`` with gate and up *interleaved* along the last
dimension (gate at even columns, up at odd ones; the same for ``gate_up_proj_bias`` ``[E, 2I]``) and
``mlp.experts.down_proj`` ``[E, I, H]``, i.e. transposed relative to a linear's weight. The released checkpoints
store those two as MXFP4 (``..._blocks`` / ``..._scales``, ``[E, 2I, H]`` and ``[E, H, I]`` before packing);
they are de-quantized at load into the model dtype. Either way the load turns them into the engine's layout:
``gate_up_proj`` ``[E, 2I, H]`` with the gate rows first, then the up rows, and ``down_proj`` ``[E, H, I]``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from inferneo.model_executor.layers.moe import SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT, MoeConfig
from inferneo.model_executor.models.llama import DecoderConfig, _copy, _lookup
from inferneo.model_executor.models.moe import MoeForCausalLM
from inferneo.model_executor.mxfp4 import Mxfp4Weight, pair_mxfp4_weights

SUPPORTED_QUANTIZATION = ("mxfp4",)
# Hugging Face's GptOssConfig defaults, for config.json files that leave a value out.
_DEFAULT_SLIDING_WINDOW = 128
_DEFAULT_ROPE_THETA = 150000.0
_DEFAULT_ROPE_SCALING = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": False, "original_max_position_embeddings": 4096}

_EXPERTS = ".mlp.experts."
_ROUTER, _GATE = ".mlp.router.", ".mlp.gate."


def _check_supported(cfg: dict) -> None:
    quantization = cfg.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method")
        if method not in SUPPORTED_QUANTIZATION:
            raise ValueError(f"gpt-oss quantization_config quant_method {method!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_QUANTIZATION)} (de-quantized at load) or none")
    for key, supported in (("swiglu_limit", SWIGLU_OAI_LIMIT), ("swiglu_alpha", SWIGLU_OAI_ALPHA)):
        if float(cfg.get(key, supported)) != supported:
            raise ValueError(f"gpt-oss {key}={cfg[key]} is not supported; supported: {supported}")


def _layer_types(cfg: dict) -> tuple[str, ...]:
    """``layer_types`` from the config, else Hugging Face's default: sliding on even layers, full on odd ones."""
    types = cfg.get("layer_types")
    if types:
        return tuple(types)
    return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg["num_hidden_layers"]))


class GptOssForCausalLM(MoeForCausalLM):
    """gpt-oss over flat token batches and a paged KV cache; see the module docstring for its layout."""

    @classmethod
    def config_from_hf(cls, cfg: dict) -> DecoderConfig:
        """The decoder config; ValueError for a quantization other than MXFP4 or a SwiGLU other than gpt-oss's."""
        _check_supported(cfg)
        top_k = cfg.get("num_experts_per_tok") or cfg["experts_per_token"]  # the latter: OpenAI's own key
        moe = MoeConfig(num_experts=cfg["num_local_experts"], top_k=top_k,
                        intermediate_size=cfg["intermediate_size"], routing="topk_softmax", activation="swigluoai",
                        expert_bias=True, router_bias=True)
        overrides = {}
        if not cfg.get("rope_scaling") and not isinstance(cfg.get("rope_parameters"), dict):
            # As GptOssConfig: no rope values (or ``rope_scaling: null``) means gpt-oss's yarn.
            overrides["rope_scaling"] = dict(_DEFAULT_ROPE_SCALING)
        if cfg.get("rope_theta") is None and (cfg.get("rope_parameters") or {}).get("rope_theta") is None:
            overrides["rope_theta"] = _DEFAULT_ROPE_THETA
        bias = bool(cfg.get("attention_bias", True))
        # gpt-oss's experts compute its clamped SwiGLU; Hugging Face ignores hidden_act, and so does this model
        return DecoderConfig.from_hf(cfg, silu_mlp=False, qkv_bias=bias, o_bias=bias, mlp_bias=False, moe=moe,
                                     sliding_window=cfg.get("sliding_window", _DEFAULT_SLIDING_WINDOW),
                                     layer_types=_layer_types(cfg), **overrides)

    def __init__(self, config: DecoderConfig, backend, max_position: int | None = None) -> None:
        super().__init__(config, backend, max_position)
        for layer in self.layers:  # one learned sink logit per query head, loaded from ``self_attn.sinks``
            layer.self_attn.sinks = nn.Parameter(torch.zeros(config.num_heads))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], strict: bool = True) -> set[str]:
        """As the Llama loader, with MXFP4 blocks/scales pairs de-quantized and the experts re-laid out."""
        return super().load_weights(pair_mxfp4_weights(weights), strict)

    def load_special_weight(self, params: dict[str, nn.Parameter], name: str,
                            tensor: torch.Tensor | Mxfp4Weight) -> set[str]:
        """The router under the engine's name, and the stacked experts converted to the engine's layout."""
        if _ROUTER in name:
            target = name.replace(_ROUTER, _GATE)
            _copy(_lookup(params, target, name).data, tensor, name)
            return {target}
        if _EXPERTS not in name:
            if isinstance(tensor, Mxfp4Weight):
                raise ValueError(f"checkpoint weight {name!r} is MXFP4; only gpt-oss expert weights may be")
            return set()
        param = _lookup(params, name, name)
        converted = _engine_expert_layout(name.rpartition(".")[2], tensor, param)
        # A tensor-parallel shard takes its slice: stacked projections through their ``expert_loader`` (all
        # experts at once), biases through their ``weight_loader``.
        expert_loader, loader = getattr(param, "expert_loader", None), getattr(param, "weight_loader", None)
        if expert_loader is not None:
            expert_loader(param, converted, None, None)
        elif loader is not None:
            loader(param, converted, None)
        else:
            _copy(param.data, converted, name)
        return set(self.expected_weight_keys(name, param))


def _engine_expert_layout(kind: str, tensor: torch.Tensor | Mxfp4Weight, param: nn.Parameter) -> torch.Tensor:
    """A checkpoint expert tensor (``kind``: ``gate_up_proj``, ``down_proj`` or their ``_bias``) in the engine's
    layout: projections ``[E, out, in]``, gate rows (or bias entries) before the up ones."""
    if isinstance(tensor, Mxfp4Weight):
        if kind not in ("gate_up_proj", "down_proj"):
            raise ValueError(f"gpt-oss expert tensor {kind!r} cannot be MXFP4")
        weight = tensor.dequantize(torch.float32, param.device)  # stored [E, out, in] already
    elif kind in ("gate_up_proj", "down_proj"):
        weight = tensor.to(param.device).transpose(1, 2)  # Hugging Face keeps [E, in, out]
    else:
        weight = tensor.to(param.device)
    if kind.startswith("gate_up_proj"):  # interleaved gate/up -> gate rows, then up rows
        weight = torch.cat((weight[:, 0::2], weight[:, 1::2]), dim=1)
    return weight
