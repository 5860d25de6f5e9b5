"""The batched LoRA apply inside the model's projections.

:func:`wrap_lora_layers` puts a :class:`LoRALinear` around each target projection of every decoder layer (after
the device kernels are in place, so it wraps whatever linear the device uses). Each holds every adapter slot's
weights stacked: ``lora_a`` ``[slots, shards * max_rank, in]`` and ``lora_b`` ``[slots, out, shards * max_rank]``,
block-diagonal over the shards of a fused projection (q/k/v, gate/up), so a shard an adapter lacks, and ranks
below the maximum, are zeros. A step's :class:`LoRABatch` (shared by all layers through :class:`LoRAState`) says
which slot each token uses; tokens of the base model (slot -1) are left as the base projection made them.

On CPU the apply is batched per slot: the slot's tokens gathered, ``x @ A.T @ B.T``, added back. On CUDA it is two
Triton kernels over the tokens grouped by slot (``kernels/triton_lora.py``), which read the grouping from device
tensors, so they run inside captured CUDA graphs too. A one-row input (batch-1 decode) of a projection that runs
the Triton GEMV takes the state's row functions instead (``lora/rows.py``): the shrink, then the GEMV with the
delta added in its epilogue; the gated MLP keeps its fused gate/up + SiLU GEMV that way (:class:`LoRAGatedMLP`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from inferneo.lora.adapter import LoRATarget
from inferneo.model_executor.models.llama import MLP
from inferneo.quantization.parallel import ParallelSlice


@dataclass(slots=True)
class LoRABatch:
    """Which adapter slot each token of a step runs with.

    ``groups``: (slot, indices of its tokens) for the PyTorch apply. ``sorted_tokens`` (the adapted tokens ordered
    by slot, int32 or int64) and ``seg_starts`` (``[slots + 1]``, the same dtype: slot ``s`` holds ``sorted_tokens[seg_starts[s] :
    seg_starts[s + 1]]``) for the Triton kernels.
    """

    groups: list[tuple[int, torch.Tensor]]
    sorted_tokens: torch.Tensor | None = None
    seg_starts: torch.Tensor | None = None


ApplyFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LoRABatch], None]
# (LoRA layer, input, batch) -> the projection's output with the deltas, or None where the row path does not apply
LinearRowFn = Callable[["LoRALinear", torch.Tensor, LoRABatch], "torch.Tensor | None"]
# (gate/up LoRA layer, input, batch, the MLP's DecodeGemv) -> silu(gate) * up with the deltas, or None
SiluMulRowFn = Callable[["LoRALinear", torch.Tensor, LoRABatch, object], "torch.Tensor | None"]


def lora_apply_torch(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                     batch: LoRABatch) -> None:
    """``y[t] += x[t] @ lora_a[s].T @ lora_b[s].T`` for each token ``t`` of slot ``s``, one matmul pair per slot."""
    for slot, index in batch.groups:
        xs = x.index_select(0, index)
        delta = (xs @ lora_a[slot].t()) @ lora_b[slot].t()
        y.index_add_(0, index, delta.to(y.dtype))


class LoRAState:
    """What every LoRA layer of a model shares: the current step's batch (None when no token of the step uses an
    adapter: the layers cost nothing then), the apply function of the device and, on CUDA, the one-row functions
    (``lora/rows.py``; None: every input takes ``apply``)."""

    def __init__(self, apply: ApplyFn, linear_row: LinearRowFn | None = None,
                 silu_mul_row: SiluMulRowFn | None = None) -> None:
        self.apply = apply
        self.linear_row = linear_row
        self.silu_mul_row = silu_mul_row
        self.batch: LoRABatch | None = None


class LoRALinear(nn.Module):
    """A projection plus the LoRA deltas of the adapter slots (see the module doc).

    Under tensor parallelism ``parallel`` is the part of the full projection the rank's ``base`` holds: a
    column-parallel one keeps every input column of ``A`` and its own rows of ``B``; a row-parallel one keeps its
    input columns of ``A`` and all of ``B``, so its deltas are partial sums too, all-reduced with ``all_reduce``
    and added to the base's (already all-reduced) output."""

    def __init__(self, base: nn.Module, target: LoRATarget, num_slots: int, max_rank: int, state: LoRAState,
                 dtype: torch.dtype, device: torch.device, parallel: ParallelSlice | None = None,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.base = base
        self.target = target
        self.max_rank = max_rank
        self.state = state
        self.parallel = parallel
        self.all_reduce = all_reduce if parallel is not None and parallel.reduces else None
        if parallel is None:
            self.in_features, self.out_features = target.in_features, target.out_features
            self._shard_rows = [target.shard_offset(i) for i in range(len(target.shards))]
        else:
            self.in_features, self.out_features = parallel.local_in_features, sum(parallel.local_output_sizes)
            self._shard_rows = [sum(parallel.local_output_sizes[:i]) for i in range(len(target.shards))]
        width = len(target.shards) * max_rank
        self.register_buffer("lora_a", torch.zeros(num_slots, width, self.in_features, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("lora_b", torch.zeros(num_slots, self.out_features, width, dtype=dtype, device=device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.state.batch
        if batch is None:
            return self.base(x)
        if self.state.linear_row is not None and self.parallel is None:
            y = self.state.linear_row(self, x, batch)
            if y is not None:
                return y
        y = self.base(x)
        if self.all_reduce is not None:  # this rank's input columns: a partial delta, summed over the ranks
            delta = torch.zeros_like(y)
            self.state.apply(delta.view(-1, self.out_features), x.reshape(-1, self.in_features), self.lora_a,
                             self.lora_b, batch)
            return y + self.all_reduce(delta)
        self.state.apply(y.view(-1, self.out_features), x.reshape(-1, self.in_features), self.lora_a, self.lora_b,
                         batch)
        return y

    @torch.no_grad()
    def set_slot(self, slot: int, pairs: list[tuple[torch.Tensor, torch.Tensor] | None] | None) -> None:
        """Put one adapter's ``(A, B)`` pairs (one per shard; None: that shard unchanged) into ``slot``; None
        clears the slot."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        part = self.parallel
        for index, pair in enumerate(pairs or ()):
            if pair is None:
                continue
            a, b = pair
            if part is not None:  # the rank's input columns of A, its output rows of B
                a = a[:, part.input_start : part.input_start + part.local_in_features]
                start = part.output_starts[index]
                b = b[start : start + part.local_output_sizes[index]]
            col, row = index * self.max_rank, self._shard_rows[index]
            self.lora_a[slot, col : col + a.shape[0]].copy_(a, non_blocking=True)
            self.lora_b[slot, row : row + b.shape[0], col : col + b.shape[1]].copy_(b, non_blocking=True)


class LoRAGatedMLP(MLP):
    """A gated MLP that ran the fused gate/up + SiLU GEMV (``device_kernels.GemvSiluMLP``), with a LoRA gate/up
    projection: one-row inputs keep the fused kernel, the adapter's deltas added before the activation (the
    state's ``silu_mul_row``; without adapter tokens in the step, the plain fused kernel); other inputs project
    (with their deltas), then activate."""

    gemv = None  # the DecodeGemv of the MLP it replaces
    state: LoRAState

    def forward(self, x):
        batch = self.state.batch
        weight = self.gate_up_proj.base.weight
        if batch is None:
            if self.gemv.applies(x, weight):
                return self.down_proj(self.gemv.silu_mul(x, weight))
        elif self.state.silu_mul_row is not None:
            act = self.state.silu_mul_row(self.gate_up_proj, x, batch, self.gemv)
            if act is not None:
                return self.down_proj(act)
        return super().forward(x)


def wrap_lora_layers(model: nn.Module, targets: dict[str, LoRATarget], num_slots: int, max_rank: int,
                     state: LoRAState, dtype: torch.dtype, device: torch.device,
                     all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     ) -> dict[tuple[int, str], LoRALinear]:
    """Wrap each target projection of each decoder layer of ``model`` in a :class:`LoRALinear`; returns them by
    (layer index, module). MLPs that bypass their linears' ``forward`` (fused GEMV + SiLU, row passes) go back to
    the plain MLP first, so that no token skips its adapter; the fused GEMV + SiLU one becomes a
    :class:`LoRAGatedMLP` where the state has a ``silu_mul_row``. Under tensor parallelism each projection takes
    the part its layer's ``parallel_slices`` names, and ``all_reduce`` (the group's) sums the row-parallel ones'
    deltas."""
    wrapped: dict[tuple[int, str], LoRALinear] = {}
    for index, layer in enumerate(model.layers):
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, MLP) and type(mlp) is not MLP:
            fused = getattr(mlp, "gemv", None)
            kind = LoRAGatedMLP if fused is not None and fused.silu and state.silu_mul_row is not None else MLP
            plain = kind.__new__(kind)
            plain.__dict__.update(mlp.__dict__)
            if kind is LoRAGatedMLP:
                plain.state = state
            layer.mlp = plain
        for module, target in targets.items():
            parent_name, _, attr = module.rpartition(".")
            parent = layer.get_submodule(parent_name)
            base = getattr(parent, attr, None)
            if base is None:
                raise ValueError(f"enable_lora does not support {type(model).__name__}: its layer {index} has no "
                                 f"{module} (LoRA adapts the q/k/v/o and gate/up/down projections of Llama-like "
                                 "decoder layers; multi-head latent attention has none)")
            # under tensor parallelism, the part of the projection this rank holds (recorded by ``shard_model``)
            parallel = getattr(layer, "parallel_slices", {}).get(module)
            if parallel is not None and parallel.reduces:  # its output is summed here, not in the next norm
                base.stage_index = None
            lora = LoRALinear(base, target, num_slots, max_rank, state, dtype, device, parallel, all_reduce)
            setattr(parent, attr, lora)
            wrapped[(index, module)] = lora
    return wrapped
