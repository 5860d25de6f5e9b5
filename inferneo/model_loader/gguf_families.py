"""GGUF files of gpt-oss (llama.cpp architecture ``gpt-oss``) and DeepSeek-V2/V3 (``deepseek2``): their tensor
names, the Hugging Face config their metadata describes, and the tensors llama.cpp's converter lays out unlike the
Hugging Face checkpoint.

gpt-oss. Attention has biases and one learned sink logit per head (``attn_sinks``); the norm before the experts is
``post_attention_norm``; the router ``ffn_gate_inp`` has a bias. The experts are stacked per layer as
``ffn_gate_exps``/``ffn_up_exps`` ``[E, I, H]`` and ``ffn_down_exps`` ``[E, H, I]`` with ``.bias`` tensors (or, with
the converter's ``--fuse-gate-up-exps``, ``ffn_gate_up_exps`` ``[E, 2I, H]``: gate rows, then up rows). llama.cpp
stores the released checkpoints' expert weights as ggml MXFP4; they are de-quantized like any other ggml type (by
``gguf.quants``). The Hugging Face layout they go back to is ``mlp.experts.gate_up_proj`` ``[E, H, 2I]`` with gate
and up interleaved along the last dimension, and ``mlp.experts.down_proj`` ``[E, I, H]``. Every other layer slides
(llama.cpp's fixed period of 2, layer 0 sliding) unless the file lists ``attention.sliding_window_pattern``.

DeepSeek-V2/V3. Multi-head latent attention keeps Hugging Face's projections under llama.cpp's names (``attn_q``
or ``attn_q_a``/``attn_q_a_norm``/``attn_q_b``, ``attn_kv_a_mqa``, ``attn_kv_a_norm``); ``kv_b_proj`` is one
``attn_kv_b`` tensor in older files and, in the files llama.cpp writes today, ``attn_k_b`` (each head's key rows,
transposed: ``[H, kv_lora_rank, qk_nope]``) plus ``attn_v_b`` (``[H, v_head, kv_lora_rank]``), joined back here. The
metadata of today's files describe attention as one shared head (``head_count_kv`` 1, ``key_length`` latent + rope);
the per-head sizes are ``key_length_mla``/``value_length_mla`` (older files: ``key_length``/``value_length``). The
first ``leading_dense_block_count`` layers are dense; the others route over ``expert_count`` experts in
``expert_group_count`` groups of which ``expert_group_used_count`` are searched, with ``expert_shared_count``
shared experts. ``expert_gating_func`` tells the versions apart: sigmoid (with ``exp_probs_b``, Hugging Face's
``e_score_correction_bias``) is DeepSeek-V3, softmax or absent (as in older V2 files) DeepSeek-V2.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, TENSOR_NAMES, ExpertGatingFuncType, Keys

from inferneo.model_loader.gguf_file import GGUFHeader

GPT_OSS = MODEL_ARCH_NAMES[MODEL_ARCH.GPT_OSS]
DEEPSEEK2 = MODEL_ARCH_NAMES[MODEL_ARCH.DEEPSEEK2]
FAMILY_ARCHITECTURES = {
    GPT_OSS: ("GptOssForCausalLM", "gpt_oss"),
    DEEPSEEK2: ("DeepseekV2ForCausalLM", "deepseek_v2"),
}
_DEEPSEEK_V3 = ("DeepseekV3ForCausalLM", "deepseek_v3")
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GPT_OSS_SLIDING_PERIOD = 2  # llama.cpp: layer 0 slides, layer 1 attends to everything, and so on


def _part(tensor: MODEL_TENSOR) -> str:
    """The per-layer part of llama.cpp's name for ``tensor`` (``blk.{bid}.attn_q`` -> ``attn_q``)."""
    return TENSOR_NAMES[tensor].removeprefix("blk.{bid}.")


def _key(key: str, arch: str) -> str:
    return key.format(arch=arch)


# llama.cpp block tensor -> Hugging Face module (the tensor keeps its .weight/.bias)
_COMMON_BLOCK_NAMES = {
    _part(MODEL_TENSOR.ATTN_NORM): "input_layernorm",
    _part(MODEL_TENSOR.ATTN_Q): "self_attn.q_proj",
    _part(MODEL_TENSOR.ATTN_K): "self_attn.k_proj",
    _part(MODEL_TENSOR.ATTN_V): "self_attn.v_proj",
    _part(MODEL_TENSOR.ATTN_OUT): "self_attn.o_proj",
}
GPT_OSS_BLOCK_NAMES = {
    **_COMMON_BLOCK_NAMES,
    _part(MODEL_TENSOR.ATTN_POST_NORM): "post_attention_layernorm",
    _part(MODEL_TENSOR.FFN_GATE_INP): "mlp.router",
}
DEEPSEEK2_BLOCK_NAMES = {
    **_COMMON_BLOCK_NAMES,
    _part(MODEL_TENSOR.FFN_NORM): "post_attention_layernorm",
    _part(MODEL_TENSOR.ATTN_Q_A): "self_attn.q_a_proj",
    _part(MODEL_TENSOR.ATTN_Q_A_NORM): "self_attn.q_a_layernorm",
    _part(MODEL_TENSOR.ATTN_Q_B): "self_attn.q_b_proj",
    _part(MODEL_TENSOR.ATTN_KV_A_MQA): "self_attn.kv_a_proj_with_mqa",
    _part(MODEL_TENSOR.ATTN_KV_A_NORM): "self_attn.kv_a_layernorm",
    _part(MODEL_TENSOR.ATTN_KV_B): "self_attn.kv_b_proj",
    _part(MODEL_TENSOR.FFN_GATE): "mlp.gate_proj",
    _part(MODEL_TENSOR.FFN_UP): "mlp.up_proj",
    _part(MODEL_TENSOR.FFN_DOWN): "mlp.down_proj",
    _part(MODEL_TENSOR.FFN_GATE_INP): "mlp.gate",
    _part(MODEL_TENSOR.FFN_GATE_SHEXP): "mlp.shared_experts.gate_proj",
    _part(MODEL_TENSOR.FFN_UP_SHEXP): "mlp.shared_experts.up_proj",
    _part(MODEL_TENSOR.FFN_DOWN_SHEXP): "mlp.shared_experts.down_proj",
}
_SINKS = _part(MODEL_TENSOR.ATTN_SINKS)
_EXP_PROBS_B = _part(MODEL_TENSOR.FFN_EXP_PROBS_B)
_GATE_EXPS, _UP_EXPS, _DOWN_EXPS, _GATE_UP_EXPS = (
    _part(t) for t in (MODEL_TENSOR.FFN_GATE_EXP, MODEL_TENSOR.FFN_UP_EXP, MODEL_TENSOR.FFN_DOWN_EXP,
                       MODEL_TENSOR.FFN_GATE_UP_EXP))
_ATTN_K_B, _ATTN_V_B, _ATTN_KV_B = (_part(t) for t in (MODEL_TENSOR.ATTN_K_B, MODEL_TENSOR.ATTN_V_B,
                                                        MODEL_TENSOR.ATTN_KV_B))
# DeepSeek's stacked experts, split into Hugging Face's one-tensor-per-expert names
_DEEPSEEK_EXPERTS = {_GATE_EXPS: "gate_proj", _UP_EXPS: "up_proj", _DOWN_EXPS: "down_proj"}


# ---- config ------------------------------------------------------------------------------------------------------


def family_hf_architecture(header: GGUFHeader, arch: str) -> tuple[str, str]:
    """(HF architecture, model_type) of a gpt-oss or deepseek2 file: DeepSeek-V3 where routing is sigmoid."""
    if arch == DEEPSEEK2 and _deepseek_gating(header) == ExpertGatingFuncType.SIGMOID:
        return _DEEPSEEK_V3
    return FAMILY_ARCHITECTURES[arch]


def family_config(header: GGUFHeader, arch: str, config: dict[str, Any]) -> dict[str, Any]:
    """The keys of the Hugging Face config that a gpt-oss or deepseek2 file adds to (or corrects in) the generic
    ones in ``config``."""
    if arch == GPT_OSS:
        return _gpt_oss_config(header, config)
    return _deepseek_config(header, config)


def _required(header: GGUFHeader, key: str, arch: str) -> Any:
    value = header.metadata.get(_key(key, arch))
    if value is None:
        raise ValueError(f"{header.path}: metadata key {_key(key, arch)} is missing")
    return value


def _gpt_oss_config(header: GGUFHeader, config: dict[str, Any]) -> dict[str, Any]:
    """Experts (their width is ``expert_feed_forward_length``), the window and which layers slide, and the rope:
    yarn as gpt-oss's own config states it (``truncate`` off) where the file has yarn, else plain rope (gpt-oss's
    config would otherwise default to yarn)."""
    meta, num_layers = header.metadata, config["num_hidden_layers"]
    values: dict[str, Any] = {
        "num_local_experts": int(_required(header, Keys.LLM.EXPERT_COUNT, GPT_OSS)),
        "num_experts_per_tok": int(_required(header, Keys.LLM.EXPERT_USED_COUNT, GPT_OSS)),
        "intermediate_size": int(meta.get(_key(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, GPT_OSS),
                                          config["intermediate_size"])),
        "sliding_window": int(_required(header, Keys.Attention.SLIDING_WINDOW, GPT_OSS)),
        "layer_types": sliding_layer_types(meta, GPT_OSS, num_layers, _GPT_OSS_SLIDING_PERIOD),
    }
    scaling = config.get("rope_scaling")
    if scaling and scaling["rope_type"] == "yarn":
        values["rope_scaling"] = {**scaling, **_yarn_betas(meta, GPT_OSS), "truncate": False}
    elif scaling is None:
        values["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_theta"]}
    return values


def _yarn_betas(meta: Any, arch: str) -> dict[str, float]:
    """yarn's correction range: the file's ``rope.scaling.yarn_beta_fast``/``_slow``, else 32 and 1 (the value
    both models' configs use)."""
    return {"beta_fast": float(meta.get(_key(Keys.Rope.SCALING_YARN_BETA_FAST, arch), 32.0)),
            "beta_slow": float(meta.get(_key(Keys.Rope.SCALING_YARN_BETA_SLOW, arch), 1.0))}


def sliding_layer_types(meta: Any, arch: str, num_layers: int, period: int) -> list[str]:
    """``layer_types`` from ``attention.sliding_window_pattern`` (a period, or one flag per layer: true where the
    layer slides), else from llama.cpp's fixed ``period`` for the architecture (every ``period``-th layer full)."""
    pattern = meta.get(_key(Keys.Attention.SLIDING_WINDOW_PATTERN, arch), period)
    if isinstance(pattern, (list, tuple)):
        sliding = [bool(flag) for flag in pattern]
    else:
        sliding = [bool((i + 1) % int(pattern)) for i in range(num_layers)]
    return ["sliding_attention" if flag else "full_attention" for flag in sliding]


def _deepseek_gating(header: GGUFHeader) -> ExpertGatingFuncType:
    value = header.metadata.get(_key(Keys.LLM.EXPERT_GATING_FUNC, DEEPSEEK2))
    if value is None:  # older DeepSeek-V2 files: llama.cpp takes softmax
        return ExpertGatingFuncType.SOFTMAX
    try:
        return ExpertGatingFuncType(int(value))
    except ValueError:
        raise ValueError(f"{header.path}: {DEEPSEEK2}.expert_gating_func {value} is not supported; supported: "
                         f"{', '.join(f'{g.value} ({g.name.lower()})' for g in ExpertGatingFuncType)}") from None


def _deepseek_config(header: GGUFHeader, config: dict[str, Any]) -> dict[str, Any]:
    """Latent attention sizes, grouped routing, leading dense layers and shared experts (see the module doc)."""
    meta = header.metadata

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(_key(key, DEEPSEEK2), default)
        return _required(header, key, DEEPSEEK2) if value is None else value

    rope_dim = int(get(Keys.Rope.DIMENSION_COUNT))
    key_length = int(meta.get(_key(Keys.Attention.KEY_LENGTH_MLA, DEEPSEEK2)) or get(Keys.Attention.KEY_LENGTH))
    value_length = int(meta.get(_key(Keys.Attention.VALUE_LENGTH_MLA, DEEPSEEK2))
                       or get(Keys.Attention.VALUE_LENGTH))
    v3 = _deepseek_gating(header) == ExpertGatingFuncType.SIGMOID
    has_bias = header.tensor(f"blk.{int(get(Keys.LLM.LEADING_DENSE_BLOCK_COUNT, 0))}.{_EXP_PROBS_B}.bias")
    if has_bias is not None and not v3:
        raise ValueError(f"{header.path}: {_EXP_PROBS_B} (DeepSeek-V3's routing bias) needs sigmoid gating; the "
                         "file's expert_gating_func is softmax (DeepSeek-V2)")
    num_groups = int(get(Keys.LLM.EXPERT_GROUP_COUNT, 1))
    values: dict[str, Any] = {
        "num_key_value_heads": config["num_attention_heads"],  # the file's 1: MLA's shared latent head
        "head_dim": rope_dim,
        "q_lora_rank": int(meta.get(_key(Keys.Attention.Q_LORA_RANK, DEEPSEEK2)) or 0) or None,
        "kv_lora_rank": int(get(Keys.Attention.KV_LORA_RANK)),
        "qk_rope_head_dim": rope_dim,
        "qk_nope_head_dim": key_length - rope_dim,
        "v_head_dim": value_length,
        "n_routed_experts": int(get(Keys.LLM.EXPERT_COUNT)),
        "num_experts_per_tok": int(get(Keys.LLM.EXPERT_USED_COUNT)),
        "moe_intermediate_size": int(get(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH)),
        "n_shared_experts": int(get(Keys.LLM.EXPERT_SHARED_COUNT, 0)),
        "first_k_dense_replace": int(get(Keys.LLM.LEADING_DENSE_BLOCK_COUNT, 0)),
        "moe_layer_freq": 1,
        "n_group": num_groups,
        "topk_group": int(get(Keys.LLM.EXPERT_GROUP_USED_COUNT, 1)),
        "routed_scaling_factor": float(get(Keys.LLM.EXPERT_WEIGHTS_SCALE, 1.0)),
        "norm_topk_prob": bool(get(Keys.LLM.EXPERT_WEIGHTS_NORM, False)),
        "scoring_func": "sigmoid" if v3 else "softmax",
        "topk_method": "noaux_tc" if v3 else "group_limited_greedy" if num_groups > 1 else "greedy",
        "attention_bias": False,
    }
    if v3:
        values["rope_interleave"] = True  # the converter keeps DeepSeek's interleaved rope rows as they are
    if (scaling := config.get("rope_scaling")) and scaling["rope_type"] == "yarn":
        values["rope_scaling"] = {**scaling, **_yarn_betas(meta, DEEPSEEK2)}
        log_mul = meta.get(_key(Keys.Rope.SCALING_YARN_LOG_MUL, DEEPSEEK2))
        if log_mul:  # llama.cpp's converter writes 0.1 * mscale_all_dim (a float32); DeepSeek's mscale equals it
            mscale = round(float(log_mul) / 0.1, 6)
            values["rope_scaling"].update(mscale=mscale, mscale_all_dim=mscale)
    return values


# ---- tensors -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SplitPair:
    """Two per-layer tensors a converter writes for what is one tensor here, and how to join them."""

    first: str
    second: str
    joined: str
    join: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _join_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``[E, I, ...]`` gate and up -> ``[E, 2I, ...]``: gate rows (or bias entries), then up ones."""
    return torch.cat((gate, up), dim=1)


def _join_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """``attn_k_b`` ``[H, kv_lora, nope]`` and ``attn_v_b`` ``[H, v, kv_lora]`` -> ``kv_b_proj``
    ``[H * (nope + v), kv_lora]``: per head its key rows, then its value rows."""
    if k_b.dim() != 3 or v_b.dim() != 3 or k_b.shape[0] != v_b.shape[0] or k_b.shape[1] != v_b.shape[2]:
        raise ValueError(f"attn_k_b {tuple(k_b.shape)} and attn_v_b {tuple(v_b.shape)} do not pair up as "
                         "[heads, kv_lora, nope] and [heads, v, kv_lora]")
    return torch.cat((k_b.transpose(1, 2), v_b), dim=1).reshape(-1, k_b.shape[1]).contiguous()


_SPLIT_PAIRS = {
    GPT_OSS: (_SplitPair(_GATE_EXPS, _UP_EXPS, _GATE_UP_EXPS, _join_gate_up),),
    DEEPSEEK2: (_SplitPair(_ATTN_K_B, _ATTN_V_B, _ATTN_KV_B, _join_kv_b),),
}


def join_split_tensors(arch: str, tensors: Iterable[tuple[str, torch.Tensor]]
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """The file's ``(llama.cpp name, tensor)`` stream with each split pair (gpt-oss's ``ffn_gate_exps`` +
    ``ffn_up_exps``, DeepSeek's ``attn_k_b`` + ``attn_v_b``) replaced by the one tensor it splits
    (``ffn_gate_up_exps``, ``attn_kv_b``), yielded once both halves were read. Other tensors pass through in
    order; ValueError for a half whose partner never comes."""
    halves = {}
    for pair in _SPLIT_PAIRS.get(arch, ()):
        halves[pair.first], halves[pair.second] = (pair, 0), (pair, 1)
    pending: dict[tuple[str, str, str], list[torch.Tensor | None]] = {}
    for name, tensor in tensors:
        match = _BLOCK_RE.fullmatch(name)
        if match is None or match.group(2) not in halves:
            yield name, tensor
            continue
        layer, part, kind = match.groups()
        pair, index = halves[part]
        slot = pending.setdefault((layer, pair.joined, kind), [None, None])
        slot[index] = tensor
        if slot[0] is not None and slot[1] is not None:
            del pending[(layer, pair.joined, kind)]
            yield f"blk.{layer}.{pair.joined}.{kind}", pair.join(slot[0], slot[1])
    if pending:
        missing = ", ".join(f"blk.{layer}.{joined}.{kind}" for layer, joined, kind in sorted(pending))
        raise ValueError(f"GGUF {arch} file has half of a split tensor pair for: {missing}")


def family_hf_name(arch: str, name: str) -> str:
    """The Hugging Face name of a gpt-oss or deepseek2 block tensor that is one checkpoint tensor as it stands
    (attention, norms, routers, sinks, DeepSeek's dense and shared-expert MLPs); ValueError otherwise (stacked or
    split tensors: see :func:`family_hf_tensors`)."""
    match = _BLOCK_RE.fullmatch(name)
    if match is None:
        raise ValueError(f"GGUF tensor {name!r} is not a per-layer tensor")
    layer, part, kind = match.groups()
    prefix = f"model.layers.{layer}."
    names = GPT_OSS_BLOCK_NAMES if arch == GPT_OSS else DEEPSEEK2_BLOCK_NAMES
    if part in names:
        return f"{prefix}{names[part]}.{kind}"
    if arch == GPT_OSS and part == _SINKS and kind == "weight":
        return f"{prefix}self_attn.sinks"
    if arch == DEEPSEEK2 and part == _EXP_PROBS_B and kind == "bias":
        return f"{prefix}mlp.gate.e_score_correction_bias"
    raise ValueError(f"GGUF {arch} tensor {name!r} is not one Hugging Face tensor as it stands")


def family_hf_tensors(arch: str, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """The Hugging Face checkpoint tensors one (joined, see :func:`join_split_tensors`) llama.cpp block tensor of
    a gpt-oss or deepseek2 file holds: stacked experts as Hugging Face stores them (gpt-oss: stacked, gate/up
    interleaved and transposed; DeepSeek: one tensor per expert), anything else under :func:`family_hf_name`."""
    match = _BLOCK_RE.fullmatch(name)
    part, kind = (match.group(2), match.group(3)) if match else (None, None)
    if arch == GPT_OSS and part in (_GATE_UP_EXPS, _DOWN_EXPS):
        yield _gpt_oss_experts(f"model.layers.{match.group(1)}.mlp.experts.", part, kind, tensor)
    elif arch == DEEPSEEK2 and part in _DEEPSEEK_EXPERTS and kind == "weight":
        if tensor.dim() != 3:
            raise ValueError(f"GGUF tensor {name!r} should be [experts, rows, cols]; got {tuple(tensor.shape)}")
        for expert in range(tensor.shape[0]):
            yield f"model.layers.{match.group(1)}.mlp.experts.{expert}.{_DEEPSEEK_EXPERTS[part]}.weight", tensor[expert]
    else:
        yield family_hf_name(arch, name), tensor


def _interleave_gate_up(joined: torch.Tensor) -> torch.Tensor:
    """``[E, 2I, ...]`` (gate, then up) -> gate and up interleaved along dim 1 (gate at even positions)."""
    gate, up = joined.chunk(2, dim=1)
    return torch.stack((gate, up), dim=2).flatten(1, 2)


def _gpt_oss_experts(prefix: str, part: str, kind: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    """gpt-oss's stacked expert tensor in Hugging Face's layout: ``gate_up_proj`` ``[E, H, 2I]`` (bias ``[E, 2I]``)
    with gate and up interleaved, ``down_proj`` ``[E, I, H]`` (bias ``[E, H]``)."""
    if part == _GATE_UP_EXPS:
        tensor = _interleave_gate_up(tensor)
        projection = "gate_up_proj"
    else:
        projection = "down_proj"
    if kind == "bias":
        return f"{prefix}{projection}_bias", tensor.contiguous()
    return f"{prefix}{projection}", tensor.transpose(1, 2).contiguous()
