"""W4A16 products in Triton: ``y = x @ W.T`` with ``W`` in the row layout (:class:`Int4RowWeights`: each output
row's 4-bit codes contiguous along K, eight to an int32 word; per-row scales and zero points per group), de-quantized
in registers, float32 sums.

Four kernels (:func:`w4a16_linear`; which one runs, and its launch, comes from the shape and row count):

- one half-precision row: :func:`_gemv_h2_kernel` (kind ``"h2"``), codes de-quantized two to a packed float16
  instruction and multiplied in packed float16, about two instructions a code (see the comment above it).
- one row otherwise: :func:`_gemv_kernel` (CUDA cores). A program owns ``BLOCK_N`` output rows and walks K
  ``BLOCK_G`` groups at a time, as a ``[BLOCK_N, BLOCK_G, group/8]`` tile of words. Codes are turned into floats
  without a conversion instruction: masked in place and OR-ed into the mantissa of ``2^23`` (``0x4B000000``), the float
  ``2^23 + q * 16^p`` less ``2^23`` is ``q * 16^p`` exactly, and ``x`` is pre-scaled by ``16^-p`` (codes 5..7 come
  from the word shifted by 12 bits so that every code sits below bit 20). Per group the kernel sums ``q * x`` and
  adds ``s * (sum(q * x) - z * sum(x))``. The gated MLP variant (``SILU``) reads the gate and up rows of a fused
  gate/up weight and writes ``silu(gate) * up``.
- half-precision activations, 1 to 64 rows: :func:`_tc_kernel`, tensor cores (``tl.dot``, ``x`` padded to 16 rows)
  fed from a tile de-quantized in registers at two codes per 32-bit instruction (inline PTX): ``prmt`` puts byte
  ``b`` of a word beside the same byte of the word shifted by 4, one ``lop3`` masks codes ``2b`` and ``2b + 1`` into
  the low mantissa bits of a packed pair of half-precision ``128.0`` (bf16, ``0x4300``) or ``1024.0`` (fp16,
  ``0x6400``), and one packed ``fma`` subtracts ``magic + z``: ``q - z`` exactly, already in the register pairs the
  dot operand wants (about 1.6 instructions a code; under the interpreter the same values come from plain Triton).
  The group scale multiplies each group's partial product in float32 (``scale_after``: one ``tl.dot`` per group) or
  the tile in half precision (one packed ``fma`` more per two codes: the weight rounded once to the activation
  dtype). ``swap`` computes ``W x^T`` instead of ``x W^T``. ``SILU`` fuses the gated MLP's activation. Above
  ``TC_PDL_MIN_ROWS`` rows it launches with programmatic dependent launch where the decode kernels do
  (``INFERNEO_W4A16_TC_PDL``): its first step's weights are prefetched to L2 before it waits.
- otherwise (float32 activations, more than 64 rows, groups of fewer than 16 columns): :func:`_dot_kernel`, a
  ``[BLOCK_N, BLOCK_KW]`` tile of words de-quantized in float32 (``(q - z) * s``, rounded to the activation
  dtype), unpacked to ``[BLOCK_N, 8 * BLOCK_KW]`` and multiplied with a tile of ``x`` through one ``tl.dot``
  (float32 activations: IEEE float32 products).

The GEMVs and the tensor-core kernel can split K over ``split_k`` programs (few output tiles, as at 4096 output rows,
leave most multiprocessors idle otherwise): each program's sums go to a workspace and the last program of a tile
adds them up in a fixed order (``last_sums``), or they are added atomically into a float32 output.

Launches come from ``int4_configs.json`` beside this file, per layer shape and row bucket (1, 2-16, 17-32, 33-64,
more; written by ``benchmarks/gpu/int4_check.py --write-configs`` on the GPU it measures), else from
:func:`default_config` (a rule on the shape, the row count and the device's multiprocessor count).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import triton
import triton.language as tl

from inferneo import envs
from inferneo.kernels._pdl import launch_options, pdl_for, wait_for_previous_kernel, wait_without_trigger
from inferneo.kernels.scaled_row import ResidualNorm, RowScale, epilogue_arguments
from inferneo.kernels.triton_attention import device_sm_count
from inferneo.quantization.int4_layouts import Int4RowWeights

TUNED_CONFIG_FILE = Path(__file__).with_name("int4_configs.json")
_INTERPRETED: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
#: Rows up to which, without a tuned entry, half-precision activations go through :func:`_tc_kernel`.
TC_MAX_ROWS = 64
#: Rows up to which :func:`_tc_kernel` takes a plain launch even where the decode kernels use PDL: in Llama-2-7B's
#: W4A16 + FP8 KV decode step on an H100, PDL made batch 16 slower (5.43 against 5.33 ms) and batch 32 faster
#: (6.76-6.80 against 6.89 ms; docs/benchmarks.md).
TC_PDL_MIN_ROWS = 16


def triton_int4_available(group_size: int) -> bool:
    """Whether the kernels run layers of this group size (whole int32 words per group)."""
    return group_size > 0 and group_size % 8 == 0


@dataclass(frozen=True, slots=True)
class W4A16Config:
    """One launch. ``kind`` ``"gemv"`` (one row; ``"silu"``: the fused gate/up GEMV): ``block_n`` output rows x
    ``block_g`` groups per step; ``"h2"`` (one bf16/fp16 row in packed half precision, the fused gate/up included;
    other rows fall back to the GEMV): ``block_n`` output rows x ``block_kw`` words per step; ``"dot"``:
    ``block_m`` x ``block_n`` output tiles, ``block_kw`` words (8 columns each) per step; ``"tc"`` (half
    precision): ``block_m`` x ``block_n`` output tiles, ``block_g`` groups per step, ``swap`` and ``scale_after``
    as in the module docstring. ``split_k`` (``"gemv"``, ``"h2"`` and ``"tc"``): programs along K (not for the
    fused SiLU; with ``silu_pairs``, an ``"h2"`` fused SiLU whose programs each hold ``block_n / 2`` gate rows
    interleaved with their up rows, the linear launch's tile on the ``[2D, K]`` weight):
    their float32 sums added atomically into a zeroed float32 output, then rounded to the activation dtype by a
    second launch, or (``last_sums``) each written to a workspace, and the last program of a tile to finish (an
    atomic count per tile) adds them up in a fixed order and writes the output: no zeroing, no second launch, and
    the same result every run."""

    kind: str
    block_n: int
    block_g: int = 0
    block_m: int = 0
    block_kw: int = 0
    num_warps: int = 4
    num_stages: int = 2
    swap: bool = False
    scale_after: bool = True
    split_k: int = 1
    last_sums: bool = False
    inner_k_tiles: int = 0  # kind "tinygemm" (PyTorch's int4 kernel, in tinygemm_int4.py): its packing's K tiles
    silu_pairs: bool = False  # kind "h2", the fused SiLU: each program's block_n rows are gate/up row pairs

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


def rows_bucket(m: int) -> int:
    """Row counts sharing one tuned entry: 1, 2..16 -> 16, 17..32 -> 32, 33..64 -> 64, more -> 128."""
    for bucket in (1, 16, 32, 64):
        if m <= bucket:
            return bucket
    return 128


def config_key(op: str, m: int, n: int, k: int, group_size: int) -> str:
    """The key of a launch in ``int4_configs.json``: ``"linear,BUCKET,N,K,G"`` (``x @ W.T``, N output rows) or
    ``"silu,BUCKET,D,K,G"`` (the fused gate/up + SiLU of a ``[2D, K]`` weight)."""
    return f"{op},{rows_bucket(m)},{n},{k},{group_size}"


@functools.cache
def _tuned_configs() -> dict[str, W4A16Config]:
    if not TUNED_CONFIG_FILE.is_file():
        return {}
    table = json.loads(TUNED_CONFIG_FILE.read_text())
    return {key: W4A16Config(**entry) for key, entry in table.items() if key.startswith(("linear,", "silu,"))}


@functools.cache
def _config_overrides(raw: str) -> dict[str, dict]:
    """``INFERNEO_W4A16_CONFIGS`` parsed: table key -> the ``W4A16Config`` fields it replaces."""
    if not raw:
        return {}
    try:
        table = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"INFERNEO_W4A16_CONFIGS must be a JSON object; {e}") from None
    types = {name: type(getattr(W4A16Config("none", 0), name)) for name in W4A16Config.__slots__}
    if not isinstance(table, dict) or not all(isinstance(v, dict) and set(v) <= set(types) for v in table.values()):
        raise ValueError(f"INFERNEO_W4A16_CONFIGS must map table keys to objects of W4A16Config fields "
                         f"({', '.join(sorted(types))}); got {raw!r}")
    for key, fields in table.items():  # strict: 1 is not a bool, "8" not an int
        for name, value in fields.items():
            if type(value) is not types[name]:
                raise ValueError(f"INFERNEO_W4A16_CONFIGS[{key!r}].{name} must be of type {types[name].__name__}; "
                                 f"got {value!r}")
    return table


def h2_available(group_size: int, dtype: torch.dtype) -> bool:
    """Whether :func:`_gemv_h2_kernel` runs this group size (a power-of-two number of words, at least four) and
    activation dtype (bfloat16 or float16)."""
    words = group_size // 8
    return dtype in (torch.bfloat16, torch.float16) and group_size % 32 == 0 and words & (words - 1) == 0


def tc_available(group_size: int, dtype: torch.dtype) -> bool:
    """Whether :func:`_tc_kernel` runs this group size (16 columns or more per ``tl.dot``) and activation dtype."""
    return group_size % 16 == 0 and dtype in (torch.float16, torch.bfloat16)


def default_config(op: str, m: int, n: int, k: int, group_size: int, dtype: torch.dtype = torch.bfloat16,
                   sms: int = 0) -> W4A16Config | None:
    """The launch for a shape without a tuned entry (``op`` ``"linear"`` or ``"silu"``; None: no fused kernel).

    One half-precision row (groups of a power-of-two number of words): the packed-half kernel, 8 rows a program and
    up to 512 words of K a step, K split over up to 8 programs (the last adds the parts up) while its output tiles
    are fewer than two per multiprocessor (not for ``"silu"``). Another one row: the GEMV, 16 rows per program
    (the loads of ``x`` and its scaling serve every row of the program) and about 128 words of K per step. Half
    precision up to :data:`TC_MAX_ROWS` rows: the tensor-core kernel, a row tile that covers ``m`` (16..64), 64
    output rows, two groups per step, scales after each group's dot; when
    its output tiles are fewer than two per multiprocessor (``sms``, the device's count; 0: unknown), K is split
    over up to 8 programs until they are not, each keeping two steps or more, the parts added up by the last
    program of each tile (not for ``"silu"``). Otherwise the float32-de-quantizing dot kernel
    (64 output rows, 16 words per step); ``"silu"`` has no fused kernel there."""
    if m == 1 and op in ("linear", "silu") and h2_available(group_size, dtype):
        words = k // 8
        block_kw = min(512, triton.next_power_of_2(words))
        tiles = triton.cdiv(n, 8)
        split = 1
        while op == "linear" and sms and tiles * split < 2 * sms and split < 8 and k // group_size >= 2 * split:
            split *= 2
        return W4A16Config("h2", 8, block_kw=block_kw, num_warps=max(1, min(4, block_kw // 128)), split_k=split,
                           last_sums=split > 1)
    if m == 1:
        return _gemv_config(op, k, group_size)
    if m <= TC_MAX_ROWS and tc_available(group_size, dtype):
        block_m = max(16, rows_bucket(m))
        tiles = triton.cdiv(n, 64) * triton.cdiv(m, block_m)
        split = 1
        while op == "linear" and sms and tiles * split < 2 * sms and split < 8 and k // group_size // (2 * split) >= 4:
            split *= 2
        return W4A16Config("tc", block_n=64, block_g=2, block_m=block_m, num_warps=4, num_stages=3, split_k=split,
                           last_sums=split > 1)
    if op == "silu":
        return None
    block_m = min(rows_bucket(m), 64) if m > 1 else 16
    return W4A16Config("dot", block_n=64, block_m=max(16, block_m), block_kw=16, num_warps=4)


def _gemv_config(op: str, k: int, group_size: int) -> W4A16Config:
    """The one-row GEMV's launch: 16 rows per program, about 128 words of K a step."""
    words_per_group = group_size // 8
    groups = k // group_size
    block_g = min(triton.next_power_of_2(groups), max(1, 128 // triton.next_power_of_2(words_per_group)))
    return W4A16Config("silu" if op == "silu" else "gemv", block_n=16, block_g=block_g, num_warps=4)


def _usable(config: W4A16Config | None, op: str, m: int, group_size: int, dtype: torch.dtype) -> bool:
    if config is None or config.kind == "tinygemm":  # (a layout of its own: tinygemm_int4.tinygemm_layout)
        return False
    if config.kind == "tc":
        return tc_available(group_size, dtype) and config.block_m >= 16
    if config.kind in ("gemv", "silu"):
        return m == 1
    if config.kind == "h2":
        return m == 1 and h2_available(group_size, dtype)
    return op == "linear"


def choose_config(op: str, m: int, n: int, k: int, group_size: int, dtype: torch.dtype = torch.bfloat16,
                  sms: int = 0) -> W4A16Config | None:
    """The tuned launch for this shape and row bucket (``int4_configs.json``) when it can run ``m`` rows of
    ``dtype``, else :func:`default_config`. None: ``"silu"`` has no fused kernel for these rows (or the table
    says ``"none"``: measured slower than the projection and the activation apart). ``INFERNEO_W4A16_CONFIGS``
    replaces fields of a key's launch first (for A/Bs)."""
    key = config_key(op, m, n, k, group_size)
    tuned = _tuned_configs().get(key)
    override = _config_overrides(envs.w4a16_config_overrides()).get(key)
    if override is not None:  # an A/B's launch: the table's (or the default) with these fields replaced
        base = tuned if tuned is not None and tuned.kind != "none" else default_config(op, m, n, k, group_size,
                                                                                         dtype, sms)
        tuned = replace(base or W4A16Config("none", 0), **override)
    if tuned is not None and tuned.kind == "none":
        return None  # measured: no fused kernel beats the projection and the activation apart
    if _usable(tuned, op, m, group_size, dtype):
        return tuned
    fallback = default_config(op, m, n, k, group_size, dtype, sms)
    return fallback if _usable(fallback, op, m, group_size, dtype) else None


# ---- one row --------------------------------------------------------------------------------------------------


@triton.jit
def _code(src, MASK: tl.constexpr):
    """The code under ``MASK`` (bits ``4p..4p+3``, p <= 4) as the float ``q * 16^p``, exactly: the bits land in
    the mantissa of ``2^23``, which is then subtracted."""
    return ((src & MASK) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _group_sums(words, x0, x1, x2, x3, x4, x5, x6, x7):
    """``sum_j q_j * x_j`` per word of ``words`` [R, G, W] (``x_j`` [G, W], pre-scaled by ``16^-p_j``), summed
    over each group's words: [R, G]."""
    hi = words >> 12  # codes 5, 6, 7 at bits 8, 12, 16
    acc = _code(words, 0xF) * x0[None, :, :]
    acc += _code(words, 0xF0) * x1[None, :, :]
    acc += _code(words, 0xF00) * x2[None, :, :]
    acc += _code(words, 0xF000) * x3[None, :, :]
    acc += _code(words, 0xF0000) * x4[None, :, :]
    acc += _code(hi, 0xF00) * x5[None, :, :]
    acc += _code(hi, 0xF000) * x6[None, :, :]
    acc += _code(hi, 0xF0000) * x7[None, :, :]
    return tl.sum(acc, axis=2)


@triton.jit
def _gemv_x_planes(xb, kmask):
    """The GEMV's activations of words ``xb`` (pointers to each word's first column, [G, W]): the eight planes
    ``x_j`` in float32, pre-scaled by ``16^-p_j`` (p the position each code is read at, see :func:`_group_sums`:
    exact powers of two), and their unscaled sum per group [G]."""
    x0 = tl.load(xb, mask=kmask, other=0.0).to(tl.float32)
    x1 = tl.load(xb + 1, mask=kmask, other=0.0).to(tl.float32)
    x2 = tl.load(xb + 2, mask=kmask, other=0.0).to(tl.float32)
    x3 = tl.load(xb + 3, mask=kmask, other=0.0).to(tl.float32)
    x4 = tl.load(xb + 4, mask=kmask, other=0.0).to(tl.float32)
    x5 = tl.load(xb + 5, mask=kmask, other=0.0).to(tl.float32)
    x6 = tl.load(xb + 6, mask=kmask, other=0.0).to(tl.float32)
    x7 = tl.load(xb + 7, mask=kmask, other=0.0).to(tl.float32)
    x_sum = tl.sum(x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7, axis=1)
    return (x0, x1 * 0.0625, x2 * 0.00390625, x3 * 0.000244140625, x4 * 0.0000152587890625, x5 * 0.00390625,
            x6 * 0.000244140625, x7 * 0.0000152587890625, x_sum)


@triton.jit
def _dequantized_sum(qw_ptr, s_ptr, z_ptr, rows, rmask, g, gmask, widx, kmask, KW, KG,
                     x0, x1, x2, x3, x4, x5, x6, x7, x_sum):
    """``sum over the tile's groups of s * (sum(q * x) - z * sum(x))`` for output rows ``rows``: [R, G]."""
    words = tl.load(qw_ptr + rows[:, None, None] * KW + widx[None, :, :],
                    mask=rmask[:, None, None] & kmask[None, :, :], other=0)
    part = _group_sums(words, x0, x1, x2, x3, x4, x5, x6, x7)
    gptr = rows[:, None] * KG + g[None, :]
    smask = rmask[:, None] & gmask[None, :]
    s = tl.load(s_ptr + gptr, mask=smask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + gptr, mask=smask, other=0).to(tl.float32)
    return s * (part - z * x_sum[None, :])


@triton.jit
def _write_out(y, yptr, ymask, woff, ws_ptr, count_ptr, M, D, SPLIT_K: tl.constexpr, LAST_SUMS: tl.constexpr):
    """Write a program's float32 sums ``y``: rounded to the output's dtype (``SPLIT_K`` 1); added atomically into a
    zeroed float32 output; or (``LAST_SUMS``) to the workspace ``ws`` [SPLIT_K, M, D] at ``woff``, after which the
    last program of the tile to finish (the tile's count, zero between launches) adds the parts up in order."""
    if SPLIT_K == 1:
        tl.store(yptr, y.to(yptr.dtype.element_ty), mask=ymask)
    elif LAST_SUMS:
        tl.store(ws_ptr + tl.program_id(2) * M * D + woff, y, mask=ymask)
        tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1:  # the other parts are out
            total = tl.load(ws_ptr + woff, mask=ymask, other=0.0, cache_modifier=".cg")
            for i in tl.static_range(1, SPLIT_K):
                total += tl.load(ws_ptr + i * M * D + woff, mask=ymask, other=0.0, cache_modifier=".cg")
            tl.store(yptr, total.to(yptr.dtype.element_ty), mask=ymask)
            tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed")  # ready for the next launch
    else:
        tl.atomic_add(yptr, y, mask=ymask, sem="relaxed")


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, count_ptr, D, K, stride_xm, G_SPLIT,
                 GROUP: tl.constexpr, GW_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                 SILU: tl.constexpr, SPLIT_K: tl.constexpr, LAST_SUMS: tl.constexpr):
    # Output rows n (SILU: gate rows n and up rows D + n) of input row ``program_id(1)``, groups
    # [G_SPLIT * program_id(2), + G_SPLIT) (SPLIT_K > 1: see _write_out).
    GW: tl.constexpr = GROUP // 8
    row = tl.program_id(1)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < D
    KW = K // 8
    KG = K // GROUP
    gl = tl.arange(0, BLOCK_G)
    wl = tl.arange(0, GW_PAD)
    acc = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    acc_up = acc
    g_start = tl.program_id(2) * G_SPLIT
    g_end = tl.minimum(KG, g_start + G_SPLIT)
    for g0 in range(g_start, g_end, BLOCK_G):
        g = g0 + gl
        gmask = g < g_end
        widx = g[:, None] * GW + wl[None, :]  # [BLOCK_G, GW_PAD] word index along K
        kmask = gmask[:, None] & (wl < GW)[None, :]
        x0, x1, x2, x3, x4, x5, x6, x7, x_sum = _gemv_x_planes(x_ptr + row * stride_xm + widx * 8, kmask)
        acc += _dequantized_sum(qw_ptr, s_ptr, z_ptr, n, nmask, g, gmask, widx, kmask, KW, KG,
                                x0, x1, x2, x3, x4, x5, x6, x7, x_sum)
        if SILU:
            acc_up += _dequantized_sum(qw_ptr, s_ptr, z_ptr, n + D, nmask, g, gmask, widx, kmask, KW, KG,
                                       x0, x1, x2, x3, x4, x5, x6, x7, x_sum)
    dtype = x_ptr.dtype.element_ty
    y = tl.sum(acc, axis=1)
    if SILU:
        # Rounded where the unfused path rounds: each projection's output, SiLU's output, the product.
        gate = y.to(dtype).to(tl.float32)
        up = tl.sum(acc_up, axis=1).to(dtype).to(tl.float32)
        y = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up
    _write_out(y, y_ptr + row * D + n, nmask, row * D + n, ws_ptr, count_ptr, tl.num_programs(1), D, SPLIT_K,
               LAST_SUMS)


# ---- one row in packed half precision ("h2") ------------------------------------------------------------------
# The GEMV above spends about four float32 instructions on each code (mask, OR, subtract, FMA): at one row it is
# bound by instructions, not bytes. The h2 kernel de-quantizes and multiplies in packed float16 pairs. Per int32
# word (eight codes, code j at bits 4j), in PTX: one lop3 puts codes 0 and 4 into the mantissas of a pair of 1024.0
# (``0x6400``), another codes 1 and 5 times 16, and the word shifted right by 8 gives codes 2, 6 and 3, 7 the same
# way; one packed fma per pair (``* 1/32 - (32 + z/32)``, or ``* 1/512 - (2 + z/32)`` for the codes times 16)
# leaves ``(q - z) / 32`` exactly; packed multiplies and fmas take the products with the activations paired to
# match ((x0, x4), (x1, x5), (x2, x6), (x3, x7)). Two words (an int64) go through one PTX block, so each half lane
# sums eight products in float16 before the two lanes are widened and added in float32: about 15 instructions a
# word. Per group the float32 sum is multiplied by the group's scale, and the row's sum by 32 at the end. The
# activations are converted from bf16 to float16 once per thread and column: the tile is [int64 columns, rows],
# K across the threads and each thread's rows in its registers (a [rows, groups, words] tile made Triton move the
# converted pairs between threads through shared memory at every step). A lane of eight products (|q - z| / 32
# < 1/2) overflows only for |x| above about 17,000; such a row is recomputed in float32 by the GEMV's products
# (``_h2_f32_rows``). Rounding: each lane's float16 sum (11-bit significand), float32 across lanes, words and
# groups; the same kind of error as the FP8 h2 kernel's (triton_fp8_gemv), below the output's rounding to bf16.
# Float16 activations are paired by byte permutes (no conversion).
_H2_X_PTX: tl.constexpr = tl.constexpr("""{
    .reg .b32 p0, p1, q0, q1, e0, e1, e2, e3, e4, e5, e6, e7, a, b, c, d;
    mov.b64 {p0, p1}, $2;
    mov.b64 {q0, q1}, $3;
    shl.b32 e0, p0, 16;  and.b32 e1, p0, 0xFFFF0000;
    shl.b32 e2, p1, 16;  and.b32 e3, p1, 0xFFFF0000;
    shl.b32 e4, q0, 16;  and.b32 e5, q0, 0xFFFF0000;
    shl.b32 e6, q1, 16;  and.b32 e7, q1, 0xFFFF0000;
    cvt.rn.f16x2.f32 a, e4, e0;
    cvt.rn.f16x2.f32 b, e5, e1;
    cvt.rn.f16x2.f32 c, e6, e2;
    cvt.rn.f16x2.f32 d, e7, e3;
    mov.b64 $0, {a, b};
    mov.b64 $1, {c, d};
    }""")
# The same pairs from float16 activations: byte permutes only.
_H2_X_F16_PTX: tl.constexpr = tl.constexpr("""{
    .reg .b32 p0, p1, q0, q1, a, b, c, d;
    mov.b64 {p0, p1}, $2;
    mov.b64 {q0, q1}, $3;
    prmt.b32 a, p0, q0, 0x5410;
    prmt.b32 b, p0, q0, 0x7632;
    prmt.b32 c, p1, q1, 0x5410;
    prmt.b32 d, p1, q1, 0x7632;
    mov.b64 $0, {a, b};
    mov.b64 $1, {c, d};
    }""")
# Two words (an int64: sixteen codes of one row and group) times their activation pairs ($2, $3: the first
# word's four pairs, two to an int64; $4, $5: the second's); zl / zh ($6, $7): -(32 + z / 32) and -(2 + z / 32)
# in both halves, so that each code becomes (q - z) / 32 exactly; each half lane sums eight products in float16,
# then the lanes are widened and added. _H2_WORD is one word's part: W its register, X its pairs' prefix, and
# FIRST the first product (a multiply into s for the first word, an fma for the second).
_H2_WORD = """
    lop3.b32 a, W, 0x000F000F, 0x64006400, 0xEA;
    lop3.b32 b, W, 0x00F000F0, 0x64006400, 0xEA;
    shr.u32 t, W, 8;
    lop3.b32 c, t, 0x000F000F, 0x64006400, 0xEA;
    lop3.b32 d, t, 0x00F000F0, 0x64006400, 0xEA;
    fma.rn.f16x2 a, a, h, $6;
    fma.rn.f16x2 c, c, h, $6;
    fma.rn.f16x2 b, b, k, $7;
    fma.rn.f16x2 d, d, k, $7;
    FIRST
    fma.rn.f16x2 s, b, Xb, s;
    fma.rn.f16x2 s, c, Xc, s;
    fma.rn.f16x2 s, d, Xd, s;"""
_H2_WORDS_PTX: tl.constexpr = tl.constexpr("""{
    .reg .b32 w0, w1, t, a, b, c, d, s, h, k, xa, xb, xc, xd, ya, yb, yc, yd;
    .reg .b16 lo, hi;
    .reg .f32 f0, f1;
    mov.b64 {w0, w1}, $1;
    mov.b64 {xa, xb}, $2;
    mov.b64 {xc, xd}, $3;
    mov.b64 {ya, yb}, $4;
    mov.b64 {yc, yd}, $5;
    mov.b32 h, 0x28002800;
    mov.b32 k, 0x18001800;"""
    + _H2_WORD.replace("W", "w0").replace("X", "x").replace("FIRST", "mul.rn.f16x2 s, a, xa;")
    + _H2_WORD.replace("W", "w1").replace("X", "y").replace("FIRST", "fma.rn.f16x2 s, a, ya, s;")
    + """
    mov.b32 {lo, hi}, s;
    cvt.f32.f16 f0, lo;
    cvt.f32.f16 f1, hi;
    add.f32 $0, f0, f1;
    }""")
H2_UNSHIFT: tl.constexpr = tl.constexpr(32.0)  # the codes are de-quantized as (q - z) / 32


@triton.jit
def _f16_bits(v):
    # float32 values -> their float16 bits in the low half of an int32
    return v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _f16_half(pair, HIGH: tl.constexpr):
    # one half of a float16 pair (int32) as float32
    bits = (pair >> 16) & 0xFFFF if HIGH else pair & 0xFFFF
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _h2_x_interpreted(four, i: tl.constexpr, F16: tl.constexpr):
    # number i of an int64 of four bf16 (F16: float16) as float16 bits (the PTX's values, in plain Triton)
    bits = ((four >> (16 * i)) & 0xFFFF).to(tl.int32)
    if F16:
        return bits
    return _f16_bits((bits << 16).to(tl.float32, bitcast=True))


@triton.jit
def _h2_x_pairs(x8_ptr, widx, mask, EVEN: tl.constexpr, F16: tl.constexpr, PAIRED: tl.constexpr = False):
    """The activations of int32 weight words ``widx`` (eight columns each; bfloat16, or float16 with ``F16``) as
    four float16 pairs, (x0, x4), (x1, x5) in the low and high half of the first int64 and (x2, x6), (x3, x7) in
    the second's (the first of a pair in the low half of its 32 bits). ``PAIRED``: ``x8`` is a row's float16 copy
    already in that order (:func:`paired_half`), loaded as it is."""
    if EVEN:
        p = tl.load(x8_ptr + 2 * widx)
        q = tl.load(x8_ptr + 2 * widx + 1)
    else:
        p = tl.load(x8_ptr + 2 * widx, mask=mask, other=0)
        q = tl.load(x8_ptr + 2 * widx + 1, mask=mask, other=0)
    if PAIRED:
        ab = p
        cd = q
    elif _INTERPRETED:
        xa = _h2_x_interpreted(p, 0, F16) | (_h2_x_interpreted(q, 0, F16) << 16)
        xb = _h2_x_interpreted(p, 1, F16) | (_h2_x_interpreted(q, 1, F16) << 16)
        xc = _h2_x_interpreted(p, 2, F16) | (_h2_x_interpreted(q, 2, F16) << 16)
        xd = _h2_x_interpreted(p, 3, F16) | (_h2_x_interpreted(q, 3, F16) << 16)
        ab = (xa.to(tl.int64) & 0xFFFFFFFF) | (xb.to(tl.int64) << 32)
        cd = (xc.to(tl.int64) & 0xFFFFFFFF) | (xd.to(tl.int64) << 32)
    elif F16:
        ab, cd = tl.inline_asm_elementwise(_H2_X_F16_PTX, "=l,=l,l,l", [p, q], (tl.int64, tl.int64), True, 1)
    else:
        ab, cd = tl.inline_asm_elementwise(_H2_X_PTX, "=l,=l,l,l", [p, q], (tl.int64, tl.int64), True, 1)
    return ab, cd


@triton.jit
def _h2_lanes(word, xa, xb, xc, xd, zf):
    # the interpreter's form of one word's products: its two half lanes in float32, each infinite where float16
    # would have overflowed
    lo = tl.zeros(word.shape, tl.float32)
    hi = tl.zeros(word.shape, tl.float32)
    for j in tl.static_range(4):
        if j == 0:  # noqa: SIM108 - compile-time branches
            pair = xa
        elif j == 1:
            pair = xb
        elif j == 2:
            pair = xc
        else:
            pair = xd
        lo += ((((word >> (4 * j)) & 0xF).to(tl.float32) - zf) / 32.0) * _f16_half(pair, False)
        hi += ((((word >> (4 * j + 16)) & 0xF).to(tl.float32) - zf) / 32.0) * _f16_half(pair, True)
    return lo, hi


@triton.jit
def _h2_words_dot(words, ab0, cd0, ab1, cd1, zl, zh):
    """Per int64 of ``words`` (two int32 words, sixteen codes of one row and group): the sum of
    ``(q - z) / 32 * x`` over its codes in float32; ``ab0, cd0`` / ``ab1, cd1``: the four float16 pairs of each
    word (as from :func:`_h2_x_pairs`); ``zl`` / ``zh``: ``-(32 + z / 32)`` / ``-(2 + z / 32)`` as float16 pairs."""
    if _INTERPRETED:  # the same products in float32 (the interpreter runs no PTX): plumbing, not rounding
        zf = -(_f16_half(zl, False) + 32.0) * 32.0
        lo0, hi0 = _h2_lanes((words & 0xFFFFFFFF).to(tl.int32), _low32(ab0), _high32(ab0), _low32(cd0),
                             _high32(cd0), zf)
        lo1, hi1 = _h2_lanes((words >> 32).to(tl.int32), _low32(ab1), _high32(ab1), _low32(cd1), _high32(cd1), zf)
        lo = lo0 + lo1
        hi = hi0 + hi1
        acc = tl.where(tl.abs(lo) > 65504.0, float("inf"), lo) + tl.where(tl.abs(hi) > 65504.0, float("inf"), hi)
    else:
        acc = tl.inline_asm_elementwise(_H2_WORDS_PTX, "=f,l,l,l,l,l,r,r", [words, ab0, cd0, ab1, cd1, zl, zh],
                                        tl.float32, True, 1)
    return acc


@triton.jit
def _low32(v):
    return (v & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def _high32(v):
    return (v >> 32).to(tl.int32)


@triton.jit
def _h2_step(acc, qw8_ptr, s_ptr, z_ptr, x8_ptr, k2, rows, nmask, words, GW2: tl.constexpr, KW2: tl.constexpr,
             k_end, KG: tl.constexpr, EVEN: tl.constexpr, F16: tl.constexpr, PAIRED: tl.constexpr = False):
    """``acc`` [BK2, R] plus ``s * sum((q - z) / 32 * x)`` of the int64 weight columns ``k2`` (two words each,
    ``KW2`` a row; those from ``k_end`` on left out) of output rows ``rows``; ``words``: those columns' weights
    when already loaded (else None); ``PAIRED``: ``x8`` is a paired float16 copy (:func:`paired_half`)."""
    kmask = k2 < k_end
    mask = kmask[:, None] & nmask[None, :]
    if words is None:
        wptr = qw8_ptr + rows[None, :] * KW2 + k2[:, None]
        words = tl.load(wptr) if EVEN else tl.load(wptr, mask=mask, other=0)
    ab0, cd0 = _h2_x_pairs(x8_ptr, 2 * k2, kmask, EVEN, F16, PAIRED)
    ab1, cd1 = _h2_x_pairs(x8_ptr, 2 * k2 + 1, kmask, EVEN, F16, PAIRED)
    gptr = rows[None, :] * KG + (k2 // GW2)[:, None]
    if EVEN:
        sc = tl.load(s_ptr + gptr).to(tl.float32)
        z = tl.load(z_ptr + gptr).to(tl.int32)
    else:
        sc = tl.load(s_ptr + gptr, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + gptr, mask=mask, other=0).to(tl.int32)
    zl = 0xD000 + z  # float16 -(32 + z / 32)
    zh = 0xC000 + 16 * z  # float16 -(2 + z / 32)
    part = _h2_words_dot(words, _h2_across_rows(ab0, words), _h2_across_rows(cd0, words),
                         _h2_across_rows(ab1, words), _h2_across_rows(cd1, words), zl | (zl << 16), zh | (zh << 16))
    return acc + sc * part


@triton.jit
def _h2_across_rows(pairs, words):
    # [BK2] activation pairs -> the [BK2, R] shape of the words
    return tl.broadcast_to(pairs[:, None], words.shape)


@triton.jit
def _h2_f32_rows(x_ptr, qw_ptr, s_ptr, z_ptr, rows, nmask, g_start, g_end, KW, KG, GROUP: tl.constexpr,
                 GW_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    # The overflow fallback: the GEMV's float32 products over groups [g_start, g_end), one group a step
    acc = tl.zeros((BLOCK_N, 1), dtype=tl.float32)
    GW: tl.constexpr = GROUP // 8
    wl = tl.arange(0, GW_PAD)
    for g0 in range(g_start, g_end):
        g = g0 + tl.arange(0, 1)
        gmask = g < g_end
        widx = g[:, None] * GW + wl[None, :]
        kmask = gmask[:, None] & (wl < GW)[None, :]
        x0, x1, x2, x3, x4, x5, x6, x7, x_sum = _gemv_x_planes(x_ptr + widx * 8, kmask)
        acc += _dequantized_sum(qw_ptr, s_ptr, z_ptr, rows, nmask, g, gmask, widx, kmask, KW, KG,
                                x0, x1, x2, x3, x4, x5, x6, x7, x_sum)
    return tl.sum(acc, axis=1)


@triton.jit
def _h2_finish(acc, x_ptr, qw_ptr, s_ptr, z_ptr, rows, nmask, g_start, g_end, KW, KG, GROUP: tl.constexpr,
               BLOCK_N: tl.constexpr):
    y = tl.sum(acc, axis=0) * H2_UNSHIFT
    bad = (y != y) | (tl.abs(y) == float("inf"))
    if tl.max(bad.to(tl.int32), axis=0) > 0:  # a float16 lane overflowed (or x is not finite): again in float32
        y = tl.where(bad, _h2_f32_rows(x_ptr, qw_ptr, s_ptr, z_ptr, rows, nmask, g_start, g_end, KW, KG, GROUP,
                                       GROUP // 8, BLOCK_N), y)
    return y


@triton.jit
def _gemv_h2_kernel(x_ptr, x8_ptr, qw_ptr, qw8_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, count_ptr, D, G_SPLIT,
                    K: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K2: tl.constexpr,
                    SILU: tl.constexpr, SPLIT_K: tl.constexpr, LAST_SUMS: tl.constexpr, EVEN: tl.constexpr,
                    PDL: tl.constexpr, sq_ptr=None, num_sq=0, eps=0.0, res_ptr=None, nw_ptr=None, sq_out_ptr=None,
                    ROW_SCALE: tl.constexpr = False, SQ_BLOCK: tl.constexpr = 1, RES_NORM: tl.constexpr = False,
                    SILU_PAIRS: tl.constexpr = False, xh_ptr=None, yh_ptr=None, X_HALF: tl.constexpr = False,
                    Y_HALF: tl.constexpr = False):
    # One bf16/fp16 row: output rows n (SILU: gate rows n and up rows D + n), groups [G_SPLIT * program_id(2),
    # + G_SPLIT) (SPLIT_K > 1: see _write_out), BLOCK_K2 int64 weight columns (two words each) a step; x8: the
    # row as int64 (four values each), qw8: the weight as int64. The tile is [BLOCK_K2, BLOCK_N]: K along the
    # threads, each thread's rows in its registers, so that each thread converts its activations once for all its
    # rows. EVEN: no masks (whole tiles of rows, whole steps). The first step's words are read before the PDL wait.
    # The RMSNorm in the epilogues (one row; see w4a16_residual_norm): ROW_SCALE: x is the norm's input already
    # multiplied by the norm weight, and the outputs are multiplied by 1 / rms, from the num_sq (<= SQ_BLOCK)
    # partial sums of squares at sq (sum / K + eps); RES_NORM (SPLIT_K 1, not SILU): the output, rounded, is
    # added to the residual (in place: each program reads and writes only its rows), and y takes that sum times
    # the norm weight nw, rounded; the program's sum of the squared sums goes to sq_out[program_id(0)].
    # SILU_PAIRS (with SILU): the tile's rows alternate gate and up rows, so a program reads as the linear launch
    # of the same tile does and writes BLOCK_N / 2 outputs. The float16 copies (a bfloat16 row; see paired_half):
    # X_HALF: the products read the row's paired float16 copy (xh, as int64) as their pairs, in place of
    # converting x8's bfloat16 values (the same float16 values; x itself is still read by the float32 fallback);
    # Y_HALF (SPLIT_K 1): each output is also written to its place in the paired float16 copy yh.
    GW2: tl.constexpr = GROUP // 16
    KW: tl.constexpr = K // 8
    KW2: tl.constexpr = K // 16
    KG: tl.constexpr = K // GROUP
    if SILU_PAIRS:  # tile row 2i: gate row out + i, tile row 2i + 1: its up row D + out + i
        j = tl.arange(0, BLOCK_N)
        out = tl.program_id(0) * (BLOCK_N // 2) + j // 2
        n = out + (j % 2) * D
        nmask = out < D
    else:
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < D
    kl = tl.arange(0, BLOCK_K2)
    k_start = tl.program_id(2) * G_SPLIT * GW2
    k_end = tl.minimum(KW2, k_start + G_SPLIT * GW2)
    k2 = k_start + kl
    wmask = (k2 < k_end)[:, None] & nmask[None, :]
    wptr = qw8_ptr + n[None, :] * KW2 + k2[:, None]
    words = tl.load(wptr) if EVEN else tl.load(wptr, mask=wmask, other=0)  # weights only: before the wait
    words_up = words
    if SILU and not SILU_PAIRS:
        words_up = tl.load(wptr + D * KW2) if EVEN else tl.load(wptr + D * KW2, mask=wmask, other=0)
    wait_for_previous_kernel(PDL, EARLY=True)  # what follows reads only weights before its own wait
    if ROW_SCALE:  # read now, summed at the end
        sq_i = tl.arange(0, SQ_BLOCK)
        squares = tl.load(sq_ptr + sq_i, mask=sq_i < num_sq, other=0.0)
    acc = tl.zeros((BLOCK_K2, BLOCK_N), dtype=tl.float32)
    F16: tl.constexpr = x_ptr.dtype.element_ty == tl.float16
    pairs_ptr = xh_ptr if X_HALF else x8_ptr
    acc = _h2_step(acc, qw8_ptr, s_ptr, z_ptr, pairs_ptr, k2, n, nmask, words, GW2, KW2, k_end, KG, EVEN, F16,
                   X_HALF)
    acc_up = acc
    SEPARATE_UP: tl.constexpr = SILU and not SILU_PAIRS
    if SEPARATE_UP:
        acc_up = _h2_step(tl.zeros((BLOCK_K2, BLOCK_N), dtype=tl.float32), qw8_ptr, s_ptr, z_ptr, pairs_ptr, k2,
                          n + D, nmask, words_up, GW2, KW2, k_end, KG, EVEN, F16, X_HALF)
    for k0 in range(k_start + BLOCK_K2, k_end, BLOCK_K2):
        k2 = k0 + kl
        acc = _h2_step(acc, qw8_ptr, s_ptr, z_ptr, pairs_ptr, k2, n, nmask, None, GW2, KW2, k_end, KG, EVEN, F16,
                       X_HALF)
        if SEPARATE_UP:
            acc_up = _h2_step(acc_up, qw8_ptr, s_ptr, z_ptr, pairs_ptr, k2, n + D, nmask, None, GW2, KW2, k_end, KG,
                              EVEN, F16, X_HALF)
    g_start = tl.program_id(2) * G_SPLIT
    g_end = tl.minimum(KG, g_start + G_SPLIT)
    y = _h2_finish(acc, x_ptr, qw_ptr, s_ptr, z_ptr, n, nmask, g_start, g_end, KW, KG, GROUP, BLOCK_N)
    if ROW_SCALE:
        inv_rms = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)  # the norm's expression (weighted_rms_norm)
        y = y * inv_rms
    dtype = x_ptr.dtype.element_ty
    if SILU_PAIRS:  # the tile's sums as (gate, up) pairs, rounded as the projection rounds them
        gate, up = tl.split(tl.reshape(y.to(dtype).to(tl.float32), (BLOCK_N // 2, 2)))
        y = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up
        n = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        nmask = n < D
    elif SILU:
        gate = y.to(dtype).to(tl.float32)
        up = _h2_finish(acc_up, x_ptr, qw_ptr, s_ptr, z_ptr, n + D, nmask, g_start, g_end, KW, KG, GROUP, BLOCK_N)
        if ROW_SCALE:
            up = up * inv_rms
        up = up.to(dtype).to(tl.float32)
        y = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up
    if RES_NORM:  # rounded as the projection's output, then as the residual sum (add_rms_norm_row); the residual
        # and norm weight read here: read right after the wait and held over the K loop, they measured slower
        total = (y.to(dtype).to(tl.float32) + tl.load(res_ptr + n, mask=nmask, other=0.0).to(tl.float32)).to(dtype)
        tl.store(res_ptr + n, total, mask=nmask)
        t = total.to(tl.float32)
        tl.store(sq_out_ptr + tl.program_id(0), tl.sum(tl.where(nmask, t * t, 0.0), axis=0))
        y = t * tl.load(nw_ptr + n, mask=nmask, other=0.0).to(tl.float32)
    if Y_HALF:  # (SPLIT_K 1) the output's value in the dtype, as float16, at its place in pair order
        j = n % 8
        tl.store(yh_ptr + n - j + 2 * (j % 4) + j // 4, y.to(dtype).to(tl.float16), mask=nmask)
    _write_out(y, y_ptr + n, nmask, n, ws_ptr, count_ptr, 1, D, SPLIT_K, LAST_SUMS)


# ---- two rows or more -----------------------------------------------------------------------------------------


@triton.jit
def _dot_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                PRECISION: tl.constexpr):
    GW: tl.constexpr = GROUP // 8
    BLOCK_K: tl.constexpr = BLOCK_KW * 8
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = n < N
    KW = K // 8
    KG = K // GROUP
    wl = tl.arange(0, BLOCK_KW)
    kl = tl.arange(0, BLOCK_K)
    shifts = tl.arange(0, 8) * 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for w0 in range(0, KW, BLOCK_KW):
        widx = w0 + wl
        tmask = nmask[:, None] & (widx < KW)[None, :]
        words = tl.load(qw_ptr + n[:, None] * KW + widx[None, :], mask=tmask, other=0)
        gptr = n[:, None] * KG + (widx // GW)[None, :]
        s = tl.load(s_ptr + gptr, mask=tmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + gptr, mask=tmask, other=0).to(tl.int32)
        k = w0 * 8 + kl
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & (k < K)[None, :],
                    other=0.0)
        # [BLOCK_N, BLOCK_KW, 8] -> [BLOCK_N, BLOCK_K]: code j of word w is column 8w + j
        q = (words[:, :, None] >> shifts[None, None, :]) & 0xF
        w = ((q - z[:, :, None]).to(tl.float32) * s[:, :, None]).to(x.dtype)
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    tl.store(y_ptr + rm[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


# ---- half-precision tensor-core kernel -----------------------------------------------------------------------

# One word (8 codes, code j at bits 4j) -> the 8 values q_j - z in half precision, consecutive codes paired in
# one 32-bit register: prmt puts byte b of the word in the low half and byte b of the word shifted by 4 in the high
# half, so one lop3 ((t & 0x000F000F) | magic) leaves codes 2b and 2b + 1 in the mantissas of a packed "magic" pair,
# and one packed fma subtracts the magic plus z (exact: small integers). $8: the word; $9: -(magic + z) in both
# halves; $10 (scaled form): the scale in both halves, multiplied in with one more packed fma (one rounding).
# Outputs $0..$7: codes 0..7.
_DEQUANT_PTX = """
{
.reg .b32 a, b, c, d, t, one;
mov.b32 one, ONE;
shr.u32 t, $8, 4;
prmt.b32 a, $8, t, 0x0400;
prmt.b32 b, $8, t, 0x0501;
prmt.b32 c, $8, t, 0x0602;
prmt.b32 d, $8, t, 0x0703;
lop3.b32 a, a, 0x000F000F, MAGIC, 0xEA;
lop3.b32 b, b, 0x000F000F, MAGIC, 0xEA;
lop3.b32 c, c, 0x000F000F, MAGIC, 0xEA;
lop3.b32 d, d, 0x000F000F, MAGIC, 0xEA;
fma.rn.TY a, a, one, $9;
fma.rn.TY b, b, one, $9;
fma.rn.TY c, c, one, $9;
fma.rn.TY d, d, one, $9;
SCALE
mov.b32 {$0, $1}, a;
mov.b32 {$2, $3}, b;
mov.b32 {$4, $5}, c;
mov.b32 {$6, $7}, d;
}
"""
_SCALE_PTX = """mov.b32 t, 0x80008000;
fma.rn.TY a, a, $10, t;
fma.rn.TY b, b, $10, t;
fma.rn.TY c, c, $10, t;
fma.rn.TY d, d, $10, t;"""


def _dequant_asm(half: str, scaled: bool) -> str:
    magic, one, ty = ("0x43004300", "0x3F803F80", "bf16x2") if half == "bf16" else ("0x64006400", "0x3C003C00",
                                                                                    "f16x2")
    return (_DEQUANT_PTX.replace("SCALE", _SCALE_PTX if scaled else "").replace("MAGIC", magic)
            .replace("ONE", one).replace("TY", ty))


_ASM = {(half, scaled): _dequant_asm(half, scaled) for half in ("bf16", "f16") for scaled in (False, True)}
_ASM_BF16 = tl.constexpr(_ASM["bf16", False])
_ASM_BF16_SCALED = tl.constexpr(_ASM["bf16", True])
_ASM_F16 = tl.constexpr(_ASM["f16", False])
_ASM_F16_SCALED = tl.constexpr(_ASM["f16", True])


@triton.jit
def _value(words, j: tl.constexpr, zf, sf, SCALED: tl.constexpr, dtype: tl.constexpr):
    """Code ``j`` of each word as ``(q - z) [* s]`` rounded once to ``dtype`` (the interpreter's path: the same
    values as the PTX one, whose products of a 4-bit integer and a half-precision scale are exact in float32)."""
    v = ((words >> (4 * j)) & 0xF).to(tl.float32) - zf
    if SCALED:
        v = v * sf
    return v.to(dtype)


@triton.jit
def _dequant_tile(words, z, s, dtype: tl.constexpr, SCALED: tl.constexpr, ASM: tl.constexpr):
    """``words`` [R, G, W] int32, ``z`` / ``s`` [R, G] -> [R, G * W * 8] in ``dtype``: column ``8w + j`` (within
    each group's ``W`` words) holds ``q - z`` (times ``s`` rounded to ``dtype`` when ``SCALED``) of code ``j``."""
    if ASM:
        IS_BF16: tl.constexpr = dtype == tl.bfloat16
        zp = z.to(tl.int32) + (0x4300 if IS_BF16 else 0x6400)
        zneg = (zp | (zp << 16)) | -2147450880  # -(magic + z) in both halves (sign bits 0x80008000)
        zneg = tl.broadcast_to(zneg[:, :, None], words.shape)
        if SCALED:
            sb = s.to(dtype).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            s2 = tl.broadcast_to((sb | (sb << 16))[:, :, None], words.shape)
            if IS_BF16:
                v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                    _ASM_BF16_SCALED, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [words, zneg, s2], (tl.bfloat16,) * 8, True, 1)
            else:
                v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                    _ASM_F16_SCALED, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [words, zneg, s2], (tl.float16,) * 8, True, 1)
        else:
            if IS_BF16:
                v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                    _ASM_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [words, zneg], (tl.bfloat16,) * 8, True, 1)
            else:
                v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                    _ASM_F16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [words, zneg], (tl.float16,) * 8, True, 1)
    else:
        zf = z.to(tl.float32)[:, :, None]
        sf = s.to(dtype).to(tl.float32)[:, :, None]
        v0 = _value(words, 0, zf, sf, SCALED, dtype)
        v1 = _value(words, 1, zf, sf, SCALED, dtype)
        v2 = _value(words, 2, zf, sf, SCALED, dtype)
        v3 = _value(words, 3, zf, sf, SCALED, dtype)
        v4 = _value(words, 4, zf, sf, SCALED, dtype)
        v5 = _value(words, 5, zf, sf, SCALED, dtype)
        v6 = _value(words, 6, zf, sf, SCALED, dtype)
        v7 = _value(words, 7, zf, sf, SCALED, dtype)
    # [R, G, W, 2, 2, 2] with j = 4a + 2b + c (a innermost join): column 8w + j after the reshape
    w8 = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
    return tl.reshape(w8, (words.shape[0], words.shape[1] * words.shape[2] * 8))


@triton.jit
def _tc_part(x_ptr, qw_ptr, s_ptr, z_ptr, rows, rmask, rm, g0, stride_xm, KG, stride_q, stride_s,
             GROUP: tl.constexpr, GW_PAD: tl.constexpr, NG: tl.constexpr, SWAP: tl.constexpr,
             SCALED: tl.constexpr, ASM: tl.constexpr, EVEN: tl.constexpr, dtype: tl.constexpr):
    """The product of ``NG`` groups from group ``g0`` for weight rows ``rows``: [M, R] (``SWAP``: [R, M]), and the
    groups' scales [R, NG] (applied to the tile when ``SCALED``). ``rm``: input rows, already clamped to valid ones;
    ``EVEN``: every row of ``rows`` and every group of the step exists (no masks)."""
    GW: tl.constexpr = GROUP // 8
    g = g0 + tl.arange(0, NG)
    wl = tl.arange(0, GW_PAD)
    wptr = qw_ptr + rows[:, None, None] * stride_q + (g[:, None] * GW + wl[None, :])[None, :, :]
    gptr = rows[:, None] * stride_s + g[None, :]
    if EVEN:
        words = tl.load(wptr)
        s = tl.load(s_ptr + gptr).to(tl.float32)
        z = tl.load(z_ptr + gptr)
    else:
        gmask = g < KG
        kmask = gmask[:, None] & (wl < GW)[None, :]  # [NG, GW_PAD]
        words = tl.load(wptr, mask=rmask[:, None, None] & kmask[None, :, :], other=0)
        smask = rmask[:, None] & gmask[None, :]
        s = tl.load(s_ptr + gptr, mask=smask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + gptr, mask=smask, other=0)
    w = _dequant_tile(words, z, s, dtype, SCALED, ASM)  # [R, NG * GW_PAD * 8]
    if GW_PAD == GW:  # whole groups: the tile's columns are contiguous (vector loads of x)
        kk = g0 * GROUP + tl.arange(0, NG * GROUP)
        kv = kk < KG * GROUP
    else:
        kl = tl.arange(0, GW_PAD * 8)
        kk = tl.reshape(g[:, None] * GROUP + kl[None, :], (NG * GW_PAD * 8,))
        kv = tl.reshape((g < KG)[:, None] & (kl < GROUP)[None, :], (NG * GW_PAD * 8,))
    if SWAP:
        xptr = x_ptr + rm[None, :] * stride_xm + kk[:, None]
        xt = tl.load(xptr) if EVEN else tl.load(xptr, mask=kv[:, None], other=0.0)
        part = tl.dot(w, xt)
    else:
        xptr = x_ptr + rm[:, None] * stride_xm + kk[None, :]
        xt = tl.load(xptr) if EVEN else tl.load(xptr, mask=kv[None, :], other=0.0)
        part = tl.dot(xt, tl.trans(w))
    return part, s


@triton.jit
def _tc_acc(acc, x_ptr, qw_ptr, s_ptr, z_ptr, rows, rmask, rm, g0, stride_xm, KG, stride_q, stride_s,
            GROUP: tl.constexpr, GW_PAD: tl.constexpr, BLOCK_G: tl.constexpr, SWAP: tl.constexpr,
            SCALE_AFTER: tl.constexpr, ASM: tl.constexpr, EVEN: tl.constexpr, dtype: tl.constexpr):
    """``acc`` plus the product of ``BLOCK_G`` groups from ``g0``: one dot per group, each scaled in float32
    (``SCALE_AFTER``), or one dot over the scaled tile."""
    if SCALE_AFTER:
        for i in tl.static_range(BLOCK_G):
            part, s = _tc_part(x_ptr, qw_ptr, s_ptr, z_ptr, rows, rmask, rm, g0 + i, stride_xm, KG, stride_q,
                               stride_s, GROUP, GW_PAD, 1, SWAP, False, ASM, EVEN, dtype)
            if SWAP:
                acc += part * s  # s [R, 1]
            else:
                acc += part * tl.reshape(s, (1, s.shape[0]))
    else:
        part, s = _tc_part(x_ptr, qw_ptr, s_ptr, z_ptr, rows, rmask, rm, g0, stride_xm, KG, stride_q, stride_s,
                           GROUP, GW_PAD, BLOCK_G, SWAP, True, ASM, EVEN, dtype)
        acc += part
    return acc


@triton.jit
def _prefetch_l2(ptr, mask):
    """``prefetch.global.L2`` of the line holding each of ``ptr`` where ``mask`` (a hint: no value, no fault)."""
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                              "=r,l,r", [ptr, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_first_step(qw_ptr, s_ptr, z_ptr, rows, rmask, g0, stride_q, stride_s, GW: tl.constexpr,
                         BLOCK_G: tl.constexpr):
    """Ask L2 for the words, scales and zero points of the first step (``BLOCK_G`` groups from ``g0``) of weight
    rows ``rows``: one prefetch per 128-byte line of words and one per row of scales and of zero points. Issued
    before the PDL wait (weights only), so that the first loads after it hit L2."""
    LINES: tl.constexpr = max(1, BLOCK_G * GW * 4 // 128)
    line = tl.arange(0, LINES)
    _prefetch_l2(qw_ptr + rows[:, None] * stride_q + g0 * GW + line[None, :] * 32,
                 rmask[:, None] & (line[None, :] >= 0))
    _prefetch_l2(s_ptr + rows * stride_s + g0, rmask)
    _prefetch_l2(z_ptr + rows * stride_s + g0, rmask)


@triton.jit
def _tc_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, count_ptr, M, D, K, stride_xm, stride_ym, stride_q,
               stride_s, G_SPLIT,
               GROUP: tl.constexpr, GW_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_G: tl.constexpr, SWAP: tl.constexpr, SCALE_AFTER: tl.constexpr, SILU: tl.constexpr,
               ASM: tl.constexpr, EVEN: tl.constexpr, SPLIT_K: tl.constexpr, LAST_SUMS: tl.constexpr,
               PDL: tl.constexpr = False, TRIGGER: tl.constexpr = True):
    # Output rows n (SILU: gate rows n and up rows D + n) of input rows rm, groups [G_SPLIT * program_id(2),
    # + G_SPLIT). EVEN: D % BLOCK_N == 0 and whole steps of whole groups (GROUP a power of two), so that no load
    # needs a mask. SPLIT_K > 1: y is float32 (zeroed) and the programs add their sums into it, or (LAST_SUMS) y
    # is in the activation dtype, each program writes its sums to ws [SPLIT_K, M, D] and the last of a tile (count
    # [tiles], zero between launches) adds them up. PDL: the first step's weights are prefetched to L2, then the
    # program waits for the kernel before it (whose outputs are x); TRIGGER: first lets the next kernel launch
    # (else the next launches when this one ends, onto multiprocessors this kernel's programs have left).
    dtype = x_ptr.dtype.element_ty
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = n < D
    rm_in = tl.minimum(rm, M - 1)  # rows past M read the last row (their outputs are not stored): no mask
    KG = K // GROUP
    if PDL:
        GW: tl.constexpr = GROUP // 8
        _prefetch_first_step(qw_ptr, s_ptr, z_ptr, n, nmask, tl.program_id(2) * G_SPLIT, stride_q, stride_s, GW,
                             BLOCK_G)
        if SILU:
            _prefetch_first_step(qw_ptr, s_ptr, z_ptr, n + D, nmask, tl.program_id(2) * G_SPLIT, stride_q, stride_s,
                                 GW, BLOCK_G)
        if TRIGGER:
            wait_for_previous_kernel(PDL, EARLY=True)  # what follows reads only weights before its own wait
        else:
            wait_without_trigger(PDL)
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = acc
    g_start = tl.program_id(2) * G_SPLIT
    g_end = tl.minimum(KG, g_start + G_SPLIT)
    for g0 in range(g_start, g_end, BLOCK_G):
        acc = _tc_acc(acc, x_ptr, qw_ptr, s_ptr, z_ptr, n, nmask, rm_in, g0, stride_xm, g_end, stride_q, stride_s,
                      GROUP, GW_PAD, BLOCK_G, SWAP, SCALE_AFTER, ASM, EVEN, dtype)
        if SILU:
            acc_up = _tc_acc(acc_up, x_ptr, qw_ptr, s_ptr, z_ptr, n + D, nmask, rm_in, g0, stride_xm, g_end, stride_q,
                             stride_s, GROUP, GW_PAD, BLOCK_G, SWAP, SCALE_AFTER, ASM, EVEN, dtype)
    y = acc
    if SILU:
        # Rounded where the unfused path rounds: each projection's output, SiLU's output, the product.
        gate = acc.to(dtype).to(tl.float32)
        up = acc_up.to(dtype).to(tl.float32)
        y = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up
    if SWAP:
        yptr = y_ptr + rm[None, :] * stride_ym + n[:, None]
        ymask = mmask[None, :] & nmask[:, None]
    else:
        yptr = y_ptr + rm[:, None] * stride_ym + n[None, :]
        ymask = mmask[:, None] & nmask[None, :]
    woff = rm[None, :] * D + n[:, None] if SWAP else rm[:, None] * D + n[None, :]
    _write_out(y, yptr, ymask, woff, ws_ptr, count_ptr, M, D, SPLIT_K, LAST_SUMS)


def _use_asm(x: torch.Tensor) -> bool:
    """The PTX de-quantization on CUDA; the plain-Triton one under the interpreter (no inline assembly there)."""
    return x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def _even(d: int, k: int, group_size: int, config: W4A16Config) -> bool:
    """Whether a launch needs no masks on its loads: whole tiles of output rows, whole steps of groups, and a
    group of a power-of-two number of words."""
    groups = k // group_size
    words = group_size // 8
    step = max(1, config.block_g) * max(1, config.split_k)
    return d % config.block_n == 0 and groups % step == 0 and words & (words - 1) == 0


_COUNTS: dict[torch.device, torch.Tensor] = {}
_COUNT_SLOTS = 1 << 16


def _tile_counts(device: torch.device, tiles: int) -> torch.Tensor | None:
    """The zeroed per-tile counts of the ``last_sums`` launches on ``device`` (kept zero by the kernel), or None
    where there are too many tiles or they would first be made inside a CUDA-graph capture."""
    counts = _COUNTS.get(device)
    if counts is None:
        if tiles > _COUNT_SLOTS or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return None
        counts = _COUNTS[device] = torch.zeros(_COUNT_SLOTS, dtype=torch.int32, device=device)
    return counts if tiles <= counts.numel() else None


def _split_outputs(x: torch.Tensor, m: int, d: int, split: int, tiles: int, last: bool):
    """(y, ws, counts, last_sums) for a launch of ``split`` programs along K over ``tiles`` output tiles."""
    counts = _tile_counts(x.device, tiles) if split > 1 and last else None
    if split > 1 and counts is None:
        y = torch.zeros((m, d), dtype=torch.float32, device=x.device)
    else:
        y = torch.empty((m, d), dtype=x.dtype, device=x.device)
    ws = torch.empty((split, m, d), dtype=torch.float32, device=x.device) if counts is not None else y
    return y, ws, (y if counts is None else counts), counts is not None


def _split_groups(groups: int, block_g: int, split_k: int) -> tuple[int, int]:
    """(programs along K, groups per program: whole steps of ``block_g``), no program without groups."""
    split = max(1, min(split_k, triton.cdiv(groups, block_g)))
    per_split = triton.cdiv(triton.cdiv(groups, split), block_g) * block_g
    return triton.cdiv(groups, per_split), per_split


def _tc(x: torch.Tensor, weights: Int4RowWeights, d: int, silu: bool, config: W4A16Config) -> torch.Tensor:
    m, k = x.shape
    block_g = max(1, config.block_g)
    groups = k // weights.group_size
    split, per_split = _split_groups(groups, block_g, 1 if silu else config.split_k)
    grid = (triton.cdiv(d, config.block_n), triton.cdiv(m, config.block_m), split)
    y, ws, counts, last_sums = _split_outputs(x, m, d, split, grid[0] * grid[1], config.last_sums)
    even = _even(d, k, weights.group_size, replace(config, split_k=split)) and per_split * split == groups
    mode = envs.w4a16_tc_pdl()
    pdl = pdl_for(x) and mode != "off" and m > TC_PDL_MIN_ROWS
    _tc_kernel[grid](x, weights.packed, weights.scales, weights.zeros, y, ws, counts,
                     m, d, k, x.stride(0), y.stride(0), weights.packed.stride(0), weights.scales.stride(0), per_split,
                     GROUP=weights.group_size, GW_PAD=triton.next_power_of_2(weights.group_size // 8),
                     BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_G=block_g,
                     SWAP=config.swap, SCALE_AFTER=config.scale_after, SILU=silu, ASM=_use_asm(x), EVEN=even,
                     SPLIT_K=split, LAST_SUMS=last_sums, PDL=pdl, TRIGGER=mode == "early",
                     num_warps=config.num_warps, num_stages=config.num_stages, **launch_options(pdl))
    return y.to(x.dtype) if split > 1 and not last_sums else y


# ---- entry points ---------------------------------------------------------------------------------------------


def _check(x: torch.Tensor, weights: Int4RowWeights, what: str) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != weights.in_features:
        raise ValueError(f"{what}: x has shape {tuple(x.shape)}, the weight {weights.in_features} input features")
    if not triton_int4_available(weights.group_size):
        raise ValueError(f"{what}: group size {weights.group_size} is not a multiple of 8")
    return x if x.stride(-1) == 1 else x.contiguous()


def _gemv(x: torch.Tensor, weights: Int4RowWeights, d: int, silu: bool, config: W4A16Config) -> torch.Tensor:
    m, k = x.shape
    split, per_split = _split_groups(k // weights.group_size, config.block_g, 1 if silu else config.split_k)
    grid = (triton.cdiv(d, config.block_n), m, split)
    y, ws, counts, last_sums = _split_outputs(x, m, d, split, grid[0] * grid[1], config.last_sums)
    _gemv_kernel[grid](x, weights.packed, weights.scales, weights.zeros, y, ws, counts, d, k, x.stride(0),
                       per_split, GROUP=weights.group_size, GW_PAD=triton.next_power_of_2(weights.group_size // 8),
                       BLOCK_N=config.block_n, BLOCK_G=config.block_g, SILU=silu, SPLIT_K=split,
                       LAST_SUMS=last_sums, num_warps=config.num_warps, num_stages=config.num_stages)
    return y.to(x.dtype) if split > 1 and not last_sums else y


def _h2_takes(x: torch.Tensor, weights: Int4RowWeights) -> bool:
    """Whether this call can run the h2 kernel: one contiguous, 16-byte aligned bf16/fp16 row (bf16 on compute
    capability 8.0 or more, where PTX converts float32 pairs to float16 in one instruction)."""
    return (x.shape[0] == 1 and x.is_contiguous() and x.data_ptr() % 16 == 0
            and h2_available(weights.group_size, x.dtype) and weights.packed.is_contiguous()
            and (x.dtype != torch.bfloat16 or _capability(x.device) >= (8, 0)))


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of a CUDA device; (9, 0) elsewhere (the interpreter runs no PTX)."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (9, 0)


def _gemv_h2(x: torch.Tensor, weights: Int4RowWeights, d: int, silu: bool, config: W4A16Config,
             row_scale: RowScale | None = None, residual_norm: ResidualNorm | None = None,
             x_half: torch.Tensor | None = None, half_out: torch.Tensor | None = None) -> torch.Tensor:
    k = x.shape[1]
    groups = k // weights.group_size
    split, per_split = _split_groups(groups, 1, 1 if silu or residual_norm is not None else config.split_k)
    block_k2 = min(config.block_kw // 2, triton.next_power_of_2(per_split * weights.group_size // 16))
    pairs = silu and config.silu_pairs
    outputs_per_program = config.block_n // 2 if pairs else config.block_n
    grid = (triton.cdiv(d, outputs_per_program), 1, split)
    y, ws, counts, last_sums = _split_outputs(x, 1, d, split, grid[0], config.last_sums)
    even = (d % outputs_per_program == 0 and per_split * (weights.group_size // 16) % block_k2 == 0
            and per_split * split == groups)
    pdl = pdl_for(x)
    epilogue = epilogue_arguments(row_scale, residual_norm)
    if x_half is not None:
        epilogue.update(xh_ptr=_half_copy_of(x, x_half, "x_half").view(torch.int64), X_HALF=True)
    if half_out is not None:
        if split > 1:
            raise ValueError("half_out: a launch split along K writes no float16 copy")
        epilogue.update(yh_ptr=_half_copy_of(y, half_out, "half_out"), Y_HALF=True)
    _gemv_h2_kernel[grid](x, x.view(torch.int64), weights.packed, weights.packed.view(torch.int64), weights.scales,
                          weights.zeros, y, ws, counts, d, per_split, K=k, GROUP=weights.group_size,
                          BLOCK_N=config.block_n, BLOCK_K2=block_k2, SILU=silu, SPLIT_K=split, LAST_SUMS=last_sums,
                          EVEN=even, PDL=pdl, SILU_PAIRS=pairs, num_warps=config.num_warps,
                          num_stages=config.num_stages, **epilogue, **launch_options(pdl))
    return y.to(x.dtype) if split > 1 and not last_sums else y


def paired_half(row: torch.Tensor) -> torch.Tensor:
    """The paired float16 copy of bfloat16 rows ``row`` ``[M, K]`` (``K`` a multiple of 8) that the h2 kernel reads
    with ``x_half`` and writes with ``half_out``: the values as float16, each run of eight in the order 0, 4, 1, 5,
    2, 6, 3, 7, so that two int64 loads are the kernel's four activation pairs as they are. (The kernels write it
    themselves; this is its definition, for tests and for a row no kernel wrote.)"""
    if row.dim() != 2 or row.shape[1] % 8:
        raise ValueError(f"paired_half: want rows [M, K] with K a multiple of 8, got shape {tuple(row.shape)}")
    m, k = row.shape
    return row.to(torch.float16).view(m, k // 8, 2, 4).transpose(2, 3).reshape(m, k)


def _half_copy_of(row: torch.Tensor, half: torch.Tensor, what: str) -> torch.Tensor:
    """``half``, checked as a place for the paired float16 copy of the bfloat16 row ``row`` (same shape,
    contiguous, 16-byte aligned; see :func:`paired_half`)."""
    if (row.dtype != torch.bfloat16 or half.dtype != torch.float16 or half.shape != row.shape
            or not half.is_contiguous() or half.data_ptr() % 16 or row.shape[-1] % 8):
        raise ValueError(f"{what}: want a contiguous, 16-byte aligned float16 tensor of shape {tuple(row.shape)} "
                         f"beside a bfloat16 row, got {half.dtype} {tuple(half.shape)} beside {row.dtype}")
    return half


def h2_epilogue_config(x: torch.Tensor, weights: Int4RowWeights, producer: bool) -> W4A16Config | None:
    """The h2 launch that takes the RMSNorm in its epilogue for ``x`` (see :func:`w4a16_residual_norm`), or None:
    one contiguous half-precision row that the h2 kernel takes, under the tuned or default one-row launch for the
    shape, which must be an h2 launch. The ``producer`` (adding to the residual) runs it unsplit (its epilogue
    needs whole sums; Llama-2-7B's tuned output and down projections are unsplit anyway)."""
    if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] != weights.in_features or weights.perm is not None:
        return None
    config = choose_config("linear", 1, weights.out_features, weights.in_features, weights.group_size, x.dtype,
                           device_sm_count(x.device))
    if config is None or config.kind != "h2" or not _h2_takes(x, weights):
        return None
    return replace(config, split_k=1, last_sums=False) if producer else config


def w4a16_residual_norm(x: torch.Tensor, weights: Int4RowWeights, residual: torch.Tensor, norm_weight: torch.Tensor,
                        config: W4A16Config | None = None, *, x_half: torch.Tensor | None = None,
                        half_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``x @ W.T`` of one row added to ``residual`` in place (both rounded as the fused add + RMSNorm rounds:
    the product to ``x``'s dtype, then the sum), in one h2 launch whose epilogue also returns what the next layer's
    GEMV needs to apply the RMSNorm of that sum itself (:func:`w4a16_linear` with ``row_scale``): ``(scaled,
    square_sums)``, the sum times ``norm_weight`` rounded to ``x``'s dtype ``[1, N]``, and float32 sums of the
    squared sum, one per output tile. None where :func:`h2_epilogue_config` has no launch (the caller projects,
    then normalizes). ``config`` (an h2 launch, run unsplit) overrides the choice.

    Float16 copies, for a bfloat16 row (``kernels/scaled_row.py``, :func:`paired_half`): ``x_half``, ``x``'s paired
    copy (from an earlier launch's ``half_out``), which the products read in place of converting ``x`` (the same
    values: the h2 kernel multiplies float16 pairs); ``half_out`` ``[1, N]`` float16, written (when the launch
    runs) with the returned scaled row's paired copy. The results are the same bits with or without them."""
    x = _check(x, weights, "w4a16_residual_norm")
    if config is None:
        config = h2_epilogue_config(x, weights, producer=True)
    elif config.kind != "h2" or x.shape[0] != 1 or not _h2_takes(x, weights):
        config = None
    if config is None or residual.shape != (1, weights.out_features) or not residual.is_contiguous() \
            or residual.dtype != x.dtype:
        return None
    square_sums = torch.empty(triton.cdiv(weights.out_features, config.block_n), dtype=torch.float32,
                              device=x.device)
    scaled = _gemv_h2(x, weights, weights.out_features, False, config,
                      residual_norm=ResidualNorm(residual, norm_weight, square_sums), x_half=x_half,
                      half_out=half_out)
    return scaled, square_sums


def _one_row(x: torch.Tensor, weights: Int4RowWeights, d: int, silu: bool, config: W4A16Config) -> torch.Tensor:
    """A one-row launch: the h2 kernel where this call can take it, else the GEMV (its default launch in place of
    an h2 one)."""
    if config.kind == "h2":
        if _h2_takes(x, weights):
            return _gemv_h2(x, weights, d, silu, config)
        config = _gemv_config("silu" if silu else "linear", x.shape[1], weights.group_size)
    return _gemv(x, weights, d, silu, config)


def w4a16_linear(x: torch.Tensor, weights: Int4RowWeights, config: W4A16Config | None = None, *,
                 row_scale: RowScale | None = None, x_half: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W.T`` (``x`` float16, bfloat16 or float32, columns already in ``weights``'s sorted order), in
    ``x``'s dtype, through the kernel :func:`choose_config` picks for the shape and row count (``config``
    overrides). ``row_scale`` (one row through an h2 launch only, see :func:`h2_epilogue_config`): ``x`` is
    an RMSNorm's input times its weight, and the products are multiplied by ``1 / rms`` in the epilogue;
    ``x_half`` (with ``row_scale``) as in :func:`w4a16_residual_norm`."""
    x = _check(x, weights, "w4a16_linear")
    m, k = x.shape
    n = weights.out_features
    if m == 0:
        return x.new_empty((0, n))
    if row_scale is not None:
        config = config or h2_epilogue_config(x, weights, producer=False)
        if config is None or config.kind != "h2" or not _h2_takes(x, weights):
            raise ValueError("w4a16_linear: row_scale needs one row through an h2 launch")
        return _gemv_h2(x, weights, n, False, config, row_scale=row_scale, x_half=x_half)
    if x_half is not None:
        raise ValueError("w4a16_linear: x_half goes with row_scale")
    config = config or choose_config("linear", m, n, k, weights.group_size, x.dtype, device_sm_count(x.device))
    if config.kind in ("gemv", "silu", "h2"):
        return _one_row(x, weights, n, False, config)
    if config.kind == "tc":
        return _tc(x, weights, n, False, config)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m))
    _dot_kernel[grid](x, weights.packed, weights.scales, weights.zeros, y, m, n, k, x.stride(0), y.stride(0),
                      GROUP=weights.group_size, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                      BLOCK_KW=config.block_kw, PRECISION="ieee" if x.dtype == torch.float32 else None,
                      num_warps=config.num_warps, num_stages=config.num_stages)
    return y


w4a16_linear.reads_row_layout = True  # the layer repacks its weights into Int4RowWeights for it


def silu_fused_config(x: torch.Tensor, gate_up: Int4RowWeights) -> W4A16Config | None:
    """The fused gate/up + SiLU launch for ``x``'s rows, or None where there is none (the caller projects, then
    activates)."""
    if x.dim() != 2 or gate_up.out_features % 2 or x.shape[1] != gate_up.in_features:
        return None
    m, k = x.shape
    sms = device_sm_count(x.device)
    if m == 1 and envs.w4a16_silu_pairs():  # the gate/up projection's own one-row launch, its rows in pairs
        linear = choose_config("linear", 1, gate_up.out_features, k, gate_up.group_size, x.dtype, sms)
        if linear is not None and linear.kind == "h2" and linear.block_n >= 2 and linear.block_n % 2 == 0:
            return replace(linear, split_k=1, last_sums=False, silu_pairs=True)
    return choose_config("silu", m, gate_up.out_features // 2, k, gate_up.group_size, x.dtype, sms)


def w4a16_silu_mul(x: torch.Tensor, gate_up: Int4RowWeights, config: W4A16Config | None = None, *,
                   row_scale: RowScale | None = None, x_half: torch.Tensor | None = None,
                   half_out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(g) * u`` where ``[g, u] = x @ W.T`` for a fused gate/up weight (gate rows first), one launch per
    call (the one-row GEMV or the tensor-core kernel); rounded as the two separate steps round (each projection's
    output, SiLU's, the product). ``row_scale`` as in :func:`w4a16_linear` (one row through an h2 launch: both
    projections' sums multiplied by ``1 / rms`` before they are rounded); ``x_half`` and ``half_out`` (with
    ``row_scale``) as in :func:`w4a16_residual_norm`."""
    x = _check(x, gate_up, "w4a16_silu_mul")
    m, k = x.shape
    if gate_up.out_features % 2:
        raise ValueError("w4a16_silu_mul: the fused gate/up weight has an odd number of rows")
    d = gate_up.out_features // 2
    config = config or silu_fused_config(x, gate_up)
    if config is None:
        raise ValueError(f"w4a16_silu_mul: no fused kernel for {m} rows of {x.dtype}")
    if row_scale is not None:
        if config.kind != "h2" or not _h2_takes(x, gate_up):
            raise ValueError("w4a16_silu_mul: row_scale needs one row through an h2 launch")
        return _gemv_h2(x, gate_up, d, True, config, row_scale=row_scale, x_half=x_half, half_out=half_out)
    if x_half is not None or half_out is not None:
        raise ValueError("w4a16_silu_mul: x_half and half_out go with row_scale")
    if config.kind == "tc":
        return _tc(x, gate_up, d, True, config)
    return _one_row(x, gate_up, d, True, config)
