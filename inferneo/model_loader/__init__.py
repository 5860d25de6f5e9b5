"""Model loading: find a model, read its config, stream its weights, build its tokenizer."""

from inferneo.model_loader.loader import (
    generation_config_for,
    iter_weights,
    load_generation_config,
    load_hf_config,
)
from inferneo.model_loader.source import (
    DEFAULT_MODEL_NAME,
    ModelSource,
    default_gguf_path,
    hf_cache_dir,
    resolve_model,
)
from inferneo.model_loader.tokenizer import load_tokenizer

__all__ = [
    "DEFAULT_MODEL_NAME",
    "ModelSource",
    "default_gguf_path",
    "generation_config_for",
    "hf_cache_dir",
    "iter_weights",
    "load_generation_config",
    "load_hf_config",
    "load_tokenizer",
    "resolve_model",
]
