"""Tiny 4-bit checkpoints for tests: a full-precision HF checkpoint's decoder linears quantized to 4 bits and
written in AWQ, GPTQ or compressed-tensors ``pack-quantized`` form, beside the de-quantized float32 checkpoint of
the very same weights (the reference a test runs the engine on).

Quantization is plain min/max rounding per group (no calibration: the tests need the layouts, not accuracy).
The writers follow each format's documented tensors (see :mod:`inferneo.quantization.int4_layouts`);
compressed-tensors words are packed with that library's own ``pack_to_int32``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from inferneo.quantization.int4_layouts import AWQ_PACK_ORDER

Layout = Literal["awq", "gptq", "compressed-tensors"]
# The decoder linears quantized (HF names): attention, dense MLPs, shared experts and each mixture-of-experts expert
# (Qwen-MoE's experts.N.gate_proj, Mixtral's block_sparse_moe.experts.N.w1), as AutoAWQ, GPTQModel and llm-compressor
# quantize them; embeddings, norms, routers and lm_head stay full precision.
_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(experts\.\d+\.|shared_expert\.)?"
                     r"(gate|up|down)_proj|block_sparse_moe\.experts\.\d+\.w[123])\.weight$")


@dataclass(frozen=True, slots=True)
class Int4Quantized:
    """One weight quantized: ``W ~ (codes - zeros[g_idx].T) * scales[g_idx].T`` (codes uint8 ``[out, in]``,
    zeros uint8 and scales ``[groups, out]``, scales already rounded to the checkpoint's dtype)."""

    codes: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor

    def dequantized(self) -> torch.Tensor:
        """The float32 weight the checkpoint stands for."""
        g = self.g_idx.long()
        return (self.codes.float() - self.zeros.float()[g].t()) * self.scales.float()[g].t()


def quantize_weight(w: torch.Tensor, group_size: int, symmetric: bool, scale_dtype: torch.dtype,
                    g_idx: torch.Tensor, min_zero: int = 0) -> Int4Quantized:
    """Round ``w [out, in]`` to 4 bits per group (``g_idx[k]``: column ``k``'s group): asymmetric min/max with a
    zero point in ``[min_zero, 15]``, or symmetric with zero point 8."""
    out_features = w.shape[0]
    groups = int(g_idx.max()) + 1
    codes = torch.empty(w.shape, dtype=torch.uint8)
    zeros = torch.empty(groups, out_features, dtype=torch.uint8)
    scales = torch.empty(groups, out_features, dtype=scale_dtype)
    for g in range(groups):
        cols = (g_idx == g).nonzero().flatten()
        wg = w[:, cols].float()
        if symmetric:
            s = (wg.abs().amax(1) / 7).clamp_min(1e-4).to(scale_dtype).float()
            z = torch.full((out_features,), 8.0)
        else:
            lo, hi = wg.amin(1).clamp(max=0), wg.amax(1).clamp(min=0)
            s = ((hi - lo) / 15).clamp_min(1e-4).to(scale_dtype).float()
            z = torch.round(-lo / s).clamp(min_zero, 15)
        codes[:, cols] = torch.round(wg / s[:, None] + z[:, None]).clamp(0, 15).to(torch.uint8)
        zeros[g] = z.to(torch.uint8)
        scales[g] = s.to(scale_dtype)
    return Int4Quantized(codes, zeros, scales, g_idx.to(torch.int32))


def _words(codes: torch.Tensor) -> torch.Tensor:
    """int32 words from codes ``[..., 8]`` (code ``i`` into bits ``4i``)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    value = (codes.to(torch.int64) << shifts).sum(-1)
    return torch.where(value >= 2**31, value - 2**32, value).to(torch.int32)


def awq_tensors(q: Int4Quantized, zero_point: bool) -> dict[str, torch.Tensor]:
    """AWQ GEMM tensors: ``qweight [in, out/8]`` and ``qzeros [in/g, out/8]`` in AWQ's packing order,
    ``scales [in/g, out]``."""
    order = list(AWQ_PACK_ORDER)
    codes_t = q.codes.t()
    out = {"qweight": _words(codes_t.reshape(codes_t.shape[0], -1, 8)[..., order]), "scales": q.scales}
    if zero_point:
        out["qzeros"] = _words(q.zeros.reshape(q.zeros.shape[0], -1, 8)[..., order])
    return out


def gptq_tensors(q: Int4Quantized) -> dict[str, torch.Tensor]:
    """GPTQ v1 tensors: ``qweight [in/8, out]`` (eight input rows per word), ``qzeros [in/g, out/8]`` holding
    ``z - 1``, ``scales [in/g, out]``, ``g_idx [in]``."""
    codes_t = q.codes.t()  # [in, out]
    qweight = _words(codes_t.reshape(-1, 8, codes_t.shape[1]).permute(0, 2, 1))
    qzeros = _words((q.zeros.to(torch.int64) - 1).reshape(q.zeros.shape[0], -1, 8) & 0xF)
    return {"qweight": qweight, "qzeros": qzeros, "scales": q.scales, "g_idx": q.g_idx}


def compressed_tensors(q: Int4Quantized, zero_point: bool) -> dict[str, torch.Tensor]:
    """compressed-tensors ``pack-quantized`` tensors, packed by the library: ``weight_packed [out, in/8]``,
    ``weight_scale [out, in/g]``, ``weight_zero_point [out/8, in/g]`` (asymmetric), ``weight_shape``."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    signed = (q.codes.to(torch.int16) - 8).to(torch.int8)
    out = {"weight_packed": pack_to_int32(signed, 4), "weight_scale": q.scales.t().contiguous(),
           "weight_shape": torch.tensor(list(q.codes.shape))}
    if zero_point:
        zp = (q.zeros.t().to(torch.int16) - 8).to(torch.int8).contiguous()
        out["weight_zero_point"] = pack_to_int32(zp, 4, packed_dim=0)
    return out


def quantization_config(layout: Layout, group_size: int, symmetric: bool, desc_act: bool,
                        lm_head: bool = False) -> dict:
    """The ``quantization_config`` each format's tools write into ``config.json`` (``lm_head``: the LM head is
    quantized too, GPTQModel's ``lm_head: true`` or no ``lm_head`` in compressed-tensors' ``ignore``)."""
    if layout == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": not symmetric,
                "version": "gemm", "modules_to_not_convert": None}
    if layout == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": desc_act,
                "sym": symmetric, "checkpoint_format": "gptq", "static_groups": False, "true_sequential": True,
                "lm_head": lm_head}
    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group",
               "group_size": group_size, "dynamic": False, "observer": "minmax",
               "actorder": "group" if desc_act else None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": [] if lm_head else ["lm_head"]}


def write_int4_checkpoint(source: Path, quantized: Path, dequantized: Path, layout: Layout, group_size: int = 32,
                          symmetric: bool = False, desc_act: bool = False, seed: int = 0,
                          lm_head: bool = False, not_converted: Sequence[str] = (),
                          group_sizes: dict[str, int] | None = None) -> tuple[Path, Path]:
    """Quantize ``source``'s (a one-file safetensors HF checkpoint) decoder linears and write the ``layout``
    checkpoint to ``quantized`` and the de-quantized float32 one to ``dequantized``; returns both paths.

    ``group_size`` -1 is one group per row (GPTQ); ``desc_act`` (GPTQ; compressed-tensors ``actorder: group``
    with ``weight_g_idx``) scatters each group's columns with a random
    ``g_idx`` as act-order does. ``symmetric``: zero point 8 (AWQ: ``zero_point: false``, no ``qzeros``).
    ``lm_head`` (GPTQ, compressed-tensors): quantize the (untied) LM head as well. ``not_converted``: modules
    whose HF name contains one of these strings stay full precision (AWQ / GPTQ ``modules_to_not_convert``; for
    compressed-tensors, add them to ``ignore`` yourself). ``group_sizes``: regular expression (matched from the
    start of the HF module name) -> that module's group size, the first match winning (as GPTQModel's ``dynamic``
    writes them; the config's ``dynamic`` is left to the caller)."""
    from safetensors.torch import load_file, save_file

    if desc_act and layout == "awq":
        raise ValueError("desc_act (act-order) is a GPTQ / compressed-tensors option")
    if lm_head and layout == "awq":
        raise ValueError("a quantized lm_head is a GPTQ / compressed-tensors option")
    source, quantized, dequantized = Path(source), Path(quantized), Path(dequantized)
    files = sorted(source.glob("*.safetensors"))
    if len(files) != 1:
        raise ValueError(f"write_int4_checkpoint expects one safetensors file in {source}; found {len(files)}")
    gen = torch.Generator().manual_seed(seed)
    scale_dtype = torch.bfloat16 if layout == "compressed-tensors" else torch.float16
    quant: dict[str, torch.Tensor] = {}
    ref: dict[str, torch.Tensor] = {}
    for name, tensor in load_file(files[0]).items():
        if (not (_LINEAR.match(name) or (lm_head and name == "lm_head.weight"))
                or any(skip in name for skip in not_converted)):
            quant[name] = ref[name] = tensor
            continue
        in_features = tensor.shape[1]
        module_group = next((g for pattern, g in (group_sizes or {}).items() if re.match(pattern, name)), group_size)
        group = in_features if module_group == -1 else module_group
        g_idx = torch.arange(in_features) // group
        if desc_act:
            g_idx = g_idx[torch.randperm(in_features, generator=gen)]
        q = quantize_weight(tensor.float(), group, symmetric, scale_dtype, g_idx,
                            min_zero=1 if layout == "gptq" else 0)  # GPTQ v1 stores z - 1: z = 0 cannot be written
        ref[name] = q.dequantized().to(tensor.dtype)
        prefix = name.removesuffix(".weight")
        if layout == "awq":
            parts = awq_tensors(q, zero_point=not symmetric)
        elif layout == "gptq":
            parts = gptq_tensors(q)
        else:
            parts = compressed_tensors(q, zero_point=not symmetric)
            if desc_act:
                parts["weight_g_idx"] = q.g_idx
        quant.update({f"{prefix}.{k}": v.contiguous() for k, v in parts.items()})
    qcfg_written = quantization_config(layout, group_size, symmetric, desc_act, lm_head)
    if not_converted and layout != "compressed-tensors":
        qcfg_written["modules_to_not_convert"] = list(not_converted)
    for target, tensors, qcfg in ((quantized, quant, qcfg_written), (dequantized, ref, None)):
        target.mkdir(parents=True, exist_ok=True)
        for extra in source.iterdir():
            if extra.suffix != ".safetensors" and extra.name != "config.json" and extra.is_file():
                shutil.copy(extra, target / extra.name)
        config = json.loads((source / "config.json").read_text())
        if qcfg is not None:
            config["quantization_config"] = qcfg
        (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return quantized, dequantized
