"""Pipeline parallelism as a transform of a built model: one stage keeps a contiguous run of decoder layers.

Stage ``s`` of ``P`` keeps layers ``start .. end`` (an even split, the first stages taking one more layer each
when the count does not divide; ``INFERNEO_PP_LAYER_PARTITION`` chooses the counts). The first stage also keeps
the embedding, the last the final norm and the LM head (and the embedding when the LM head is tied to it); the
parts another stage holds become :class:`HeldByAnotherStage` placeholders without parameters, so a rank never
allocates them. The kept layers are renumbered from 0 (``model.layers`` is this stage's list, and so are its KV
cache specs); :func:`stage_weights` maps checkpoint names onto them and drops the tensors other stages load.

:func:`stage_forward` runs a stage: the embedding (first stage) or the received hidden states and residual
(later stages), the stage's layers, then the final norm (last stage). The runner moves the activations between
stages (``inferneo.worker.model_runner``); the model files stay plain.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from inferneo import envs


@dataclass(frozen=True, slots=True)
class PipelineStage:
    """Which layers one stage holds: ``start`` (inclusive) to ``end`` (exclusive), of ``num_layers``."""

    index: int
    num_stages: int
    start: int
    end: int

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


class HeldByAnotherStage(nn.Module):
    """Stands in for a module (embedding, norm, LM head) that another pipeline stage holds."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.held = name

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.held} is held by another pipeline stage")


def stage_layer_ranges(num_layers: int, num_stages: int, partition: str | None = None) -> list[tuple[int, int]]:
    """The ``(start, end)`` layer range of every stage: ``partition`` (counts such as ``"14,18"``; None: the
    environment's ``INFERNEO_PP_LAYER_PARTITION``) or an even split, the first stages taking the remainder."""
    text = envs.pp_layer_partition() if partition is None else partition
    if text:
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(f"layer partition {text!r}: expected comma-separated layer counts") from None
        if len(counts) != num_stages or sum(counts) != num_layers or min(counts) < 1:
            raise ValueError(f"layer partition {text!r} must give {num_stages} positive counts summing to the "
                             f"model's {num_layers} layers")
    else:
        if num_layers < num_stages:
            raise ValueError(f"pipeline_parallel_size {num_stages} is larger than the model's {num_layers} layers")
        base, extra = divmod(num_layers, num_stages)
        counts = [base + (1 if s < extra else 0) for s in range(num_stages)]
    ranges, start = [], 0
    for count in counts:
        ranges.append((start, start + count))
        start += count
    return ranges


def keep_stage(model: nn.Module, stage: PipelineStage) -> None:
    """Cut a Llama-family ``model`` (best built on ``meta``) down to ``stage``'s layers, in place."""
    layers = list(model.layers)
    model.layers = nn.ModuleList(layers[stage.start : stage.end])
    tied = bool(model.config.tie_word_embeddings)
    if not stage.is_first and not (stage.is_last and tied):
        model.embed_tokens = HeldByAnotherStage("embed_tokens")
    if not stage.is_last:
        model.norm = HeldByAnotherStage("norm")
        model.lm_head = HeldByAnotherStage("lm_head")
    model.pipeline_stage = stage


def _layer_index(name: str) -> tuple[int, str] | None:
    """``(index, rest)`` of a decoder layer's checkpoint tensor name (``model.layers.3.mlp...``), else None."""
    short = name.removeprefix("model.")
    if short.startswith("layers."):
        index, _, rest = short.removeprefix("layers.").partition(".")
        if index.isdigit():
            return int(index), rest
    return None


def stage_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], *, renumber: bool = True,
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint tensors ``model``'s stage loads, decoder layers renumbered from the stage's first layer
    (``renumber=False``: under their checkpoint names, for a quantization format that reads them; then
    :func:`renumber_stage_weights`)."""
    stage: PipelineStage = model.pipeline_stage
    for name, tensor in weights:
        layer = _layer_index(name)
        if layer is not None:
            if stage.start <= layer[0] < stage.end:
                yield (f"model.layers.{layer[0] - stage.start}.{layer[1]}" if renumber else name), tensor
            continue
        if isinstance(getattr(model, name.removeprefix("model.").partition(".")[0], None), HeldByAnotherStage):
            continue
        yield name, tensor


def renumber_stage_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                           ) -> Iterator[tuple[str, torch.Tensor]]:
    """The stage's checkpoint tensors (``stage_weights(renumber=False)``) with decoder layers numbered from the
    stage's first layer, as its model holds them."""
    start = model.pipeline_stage.start
    for name, tensor in weights:
        layer = _layer_index(name)
        yield (name if layer is None else f"model.layers.{layer[0] - start}.{layer[1]}"), tensor


def stage_forward(model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                  kv_caches: list[torch.Tensor], metadata,
                  received: tuple[torch.Tensor, torch.Tensor] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``model``'s stage over a flat batch: returns the final hidden states and None on the last stage, else
    the hidden states and residual for the next stage. A later stage reads ``received`` (the previous stage's
    pair); given None there (memory profiling), it starts from zeros."""
    stage: PipelineStage = model.pipeline_stage
    if stage.is_first:
        hidden, residual = model.embed(input_ids), None
    elif received is not None:
        hidden, residual = received
    else:
        dtype = next(model.layers.parameters()).dtype
        hidden = torch.zeros(input_ids.shape[0], model.config.hidden_size, dtype=dtype, device=input_ids.device)
        residual = torch.zeros_like(hidden)
    for layer, kv_cache in zip(model.layers, kv_caches, strict=True):
        hidden, residual = layer(positions, hidden, residual, kv_cache, metadata)
    if stage.is_last:
        return model.norm(hidden, residual)[0], None
    return hidden, residual
