"""Hugging Face model folders: config files and weights (safetensors, single or sharded, or pytorch .bin)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from inferneo.multimodal.config import (
    GEMMA3,
    MROPE_ARCHITECTURES,
    VISION_LANGUAGE_ARCHITECTURES,
    VISION_LANGUAGE_KEY,
    VisionLanguageConfig,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SINGLE = "pytorch_model.bin"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, with a clear error when it is not valid JSON."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, not {type(data).__name__}")
    return data


# An image processor's config: a Gemma 3 checkpoint with one is served with images, one without as text only.
IMAGE_PROCESSOR_CONFIG = "preprocessor_config.json"
# Multimodal architectures the engine serves as their language model alone (text in, text out) -> the transformers
# config class of that language model, whose defaults fill the keys a checkpoint's ``text_config`` leaves out.
LANGUAGE_MODEL_OF = {"Gemma3ForConditionalGeneration": "Gemma3TextConfig"}


def language_model_config(config: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of a multimodal checkpoint's language model: its ``text_config`` completed with the
    transformers defaults, under the checkpoint's architecture name (so the registry picks the text-only model),
    with the top-level token ids and dtype where the text config declares none."""
    import transformers

    name = next(n for n in config["architectures"] if n in LANGUAGE_MODEL_OF)
    declared = config.get("text_config") or {}
    text = _with_top_level_values(getattr(transformers, LANGUAGE_MODEL_OF[name])(**declared).to_dict(), declared,
                                  config)
    text["architectures"] = [name]
    return text


def _with_top_level_values(text: dict[str, Any], declared: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """A completed ``text_config`` (``text``) with the multimodal config's top-level token ids and dtype where the
    checkpoint's own ``text_config`` (``declared``) gives none (in place; returned)."""
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype"):
        if declared.get(key) is None and config.get(key) is not None:
            text[key] = config[key]
    return text


def hf_config(folder: Path) -> dict[str, Any]:
    """``config.json``, with the pre-5.0 keys (``rope_theta``, ``rope_scaling``, ``torch_dtype``) filled in; for
    a multimodal checkpoint the engine serves as text only (:data:`LANGUAGE_MODEL_OF`: a Gemma 3 without an image
    processor config), its language model's config.

    transformers >= 5 writes ``rope_parameters`` and ``dtype`` instead; both spellings are kept so the engine
    can read one set of keys whichever version saved the checkpoint.
    """
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
    config = read_json(path)
    names = config.get("architectures") or ()
    if any(name in LANGUAGE_MODEL_OF for name in names) and (
            GEMMA3 not in names or not (folder / IMAGE_PROCESSOR_CONFIG).is_file()):
        config = language_model_config(config)
    elif any(name in VISION_LANGUAGE_ARCHITECTURES for name in names):
        config = vision_language_model_config(config, folder)
    return with_both_spellings(config)


def vision_language_model_config(config: dict[str, Any], folder: Path | None = None) -> dict[str, Any]:
    """The served config of a LLaVA-style checkpoint: its language model's ``text_config`` completed with the
    transformers defaults of its ``model_type``, under that model's causal-LM architecture name, with the image
    settings (``VisionLanguageConfig``) beside it under ``VISION_LANGUAGE_KEY``."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config["architectures"][0] in MROPE_ARCHITECTURES:
        return _qwen_vl_model_config(config, folder)
    declared = dict(config.get("text_config") or {})
    model_type = declared.pop("model_type", "gemma3_text" if config["architectures"][0] == GEMMA3 else "llama")
    if model_type not in CONFIG_MAPPING or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{config['architectures'][0]}: unknown language model type {model_type!r}")
    text = _with_top_level_values(CONFIG_MAPPING[model_type](**declared).to_dict(), declared, config)
    text["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    text[VISION_LANGUAGE_KEY] = VisionLanguageConfig.from_hf(config, text["hidden_size"]).to_dict()
    return text


# Qwen's vision-language architectures -> the transformers config class of their language model.
_QWEN_VL_TEXT_CONFIGS = {"Qwen2VLForConditionalGeneration": "Qwen2VLTextConfig",
                         "Qwen2_5_VLForConditionalGeneration": "Qwen2_5_VLTextConfig"}


def _qwen_vl_model_config(config: dict[str, Any], folder: Path | None) -> dict[str, Any]:
    """The served config of a Qwen2-VL or Qwen2.5-VL checkpoint: its language model (transformers 5's
    ``text_config``, or transformers 4's top-level keys) completed with transformers' defaults, served as
    ``Qwen2ForCausalLM`` (its ``mrope_section`` makes the engine's rotary layers M-RoPE), with the image settings
    beside it, among them the most pixels ``folder``'s image processor leaves an image (``max_pixels``, or
    ``size.longest_edge`` as transformers 5 saves it), which the memory profile encodes."""
    import transformers

    name = config["architectures"][0]
    declared = dict(config.get("text_config") or {k: v for k, v in config.items() if k != "vision_config"})
    declared.pop("model_type", None)
    declared.pop("architectures", None)
    text = getattr(transformers, _QWEN_VL_TEXT_CONFIGS[name])(**declared).to_dict()
    text = _with_top_level_values(text, declared, config)
    # transformers 5 keeps the tying at the top level only (Qwen2-VL 2B ties its embeddings)
    text["tie_word_embeddings"] = bool(declared.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    text["architectures"] = ["Qwen2ForCausalLM"]
    settings = VisionLanguageConfig.from_hf(config, text["hidden_size"])
    preprocessor = folder / "preprocessor_config.json" if folder is not None else None
    if preprocessor is not None and preprocessor.is_file():
        values = read_json(preprocessor)
        most = values.get("max_pixels") or (values.get("size") or {}).get("longest_edge")
        if isinstance(most, int):
            settings = dataclasses.replace(settings, max_image_pixels=most)
    text[VISION_LANGUAGE_KEY] = settings.to_dict()
    return text


def with_both_spellings(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``rope_theta``, ``rope_scaling`` and ``torch_dtype`` filled in from transformers 5's
    ``rope_parameters`` and ``dtype`` where it lacks them (in place; returned)."""
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        if "rope_theta" not in config and "rope_theta" in params:
            config["rope_theta"] = params["rope_theta"]
        if config.get("rope_scaling") is None:
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            config["rope_scaling"] = scaling if rope_type != "default" else None
    if "torch_dtype" not in config and "dtype" in config:
        config["torch_dtype"] = config["dtype"]
    return config


def hf_generation_config(folder: Path) -> dict[str, Any]:
    """``generation_config.json``, or ``{}`` when the folder has none."""
    path = folder / "generation_config.json"
    return read_json(path) if path.is_file() else {}


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint files holding the weights, in loading order."""
    return list(_checkpoint_plan(folder))


def _checkpoint_plan(folder: Path) -> dict[Path, set[str] | None]:
    """Each weight file, with the tensor names an index assigns to it (None: every tensor in the file)."""
    for index_name in (SAFETENSORS_INDEX, TORCH_INDEX):
        index = folder / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index} has no weight_map")
            groups: dict[Path, set[str]] = {}
            for name, file_name in sorted(weight_map.items(), key=lambda item: item[1]):
                groups.setdefault(folder / file_name, set()).add(name)
            missing = [path.name for path in groups if not path.is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists shards that are not in {folder}: {', '.join(missing)}")
            return dict(groups)
    for single in (SAFETENSORS_SINGLE, TORCH_SINGLE):
        if (folder / single).is_file():
            return {folder / single: None}
    # non-standard names; consolidated*.safetensors is Mistral's own format, with other tensor names
    loose = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("consolidated"))
    if loose:
        return dict.fromkeys(loose)
    raise FileNotFoundError(
        f"no weights in {folder}: expected {SAFETENSORS_SINGLE}, sharded model-0000X-of-0000N.safetensors with "
        f"{SAFETENSORS_INDEX}, or {TORCH_SINGLE}"
    )


def weight_names(folder: Path) -> set[str] | None:
    """The tensor names of the checkpoint in ``folder``, read from its index or the safetensors headers (no
    tensor is loaded); None when they cannot be known without loading (PyTorch ``.bin`` files)."""
    names: set[str] = set()
    for path, listed in _checkpoint_plan(folder).items():
        if listed is not None:
            names |= listed
        elif path.suffix == ".safetensors":
            with open_safetensors(path) as f:
                names.update(f.keys())
        else:
            return None
    return names


def iter_hf_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor under its checkpoint name, read one at a time (safetensors lazily, .bin through mmap).

    With an index, each shard yields the tensors the index's ``weight_map`` assigns to it, and a name the map
    promises but the shard lacks is an error.
    """
    for path, wanted in _checkpoint_plan(folder).items():
        expected = set(wanted) if wanted is not None else None
        for name, tensor in _iter_file(path):
            if expected is None or name in expected:
                if expected is not None:
                    expected.discard(name)
                yield name, tensor
        if expected:
            raise ValueError(f"{path.name} lacks tensors its index lists: {', '.join(sorted(expected)[:5])}")


def open_safetensors(path: Path):
    """``safe_open`` on ``path`` (PyTorch tensors on the CPU); a file it cannot read is a ValueError that names it."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc}): it may be truncated or corrupt; "
                         "download it again") from None


def _iter_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        with open_safetensors(path) as file:
            for name in file.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, file.get_tensor(name)
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    while state:
        name = next(iter(state))
        yield name, state.pop(name)
