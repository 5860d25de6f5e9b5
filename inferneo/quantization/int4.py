"""4-bit weight-only quantization (W4A16): AWQ, GPTQ and compressed-tensors ``pack-quantized`` checkpoints.

Activations stay in the model dtype; each weight is ``(q - z) * s`` with a 4-bit ``q``, and a scale ``s`` and
zero point ``z`` shared by a group of ``group_size`` consecutive input columns of one output row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from inferneo.quantization.base import LinearMethod, QuantizedLinear

Int4Layout = Literal["awq", "gptq", "compressed-tensors"]


@dataclass(frozen=True, slots=True)
class Int4Scheme:
    """How a checkpoint stores its 4-bit weights.

    ``layout`` names the checkpoint's tensors and packing order; ``group_size`` is the number of input columns
    sharing one scale (and zero point); ``zero_point`` False means symmetric weights (``z = 8``);
    ``desc_act`` (GPTQ only) means the checkpoint carries a ``g_idx`` mapping each input column to its group.
    """

    layout: Int4Layout
    group_size: int
    zero_point: bool
    desc_act: bool = False


class Int4LinearMethod(LinearMethod):
    """A linear layer with 4-bit weights in one of the :class:`Int4Scheme` layouts."""

    def __init__(self, scheme: Int4Scheme) -> None:
        self.scheme = scheme
        self.name = scheme.layout

    def create_weights(self, layer: QuantizedLinear) -> None:
        raise NotImplementedError("int4 weights: in progress")

    def apply(self, layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("int4 weights: in progress")

    def dequantized_weight(self, layer: QuantizedLinear) -> torch.Tensor:
        raise NotImplementedError("int4 weights: in progress")
