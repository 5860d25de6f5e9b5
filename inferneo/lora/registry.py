"""The server's adapters by name: what ``--lora-modules`` and ``/v1/load_lora_adapter`` added.

Each adapter is checked against the model when it is added (the same checks the engine runs), so a bad one is
refused there with a 400, and gets an id of its own: an adapter loaded again under its old name after an unload
is a new adapter to the engine (its slots and prefix-cache entries start afresh).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

from inferneo.engine.protocol import LoraRef
from inferneo.lora.adapter import LoRAAdapterError, load_adapter, lora_targets


class LoRANotFoundError(LookupError):
    """No adapter of that name is loaded (the server answers 404)."""


@dataclass(frozen=True, slots=True)
class LoraModule:
    """A ``--lora-modules`` entry: ``name=path``, or vLLM's JSON form ``{"name": ..., "path": ...,
    "base_model_name": ...}`` (``base_model_name``, optional, is the adapter's ``parent`` in ``/v1/models``)."""

    name: str
    path: str
    base_model_name: str | None = None

    @classmethod
    def parse(cls, text: str) -> LoraModule:
        """One ``--lora-modules`` argument; raises ValueError saying what is wrong with it."""
        if text.lstrip().startswith("{"):
            return cls._from_json(text)
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules entries are name=path or a JSON object; got {text!r}")
        return cls(name, path)

    @classmethod
    def _from_json(cls, text: str) -> LoraModule:
        form = 'a JSON --lora-modules entry is {"name": ..., "path": ..., "base_model_name": ... (optional)}'
        try:
            entry = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{form}; {text!r} is not valid JSON ({exc})") from None
        if not isinstance(entry, dict):
            raise ValueError(f"{form}; got {text!r}")
        unknown = sorted(set(entry) - {"name", "path", "base_model_name"})
        if unknown:
            raise ValueError(f"{form}; {text!r} has {', '.join(map(repr, unknown))} too")
        for key in ("name", "path", "base_model_name"):
            value = entry.get(key)
            if (key != "base_model_name" or value is not None) and (not isinstance(value, str) or not value):
                raise ValueError(f"{form}; its {key!r} must be a non-empty string, got {value!r}")
        return cls(entry["name"], entry["path"], entry.get("base_model_name"))


class LoRARegistry:
    """Adapters by name for a model of ``model_config`` (a ``DecoderConfig``), ranks up to ``max_lora_rank``.
    ``reserved`` are names adapters may not take (the served model names)."""

    def __init__(self, model_config, max_lora_rank: int, reserved: list[str]) -> None:
        self.targets = lora_targets(model_config)
        self.num_layers = model_config.num_layers
        self.max_lora_rank = max_lora_rank
        self.reserved = set(reserved)
        self._ids = itertools.count(1)
        self.adapters: dict[str, LoraRef] = {}
        self.base_model_names: dict[str, str] = {}  # adapter -> its parent, where --lora-modules named one

    def add(self, name: str, path: str, base_model_name: str | None = None, replace: bool = False) -> LoraRef:
        """Check the adapter in folder ``path`` and serve it as ``name``; raises LoRAAdapterError for a name in
        use or an adapter that does not fit the model. ``replace`` (vLLM's ``load_inplace``): a name in use now
        serves this adapter, under a new id (requests running with the one it replaces finish with it).
        ``base_model_name``: the ``parent`` its model card shows (default: the served model)."""
        if not isinstance(name, str) or not name.strip():
            raise LoRAAdapterError("lora_name must be a non-empty string", param="lora_name")
        self._check_free(name, replace)
        if not isinstance(path, str) or not path:
            raise LoRAAdapterError("lora_path must be a non-empty string")
        lora_id = next(self._ids)
        load_adapter(name, lora_id, path, self.targets, self.num_layers, self.max_lora_rank)
        self._check_free(name, replace)  # again: another load of this name may have finished meanwhile
        ref = self.adapters[name] = LoraRef(name, lora_id, path)
        self.base_model_names.pop(name, None)
        if base_model_name:
            self.base_model_names[name] = base_model_name
        return ref

    def _check_free(self, name: str, replace: bool = False) -> None:
        if (name in self.adapters and not replace) or name in self.reserved:
            raise LoRAAdapterError(f"The lora adapter '{name}' has already been loaded (or names the base model)",
                                   param="lora_name")

    def remove(self, name: str) -> LoraRef:
        """Stop serving adapter ``name`` (requests running with it finish); raises LoRANotFoundError."""
        ref = self.adapters.pop(name, None)
        self.base_model_names.pop(name, None)
        if ref is None:
            raise LoRANotFoundError(f"The lora adapter '{name}' cannot be found")
        return ref

    def get(self, name: str | None) -> LoraRef | None:
        return self.adapters.get(name) if name is not None else None
