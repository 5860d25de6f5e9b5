"""What a caller names an adapter with: :class:`LoRARequest`, vLLM's record, and its wire form ``LoraRef``."""

from __future__ import annotations

from dataclasses import dataclass

from inferneo.engine.protocol import LoraRef


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """A LoRA adapter to run a request with (vLLM's names).

    ``lora_name`` is what users call it, ``lora_int_id`` (a positive integer) keys its weights in the engine's
    adapter slots and its prefix-cache entries, and ``lora_path`` is a PEFT folder (``adapter_config.json`` and
    ``adapter_model.safetensors``). Two requests with the same id must name the same adapter.
    ``base_model_name`` (vLLM's) names the model the adapter was trained on: informational, as in vLLM.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError("lora_name must be a non-empty string")
        if type(self.lora_int_id) is not int or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be a positive integer, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError("lora_path must be a non-empty string")
        if self.base_model_name is not None and not isinstance(self.base_model_name, str):
            raise ValueError(f"base_model_name must be a string or None, got {self.base_model_name!r}")

    def to_ref(self) -> LoraRef:
        """The record that travels to the engine core with the request."""
        return LoraRef(self.lora_name, self.lora_int_id, self.lora_path)
