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

    ``full_output_sizes`` are the checkpoint's logical shards' rows (``q``, ``k``, ``v``); the rank holds
    ``local_output_sizes`` of them, starting at ``output_starts`` within each shard (column parallel; all of them,
    from 0, otherwise). It holds ``local_in_features`` of the ``full_in_features`` input columns from
    ``input_start`` (row parallel; all of them otherwise). ``reduces``: the rank's output is a partial sum that the
    layer all-reduces (row parallel) before its bias.
    """

    full_output_sizes: tuple[int, ...]
    output_starts: tuple[int, ...]
    local_output_sizes: tuple[int, ...]
    full_in_features: int
    input_start: int
    local_in_features: int
    reduces: bool

    @classmethod
    def column(cls, full_sizes: tuple[int, ...], starts: tuple[int, ...], local_sizes: tuple[int, ...],
               in_features: int) -> ParallelSlice:
        """A column-parallel layer's part: rows ``starts[i] .. + local_sizes[i]`` of each shard, every input."""
        return cls(full_sizes, starts, local_sizes, in_features, 0, in_features, False)

    @classmethod
    def row(cls, out_features: int, in_features: int, rank: int, world_size: int, reduces: bool = True
            ) -> ParallelSlice:
        """A row-parallel layer's part: every output row, the rank's ``1 / world_size`` of the input columns."""
        local = in_features // world_size
        return cls((out_features,), (0,), (out_features,), in_features, rank * local, local, reduces)

    def loader(self, load: WeightLoader, rows: Axis | None, cols: Axis | None, prefix: str) -> WeightLoader:
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
            if rows is not None and self.local_output_sizes[index] != self.full_output_sizes[index]:
                what = f"{prefix} (output rows of shard {index})"
                tensor = tensor.narrow(rows.dim, rows.entries(self.output_starts[index], what),
                                       rows.entries(self.local_output_sizes[index], what))
            if cols is not None and self.local_in_features != self.full_in_features:
                what = f"{prefix} (input columns)"
                tensor = tensor.narrow(cols.dim, cols.entries(self.input_start, what),
                                       cols.entries(self.local_in_features, what))
            load(param, tensor, shard)

        return sliced
