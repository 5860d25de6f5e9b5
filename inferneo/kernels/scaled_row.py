"""The contract between a GEMV that applies the RMSNorm after it in its epilogue and the GEMV that reads the norm's
output (one row, a batch-1 decode step): no norm launch between them, no normalized row in memory.

The RMSNorm of a row ``r`` is ``w * r / rms(r)``, with ``rms(r) = sqrt(mean(r^2) + eps)``. The producing GEMV adds
its output to the residual (``r``), writes ``w * r`` and its programs' partial sums of ``r^2``; the reading GEMV
multiplies its products by ``1 / rms(r)`` at the end. The same products as norm-then-GEMV up to rounding: the
normalized row is not rounded to the model dtype before the weight multiplies it, and ``1 / rms`` multiplies the
float32 sums instead of each input.

A bfloat16 row can travel with a float16 copy (``half``) in the form its readers' kernel multiplies, which the
producer's epilogue writes beside the row for a few bytes: the W4A16 h2 kernel's float16 pairs
(``triton_int4.paired_half``, ``INFERNEO_W4A16_HALF_COPIES``) or the FP8 h2 kernel's values times 2^-8
(``triton_fp8_gemv.scaled_half``, ``INFERNEO_FP8_HALF_COPIES``). A reader given the copy loads its activations as
they are instead of converting each value. The kernels' own conversions give the same float16 values, so the
results are the same bits. A copy's form is its producer's method's, so a row passes only between layers of one
quantization method (``device_kernels.use_epilogue_norm_layers``).

Both kernels take the same two epilogue arguments: :class:`RowScale` (a reader) and :class:`ResidualNorm` (a
producer).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ScaledRow(NamedTuple):
    """One normalized row, held as ``scaled`` (``[1, hidden]``, the model dtype: the norm's input times its weight,
    rounded), ``square_sums`` (float32 partial sums of the squared norm input, summed in order by the reader),
    the norm's ``eps`` and, for a bfloat16 row, maybe ``half``: ``scaled``'s float16 copy (the form its producer
    writes; see the module doc)."""

    scaled: torch.Tensor
    square_sums: torch.Tensor
    eps: float
    half: torch.Tensor | None = None


class RowScale(NamedTuple):
    """A reading launch's input is an RMSNorm's input times the norm weight: its outputs are multiplied by
    ``1 / sqrt(sum(square_sums) / K + eps)`` (``square_sums``: float32 partial sums of the squared norm input)."""

    square_sums: torch.Tensor
    eps: float


class ResidualNorm(NamedTuple):
    """A producing launch adds its rounded output to ``residual`` (in place, as the fused add + RMSNorm does) and
    writes, in place of the output, that sum times ``norm_weight`` (the next RMSNorm's input, scaled), with the
    programs' sums of the squared sum in ``square_sums`` (float32, one per output tile)."""

    residual: torch.Tensor
    norm_weight: torch.Tensor
    square_sums: torch.Tensor


def epilogue_arguments(row_scale: RowScale | None, residual_norm: ResidualNorm | None) -> dict:
    """The keyword arguments that switch a one-row kernel's RMSNorm epilogues on (the W4A16 and FP8 h2 kernels name
    them alike): ``sq_ptr``, ``num_sq``, ``eps``, ``ROW_SCALE`` and ``SQ_BLOCK`` (the partial sums' count rounded up
    to a power of two) for a reader; ``res_ptr``, ``nw_ptr``, ``sq_out_ptr`` and ``RES_NORM`` for a producer."""
    arguments = {}
    if row_scale is not None:
        num_sq = row_scale.square_sums.numel()
        arguments.update(sq_ptr=row_scale.square_sums, num_sq=num_sq, eps=row_scale.eps, ROW_SCALE=True,
                         SQ_BLOCK=1 << max(num_sq - 1, 0).bit_length())
    if residual_norm is not None:
        arguments.update(res_ptr=residual_norm.residual, nw_ptr=residual_norm.norm_weight,
                         sq_out_ptr=residual_norm.square_sums, RES_NORM=True)
    return arguments
