"""The model's fingerprint: what the server reports as OpenAI's ``system_fingerprint``.

OpenAI's field names the backend configuration an answer came from, so that a caller can tell when it changed.
Here it is a digest of what decides the model's outputs: the checkpoint (its ``config.json`` or GGUF file, its
weight files' names and sizes; the bytes are not read, so a fingerprint costs nothing at start-up), the compute
dtype, the quantization, the KV cache's element type and ``hf_overrides``. The front end folds in the chat
template (:func:`system_fingerprint`) and a LoRA adapter's folder. Inferneo's version is left out on purpose: an
upgrade does not make earlier results another model's. ``inferneo batch`` compares it to refuse resuming a job's
output with another model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FINGERPRINT_PREFIX = "inferneo-"


def core_fingerprint(source_kind: str, source_path: Path, settings: dict[str, Any]) -> str:
    """The digest of a loaded model: its files' identity and ``settings`` (dtype, quantization, ...)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    if source_kind == "gguf":
        digest.update(f"gguf {source_path.name} {source_path.stat().st_size}".encode())
    else:
        from inferneo.model_loader.hf_files import weight_files

        digest.update((source_path / "config.json").read_bytes())
        try:
            files = weight_files(source_path)
        except FileNotFoundError:  # a preset or dummy-weights folder
            files = []
        for path in files:
            digest.update(f"{path.name} {path.stat().st_size}".encode())
    return digest.hexdigest()


def system_fingerprint(core: str, chat_template: Any, adapter_path: str | None = None) -> str:
    """``system_fingerprint`` of answers from the core ``core`` under ``chat_template``, with the LoRA adapter in
    ``adapter_path`` if one."""
    digest = hashlib.sha256(core.encode())
    digest.update(json.dumps(chat_template, sort_keys=True, default=str).encode())
    if adapter_path is not None:
        digest.update(b"lora " + str(Path(adapter_path).resolve()).encode())
    return FINGERPRINT_PREFIX + digest.hexdigest()[:16]
