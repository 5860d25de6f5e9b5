"""Fused elementwise GPU kernels in Triton: RMSNorm (with the residual add), SiLU-and-mul, rotary in place.

Each replaces several PyTorch kernels (and their round trips through memory) with one. They follow the
arithmetic of the PyTorch path: RMSNorm and rotary compute in float32, the residual sum and the normalized value
are rounded to the model dtype where the reference rounds them. The model code calls them only for CUDA
tensors (``cuda_ops_for``); tests run them on CPU under Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools

import torch

from inferneo import envs


@functools.cache
def _load():
    """This module's kernels, or None when Triton is missing or switched off (``INFERNEO_TRITON_OPS=0``)."""
    if not envs.triton_ops():
        return None
    try:
        from inferneo.kernels import _triton_elementwise
    except ImportError:
        return None
    return _triton_elementwise


def cuda_ops_for(x: torch.Tensor):
    """The fused-kernel module when ``x`` is a CUDA tensor and Triton is usable, else None."""
    if not x.is_cuda:
        return None
    return _load()


def available() -> bool:
    """True when the Triton kernels can be loaded (on any device, e.g. under the interpreter)."""
    return _load() is not None
