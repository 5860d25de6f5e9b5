"""Tiny embedding models for tests and docs: a tiny decoder checkpoint plus the sentence-transformers files
(``modules.json``, ``1_Pooling/config.json``, a ``Normalize`` module) that make it an embedding model, laid out
as ``Qwen3-Embedding`` ships them, so that ``sentence_transformers.SentenceTransformer(folder)`` loads it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from inferneo.testing.tiny_models import make_tiny_checkpoint

_POOLING_KEYS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "last": "pooling_mode_lasttoken"}


def write_sentence_transformers_files(path: Path, method: str, hidden_size: int, normalize: bool = True,
                                      max_seq_length: int = 512) -> Path:
    """Write the sentence-transformers files of a ``method`` ("mean", "cls" or "last") pooling model into the
    model folder ``path``; returns ``path``."""
    if method not in _POOLING_KEYS:
        raise ValueError(f"method must be one of {', '.join(_POOLING_KEYS)}; got {method!r}")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "modules.json").write_text(json.dumps(modules, indent=2))
    pooling = {"word_embedding_dimension": hidden_size, **{key: False for key in _POOLING_KEYS.values()},
               "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
               "pooling_mode_weightedmean_tokens": False, "include_prompt": True}
    pooling[_POOLING_KEYS[method]] = True
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                "do_lower_case": False}))
    (path / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {}, "default_prompt_name": None,
                                                                        "similarity_fn_name": "cosine"}))
    return path


def make_tiny_embedding_model(path: Path, method: str = "last", arch: str = "qwen3", normalize: bool = True,
                              matryoshka: bool = False, base: Path | None = None, **checkpoint_options) -> Path:
    """A tiny ``arch`` checkpoint (``make_tiny_checkpoint``; or a copy of the checkpoint folder ``base``) with
    sentence-transformers pooling files; ``matryoshka`` declares ``is_matryoshka`` in its config.json."""
    if base is not None:
        shutil.copytree(base, path, dirs_exist_ok=True)
    else:
        make_tiny_checkpoint(path, arch, **checkpoint_options)
    config = json.loads((path / "config.json").read_text())
    if matryoshka:
        config["is_matryoshka"] = True
        (path / "config.json").write_text(json.dumps(config, indent=2))
    return write_sentence_transformers_files(path, method, config["hidden_size"], normalize)
