"""Phi-3 (dense): the Llama decoder whose checkpoint stores q/k/v and gate/up already fused.

Phi-3 checkpoints name ``self_attn.qkv_proj.weight`` (rows ``[q; k; v]``) and ``mlp.gate_up_proj.weight``
(rows ``[gate; up]``), the same packed layout the engine's Llama parameters use, so each fused tensor is split
into its shards at load (which lets a tensor-parallel shard take its own slice of every part). LongRoPE
(``rope_scaling`` of type ``longrope``/``su``) and partial rotary embeddings are refused for now.
"""

from __future__ import annotations

import torch
from torch import nn

from inferneo.model_executor.models.llama import DecoderConfig, LlamaForCausalLM, _copy, _lookup

_UNSUPPORTED_ROPE = ("longrope", "su")
_FUSED_IN_CHECKPOINT = ("qkv_proj", "gate_up_proj")


def _check_rope(cfg: dict) -> None:
    for scaling in (cfg.get("rope_scaling"), cfg.get("rope_parameters")):
        if not isinstance(scaling, dict):
            continue
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type in _UNSUPPORTED_ROPE:
            raise ValueError(f"Phi-3 rope_scaling type {rope_type!r} (LongRoPE) is not supported yet; "
                             "use a Phi-3 checkpoint with plain rope (no rope_scaling), e.g. a 4k one")
        if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("Phi-3 with partial_rotary_factor != 1.0 is not supported")
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("Phi-3 with partial_rotary_factor != 1.0 is not supported")


class Phi3ForCausalLM(LlamaForCausalLM):
    """Dense Phi-3: Llama layers, fused checkpoint tensors split into the engine's packed parameters."""

    @classmethod
    def config_from_hf(cls, cfg: dict) -> DecoderConfig:
        """The decoder config; ValueError for LongRoPE or partial rotary embeddings."""
        _check_rope(cfg)
        return DecoderConfig.from_hf(cfg, qkv_bias=False, o_bias=False, mlp_bias=False)

    def load_special_weight(self, params: dict[str, nn.Parameter], name: str,
                            tensor: torch.Tensor) -> set[str]:
        """Split a fused ``qkv_proj``/``gate_up_proj`` tensor into the packed parameter's shards."""
        fused = next((f for f in _FUSED_IN_CHECKPOINT if f".{f}." in name), None)
        if fused is None:
            return set()
        param = _lookup(params, name, name)
        sizes = self._shard_sizes(fused, param)
        if tensor.shape[0] != sum(sizes):
            raise ValueError(f"weight {name!r} has {tensor.shape[0]} rows, the config expects {sum(sizes)}")
        loader = getattr(param, "weight_loader", None)
        loaded = set()
        offset = 0
        for index, size in enumerate(sizes):
            shard = tensor.narrow(0, offset, size)
            if loader is not None:
                loader(param, shard, index)
            else:
                _copy(param.data.narrow(0, offset, size), shard, name)
            loaded.add(f"{name}#{index}")
            offset += size
        return loaded
