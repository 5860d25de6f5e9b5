"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE and Qwen3-MoE.

Each is the Llama decoder (attention as in ``llama.py`` / ``qwen.py``) whose feed-forward block is a
:class:`~inferneo.model_executor.layers.moe.FusedMoE` in its sparse layers. Checkpoints name every expert's
projections apart (``block_sparse_moe.experts.{e}.w1/w2/w3`` in Mixtral, ``mlp.experts.{e}.gate_proj/up_proj/
down_proj`` in Qwen-MoE); they load into the stacked ``experts.gate_up_proj`` ``[E, 2*I, H]`` and
``experts.down_proj`` ``[E, H, I]`` (or, for experts a GGUF file keeps in ggml blocks, their uint8 rows of blocks from
``experts.{e}.<projection>.qweight``). Checkpoints that already hold the stacked tensors load as they are. Under tensor
parallelism the stacked parameters carry an ``expert_loader`` that takes this rank's slice
(``tensor_parallel.shard_experts``).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from inferneo.model_executor.layers.moe import FusedMoE, MoeConfig
from inferneo.model_executor.layers.moe_routing import make_router
from inferneo.model_executor.models.llama import MLP, DecoderConfig, LlamaForCausalLM, _copy, _lookup
from inferneo.model_executor.models.qwen import qwen_window

# layers.{l}.mlp.experts.{e}.{projection}.weight, after ``block_sparse_moe.`` became ``mlp.``; ``.qweight``: the
# expert's rows of ggml blocks, for experts a GGUF file keeps in blocks (``quantization/gguf_experts.py``)
_EXPERT_WEIGHT = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.(weight|qweight)$")
# projection -> (stacked parameter, row block: 0 gate / 1 up of gate_up_proj, None for down_proj)
_EXPERT_SLOTS = {
    "w1": ("gate_up_proj", 0), "gate_proj": ("gate_up_proj", 0),
    "w3": ("gate_up_proj", 1), "up_proj": ("gate_up_proj", 1),
    "w2": ("down_proj", None), "down_proj": ("down_proj", None),
}


def _moe_config(cfg: dict, num_experts: int, intermediate_size: int, renormalize: bool,
                shared_expert_intermediate_size: int = 0) -> MoeConfig:
    return MoeConfig(
        num_experts=num_experts, top_k=cfg["num_experts_per_tok"], intermediate_size=intermediate_size,
        routing="softmax_topk_renormalized" if renormalize else "softmax_topk",
        shared_expert_intermediate_size=shared_expert_intermediate_size,
        sparse_step=cfg.get("decoder_sparse_step") or 1, mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()),
    )


class MoeForCausalLM(LlamaForCausalLM):
    """The Llama decoder with :class:`FusedMoE` blocks in the layers ``config.moe`` marks sparse."""

    def build_mlp(self, config: DecoderConfig, layer_index: int) -> nn.Module:
        moe = config.moe
        if moe is None or not moe.is_sparse(layer_index):
            return MLP(config)
        shared = moe.shared_expert_intermediate_size
        return FusedMoE(config.hidden_size, moe.intermediate_size, moe.num_experts, moe.top_k,
                        make_router(moe.routing, moe.top_k), activation=moe.activation, bias=moe.expert_bias,
                        router_bias=moe.router_bias, shared_expert=MLP(config, shared) if shared else None,
                        shared_expert_gate=bool(shared))

    def load_special_weight(self, params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor) -> set[str]:
        """Per-expert projections into their slice of the stacked tensors; stacked tensors whole."""
        renamed = name.replace(".block_sparse_moe.", ".mlp.")
        was_renamed, name = renamed != name, renamed
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")) and name in params:
            param = params[name]
            loader = getattr(param, "expert_loader", None)  # a tensor-parallel shard takes its slice
            if loader is not None:
                loader(param, tensor, None, None)
            else:
                _copy(param.data, tensor, name)
            return set(self.expected_weight_keys(name, param))
        match = _EXPERT_WEIGHT.match(name)
        if match is None:
            if was_renamed and name in params:  # Mixtral's router under its renamed prefix
                _copy(params[name].data, tensor, name)
                return {name}
            return set()
        prefix, expert, projection, leaf = match.group(1), int(match.group(2)), match.group(3), match.group(4)
        if projection not in _EXPERT_SLOTS:
            raise ValueError(f"checkpoint weight {name!r} does not belong to this model")
        stacked, block = _EXPERT_SLOTS[projection]
        target = f"{prefix}.{stacked}"
        param = _lookup(params, target, name)
        if (leaf == "qweight") != (param.dtype == torch.uint8):
            held = "ggml blocks" if param.dtype == torch.uint8 else f"{param.dtype}"
            raise ValueError(f"checkpoint weight {name!r} is {tensor.dtype}; the model holds these experts as {held}")
        if not 0 <= expert < param.shape[0]:
            raise ValueError(f"checkpoint weight {name!r} names expert {expert}; the config has {param.shape[0]}")
        loader = getattr(param, "expert_loader", None)
        if loader is not None:
            loader(param, tensor, expert, block)
        else:
            dest = param.data[expert]
            if block is not None:
                rows = dest.shape[0] // 2
                dest = dest.narrow(0, block * rows, rows)
            _copy(dest, tensor, name)
        return {f"{target}#{expert}" + ("" if block is None else f".{block}")}

    def expected_weight_keys(self, pname: str, param: torch.Tensor) -> list[str]:
        """One key per expert (and per gate/up half) for the stacked expert tensors."""
        if pname.endswith(".experts.gate_up_proj"):
            return [f"{pname}#{e}.{b}" for e in range(param.shape[0]) for b in (0, 1)]
        if pname.endswith(".experts.down_proj"):
            return [f"{pname}#{e}" for e in range(param.shape[0])]
        return super().expected_weight_keys(pname, param)


class MixtralForCausalLM(MoeForCausalLM):
    """Mixtral: every layer sparse, top-k weights renormalised, no shared expert."""

    @classmethod
    def config_from_hf(cls, cfg: dict) -> DecoderConfig:
        moe = _moe_config(cfg, cfg["num_local_experts"], cfg["intermediate_size"], renormalize=True)
        return DecoderConfig.from_hf(cfg, moe=moe)


def _qwen_moe(cfg: dict, shared: int) -> MoeConfig:
    experts = cfg.get("num_experts") or cfg["num_local_experts"]
    return _moe_config(cfg, experts, cfg["moe_intermediate_size"], bool(cfg.get("norm_topk_prob", False)), shared)


def _moe_window_layers(cfg: dict):
    """Qwen2-MoE (Hugging Face's rule): the even layers below ``max_window_layers`` use the window."""
    below = cfg.get("max_window_layers", 28)
    return lambda i: i % 2 == 0 and i < below


class Qwen2MoeForCausalLM(MoeForCausalLM):
    """Qwen2-MoE: bias on q/k/v, a shared expert with a sigmoid gate, ``norm_topk_prob`` from the config."""

    @classmethod
    def config_from_hf(cls, cfg: dict) -> DecoderConfig:
        moe = _qwen_moe(cfg, cfg.get("shared_expert_intermediate_size") or 0)
        # q/k/v biases unless the config says otherwise (transformers 5 reads qkv_bias, default true)
        return DecoderConfig.from_hf(cfg, qkv_bias=bool(cfg.get("qkv_bias", True)), o_bias=False, moe=moe,
                                     **qwen_window(cfg, _moe_window_layers(cfg)))


class Qwen3MoeForCausalLM(MoeForCausalLM):
    """Qwen3-MoE: per-head q/k RMSNorm, no shared expert, ``norm_topk_prob`` from the config."""

    @classmethod
    def config_from_hf(cls, cfg: dict) -> DecoderConfig:
        return DecoderConfig.from_hf(cfg, qk_norm=True, moe=_qwen_moe(cfg, 0), **qwen_window(cfg, None))
