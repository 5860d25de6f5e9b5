"""A small, fast reader for GGUF files: metadata, tensor directory and dequantized tensor data.

``gguf.GGUFReader`` builds a numpy view for every string of every metadata array, which takes seconds on a
file with a 50k-token vocabulary. This reader parses the header with ``struct`` (tens of milliseconds), keeps the
result in a small cache keyed by the file's identity, and reads tensor data lazily through ``np.memmap``. The
``gguf`` package still supplies the type tables and the dequantization kernels.
"""

from __future__ import annotations

import functools
import mmap
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# metadata value types of fixed width: struct format by GGUFValueType id
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
                 12: "<f8"}
_STRING, _ARRAY = 8, 9
# ggml types llama.cpp wrote for a while and has removed since (ARM repackings of Q4_0 / IQ4_NL, done at load now):
# files that still hold them are refused by name
_REMOVED_TYPES = {31: "Q4_0_4_4", 32: "Q4_0_4_8", 33: "Q4_0_8_8", 36: "IQ4_NL_4_4", 37: "IQ4_NL_4_8", 38: "IQ4_NL_8_8"}


@dataclass(slots=True, frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives in the file. ``shape`` is in torch order (GGUF's ``ne`` reversed)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute, from the start of the file
    nbytes: int

    @property
    def type_name(self) -> str:
        """The ggml type's name, e.g. ``Q4_1``."""
        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"type {self.ggml_type}"


@dataclass(slots=True, frozen=True)
class GGUFHeader:
    """Everything in a GGUF file except the tensor data."""

    path: Path
    version: int
    metadata: Mapping[str, Any]
    tensors: tuple[GGUFTensorInfo, ...]

    @property
    def architecture(self) -> str:
        """``general.architecture``, e.g. ``llama``."""
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ValueError(f"{self.path} has no general.architecture in its metadata")
        return arch

    def tensor(self, name: str) -> GGUFTensorInfo | None:
        """The tensor called ``name``, or None."""
        return next((info for info in self.tensors if info.name == name), None)


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse a GGUF file's metadata and tensor directory (cached while the file is unchanged)."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"GGUF file not found: {path}") from None
    return _read_header_cached(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_header_cached(path: Path, _mtime_ns: int, _size: int) -> GGUFHeader:
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _Parser(buf, path).parse()


class _Parser:
    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf = buf
        self.path = path
        self.pos = 0

    def parse(self) -> GGUFHeader:
        if self.buf[:4] != _MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file (its first bytes are {bytes(self.buf[:4])!r})")
        self.pos = 4
        version = self._scalar(4)
        if version not in (2, 3):
            hint = " (a big-endian file?)" if version > 0xFFFF else ""
            raise ValueError(f"{self.path}: unsupported GGUF version {version}{hint}; versions 2 and 3 are read")
        n_tensors, n_kv = self._scalar(10), self._scalar(10)
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            metadata[key] = self._value(self._scalar(4))
        if int(metadata.get("split.count", 1)) > 1:
            raise ValueError(f"{self.path} is one part of a split GGUF; merge it with llama-gguf-split --merge first")
        raw_infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._scalar(10) for _ in range(self._scalar(4))]
            raw_infos.append((name, dims, self._scalar(4), self._scalar(10)))
        alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = -(-self.pos // alignment) * alignment
        tensors = tuple(self._tensor_info(name, dims, ggml_type, data_start + offset)
                        for name, dims, ggml_type, offset in raw_infos)
        return GGUFHeader(self.path, version, MappingProxyType(metadata), tensors)

    def _tensor_info(self, name: str, dims: list[int], ggml_type: int, offset: int) -> GGUFTensorInfo:
        try:
            block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            if ggml_type in _REMOVED_TYPES:
                raise ValueError(f"{self.path}: tensor {name!r} is {_REMOVED_TYPES[ggml_type]} (ggml type {ggml_type}), "
                                 "an ARM repacking llama.cpp has removed; use the model's plain Q4_0 / IQ4_NL file "
                                 "(llama.cpp repacks it at load now)") from None
            raise ValueError(f"{self.path}: tensor {name!r} has ggml type {ggml_type}, unknown to the installed "
                             "gguf package (try upgrading it)") from None
        n_elements = prod(dims)
        if dims and dims[0] % block_size:
            raise ValueError(f"{self.path}: tensor {name!r} rows of {dims[0]} are not a multiple of the "
                             f"{block_size}-element blocks of its type")
        nbytes = n_elements // block_size * type_size
        if offset + nbytes > len(self.buf):
            raise ValueError(f"{self.path} is truncated: tensor {name!r} ends past the end of the file")
        return GGUFTensorInfo(name, tuple(reversed(dims)), ggml_type, offset, nbytes)

    def _scalar(self, vtype: int) -> Any:
        fmt = _SCALAR_FORMATS[vtype]
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        (length,) = struct.unpack_from("<Q", self.buf, self.pos)
        start = self.pos + 8
        self.pos = start + length
        raw = self.buf[start:self.pos]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            item_type, count = self._scalar(4), self._scalar(10)
            if item_type in _NUMPY_DTYPES:
                dtype = np.dtype(_NUMPY_DTYPES[item_type])
                values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += count * dtype.itemsize
                return tuple(values.tolist())
            return tuple(self._value(item_type) for _ in range(count))
        if vtype not in _SCALAR_FORMATS:
            raise ValueError(f"{self.path}: unknown GGUF metadata value type {vtype} at byte {self.pos}")
        return self._scalar(vtype)


def dequantize_tensor(data: np.ndarray, info: GGUFTensorInfo) -> np.ndarray:
    """Turn the raw bytes of one tensor (a uint8 array of ``info.nbytes``) into a new float32 array."""
    qtype = GGMLQuantizationType(info.ggml_type)
    if qtype == GGMLQuantizationType.F32:
        values = data.view(np.float32).copy()
    elif qtype == GGMLQuantizationType.F16:
        values = data.view(np.float16).astype(np.float32)
    elif qtype == GGMLQuantizationType.BF16:
        values = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif qtype == GGMLQuantizationType.F64:
        values = data.view(np.float64).astype(np.float32)
    else:
        row_bytes = info.nbytes // max(1, prod(info.shape[:-1]))
        try:
            values = quants.dequantize(data.reshape(-1, row_bytes), qtype).astype(np.float32, copy=False)
        except NotImplementedError:
            raise ValueError(f"tensor {info.name!r}: the gguf package cannot dequantize {qtype.name}") from None
    return values.reshape(info.shape)


def tensor_blocks(data: np.ndarray, info: GGUFTensorInfo) -> np.ndarray:
    """The raw ggml blocks of one tensor (a uint8 array of ``info.nbytes``) as a new uint8 array
    ``[*info.shape[:-1], row_bytes]``: each row's blocks, as the file stores them."""
    rows = prod(info.shape[:-1])
    return np.array(data).reshape(*info.shape[:-1], info.nbytes // max(1, rows))


def iter_gguf_tensors(header: GGUFHeader, keep_blocks: frozenset[str] = frozenset()
                      ) -> Iterator[tuple[GGUFTensorInfo, np.ndarray]]:
    """Yield each tensor of the file, one at a time: dequantized to float32, or for the names in ``keep_blocks``
    as its raw blocks (:func:`tensor_blocks`)."""
    raw = np.memmap(header.path, dtype=np.uint8, mode="r")
    try:
        for info in header.tensors:
            data = raw[info.offset:info.offset + info.nbytes]
            yield info, tensor_blocks(data, info) if info.name in keep_blocks else dequantize_tensor(data, info)
    finally:
        del raw
