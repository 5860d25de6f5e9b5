"""Quantized weights: the formats Inferneo loads and runs, recognised from ``quantization_config`` in a
checkpoint's ``config.json`` (or a GGUF file's tensor types), or asked for with ``--quantization``.

See :mod:`inferneo.quantization.base` for the seam (``QuantConfig`` -> ``LinearMethod`` -> ``QuantizedLinear``)
and :func:`resolve_quant_config` for how a format is chosen.
"""

from inferneo.quantization.base import (
    LinearMethod,
    LinearShape,
    QuantConfig,
    QuantizedExperts,
    QuantizedLinear,
    finalize_quantized_linears,
    quantize_linears,
    quantized_experts,
    quantized_linears,
)
from inferneo.quantization.registry import QUANTIZATION_METHODS, resolve_quant_config

__all__ = [
    "QUANTIZATION_METHODS",
    "LinearMethod",
    "LinearShape",
    "QuantConfig",
    "QuantizedExperts",
    "QuantizedLinear",
    "finalize_quantized_linears",
    "quantize_linears",
    "quantized_experts",
    "quantized_linears",
    "resolve_quant_config",
]
