"""Adapter paging: PEFT folders read into a host cache, and adapters copied into a fixed number of device slots,
both least recently used first out.

:class:`LoRASlots` is the model runner's side of LoRA. ``check`` reads (and validates) an adapter when a request
naming it arrives, so that a bad one fails that request alone; ``prepare`` runs before each step: it gives every
adapter of the step a slot (the scheduler never runs more adapters at once than there are slots) and sets the
step's :class:`~inferneo.lora.layers.LoRABatch`. On CUDA the batch lives in static device buffers, which the
captured decode graphs read; each step fills them with one asynchronous copy from pinned memory (the runner's
``InputStager``), so preparing a step never waits for the one still running.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from inferneo import envs
from inferneo.engine.protocol import LoraRef
from inferneo.lora.adapter import LoRAAdapter, LoRAAdapterError, load_adapter, lora_targets
from inferneo.lora.layers import LoRABatch, LoRAState, lora_apply_torch, wrap_lora_layers
from inferneo.worker.staging import InputStager

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoRAStep:
    """Which adapters a step's sequences run with: ``loras`` (None: the base model), decodes first (``num_decode``
    one-token rows), then spans of ``span_tokens``; ``num_tokens`` counts padding rows too. ``graphed``: the step
    replays a captured graph, which reads the static buffers. The driver sends it to every tensor-parallel rank
    with the step, so that each prepares the same batch."""

    loras: list[LoraRef | None]
    num_decode: int
    span_tokens: list[int]
    num_tokens: int
    graphed: bool


class LoRASlots:
    """``num_slots`` device slots over the LoRA layers of ``model``; ``max_cpu_loras`` adapters kept read on the
    host. ``max_tokens`` bounds a step's tokens (the static grouping buffers on CUDA)."""

    def __init__(self, model: nn.Module, model_config, num_slots: int, max_rank: int, max_cpu_loras: int,
                 dtype: torch.dtype, device: torch.device, max_tokens: int,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.max_cpu_loras = max(max_cpu_loras, num_slots)
        self.dtype = dtype
        self.device = device
        self.num_layers = model_config.num_layers
        self.targets = lora_targets(model_config)
        if device.type == "cuda":
            from inferneo.kernels.triton_lora import lora_apply_triton

            self.state = LoRAState(lora_apply_triton)
            if envs.lora_fused_rows():
                from inferneo.lora.rows import lora_linear_row, lora_silu_mul_row

                self.state.linear_row, self.state.silu_mul_row = lora_linear_row, lora_silu_mul_row
            # one buffer, one copy a step: seg_starts first, then the sorted tokens
            self._grouping = torch.zeros(num_slots + 1 + max_tokens, dtype=torch.int64, device=device)
            self._segs, self._sorted = self._grouping[: num_slots + 1], self._grouping[num_slots + 1 :]
            self._stager = InputStager(device, initial=num_slots + 1 + max_tokens)
            self._static = LoRABatch([], self._sorted, self._segs)
        else:
            self.state = LoRAState(lora_apply_torch)
            self._static = None
        self.layers = wrap_lora_layers(model, self.targets, num_slots, max_rank, self.state, dtype, device,
                                       all_reduce)
        self.host: OrderedDict[int, LoRAAdapter] = OrderedDict()  # lora_id -> adapter, least recent first
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # lora_id -> slot, least recently used first
        self.num_loads = 0  # adapters copied into a slot (for tests and logs)
        # the ids of adapters that unfinished requests run with (the engine core sets it): their host copies stay,
        # so a request runs with the weights checked when it arrived, and a step never reads a folder (which may be
        # gone or rewritten by then)
        self.live_ids: Callable[[], set[int]] = set
        self._paths: dict[int, str] = {}  # every adapter id read so far -> its folder (an id names one adapter)

    # ---- adapters ----------------------------------------------------------------------------------------

    def check(self, ref: LoraRef) -> LoRAAdapter:
        """The adapter ``ref`` names, read from its folder unless cached; raises LoRAAdapterError if it does not
        fit the model. An id already cached must name the same folder. The least recently used copies beyond
        ``max_cpu_loras`` give way, those of ``live_ids`` (adapters of unfinished requests) excepted."""
        known = self._paths.get(ref.lora_id)
        if known is not None and known != ref.path:
            raise LoRAAdapterError(f"lora_int_id {ref.lora_id} is the adapter at {known}; {ref.name!r} ({ref.path}) "
                                   "needs an id of its own", param="lora_int_id")
        adapter = self.host.get(ref.lora_id)
        if adapter is not None:
            self.host.move_to_end(ref.lora_id)
            return adapter
        adapter = load_adapter(ref.name, ref.lora_id, ref.path, self.targets, self.num_layers, self.max_rank,
                               self.dtype)
        self.host[ref.lora_id] = adapter
        self._paths[ref.lora_id] = ref.path
        if len(self.host) > self.max_cpu_loras:
            keep = self.live_ids() | {ref.lora_id}
            for lora_id in [lid for lid in self.host if lid not in keep][: len(self.host) - self.max_cpu_loras]:
                del self.host[lora_id]
        return adapter

    def remove(self, lora_id: int) -> None:
        """Forget adapter ``lora_id`` (an unloaded adapter): its host copy and its slot. A request still running
        with it reads it again."""
        self.host.pop(lora_id, None)
        self._paths.pop(lora_id, None)
        slot = self.slot_of.pop(lora_id, None)
        if slot is not None:
            for layer in self.layers.values():
                layer.set_slot(slot, None)

    def _slot_for(self, ref: LoraRef, in_use: set[int]) -> int:
        slot = self.slot_of.get(ref.lora_id)
        if slot is not None:
            self.slot_of.move_to_end(ref.lora_id)
            return slot
        taken = set(self.slot_of.values())
        free = [s for s in range(self.num_slots) if s not in taken]
        if free:
            slot = free[0]
        else:
            victim = next((lid for lid in self.slot_of if lid not in in_use), None)
            if victim is None:
                raise RuntimeError(f"a step uses more than max_loras ({self.num_slots}) adapters")
            slot = self.slot_of.pop(victim)
        adapter = self.check(ref)
        for (layer, module), lora in self.layers.items():
            lora.set_slot(slot, adapter.weights.get((layer, module)))
        self.slot_of[ref.lora_id] = slot
        self.num_loads += 1
        return slot

    # ---- steps -------------------------------------------------------------------------------------------

    def prepare(self, step: LoRAStep) -> None:
        """Set the batch of ``step`` (see :class:`LoRAStep`)."""
        loras, num_decode, span_tokens, num_tokens, graphed = (step.loras, step.num_decode, step.span_tokens,
                                                               step.num_tokens, step.graphed)
        if not any(loras):
            self.state.batch = self._static if graphed else None
            if graphed:
                self._segs.zero_()
            return
        in_use = {ref.lora_id for ref in loras if ref is not None}
        seq_slots = [-1 if ref is None else self._slot_for(ref, in_use) for ref in loras]
        token_slots = np.full(num_tokens, -1, dtype=np.int64)
        token_slots[: num_decode] = seq_slots[: num_decode]
        offset = num_tokens - sum(span_tokens)
        for slot, count in zip(seq_slots[num_decode:], span_tokens, strict=True):
            token_slots[offset : offset + count] = slot
            offset += count
        if self._static is None:
            self.state.batch = LoRABatch([(slot, torch.from_numpy(np.flatnonzero(token_slots == slot)))
                                          for slot in sorted(set(seq_slots) - {-1})])
            return
        order = np.argsort(token_slots, kind="stable")
        order = order[token_slots[order] >= 0]
        counts = np.bincount(token_slots[token_slots >= 0], minlength=self.num_slots)
        if graphed:
            size = self.num_slots + 1 + len(order)
            host, host_tensor = self._stager.host(size)
            host[0] = 0
            np.cumsum(counts, out=host[1 : self.num_slots + 1])
            host[self.num_slots + 1 : size] = order
            self._stager.upload(host_tensor, size, target=self._grouping)
            self.state.batch = self._static
            return
        order = order.astype(np.int32)
        segs = np.zeros(self.num_slots + 1, dtype=np.int32)
        np.cumsum(counts, out=segs[1:])
        self.state.batch = LoRABatch([], torch.from_numpy(order).to(self.device, non_blocking=True),
                                     torch.from_numpy(segs).to(self.device, non_blocking=True))

    def begin_capture(self) -> None:
        """Before CUDA graphs are captured: the static batch, with no adapted token, is what they record."""
        if self._static is not None:
            self._segs.zero_()
            self.state.batch = self._static

    def describe(self) -> str:
        return (f"{self.num_slots} slots of rank {self.max_rank} over {len(self.layers)} projections, "
                f"{self.max_cpu_loras} adapters cached on the host")
