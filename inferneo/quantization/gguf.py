"""GGUF files kept quantized: linear and embedding weights stay in their ggml blocks in memory.

``gguf_config`` (``model_loader/gguf_loader.py``) marks a GGUF file ``quantization_config: {"quant_method": "gguf",
"file": <path>}``, so :class:`GGUFQuantConfig` runs every GGUF model (as vLLM does; ``--dtype`` sets the
activations' dtype only). ``INFERNEO_GGUF_DEQUANTIZE=1`` de-quantizes the whole file at load instead (the
full-width path, the reference the quantized one is tested against).

Which tensors stay in blocks: each linear layer whose GGUF tensors (one per logical shard: ``attn_q``/``attn_k``/
``attn_v`` of ``qkv_proj``) are all of a kept type (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K; see ``gguf_blocks``), the
token embedding in a kept type, an LM head tied to it, and the stacked experts of a mixture-of-experts layer whose
three expert tensors are of kept types with gate and up of one type (``gguf_experts.py``). Everything else (norms,
routers, other experts, F16 / F32 / other block types) is de-quantized at load as before. A fused layer whose
shards differ in type (Q4_K_M stores some ``attn_v`` in Q6_K beside Q4_K ``attn_q``/``attn_k``) keeps one buffer
per run of equal-typed shards and one matmul each. Llama's q/k rows, which llama.cpp's converter permutes, are put
back by moving whole rows of blocks (``gguf_loader.iter_gguf_weights``).

Matmuls: the native CPU kernels (``kernels/cpu_gguf.py``) de-quantize blocks in registers, or (Q4_0 / Q4_1 / Q8_0 on
AVX2 at the row counts of ``_INT8_DOT_ROWS``, and Q4_0 / Q4_1 in the wide16 layout with AVX512_VNNI, with
``INFERNEO_GGUF_INT8_DOT=1``) quantize the activations to int8 per 32-weight block and use integer dot products,
as llama.cpp does; on AMX-BF16 CPUs a wide16 layer's prompt-sized bfloat16 calls may de-quantize it into one
oneDNN matmul instead, from a row count measured at load (``gguf_dense.py``); without the kernels (or with
``INFERNEO_CPU_KERNELS=0``) a reference path de-quantizes the weight in PyTorch at each call. On CUDA a Triton GEMM
de-quantizes tiles in registers (``kernels/triton_gguf.py``); without Triton the layers are de-quantized to the
model dtype once at load (a logged warning says so).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from inferneo.kernel_config import KernelConfig
from inferneo.model_executor.layers.moe import FusedMoE
from inferneo.model_loader.gguf_file import GGUFTensorInfo, read_gguf_header
from inferneo.model_loader.gguf_loader import gguf_hf_name, iter_gguf_weights
from inferneo.quantization.base import (
    LinearMethod,
    LinearShape,
    QuantConfig,
    QuantizedLinear,
    new_parameter,
)
from inferneo.quantization.gguf_blocks import (
    KEPT_FORMATS,
    BlockFormat,
    block_format,
    dequantize_blocks,
    random_blocks,
)
from inferneo.quantization.gguf_dense import dense_from_rows
from inferneo.quantization.gguf_experts import ExpertPlan, hold_experts_in_blocks, plan_gguf_experts
from inferneo.quantization.gguf_wide import pack_wide16, unpack_wide16, wide16_rows, wide16_supported
from inferneo.worker.cpu_tuning import release_freed_memory

logger = logging.getLogger(__name__)

# checkpoint projection -> (the engine's fused layer, shard index)
_FUSED_SHARDS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                 "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
# compute dtypes each device runs GGUF layers in
_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True, slots=True)
class BlockSegment:
    """Consecutive output rows of a layer held in one block format, in the layer's buffer ``buffer``.

    ``shards`` are the logical shards it holds, in order (empty: the layer's weight comes as one tensor).
    ``layout``: ``"ggml"`` (the file's ``[rows, row_bytes]`` blocks) or ``"wide16"`` (repacked at load for the
    AVX-512 kernels, ``gguf_wide.py``). ``dense_from``: a wide16 segment's row count from which a call de-quantizes
    it into one dense matmul (``gguf_dense.py``; None: never)."""

    fmt: BlockFormat
    row_start: int
    rows: int
    shards: tuple[int, ...]
    buffer: str
    layout: str = "ggml"
    dense_from: int | None = None


# ---- the matmul ----------------------------------------------------------------------------------------------


BlockMatmul = Callable[[torch.Tensor, torch.Tensor, BlockFormat], torch.Tensor]


def reference_block_matmul(x: torch.Tensor, blocks: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """``x [M, K] @ W.T`` with ``W`` de-quantized from ``blocks`` in PyTorch at each call (the reference path)."""
    return F.linear(x, dequantize_blocks(blocks, fmt.qtype).to(x.dtype))


def triton_block_matmul() -> BlockMatmul | None:
    """The Triton GEMM over ggml blocks (``kernels/triton_gguf.py``), or None without Triton."""
    try:
        from inferneo.kernels.triton_gguf import gguf_matmul
    except ImportError:
        return None
    return lambda x, blocks, fmt: gguf_matmul(x, blocks, fmt.qtype)


# The int8 dot path (``gguf_linear_int8``: activations quantized to int8 per 32-weight block, integer dot products
# against the blocks; not bit-exact, see docs/benchmarks.md "GGUF int8 dot products on AVX2") per ggml type: the
# ranges of rows (first, last) for which a call takes it, chosen from benchmarks/cpu_gguf_int8.py on an AVX2 CPU
# (Zen 3, 2 vCPUs). Q4_0 / Q4_1: every row count (1.0-1.7x the exact path per layer). Q8_0 (tied LM heads): up to
# 16 rows (the kernel's direct byte path, 1.2-2.8x) and above the exact path's fused rows (48: there that path is
# de-quantized tiles + a GEMM); at 17-48 rows the int8 path's repacking to int16 costs more than it saves
# (0.8-0.95x). Other types, and rows outside the ranges, take the exact float path.
_UNBOUNDED = 1 << 62
_Q8_0 = 8
_INT8_DOT_ROWS: dict[int, tuple[tuple[int, int], ...]] = {
    2: ((1, _UNBOUNDED),),  # Q4_0
    3: ((1, _UNBOUNDED),),  # Q4_1
    8: ((1, 16), (49, _UNBOUNDED)),  # Q8_0
}


# With AVX512_VNNI (the int8 switch on, Q4 layers in the wide16 layout: ``gguf_packed_linear_int8``) the int8 path
# runs from 4 rows up: float32 activations at every larger row count, bfloat16 ones up to 256 rows. Measured on a
# Zen 5 (2 vCPUs, 2026-12-04; ``benchmarks/cpu_gguf_paths.py --paths wide16,wide16_bf16,wide16_int8``: the default
# model's GGUF matrices once, its Q8_0 head exact in all three): against the exact float32 path 0.90x at 1-2 rows,
# 1.14x at 4, 1.4-2.1x at 8-512; against the AVX512_BF16 panels 1.2x at 4, 1.1-1.35x at 8-256, 1.05x at 512 (and an
# engine run's prompt-sized calls were slower through it, so bfloat16 stops at 256). The Q8_0 head takes the int8
# path up to 8 rows only: the AVX2 Q8_0 int8 kernel measured 0.6x the AVX-512 exact one at 16-64 rows.
_VNNI_MIN_ROWS = 4
_VNNI_BF16_MAX_ROWS = 256
_INT8_DOT_ROWS_VNNI: dict[int, tuple[tuple[int, int], ...]] = {8: ((1, 8),)}  # over _INT8_DOT_ROWS

# With AVX512_VNNI (the int16 switch, on by default) float32 activations of wide16 layers are held as 16-bit
# integers per 32-weight block from this many rows up (``gguf_packed_linear_i16``). Measured on a Zen 5 (2 vCPUs,
# 2026-12-05, the default model's four Q4_1 shapes, 30 layers' weights cycled, two threads, glibc's thresholds as
# the engine sets them): against the exact float32 path 0.6-0.95x at 1-8 rows (the codes are spread into vpdpwssd
# operands at each call), 1.18x at 16 rows, 1.36x at 32, 1.41x at 64, 1.29x at 256.
_INT16_MIN_ROWS = 16
# Where the CPU has AMX-INT8 the same integer sums run on the tiles (the same bits), and the crossover moves down:
# on a 2-core Xeon with AMX (2026-12-05, ``benchmarks/cpu_gguf_paths.py --paths wide16,wide16_int16 --threads 2``,
# ms a step of the default model's GGUF layers) 9.67 against 9.99 at 8 rows (the exact path ahead), 12.15 against
# 9.92 at 9, 19.22 against 12.61 at 16.
_INT16_MIN_ROWS_AMX = 9


def block_matmul_for(device: torch.device, kernels: KernelConfig) -> BlockMatmul | None:
    """The matmul over ggml blocks for ``device``: on CPU the native kernels where ``kernels`` allows them and
    they build, else :func:`reference_block_matmul`; on CUDA the Triton GEMM (None without Triton)."""
    if device.type == "cuda":
        return triton_block_matmul()
    if device.type == "cpu" and kernels.cpu_native_kernels:
        from inferneo.kernels.cpu_gguf import load_gguf_kernels

        ops = load_gguf_kernels()
        if ops is not None:
            int8_rows = {}
            if kernels.gguf_int8_dot and ops.gguf_isa() != "portable":
                int8_rows = {**_INT8_DOT_ROWS, **(_INT8_DOT_ROWS_VNNI if ops.gguf_packed_int8_available() else {})}

            def native(x: torch.Tensor, blocks: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
                rows = x.shape[0]
                if any(first <= rows <= last for first, last in int8_rows.get(fmt.qtype, ())):
                    out = ops.gguf_linear_int8(x, blocks, fmt.qtype, x.shape[-1])
                else:
                    out = ops.gguf_linear(x, blocks, fmt.qtype, x.shape[-1])
                return out if x.dtype == torch.float32 else out.to(x.dtype)
            return native
    return reference_block_matmul


# ---- linear layers ------------------------------------------------------------------------------------------


# A matmul over a wide16 segment: (x [M, K], tiles, format, output rows, dense_from) -> [M, rows]
class Wide16Matmul(Protocol):
    """The native matmul over wide16 tiles (``wide16_matmul_for``)."""

    def __call__(self, x: torch.Tensor, tiles: torch.Tensor, fmt: BlockFormat, rows: int,
                 dense_from: int | None = None, float_out: bool = False) -> torch.Tensor: ...


def wide16_matmul_for(device: torch.device, kernels: KernelConfig) -> Wide16Matmul | None:
    """The native matmul over wide16 tiles where Q4_0 / Q4_1 layers should be repacked at load: CPUs with the
    AVX-512 kernels and ``gguf_wide16`` and the native kernels on; with the int8 dot path on, only CPUs that also
    have AVX512_VNNI (its wide16 kernel; elsewhere the int8 path reads the file's layout); else None (the layers
    keep the file's blocks). With ``gguf_int16`` and AVX512_VNNI, float32 activations of ``_INT16_MIN_ROWS`` rows
    and more are multiplied as 16-bit integers per block (``gguf_packed_linear_i16``)."""
    if device.type != "cpu" or not (kernels.cpu_native_kernels and kernels.gguf_wide16):
        return None
    from inferneo.kernels.cpu_gguf import load_gguf_kernels

    ops = load_gguf_kernels()
    if ops is None or not ops.gguf_packed_available():
        return None
    if kernels.gguf_int8_dot and not ops.gguf_packed_int8_available():
        return None

    int8 = kernels.gguf_int8_dot
    int16 = kernels.gguf_int16 and ops.gguf_packed_int8_available()
    amx_int8 = ops.gguf_packed_amx_int8_available()
    int16_min_rows = _INT16_MIN_ROWS_AMX if amx_int8 else _INT16_MIN_ROWS
    _note_wide16_paths("amx_bf16" if ops.gguf_packed_amx_available() else ops.gguf_isa(), int8, int16, amx_int8)

    def native(x: torch.Tensor, tiles: torch.Tensor, fmt: BlockFormat, rows: int,
               dense_from: int | None = None, float_out: bool = False) -> torch.Tensor:
        """``x @ W.T`` in ``x``'s dtype; with ``float_out`` (an LM head whose logits are sampled in float32), a
        bfloat16 layer's output as float32 holding the bfloat16-rounded values: what ``.float()`` of its bfloat16
        output gives, written once by the kernel."""
        if (int8 and fmt.qtype != _Q8_0 and x.shape[0] >= _VNNI_MIN_ROWS
                and (x.dtype == torch.float32 or x.shape[0] <= _VNNI_BF16_MAX_ROWS)):
            out = ops.gguf_packed_linear_int8(x, tiles, fmt.qtype, rows)
        elif int16 and x.dtype == torch.float32 and x.shape[0] >= int16_min_rows:
            return ops.gguf_packed_linear_i16(x, tiles, fmt.qtype, rows)
        elif dense_from is not None and x.shape[0] >= dense_from:
            out = torch.mm(x, ops.gguf_packed_dequantize_kn(tiles, fmt.qtype, rows, x.dtype))
        else:  # bfloat16 rows come back rounded to bfloat16 by the kernel itself (no float32 copy to convert)
            bf16 = x.dtype == torch.bfloat16
            if bf16 and float_out:
                return ops.gguf_packed_linear(x, tiles, fmt.qtype, rows, rounded_float_out=True)
            out = ops.gguf_packed_linear(x, tiles, fmt.qtype, rows, bf16_out=bf16)
        out = out if out.dtype == x.dtype else out.to(x.dtype)
        return out.float() if float_out else out
    return native


def _gate_up_silu_for(layer: QuantizedLinear, seg: BlockSegment) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
    """For a bfloat16 gate/up projection (two equal halves of 48-column multiples) in one wide16 segment on a CPU
    with AMX-BF16: ``fn(x)`` giving ``silu(gate) * up`` in one kernel pass (``gguf_packed_linear_silu``: the bits of
    the projection followed by the SiLU-and-mul kernel) for the row counts it takes, None for the others (the
    caller then runs the two); None when the layer or CPU has no such pass."""
    from inferneo.kernels.cpu_gguf import load_gguf_kernels

    sizes = layer.shape.output_sizes
    ops = load_gguf_kernels()
    if (layer.dtype != torch.bfloat16 or len(sizes) != 2 or sizes[0] != sizes[1] or sizes[0] % 48
            or ops is None or not ops.gguf_packed_amx_available()):
        return None
    low, high = ops.gguf_packed_silu_rows()  # below any dense hand-over (256 rows and up)
    buffers = layer._buffers

    def gate_up_silu(x2: torch.Tensor) -> torch.Tensor | None:
        if x2.dtype != torch.bfloat16 or not low <= x2.shape[0] <= high:
            return None
        return ops.gguf_packed_linear_silu(x2, buffers[seg.buffer], seg.fmt.qtype, seg.rows)
    return gate_up_silu


def _wide16_kept(qtype: int, kernels: KernelConfig) -> bool:
    """Whether blocks of ``qtype`` are repacked into wide16 tiles where the wide16 kernels run: Q4_0 / Q4_1, and
    Q8_0 unless the int8 dot switch is on (its Q8_0 int8 kernel reads the file's layout)."""
    return wide16_supported(qtype) and not (qtype == _Q8_0 and kernels.gguf_int8_dot)


def wide16_dense_from(tiles: torch.Tensor, seg: BlockSegment, dtype: torch.dtype, kernels: KernelConfig) -> int | None:
    """The row count from which the wide16 segment ``seg`` (its ``tiles``) runs as a de-quantized dense matmul
    (``gguf_dense.py``: measured where the CPU makes it a candidate), or None."""
    from inferneo.kernels.cpu_gguf import load_gguf_kernels

    ops = load_gguf_kernels()
    if ops is None:
        return None
    return dense_from_rows(ops, tiles, seg.fmt.qtype, seg.rows, dtype, kernels)


class GGUFLinearMethod(LinearMethod):
    """A linear layer held as ggml blocks: one uint8 buffer ``[rows, row_bytes]`` per run of shards of one type.

    The checkpoint tensor is ``<module>.qweight`` (a shard's rows of blocks); the layer's ``qweight`` parameter is
    an empty ``[out_features, 0]`` placeholder whose loader puts each shard into its segment's buffer."""

    name = "gguf"

    def __init__(self, shard_types: tuple[int, ...], whole: bool) -> None:
        """``shard_types``: the ggml type of each logical shard; ``whole``: the file stores the layer as one
        tensor (then every shard has the same type)."""
        self.shard_types = shard_types
        self.whole = whole

    def segments(self, shape: LinearShape) -> tuple[BlockSegment, ...]:
        """The layer's runs of equal-typed shards."""
        if self.whole:
            return (BlockSegment(block_format(self.shard_types[0]), 0, shape.out_features, (), "qweight_blocks0"),)
        runs: list[list[int]] = []
        for shard, qtype in enumerate(self.shard_types):
            if runs and self.shard_types[runs[-1][0]] == qtype:
                runs[-1].append(shard)
            else:
                runs.append([shard])
        return tuple(BlockSegment(block_format(self.shard_types[run[0]]), shape.shard_offset(run[0]),
                                  sum(shape.output_sizes[s] for s in run), tuple(run), f"qweight_blocks{i}")
                     for i, run in enumerate(runs))

    def create_weights(self, layer: QuantizedLinear) -> None:
        layer.gguf_segments = self.segments(layer.shape)
        layer.block_matmul = reference_block_matmul
        layer.single_matmul = None  # finalize: the whole layer as one wide16 call, where it is one
        layer.silu_matmul = None  # finalize: a gate/up projection with SiLU-and-mul in the same pass, where it runs
        for seg in layer.gguf_segments:
            layer.register_buffer(seg.buffer, torch.zeros(seg.rows, seg.fmt.row_bytes(layer.in_features),
                                                          dtype=torch.uint8, device=layer.device))
        new_parameter(layer, "qweight", (layer.out_features, 0), torch.uint8, self._loader(layer))

    @staticmethod
    def _loader(layer: QuantizedLinear):
        def load(param: nn.Parameter, tensor: torch.Tensor, shard: int | None) -> None:
            shape = layer.shape
            what = f"{shape.prefix} ({'all shards' if shard is None else f'shard {shard}'})"
            if shard is None:
                if len(layer.gguf_segments) != 1:
                    raise ValueError(f"{what}: the layer's shards differ in GGUF type; it cannot load as one tensor")
                seg, start, rows = layer.gguf_segments[0], 0, layer.out_features
            else:
                seg = next((s for s in layer.gguf_segments if shard in s.shards), None)
                if seg is None:
                    raise ValueError(f"{what}: the file stores this layer as one tensor, not by shard")
                start, rows = shape.shard_offset(shard) - seg.row_start, shape.output_sizes[shard]
            dest = getattr(layer, seg.buffer).narrow(0, start, rows)
            if tensor.dtype != torch.uint8 or tuple(tensor.shape) != tuple(dest.shape):
                raise ValueError(f"{what}: expected {seg.fmt.name} blocks of shape {tuple(dest.shape)} (uint8); got "
                                 f"{tensor.dtype} {tuple(tensor.shape)}")
            dest.copy_(tensor)

        return load

    def finalize(self, layer: QuantizedLinear, kernels: KernelConfig) -> None:
        matmul = block_matmul_for(layer.device, kernels)
        if matmul is None:
            _dequantize_without_kernels(layer)
            return
        layer.block_matmul = matmul
        wide16 = wide16_matmul_for(layer.device, kernels)
        if wide16 is None:
            return
        layer.wide16_matmul = wide16
        segments = []
        for seg in layer.gguf_segments:
            if _wide16_kept(seg.fmt.qtype, kernels):
                tiles = pack_wide16(getattr(layer, seg.buffer), seg.fmt.qtype)
                layer.register_buffer(seg.buffer, tiles)
                seg = replace(seg, layout="wide16", dense_from=wide16_dense_from(tiles, seg, layer.dtype, kernels))
            segments.append(seg)
        layer.gguf_segments = tuple(segments)
        if len(segments) == 1 and segments[0].layout == "wide16":
            # the common layer (one run of Q4 / Q8_0 shards): the call without the general path's per-call work
            # (about 3.5 us of Python a call, measured against a 10 us one-row kernel on a Zen 5)
            seg, buffers = segments[0], layer._buffers

            def single(x2: torch.Tensor) -> torch.Tensor:
                return wide16(x2, buffers[seg.buffer], seg.fmt, seg.rows, seg.dense_from)

            layer.single_matmul = single
            layer.silu_matmul = _gate_up_silu_for(layer, seg)

    def apply(self, layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        single = layer.single_matmul
        if single is not None:
            if x.dim() == 2:
                return single(x)
            return single(x.reshape(-1, layer.in_features)).reshape(*x.shape[:-1], layer.out_features)
        x2 = x.reshape(-1, layer.in_features)
        if getattr(layer, "dense_weight", None) is not None:
            y = F.linear(x2, layer.dense_weight)
        else:
            outs = [layer.wide16_matmul(x2, getattr(layer, seg.buffer), seg.fmt, seg.rows, seg.dense_from)
                    if seg.layout == "wide16"
                    else layer.block_matmul(x2, getattr(layer, seg.buffer), seg.fmt) for seg in layer.gguf_segments]
            y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return y.reshape(*x.shape[:-1], layer.out_features)

    def dequantized_weight(self, layer: QuantizedLinear) -> torch.Tensor:
        if getattr(layer, "dense_weight", None) is not None:
            return layer.dense_weight.float()
        return torch.cat([dequantize_blocks(ggml_blocks(layer, seg), seg.fmt.qtype) for seg in layer.gguf_segments])

    def init_dummy(self, layer: QuantizedLinear, generator: torch.Generator) -> None:
        for seg in layer.gguf_segments:
            random_blocks(getattr(layer, seg.buffer), seg.fmt, generator)


def ggml_blocks(layer: QuantizedLinear, seg: BlockSegment) -> torch.Tensor:
    """A segment's weights as the file's ggml blocks ``[rows, row_bytes]`` (unpacked from wide16 if need be)."""
    blocks = getattr(layer, seg.buffer)
    return unpack_wide16(blocks, seg.fmt.qtype, seg.rows) if seg.layout == "wide16" else blocks


def _dequantize_without_kernels(layer: QuantizedLinear) -> None:
    """No GGUF kernel for the device (CUDA without Triton): the layer's blocks become one weight in the model dtype
    (logged once)."""
    _note_dequantize(layer.device)
    dense = torch.cat([dequantize_blocks(getattr(layer, seg.buffer), seg.fmt.qtype).to(layer.dtype)
                       for seg in layer.gguf_segments])
    for seg in layer.gguf_segments:
        delattr(layer, seg.buffer)
    layer.gguf_segments = ()
    layer.register_buffer("dense_weight", dense)


@functools.cache
def _note_wide16_paths(isa: str, int8: bool, int16: bool, amx_int8: bool = False) -> None:
    """Log once a process which wide16 products its GGUF layers take on this CPU (issue 23: the choice, logged)."""
    if int8:
        tiles = "; the AMX-INT8 tiles from 9 rows" if amx_int8 else ""
        float32 = f"int8 dot products (AVX512_VNNI{tiles}) from 4 rows"
    elif int16:
        unit, rows = ("the AMX-INT8 tiles", _INT16_MIN_ROWS_AMX) if amx_int8 else ("AVX512_VNNI", _INT16_MIN_ROWS)
        float32 = f"16-bit integer activations ({unit}) from {rows} rows"
    else:
        float32 = "the exact AVX-512 float32 kernels"
    bfloat16 = ("int8 dot products up to 256 rows" if int8
                else "bfloat16 pair panels on the AMX tiles" if isa == "amx_bf16"
                else "AVX512_BF16 pair panels" if isa == "avx512_bf16" else "AVX-512 float32 panels (widened rows)")
    logger.info("GGUF layers in the wide16 layout: float32 activations take %s, bfloat16 ones %s (a few rows: the "
                "exact in-register path)", float32, bfloat16)


@functools.cache
def _note_dequantize(device: torch.device) -> None:
    logger.warning("GGUF on %s: no GGUF kernel here (Triton is missing); GGUF layers are de-quantized to the model "
                   "dtype at load (memory as the full-width model)", device.type)


# ---- the embedding and a tied LM head -----------------------------------------------------------------------


class GGUFEmbedding(nn.Module):
    """A token embedding held as ggml blocks (``qweight``, uint8 ``[vocab, row_bytes]``): a lookup de-quantizes
    the looked-up rows only."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: BlockFormat, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.fmt, self.dtype = num_embeddings, embedding_dim, fmt, dtype
        self.qweight = nn.Parameter(torch.zeros(num_embeddings, fmt.row_bytes(embedding_dim), dtype=torch.uint8,
                                                device=device), requires_grad=False)
        self.qweight.quantized = True

    layout = "ggml"  # or "wide16": Q8_0 tiles repacked for a tied LM head (hold_as_wide16)

    # Set by hold_as_wide16 when the native kernels run: (tiles, ids, rows) -> float32 rows [len(ids), dim].
    native_rows: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1)
        if self.layout == "wide16" and self.native_rows is not None:
            rows = self.native_rows(self.qweight, ids, self.num_embeddings)
            return rows.to(self.dtype).reshape(*input_ids.shape, self.embedding_dim)
        if self.layout == "wide16":
            rows = wide16_rows(self.qweight, self.fmt.qtype, ids)
        else:
            rows = self.qweight.index_select(0, ids)
        return dequantize_blocks(rows, self.fmt.qtype).to(self.dtype).reshape(*input_ids.shape, self.embedding_dim)

    def hold_as_wide16(self, native_rows: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None,
                       ) -> None:
        """Keep the table as wide16 tiles (Q8_0 only), the layout the AVX-512 kernels multiply, so that a tied head
        reads it without transposing blocks at each call; lookups gather their rows from the tiles (the same
        blocks), through ``native_rows`` when given (the native kernels' ``gguf_packed_rows_q8_0``: the same
        values, without gathering whole tiles). The weight is still held once. Safe to call again."""
        if native_rows is not None:
            self.native_rows = native_rows
        if self.layout == "wide16":
            return
        if self.fmt.qtype != _Q8_0:
            raise ValueError(f"only Q8_0 embeddings are held as wide16 tiles, not {self.fmt.name}")
        self.qweight.data = pack_wide16(self.qweight.data, self.fmt.qtype)
        self.layout = "wide16"

    def ggml_blocks(self) -> torch.Tensor:
        """The table as the file's blocks ``uint8 [vocab, row_bytes]`` (unpacked from wide16 if need be)."""
        if self.layout == "wide16":
            return unpack_wide16(self.qweight, self.fmt.qtype, self.num_embeddings)
        return self.qweight

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, gguf {self.fmt.name}"


class TiedEmbeddingMethod(LinearMethod):
    """An LM head tied to a :class:`GGUFEmbedding`: ``x @ E.T`` over the embedding's blocks (no weights of its
    own)."""

    name = "gguf-tied"

    def __init__(self, embedding: GGUFEmbedding) -> None:
        self._embedding = [embedding]  # not a submodule: its weight is the embedding's, loaded there

    def create_weights(self, layer: QuantizedLinear) -> None:
        layer.block_matmul = reference_block_matmul

    def finalize(self, layer: QuantizedLinear, kernels: KernelConfig) -> None:
        matmul = block_matmul_for(layer.device, kernels)
        if matmul is None:  # no kernel: a de-quantized copy for the head (the lookup stays in blocks)
            _note_dequantize(layer.device)
            layer.register_buffer("dense_weight", self.dequantized_weight(layer).to(layer.dtype))
            return
        layer.block_matmul = matmul
        emb = self._embedding[0]
        wide16 = wide16_matmul_for(layer.device, kernels)
        if wide16 is not None and _wide16_kept(emb.fmt.qtype, kernels) and emb.fmt.qtype == _Q8_0:
            # Q8_0 tiles: 1.1-2x faster than transposing the file's blocks at each call at 1-64 rows (Zen 5,
            # SmolLM2's 49,152 x 576 head; docs/benchmarks.md)
            from inferneo.kernels.cpu_gguf import load_gguf_kernels

            emb.hold_as_wide16(native_rows=load_gguf_kernels().gguf_packed_rows_q8_0)
            layer.wide16_matmul = wide16

    def apply(self, layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        if getattr(layer, "dense_weight", None) is not None:
            return F.linear(x, layer.dense_weight)
        emb = self._embedding[0]
        x2 = x.reshape(-1, layer.in_features)
        if emb.layout == "wide16":
            # the head's logits are sampled in float32 (compute_logits' .float() is then a no-op): a bfloat16
            # model's come as float32 holding the bfloat16-rounded values, with no conversion pass
            y = layer.wide16_matmul(x2, emb.qweight, emb.fmt, layer.out_features, float_out=True)
        else:
            y = layer.block_matmul(x2, emb.qweight, emb.fmt)
        return y.reshape(*x.shape[:-1], layer.out_features)

    def dequantized_weight(self, layer: QuantizedLinear) -> torch.Tensor:
        emb = self._embedding[0]
        return dequantize_blocks(emb.ggml_blocks(), emb.fmt.qtype)

    def init_dummy(self, layer: QuantizedLinear, generator: torch.Generator) -> None:
        emb = self._embedding[0]
        if emb.layout == "wide16":
            blocks = emb.ggml_blocks().clone()
            random_blocks(blocks, emb.fmt, generator)
            emb.qweight.data = pack_wide16(blocks, emb.fmt.qtype)
        else:
            random_blocks(emb.qweight.data, emb.fmt, generator)


# ---- the format ----------------------------------------------------------------------------------------------


def _engine_layer(hf_name: str) -> tuple[str, int | None] | None:
    """(engine module, shard) of a checkpoint weight ``model.layers.0.self_attn.q_proj.weight``; None for a tensor
    that is no module's ``weight``."""
    if not hf_name.endswith(".weight"):
        return None
    module = hf_name.removeprefix("model.").removesuffix(".weight")
    parent, _, leaf = module.rpartition(".")
    if leaf in _FUSED_SHARDS:
        fused, shard = _FUSED_SHARDS[leaf]
        return (f"{parent}.{fused}" if parent else fused), shard
    return module, None


class GGUFQuantConfig(QuantConfig):
    """A GGUF file whose block-quantized weights stay quantized (see the module doc)."""

    name = "gguf"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.kept: set[str] = set()  # GGUF tensors the model holds as blocks (filled as layers are quantized)

    @classmethod
    def from_hf(cls, quantization_config: dict[str, Any]) -> GGUFQuantConfig:
        """From ``{"quant_method": "gguf", "file": <the .gguf path>}`` (written by ``gguf_config``)."""
        path = quantization_config.get("file")
        if not isinstance(path, str):
            raise ValueError("a gguf quantization_config needs 'file', the .gguf path (it is written by the GGUF "
                             "loader; a config.json cannot ask for GGUF)")
        return cls(path)

    @functools.cached_property
    def file_layers(self) -> dict[str, dict[int | None, GGUFTensorInfo]]:
        """The file's 2-D weights by engine module: ``{prefix: {shard (None: whole layer): tensor}}``."""
        header = read_gguf_header(self.path)
        layers: dict[str, dict[int | None, GGUFTensorInfo]] = {}
        for info in header.tensors:
            if len(info.shape) != 2:
                continue
            try:
                hf_name = gguf_hf_name(info.name, arch=header.architecture)
            except ValueError:
                continue
            target = _engine_layer(hf_name)
            if target is not None:
                layers.setdefault(target[0], {})[target[1]] = info
        return layers

    def _kept_tensors(self, prefix: str, num_shards: int) -> dict[int | None, GGUFTensorInfo] | None:
        """The file's tensors of layer ``prefix`` when all are of a kept type and cover its shards, else None."""
        tensors = self.file_layers.get(prefix)
        if not tensors or any(info.ggml_type not in KEPT_FORMATS for info in tensors.values()):
            return None
        if None in tensors or set(tensors) == set(range(num_shards)):
            return tensors
        return None

    def method_for(self, shape: LinearShape) -> LinearMethod | None:
        tensors = self._kept_tensors(shape.prefix, len(shape.output_sizes))
        if tensors is None:
            return None
        self.kept.update(info.name for info in tensors.values())
        if None in tensors:
            return GGUFLinearMethod((tensors[None].ggml_type,) * len(shape.output_sizes), whole=True)
        return GGUFLinearMethod(tuple(tensors[i].ggml_type for i in range(len(shape.output_sizes))), whole=False)

    def quantize_embeddings(self, model: nn.Module, dtype: torch.dtype, device: torch.device) -> int:
        swapped = 0
        for parent_name, parent in list(model.named_modules()):
            for name, child in list(parent.named_children()):
                prefix = f"{parent_name}.{name}" if parent_name else name
                if type(child) is not nn.Embedding:
                    continue
                tensors = self._kept_tensors(prefix, 1)
                if tensors is None:
                    continue
                info = next(iter(tensors.values()))
                embedding = GGUFEmbedding(child.num_embeddings, child.embedding_dim, block_format(info.ggml_type),
                                          dtype, device)
                self.kept.add(info.name)
                setattr(parent, name, embedding)
                swapped += 1 + self._tie_heads(model, child.weight, embedding, prefix, dtype, device)
        return swapped

    @staticmethod
    def _tie_heads(model: nn.Module, weight: nn.Parameter, embedding: GGUFEmbedding, prefix: str,
                   dtype: torch.dtype, device: torch.device) -> int:
        """Replace the linears sharing ``weight`` (a tied LM head) with ones reading ``embedding``'s blocks."""
        tied = 0
        for parent_name, parent in list(model.named_modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and child.weight is weight:
                    head = f"{parent_name}.{name}" if parent_name else name
                    shape = LinearShape(head, embedding.embedding_dim, (embedding.num_embeddings,))
                    setattr(parent, name, QuantizedLinear(TiedEmbeddingMethod(embedding), shape, False, dtype,
                                                          device))
                    logger.debug("%s reads the GGUF blocks of %s", head, prefix)
                    tied += 1
        return tied

    def quantize_experts(self, model: nn.Module, dtype: torch.dtype, device: torch.device) -> int:
        """Hold the stacked experts of each mixture-of-experts layer whose expert tensors allow it as ggml blocks
        (``gguf_experts.py``); the others stay de-quantized, logged once per reason with their layers."""
        plans = plan_gguf_experts(read_gguf_header(self.path))
        kept, fallback = 0, {}
        for name, module in model.named_modules():
            if not isinstance(module, FusedMoE):
                continue
            plan = plans.get(name, ExpertPlan(None, "the file has no expert tensors for it"))
            reason = plan.reason
            if plan.tensors is not None:
                reason = hold_experts_in_blocks(module, plan.tensors, device, block_matmul_for)
            if reason is not None:
                fallback.setdefault(reason, []).append(name)
                continue
            self.kept.update(plan.tensors.names)
            kept += 1
        for reason, layers in fallback.items():
            logger.info("GGUF: the experts of %d mixture-of-experts layers (%s) are de-quantized at load: %s",
                        len(layers), ", ".join(layers[:4]) + (", ..." if len(layers) > 4 else ""), reason)
        if kept:
            logger.info("GGUF: the experts of %d mixture-of-experts layers stay in ggml blocks", kept)
        return kept

    def check_supported(self, device: torch.device, dtype: torch.dtype) -> None:
        if device.type == "cpu" and dtype in _CPU_DTYPES or device.type == "cuda":
            return
        raise ValueError(f"GGUF kept quantized does not run on {device.type} in {dtype}; supported: CPU in "
                         "float32, bfloat16 or float16, and CUDA (de-quantized at load); INFERNEO_GGUF_DEQUANTIZE=1 "
                         "de-quantizes the file at load")

    def prepare_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The file read again with the kept tensors as raw blocks (``<module>.qweight``); the de-quantizing
        iterator handed in is closed unread."""
        close = getattr(weights, "close", None)
        if close is not None:
            close()
        # the model was built with full-width layers before they were replaced: give their memory back
        release_freed_memory()
        yield from iter_gguf_weights(self.path, keep_blocks=frozenset(self.kept))

    def describe(self) -> str:
        return f"gguf ({len(self.kept)} tensors kept in ggml blocks)"
