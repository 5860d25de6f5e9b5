"""The gpt-oss and DeepSeek-V2/V3 parts of :func:`~inferneo.testing.make_tiny_gguf`: their metadata and tensors
written as llama.cpp's ``convert_hf_to_gguf.py`` writes them, names from gguf's own ``TensorNameMap``.

gpt-oss (arch ``gpt-oss``): Hugging Face's interleaved ``gate_up_proj`` ``[E, H, 2I]`` is split into
``ffn_gate_exps``/``ffn_up_exps`` ``[E, I, H]`` (biases likewise), ``down_proj`` ``[E, I, H]`` transposed into
``ffn_down_exps``, ``self_attn.sinks`` becomes ``attn_sinks.weight``. An MXFP4 checkpoint's expert blocks and scales
are repacked, not re-quantized, into ggml's MXFP4 blocks (:func:`ggml_mxfp4_bytes`), as the converter does.

DeepSeek-V2/V3 (arch ``deepseek2``): experts stacked per layer, ``kv_b_proj`` split into ``attn_k_b`` (transposed)
and ``attn_v_b``, ``e_score_correction_bias`` as ``exp_probs_b.bias``; attention described as one shared head of
``kv_lora_rank + qk_rope_head_dim`` (``head_count_kv`` 1) with the per-head sizes in ``key_length_mla`` /
``value_length_mla``. With ``legacy_mla`` the file is as llama.cpp's converter wrote it before that split: one
``attn_kv_b`` and the per-head sizes in ``head_count_kv``/``key_length``/``value_length``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from inferneo.model_executor.mxfp4 import Mxfp4Weight, pair_mxfp4_weights
from inferneo.model_loader.hf_files import iter_hf_weights

GPT_OSS = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT_OSS]
DEEPSEEK2 = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2]
# model_type -> llama.cpp's general.architecture
FAMILY_GGUF_ARCHITECTURES = {"gpt_oss": GPT_OSS, "deepseek_v2": DEEPSEEK2, "deepseek_v3": DEEPSEEK2}
_MODEL_ARCH = {GPT_OSS: gguf.MODEL_ARCH.GPT_OSS, DEEPSEEK2: gguf.MODEL_ARCH.DEEPSEEK2}
_GGML_MXFP4 = gguf.GGMLQuantizationType.MXFP4


@dataclass(frozen=True, slots=True)
class RawGGUFTensor:
    """A tensor already in ``ggml_type``'s bytes (``data``: uint8, each row's blocks along the last axis)."""

    data: np.ndarray
    ggml_type: gguf.GGMLQuantizationType


@dataclass(frozen=True, slots=True)
class AttentionLengths:
    """What the generic attention keys hold: ``head_count_kv``, ``key_length``, ``value_length`` and
    ``rope.dimension_count``."""

    kv_heads: int
    key_length: int
    value_length: int
    rope_dims: int


def ggml_mxfp4_bytes(blocks: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """An MXFP4 weight as Hugging Face stores it (``blocks`` ``[..., rows, groups, 16]``: two values per byte, the
    even one in the low nibble; ``scales`` ``[..., rows, groups]``: e8m0) in ggml's MXFP4 blocks: per 32 values one
    byte of e8m0 exponent, then 16 bytes whose low nibbles hold values 0-15 and high nibbles values 16-31. Returns
    uint8 ``[..., rows, groups * 17]``. The same values, so de-quantizing either gives the same weight."""
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2)  # [..., groups, 32] in value order
    packed = codes[..., :16] | (codes[..., 16:] << 4)
    return torch.cat((scales.unsqueeze(-1), packed), dim=-1).flatten(-2).numpy()


def attention_lengths(arch: str, config: dict[str, Any], head_dim: int, legacy_mla: bool) -> AttentionLengths:
    """The generic attention keys for ``config``: DeepSeek's MLA as the converter describes it (see the module doc),
    any other model's heads as they are."""
    if arch != DEEPSEEK2:
        return AttentionLengths(config["num_key_value_heads"], head_dim, head_dim, head_dim)
    rope = config["qk_rope_head_dim"]
    if legacy_mla:
        return AttentionLengths(config["num_attention_heads"], config["qk_nope_head_dim"] + rope,
                                config["v_head_dim"], rope)
    return AttentionLengths(1, config["kv_lora_rank"] + rope, config["kv_lora_rank"], rope)


def write_family_hparams(writer: gguf.GGUFWriter, arch: str, config: dict[str, Any], legacy_mla: bool) -> None:
    """gpt-oss's window and expert width; DeepSeek's latent sizes, leading dense layers and grouped routing."""
    if arch == GPT_OSS:
        writer.add_sliding_window(int(config["sliding_window"]))
        writer.add_expert_feed_forward_length(int(config["intermediate_size"]))
        return
    writer.add_leading_dense_block_count(int(config.get("first_k_dense_replace") or 0))
    if config.get("q_lora_rank"):
        writer.add_q_lora_rank(int(config["q_lora_rank"]))
    writer.add_kv_lora_rank(int(config["kv_lora_rank"]))
    if not legacy_mla:
        writer.add_key_length_mla(config["qk_nope_head_dim"] + config["qk_rope_head_dim"])
        writer.add_value_length_mla(config["v_head_dim"])
    writer.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))
    writer.add_expert_count(int(config["n_routed_experts"]))
    writer.add_expert_used_count(int(config["num_experts_per_tok"]))
    writer.add_expert_shared_count(int(config.get("n_shared_experts") or 0))
    if config.get("routed_scaling_factor") is not None:
        writer.add_expert_weights_scale(float(config["routed_scaling_factor"]))
    if config.get("norm_topk_prob"):
        writer.add_expert_weights_norm(True)
    if config.get("n_group") is not None:
        writer.add_expert_group_count(int(config["n_group"]))
    if config.get("topk_group") is not None:
        writer.add_expert_group_used_count(int(config["topk_group"]))
    # A released config states scoring_func (V2 softmax, V3 sigmoid); transformers' config classes leave it out.
    scoring = config.get("scoring_func") or ("sigmoid" if config["model_type"] == "deepseek_v3" else "softmax")
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType[scoring.upper()])
    mscale_all_dim = (config.get("rope_scaling") or {}).get("mscale_all_dim")
    if mscale_all_dim:
        writer.add_rope_scaling_yarn_log_mul(0.1 * float(mscale_all_dim))


def family_gguf_tensors(hf_dir: Path, config: dict[str, Any], arch: str, legacy_mla: bool
                        ) -> Iterator[tuple[str, np.ndarray | RawGGUFTensor]]:
    """(llama.cpp name, float32 array or ggml bytes) for every tensor of a gpt-oss or DeepSeek checkpoint."""
    names = gguf.get_tensor_name_map(_MODEL_ARCH[arch], config["num_hidden_layers"])

    def gguf_name(hf_name: str) -> str:
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"gguf's {arch} tensor map has no name for {hf_name!r}")
        return name

    if arch == GPT_OSS:
        yield from _gpt_oss_tensors(hf_dir, gguf_name)
    else:
        yield from _deepseek_tensors(hf_dir, config, gguf_name, legacy_mla)


def _gpt_oss_tensors(hf_dir: Path, gguf_name) -> Iterator[tuple[str, np.ndarray | RawGGUFTensor]]:
    for name, tensor in pair_mxfp4_weights(iter_hf_weights(hf_dir)):
        if name.endswith(".self_attn.sinks"):
            yield gguf_name(name + ".weight"), tensor.float().numpy()
            continue
        stem, _, kind = name.rpartition(".experts.")
        if not stem:
            yield gguf_name(name), tensor.float().numpy()
            continue
        projection = kind.removesuffix("_bias")
        suffix = ".bias" if kind.endswith("_bias") else ".weight"
        if isinstance(tensor, Mxfp4Weight):  # stored [E, out, in] already, rows interleaved gate/up
            parts = _split_gate_up(projection, tensor.blocks, tensor.scales)
            for part, (blocks, scales) in parts.items():
                yield gguf_name(f"{stem}.experts.{part}{suffix}"), RawGGUFTensor(ggml_mxfp4_bytes(blocks, scales),
                                                                                 _GGML_MXFP4)
            continue
        if suffix == ".weight":
            tensor = tensor.transpose(1, 2)  # Hugging Face keeps [E, in, out]
        for part, value in _split_gate_up(projection, tensor).items():
            yield gguf_name(f"{stem}.experts.{part}{suffix}"), value.float().contiguous().numpy()


def _split_gate_up(projection: str, *tensors: torch.Tensor) -> dict[str, Any]:
    """``{"gate_proj": ..., "up_proj": ...}`` from gate/up interleaved along dim 1 (each of ``tensors`` split the
    same way), or ``{"down_proj": ...}`` as it is."""
    single = len(tensors) == 1
    if projection == "down_proj":
        return {"down_proj": tensors[0] if single else tensors}
    gate, up = tuple(t[:, 0::2] for t in tensors), tuple(t[:, 1::2] for t in tensors)
    return {"gate_proj": gate[0] if single else gate, "up_proj": up[0] if single else up}


def _deepseek_tensors(hf_dir: Path, config: dict[str, Any], gguf_name, legacy_mla: bool
                      ) -> Iterator[tuple[str, np.ndarray]]:
    heads, nope, v_dim = config["num_attention_heads"], config["qk_nope_head_dim"], config["v_head_dim"]
    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, tensor in iter_hf_weights(hf_dir):
        array = tensor.float().numpy()
        prefix, expert_marker, rest = name.partition(".mlp.experts.")
        if expert_marker:  # model.layers.L.mlp.experts.E.gate_proj.weight
            expert, _, projection = rest.partition(".")
            experts.setdefault((prefix, projection), {})[int(expert)] = array
        elif name.endswith(".kv_b_proj.weight") and not legacy_mla:
            kv_b = tensor.float().view(heads, nope + v_dim, -1)
            k_b, v_b = kv_b[:, :nope].transpose(1, 2), kv_b[:, nope:]
            yield gguf_name(name.replace("kv_b_proj", "k_b_proj")), k_b.contiguous().numpy()
            yield gguf_name(name.replace("kv_b_proj", "v_b_proj")), v_b.contiguous().numpy()
        else:
            yield gguf_name(name.replace("e_score_correction_bias", "e_score_correction.bias")), array
    for (prefix, projection), by_expert in experts.items():
        stacked = np.stack([by_expert[e] for e in range(len(by_expert))])
        yield gguf_name(f"{prefix}.mlp.experts.{projection}"), stacked

