"""Which format a model runs in: from its ``quantization_config``, its GGUF tensors, or ``--quantization``.

Formats are imported only when a model asks for them. Each names a class with ``from_hf(quantization_config:
dict) -> QuantConfig`` (a checkpoint in that format) and, where the format can quantize a full-precision model at
load, ``online() -> QuantConfig``.
"""

from __future__ import annotations

import importlib
from typing import Any

from inferneo.quantization.base import QuantConfig

# ``--quantization`` / ``quant_method`` name -> "module:class"
QUANTIZATION_METHODS: dict[str, str] = {
    "fp8": "inferneo.quantization.fp8:Fp8Config",
    "compressed-tensors": "inferneo.quantization.compressed_tensors:CompressedTensorsConfig",
    "awq": "inferneo.quantization.int4:AwqConfig",
    "gptq": "inferneo.quantization.int4:GptqConfig",
    "gguf": "inferneo.quantization.gguf:GGUFQuantConfig",
}
# Formats a model file de-quantizes itself while loading (gpt-oss's MXFP4 experts): no linear layer changes.
DEQUANTIZED_BY_THE_MODEL = ("mxfp4",)
# Spellings of quant_method that name the same format.
_ALIASES = {"compressed_tensors": "compressed-tensors"}


def _format_class(name: str):
    module, cls = QUANTIZATION_METHODS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"quantization {name!r} is not available in this install ({exc})") from None


def _supported() -> str:
    return ", ".join(QUANTIZATION_METHODS)


def resolve_quant_config(hf_config: dict[str, Any], asked: str | None) -> QuantConfig | None:
    """The format to run the model in, or None for full precision.

    A checkpoint's own ``quantization_config`` decides; ``asked`` (``--quantization``), when given, must name the
    same format. Without one, ``asked`` quantizes the full-precision weights at load where the format can
    (``fp8``). Raises ValueError naming what is supported otherwise.
    """
    qcfg = hf_config.get("quantization_config")
    if qcfg is not None:
        if not isinstance(qcfg, dict) or not isinstance(qcfg.get("quant_method"), str):
            raise ValueError("config.json's quantization_config has no quant_method")
        method = _ALIASES.get(qcfg["quant_method"].lower(), qcfg["quant_method"].lower())
        if method in DEQUANTIZED_BY_THE_MODEL:
            if asked is not None:
                raise ValueError(f"the checkpoint's {method} weights are de-quantized at load; "
                                 f"--quantization {asked} cannot be applied on top")
            return None
        if method not in QUANTIZATION_METHODS:
            raise ValueError(f"the checkpoint is quantized with {method!r}, which Inferneo does not load; "
                             f"supported: {_supported()}")
        if asked is not None and asked != method:
            raise ValueError(f"the checkpoint is quantized with {method}; --quantization {asked} does not match it "
                             f"(leave --quantization out, or pass {method})")
        return _format_class(method).from_hf(qcfg)
    if asked is None:
        return None
    if asked not in QUANTIZATION_METHODS:
        raise ValueError(f"unknown quantization {asked!r}; supported: {_supported()}")
    cls = _format_class(asked)
    if not hasattr(cls, "online"):
        raise ValueError(f"--quantization {asked} needs a checkpoint quantized with {asked}, and this one holds "
                         "full-precision weights (no quantization_config in its config.json, or, for a GGUF file, "
                         "only F32/F16/BF16 tensors); only fp8 quantizes a full-precision model at load: leave "
                         "--quantization out to load it as it is")
    return cls.online()
