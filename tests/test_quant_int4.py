"""4-bit weight-only checkpoints (AWQ, GPTQ, compressed-tensors pack-quantized): the layouts' de-quantization
against independent readings of them, the kernels against ``F.linear`` on the de-quantized weights, and greedy
tokens of tiny models against the engine on the de-quantized float32 checkpoint.

Activations are not quantized, so a 4-bit model computes the same products as the float32 model on its
de-quantized weights: the CPU kernel de-quantizes exactly ((q - z) * s in float32, one rounding) and differs only
in summation order, so greedy tokens are expected to be equal.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from inferneo import LLM, SamplingParams
from inferneo.kernel_config import KernelConfig
from inferneo.quantization import quantized_linears
from inferneo.quantization.int4 import (
    AwqConfig,
    GptqConfig,
    Int4LinearMethod,
    Int4Scheme,
    reference_int4_linear,
    select_int4_kernel,
)
from inferneo.quantization.int4_layouts import (
    Int4Codes,
    compact_scales,
    dequantize,
    dequantize_rows,
    pack_canonical,
    pack_rows,
    unpack_awq,
    unpack_compressed,
    unpack_gptq,
)
from inferneo.quantization.registry import resolve_quant_config
from inferneo.testing.int4_checkpoints import (
    awq_tensors,
    compressed_tensors,
    gptq_tensors,
    quantize_weight,
    write_int4_checkpoint,
)

# ---- plain-numpy readings of the documented layouts (written from the formats' descriptions) ------------------


def _nibble(word: int, i: int) -> int:
    return (int(np.uint32(np.int32(word))) >> (4 * i)) & 0xF


def numpy_awq(qweight, qzeros, scales, group):
    """AWQ GEMM: qweight[k, j] packs output columns 8j + (0, 2, 4, 6, 1, 3, 5, 7)[i] in nibble i."""
    order = (0, 2, 4, 6, 1, 3, 5, 7)
    qw, qz, sc = qweight.numpy(), qzeros.numpy(), scales.float().numpy()
    k_in, words = qw.shape
    w = np.zeros((words * 8, k_in), dtype=np.float32)
    for k in range(k_in):
        for j in range(words):
            for i in range(8):
                n = 8 * j + order[i]
                z = _nibble(qz[k // group, j], i)
                w[n, k] = np.float32(_nibble(qw[k, j], i) - z) * sc[k // group, n]
    return w


def numpy_gptq(qweight, qzeros, scales, g_idx):
    """GPTQ v1: qweight[r, n] packs input rows 8r + i in nibble i; qzeros[g, j] packs columns 8j + i, storing z - 1."""
    qw, qz, sc, gi = qweight.numpy(), qzeros.numpy(), scales.float().numpy(), g_idx.numpy()
    rows, n_out = qw.shape
    w = np.zeros((n_out, rows * 8), dtype=np.float32)
    for r in range(rows):
        for n in range(n_out):
            for i in range(8):
                k = 8 * r + i
                z = _nibble(qz[gi[k], n // 8], n % 8) + 1
                w[n, k] = np.float32(_nibble(qw[r, n], i) - z) * sc[gi[k], n]
    return w


def _random_quantized(out_features=24, in_features=64, group=16, symmetric=False, scale_dtype=torch.float16,
                      act_order=False, min_zero=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen)
    g_idx = torch.arange(in_features) // group
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=gen)]
    return quantize_weight(w, group, symmetric, scale_dtype, g_idx, min_zero=min_zero)


@pytest.mark.parametrize("zero_point", [True, False])
def test_awq_dequantization_matches_a_plain_reading_of_the_layout(zero_point):
    q = _random_quantized(symmetric=not zero_point)
    t = awq_tensors(q, zero_point=zero_point)
    qzeros = t.get("qzeros", awq_tensors(q, zero_point=True)["qzeros"])  # symmetric: every zero point is 8
    expected = numpy_awq(t["qweight"], qzeros, t["scales"], 16)
    unpacked = unpack_awq(t["qweight"], t.get("qzeros"), t["scales"], 16)
    assert np.array_equal(pack_and_dequantize(unpacked).numpy(), expected)
    assert torch.equal(pack_and_dequantize(unpacked), q.dequantized())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_dequantization_matches_a_plain_reading_of_the_layout(act_order, symmetric):
    q = _random_quantized(symmetric=symmetric, act_order=act_order, min_zero=1)
    t = gptq_tensors(q)
    expected = numpy_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
    unpacked = unpack_gptq(t["qweight"], t["qzeros"], t["scales"], 16, t["g_idx"])
    packed = pack_canonical(unpacked)
    assert (packed.perm is not None) == act_order
    assert np.array_equal(dequantize(packed).numpy(), expected)


def pack_and_dequantize(codes: Int4Codes) -> torch.Tensor:
    return dequantize(pack_canonical(codes))


@pytest.mark.parametrize("symmetric", [False, True])
def test_compressed_tensors_dequantization_is_the_librarys_bit_for_bit(symmetric):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    q = _random_quantized(symmetric=symmetric, scale_dtype=torch.bfloat16)
    t = compressed_tensors(q, zero_point=not symmetric)
    ours = pack_and_dequantize(unpack_compressed(t["weight_packed"], t["weight_scale"], t.get("weight_zero_point"), 16))
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=16)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    # In float32 (scales widened exactly): the same products, bit for bit.
    state = dict(t, weight_scale=t["weight_scale"].float())
    if not symmetric:
        state["weight_zero_point"] = t["weight_zero_point"]
    theirs = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
    assert theirs.dtype == torch.float32 and torch.equal(ours, theirs)
    # In the checkpoint's bfloat16: the library rounds each product once; so does ours rounded to bfloat16.
    theirs_bf16 = PackedQuantizationCompressor.decompress(dict(t), scheme)["weight"]
    assert torch.equal(ours.to(torch.bfloat16), theirs_bf16)


def test_row_layout_holds_float16_scales_only_where_they_are_exact():
    """The row layout keeps scales in float16 when every one is a float16 value (checkpoints' float16 scales
    widened to float32 on unpacking), with the same numbers; a scale outside float16 (too fine, too large, more
    mantissa) keeps the whole tensor float32."""
    halves = torch.rand(4, 8).half().float()
    assert compact_scales(halves).dtype == torch.float16 and torch.equal(compact_scales(halves).float(), halves)
    for odd in (1e-8, 7e4, 0.1):  # float16 subnormal range, past its largest value, 0.1 not a float16
        scales = halves.clone()
        scales[2, 3] = odd
        assert compact_scales(scales) is scales
    q = quantize_weight(torch.randn(16, 64), 32, False, torch.float16, torch.arange(64) // 32)
    weights = pack_rows(pack_canonical(layout_codes(q, "awq", 32)))
    assert weights.scales.dtype == torch.float16
    assert torch.equal(dequantize_rows(weights), q.dequantized())
    kept = pack_rows(pack_canonical(layout_codes(q, "awq", 32)), compact=False)  # INFERNEO_INT4_FLOAT32_SCALES
    assert kept.scales.dtype == torch.float32 and torch.equal(kept.scales, weights.scales.float())


def test_act_order_with_uneven_groups_is_refused():
    codes = Int4Codes(torch.zeros(8, 32, dtype=torch.uint8), torch.zeros(2, 8, dtype=torch.uint8),
                      torch.ones(2, 8), 16, g_idx=torch.tensor([0] * 20 + [1] * 12))
    with pytest.raises(ValueError, match="g_idx does not give every group 16 columns"):
        pack_canonical(codes)


# ---- kernels --------------------------------------------------------------------------------------------------


def _canonical(out_features, in_features, group, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = Int4Codes(torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, generator=gen),
                      torch.randint(0, 17, (in_features // group, out_features), dtype=torch.uint8, generator=gen),
                      torch.rand(in_features // group, out_features, generator=gen) * 0.05, group)
    return pack_canonical(codes)


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_cpu_kernel_matches_linear_on_dequantized_weights(isa):
    from inferneo.kernels.cpu_int4 import cpu_int4_linear, load_int4_cpu_kernels

    module = load_int4_cpu_kernels()
    if module is None:
        pytest.skip("the native int4 kernel does not build here")
    if isa == "avx2" and module.best_isa() != "avx2":
        pytest.skip("this CPU lacks AVX2 + FMA")
    torch.manual_seed(0)
    for n, k, group in ((24, 64, 32), (48, 256, 128), (40, 96, 96)):
        weights = _canonical(n, k, group)
        w = dequantize(weights)
        # 1..3 rows: register tiles with remainders; 17, 23: the buffered path (>= 16 rows) with remainders
        for m in (1, 3, 4, 17, 23):
            x = torch.randn(m, k)
            ref = F.linear(x, w)
            got = cpu_int4_linear(x, weights, isa)
            # exact de-quantization, float32 sums in another order: relative 1e-5
            assert got.dtype == torch.float32 and torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max())
            got_bf16 = cpu_int4_linear(x.bfloat16(), weights, isa)
            ref_bf16 = F.linear(x.bfloat16().float(), w)
            # bfloat16 in, float32 sums, one rounding to bfloat16 (8 bits): within 2^-8 of each value
            assert got_bf16.dtype == torch.bfloat16
            assert torch.allclose(got_bf16.float(), ref_bf16, rtol=2**-8, atol=1e-3 * ref_bf16.abs().max())


_TRITON_SCRIPT = textwrap.dedent("""
    import torch, torch.nn.functional as F
    import triton  # noqa: F401 (the interpreter is on before the shims patch it)
    from tests.triton_interpreter_shims import patch_interpreter
    patch_interpreter()
    from inferneo.kernel_config import KernelConfig
    from inferneo.kernels.triton_int4 import W4A16Config, w4a16_linear, w4a16_silu_mul
    from inferneo.quantization import int4
    from inferneo.quantization.base import LinearShape, QuantizedLinear
    from inferneo.quantization.int4_layouts import Int4RowWeights, dequantize_rows, pack_canonical, pack_rows
    from inferneo.testing.int4_checkpoints import quantize_weight
    from tests.test_quant_int4 import _canonical, layout_codes

    torch.manual_seed(0)
    # float32: exact de-quantization, float32 sums in another order (GEMV: sum(q*x) - z*sum(x) per group);
    # bfloat16: float32 sums and one rounding of the output (2^-9), plus the weights rounded to bfloat16 for tl.dot.
    # float16 (the tensor-core kernel): weights q - z exact, scales after the dot in float32 or on the tile (one
    # rounding of each weight to float16), float32 sums, one rounding of the output (2^-11)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}
    gemv = W4A16Config("gemv", block_n=64, block_g=4, num_warps=1)
    gemv_split = W4A16Config("gemv", block_n=32, block_g=1, num_warps=1, split_k=2, last_sums=True)
    # the packed-half kernel (one bf16/fp16 row; float32 and more rows fall back to the GEMV):
    # whole and masked steps and row tiles, K split both ways
    h2s = (W4A16Config("h2", 8, block_kw=16, num_warps=1), W4A16Config("h2", 32, block_kw=64, num_warps=1),
           W4A16Config("h2", 16, block_kw=8, num_warps=1, split_k=2, last_sums=True),
           W4A16Config("h2", 8, block_kw=16, num_warps=1, split_k=3))
    dot = W4A16Config("dot", block_n=64, block_m=32, block_kw=16)
    tcs = (W4A16Config("tc", 16, block_g=2, block_m=16),
           W4A16Config("tc", 16, block_g=1, block_m=32, swap=True, scale_after=False, split_k=2),
           W4A16Config("tc", 32, block_g=2, block_m=16, split_k=3, last_sums=True))
    for layout, group, act_order in (("awq", 32, False), ("gptq", 32, True), ("compressed-tensors", 16, False),
                                     ("compressed-tensors", 24, True)):
        n, k = 48, 96
        g_idx = torch.arange(k) // group
        if act_order:
            g_idx = g_idx[torch.randperm(k)]
        q = quantize_weight(torch.randn(n, k), group, False, torch.float16, g_idx, min_zero=1)
        weights = pack_rows(pack_canonical(layout_codes(q, layout, group)))
        assert isinstance(weights, Int4RowWeights) and (weights.perm is not None) == act_order
        assert weights.scales.dtype == torch.float16  # float16 scales, held as such: the kernels read 2 bytes
        w = q.dequantized()  # the checkpoint's column order
        for m in (1, 20):
            for dtype in tolerance:
                x = torch.randn(m, k).to(dtype)
                ref = F.linear(x.float(), w)
                xs = x if weights.perm is None else x.index_select(1, weights.perm)
                configs = (gemv, gemv_split, dot, *h2s) if m == 1 else (dot,)
                if dtype != torch.float32 and group % 16 == 0:
                    configs += tcs
                for config in configs:
                    y = w4a16_linear(xs, weights, config)
                    assert y.shape == (m, n) and y.dtype == dtype
                    err = ((y.float() - ref).norm() / ref.norm()).item()
                    assert err < tolerance[dtype], (layout, group, m, dtype, config, err)
    # scales that are not float16 values stay float32, through every kernel
    weights = pack_rows(_canonical(64, 256, 32))
    assert weights.scales.dtype == torch.float32
    w = dequantize_rows(weights)
    for m, configs in ((1, (gemv, dot, *h2s, *tcs)), (20, (dot, *tcs))):
        x = torch.randn(m, 256).bfloat16()
        ref = F.linear(x.float(), w)
        for config in configs:
            y = w4a16_linear(x, weights, config)
            assert ((y.float() - ref).norm() / ref.norm()).item() < tolerance[torch.bfloat16], (m, config)
    # the fused gate/up + SiLU GEMV against the two steps, each rounded to bfloat16
    q = quantize_weight(torch.randn(64, 128), 32, False, torch.float16, torch.arange(128) // 32)
    weights = pack_rows(pack_canonical(layout_codes(q, "awq", 32)))
    x = torch.randn(1, 128).bfloat16()
    gate, up = F.linear(x.float(), q.dequantized()).bfloat16().float().chunk(2, dim=1)
    ref = F.silu(gate).bfloat16().float() * up
    for config in (W4A16Config("silu", block_n=32, block_g=4, num_warps=1),
                   W4A16Config("h2", 8, block_kw=16, num_warps=1)):
        y = w4a16_silu_mul(x, weights, config)
        assert y.shape == (1, 32) and ((y.float() - ref).norm() / ref.norm()).item() < 1.5e-2, config
    # the fused SiLU with gate/up row pairs in each program (silu_pairs): the projection's own tile, so the same
    # sums and roundings as that projection followed by the SiLU-and-mul kernel, bit for bit; whole and masked
    # tiles, 1 to 4 outputs a program
    from inferneo.kernels._triton_elementwise import silu_and_mul
    for rows in (2, 8):
        for d in (32, 28):
            codes = quantize_weight(torch.randn(2 * d, 128), 32, False, torch.float16, torch.arange(128) // 32)
            pair_weights = pack_rows(pack_canonical(layout_codes(codes, "awq", 32)))
            xp = torch.randn(1, 128).bfloat16()
            linear = W4A16Config("h2", rows, block_kw=16, num_warps=1)
            want = silu_and_mul(w4a16_linear(xp, pair_weights, linear))
            got = w4a16_silu_mul(xp, pair_weights, W4A16Config("h2", rows, block_kw=16, num_warps=1, silu_pairs=True))
            assert got.shape == (1, d) and torch.equal(got, want), (rows, d)
    # the packed-half kernel: a column past float16's range is recomputed in float32 (the interpreter's float32
    # lanes count as infinite past 65504, as float16's would be); a non-finite input stays non-finite
    xb = torch.randn(1, 128).bfloat16()
    xb[0, 5] = 3e5
    ref = F.linear(xb.float(), q.dequantized())
    y = w4a16_linear(xb, weights, W4A16Config("h2", 8, block_kw=16, num_warps=1))
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1.5e-2
    xb[0, 7] = float("nan")
    assert torch.isnan(w4a16_linear(xb, weights, W4A16Config("h2", 8, block_kw=16, num_warps=1))).all()
    # the tensor-core kernel's fused gate/up + SiLU at a few rows (float16: no interpreter rounding shortcut)
    x = torch.randn(5, 128).half()
    gate, up = F.linear(x.float(), q.dequantized()).half().float().chunk(2, dim=1)
    ref = F.silu(gate).half().float() * up
    for config in (W4A16Config("tc", 16, block_g=2, block_m=16), W4A16Config("tc", 16, block_g=4, block_m=16,
                                                                               swap=True, scale_after=False)):
        y = w4a16_silu_mul(x, weights, config)
        assert y.shape == (5, 32) and ((y.float() - ref).norm() / ref.norm()).item() < 2e-3, config
    # a layer finalized for the Triton kernels holds the row layout, once, and runs through them
    int4.select_int4_kernel = lambda *args: w4a16_linear
    layer = QuantizedLinear(int4.Int4LinearMethod(int4.Int4Scheme("awq", 32, True)),
                            LinearShape("layers.0.mlp.gate_up_proj", 64, (32, 32)), False, torch.float32,
                            torch.device("cpu"))
    layer.method.init_dummy(layer, torch.Generator().manual_seed(0))
    before = layer.method.dequantized_weight(layer)
    layer.method.finalize(layer, KernelConfig())
    assert [type(b) for b in layer.int4_blocks] == [Int4RowWeights] and not hasattr(layer, "qweight")
    assert torch.equal(layer.method.dequantized_weight(layer), before)
    assert layer.method.silu_mul_applies(layer, torch.randn(1, 64).bfloat16())
    # a few rows in half precision: the tensor-core kernel's fused launch (by default); float32: none
    assert layer.method.silu_mul_applies(layer, torch.randn(2, 64).bfloat16())
    assert not layer.method.silu_mul_applies(layer, torch.randn(2, 64))
    x = torch.randn(1, 64)
    ref = F.linear(x, before)
    assert ((layer(x) - ref).norm() / ref.norm()).item() < 1e-5
    print("ok")
""")


def layout_codes(q, layout: str, group: int) -> Int4Codes:
    """``q`` written in ``layout``'s checkpoint tensors, read back as codes."""
    if layout == "awq":
        t = awq_tensors(q, zero_point=True)
        return unpack_awq(t["qweight"], t["qzeros"], t["scales"], group)
    if layout == "gptq":
        t = gptq_tensors(q)
        return unpack_gptq(t["qweight"], t["qzeros"], t["scales"], group, t["g_idx"])
    t = compressed_tensors(q, zero_point=True)
    return unpack_compressed(t["weight_packed"], t["weight_scale"], t["weight_zero_point"], group, q.g_idx)


_EPILOGUE_SCRIPT = textwrap.dedent("""
    import torch, torch.nn.functional as F
    import triton  # noqa: F401 (the interpreter is on before the shims patch it)
    from tests.triton_interpreter_shims import patch_interpreter
    patch_interpreter()
    from inferneo.kernels._triton_elementwise import silu_and_mul
    from inferneo.kernels.triton_int4 import (RowScale, W4A16Config, paired_half, w4a16_linear, w4a16_residual_norm,
                                              w4a16_silu_mul)
    from inferneo.quantization.int4_layouts import dequantize_rows, pack_canonical, pack_rows
    from inferneo.testing.int4_checkpoints import quantize_weight
    from tests.test_quant_int4 import layout_codes

    torch.manual_seed(0)
    eps = 1e-5

    def weights(n, k):
        q = quantize_weight(torch.randn(n, k), 32, False, torch.float16, torch.arange(k) // 32, min_zero=1)
        w = pack_rows(pack_canonical(layout_codes(q, "awq", 32)))
        return w, dequantize_rows(w)

    for dtype in (torch.bfloat16, torch.float16):
        for hidden, block_n in ((64, 8), (96, 64)):  # whole and masked output tiles of the producer
            producer, _ = weights(hidden, 128)
            consumer, wc = weights(48, hidden)
            config = W4A16Config("h2", block_n, block_kw=16, num_warps=1)
            x = torch.randn(1, 128).to(dtype)
            residual = (4 * torch.randn(1, hidden)).to(dtype)
            norm_weight = (1 + 0.3 * torch.randn(hidden)).to(dtype)
            # the producer: the plain launch's output, added to the residual as the fused add + norm rounds it
            total = (w4a16_linear(x, producer, config).float() + residual.float()).to(dtype)
            held = residual.clone()
            scaled, sums = w4a16_residual_norm(x, producer, held, norm_weight, config)
            # float16: bit for bit; bfloat16 within one unit in the last place (the interpreter truncates float32
            # to bfloat16 where the GPU rounds to nearest: the same conversion as the plain kernel's output)
            ulp = 0.0 if dtype == torch.float16 else 2.0 ** -7
            close = lambda a, b: torch.allclose(a.float(), b.float(), rtol=ulp, atol=0.0)  # noqa: E731
            assert close(held, total), "the residual sum, in place"
            assert close(scaled, (held.float() * norm_weight.float()).to(dtype))
            assert sums.shape == (-(-hidden // block_n),) and sums.dtype == torch.float32
            per_tile = F.pad(held.float()[0] ** 2, (0, sums.numel() * block_n - hidden)).view(-1, block_n).sum(1)
            assert torch.allclose(sums, per_tile, rtol=1e-6), (sums, per_tile)
            half = None
            if dtype == torch.bfloat16:  # paired float16 copies of the rows (x read from one, the output's written):
                # the same bits, and the copy written is the output's
                again, half = residual.clone(), torch.full((1, hidden), float("nan"), dtype=torch.float16)
                scaled2, sums2 = w4a16_residual_norm(x, producer, again, norm_weight, config,
                                                     x_half=paired_half(x), half_out=half)
                assert torch.equal(scaled2, scaled) and torch.equal(sums2, sums) and torch.equal(again, held)
                assert torch.equal(half, paired_half(scaled))
                order = paired_half(torch.arange(16.0).bfloat16().view(1, 16))[0].tolist()
                assert order == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15], order
                try:
                    paired_half(torch.zeros(1, 12).bfloat16())
                except ValueError as exc:
                    assert "multiple of 8" in str(exc)
                else:
                    raise AssertionError("paired_half took a width that is not a multiple of 8")
            # the consumer: 1 / rms applied to the products, against the norm then F.linear (and the plain kernel
            # on the normalized row), whole, split with the last program's sums, split with atomic sums
            t = held.float()
            normed = ((t * torch.rsqrt((t * t).mean(-1, keepdim=True) + eps)).to(dtype).float()
                      * norm_weight.float()).to(dtype)
            ref = F.linear(normed.float(), wc)
            for cfg in (W4A16Config("h2", 8, block_kw=16, num_warps=1),
                        W4A16Config("h2", 16, block_kw=8, num_warps=1, split_k=2, last_sums=True),
                        W4A16Config("h2", 8, block_kw=8, num_warps=1, split_k=3)):
                y = w4a16_linear(scaled, consumer, cfg, row_scale=RowScale(sums, eps))
                assert y.shape == (1, 48) and y.dtype == dtype
                if half is not None:
                    assert torch.equal(w4a16_linear(scaled, consumer, cfg, row_scale=RowScale(sums, eps),
                                                    x_half=half), y), cfg
                err = ((y.float() - ref).norm() / ref.norm()).item()
                plain = w4a16_linear(normed, consumer, cfg).float()
                assert err < 1.5e-2 and ((y.float() - plain).norm() / plain.norm()).item() < 1e-2, (dtype, cfg, err)
            # the fused gate/up + SiLU launch with 1 / rms on both projections' sums: three roundings to the
            # activation dtype after the sums (both projections, SiLU; the interpreter truncates to bfloat16)
            gate, up = F.linear(normed.float(), wc).to(dtype).float().chunk(2, dim=1)
            ref = F.silu(gate).to(dtype).float() * up
            act = w4a16_silu_mul(scaled, consumer, W4A16Config("h2", 8, block_kw=16, num_warps=1),
                                 row_scale=RowScale(sums, eps))
            err = ((act.float() - ref).norm() / ref.norm()).item()
            assert act.shape == (1, 24) and err < (3e-2 if dtype == torch.bfloat16 else 3e-3), (dtype, err)
            # with gate/up row pairs: the row-scaled projection, then the SiLU-and-mul kernel, bit for bit
            pairs = W4A16Config("h2", 4, block_kw=16, num_warps=1, silu_pairs=True)
            two_steps = silu_and_mul(w4a16_linear(scaled, consumer, W4A16Config("h2", 4, block_kw=16, num_warps=1),
                                                  row_scale=RowScale(sums, eps)))
            assert torch.equal(w4a16_silu_mul(scaled, consumer, pairs, row_scale=RowScale(sums, eps)), two_steps)
            if half is not None:  # both fused forms from the row's float16 copy, writing the activation's
                for cfg, want in ((pairs, two_steps), (W4A16Config("h2", 8, block_kw=16, num_warps=1), act)):
                    act_half = torch.full((1, 24), float("nan"), dtype=torch.float16)
                    got = w4a16_silu_mul(scaled, consumer, cfg, row_scale=RowScale(sums, eps), x_half=half,
                                         half_out=act_half)
                    assert torch.equal(got, want) and torch.equal(act_half, paired_half(want)), cfg
                bad = (lambda: w4a16_linear(scaled, consumer, x_half=half),  # noqa: E731 (no row scale)
                       lambda: w4a16_silu_mul(scaled, consumer, pairs, row_scale=RowScale(sums, eps),
                                              half_out=torch.empty(1, 24, dtype=torch.bfloat16)),
                       lambda: w4a16_residual_norm(x, producer, residual.clone(), norm_weight, config,
                                                   half_out=torch.empty(1, hidden + 1, dtype=torch.float16)),
                       lambda: w4a16_linear(scaled, consumer, W4A16Config("h2", 8, block_kw=8, num_warps=1, split_k=3),
                                            row_scale=RowScale(sums, eps), x_half=half[:, 1:]))
                for call in bad:
                    try:
                        call()
                    except ValueError:
                        continue
                    raise AssertionError("a malformed float16 copy was taken")
    # where the h2 kernel does not run: no launch, nothing written
    producer, _ = weights(64, 128)
    residual = torch.randn(2, 64).bfloat16()
    before = residual.clone()
    assert w4a16_residual_norm(torch.randn(2, 128).bfloat16(), producer, residual, torch.ones(64).bfloat16()) is None
    assert w4a16_residual_norm(torch.randn(1, 128), producer, before[:1].float(), torch.ones(64)) is None
    assert torch.equal(residual, before)
    print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_w4a16_norm_epilogues_under_the_interpreter():
    """The RMSNorm in the h2 GEMVs' epilogues (``kernels/scaled_row.py``): the producer's residual sum and scaled
    row bit-equal to the plain launch followed by the fused add + norm's rounding, its per-tile sums of squares;
    the consumer's ``1 / rms`` against the norm then ``F.linear`` (bf16/fp16 tolerance, as the h2 kernel alone)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _EPILOGUE_SCRIPT], capture_output=True, text=True, timeout=900,
                          env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# Decode steps of a tiny AWQ Llama (3 layers, bfloat16) through the CUDA transform under the interpreter, with the
# RMSNorms in the W4A16 GEMVs' epilogues (EpilogueNormLayer) and without: one row takes the epilogues (no norm
# launch but the first layer's input norm and the final norm) and stays as close to the float32 model on the
# de-quantized weights as the plain bfloat16 path; two rows take the plain path, bit for bit.
_EPILOGUE_LAYER_SCRIPT = textwrap.dedent("""
    import copy, os, sys
    from pathlib import Path
    import torch
    from inferneo.attention import TorchReferenceBackend
    from inferneo.attention.triton_backend import TritonBackend
    from inferneo.kernel_config import KernelConfig
    from inferneo.kernels import triton_int4
    from inferneo.model_executor.device_kernels import use_device_kernels
    from inferneo.model_executor.models.registry import get_model_class
    from inferneo.model_loader.loader import iter_weights, load_hf_config
    from inferneo.model_loader.source import resolve_model
    from inferneo.quantization import int4
    from inferneo.quantization.base import finalize_quantized_linears, quantize_linears
    from inferneo.quantization.registry import resolve_quant_config
    from inferneo.testing.int4_checkpoints import write_int4_checkpoint
    from inferneo.testing.tiny_models import make_tiny_checkpoint
    sys.path.insert(0, sys.argv[2])  # the tests folder
    from paged_decode_steps import generate
    from triton_interpreter_shims import patch_interpreter
    patch_interpreter()

    tmp = Path(sys.argv[1])
    source = make_tiny_checkpoint(tmp / "llama", "llama", num_heads=4, num_kv_heads=2, num_layers=3)
    quantized, dequantized = write_int4_checkpoint(source, tmp / "awq", tmp / "deq", "awq", group_size=32)
    int4.select_int4_kernel = lambda *args: triton_int4.w4a16_linear  # the CUDA kernels, under the interpreter

    def model_of(path, backend):
        src = resolve_model(str(path))
        hf_config = load_hf_config(src)
        cls = get_model_class(hf_config)
        return cls(cls.config_from_hf(hf_config), backend, max_position=256), hf_config, src

    def build():
        model, hf_config, src = model_of(quantized, TritonBackend(prefill_block_m=16))
        model.cast(torch.bfloat16)
        quant = resolve_quant_config(hf_config, None)
        quantize_linears(model, quant, torch.bfloat16, torch.device("cpu"))
        model.load_weights(quant.prepare_weights(iter_weights(src)))
        finalize_quantized_linears(model, KernelConfig())
        return model.eval()

    reference, _, src = model_of(dequantized, TorchReferenceBackend())
    reference.load_weights(iter_weights(src))
    reference.eval()
    plain = build()
    fused = copy.deepcopy(plain)
    layers = len(plain.layers)
    os.environ["INFERNEO_W4A16_NORM_EPILOGUE"] = "0"
    assert use_device_kernels(plain, torch.device("cuda"), KernelConfig(cuda_pdl=False))["EpilogueNormLayer"] == 0
    os.environ["INFERNEO_W4A16_NORM_EPILOGUE"] = "1"
    os.environ["INFERNEO_W4A16_HALF_COPIES"] = "0"  # (on by default) the float16 copies are compared below
    counts = use_device_kernels(fused, torch.device("cuda"), KernelConfig(cuda_pdl=False))
    assert counts["EpilogueNormLayer"] == layers, counts
    links = [layer.next_input_norm for layer in fused.layers]  # each layer's down projection: the next input norm
    assert [n[0] for n in links[:-1]] == [layer.input_layernorm for layer in fused.layers[1:]] and links[-1] is None

    launches = {"norm": 0, "producer": 0}
    ops = fused.layers[0].input_layernorm.ops
    real_norm, real_producer = ops.rms_norm, triton_int4.w4a16_residual_norm
    def counted(kind, real):
        def call(*args, **kwargs):
            launches[kind] += 1
            return real(*args, **kwargs)
        return call
    ops.rms_norm = counted("norm", real_norm)
    triton_int4.w4a16_residual_norm = counted("producer", real_producer)

    steps = 3
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    for prompts in ([[5, 17, 33, 2, 9, 100, 250, 7]], [[5, 17, 33, 2, 9], [40, 41, 42, 43, 44, 45]]):
        want, _ = generate(plain, prompts, steps, cache_dtype=torch.bfloat16)
        forced = [w.argmax(-1) for w in want]
        exact, _ = generate(reference, prompts, steps, forced)
        launches.update(norm=0, producer=0)
        got, _ = generate(fused, prompts, steps, forced, cache_dtype=torch.bfloat16)
        if len(prompts) == 1:  # the prefill as before; each decode step: 2 norms, every o/down projection fused
            assert launches == {"norm": 2 * layers + 1 + 2 * steps, "producer": (2 * layers - 1) * steps}, launches
            for g, w, e in zip(got, want, exact):
                assert rel(g, e) < 1.5 * rel(w, e) + 5e-3, (rel(g, e), rel(w, e))
                assert torch.equal(g.argmax(-1), w.argmax(-1))
        else:
            assert launches == {"norm": (2 * layers + 1) * (steps + 1), "producer": 0}, launches
            assert all(torch.equal(g, w) for g, w in zip(got, want))
        os.environ["INFERNEO_W4A16_HALF_COPIES"] = "1"  # float16 copies of the rows between the GEMVs: same bits
        copies = {"x": 0, "out": 0}
        def counting(real):
            def call(*args, **kwargs):
                copies["x"] += kwargs.get("x_half") is not None
                copies["out"] += kwargs.get("half_out") is not None
                return real(*args, **kwargs)
            return call
        real_linear, real_silu = triton_int4.w4a16_linear, triton_int4.w4a16_silu_mul
        triton_int4.w4a16_linear, triton_int4.w4a16_silu_mul = counting(real_linear), counting(real_silu)
        triton_int4.w4a16_residual_norm = counting(triton_int4.w4a16_residual_norm)
        with_copies, _ = generate(fused, prompts, steps, forced, cache_dtype=torch.bfloat16)
        triton_int4.w4a16_linear, triton_int4.w4a16_silu_mul = real_linear, real_silu
        triton_int4.w4a16_residual_norm = counted("producer", real_producer)
        os.environ["INFERNEO_W4A16_HALF_COPIES"] = "0"
        assert all(torch.equal(c, g) for c, g in zip(with_copies, got))
        if len(prompts) == 1:  # each decode step: every gate/up, down and q/k/v projection but the first q/k/v and
            # the last down reads a copy; every o, gate/up + SiLU and down projection but the last down writes one
            assert copies == {"x": (3 * layers - 2) * steps, "out": (3 * layers - 1) * steps}, copies
        else:
            assert copies == {"x": 0, "out": 0}, copies
    print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_w4a16_norm_epilogue_layers_in_decode_steps_under_the_interpreter(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("INFERNEO_W4A16_NORM_EPILOGUE", None)
    env.pop("INFERNEO_W4A16_HALF_COPIES", None)
    proc = subprocess.run([sys.executable, "-c", _EPILOGUE_LAYER_SCRIPT, str(tmp_path), os.path.dirname(__file__)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_w4a16_matches_linear_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], capture_output=True, text=True, timeout=900,
                          env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_reference_path_matches_linear():
    weights = _canonical(16, 64, 32)
    x = torch.randn(5, 64)
    assert torch.equal(reference_int4_linear(x, weights), F.linear(x, dequantize(weights)))


def test_w4a16_tensor_core_pdl_switch(monkeypatch):
    """``INFERNEO_W4A16_TC_PDL``: ``wait`` unless set, ``early`` / ``off`` (any case) as given, anything else refused
    with the values it takes (the GPU check of each mode: ``benchmarks/gpu/w4a16_tc_pdl_check.py``)."""
    from inferneo import envs

    monkeypatch.delenv("INFERNEO_W4A16_TC_PDL", raising=False)
    assert envs.w4a16_tc_pdl() == "wait"
    for value, mode in (("early", "early"), ("OFF", "off"), (" wait ", "wait"), ("", "wait")):
        monkeypatch.setenv("INFERNEO_W4A16_TC_PDL", value)
        assert envs.w4a16_tc_pdl() == mode
    monkeypatch.setenv("INFERNEO_W4A16_TC_PDL", "1")
    with pytest.raises(ValueError, match="wait, early or off"):
        envs.w4a16_tc_pdl()


def test_w4a16_silu_pairs_switch_takes_the_projections_one_row_launch(monkeypatch):
    """INFERNEO_W4A16_SILU_PAIRS: at one row the fused gate/up + SiLU takes the gate/up projection's own tuned launch
    with row pairs (Llama-2-7B's table has no fused entry there), by default; off, the table's answer; more rows
    unchanged."""
    triton_int4 = pytest.importorskip("inferneo.kernels.triton_int4")
    from inferneo.quantization.int4_layouts import Int4RowWeights

    rows, k, group = 22016, 4096, 128
    weights = Int4RowWeights(torch.zeros(rows, k // 8, dtype=torch.int32), torch.ones(rows, k // group).half(),
                             torch.zeros(rows, k // group, dtype=torch.uint8), group)
    x = torch.zeros(1, k, dtype=torch.bfloat16)
    monkeypatch.setenv("INFERNEO_W4A16_SILU_PAIRS", "0")
    assert triton_int4.silu_fused_config(x, weights) is None
    linear = triton_int4.choose_config("linear", 1, rows, k, group, torch.bfloat16)
    assert linear.kind == "h2"
    pairs = triton_int4.W4A16Config(**{**linear.as_dict(), "split_k": 1, "last_sums": False, "silu_pairs": True})
    monkeypatch.setenv("INFERNEO_W4A16_SILU_PAIRS", "1")
    assert triton_int4.silu_fused_config(x, weights) == pairs
    monkeypatch.delenv("INFERNEO_W4A16_SILU_PAIRS")
    assert triton_int4.silu_fused_config(x, weights) == pairs
    sixteen = triton_int4.silu_fused_config(torch.zeros(16, k, dtype=torch.bfloat16), weights)
    assert sixteen is None or not sixteen.silu_pairs


def test_w4a16_config_overrides_replace_fields_of_the_chosen_launch(monkeypatch):
    """INFERNEO_W4A16_CONFIGS (in-engine A/Bs): the named fields of one table key's launch replaced, the tuned entry's
    other fields kept (the default launch's where the table has none), other keys untouched; a malformed value
    (not JSON, an unknown field, a value of another type) is refused with the variable's name."""
    triton_int4 = pytest.importorskip("inferneo.kernels.triton_int4")
    choose = triton_int4.choose_config
    monkeypatch.delenv("INFERNEO_W4A16_CONFIGS", raising=False)
    tuned = choose("linear", 1, 12288, 4096, 128, torch.bfloat16, 132)
    other = choose("linear", 1, 4096, 4096, 128, torch.bfloat16, 132)
    untuned = choose("linear", 1, 512, 256, 128, torch.bfloat16, 132)
    monkeypatch.setenv("INFERNEO_W4A16_CONFIGS", json.dumps({"linear,1,12288,4096,128": {"block_n": 8, "num_warps": 4},
                                                            "linear,1,512,256,128": {"split_k": 1, "last_sums": False}}))
    assert choose("linear", 1, 12288, 4096, 128, torch.bfloat16, 132) == replace(tuned, block_n=8, num_warps=4)
    assert choose("linear", 1, 4096, 4096, 128, torch.bfloat16, 132) == other
    assert untuned.split_k > 1
    assert choose("linear", 1, 512, 256, 128, torch.bfloat16, 132) == replace(untuned, split_k=1, last_sums=False)
    # a key whose table entry is "none" (no fused launch): the override replaces fields of the default launch
    monkeypatch.delenv("INFERNEO_W4A16_CONFIGS")
    assert choose("silu", 1, 11008, 4096, 128, torch.bfloat16, 132) is None
    default = triton_int4.default_config("silu", 1, 11008, 4096, 128, torch.bfloat16, 132)
    monkeypatch.setenv("INFERNEO_W4A16_CONFIGS", json.dumps({"silu,1,11008,4096,128": {"block_n": 4}}))
    assert choose("silu", 1, 11008, 4096, 128, torch.bfloat16, 132) == replace(default, block_n=4)
    for bad in ("[1]", "{not json", '{"linear,1,12288,4096,128": {"blocks": 8}}',
                '{"linear,1,12288,4096,128": {"block_n": "8"}}', '{"linear,1,12288,4096,128": {"swap": 1}}',
                '{"linear,1,12288,4096,128": {"kind": 2}}'):
        monkeypatch.setenv("INFERNEO_W4A16_CONFIGS", bad)
        with pytest.raises(ValueError, match="INFERNEO_W4A16_CONFIGS"):
            choose("linear", 1, 12288, 4096, 128, torch.bfloat16, 132)


def test_triton_kernel_choice_by_rows_and_tuned_tiles(tmp_path, monkeypatch):
    triton_int4 = pytest.importorskip("inferneo.kernels.triton_int4")
    W4A16Config = triton_int4.W4A16Config

    monkeypatch.setattr(triton_int4, "TUNED_CONFIG_FILE", tmp_path / "none.json")
    triton_int4._tuned_configs.cache_clear()
    try:
        choose, default = triton_int4.choose_config, triton_int4.default_config
        # untuned: one bf16/fp16 row through the packed-half kernel (8 rows a program, 512 words a step, K split
        # while there are fewer than two output tiles a multiprocessor), the GEMV for other one-row calls ...
        assert choose("linear", 1, 4096, 4096, 128).kind == "h2"
        assert default("linear", 1, 4096, 4096, 128) == W4A16Config("h2", 8, block_kw=512)
        assert default("linear", 1, 4096, 4096, 128, sms=132) == W4A16Config("h2", 8, block_kw=512)  # 512 tiles
        assert default("linear", 1, 896, 4864, 128, sms=132) == W4A16Config("h2", 8, block_kw=512, split_k=4,
                                                                              last_sums=True)  # 112 tiles
        assert default("linear", 1, 256, 64, 32) == W4A16Config("h2", 8, block_kw=8, num_warps=1)
        assert default("silu", 1, 4096, 4096, 128, sms=132).kind == "h2"
        assert default("silu", 1, 896, 4864, 128, sms=132).split_k == 1  # the fused SiLU needs whole sums
        assert default("linear", 1, 4096, 4096, 128, torch.float16) == W4A16Config("h2", 8, block_kw=512)
        assert default("linear", 1, 4096, 4096, 128, torch.float32) == W4A16Config("gemv", 16, 8)
        assert default("linear", 1, 4096, 4096, 24) == W4A16Config("gemv", 16, 32)  # 3 words a group
        assert default("silu", 1, 4096, 4096, 128, torch.float32).kind == "silu"
        # ... the tensor-core kernel for 2..64 half-precision rows, a row tile covering them, K split over more
        # programs when the output tiles are fewer than two per multiprocessor ...
        assert default("linear", 3, 4096, 4096, 128) == W4A16Config("tc", 64, 2, 16, num_stages=3)
        assert default("linear", 32, 4096, 4096, 128, sms=132).block_m == 32
        assert default("linear", 32, 4096, 4096, 128, sms=132).split_k == 8  # 64 tiles: 8 programs each
        assert default("linear", 32, 12288, 4096, 128, sms=132).split_k == 2  # 192 tiles
        assert default("linear", 32, 22016, 4096, 128, sms=132).split_k == 1  # 344 tiles
        assert default("linear", 32, 4096, 512, 128, sms=132).split_k == 1  # 4 groups: no split
        assert default("silu", 32, 4096, 4096, 128, sms=132).split_k == 1  # the fused SiLU needs whole sums
        # ... and the float32-de-quantizing dot kernel above 64 rows, for float32, or groups of 8 columns
        assert default("linear", 4000, 4096, 4096, 128) == W4A16Config("dot", 64, block_m=64, block_kw=16)
        assert choose("linear", 3, 4096, 4096, 128, torch.float32).kind == "dot"
        assert choose("linear", 3, 4096, 4096, 8).kind == "dot"
        assert choose("silu", 3, 4096, 4096, 128, torch.float32) is None
        assert choose("silu", 100, 4096, 4096, 128) is None
        tuned = W4A16Config("tc", 32, 2, 32, num_warps=8, swap=True, split_k=4, last_sums=True)
        table = {triton_int4.config_key("linear", 20, 4096, 11008, 128): tuned.as_dict(),
                 triton_int4.config_key("silu", 1, 11008, 4096, 128): W4A16Config("tc", 64, 2, 16).as_dict(),
                 triton_int4.config_key("silu", 32, 11008, 4096, 128): W4A16Config("none", 0).as_dict(),
                 "dot,16,4096,4096,128": {"kind": "dot", "block_n": 8}}  # an older table's keys are not read
        (tmp_path / "tuned.json").write_text(json.dumps(table))
        monkeypatch.setattr(triton_int4, "TUNED_CONFIG_FILE", tmp_path / "tuned.json")
        triton_int4._tuned_configs.cache_clear()
        assert triton_int4.config_key("linear", 20, 4096, 11008, 128) == "linear,32,4096,11008,128"
        assert choose("linear", 32, 4096, 11008, 128) == tuned  # 17..32 rows share the entry
        assert choose("linear", 20, 4096, 11008, 128, torch.float32).kind == "dot"  # not for float32
        assert choose("linear", 33, 4096, 11008, 128).block_m == 64  # not tuned: the default
        assert choose("silu", 1, 11008, 4096, 128).kind == "tc"
        assert choose("silu", 32, 11008, 4096, 128) is None  # measured: apart is faster
        assert choose("silu", 16, 11008, 4096, 128).kind == "tc"  # not tuned: the default
        assert choose("linear", 16, 4096, 4096, 128).block_n == 64  # the older key was not read
    finally:
        triton_int4._tuned_configs.cache_clear()
    # the kernels run any group of whole words; CUDA layers take them (they read the row layout)
    assert triton_int4.triton_int4_available(24) and not triton_int4.triton_int4_available(12)
    assert triton_int4.tc_available(32, torch.bfloat16) and not triton_int4.tc_available(24, torch.bfloat16)
    assert not triton_int4.tc_available(32, torch.float32)
    kernel = select_int4_kernel(torch.device("cuda"), torch.bfloat16, 128, KernelConfig())
    assert kernel is triton_int4.w4a16_linear and kernel.reads_row_layout
    assert select_int4_kernel(torch.device("cuda"), torch.bfloat16, 12, KernelConfig()) is reference_int4_linear


def test_which_one_row_calls_take_the_packed_half_kernel(monkeypatch):
    triton_int4 = pytest.importorskip("inferneo.kernels.triton_int4")
    weights = pack_rows(_canonical(16, 256, 32))
    takes = triton_int4._h2_takes
    row = torch.randn(1, 256)
    assert takes(row.bfloat16(), weights) and takes(row.half(), weights)
    assert not takes(row, weights)  # float32: the GEMV
    assert not takes(torch.randn(2, 256).bfloat16(), weights)  # two rows: the tensor-core kernel
    assert not takes(torch.randn(1, 260).bfloat16()[:, 4:], weights)  # not 16-byte aligned: the GEMV
    assert not takes(row.bfloat16(), pack_rows(_canonical(16, 240, 24)))  # three words a group
    monkeypatch.setattr(triton_int4, "_capability", lambda device: (7, 5))  # a GPU before bf16 conversions
    assert not takes(row.bfloat16(), weights) and takes(row.half(), weights)


# ---- configs --------------------------------------------------------------------------------------------------


def test_configs_parse_and_refuse_what_they_cannot_run():
    awq = resolve_quant_config({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128,
                                                        "zero_point": True, "version": "gemm",
                                                        "modules_to_not_convert": ["mlp.down_proj"]}}, None)
    assert isinstance(awq, AwqConfig) and awq.scheme == Int4Scheme("awq", 128, True)
    from inferneo.quantization.base import LinearShape
    assert awq.method_for(LinearShape("layers.0.mlp.down_proj", 128, (64,))) is None
    assert isinstance(awq.method_for(LinearShape("layers.0.mlp.gate_up_proj", 64, (128, 128))), Int4LinearMethod)
    assert awq.method_for(LinearShape("lm_head", 64, (384,))) is None
    gptq = GptqConfig.from_hf({"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": True, "sym": True})
    assert gptq.scheme == Int4Scheme("gptq", -1, True, desc_act=True)
    with pytest.raises(ValueError, match="8-bit weights is not supported; supported: bits 4"):
        AwqConfig.from_hf({"quant_method": "awq", "bits": 8, "group_size": 128, "version": "gemm"})
    with pytest.raises(ValueError, match="8-bit weights is not supported; supported: bits 4"):
        GptqConfig.from_hf({"quant_method": "gptq", "bits": 8, "group_size": 128})
    with pytest.raises(ValueError, match="awq version 'gemv' is not supported; supported: gemm"):
        AwqConfig.from_hf({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"})
    with pytest.raises(ValueError, match="checkpoint_format 'gptq_v2' is not supported; supported: gptq"):
        GptqConfig.from_hf({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "gptq_v2"})
    with pytest.raises(ValueError, match="group_size 100 is not supported"):
        Int4Scheme("awq", 100, True)
    with pytest.raises(ValueError, match="which group_size 48 does not divide"):
        Int4Scheme("gptq", 48, True).group_for(64, "layers.0.self_attn.o_proj")
    with pytest.raises(ValueError, match="cannot run on cpu in torch.float16; supported: cpu: float32, bfloat16"):
        awq.check_supported(torch.device("cpu"), torch.float16)


def test_group_size_not_dividing_a_layer_fails_at_start_up(tiny_checkpoint_factory, tmp_path):
    source = tiny_checkpoint_factory("llama")
    quant, _ = write_int4_checkpoint(source, tmp_path / "q", tmp_path / "r", "awq", group_size=32)
    import json
    config = json.loads((quant / "config.json").read_text())
    config["quantization_config"]["group_size"] = 48  # does not divide hidden_size 64
    (quant / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="awq: layers.0.self_attn.qkv_proj has 64 input features, which group_size "
                                         "48 does not divide"):
        LLM(str(quant), dtype="float32", max_model_len=64, kv_cache_memory="4MiB")


# ---- end to end -----------------------------------------------------------------------------------------------

PROMPTS = [[1, 5, 9, 33, 70], [1, 200, 3, 4, 5, 6, 7, 8, 100, 101, 300, 44, 55, 66, 77, 88, 99], [1, 17, 250]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
ENGINE = dict(dtype="float32", max_model_len=128, kv_cache_memory="8MiB")


def _greedy(path, **kwargs):
    llm = LLM(str(path), **ENGINE, **kwargs)
    try:
        layers = quantized_linears(llm.engine.runner.model)
        out = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        return out, layers
    finally:
        llm.shutdown()


CASES = {
    "llama-awq-g32": ("llama", "awq", 32, False, False),
    "qwen3-awq-sym": ("qwen3", "awq", 32, True, False),
    "llama-gptq-desc_act": ("llama", "gptq", 32, False, True),
    "qwen3-gptq-sym-channel": ("qwen3", "gptq", -1, True, False),
    "qwen3-gptq-sym-desc_act": ("qwen3", "gptq", 32, True, True),
    "llama-compressed-asym": ("llama", "compressed-tensors", 32, False, False),
    "qwen3-compressed-sym": ("qwen3", "compressed-tensors", 16, True, False),
    "llama-compressed-actorder": ("llama", "compressed-tensors", 32, False, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_the_dequantized_float32_model(case, tiny_checkpoint_factory, tmp_path):
    arch, layout, group, symmetric, desc_act = CASES[case]
    source = tiny_checkpoint_factory(arch)
    quant, ref = write_int4_checkpoint(source, tmp_path / "q", tmp_path / "r", layout, group, symmetric, desc_act)
    got, layers = _greedy(quant)
    expected, _ = _greedy(ref)
    assert len(layers) == 2 * 4  # qkv, o, gate_up, down in each of the two layers
    assert all(isinstance(layer.method, Int4LinearMethod) and layer.method.name == layout for layer in layers)
    assert not any(name in ("qweight", "weight_packed") for layer in layers for name, _ in layer.named_parameters())
    if desc_act:  # q, k, v got their own random act-order: one canonical block per shard
        assert len(layers[0].int4_blocks) == 3
    assert got == expected


def test_layers_hold_the_weight_once_and_dequantize_to_the_checkpoint(tiny_checkpoint_factory, tmp_path):
    from safetensors.torch import load_file

    source = tiny_checkpoint_factory("llama")
    quant, ref = write_int4_checkpoint(source, tmp_path / "q", tmp_path / "r", "gptq", 32, False, True)
    llm = LLM(str(quant), **ENGINE)
    try:
        model = llm.engine.runner.model
        reference = load_file(str(ref / "model.safetensors"))
        layer = next(m for name, m in model.named_modules() if name.endswith("layers.1.mlp.gate_up_proj"))
        expected = torch.cat([reference["model.layers.1.mlp.gate_proj.weight"],
                              reference["model.layers.1.mlp.up_proj.weight"]])
        assert torch.equal(layer.method.dequantized_weight(layer), expected)
        # packed codes (half a byte per weight) + float32 scales + uint8 zeros (+ the act-order permutations)
        n, k = layer.out_features, layer.in_features
        expected_bytes = n * k // 2 + (k // 32) * n * 5 + sum(b.perm.numel() * 8 for b in layer.int4_blocks
                                                               if b.perm is not None)
        assert layer.method.weight_bytes(layer) == expected_bytes
    finally:
        llm.shutdown()


def test_reference_path_when_native_kernels_are_off(tiny_checkpoint_factory, tmp_path):
    source = tiny_checkpoint_factory("llama")
    quant, ref = write_int4_checkpoint(source, tmp_path / "q", tmp_path / "r", "awq", 32)
    got, layers = _greedy(quant, kernels=KernelConfig(cpu_native_kernels=False))
    assert all(layer.int4_kernel is reference_int4_linear for layer in layers)
    expected, _ = _greedy(ref, kernels=KernelConfig(cpu_native_kernels=False))
    assert got == expected


def test_dummy_weights_fill_every_layer(tiny_checkpoint_factory, tmp_path):
    source = tiny_checkpoint_factory("llama")
    quant, _ = write_int4_checkpoint(source, tmp_path / "q", tmp_path / "r", "awq", 32)
    llm = LLM(str(quant), load_format="dummy", **ENGINE)
    try:
        layers = quantized_linears(llm.engine.runner.model)
        for layer in layers:
            w = layer.method.dequantized_weight(layer)
            assert w.abs().max() > 0 and w.abs().max() < 0.1 and w.std() > 0.005
        out = llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == GREEDY.max_tokens
    finally:
        llm.shutdown()


@pytest.mark.parametrize("layout", ["gptq", "compressed-tensors"])
def test_a_quantized_lm_head_loads_and_runs_4_bit(layout, tiny_checkpoint_factory, tmp_path):
    # GPTQModel's ``lm_head: true`` and a compressed-tensors ``ignore`` without lm_head store the head as
    # ``lm_head.qweight`` / ``lm_head.weight_packed``: no ``lm_head.weight``, which is not an embedding model's
    # missing head.
    source = tiny_checkpoint_factory("llama")
    quant, ref = write_int4_checkpoint(source, tmp_path / "q", tmp_path / "r", layout, 32, lm_head=True)
    got, layers = _greedy(quant)
    expected, _ = _greedy(ref)
    assert [layer.shape.prefix for layer in layers][-1] == "lm_head"
    assert len(layers) == 2 * 4 + 1
    assert got == expected


@pytest.mark.parametrize(("not_converted", "quantized"), [
    (["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"], 7),
    (["mlp.down_proj"], 6),
])
def test_awq_modules_to_not_convert_names_checkpoint_modules(not_converted, quantized, tiny_checkpoint_factory,
                                                             tmp_path):
    # AutoAWQ matches the list against each checkpoint module's name (a substring): the engine's fused qkv_proj is
    # left full precision when q_proj, k_proj and v_proj all are.
    source = tiny_checkpoint_factory("llama")
    quant, ref = write_int4_checkpoint(source, tmp_path / "q", tmp_path / "r", "awq", 32,
                                       not_converted=not_converted)
    got, layers = _greedy(quant)
    expected, _ = _greedy(ref)
    assert len(layers) == quantized
    assert got == expected


def test_awq_modules_to_not_convert_naming_part_of_a_fused_layer_is_refused(tiny_checkpoint_factory, tmp_path):
    source = tiny_checkpoint_factory("llama")
    quant, _ = write_int4_checkpoint(source, tmp_path / "q", tmp_path / "r", "awq", 32, not_converted=["v_proj"])
    with pytest.raises(ValueError, match=r"modules_to_not_convert names model.layers.0.self_attn.v_proj but not the "
                                         r"other parts of the fused layer layers.0.self_attn.qkv_proj"):
        LLM(str(quant), **ENGINE)


@pytest.mark.parametrize(("arch", "layout", "desc_act"), [
    ("qwen3_moe", "awq", False), ("mixtral", "gptq", True), ("qwen2_moe", "compressed-tensors", False)])
def test_4_bit_mixture_of_experts_experts_load_dequantized(arch, layout, desc_act, tiny_checkpoint_factory,
                                                           tmp_path):
    # AutoAWQ, GPTQModel and llm-compressor quantize every expert (experts.N.gate_proj.qweight, Mixtral's
    # experts.N.w1.qweight); the engine's experts are stacked tensors, not linear layers: they load de-quantized.
    source = tiny_checkpoint_factory(arch)
    quant, ref = write_int4_checkpoint(source, tmp_path / "q", tmp_path / "r", layout, 16, desc_act=desc_act)
    assert any(".experts.0." in key and key.endswith(("qweight", "weight_packed"))
               for key in load_safetensors_keys(quant))
    got, layers = _greedy(quant)
    expected, _ = _greedy(ref)
    assert layers and all(".experts" not in layer.shape.prefix for layer in layers)
    assert got == expected


def load_safetensors_keys(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return list(f.keys())


def test_gptq_dynamic_overrides_and_exclusions(tiny_checkpoint_factory, tmp_path):
    # GPTQModel's ``dynamic``: the MLPs quantized in groups of 64, layer 1's attention left in full precision.
    source = tiny_checkpoint_factory("llama")
    quant, ref = write_int4_checkpoint(source, tmp_path / "q", tmp_path / "r", "gptq", 32,
                                       not_converted=["model.layers.1.self_attn."],
                                       group_sizes={r"model\.layers\.\d+\.mlp\.": 64})
    config = json.loads((quant / "config.json").read_text())
    config["quantization_config"].pop("modules_to_not_convert")
    config["quantization_config"]["dynamic"] = {r"-:model\.layers\.1\.self_attn\..*": {},
                                                r"+:.*\.mlp\..*": {"group_size": 64}}
    (quant / "config.json").write_text(json.dumps(config))
    got, layers = _greedy(quant)
    expected, _ = _greedy(ref)
    groups = {layer.shape.prefix: layer.int4_group_size for layer in layers}
    assert groups == {"layers.0.self_attn.qkv_proj": 32, "layers.0.self_attn.o_proj": 32,
                      "layers.0.mlp.gate_up_proj": 64, "layers.0.mlp.down_proj": 64,
                      "layers.1.mlp.gate_up_proj": 64, "layers.1.mlp.down_proj": 64}
    assert got == expected


@pytest.mark.parametrize(("dynamic", "message"), [
    ({r"+:.*\.mlp\..*": {"bits": 8}}, "down_proj, dynamic .* with 8-bit weights is not supported"),
    ({r"-:.*\.v_proj": {}}, "dynamic settings differ between the parts of the fused layer"),
])
def test_gptq_dynamic_settings_it_cannot_run_are_refused(dynamic, message):
    config = resolve_quant_config({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                                           "dynamic": dynamic}}, None)
    from inferneo.quantization.base import LinearShape

    with pytest.raises(ValueError, match=message):
        for prefix, sizes in (("layers.0.self_attn.qkv_proj", (64, 32, 32)), ("layers.0.mlp.down_proj", (64,))):
            config.method_for(LinearShape(prefix, 64, sizes))
