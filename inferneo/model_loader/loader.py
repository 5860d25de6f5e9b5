"""The loading API the engine calls: configs and weights for a resolved :class:`ModelSource`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from inferneo.model_loader.gguf_loader import gguf_config, gguf_generation_config, iter_gguf_weights
from inferneo.model_loader.hf_files import hf_config, hf_generation_config, iter_hf_weights
from inferneo.model_loader.source import ModelSource


def load_hf_config(source: ModelSource) -> dict[str, Any]:
    """The model's ``config.json`` as a dict (for GGUF, built from the metadata under the same HF keys).

    ``rope_theta``, ``rope_scaling`` (None when plain) and ``torch_dtype`` are always present, whichever
    transformers version wrote the file.
    """
    if source.kind == "gguf":
        return gguf_config(source.path)
    return hf_config(source.path)


def load_generation_config(source: ModelSource) -> dict[str, Any]:
    """``generation_config.json`` as a dict, ``{}`` when absent (for GGUF: the EOS / BOS ids)."""
    if source.kind == "gguf":
        return gguf_generation_config(source.path)
    return hf_generation_config(source.path)


def iter_weights(source: ModelSource) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` pairs, one tensor in memory at a time.

    Safetensors and .bin weights keep their checkpoint dtype; GGUF tensors are dequantized to float32.
    """
    if source.kind == "gguf":
        return iter_gguf_weights(source.path)
    return iter_hf_weights(source.path)
