"""Quantized twins of tiny checkpoints, for tests: the tensors and ``quantization_config`` a real quantized
checkpoint of each format carries, written from a full-precision checkpoint made by
:func:`inferneo.testing.tiny_models.make_tiny_checkpoint`.

FP8 (:func:`write_fp8_checkpoint`), one of :data:`FP8_CHECKPOINT_SCHEMES`:

- ``tensor-dynamic`` / ``tensor-static``: ``quant_method: fp8`` with one ``weight_scale`` per weight tensor
  (``max|W| / 448``) and ``activation_scheme`` dynamic, or static with an ``input_scale`` per layer calibrated on
  random prompts through the Hugging Face model (``max|x| / 448`` of the layer's input);
- ``block``: ``quant_method: fp8`` with ``weight_block_size [128, 128]`` and ``weight_scale_inv`` (one scale per
  128 x 128 tile), dynamic activations;
- ``ct-channel-dynamic`` / ``ct-tensor-static``: compressed-tensors ``float-quantized``, per-channel weight scales
  ``[out, 1]`` with dynamic per-token activations, or a per-tensor weight scale with a static ``input_scale``;
  the weights are compressed by the ``compressed_tensors`` library's own compressor (which must be installed for
  these two schemes).

Each writer can also write the de-quantized float32 twin (``W = q * scale``, computed by the format's reference:
the ``compressed_tensors`` decompressor for compressed-tensors, ``q.float() * scale`` for ``fp8``), the checkpoint
the tests run the same engine on for comparison. The module imports no optional package at import time.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from inferneo.model_loader.hf_files import iter_hf_weights, read_json
from inferneo.quantization.fp8_math import FP8_DTYPE, FP8_MAX, SCALE_FLOOR, expand_blocks, quantize_blocks

FP8_CHECKPOINT_SCHEMES = ("tensor-dynamic", "tensor-static", "block", "ct-channel-dynamic", "ct-tensor-static")
FP8_BLOCK = (128, 128)
# The decoder's linear layers a quantized checkpoint quantizes (lm_head and the embeddings stay full precision).
_LINEAR = re.compile(r"^model\.layers\.\d+\..*\.(q|k|v|o|gate|up|down)_proj\.weight$")
_CALIBRATION_PROMPTS = 8
_CALIBRATION_LEN = 48


def _copy_side_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and not item.name.endswith((".safetensors", ".safetensors.index.json", ".bin")):
            shutil.copy2(item, dst / item.name)


def _save(folder: Path, tensors: dict[str, torch.Tensor], quantization_config: dict[str, Any] | None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    config = read_json(folder / "config.json")
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def calibrated_input_scales(src: Path, modules: Sequence[str], seed: int = 0) -> dict[str, torch.Tensor]:
    """Static activation scales ``max|x| / 448`` of each linear module's input in ``modules`` (HF names), over
    random prompts run through the Hugging Face float32 model of ``src``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    amax: dict[str, torch.Tensor] = {}
    hooks = []
    for name in modules:
        def record(_module, inputs, name=name):
            value = inputs[0].detach().abs().amax().float()
            amax[name] = torch.maximum(amax.get(name, value), value)
        hooks.append(model.get_submodule(name).register_forward_pre_hook(record))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ids = torch.randint(5, model.config.vocab_size, (_CALIBRATION_PROMPTS, _CALIBRATION_LEN), generator=gen)
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return {name: (value / FP8_MAX).clamp_min(SCALE_FLOOR).reshape(()) for name, value in amax.items()}


def _per_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.abs().amax().float() / FP8_MAX).clamp_min(SCALE_FLOOR)
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale.reshape(())


def write_fp8_checkpoint(src_folder: Path, dst_folder: Path, scheme: str, *, ignore: Sequence[str] = (),
                         dequantized_folder: Path | None = None) -> Path:
    """Write the FP8 checkpoint of ``scheme`` (:data:`FP8_CHECKPOINT_SCHEMES`) of the float checkpoint
    ``src_folder`` into ``dst_folder``; the modules named in ``ignore`` (HF names such as
    ``model.layers.1.mlp.down_proj``) stay in full precision and are listed as the format's ignored layers. With
    ``dequantized_folder``, also write the float32 checkpoint of the de-quantized weights there. Returns
    ``dst_folder``."""
    if scheme not in FP8_CHECKPOINT_SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(FP8_CHECKPOINT_SCHEMES)}; got {scheme!r}")
    src, dst = Path(src_folder), Path(dst_folder)
    _copy_side_files(src, dst)
    weights = dict(iter_hf_weights(src))
    targets = [n for n in weights if _LINEAR.match(n) and n.removesuffix(".weight") not in ignore]
    static = scheme.endswith("static")
    input_scales = calibrated_input_scales(src, [n.removesuffix(".weight") for n in targets]) if static else {}
    if scheme.startswith("ct-"):
        out, dequantized, qconfig = _compressed_tensors_float(weights, targets, input_scales, scheme, ignore)
    else:
        out, dequantized, qconfig = _fp8_method(weights, targets, input_scales, scheme, ignore)
    _save(dst, out, qconfig)
    if dequantized_folder is not None:
        twin = Path(dequantized_folder)
        _copy_side_files(src, twin)
        _save(twin, {**weights, **dequantized}, None)
    return dst


def _fp8_method(weights: dict[str, torch.Tensor], targets: list[str], input_scales: dict[str, torch.Tensor],
                scheme: str, ignore: Sequence[str]) -> tuple[dict, dict, dict]:
    out, dequantized = dict(weights), {}
    for name in targets:
        module = name.removesuffix(".weight")
        w = weights[name]
        if scheme == "block":
            q, scale = quantize_blocks(w, FP8_BLOCK)
            out[f"{module}.weight_scale_inv"] = scale
            dequantized[name] = q.float() * expand_blocks(scale, *w.shape, FP8_BLOCK)
        else:
            q, scale = _per_tensor(w)
            out[f"{module}.weight_scale"] = scale
            dequantized[name] = q.float() * scale
        out[name] = q
        if module in input_scales:
            out[f"{module}.input_scale"] = input_scales[module]
    qconfig: dict[str, Any] = {"quant_method": "fp8", "activation_scheme": "static" if input_scales else "dynamic"}
    if scheme == "block":
        qconfig["weight_block_size"] = list(FP8_BLOCK)
    if ignore:
        qconfig["ignored_layers"] = list(ignore)
    return out, dequantized, qconfig


def _compressed_tensors_float(weights: dict[str, torch.Tensor], targets: list[str],
                              input_scales: dict[str, torch.Tensor], scheme: str,
                              ignore: Sequence[str]) -> tuple[dict, dict, dict]:
    from compressed_tensors.compressors import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    per_channel = scheme == "ct-channel-dynamic"
    weight_args = QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=False,
                                   strategy="channel" if per_channel else "tensor")
    act_args = QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=per_channel,
                                strategy="token" if per_channel else "tensor")
    qscheme = QuantizationScheme(targets=["Linear"], weights=weight_args, input_activations=act_args)
    out, dequantized = dict(weights), {}
    for name in targets:
        module = name.removesuffix(".weight")
        w = weights[name].float()
        amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().reshape(1)
        state = {"weight": w, "weight_scale": (amax / FP8_MAX).clamp_min(SCALE_FLOOR)}
        compressed = FloatQuantizationCompressor.compress(state, qscheme)
        for key, value in compressed.items():
            out[f"{module}.{key}"] = value
        dequantized[name] = FloatQuantizationCompressor.decompress(dict(compressed), qscheme)["weight"].float()
        if module in input_scales:
            out[f"{module}.input_scale"] = input_scales[module].reshape(1)
    config = QuantizationConfig(config_groups={"group_0": qscheme}, format="float-quantized",
                                ignore=["lm_head", *ignore], quantization_status="compressed")
    return out, dequantized, json.loads(json.dumps(config.model_dump(exclude_none=True), default=str))
