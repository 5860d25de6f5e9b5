"""LoRA for one-row inputs on CUDA (a batch-1 decode step): two launches per projection.

The batched apply (``kernels/triton_lora.lora_apply_triton``) runs after the projection: shrink, then expand
into its output, two kernels besides the base GEMV. For one row, :func:`lora_linear_row` launches the row shrink
(``lora_shrink_row``) and then the base projection's own Triton GEMV with the delta added in its epilogue, and
:func:`lora_silu_mul_row` does the same for the gated MLP's fused gate/up + SiLU GEMV, so the MLP keeps that
kernel. Both return None where the projection does not run the Triton GEMV for this input (another width or
dtype, a quantized layer, several rows): the caller then takes the batched apply. Imports Triton (CUDA only).
"""

from __future__ import annotations

import torch

from inferneo.kernels.triton_lora import lora_shrink_row
from inferneo.lora.layers import LoRABatch, LoRALinear
from inferneo.model_executor.layers.gpu_linear import DecodeGemv, DecodeLinear


def _row_gemv(layer: LoRALinear) -> DecodeGemv | None:
    """The Triton GEMV of ``layer``'s base projection: a ``DecodeLinear`` with one; else None."""
    base = layer.base
    return base.gemv if type(base) is DecodeLinear else None


def lora_linear_row(layer: LoRALinear, x: torch.Tensor, batch: LoRABatch) -> torch.Tensor | None:
    """``layer(x)`` with the step's LoRA deltas for a one-row ``x``, in two launches; None where the base
    projection's GEMV does not take ``x``."""
    gemv = _row_gemv(layer)
    rows = x.reshape(-1, layer.in_features)
    if gemv is None or not gemv.applies(rows, layer.base.weight):
        return None
    rows = rows.contiguous()
    lora = lora_shrink_row(rows, layer.lora_a, layer.lora_b, batch.seg_starts, pdl=gemv.pdl)
    y = gemv.ops.gemv(rows, layer.base.weight, layer.base.bias, pdl=gemv.pdl, lora=lora)
    return y.view(*x.shape[:-1], layer.out_features)


def lora_silu_mul_row(gate_up: LoRALinear, x: torch.Tensor, batch: LoRABatch,
                      gemv: DecodeGemv) -> torch.Tensor | None:
    """``silu(g) * u`` of the gated MLP's LoRA gate/up projection ``gate_up`` (``[g, u] = gate_up(x)``, deltas
    included) for a one-row ``x``, through ``gemv``'s fused kernel; None where it does not take ``x``."""
    weight = gate_up.base.weight
    if not gemv.applies(x, weight):
        return None
    x = x.contiguous()
    lora = lora_shrink_row(x, gate_up.lora_a, gate_up.lora_b, batch.seg_starts, pdl=gemv.pdl)
    return gemv.ops.gemv_silu_mul(x, weight, pdl=gemv.pdl, lora=lora)
