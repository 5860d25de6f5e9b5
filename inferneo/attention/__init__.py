"""Attention backends: a registry from name to implementation."""

from __future__ import annotations

import logging

import torch
from torch import nn

from inferneo.attention.backend import (
    AttentionBackend,
    AttentionFeature,
    AttentionMetadata,
    PrefillSpan,
    attention_features,
)
from inferneo.attention.torch_ref import TorchReferenceBackend
from inferneo.kernel_config import KernelConfig

logger = logging.getLogger(__name__)


def _cpu_native(device: torch.device | None, kernels: KernelConfig | None) -> AttentionBackend:
    from inferneo.attention.cpu_native import CpuNativeBackend

    return CpuNativeBackend(kernels)


def _triton(device: torch.device | None, kernels: KernelConfig | None) -> AttentionBackend:
    from inferneo.attention.triton_backend import TritonBackend  # imports triton: only when asked for

    # With a device and switches the PDL choice is made once here; without, per launch (see ``_pdl.pdl_for``).
    pdl = None if device is None or kernels is None else kernels.pdl_on(device)
    return TritonBackend(pdl=pdl)


_BACKENDS = {"torch": lambda device, kernels: TorchReferenceBackend(), "cpu": _cpu_native, "triton": _triton}


def get_attention_backend(name: str, device: torch.device | None = None,
                          kernels: KernelConfig | None = None) -> AttentionBackend:
    """An attention backend by name, for a model on ``device`` with the engine's kernel switches ``kernels``
    (None: the environment's)."""
    try:
        factory = _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(_BACKENDS)}") from None
    return factory(device, kernels)


def default_attention_backend(device: torch.device, kernels: KernelConfig | None = None) -> AttentionBackend:
    """The fastest backend that works on this device with the switches ``kernels`` (None: the environment's).

    On CPU the native kernel when it builds and ``cpu_native_kernels`` is on; on CUDA the Triton kernels when
    triton imports; else PyTorch.
    """
    if device.type == "cpu":
        try:
            return get_attention_backend("cpu", device, kernels)
        except RuntimeError as exc:
            logger.info("using the PyTorch attention backend: %s", exc)
    elif device.type == "cuda":
        try:
            return get_attention_backend("triton", device, kernels)
        except ImportError as exc:
            logger.info("using the PyTorch attention backend (triton unavailable): %s", exc)
    return TorchReferenceBackend()


def model_attention_features(model: nn.Module) -> frozenset[AttentionFeature]:
    """Every attention feature some layer of ``model`` needs: the union of ``attention_features()`` over its
    modules that define it."""
    needed: set[AttentionFeature] = set()
    for module in model.modules():
        features = getattr(module, "attention_features", None)
        if callable(features):
            needed |= features()
    return frozenset(needed)


def backend_for_model(model: nn.Module, backend: AttentionBackend, *, chosen_by_user: bool) -> AttentionBackend:
    """``backend`` when it supports every feature ``model`` needs; otherwise the PyTorch backend, bound to every
    layer of ``model`` that held ``backend`` (one log line says why). A backend the user named that lacks a
    feature is a ValueError instead."""
    missing = model_attention_features(model) - backend.supported_features
    if not missing:
        return backend
    names = ", ".join(sorted(missing))
    if chosen_by_user:
        raise ValueError(f"attention backend {backend.name!r} does not support {names}, which this model needs; "
                         f"use attention backend 'torch' (supports {', '.join(sorted(AttentionFeature))})")
    logger.warning("attention backend %r lacks %s for this model: using the PyTorch attention backend",
                   backend.name, names)
    fallback = TorchReferenceBackend()
    for module in model.modules():
        if getattr(module, "backend", None) is backend:
            module.backend = fallback
    return fallback


__all__ = [
    "AttentionBackend",
    "AttentionFeature",
    "AttentionMetadata",
    "PrefillSpan",
    "TorchReferenceBackend",
    "attention_features",
    "backend_for_model",
    "default_attention_backend",
    "get_attention_backend",
    "model_attention_features",
]
