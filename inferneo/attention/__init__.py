"""Attention backends: a registry from name to implementation."""

from inferneo.attention.backend import AttentionBackend, AttentionMetadata, PrefillSpan
from inferneo.attention.torch_ref import TorchReferenceBackend

_BACKENDS: dict[str, type[AttentionBackend]] = {"torch": TorchReferenceBackend}


def get_attention_backend(name: str) -> AttentionBackend:
    """An attention backend by name."""
    try:
        return _BACKENDS[name]()
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(_BACKENDS)}") from None


__all__ = ["AttentionBackend", "AttentionMetadata", "PrefillSpan", "TorchReferenceBackend", "get_attention_backend"]
