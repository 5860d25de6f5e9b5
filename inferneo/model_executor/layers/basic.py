"""Small building blocks shared by the model files: RMSNorm (and Gemma's offset variant), LayerNorm and the gated
MLP activations, in plain PyTorch.

Faster versions for a device (native CPU kernels, Triton on CUDA, the tensor-parallel fused all-reduce + norm)
replace these modules once the model is built: ``inferneo.model_executor.device_kernels``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _over_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x`` in float32 divided by its root mean square over the last dimension."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


class ResidualNorm(nn.Module):
    """A norm that may first add the residual stream: ``norm(x)``, or with ``residual`` ``(norm(x + residual),
    x + residual)``, the decoder layers' convention; subclasses say how to ``normalize``."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalize ``x``; with ``residual``, first add it and return ``(normalized, new_residual)``."""
        if residual is not None:
            x = x + residual
            residual = x
        out = self.normalize(x)
        return out if residual is None else (out, residual)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class RMSNorm(ResidualNorm):
    """Root-mean-square layer norm, computed in float32 as Hugging Face does."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` over its root mean square (in float32), back in ``x``'s dtype, times the weight."""
        return self.weight * _over_rms(x, self.eps).to(x.dtype)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the stored weight is an offset, ``x_normalized * (1 + weight)``, all in float32 before the
    result goes back to the input dtype (as Hugging Face's Gemma 2 and Gemma 3 norms do)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        nn.init.zeros_(self.weight)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` over its root mean square times ``1 + weight``, all in float32, back in ``x``'s dtype."""
        return (_over_rms(x, self.eps) * (1.0 + self.weight.float())).to(x.dtype)


class LayerNorm(ResidualNorm):
    """Layer norm over the last dimension, computed in float32 (``F.layer_norm``) and cast back, with RMSNorm's
    residual convention. ``weight`` / ``bias``: whether the model learns a scale / a shift (OLMo 1 learns neither,
    Command-R only the scale)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, *, weight: bool = True, bias: bool = True) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size)) if weight else None
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` normalized in float32, scaled and shifted where the model has a weight and a bias, back in
        ``x``'s dtype."""
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), (self.hidden_size,), weight, bias, self.eps).to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU of the first half times the second half (the gate and up projections fused)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class SiluAndMul(nn.Module):
    """:func:`silu_and_mul` as a module, so that a device's kernel can take its place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)


class GeluAndMul(nn.Module):
    """GELU of the first half times the second half (Gemma's gated MLP); ``approximate`` is ``"tanh"`` (Hugging
    Face's ``gelu_pytorch_tanh``) or ``"none"`` (exact ``gelu``)."""

    def __init__(self, approximate: str = "tanh") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=self.approximate) * up
