"""The contract between a GEMV that applies the RMSNorm after it in its epilogue and the GEMV that reads the norm's
output (one row, a batch-1 decode step): no norm launch between them, no normalized row in memory.

The RMSNorm of a row ``r`` is ``w * r / rms(r)``, with ``rms(r) = sqrt(mean(r^2) + eps)``. The producing GEMV adds
its output to the residual (``r``), writes ``w * r`` and its programs' partial sums of ``r^2``; the reading GEMV
multiplies its products by ``1 / rms(r)`` at the end. The same products as norm-then-GEMV up to rounding: the
normalized row is not rounded to the model dtype before the weight multiplies it, and ``1 / rms`` multiplies the
float32 sums instead of each input.

A bfloat16 row can travel with its float16 copy (``half``, in the pair order of ``triton_int4.paired_half``): the
W4A16 h2 kernel multiplies float16 pairs, so a reader given the copy loads its pairs as they are instead of
converting and pairing each value, and the producer's epilogue writes it beside the row for a few bytes. Every
bfloat16 value in float16's range is exact there, and the kernel's own conversion gives the same float16 values,
so the results are the same bits (``INFERNEO_W4A16_HALF_COPIES``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ScaledRow(NamedTuple):
    """One normalized row, held as ``scaled`` (``[1, hidden]``, the model dtype: the norm's input times its weight,
    rounded), ``square_sums`` (float32 partial sums of the squared norm input, summed in order by the reader),
    the norm's ``eps`` and, for a bfloat16 row, maybe ``half``: ``scaled``'s paired float16 copy."""

    scaled: torch.Tensor
    square_sums: torch.Tensor
    eps: float
    half: torch.Tensor | None = None
