"""Fused elementwise GPU kernels in Triton: RMSNorm (with the residual add), SiLU-and-mul, rotary in place (with
the per-head q/k RMSNorm before it, for models with q/k norms).

Each replaces several PyTorch kernels (and their round trips through memory) with one. They follow the
arithmetic of the PyTorch path: RMSNorm and rotary compute in float32, the residual sum and the normalized value
are rounded to the model dtype where the reference rounds them. The model's modules call them on CUDA only: the
device transform (``inferneo.model_executor.device_kernels``) swaps them in when the model is built; tests run
them on CPU under Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools

import torch

from inferneo.kernel_config import KernelConfig


@functools.cache
def load_triton_ops():
    """This module's kernels, or None when Triton is missing (asked once per process)."""
    try:
        from inferneo.kernels import _triton_elementwise
    except ImportError:
        return None
    return _triton_elementwise


def triton_ops_for(device: torch.device, kernels: KernelConfig | None = None):
    """The fused-kernel module for a model on ``device``: CUDA, Triton importable and the ``triton_ops`` switch
    on (``kernels``; None: the environment's); else None."""
    kernels = kernels or KernelConfig.from_env()
    if device.type != "cuda" or not kernels.triton_ops:
        return None
    return load_triton_ops()


def available() -> bool:
    """True when the Triton kernels can be loaded (on any device, e.g. under the interpreter)."""
    return load_triton_ops() is not None
