"""Attention backends: a registry from name to implementation."""

from __future__ import annotations

import logging

import torch

from inferneo.attention.backend import AttentionBackend, AttentionMetadata, PrefillSpan
from inferneo.attention.torch_ref import TorchReferenceBackend

logger = logging.getLogger(__name__)


def _cpu_native() -> type[AttentionBackend]:
    from inferneo.attention.cpu_native import CpuNativeBackend

    return CpuNativeBackend


def _triton() -> type[AttentionBackend]:
    from inferneo.attention.triton_backend import TritonBackend  # imports triton: only when asked for

    return TritonBackend


_BACKENDS = {"torch": lambda: TorchReferenceBackend, "cpu": _cpu_native, "triton": _triton}


def get_attention_backend(name: str) -> AttentionBackend:
    """An attention backend by name."""
    try:
        factory = _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(_BACKENDS)}") from None
    return factory()()


def default_attention_backend(device: torch.device) -> AttentionBackend:
    """The fastest backend that works on this device.

    On CPU the native kernel when it builds; on CUDA the Triton kernels when triton imports; else PyTorch.
    """
    if device.type == "cpu":
        try:
            return get_attention_backend("cpu")
        except RuntimeError as exc:
            logger.info("using the PyTorch attention backend: %s", exc)
    elif device.type == "cuda":
        try:
            return get_attention_backend("triton")
        except ImportError as exc:
            logger.info("using the PyTorch attention backend (triton unavailable): %s", exc)
    return TorchReferenceBackend()


__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "PrefillSpan",
    "TorchReferenceBackend",
    "default_attention_backend",
    "get_attention_backend",
]
