"""Linear layers on the GPU: single-row inputs (batch-1 decode steps) through the Triton GEMV, the rest cuBLAS.

Applied to a built model as a transform, like the CPU oneDNN one: every CUDA ``nn.Linear`` in half precision
becomes a ``DecodeLinear`` that shares its weight and bias (nothing is copied). Tensor-parallel layers whose
forward does more than the matmul call :func:`linear` themselves.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from inferneo import envs


@functools.cache
def _gemv():
    """The GEMV module, or None without Triton or with ``INFERNEO_TRITON_GEMV=0``."""
    if not envs.triton_gemv():
        return None
    try:
        from inferneo.kernels import triton_gemv
    except ImportError:
        return None
    return triton_gemv


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, with one-row CUDA inputs in half precision through the Triton GEMV. With ``out`` (2-D ``x``,
    no bias), the product is written there."""
    gemv = _gemv() if x.is_cuda else None
    if gemv is not None and gemv.gemv_applies(x, weight):
        return gemv.gemv(x, weight, bias, out=out)
    if out is None:
        return F.linear(x, weight, bias)
    assert bias is None and x.dim() == 2, "linear(out=...) takes a 2-D input and no bias"
    return torch.mm(x, weight.t(), out=out)


def gate_up_silu(x: torch.Tensor, gate_up: nn.Linear) -> torch.Tensor | None:
    """``silu(gate) * up`` of a gated MLP's fused gate/up projection in one GEMV kernel, for a one-row CUDA input
    in half precision (a batch-1 decode step); None where that does not apply (then project, then activate).
    ``INFERNEO_GEMV_SILU=0`` turns it off."""
    gemv = _gemv() if x.is_cuda else None
    if gemv is None or gate_up.bias is not None or not _gemv_silu_on() or not gemv.gemv_applies(x, gate_up.weight):
        return None
    return gemv.gemv_silu_mul(x, gate_up.weight)


@functools.cache
def _gemv_silu_on() -> bool:
    """Read once: the check runs in every layer of every eager decode step."""
    return envs.gemv_silu()


class DecodeLinear(nn.Linear):
    """An ``nn.Linear`` whose forward is :func:`linear`; built from an existing layer, sharing its parameters."""

    def __init__(self, layer: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight = layer.weight
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_decode_linears(model: nn.Module) -> int:
    """Swap every CUDA half-precision ``nn.Linear`` that has no forward of its own for a ``DecodeLinear``; returns
    how many. A no-op without Triton. Call after the weights are loaded."""
    if _gemv() is None:
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            plain = isinstance(child, nn.Linear) and type(child).forward is nn.Linear.forward  # no forward of its own
            if plain and child.weight.is_cuda and child.weight.dtype in (torch.bfloat16, torch.float16):
                setattr(parent, name, DecodeLinear(child))
                swapped += 1
    return swapped
