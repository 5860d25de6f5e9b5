"""GGUF models: an HF-style config from the metadata, and the weights under Hugging Face names.

Gemma 2 and Gemma 3 files follow llama.cpp's converter: norm weights stored as ``1 + w`` (Gemma's offset undone
here), no LM head (tied), the window in ``attention.sliding_window`` and the soft caps in ``*_logit_softcapping``.
What the file does not say is taken as llama.cpp takes it: sliding layers every other one (Gemma 2) or five in six
(Gemma 3), Gemma 3's local rotary base 10000, and the attention scale from the head size except at 27B, where it
is ``hidden_size / num_heads``. gpt-oss and DeepSeek-V2/V3 files are described in :mod:`.gguf_families`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inferneo import envs
from inferneo.model_executor.layers.rotary import rope_frequencies
from inferneo.model_loader.gguf_families import (
    FAMILY_ARCHITECTURES,
    family_config,
    family_hf_architecture,
    family_hf_name,
    family_hf_tensors,
    join_split_tensors,
    sliding_layer_types,
)
from inferneo.model_loader.gguf_file import GGUFHeader, iter_gguf_tensors, read_gguf_header
from inferneo.quantization.gguf_blocks import KEPT_FORMATS

logger = logging.getLogger(__name__)

# general.architecture -> (HF architecture, model_type); "llama" with experts is Mixtral (see ``_hf_architecture``)
GGUF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "gemma": ("GemmaForCausalLM", "gemma"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
    "phi3": ("Phi3ForCausalLM", "phi3"),
    **FAMILY_ARCHITECTURES,  # gpt-oss, deepseek2: see gguf_families
}
_GEMMA_ARCHITECTURES = {"gemma2", "gemma3"}
# llama.cpp stores these architectures' norm weights with Gemma's 1 added (Gemma 1 has Llama's block names)
_NORM_OFFSET_ARCHITECTURES = {"gemma", *_GEMMA_ARCHITECTURES}
_MIXTRAL = ("MixtralForCausalLM", "mixtral")
# llama.cpp's converter interleaves the rotary halves of q/k for these architectures
_PERMUTED_ARCHITECTURES = {"llama"}
# folded into config["rope_scaling"]: Llama 3's divisors, Phi-3's LongRoPE factors
_LONGROPE_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")
_SKIPPED_TENSORS = {"rope_freqs.weight", *_LONGROPE_TENSORS}
# Whether the top-k router weights are renormalised, when the file has no expert_weights_norm key: llama.cpp's
# default for each architecture (Mixtral and Qwen3-MoE renormalise, Qwen2-MoE does not).
_DEFAULT_EXPERT_WEIGHTS_NORM = {"llama": True, "qwen2moe": False, "qwen3moe": True}

# Tokens that end generation wherever the vocabulary has them, as llama.cpp takes them whatever the file's eos/eot
# ids say: GGUF files carry no generation_config.json, and its list of stop ids is often wider than the one EOS the
# converter writes (Gemma's <end_of_turn>; Qwen's <|endoftext|> beside <|im_end|>; Phi-3's <|end|>).
_END_OF_GENERATION_TOKENS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
})
# gpt-oss's vocabulary (harmony) ends the answer at <|return|> or <|call|>; its <|end|> ends each message, the
# reasoning too, so there it is no stop (llama.cpp drops it from its list in the same case)
_HARMONY_ENDS = frozenset({"<|return|>", "<|call|>"})
_HARMONY_MESSAGE_END = "<|end|>"

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
# Gemma's four norms per layer: llama.cpp's ffn_norm is the norm before the MLP.
_GEMMA_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# llama.cpp's sliding-window period (every n-th layer attends to everything) and the layer counts of the 27B models,
# whose attention scale is ``hidden_size / num_heads`` rather than the head size.
_GEMMA_SLIDING_PERIOD = {"gemma2": 2, "gemma3": 6}
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# Phi-3 keeps its checkpoint's fused tensors: attn_qkv rows [q; k; v], ffn_up rows [gate; up].
_PHI3_BLOCK_NAMES = {**_BLOCK_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
_ARCH_BLOCK_NAMES = {"gemma2": _GEMMA_BLOCK_NAMES, "gemma3": _GEMMA_BLOCK_NAMES, "phi3": _PHI3_BLOCK_NAMES}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# One expert's projection as files written before llama.cpp stacked the experts (its first Mixtral files, such as
# the widely shared Mixtral-8x7B ones of December 2023): ``blk.N.ffn_gate.E.weight`` rather than ``ffn_gate_exps``
_PER_EXPERT_RE = re.compile(r"blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)\.(\d+)\.weight")


def gguf_hf_name(name: str, moe_block: str = "mlp", arch: str = "llama") -> str:
    """The Hugging Face parameter name for a llama.cpp tensor name (``blk.0.attn_q.weight`` -> ...q_proj.weight)
    in a file of architecture ``arch`` (Gemma names its four norms per layer its own way, Phi-3 keeps fused
    ``attn_qkv`` and ``ffn_up`` tensors).

    ``moe_block`` is where the model keeps its router (``ffn_gate_inp``) and experts: ``mlp`` (Qwen-MoE) or
    ``block_sparse_moe`` (Mixtral); one expert's tensor of an older file (``blk.0.ffn_gate.3.weight``) is named
    there. Stacked expert tensors have no single name: see :func:`gguf_hf_tensors`."""
    block_names = _ARCH_BLOCK_NAMES.get(arch, _BLOCK_NAMES)
    if arch in FAMILY_ARCHITECTURES and _BLOCK_RE.fullmatch(name):
        return family_hf_name(arch, name)
    if per_expert := _PER_EXPERT_RE.fullmatch(name):
        layer, part, expert = per_expert.groups()
        projection = _EXPERT_NAMING["mixtral" if moe_block == "block_sparse_moe" else "qwen"][1][f"{part}_exps"]
        return f"model.layers.{layer}.{moe_block}.experts.{expert}.{projection}.weight"
    if match := _BLOCK_RE.fullmatch(name):
        layer, part, kind = match.groups()
        if part == _ROUTER:
            return f"model.layers.{layer}.{moe_block}.gate.{kind}"
        if part in block_names:
            return f"model.layers.{layer}.{block_names[part]}.{kind}"
    else:
        stem, _, kind = name.rpartition(".")
        if stem in _TOP_LEVEL_NAMES and kind in ("weight", "bias"):
            return f"{_TOP_LEVEL_NAMES[stem]}.{kind}"
    raise ValueError(f"GGUF tensor {name!r} has no Hugging Face equivalent known to inferneo")


def gguf_hf_tensors(name: str, tensor: torch.Tensor, expert_naming: str = "qwen", arch: str = "llama"
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """The Hugging Face checkpoint tensors one GGUF tensor holds: a stacked expert tensor
    (``blk.N.ffn_gate_exps.weight`` ``[E, rows, cols]``) becomes one tensor per expert, named as in a Mixtral
    (``expert_naming="mixtral"``) or Qwen-MoE (``"qwen"``) checkpoint; any other tensor keeps its one name."""
    if arch in FAMILY_ARCHITECTURES and _BLOCK_RE.fullmatch(name):
        yield from family_hf_tensors(arch, name, tensor)
        return
    moe_block, projections = _EXPERT_NAMING[expert_naming]
    match = _BLOCK_RE.fullmatch(name)
    if match and match.group(2) in projections:
        layer, part, kind = match.groups()
        if tensor.dim() != 3:
            raise ValueError(f"GGUF tensor {name!r} should be [experts, rows, cols]; got {tuple(tensor.shape)}")
        for expert in range(tensor.shape[0]):
            yield f"model.layers.{layer}.{moe_block}.experts.{expert}.{projections[part]}.{kind}", tensor[expert]
        return
    hf_name = gguf_hf_name(name, moe_block, arch)
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
    if arch in FAMILY_ARCHITECTURES:
        return family_hf_architecture(header, arch)
    if arch == "llama" and _num_experts(header, arch):
        return _MIXTRAL
    return GGUF_ARCHITECTURES[arch]


def gguf_config(path: Path) -> dict[str, Any]:
    """A ``config.json``-style dict (HF keys) built from the GGUF metadata.

    A file with weights in a block type Inferneo keeps quantized gets ``quantization_config: {"quant_method":
    "gguf", "file": <path>}`` (``inferneo/quantization/gguf.py``), unless ``INFERNEO_GGUF_DEQUANTIZE=1`` asks for
    every tensor de-quantized at load."""
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
        "mlp_bias": header.tensor("blk.0.ffn_down.bias") is not None,  # (Llama's mlp_bias: llama.cpp reads them)
        "torch_dtype": _weights_dtype(header),
    }
    if arch in FAMILY_ARCHITECTURES:
        config.update(family_config(header, arch, config))
    elif _num_experts(header, arch):
        config.update(_moe_config(header, arch, model_type))
    if arch in _GEMMA_ARCHITECTURES:
        config.update(_gemma_config(meta, arch, config))
    if arch == "gemma":  # llama.cpp's Gemma 1: GELU (tanh) gated MLP, nothing else in the metadata
        config["hidden_act"] = "gelu_pytorch_tanh"
    if arch == "phi3":
        config.update(_phi3_config(header, config))
    # gpt-oss and DeepSeek files are de-quantized at load (their model files take no quantized linear layers yet)
    if (not envs.gguf_dequantize() and arch not in FAMILY_ARCHITECTURES
            and any(len(t.shape) == 2 and t.ggml_type in KEPT_FORMATS for t in header.tensors)):
        config["quantization_config"] = {"quant_method": "gguf", "file": str(header.path)}
        # Weights kept in 4- to 8-bit blocks carry far less precision than bfloat16's 8-bit significand, so the file
        # counts as a 16-bit checkpoint for ``--dtype auto``: bfloat16 on a CPU that multiplies it natively (AMX or
        # AVX512_BF16) and on GPUs, float32 elsewhere (config.torch_dtype). On the default model bfloat16 picked
        # float32's greedy token at 765 of 768 positions (benchmarks/cpu_gguf_int8_agreement.py --against bf16).
        config["torch_dtype"] = "bfloat16"
    for key in ("bos", "eos", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config[f"{key.replace('padding', 'pad')}_token_id"] = int(token_id)
    return config


def _weights_dtype(header: GGUFHeader) -> str:
    """The dtype a file of full-width weights states, as a safetensors checkpoint's ``torch_dtype`` does (so that
    ``--dtype auto`` treats the two alike): ``bfloat16`` where its weights are BF16 (F16 or F32 beside), ``float16``
    where F16 (F32 beside), else ``float32`` (F32 files, and weights in block types, de-quantized to float32)."""
    kinds = {t.type_name for t in header.tensors if len(t.shape) >= 2}
    if "BF16" in kinds and kinds <= {"BF16", "F16", "F32"}:
        return "bfloat16"
    if "F16" in kinds and kinds <= {"F16", "F32"}:
        return "float16"
    return "float32"


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


def _gemma_config(meta: dict[str, Any], arch: str, config: dict[str, Any]) -> dict[str, Any]:
    """The Gemma keys of the HF-style config, from the metadata and llama.cpp's fixed choices."""
    num_layers, window = config["num_hidden_layers"], meta.get(f"{arch}.attention.sliding_window")
    scalar_dim = (config["hidden_size"] // config["num_attention_heads"] if num_layers == _GEMMA_27B_LAYERS[arch]
                  else config["head_dim"])
    values: dict[str, Any] = {
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_act": "gelu_pytorch_tanh",
        "sliding_window": int(window) if window else None,
        "layer_types": sliding_layer_types(meta, arch, num_layers, _GEMMA_SLIDING_PERIOD[arch]),
        "query_pre_attn_scalar": scalar_dim,
    }
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):  # absent: the model's defaults, as llama.cpp
        if f"{arch}.{key}" in meta:
            values[key] = float(meta[f"{arch}.{key}"])
    if arch == "gemma3":
        values["rope_local_base_freq"] = 10000.0
    return values


def _phi3_config(header: GGUFHeader, config: dict[str, Any]) -> dict[str, Any]:
    """Phi-3's window (0: none), its top-level original context length and LongRoPE, which llama.cpp's converter
    writes as the ``rope_factors_long``/``rope_factors_short`` tensors plus ``rope.scaling.attn_factor``.
    Partial rotary embeddings (``rope.dimension_count`` below the head size) are refused."""
    meta = header.metadata
    rotary = meta.get("phi3.rope.dimension_count")
    if rotary is not None and int(rotary) != config["head_dim"]:
        raise ValueError(f"{header.path}: phi3.rope.dimension_count {rotary} is not the head size "
                         f"{config['head_dim']}; only Phi-3 with full rotary embeddings is supported")
    max_position = config["max_position_embeddings"]
    original = int(meta.get("phi3.rope.scaling.original_context_length") or max_position)
    values: dict[str, Any] = {"sliding_window": int(meta.get("phi3.attention.sliding_window") or 0) or None,
                              "original_max_position_embeddings": original}
    long, short = (_f32_tensor(header, name) for name in _LONGROPE_TENSORS)
    if long is None and short is None:
        return values
    if long is None or short is None or len(long) != len(short) or 2 * len(long) != config["head_dim"]:
        raise ValueError(f"{header.path}: LongRoPE needs rope_factors_long and rope_factors_short of "
                         f"{config['head_dim'] // 2} values each")
    scaling: dict[str, Any] = {"rope_type": "longrope", "long_factor": long.tolist(), "short_factor": short.tolist(),
                               "original_max_position_embeddings": original, "partial_rotary_factor": 1.0}
    attn_factor = meta.get("phi3.rope.scaling.attn_factor")
    factor = max_position / original
    default = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
    if attn_factor is not None and not math.isclose(float(attn_factor), default, rel_tol=1e-6):
        scaling["attention_factor"] = float(attn_factor)  # not the one Hugging Face derives (e.g. "yarn")
    values["rope_scaling"] = scaling
    return values


def _f32_tensor(header: GGUFHeader, name: str) -> np.ndarray | None:
    """A small F32 tensor's values (float64), read straight from the file; None when the file lacks it."""
    info = header.tensor(name)
    if info is None:
        return None
    if info.type_name != "F32":
        raise ValueError(f"{header.path}: {name} is {info.type_name}; F32 was expected")
    raw = np.memmap(header.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))
    return np.array(raw.view(np.float32), dtype=np.float64)


def gguf_generation_config(path: Path) -> dict[str, Any]:
    """``{"eos_token_id": ...}`` from the metadata: the EOS id, the end-of-turn ids when the file has them, then the
    vocabulary's tokens of llama.cpp's end-of-generation list (:data:`_END_OF_GENERATION_TOKENS`)."""
    meta = read_gguf_header(path).metadata
    ids: list[int] = []
    for key in ("eos", "eot", "eom"):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and int(token_id) not in ids:
            ids.append(int(token_id))
    tokens = meta.get("tokenizer.ggml.tokens") or ()
    stops = _END_OF_GENERATION_TOKENS
    if _HARMONY_ENDS.issubset(tokens):  # gpt-oss: <|end|> closes a message, not the answer
        stops = stops - {_HARMONY_MESSAGE_END}
    ids.extend(i for i, token in enumerate(tokens) if token in stops and i not in ids)
    config: dict[str, Any] = {}
    if ids:
        config["eos_token_id"] = ids[0] if len(ids) == 1 else ids
    if (bos := meta.get("tokenizer.ggml.bos_token_id")) is not None:
        config["bos_token_id"] = int(bos)
    return config


def iter_gguf_weights(path: Path, keep_blocks: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor as float32 under its HF checkpoint name, with llama.cpp's q/k rotary permutation (Llama) or its
    shift of the norm weights by 1 (Gemma) undone, the tensors it splits in two joined (gpt-oss's gate/up experts,
    DeepSeek's ``kv_b_proj``) and stacked expert tensors split into one tensor per expert (Mixtral's, Qwen-MoE's or
    DeepSeek's names) or, for gpt-oss, laid out as its checkpoint stacks them.

    The GGUF tensors named in ``keep_blocks`` (linear weights a GGUF-quantized model holds as ggml blocks) come as
    their raw blocks instead, uint8 ``[rows, row_bytes]`` under ``<module>.qweight`` (the q/k permutation undone by
    moving whole rows of blocks); a kept stacked expert tensor comes as one such tensor per expert
    (``...experts.{e}.gate_proj.qweight``)."""
    header, arch = _header(path)
    meta = header.metadata
    heads = int(meta[f"{arch}.attention.head_count"])
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    expert_naming = "mixtral" if _hf_architecture(header, arch) == _MIXTRAL else "qwen"
    file_tensors = ((info.name, torch.from_numpy(np.ascontiguousarray(array)))
                    for info, array in iter_gguf_tensors(header, keep_blocks) if info.name not in _SKIPPED_TENSORS)
    for gguf_name, tensor in join_split_tensors(arch, file_tensors):
        for name, part in gguf_hf_tensors(gguf_name, tensor, expert_naming, arch):
            if arch in _NORM_OFFSET_ARCHITECTURES and name.endswith("norm.weight"):
                part = part - 1  # the file holds fl(1 + w): the model's 1 + (that - 1) gives it back exactly
            if arch in _PERMUTED_ARCHITECTURES:
                if ".q_proj." in name:
                    part = unpermute_rotary(part, heads)
                elif ".k_proj." in name:
                    part = unpermute_rotary(part, kv_heads)
            if gguf_name in keep_blocks:
                name = name.removesuffix(".weight") + ".qweight"
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
    factors = _f32_tensor(header, "rope_freqs.weight")
    if factors is None:
        return None
    scaling = llama3_rope_scaling(factors, head_dim, theta, int(original) if original else None)
    if _divisors_match(scaling, factors, head_dim, theta):
        return scaling
    # Settings the divisors do not pin down (few frequencies in the smoothed band, or a non-Llama-3 rule): rotate
    # with the divisors as stored, as llama.cpp does (inverse frequency = plain / divisor, cos and sin unscaled).
    logger.info("rope_freqs does not follow a recoverable Llama 3 rope_scaling; using its %d divisors as stored",
                len(factors))
    divisors = [float(f) for f in factors]
    return {"rope_type": "longrope", "short_factor": divisors, "long_factor": divisors, "attention_factor": 1.0,
            "original_max_position_embeddings": int(original) if original else 1}


def _divisors_match(scaling: dict[str, Any], factors: np.ndarray, head_dim: int, theta: float) -> bool:
    """Whether ``scaling`` gives the inverse frequencies the stored divisors give (to float32 rounding)."""
    plain = rope_frequencies(head_dim, theta, None, 1).inv_freq.double()
    rebuilt = rope_frequencies(head_dim, theta, scaling, 1).inv_freq.double()
    stored = plain / torch.from_numpy(np.asarray(factors, dtype=np.float64))
    return bool(torch.allclose(rebuilt, stored, rtol=1e-5, atol=0.0))


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
    if factor <= 1 or medium.sum() < 2:  # nothing to fit: Llama 3.1's settings (checked against the divisors)
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
