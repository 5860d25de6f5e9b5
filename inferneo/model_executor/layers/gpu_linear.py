"""Linear layers on the GPU: single-row inputs (batch-1 decode steps) through the Triton GEMV, the rest cuBLAS.

Applied to a built model as a transform, like the CPU oneDNN one: every CUDA ``nn.Linear`` in half precision
becomes a ``DecodeLinear`` that shares its weight and bias (nothing is copied). Tensor-parallel layers whose
forward does more than the matmul call :func:`linear` themselves, with the :class:`DecodeGemv` the transform gives
them (their ``gemv`` attribute).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from inferneo.kernel_config import KernelConfig


@functools.cache
def load_gemv():
    """The GEMV module, or None without Triton (asked once per process)."""
    try:
        from inferneo.kernels import triton_gemv
    except ImportError:
        return None
    return triton_gemv


class DecodeGemv:
    """The Triton GEMV for one model: its launch options (PDL) and whether the gated MLP fuses its activation in,
    decided once when the model is built."""

    def __init__(self, ops, pdl: bool, silu: bool) -> None:
        self.ops, self.pdl, self.silu = ops, pdl, silu

    def applies(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """One CUDA row in half precision (see ``triton_gemv.gemv_applies``)."""
        return self.ops.gemv_applies(x, weight)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        return self.ops.gemv(x, weight, bias, out=out, pdl=self.pdl)

    def norm_applies(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether :meth:`norm_linear` takes ``x`` (see ``triton_gemv.norm_gemv_applies``)."""
        return self.ops.norm_gemv_applies(x, weight)

    def norm_linear(self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor, bias: torch.Tensor | None = None, store_normed: bool = False):
        """The RMSNorm of ``x`` (plus ``residual``) and the linear layer after it in one kernel: ``(product,
        residual sum)``, with ``store_normed`` ``(product, residual sum, normed row)`` (see
        ``triton_gemv.norm_gemv``)."""
        return self.ops.norm_gemv(x, residual, norm_weight, eps, weight, bias, pdl=self.pdl, store_normed=store_normed)

    def silu_mul(self, x: torch.Tensor, gate_up_weight: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of a gated MLP's fused gate/up projection in one kernel."""
        return self.ops.gemv_silu_mul(x, gate_up_weight, pdl=self.pdl)


def decode_gemv(device: torch.device, kernels: KernelConfig | None = None) -> DecodeGemv | None:
    """The GEMV for a model on ``device``: CUDA, Triton importable and the ``triton_gemv`` switch on (``kernels``;
    None: the environment's); else None."""
    kernels = kernels or KernelConfig.from_env()
    if device.type != "cuda" or not kernels.triton_gemv:
        return None
    ops = load_gemv()
    return None if ops is None else DecodeGemv(ops, kernels.pdl_on(device), kernels.gemv_silu)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None, gemv: DecodeGemv | None = None) -> torch.Tensor:
    """``F.linear``, with one-row CUDA inputs in half precision through ``gemv`` when given. With ``out`` (2-D
    ``x``, no bias), the product is written there."""
    if gemv is not None and gemv.applies(x, weight):
        return gemv.linear(x, weight, bias, out=out)
    if out is None:
        return F.linear(x, weight, bias)
    assert bias is None and x.dim() == 2, "linear(out=...) takes a 2-D input and no bias"
    return torch.mm(x, weight.t(), out=out)


class DecodeLinear(nn.Linear):
    """An ``nn.Linear`` whose forward is :func:`linear`; built from an existing layer, sharing its parameters."""

    def __init__(self, layer: nn.Linear, gemv: DecodeGemv | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight = layer.weight
        self.bias = layer.bias
        self.gemv = gemv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, gemv=self.gemv)


def use_decode_linears(model: nn.Module, gemv: DecodeGemv | None) -> int:
    """Swap every CUDA half-precision ``nn.Linear`` that has no forward of its own for a ``DecodeLinear``, and hand
    ``gemv`` to the layers that call :func:`linear` themselves (those with a ``gemv`` attribute); returns how many
    were swapped. A no-op without a GEMV. Call after the weights are loaded."""
    if gemv is None:
        return 0
    swapped = 0
    for parent in list(model.modules()):
        if isinstance(parent, nn.Linear) and hasattr(parent, "gemv") and parent.weight.is_cuda:
            parent.gemv = gemv
        for name, child in list(parent.named_children()):
            plain = isinstance(child, nn.Linear) and type(child).forward is nn.Linear.forward  # no forward of its own
            if plain and child.weight.is_cuda and child.weight.dtype in (torch.bfloat16, torch.float16):
                setattr(parent, name, DecodeLinear(child, gemv))
                swapped += 1
    return swapped
