"""Quantized layers under tensor parallelism: which part of a full checkpoint tensor one rank's layer holds.

A rank's sharded linear (``model_executor.tensor_parallel``) holds some of the full layer's output rows (column
parallel: this rank's heads of ``qkv_proj``, its slice of ``gate_up_proj``) or some of its input columns (row
parallel: ``o_proj``, ``down_proj``). A quantized format stores each weight as several tensors whose dims run over
those rows and columns at their own rate (AWQ packs 8 output columns into one int32; a group of 128 inputs shares
one scale). Each format parameter says which of its dims do so (:class:`Axis`), and :meth:`ParallelSlice.loader`
cuts the rank's part out of every full checkpoint tensor before the format's own loader copies it, so the formats
need no code of their own for tensor parallelism.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

WeightLoader = Callable[[nn.Parameter, torch.Tensor, "int | None"], None]


@dataclass(frozen=True, slots=True)
class Axis:
    """Dim ``dim`` of a checkpoint tensor runs over a layer's output rows (or input columns), ``num / den``
    entries for each: ``Axis(1, 1, 8)`` for AWQ's packed output columns, ``Axis(0, 1, 128)`` for the input groups
    of 128 that share one scale."""

    dim: int
    num: int = 1
    den: int = 1

    def entries(self, count: int, what: str) -> int:
        """The entries standing for ``count`` rows or columns; ValueError when they are not whole."""
        if (count * self.num) % self.den:
            raise ValueError(f"{what}: {count} is not a whole number of the format's groups of {self.den}; this "
                             "tensor_parallel_size splits the layer inside a group")
        return count * self.num // self.den


@dataclass(frozen=True, slots=True)
class ParallelSlice:
    """The part of a full linear layer that one rank's layer holds.

    ``full_output_sizes`` are the checkpoint's logical shards' rows (``q``, ``k``, ``v``); ``output_starts`` where
    this rank's rows of each start within its shard (column parallel; zeros when every rank holds all rows).
    ``input_start`` is this rank's first input column of ``full_in_features`` (row parallel; 0 otherwise).
    ``reduces``: the rank's output is a partial sum that the layer all-reduces (row parallel) before its bias.
    """

    full_output_sizes: tuple[int, ...]
    output_starts: tuple[int, ...]
    input_start: int
    full_in_features: int
    reduces: bool

    def loader(self, load: WeightLoader, local_output_sizes: tuple[int, ...], local_in_features: int,
               rows: Axis | None, cols: Axis | None, prefix: str) -> WeightLoader:
        """``load`` fed this rank's part of each full checkpoint tensor: along ``rows`` this rank's rows of the
        shard (a fused tensor, ``shard`` None, is split into its shards first), along ``cols`` its input columns.
        A tensor with neither (a per-tensor scale) goes to ``load`` whole."""

        def sliced(param: nn.Parameter, full: torch.Tensor, shard: int | None) -> None:
            if rows is not None and shard is None and len(self.full_output_sizes) > 1:
                offset = 0
                for index, size in enumerate(self.full_output_sizes):
                    what = f"{prefix} (shard {index} of a fused tensor)"
                    piece = full.narrow(rows.dim, rows.entries(offset, what), rows.entries(size, what))
                    sliced(param, piece, index)
                    offset += size
                return
            tensor, index = full, 0 if shard is None else shard
            # (an axis the rank holds whole is left as it is: a block-scale grid may end in a partial block)
            if rows is not None and local_output_sizes[index] != self.full_output_sizes[index]:
                what = f"{prefix} (output rows of shard {index})"
                tensor = tensor.narrow(rows.dim, rows.entries(self.output_starts[index], what),
                                       rows.entries(local_output_sizes[index], what))
            if cols is not None and local_in_features != self.full_in_features:
                what = f"{prefix} (input columns)"
                tensor = tensor.narrow(cols.dim, cols.entries(self.input_start, what),
                                       cols.entries(local_in_features, what))
            load(param, tensor, shard)

        return sliced
