"""Small building blocks shared by the model files: RMSNorm and the gated MLP activation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inferneo.distributed.peer_all_reduce import PartialSum
from inferneo.kernels.cpu import native_ops_for
from inferneo.kernels.triton_ops import cuda_ops_for


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 as Hugging Face does."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor | PartialSum, residual: torch.Tensor | None = None):
        """Normalize ``x``; with ``residual``, first add it and return ``(normalized, new_residual)``.

        ``x`` may be a row-parallel layer's :class:`PartialSum`: then the all-reduce, the add and the norm are one
        fused kernel.
        """
        if isinstance(x, PartialSum):
            assert residual is not None, "a partial sum is only fused into a norm with a residual"
            return x.add_rms_norm(residual, self.weight, self.eps)
        cuda = cuda_ops_for(x)
        if cuda is not None:  # one fused Triton kernel (residual += x in place, then the norm)
            return cuda.rms_norm(x, residual, self.weight, self.eps)
        native = native_ops_for(x)
        if native is not None and x.is_contiguous():
            if residual is None:
                return native.rms_norm(x, None, self.weight, self.eps)
            residual = residual.contiguous()
            return native.rms_norm(x, residual, self.weight, self.eps), residual  # residual += x in place
        if residual is not None:
            x = x + residual
            residual = x
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * xf.to(x.dtype)
        return out if residual is None else (out, residual)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU of the first half times the second half (the gate and up projections fused)."""
    cuda = cuda_ops_for(x)
    if cuda is not None:
        return cuda.silu_and_mul(x)
    native = native_ops_for(x)
    if native is not None and x.is_contiguous():
        return native.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
