"""Checkpoint tensors as :class:`~inferneo.engine.protocol.WeightTensor` records, the form in which new weights
cross from the front end to the engine core: a name, an element type by name, a shape and the raw bytes.

:func:`to_wire` takes no copy of a contiguous host tensor (the record holds a view of its memory; a core in this
process reads the same memory back), so an update costs one copy into the model, plus one encoding when the core
runs in a child process. :func:`from_wire` checks the record (a known element type, as many bytes as the shape
needs) before anything is loaded.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch

from inferneo.engine.protocol import WeightTensor

# The element types a checkpoint tensor may have on the wire.
DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


def to_wire(name: str, tensor: torch.Tensor) -> WeightTensor:
    """``tensor`` (any device) as a record; a contiguous host tensor is not copied (the record views it)."""
    if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
        raise ValueError(f"weights must be (name, tensor) pairs, got ({type(name).__name__}, "
                         f"{type(tensor).__name__})")
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"weight {name!r} has element type {dtype}, which a checkpoint cannot hold")
    host = tensor.detach().to("cpu").contiguous()
    data = memoryview(host.reshape(-1).view(torch.uint8).numpy()) if host.numel() else memoryview(b"")
    return WeightTensor(name, dtype, list(host.shape), data)


def to_wire_all(weights: Iterable[tuple[str, torch.Tensor]]) -> list[WeightTensor]:
    """Every ``(name, tensor)`` pair as a record (ValueError for a pair that is not one)."""
    records = []
    for pair in weights:
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise ValueError(f"weights must be (name, tensor) pairs, got {type(pair).__name__}")
        records.append(to_wire(*pair))
    return records


def from_wire(record: WeightTensor) -> tuple[str, torch.Tensor]:
    """The ``(name, tensor)`` pair of a record (the tensor views the record's bytes); ValueError for an unknown
    element type or a byte count that does not match the shape."""
    dtype = DTYPES.get(record.dtype)
    if dtype is None:
        raise ValueError(f"weight {record.name!r}: unknown element type {record.dtype!r}")
    if any(size < 0 for size in record.shape):
        raise ValueError(f"weight {record.name!r}: negative size in shape {record.shape}")
    expected = math.prod(record.shape) * dtype.itemsize
    if len(record.data) != expected:
        raise ValueError(f"weight {record.name!r}: {len(record.data)} bytes for shape {record.shape} of "
                         f"{record.dtype} ({expected} expected)")
    if not expected:
        return record.name, torch.empty(record.shape, dtype=dtype)
    with warnings.catch_warnings():  # the view may be read-only; the tensor is only read (copied into the model)
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(record.data, dtype=torch.uint8)
    return record.name, flat.view(dtype).reshape(record.shape)
