"""W4A16 products in Triton: ``y = x @ W.T`` with ``W`` in the row layout (:class:`Int4RowWeights`: each output
row's 4-bit codes contiguous along K, eight to an int32 word; per-row scales and zero points per group), de-quantized
in registers, float32 sums.

Two kernels, chosen by the number of rows (:func:`w4a16_linear`):

- one row (a batch-1 decode step): :func:`_gemv_kernel`. A program owns ``BLOCK_N`` output rows and walks K
  ``BLOCK_G`` groups at a time, as a ``[BLOCK_N, BLOCK_G, group/8]`` tile of words. Codes are turned into floats
  without a conversion instruction: masked in place and OR-ed into the mantissa of ``2^23`` (``0x4B000000``), the
  float ``2^23 + q * 16^p`` less ``2^23`` is ``q * 16^p`` exactly, and ``x`` is pre-scaled by ``16^-p`` (codes 5..7
  come from the word shifted by 12 bits so that every code sits below bit 20). Per group the kernel sums
  ``q * x`` and adds ``s * (sum(q * x) - z * sum(x))``. The gated MLP variant (``SILU``) reads the gate and up rows
  of a fused gate/up weight and writes ``silu(gate) * up``.
- two rows or more: :func:`_dot_kernel`, tensor cores: a ``[BLOCK_N, BLOCK_KW]`` tile of words is de-quantized
  (``(q - z) * s`` in float32, rounded to the activation dtype), unpacked to ``[BLOCK_N, 8 * BLOCK_KW]`` (code ``j``
  of word ``w`` is column ``8w + j``) and multiplied with a contiguous tile of ``x`` through one ``tl.dot``
  (float32 activations: IEEE float32 products).

Launch tiles come from ``int4_configs.json`` beside this file, per layer shape (written by
``benchmarks/gpu/int4_check.py --write-configs`` on the GPU it measures), else from :func:`default_config`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from inferneo.quantization.int4_layouts import Int4RowWeights

TUNED_CONFIG_FILE = Path(__file__).with_name("int4_configs.json")
#: Rows at which the tensor-core kernel takes over from the GEMV.
DOT_MIN_ROWS = 2


def triton_int4_available(group_size: int) -> bool:
    """Whether the kernels run layers of this group size (whole int32 words per group)."""
    return group_size > 0 and group_size % 8 == 0


@dataclass(frozen=True, slots=True)
class W4A16Config:
    """One launch. ``kind`` ``"gemv"`` (one row): ``block_n`` output rows x ``block_g`` groups per step;
    ``"dot"``: ``block_m`` x ``block_n`` output tiles, ``block_kw`` words (8 columns each) per step."""

    kind: str
    block_n: int
    block_g: int = 0
    block_m: int = 0
    block_kw: int = 0
    num_warps: int = 4
    num_stages: int = 2

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


def _rows_bucket(m: int) -> int:
    """Row counts sharing one tuned dot config: 2..16 -> 16, 17..32 -> 32, 33..64 -> 64, more -> 128."""
    for bucket in (16, 32, 64):
        if m <= bucket:
            return bucket
    return 128


def config_key(kind: str, m: int, n: int, k: int, group_size: int) -> str:
    """The key of a launch in ``int4_configs.json``: ``"gemv,N,K,G"``, ``"silu,D,K,G"``, ``"dot,BUCKET,N,K,G"``."""
    if kind == "dot":
        return f"dot,{_rows_bucket(m)},{n},{k},{group_size}"
    return f"{kind},{n},{k},{group_size}"


@functools.cache
def _tuned_configs() -> dict[str, W4A16Config]:
    if not TUNED_CONFIG_FILE.is_file():
        return {}
    table = json.loads(TUNED_CONFIG_FILE.read_text())
    return {key: W4A16Config(**entry) for key, entry in table.items()}


def default_config(kind: str, m: int, n: int, k: int, group_size: int) -> W4A16Config:
    """The launch for a shape without a tuned entry. GEMV: 16 rows per program (the loads of ``x`` and its
    scaling serve every row of the program: more rows, fewer of them per code) and about 128 words of K per
    step; dot: a row tile that covers ``m`` (16..64), 64 output rows, 16 words (128 columns) per step."""
    if kind in ("gemv", "silu"):
        words_per_group = group_size // 8
        groups = k // group_size
        block_g = min(triton.next_power_of_2(groups), max(1, 128 // triton.next_power_of_2(words_per_group)))
        return W4A16Config(kind, block_n=16, block_g=block_g, num_warps=4)
    block_m = min(_rows_bucket(m), 64)
    return W4A16Config("dot", block_n=64, block_m=block_m, block_kw=16, num_warps=4)


def choose_config(kind: str, m: int, n: int, k: int, group_size: int) -> W4A16Config:
    """The tuned launch for this shape (``int4_configs.json``), else :func:`default_config`."""
    return _tuned_configs().get(config_key(kind, m, n, k, group_size)) or default_config(kind, m, n, k, group_size)


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
def _dequantized_sum(qw_ptr, s_ptr, z_ptr, rows, rmask, g, gmask, widx, kmask, KW, KG,
                     x0, x1, x2, x3, x4, x5, x6, x7, x_sum):
    """``sum over the tile's groups of s * (sum(q * x) - z * sum(x))`` for output rows ``rows``: [R, G]."""
    words = tl.load(qw_ptr + rows[:, None, None] * KW + widx[None, :, :],
                    mask=rmask[:, None, None] & kmask[None, :, :], other=0)
    part = _group_sums(words, x0, x1, x2, x3, x4, x5, x6, x7)
    gptr = rows[:, None] * KG + g[None, :]
    smask = rmask[:, None] & gmask[None, :]
    s = tl.load(s_ptr + gptr, mask=smask, other=0.0)
    z = tl.load(z_ptr + gptr, mask=smask, other=0).to(tl.float32)
    return s * (part - z * x_sum[None, :])


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, D, K, stride_xm,
                 GROUP: tl.constexpr, GW_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                 SILU: tl.constexpr):
    # Output rows n (SILU: gate rows n and up rows D + n) of input row ``program_id(1)``.
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
    for g0 in range(0, KG, BLOCK_G):
        g = g0 + gl
        gmask = g < KG
        widx = g[:, None] * GW + wl[None, :]  # [BLOCK_G, GW_PAD] word index along K
        kmask = gmask[:, None] & (wl < GW)[None, :]
        xb = x_ptr + row * stride_xm + widx * 8
        x0 = tl.load(xb, mask=kmask, other=0.0).to(tl.float32)
        x1 = tl.load(xb + 1, mask=kmask, other=0.0).to(tl.float32)
        x2 = tl.load(xb + 2, mask=kmask, other=0.0).to(tl.float32)
        x3 = tl.load(xb + 3, mask=kmask, other=0.0).to(tl.float32)
        x4 = tl.load(xb + 4, mask=kmask, other=0.0).to(tl.float32)
        x5 = tl.load(xb + 5, mask=kmask, other=0.0).to(tl.float32)
        x6 = tl.load(xb + 6, mask=kmask, other=0.0).to(tl.float32)
        x7 = tl.load(xb + 7, mask=kmask, other=0.0).to(tl.float32)
        x_sum = tl.sum(x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7, axis=1)
        # pre-scale by 16^-p, p the position each code is read at (see _group_sums): exact powers of two
        x1 = x1 * 0.0625
        x2 = x2 * 0.00390625
        x3 = x3 * 0.000244140625
        x4 = x4 * 0.0000152587890625
        x5 = x5 * 0.00390625
        x6 = x6 * 0.000244140625
        x7 = x7 * 0.0000152587890625
        acc += _dequantized_sum(qw_ptr, s_ptr, z_ptr, n, nmask, g, gmask, widx, kmask, KW, KG,
                                x0, x1, x2, x3, x4, x5, x6, x7, x_sum)
        if SILU:
            acc_up += _dequantized_sum(qw_ptr, s_ptr, z_ptr, n + D, nmask, g, gmask, widx, kmask, KW, KG,
                                       x0, x1, x2, x3, x4, x5, x6, x7, x_sum)
    dtype = y_ptr.dtype.element_ty
    y = tl.sum(acc, axis=1)
    if SILU:
        # Rounded where the unfused path rounds: each projection's output, SiLU's output, the product.
        gate = y.to(dtype).to(tl.float32)
        up = tl.sum(acc_up, axis=1).to(dtype).to(tl.float32)
        y = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up
    tl.store(y_ptr + row * D + n, y.to(dtype), mask=nmask)


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
        s = tl.load(s_ptr + gptr, mask=tmask, other=0.0)
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


# ---- entry points ---------------------------------------------------------------------------------------------


def _check(x: torch.Tensor, weights: Int4RowWeights, what: str) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != weights.in_features:
        raise ValueError(f"{what}: x has shape {tuple(x.shape)}, the weight {weights.in_features} input features")
    if not triton_int4_available(weights.group_size):
        raise ValueError(f"{what}: group size {weights.group_size} is not a multiple of 8")
    return x if x.stride(-1) == 1 else x.contiguous()


def _gemv(x: torch.Tensor, weights: Int4RowWeights, d: int, silu: bool, config: W4A16Config) -> torch.Tensor:
    m, k = x.shape
    y = torch.empty((m, d), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(d, config.block_n), m)
    _gemv_kernel[grid](x, weights.packed, weights.scales, weights.zeros, y, d, k, x.stride(0),
                       GROUP=weights.group_size, GW_PAD=triton.next_power_of_2(weights.group_size // 8),
                       BLOCK_N=config.block_n, BLOCK_G=config.block_g, SILU=silu, num_warps=config.num_warps,
                       num_stages=config.num_stages)
    return y


def w4a16_linear(x: torch.Tensor, weights: Int4RowWeights, config: W4A16Config | None = None) -> torch.Tensor:
    """``x [M, K] @ W.T`` (``x`` float16, bfloat16 or float32, columns already in ``weights``'s sorted order), in
    ``x``'s dtype: the GEMV for one row, the tensor-core kernel for more (``config.kind`` overrides)."""
    x = _check(x, weights, "w4a16_linear")
    m, k = x.shape
    n = weights.out_features
    if m == 0:
        return x.new_empty((0, n))
    kind = "gemv" if m < DOT_MIN_ROWS else "dot"
    config = config or choose_config(kind, m, n, k, weights.group_size)
    if config.kind == "gemv":
        return _gemv(x, weights, n, False, config)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m))
    _dot_kernel[grid](x, weights.packed, weights.scales, weights.zeros, y, m, n, k, x.stride(0), y.stride(0),
                      GROUP=weights.group_size, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                      BLOCK_KW=config.block_kw, PRECISION="ieee" if x.dtype == torch.float32 else None, num_warps=config.num_warps,
                      num_stages=config.num_stages)
    return y


w4a16_linear.reads_row_layout = True  # the layer repacks its weights into Int4RowWeights for it


def w4a16_silu_mul(x: torch.Tensor, gate_up: Int4RowWeights, config: W4A16Config | None = None) -> torch.Tensor:
    """``silu(g) * u`` where ``[g, u] = x @ W.T`` for a fused gate/up weight (gate rows first), one GEMV launch
    per call; rounded as the two separate steps round (each projection's output, SiLU's, the product)."""
    x = _check(x, gate_up, "w4a16_silu_mul")
    m, k = x.shape
    if gate_up.out_features % 2:
        raise ValueError("w4a16_silu_mul: the fused gate/up weight has an odd number of rows")
    d = gate_up.out_features // 2
    config = config or choose_config("silu", m, d, k, gate_up.group_size)
    return _gemv(x, gate_up, d, True, config)
