"""The interface between the engine and a model runner, written down once.

The engine (``LLMEngine``, ``EngineCore``, the core process) and the API server reach the model only through
the members of :class:`Runner`. Two classes implement it: :class:`~inferneo.worker.model_runner.ModelRunner`
(one process) and :class:`~inferneo.worker.tensor_parallel.TensorParallelRunner` (rank 0 of a group, driving
worker processes). The tensor-parallel runner defines every member itself, each marked with
:func:`every_rank` or :func:`driver_only`, and forwards nothing implicitly: a member added here is abstract
until it is written there too, so it can never run on rank 0 alone by accident.

What the model must offer the runners is a separate contract, declared in
``inferneo.model_executor.models.interface.CausalLM`` (``num_kv_heads``, ``cast``, ``compute_logits``, ...).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

    from inferneo.attention import AttentionBackend
    from inferneo.model_executor.layers.rotary import LongRopeSwitch
    from inferneo.model_executor.models.llama import DecoderConfig
    from inferneo.worker.model_runner import InFlightStep, RunnerOutput
    from inferneo.worker.step_inputs import StepRecord

F = TypeVar("F", bound=Callable)

EVERY_RANK = "every rank"
DRIVER_ONLY = "driver only"


def every_rank(fn: F) -> F:
    """Mark a tensor-parallel runner member that runs on every rank (the workers first, then the driver)."""
    fn.__runs_on__ = EVERY_RANK
    return fn


def driver_only(fn: F) -> F:
    """Mark a tensor-parallel runner member that only the driver (rank 0) answers."""
    fn.__runs_on__ = DRIVER_ONLY
    return fn


class Runner(abc.ABC):
    """What the engine calls on a model runner.

    Set-up, in this order: ``load_weights`` or ``init_dummy_weights``, ``finalize_weights``, then (CUDA, no fixed
    KV budget) ``profile_kv_memory``, then ``allocate_kv_cache``. Each step: ``execute`` (synchronous scheduling)
    or ``launch`` (asynchronous). ``check_workers`` while idle, ``shutdown`` at the end.
    """

    # Read-only attributes (plain attributes of ModelRunner; properties answered by the tensor-parallel driver).
    model_config: DecoderConfig  # the model's shape; the engine reads ``vocab_size``
    backend: AttentionBackend  # the attention backend in use (logged and reported by tools)
    decode_buckets: list[int]  # batch sizes decode steps are padded to (CUDA graphs); empty when none
    # LongRoPE past the original context: which tokens rotate by the long factors (the KV cache keeps the blocks of
    # long prompts apart); None for every other model
    rope_switch: LongRopeSwitch | None
    sleep_level: int  # 0 while awake; 1 or 2 after ``sleep``
    # load keys of weights a level-2 sleep dropped that no ``update_weights`` has written since (none: it can serve)
    missing_weights: set[str]
    takes_prompt_embeds: bool  # the model's forward can start from given embeddings (``take_prompt_embeds``)

    @property
    @abc.abstractmethod
    def kv_bytes_per_block(self) -> int:
        """Bytes of KV cache one block takes over all layers (on each rank)."""

    @abc.abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint weights (Hugging Face names) into the model."""

    @abc.abstractmethod
    def init_dummy_weights(self, seed: int = 0) -> None:
        """Random weights from the config alone."""

    @abc.abstractmethod
    def finalize_weights(self) -> None:
        """Transforms that need the final weights (packing, kernel choices)."""

    @abc.abstractmethod
    def weights_update_refusal(self) -> str | None:
        """Why the loaded weights cannot take new values in place (quantized, LoRA, parallel); None if they can."""

    @abc.abstractmethod
    def update_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        """Copy new values (Hugging Face names, any part of the checkpoint) into the running model, all or none
        (ValueError, nothing changed, for an unknown name or a wrong shape)."""

    @abc.abstractmethod
    def sleep(self, level: int) -> None:
        """Free the KV cache (level 1; on CUDA the weights go to host memory) or also drop the weights (level 2)."""

    @abc.abstractmethod
    def wake_up(self) -> None:
        """Undo ``sleep``: weights back (zeros after level 2) and an empty KV cache."""

    @abc.abstractmethod
    def enable_lora(self, max_loras: int, max_lora_rank: int, max_cpu_loras: int, max_num_batched_tokens: int):
        """Wrap the model's projections with LoRA adapter slots (after ``finalize_weights``, before the KV cache);
        returns the slots (``inferneo.lora.slots.LoRASlots``). Raises ValueError where LoRA is not supported."""

    @abc.abstractmethod
    def take_prompt_embeds(self) -> None:
        """From now on steps may hold prompts given as embeddings (``ScheduledSequence.prompt_embeds``): the runner
        writes their rows in place of the placeholder tokens' embeddings. Only where ``takes_prompt_embeds``."""

    @abc.abstractmethod
    def profile_kv_memory(self, max_num_batched_tokens: int, gpu_memory_utilization: float) -> int:
        """Bytes the KV cache may take on the device, measured with a worst-case forward pass."""

    @abc.abstractmethod
    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Allocate ``num_blocks`` KV blocks (plus the spare padding block)."""

    @abc.abstractmethod
    def execute(self, step: StepRecord) -> RunnerOutput:
        """Run one scheduled step and return its sampled tokens."""

    @abc.abstractmethod
    def launch(self, step: StepRecord, previous: InFlightStep | None = None) -> InFlightStep:
        """Queue one step on the device and return without waiting for its tokens."""

    def check_workers(self, timeout: float = 0.0) -> None:
        """Raise if a helper process has exited (after waiting up to ``timeout`` s for one to exit); a runner
        without helper processes has nothing to check."""
        return None  # deliberately not abstract: a single-process runner has no helpers

    def shutdown(self) -> None:
        """Stop helper processes; a runner without any has nothing to stop."""
        return None  # deliberately not abstract, as above


def runner_members() -> tuple[str, ...]:
    """The names of the interface: attributes, properties and methods, sorted."""
    names = set(Runner.__annotations__)
    names.update(name for name, value in vars(Runner).items()
                 if not name.startswith("_") and (callable(value) or isinstance(value, property)))
    return tuple(sorted(names))
