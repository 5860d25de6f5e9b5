"""GGUF models: an HF-style config from the metadata, and the weights under Hugging Face names."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inferneo.model_loader.gguf_file import GGUFHeader, iter_gguf_tensors, read_gguf_header

logger = logging.getLogger(__name__)

# general.architecture -> (HF architecture, model_type); "llama" with experts is Mixtral (see ``_hf_architecture``)
GGUF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
}
_MIXTRAL = ("MixtralForCausalLM", "mixtral")
# llama.cpp's converter interleaves the rotary halves of q/k for these architectures
_PERMUTED_ARCHITECTURES = {"llama"}
_SKIPPED_TENSORS = {"rope_freqs.weight"}  # folded into config["rope_scaling"]
# Whether the top-k router weights are renormalised, when the file has no expert_weights_norm key: llama.cpp's
# default for each architecture (Mixtral and Qwen3-MoE renormalise, Qwen2-MoE does not).
_DEFAULT_EXPERT_WEIGHTS_NORM = {"llama": True, "qwen2moe": False, "qwen3moe": True}

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_ROUTER = "ffn_gate_inp"
# The stacked expert tensors ``[num_experts, rows, cols]`` and each expert's projection name in the Hugging Face
# checkpoint: Mixtral's (under ``block_sparse_moe``) and Qwen-MoE's (under ``mlp``).
_STACKED_EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
_EXPERT_NAMING = {
    "mixtral": ("block_sparse_moe", dict(zip(_STACKED_EXPERTS, ("w1", "w3", "w2"), strict=True))),
    "qwen": ("mlp", dict(zip(_STACKED_EXPERTS, ("gate_proj", "up_proj", "down_proj"), strict=True))),
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def gguf_hf_name(name: str, moe_block: str = "mlp") -> str:
    """The Hugging Face parameter name for a llama.cpp tensor name (``blk.0.attn_q.weight`` -> ...q_proj.weight).

    ``moe_block`` is where the model keeps its router (``ffn_gate_inp``): ``mlp`` (Qwen-MoE) or
    ``block_sparse_moe`` (Mixtral). Stacked expert tensors have no single name: see :func:`gguf_hf_tensors`."""
    if match := _BLOCK_RE.fullmatch(name):
        layer, part, kind = match.groups()
        if part == _ROUTER:
            return f"model.layers.{layer}.{moe_block}.gate.{kind}"
        if part in _BLOCK_NAMES:
            return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
    else:
        stem, _, kind = name.rpartition(".")
        if stem in _TOP_LEVEL_NAMES and kind in ("weight", "bias"):
            return f"{_TOP_LEVEL_NAMES[stem]}.{kind}"
    raise ValueError(f"GGUF tensor {name!r} has no Hugging Face equivalent known to inferneo")


def gguf_hf_tensors(name: str, tensor: torch.Tensor, expert_naming: str = "qwen"
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """The Hugging Face checkpoint tensors one GGUF tensor holds: a stacked expert tensor
    (``blk.N.ffn_gate_exps.weight`` ``[E, rows, cols]``) becomes one tensor per expert, named as in a Mixtral
    (``expert_naming="mixtral"``) or Qwen-MoE (``"qwen"``) checkpoint; any other tensor keeps its one name."""
    moe_block, projections = _EXPERT_NAMING[expert_naming]
    match = _BLOCK_RE.fullmatch(name)
    if match and match.group(2) in projections:
        layer, part, kind = match.groups()
        if tensor.dim() != 3:
            raise ValueError(f"GGUF tensor {name!r} should be [experts, rows, cols]; got {tuple(tensor.shape)}")
        for expert in range(tensor.shape[0]):
            yield f"model.layers.{layer}.{moe_block}.experts.{expert}.{projections[part]}.{kind}", tensor[expert]
        return
    hf_name = gguf_hf_name(name, moe_block)
    if hf_name.endswith(".shared_expert_gate.weight") and tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)  # [hidden] -> the [1, hidden] linear weight
    yield hf_name, tensor


def _header(path: Path) -> tuple[GGUFHeader, str]:
    header = read_gguf_header(path)
    arch = header.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(sorted(GGUF_ARCHITECTURES))}")
    return header, arch


def _num_experts(header: GGUFHeader, arch: str) -> int:
    return int(header.metadata.get(f"{arch}.expert_count") or 0)


def _hf_architecture(header: GGUFHeader, arch: str) -> tuple[str, str]:
    """(HF architecture, model_type) of the file: Mixtral is arch ``llama`` with experts."""
    if arch == "llama" and _num_experts(header, arch):
        return _MIXTRAL
    return GGUF_ARCHITECTURES[arch]


def gguf_config(path: Path) -> dict[str, Any]:
    """A ``config.json``-style dict (HF keys) built from the GGUF metadata."""
    header, arch = _header(path)
    meta = header.metadata

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{path}: metadata key {arch}.{key} is missing")
        return value

    embed = header.tensor("token_embd.weight")
    if embed is None:
        raise ValueError(f"{path}: the file has no token_embd.weight tensor")
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    rope_theta = float(get("rope.freq_base", 10000.0))
    hf_architecture, model_type = _hf_architecture(header, arch)
    config: dict[str, Any] = {
        "architectures": [hf_architecture],
        "model_type": model_type,
        "vocab_size": embed.shape[0],
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(header, arch, head_dim, rope_theta),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": header.tensor("output.weight") is None,
        "attention_bias": header.tensor("blk.0.attn_q.bias") is not None,
        "torch_dtype": "float32",
    }
    if _num_experts(header, arch):
        config.update(_moe_config(header, arch, model_type))
    for key in ("bos", "eos", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config[f"{key.replace('padding', 'pad')}_token_id"] = int(token_id)
    return config


def _moe_config(header: GGUFHeader, arch: str, model_type: str) -> dict[str, Any]:
    """The mixture-of-experts keys of ``config.json``; the expert widths from the tensors when the metadata
    leaves them out. Every layer is sparse (llama.cpp has no dense layers in these architectures)."""
    meta = header.metadata
    num_experts = _num_experts(header, arch)
    used = meta.get(f"{arch}.expert_used_count")
    if used is None:
        raise ValueError(f"{header.path}: metadata key {arch}.expert_used_count is missing")
    if model_type == "mixtral":
        return {"num_local_experts": num_experts, "num_experts_per_tok": int(used)}

    def width(key: str, tensor: str) -> int:
        if (value := meta.get(f"{arch}.{key}")) is not None:
            return int(value)
        info = header.tensor(tensor)
        return 0 if info is None else int(info.shape[-2])

    norm = meta.get(f"{arch}.expert_weights_norm", _DEFAULT_EXPERT_WEIGHTS_NORM[arch])
    config: dict[str, Any] = {
        "num_experts": num_experts, "num_experts_per_tok": int(used), "norm_topk_prob": bool(norm),
        "moe_intermediate_size": width("expert_feed_forward_length", "blk.0.ffn_gate_exps.weight"),
        "decoder_sparse_step": 1, "mlp_only_layers": [],
    }
    if model_type == "qwen2_moe":
        config["shared_expert_intermediate_size"] = width("expert_shared_feed_forward_length",
                                                          "blk.0.ffn_gate_shexp.weight")
    return config


def gguf_generation_config(path: Path) -> dict[str, Any]:
    """``{"eos_token_id": ...}`` from the metadata: the EOS id, plus end-of-turn ids when the file has them."""
    meta = read_gguf_header(path).metadata
    ids: list[int] = []
    for key in ("eos", "eot", "eom"):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and int(token_id) not in ids:
            ids.append(int(token_id))
    config: dict[str, Any] = {}
    if ids:
        config["eos_token_id"] = ids[0] if len(ids) == 1 else ids
    if (bos := meta.get("tokenizer.ggml.bos_token_id")) is not None:
        config["bos_token_id"] = int(bos)
    return config


def iter_gguf_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor as float32 under its HF checkpoint name, with llama.cpp's q/k rotary permutation undone and
    stacked expert tensors split into one tensor per expert (Mixtral's or Qwen-MoE's names)."""
    header, arch = _header(path)
    meta = header.metadata
    heads = int(meta[f"{arch}.attention.head_count"])
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    expert_naming = "mixtral" if _hf_architecture(header, arch) == _MIXTRAL else "qwen"
    for info, array in iter_gguf_tensors(header):
        if info.name in _SKIPPED_TENSORS:
            continue
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        for name, part in gguf_hf_tensors(info.name, tensor, expert_naming):
            if arch in _PERMUTED_ARCHITECTURES:
                if ".q_proj." in name:
                    part = unpermute_rotary(part, heads)
                elif ".k_proj." in name:
                    part = unpermute_rotary(part, kv_heads)
            yield name, part


def permute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's q/k permutation: per head, rows ``[x0..x(d/2-1), y0..]`` become ``[x0, y0, x1, y1, ...]``."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape).contiguous())


def unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`permute_rotary`: back to the Hugging Face (half-split rotary) row order."""
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot undo the rotary permutation: {rows} rows do not split into {n_heads} heads")
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape).contiguous())


def _rope_scaling(header: GGUFHeader, arch: str, head_dim: int, theta: float) -> dict[str, Any] | None:
    meta = header.metadata
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if kind in ("linear", "yarn") and factor:
        scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    freqs = header.tensor("rope_freqs.weight")
    if freqs is None:
        return None
    raw = np.memmap(header.path, dtype=np.uint8, mode="r", offset=freqs.offset, shape=(freqs.nbytes,))
    if freqs.type_name != "F32":
        raise ValueError(f"{header.path}: rope_freqs.weight is {freqs.type_name}; F32 was expected")
    factors = np.array(raw.view(np.float32), dtype=np.float64)
    return llama3_rope_scaling(factors, head_dim, theta, int(original) if original else None)


def llama3_rope_scaling(factors: np.ndarray, head_dim: int, theta: float, original: int | None) -> dict[str, Any]:
    """Recover Llama 3's ``rope_scaling`` from the per-frequency divisors llama.cpp stores in ``rope_freqs``.

    Between the two wavelength limits, ``smooth = (original / wavelength - low) / (high - low)`` is linear in
    ``1 / wavelength``. Its slope and intercept fix the rotary frequencies; they pin down ``low``, ``high`` and
    ``original`` only up to a common scale, so ``low_freq_factor`` is taken as 1 (as in every Llama 3 release)
    unless the file states the original context length.
    """
    factor = float(factors.max())
    scaling: dict[str, Any] = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": original or 8192}
    inv_wavelen = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim) / (2 * math.pi)
    medium = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    if factor <= 1 or medium.sum() < 2:
        if factor > 1:
            logger.warning("rope_freqs has too few smoothed frequencies; assuming Llama 3.1's rope_scaling")
        return scaling
    smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(inv_wavelen[medium], smooth, 1)  # slope = original/(high-low)
    if original:
        span = original / slope
        low = -intercept * span
    else:
        low, span = 1.0, -1 / intercept
        original = round(slope * span)
    scaling.update(low_freq_factor=round(float(low), 4), high_freq_factor=round(float(low + span), 4),
                   original_max_position_embeddings=int(original))
    return scaling
