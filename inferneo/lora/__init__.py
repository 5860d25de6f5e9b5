"""LoRA adapters: PEFT folders loaded into a fixed number of adapter slots and applied per token in a batch.

``LoRARequest`` names an adapter (``inferneo.LoRARequest``); ``adapter`` reads and checks PEFT folders against
the model; ``layers`` wraps the model's projections with the batched LoRA apply; ``slots`` pages adapters into
the device slots (LRU) and builds each step's token-to-slot map; ``registry`` is the server's name -> adapter
table. See ``docs/adapters.md``.
"""

from inferneo.lora.request import LoRARequest

__all__ = ["LoRARequest"]
