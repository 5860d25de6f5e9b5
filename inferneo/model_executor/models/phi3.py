"""Phi-3 (dense): the Llama decoder whose checkpoint stores q/k/v and gate/up already fused.

Phi-3 checkpoints name ``self_attn.qkv_proj.weight`` (rows ``[q; k; v]``) and ``mlp.gate_up_proj.weight``
(rows ``[gate; up]``), the same packed layout the engine's Llama parameters use, so each fused tensor is split
into its shards at load (which lets a tensor-parallel shard take its own slice of every part). LongRoPE
(``rope_scaling`` of type ``longrope``, or the older ``su``/``yarn`` names) runs as ``layers/rotary.py`` describes;
partial rotary embeddings are refused for now.
"""

from __future__ import annotations

import torch
from torch import nn

from inferneo.model_executor.layers.rotary import rope_scaling_from_hf, rope_type_of
from inferneo.model_executor.models.llama import DecoderConfig, LlamaForCausalLM, _copy, _lookup

_FUSED_IN_CHECKPOINT = ("qkv_proj", "gate_up_proj")
_LONGROPE_NAMES = ("su", "yarn")  # transformers' Phi3Config reads both as longrope
_PHI3_ORIGINAL_CONTEXT = 4096  # Phi3Config's original_max_position_embeddings when a config leaves it out


def _phi3_rope_scaling(cfg: dict) -> dict | None:
    """Phi-3's rope scaling as transformers' Phi3Config reads it: ``su`` and ``yarn`` mean LongRoPE, and its
    top-level ``original_max_position_embeddings`` (4096 when absent) wins. Partial rotary embeddings are refused
    (``DecoderConfig.from_hf``)."""
    params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    scaling = cfg.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    if rope_type_of(scaling) in _LONGROPE_NAMES:
        scaling = {**scaling, "rope_type": "longrope"}
    original = cfg.get("original_max_position_embeddings") or _PHI3_ORIGINAL_CONTEXT
    return rope_scaling_from_hf({**cfg, "rope_scaling": scaling or None, "original_max_position_embeddings": original})


class Phi3ForCausalLM(LlamaForCausalLM):
    """Dense Phi-3: Llama layers, fused checkpoint tensors split into the engine's packed parameters."""

    @classmethod
    def config_from_hf(cls, cfg: dict) -> DecoderConfig:
        """The decoder config (LongRoPE as transformers' Phi3Config reads it); ValueError for partial rotary
        embeddings."""
        return DecoderConfig.from_hf(cfg, qkv_bias=False, o_bias=False, mlp_bias=False,
                                     rope_scaling=_phi3_rope_scaling(cfg))

    def load_special_weight(self, params: dict[str, nn.Parameter], name: str,
                            tensor: torch.Tensor) -> set[str]:
        """Split a fused ``qkv_proj``/``gate_up_proj`` tensor into the packed parameter's shards."""
        return load_fused_checkpoint_weight(self, params, name, tensor, _FUSED_IN_CHECKPOINT)


def load_fused_checkpoint_weight(model: LlamaForCausalLM, params: dict[str, nn.Parameter], name: str,
                                 tensor: torch.Tensor, fused_names: tuple[str, ...]) -> set[str]:
    """Load checkpoint tensor ``name`` of ``model`` when it is one of ``fused_names`` (``qkv_proj`` rows
    ``[q; k; v]``, ``gate_up_proj`` rows ``[gate; up]``) stored fused, shard by shard, as ``load_special_weight``
    does; returns the load keys (none: not such a tensor). ValueError for a row count the config does not give."""
    fused = next((f for f in fused_names if f".{f}." in name), None)
    if fused is None:
        return set()
    param = _lookup(params, name, name)
    if getattr(param, "quantized", False):  # a format's tensor: its loader takes the fused tensor whole
        param.weight_loader(param, tensor, None)
        return {f"{name}#{index}" for index in range(len(model._shard_sizes(fused, param)))}
    # the full (unsharded) sizes: a tensor-parallel parameter holds only this rank's rows
    sizes = (model._shard_sizes(fused, param) if fused == "qkv_proj"
             else [model.config.intermediate_size] * 2)
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
