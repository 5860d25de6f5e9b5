"""The loading API the engine calls: configs and weights for a resolved :class:`ModelSource`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from inferneo.json_text import json_object_option
from inferneo.model_loader.gguf_loader import gguf_config, gguf_generation_config, iter_gguf_weights
from inferneo.model_loader.hf_files import (
    hf_config,
    hf_generation_config,
    iter_hf_weights,
    with_both_spellings,
)
from inferneo.model_loader.source import ModelSource


def load_hf_config(source: ModelSource, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model's ``config.json`` as a dict (for GGUF, built from the metadata under the same HF keys), with
    ``overrides`` (``--hf-overrides``, see :func:`apply_hf_overrides`) set over it.

    ``rope_theta``, ``rope_scaling`` (None when plain) and ``torch_dtype`` are always present, whichever
    transformers version wrote the file.
    """
    config = gguf_config(source.path) if source.kind == "gguf" else hf_config(source.path)
    return apply_hf_overrides(config, overrides) if overrides else config


def apply_hf_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``config`` with each key of ``overrides`` set to its value (vLLM's ``hf_overrides``): a value replaces the
    config's whole value (a ``rope_scaling`` mapping is given whole). An override of transformers 5's
    ``rope_parameters`` also sets the ``rope_theta`` and ``rope_scaling`` the engine reads, unless those are
    overridden themselves."""
    merged = {**config, **overrides}
    if "rope_parameters" in overrides:
        for key in ("rope_theta", "rope_scaling"):
            if key not in overrides:
                merged.pop(key, None)
        with_both_spellings(merged)
        merged.setdefault("rope_scaling", None)
    return merged


def check_hf_overrides(value: Any) -> dict[str, Any] | None:
    """``--hf-overrides``' value (a JSON object, as text or a dict) as a dict; ``ValueError`` when it is not an
    object with string keys."""
    return json_object_option(value, "hf_overrides", " (config.json keys and values)")


def load_generation_config(source: ModelSource) -> dict[str, Any]:
    """``generation_config.json`` as a dict, ``{}`` when absent (for GGUF: the EOS / BOS ids)."""
    if source.kind == "gguf":
        return gguf_generation_config(source.path)
    return hf_generation_config(source.path)


# generation_config.json keys that are sampling defaults (what --generation-config vllm leaves out)
SAMPLING_DEFAULT_KEYS = ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_config_for(source: ModelSource, choice: str = "auto",
                          override: dict[str, Any] | None = None) -> dict[str, Any]:
    """The generation config requests are served with (``--generation-config``): ``auto``, the model's; ``vllm``,
    the model's without its sampling defaults (vLLM's name for "use the OpenAI defaults"); a folder, its
    ``generation_config.json`` with the model's EOS ids (which end the model's answers whatever the defaults).
    ``override`` (``--override-generation-config``, checked by :func:`check_generation_override`) sets sampling
    defaults over the chosen ones."""
    chosen = _chosen_generation_config(source, choice)
    if override:
        chosen = {**chosen, **override}
        if "temperature" in override:  # an explicit temperature samples (or not) as it says
            chosen.pop("do_sample", None)
    return chosen


GENERATION_OVERRIDE_KEYS = tuple(k for k in SAMPLING_DEFAULT_KEYS if k != "do_sample")


def check_generation_override(value: Any) -> dict[str, Any] | None:
    """``--override-generation-config``'s value (a JSON object, as text or a dict) as a dict of sampling defaults;
    ``ValueError`` naming a key outside :data:`GENERATION_OVERRIDE_KEYS` or a value that is no valid default."""
    value = json_object_option(value, "override_generation_config")
    if value is None:
        return None
    unknown = sorted(set(value) - set(GENERATION_OVERRIDE_KEYS))
    if unknown:
        raise ValueError(f"override_generation_config: {', '.join(map(repr, unknown))} not supported; the keys are "
                         f"{', '.join(GENERATION_OVERRIDE_KEYS)}")
    from inferneo.sampling_params import SamplingParams

    try:
        SamplingParams(**value)  # each value as a request's would be checked
    except (TypeError, ValueError) as exc:
        raise ValueError(f"override_generation_config: {exc}") from None
    return dict(value)


def _chosen_generation_config(source: ModelSource, choice: str) -> dict[str, Any]:
    model = load_generation_config(source)
    if choice == "auto":
        return model
    if choice == "vllm":
        return {k: v for k, v in model.items() if k not in SAMPLING_DEFAULT_KEYS}
    folder = Path(choice).expanduser()
    if not (folder / "generation_config.json").is_file():
        raise FileNotFoundError(f"generation config {choice!r} (--generation-config): expected auto, vllm or a "
                                "folder with a generation_config.json")
    config = hf_generation_config(folder)
    if "eos_token_id" in model:
        config["eos_token_id"] = model["eos_token_id"]
    return config


def iter_weights(source: ModelSource) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` pairs, one tensor in memory at a time.

    Safetensors and .bin weights keep their checkpoint dtype; GGUF tensors are dequantized to float32.
    """
    if source.kind == "gguf":
        return iter_gguf_weights(source.path)
    return iter_hf_weights(source.path)
