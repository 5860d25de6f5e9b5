"""The FP8 weight-only GEMV (``kernels/triton_fp8_gemv.py``) and how FP8 layers choose it.

- Kernel, under Triton's CPU interpreter (a subprocess: the interpreter must be on before triton is imported):
  against ``F.linear`` of the full-precision activations and the de-quantized weight, for per-tensor, per-row and
  128-column block scales, one and several rows, bf16 and float32 activations; the fused gate/up + SiLU kernel
  equal bit for bit to the GEMV followed by the SiLU-and-mul kernel; both for the CUDA-core and the tensor-core
  (``tl.dot``) tilings, and the one-row ``h2`` option (its PTX emulated in float32: the plumbing, not its rounding,
  which ``benchmarks/gpu/fp8_h2_check.py`` checks on the GPU).
- Selection: a FP8 layer set up as finalize sets it up on the GPU takes the GEMV (activations unquantized) up to
  ``max_rows()`` rows and the W8A8 path (per-token e4m3 activations, ``torch._scaled_mm``) above; the reference
  follows the same choice; the MLP fuses gate/up + SiLU through the GEMV at a few rows.
- Tolerance: float32 sums of exact products, rounded once to the output dtype: relative error (Frobenius) below
  6e-3 in bf16 (8 mantissa bits), 1e-5 in float32.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from inferneo.kernel_config import KernelConfig
from inferneo.model_executor.device_kernels import QuantizedSiluMLP, use_device_kernels
from inferneo.model_executor.models.llama import MLP
from inferneo.quantization.base import LinearShape, QuantizedLinear
from inferneo.quantization.fp8 import Fp8LinearMethod, Fp8Scheme, gemv_wanted

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

_SCRIPT = textwrap.dedent("""
    import torch, torch.nn.functional as F
    import triton
    from triton_interpreter_shims import patch_interpreter, round_e4m3_to_nearest
    patch_interpreter()  # tl.dot on bfloat16 (the tensor-core tiling)
    round_e4m3_to_nearest()  # the W8A8 path quantizes activations in Triton: round as the GPU does
    from inferneo.kernels._triton_elementwise import rms_norm, silu_and_mul
    from inferneo.kernels.triton_fp8_gemv import fp8_gemv, fp8_gemv_silu_mul, fp8_norm_gemv, max_rows
    from inferneo.quantization.fp8_math import dequantize, quantize_blocks, quantize_groups, quantize_per_tensor

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    def quantized(w, kind):
        if kind == "tensor":
            q, s = quantize_per_tensor(w)
            return q, s, None, dequantize(q, s)
        if kind == "row":
            q, s = quantize_groups(w)
            return q, s.reshape(-1), None, dequantize(q, s)
        q, s = quantize_blocks(w, (16, 128))
        return q, s, (16, 128), dequantize(q, s, (16, 128))

    torch.manual_seed(0)
    n, k = 40, 300  # K not a multiple of the tiles, N of the row blocks
    w = torch.randn(n, k) * 0.05
    for kind in ("tensor", "row", "block"):
        q, s, block, w_deq = quantized(w, kind)
        for m, config in ((1, (4, 128, 4)), (3, (8, 256, 4))):
            x = torch.randn(m, k)
            ref = F.linear(x.bfloat16().float(), w_deq)
            got = fp8_gemv(x.bfloat16(), q, s, block, config=config)
            assert got.shape == (m, n) and got.dtype == torch.bfloat16
            assert rel(got, ref) < 6e-3, (kind, m, config, rel(got, ref))
            if m > 1:
                continue
            got32 = fp8_gemv(x, q, s, block, config=config)
            assert rel(got32, F.linear(x, w_deq)) < 1e-5, (kind, m, config, rel(got32, F.linear(x, w_deq)))

    # The tensor-core kernel's "bits" option changes no bit: e4m3 placed into bfloat16 by integer operations, the
    # activations and sums scaled by powers of two; weights with subnormal e4m3 codes (exponent field 0) included.
    # Block scales and float32 activations ignore it.
    wsub = w.clone()
    wsub[:, :6] = torch.tensor([2e-6, -3e-6, 4e-6, -6e-6, 0.0, -0.2])  # scales >= 0.2 / 448: subnormal codes
    for kind in ("tensor", "row", "block"):
        q, s, block, w_deq = quantized(wsub, kind)
        codes = q.view(torch.uint8)[:, :4]
        assert kind == "block" or ((codes & 0x78) == 0).all() and (codes & 0x7 != 0).any()  # exponent field 0
        for m in (1, 5, 17):
            x = torch.randn(m, k).bfloat16()
            plain = fp8_gemv(x, q, s, block, config=(16, 64, 4, 2))
            got = fp8_gemv(x, q, s, block, config=(16, 64, 4, 2, "bits"))
            assert torch.equal(got, plain), (kind, m, (got.float() - plain.float()).abs().max())
            assert rel(got, F.linear(x.float(), w_deq)) < 6e-3, (kind, m)

    # The "h2" option (one bf16 row: float16 sums of e4m3 codes times activations scaled by 2^-8; emulated here
    # in float32, the interpreter runs no PTX): the products of the plain kernel, in exact and partial tiles, the
    # fused gate/up + SiLU equal to the h2 GEMV then the SiLU-and-mul kernel; block scales, several rows, other
    # activation dtypes and widths that are not a multiple of 8 take the plain kernel with the same tiling.
    from inferneo.kernels.triton_fp8_gemv import SCALE_ROW, takes_h2
    k8 = 304
    w8 = torch.randn(n, k8) * 0.05
    for kind in ("tensor", "row", "block"):
        q, s, block, w_deq = quantized(w8, kind)
        for config in ((8, 64, 4, "h2"), (16, 128, 2, "h2"), (4, 512, 4, "h2")):
            x = torch.randn(1, k8).bfloat16()
            got = fp8_gemv(x, q, s, block, config=config)
            assert rel(got, F.linear(x.float(), w_deq)) < 6e-3, (kind, config, rel(got, F.linear(x.float(), w_deq)))
            x = x * torch.where(torch.arange(k8) % 37 == 0, 3e4, 1.0).bfloat16()  # float16 sums would overflow
            got = fp8_gemv(x, q, s, block, config=config)
            assert torch.isfinite(got).all() and rel(got, F.linear(x.float(), w_deq)) < 6e-3, (kind, config)
        x = torch.randn(3, k8).bfloat16()
        assert rel(fp8_gemv(x, q, s, block, config=(8, 64, 4, "h2")), F.linear(x.float(), w_deq)) < 6e-3
    q, s, _, w_deq = quantized(w8, "row")
    assert takes_h2(torch.randn(1, k8).bfloat16(), q, SCALE_ROW, 64)
    assert not takes_h2(torch.randn(1, k8).half(), q, SCALE_ROW, 64)
    assert not takes_h2(torch.randn(2, k8).bfloat16(), q, SCALE_ROW, 64)
    assert not takes_h2(torch.randn(1, k8 + 1).bfloat16()[:, 1:], q, SCALE_ROW, 64)  # (not 16-byte aligned)
    x = torch.randn(1, k8).half()
    assert rel(fp8_gemv(x, q, s, config=(8, 64, 4, "h2")), F.linear(x.float(), w_deq)) < 6e-3
    q2, s2, _, w2_deq = quantized(torch.randn(64, k8) * 0.05, "row")
    for config in ((8, 64, 4, "h2"), (4, 128, 2, "h2")):
        x = torch.randn(1, k8).bfloat16()
        fused = fp8_gemv_silu_mul(x, q2, s2, config=config)
        assert torch.equal(fused, silu_and_mul(fp8_gemv(x, q2, s2, config=config))), config
        g, u = F.linear(x.float(), w2_deq).chunk(2, dim=-1)
        assert rel(fused, F.silu(g) * u) < 2e-2, config

    # Scaled float16 copies (scaled_half): the h2 kernel reading x's copy and writing its output's gives the same
    # bits, the copy written equal to scaled_half of the output; other kernels fill half_out from their output;
    # malformed copies refused; the RMSNorm kernel's copy of its normalized rows.
    from inferneo.kernels.triton_fp8_gemv import scaled_half
    for config in ((8, 64, 4, "h2"), (4, 128, 2, "h2")):
        x = torch.randn(1, k8).bfloat16()
        for run, qq, ss in ((fp8_gemv, q, s), (fp8_gemv_silu_mul, q2, s2)):
            want = run(x, qq, ss, config=config)
            half = torch.full(want.shape, float("nan"), dtype=torch.float16)
            got = run(x, qq, ss, config=config, x_half=scaled_half(x), half_out=half)
            assert torch.equal(got, want) and torch.equal(half, scaled_half(want)), (run, config)
    x = torch.randn(3, k8).bfloat16()
    half = torch.empty(3, n, dtype=torch.float16)
    got = fp8_gemv(x, q, s, config=(8, 64, 4), half_out=half)
    assert torch.equal(half, scaled_half(got))
    for bad in (dict(half_out=torch.empty(1, n, dtype=torch.bfloat16)), dict(x_half=torch.empty(1, k8 - 8).half()),
                dict(half_out=torch.empty(1, n + 1, dtype=torch.float16))):
        try:
            fp8_gemv(torch.randn(1, k8).bfloat16(), q, s, config=(8, 64, 4, "h2"), **bad)
        except ValueError:
            continue
        raise AssertionError(f"a malformed copy was taken: {bad}")
    for residual in (None, torch.randn(2, k8).bfloat16()):
        x, nw = torch.randn(2, k8).bfloat16(), (1 + 0.1 * torch.randn(k8)).bfloat16()
        half = torch.empty(2, k8, dtype=torch.float16)
        out = rms_norm(x.clone(), None if residual is None else residual.clone(), nw, 1e-6, half_out=half)
        normed = out if residual is None else out[0]
        want = rms_norm(x.clone(), None if residual is None else residual.clone(), nw, 1e-6)
        assert torch.equal(normed, want if residual is None else want[0]) and torch.equal(half, scaled_half(normed))

    # The "h2p" option (the h2 products with the weights streamed through a num_stages-deep pipeline; a fourth
    # number: the depth; "pre": 2 * BLOCK_K codes a row read before the PDL wait): against F.linear in exact and
    # partial tiles (K 304: the pipelined loop ends in a masked step; K 512: none), with and without "pre", with
    # float16-overflowing columns; the fused gate/up + SiLU equal to the h2p GEMV then SiLU-and-mul; where h2 does
    # not apply (block scales, several rows, float16 activations) the tiling's first three numbers run the plain
    # CUDA-core kernel, not the tensor-core one.
    for kk in (k8, 512):
        wp = torch.randn(n, kk) * 0.05
        for kind in ("tensor", "row", "block"):
            q, s, block, w_deq = quantized(wp, kind)
            for config in ((8, 64, 4, 3, "h2p"), (4, 128, 2, 2, "h2p", "pre"), (16, 32, 4, 4, "h2p", "pre")):
                x = torch.randn(1, kk).bfloat16()
                got = fp8_gemv(x, q, s, block, config=config)
                assert rel(got, F.linear(x.float(), w_deq)) < 6e-3, (kind, kk, config)
                x = x * torch.where(torch.arange(kk) % 37 == 0, 3e4, 1.0).bfloat16()
                got = fp8_gemv(x, q, s, block, config=config)
                assert torch.isfinite(got).all() and rel(got, F.linear(x.float(), w_deq)) < 6e-3, (kind, kk, config)
            x = torch.randn(3, kk).bfloat16()
            got = fp8_gemv(x, q, s, block, config=(8, 64, 4, 3, "h2p"))
            assert torch.equal(got, fp8_gemv(x, q, s, block, config=(8, 64, 4))), (kind, kk)
    q, s, _, w_deq = quantized(w8, "row")
    x = torch.randn(1, k8).half()
    assert torch.equal(fp8_gemv(x, q, s, config=(8, 64, 4, 3, "h2p")), fp8_gemv(x, q, s, config=(8, 64, 4)))
    for config in ((8, 64, 4, 3, "h2p"), (4, 64, 2, 2, "h2p", "pre")):
        x = torch.randn(1, k8).bfloat16()
        fused = fp8_gemv_silu_mul(x, q2, s2, config=config)
        assert torch.equal(fused, silu_and_mul(fp8_gemv(x, q2, s2, config=config))), config
        g, u = F.linear(x.float(), w2_deq).chunk(2, dim=-1)
        assert rel(fused, F.silu(g) * u) < 2e-2, config

    # The tensor-core tiling (a fourth number: num_stages): the same products as 16-row tiles of tl.dot.
    for kind, m in (("row", 5), ("block", 1)):
        q, s, block, w_deq = quantized(w, kind)
        x = torch.randn(m, k).bfloat16()
        got = fp8_gemv(x, q, s, block, config=(16, 64, 4, 2))
        assert got.shape == (m, n) and rel(got, F.linear(x.float(), w_deq)) < 6e-3, (kind, m)

    # A tensor-core tile wider than the weight's scale blocks (tuned on per-channel weights, BLOCK_K 256, and a
    # checkpoint with 128-wide blocks) narrows to the blocks' width, or, narrower than a dot tile, runs the CUDA-core
    # kernel: the same products, never an error in a decode step.
    for bk in (128, 8):
        qb, sb = quantize_blocks(w, (16, bk))
        w_deq = dequantize(qb, sb, (16, bk))
        x = torch.randn(5, k).bfloat16()
        got = fp8_gemv(x, qb, sb, (16, bk), config=(16, 256, 4, 2))
        assert rel(got, F.linear(x.float(), w_deq)) < 6e-3, (bk, rel(got, F.linear(x.float(), w_deq)))

    # gate/up + SiLU in one kernel: the same bits as the GEMV then the SiLU-and-mul kernel
    d = 32
    w2 = torch.randn(2 * d, k) * 0.05
    for kind in ("row", "block"):
        q, s, block, w_deq = quantized(w2, kind)
        for m, config in ((1, (8, 128, 4)), (2, (8, 128, 4)), (3, (16, 128, 4, 2)), (3, (16, 128, 4, 2, "bits"))):
            x = torch.randn(m, k).bfloat16()
            fused = fp8_gemv_silu_mul(x, q, s, block, config=config)
            unfused = silu_and_mul(fp8_gemv(x, q, s, block, config=config))
            assert fused.shape == (m, d) and torch.equal(fused, unfused), (kind, m)
            g, u = F.linear(x.float(), w_deq).chunk(2, dim=-1)
            assert rel(fused, F.silu(g) * u) < 2e-2, (kind, m)

    # RMSNorm inside the GEMV (one row): within the GEMV's tolerance of float32 on the exact norm (the normed row is
    # not rounded to bf16 first, unlike the RMSNorm kernel) and of the RMSNorm kernel then the GEMV (gated: then the
    # gate/up + SiLU kernel); the residual sum equal to the RMSNorm kernel's bits; the inputs not written.
    nw = (1 + 0.1 * torch.randn(k)).bfloat16()
    for kind in ("tensor", "row", "block"):
        for gated, weight in ((False, w), (True, w2)):
            q, s, block, w_deq = quantized(weight, kind)
            for with_res in (False, True):
                x = torch.randn(1, k).bfloat16()
                res = torch.randn(1, k).bfloat16() if with_res else None
                x0, res0 = x.clone(), None if res is None else res.clone()
                got, total = fp8_norm_gemv(x, res, nw, 1e-5, q, s, block, gated=gated, config=(8, 128, 4))
                assert torch.equal(x, x0) and (res is None or torch.equal(res, res0)), "inputs are not written"
                res1 = None if res is None else res.clone()
                normed = rms_norm(x.clone(), res1, nw, 1e-5)
                normed = normed[0] if res1 is not None else normed
                linear = fp8_gemv_silu_mul if gated else fp8_gemv
                want = linear(normed, q, s, block, config=(8, 128, 4))
                summed = x.float() + (0 if res is None else res.float())
                summed = summed.bfloat16().float()
                exact = F.linear(summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.float(),
                                 w_deq)
                if gated:
                    g, u = exact.chunk(2, dim=-1)
                    exact = F.silu(g) * u
                tol = 2e-2 if gated else 6e-3
                # (the unfused path rounds the normed row to bf16: farther from the exact product, up to 1e-2 here)
                assert rel(got, exact) < tol and rel(got, want) < 2e-2, (kind, gated, with_res, rel(got, exact))
                assert (total is None) is (res is None) and (total is None or torch.equal(total, res1))

    # Selection in Fp8LinearMethod.apply: a layer set up as finalize sets it up on the GPU (kernel scaled_mm,
    # the GEMV wanted), run here on CPU (the GEMV under the interpreter, torch._scaled_mm on CPU).
    from inferneo.kernel_config import KernelConfig
    from inferneo.quantization.base import LinearShape, QuantizedLinear
    from inferneo.quantization.fp8 import Fp8LinearMethod, Fp8Scheme, gemv_wanted

    method = Fp8LinearMethod(Fp8Scheme("channel", None, "dynamic_token", checkpoint=False))
    layer = QuantizedLinear(method, LinearShape("layers.0.mlp.down_proj", 64, (48,)), False, torch.bfloat16,
                            torch.device("cpu"))
    layer.weight.data.copy_(torch.randn(48, 64) * 0.05)
    method.finalize(layer, KernelConfig())
    assert layer.fp8_kernel == "reference" and layer.fp8_gemv is False  # CPU: never the GEMV
    layer.fp8_kernel = "scaled_mm"
    layer.fp8_gemv = gemv_wanted("scaled_mm", KernelConfig(), torch.bfloat16)
    w_deq = method.dequantized_weight(layer)
    limit = max_rows()
    assert limit >= 1
    for m in (1, limit, limit + 1):
        x = torch.randn(m, 64).bfloat16()
        weight_only = F.linear(x.float(), w_deq)
        xq, xs = quantize_groups(x)
        w8a8 = F.linear(dequantize(xq, xs), w_deq)
        y = layer(x)
        gemv = m <= limit
        assert method.takes_gemv(layer, m) is gemv
        assert torch.equal(method.reference(layer, x), weight_only if gemv else w8a8)
        near, far = (weight_only, w8a8) if gemv else (w8a8, weight_only)
        assert rel(y, near) < 6e-3 and rel(y, far) > 1e-2, (m, rel(y, near), rel(y, far))
        if gemv:
            assert torch.equal(y, fp8_gemv(x, layer.weight, layer.weight_scale))
    # norm_apply: the norm inside the GEMV at one row, declined above it
    x, res = torch.randn(1, 64).bfloat16(), torch.randn(1, 64).bfloat16()
    nw = torch.ones(64, dtype=torch.bfloat16)
    got, total = method.norm_apply(layer, x, res, nw, 1e-6)
    normed, res1 = rms_norm(x.clone(), res.clone(), nw, 1e-6)
    assert torch.equal(total, res1) and rel(got, layer(normed)) < 2e-2
    assert method.norm_apply(layer, torch.randn(2, 64).bfloat16(), None, nw, 1e-6) is None

    # A decoder layer with its norms inside the FP8 q/k/v and gate/up GEMVs (NormFusedQuantLayer): at one row
    # within the GEMVs' tolerance of the plain layer over the RMSNorm kernel and the GEMVs, with and without an
    # incoming residual; two rows take the plain path (the same bits).
    import types
    from torch import nn
    from inferneo.model_executor.device_kernels import NormFusedQuantLayer, QuantizedSiluMLP, TritonRMSNorm, _adopt
    from inferneo.model_executor.layers.basic import RMSNorm
    from inferneo.model_executor.models.llama import MLP, DecoderLayer

    def fp8(name, in_f, shards):
        m = Fp8LinearMethod(Fp8Scheme("channel", None, "dynamic_token", checkpoint=False))
        lin = QuantizedLinear(m, LinearShape(name, in_f, shards), False, torch.bfloat16, torch.device("cpu"))
        lin.weight.data.copy_(torch.randn(sum(shards), in_f) * 0.05)
        m.finalize(lin, KernelConfig())
        lin.fp8_kernel, lin.fp8_gemv = "scaled_mm", True
        return lin

    class Attn(nn.Module):  # stands in for the attention: any function of the q/k/v output
        def __init__(self):
            super().__init__()
            self.qkv_proj = fp8("layers.0.self_attn.qkv_proj", 64, (64, 32, 32))

        def forward(self, positions, hidden, kv_cache, metadata):
            return self.forward_qkv(positions, self.qkv_proj(hidden), kv_cache, metadata)

        def forward_qkv(self, positions, qkv, kv_cache, metadata):
            return qkv[:, :64] * 0.5 + torch.cat([qkv[:, 64:96], qkv[:, 96:]], dim=-1)

    ops = types.SimpleNamespace(rms_norm=rms_norm)
    plain = DecoderLayer.__new__(DecoderLayer)
    nn.Module.__init__(plain)
    plain.self_attn = Attn()
    mlp = MLP(types.SimpleNamespace(hidden_size=64, intermediate_size=96, mlp_bias=False))
    mlp.gate_up_proj = fp8("layers.0.mlp.gate_up_proj", 64, (96, 96))
    mlp.down_proj = fp8("layers.0.mlp.down_proj", 96, (64,))
    plain.mlp = _adopt(QuantizedSiluMLP, mlp)
    for name in ("input_layernorm", "post_attention_layernorm"):
        norm = RMSNorm(64, 1e-6)
        norm.weight.data = (1 + 0.1 * torch.randn(64)).bfloat16()
        setattr(plain, name, TritonRMSNorm(norm, ops, False))
    fused = _adopt(NormFusedQuantLayer, plain)
    calls = []
    original = fp8_norm_gemv
    import inferneo.kernels.triton_fp8_gemv as fg
    fg.fp8_norm_gemv = lambda *a, **kw: calls.append(kw.get("gated")) or original(*a, **kw)
    for rows in (1, 2):
        for with_res in (False, True):
            hidden = torch.randn(rows, 64).bfloat16()
            residual = torch.randn(rows, 64).bfloat16() if with_res else None
            clone = lambda t: None if t is None else t.clone()
            want = plain(None, hidden.clone(), clone(residual), None, None)
            calls.clear()
            got = fused(None, hidden.clone(), clone(residual), None, None)
            assert calls == ([False, True] if rows == 1 else []), (rows, calls)
            for g, w_ in zip(got, want):  # (the residual sum holds the attention output: it differs too)
                assert rel(g, w_) < 2e-2 if rows == 1 else torch.equal(g, w_), (rows, with_res, rel(g, w_))
    fg.fp8_norm_gemv = original

    # A decoder layer of FP8 linears handing its one-row GEMVs scaled float16 copies (HalfCopyQuantLayer): the same
    # bits as the plain layer with the switch on, every q/k/v, gate/up and down GEMV reading a copy at one row;
    # two rows, or the switch off, take the plain path.
    import os
    from inferneo.model_executor.device_kernels import HalfCopyQuantLayer, use_half_copy_quant_layers

    from inferneo.model_executor.models.llama import Attention
    attn = Attention.__new__(Attention)  # an attention whose attend_qkv is any function of the q/k/v output
    nn.Module.__init__(attn)
    attn.qkv_proj = fp8("layers.0.self_attn.qkv_proj", 64, (64, 32, 32))
    attn.o_proj = fp8("layers.0.self_attn.o_proj", 64, (64,))
    attn.attend_qkv = lambda positions, qkv, kv_cache, metadata: (
        qkv[:, :64] * 0.5 + torch.cat([qkv[:, 64:96], qkv[:, 96:]], dim=-1))
    layer = DecoderLayer.__new__(DecoderLayer)
    nn.Module.__init__(layer)
    layer.self_attn, layer.mlp = attn, plain.mlp
    layer.input_layernorm, layer.post_attention_layernorm = plain.input_layernorm, plain.post_attention_layernorm
    holder = nn.Module()
    holder.layers = nn.ModuleList([layer])
    assert use_half_copy_quant_layers(holder) == 1 and type(holder.layers[0]) is HalfCopyQuantLayer
    copies = holder.layers[0]
    reads = []
    original_copy = Fp8LinearMethod.copy_apply
    def counted(self, layer, x, x_half, half_out=None, silu_mul=False):
        reads.append(silu_mul)
        return original_copy(self, layer, x, x_half, half_out, silu_mul)
    Fp8LinearMethod.copy_apply = counted
    for rows in (1, 2):
        for with_res in (False, True):
            hidden = torch.randn(rows, 64).bfloat16()
            residual = torch.randn(rows, 64).bfloat16() if with_res else None
            clone = lambda t: None if t is None else t.clone()
            os.environ["INFERNEO_FP8_HALF_COPIES"] = "0"
            want = copies(None, hidden.clone(), clone(residual), None, None)
            assert not reads
            os.environ["INFERNEO_FP8_HALF_COPIES"] = "1"
            got = copies(None, hidden.clone(), clone(residual), None, None)
            assert reads == ([False, True, False] if rows == 1 else []), (rows, reads)
            reads.clear()
            assert all(torch.equal(g, w_) for g, w_ in zip(got, want)), (rows, with_res)
    Fp8LinearMethod.copy_apply = original_copy
    print("ok")
""")



# The RMSNorm in the FP8 h2 GEMVs' epilogues (kernels/scaled_row.py), under the interpreter: the producer's residual
# sum and scaled row against the plain launch followed by the fused add + norm's rounding (within one bfloat16 unit:
# the interpreter truncates float32 to bfloat16 where the GPU rounds), its per-program sums of squares; the reader's
# 1 / rms against the norm then F.linear; the scaled float16 copies giving the same bits; then decoder layers
# (EpilogueNormLayer) of FP8 linears against the plain layers.
_EPILOGUE_SCRIPT = textwrap.dedent("""
    import json, os, sys, tempfile, types
    import torch, torch.nn.functional as F
    from triton_interpreter_shims import patch_interpreter
    patch_interpreter()
    from inferneo.kernels.scaled_row import RowScale, ScaledRow
    from inferneo.kernels.triton_fp8_gemv import (fp8_gemv, fp8_gemv_silu_mul, fp8_residual_norm, h2_epilogue_tile,
                                                  scaled_half)
    from inferneo.quantization.fp8_math import dequantize, quantize_groups, quantize_per_tensor

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    def quantized(w, kind):
        q, s = quantize_per_tensor(w) if kind == "tensor" else quantize_groups(w)
        return q, (s if kind == "tensor" else s.reshape(-1)), dequantize(q, s)

    torch.manual_seed(0)
    eps = 1e-5
    close = lambda a, b: torch.allclose(a.float(), b.float(), rtol=2.0 ** -7, atol=0.0)
    for kind in ("tensor", "row"):
        for hidden, config in ((64, (8, 64, 4, "h2")), (72, (16, 128, 2, "h2"))):  # whole / masked output tiles
            qp, sp, _ = quantized(torch.randn(hidden, 304) * 0.05, kind)
            qc, sc, wc = quantized(torch.randn(48, hidden) * 0.05, kind)
            qg, sg, wg = quantized(torch.randn(2 * 24, hidden) * 0.05, kind)
            x = torch.randn(1, 304).bfloat16()
            residual = (4 * torch.randn(1, hidden)).bfloat16()
            nw = (1 + 0.3 * torch.randn(hidden)).bfloat16()
            total = (fp8_gemv(x, qp, sp, config=config).float() + residual.float()).bfloat16()
            held = residual.clone()
            scaled, sums = fp8_residual_norm(x, qp, sp, held, nw, config=config)
            assert close(held, total), "the residual sum, in place"
            assert close(scaled, (held.float() * nw.float()).bfloat16())
            block_n = config[0]
            assert sums.shape == (-(-hidden // block_n),) and sums.dtype == torch.float32
            per_tile = F.pad(held.float()[0] ** 2, (0, sums.numel() * block_n - hidden)).view(-1, block_n).sum(1)
            assert torch.allclose(sums, per_tile, rtol=1e-6), (sums, per_tile)
            again, half = residual.clone(), torch.full((1, hidden), float("nan"), dtype=torch.float16)
            scaled2, sums2 = fp8_residual_norm(x, qp, sp, again, nw, config=config, x_half=scaled_half(x),
                                               half_out=half)
            assert torch.equal(scaled2, scaled) and torch.equal(sums2, sums) and torch.equal(again, held)
            assert torch.equal(half, scaled_half(scaled))
            # the residual and norm weight read at the start (EARLY_RES, a benchmark's variant): the same bits
            import inferneo.kernels.triton_fp8_gemv as fg
            plain_arguments = fg.epilogue_arguments
            fg.epilogue_arguments = lambda r, n: dict(plain_arguments(r, n), EARLY_RES=True)
            try:
                early = residual.clone()
                scaled3, sums3 = fp8_residual_norm(x, qp, sp, early, nw, config=config)
            finally:
                fg.epilogue_arguments = plain_arguments
            assert torch.equal(scaled3, scaled) and torch.equal(sums3, sums) and torch.equal(early, held)
            t = held.float()
            normed = ((t * torch.rsqrt((t * t).mean(-1, keepdim=True) + eps)).bfloat16().float()
                      * nw.float()).bfloat16()
            for cc in ((8, 64, 4, "h2"), (4, 32, 2, "h2")):
                y = fp8_gemv(scaled, qc, sc, config=cc, row_scale=RowScale(sums, eps))
                assert y.shape == (1, 48) and y.dtype == torch.bfloat16
                assert rel(y, F.linear(normed.float(), wc)) < 1.5e-2, (kind, cc)
                assert rel(y, fp8_gemv(normed, qc, sc, config=cc)) < 1e-2, (kind, cc)
                assert torch.equal(fp8_gemv(scaled, qc, sc, config=cc, row_scale=RowScale(sums, eps), x_half=half), y)
                act = fp8_gemv_silu_mul(scaled, qg, sg, config=cc, row_scale=RowScale(sums, eps))
                g, u = F.linear(normed.float(), wg).chunk(2, dim=-1)
                assert act.shape == (1, 24) and rel(act, F.silu(g) * u) < 3e-2, (kind, cc, rel(act, F.silu(g) * u))
                act_half = torch.full((1, 24), float("nan"), dtype=torch.float16)
                again = fp8_gemv_silu_mul(scaled, qg, sg, config=cc, row_scale=RowScale(sums, eps), x_half=half,
                                          half_out=act_half)
                assert torch.equal(again, act) and torch.equal(act_half, scaled_half(act))
    # where the h2 kernel does not take the epilogue: refused (an explicit tiling) or None (nothing written)
    qp, sp, _ = quantized(torch.randn(64, 304) * 0.05, "row")
    residual = torch.randn(1, 64).bfloat16()
    before = residual.clone()
    for bad in (lambda: fp8_gemv(torch.randn(1, 304).bfloat16(), qp, sp, config=(8, 64, 4),
                                 row_scale=RowScale(torch.ones(8), eps)),
                lambda: fp8_residual_norm(torch.randn(1, 304).half(), qp, sp, residual, torch.ones(64).half(),
                                          config=(8, 64, 4, "h2")),
                lambda: fp8_residual_norm(torch.randn(1, 304).bfloat16(), qp, sp, torch.randn(1, 63).bfloat16(),
                                          torch.ones(64).bfloat16(), config=(8, 64, 4, "h2")),
                lambda: fp8_residual_norm(torch.randn(1, 304).bfloat16(), qp, sp, residual, torch.ones(64).bfloat16(),
                                          config=(8, 64, 4))):
        try:
            bad()
        except ValueError:
            continue
        raise AssertionError("an epilogue the h2 kernel cannot run was taken")
    assert torch.equal(residual, before)
    assert h2_epilogue_tile(torch.randn(1, 304).bfloat16(), qp, sp, None) is None  # (untuned shape: no h2 tiling)
    assert fp8_residual_norm(torch.randn(1, 304).bfloat16(), qp, sp, residual, torch.ones(64).bfloat16()) is None
    assert torch.equal(residual, before)

    # Decoder layers of FP8 linears (EpilogueNormLayer): three chained layers at one row within the GEMVs' tolerance
    # of the plain layers (RMSNorm kernel, then the GEMVs), every output and down projection but the last layer's
    # down through the producer; the float16 copies on give the same bits; two rows take the plain path, bit for
    # bit; with the switch off no layer changes. A tiling file names h2 tilings for the tiny shapes.
    tilings = {f"{n},{k},1": {"block_n": 8, "block_k": 64, "num_warps": 4, "options": ["h2"]}
               for n, k in ((128, 64), (64, 64), (192, 64), (64, 96))}
    path = os.path.join(tempfile.mkdtemp(), "tilings.json")
    with open(path, "w") as f:
        json.dump({"max_rows": 16, "shapes": tilings}, f)
    os.environ["INFERNEO_FP8_GEMV_CONFIGS"] = path
    from inferneo.kernels import triton_fp8_gemv as fg
    fg._tuned.cache_clear()  # (the tiling file is read once)
    import copy
    from torch import nn
    from inferneo.kernel_config import KernelConfig
    from inferneo.kernels._triton_elementwise import rms_norm
    from inferneo.model_executor.device_kernels import (EpilogueNormLayer, QuantizedSiluMLP, TritonRMSNorm, _adopt,
                                                        use_epilogue_norm_layers)
    from inferneo.model_executor.layers.basic import RMSNorm
    from inferneo.model_executor.models.llama import MLP, Attention, DecoderLayer
    from inferneo.quantization.base import LinearShape, QuantizedLinear
    from inferneo.quantization.fp8 import Fp8LinearMethod, Fp8Scheme

    def fp8(name, in_f, shards):
        m = Fp8LinearMethod(Fp8Scheme("channel", None, "dynamic_token", checkpoint=False))
        lin = QuantizedLinear(m, LinearShape(name, in_f, shards), False, torch.bfloat16, torch.device("cpu"))
        lin.weight.data.copy_(torch.randn(sum(shards), in_f) * 0.05)
        m.finalize(lin, KernelConfig())
        lin.fp8_kernel, lin.fp8_gemv, lin.fp8_pdl = "scaled_mm", True, False
        return lin

    ops = types.SimpleNamespace(rms_norm=rms_norm)

    def layer(i):
        attn = Attention.__new__(Attention)  # an attention whose attend_qkv is any function of the q/k/v output
        nn.Module.__init__(attn)
        attn.qkv_proj = fp8(f"layers.{i}.self_attn.qkv_proj", 64, (64, 32, 32))
        attn.o_proj = fp8(f"layers.{i}.self_attn.o_proj", 64, (64,))
        attn.attend_qkv = lambda positions, qkv, kv_cache, metadata: (
            qkv[:, :64] * 0.5 + torch.cat([qkv[:, 64:96], qkv[:, 96:]], dim=-1))
        mlp = MLP(types.SimpleNamespace(hidden_size=64, intermediate_size=96, mlp_bias=False))
        mlp.gate_up_proj = fp8(f"layers.{i}.mlp.gate_up_proj", 64, (96, 96))
        mlp.down_proj = fp8(f"layers.{i}.mlp.down_proj", 96, (64,))
        m = DecoderLayer.__new__(DecoderLayer)
        nn.Module.__init__(m)
        m.self_attn, m.mlp = attn, _adopt(QuantizedSiluMLP, mlp)
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = RMSNorm(64, eps)
            norm.weight.data = (1 + 0.1 * torch.randn(64)).bfloat16()
            setattr(m, name, TritonRMSNorm(norm, ops, False))
        return m

    plain = nn.Module()
    plain.layers = nn.ModuleList([layer(i) for i in range(3)])
    fused = copy.deepcopy(plain)
    for m in fused.modules():
        if isinstance(m, TritonRMSNorm):
            m.ops = ops  # (one namespace, so that its norm launches are counted below)
    os.environ["INFERNEO_FP8_NORM_EPILOGUE"] = "0"
    assert use_epilogue_norm_layers(fused) == 0
    os.environ["INFERNEO_FP8_NORM_EPILOGUE"] = "1"
    assert use_epilogue_norm_layers(fused) == 3 and all(type(m) is EpilogueNormLayer for m in fused.layers)
    assert [l.next_input_norm[0] for l in fused.layers[:-1]] == [l.input_layernorm for l in fused.layers[1:]]

    def run(model, hidden):
        residual = None
        for i, m in enumerate(model.layers):
            hidden, residual = m(None, hidden, residual, None, None)
        return hidden, residual

    launches = {"producer": 0, "norm": 0}
    real_producer, real_norm = fg.fp8_residual_norm, ops.rms_norm
    def counted(kind, real):
        def call(*args, **kwargs):
            launches[kind] += 1
            return real(*args, **kwargs)
        return call
    fg.fp8_residual_norm, ops.rms_norm = counted("producer", real_producer), counted("norm", real_norm)
    for rows in (1, 2):
        hidden = torch.randn(rows, 64).bfloat16()
        want = run(plain, hidden.clone())
        launches.update(producer=0, norm=0)
        os.environ["INFERNEO_FP8_HALF_COPIES"] = "0"
        got = run(fused, hidden.clone())
        if rows == 1:  # the first input norm alone; 5 producers (the last down projection returns a plain row)
            assert launches == {"producer": 5, "norm": 1}, launches
            assert not isinstance(got[0], ScaledRow)
            for g, w in zip(got, want):
                assert rel(g, w) < 3e-2, rel(g, w)
        else:
            assert launches == {"producer": 0, "norm": 6}, launches
            assert all(torch.equal(g, w) for g, w in zip(got, want))
        os.environ["INFERNEO_FP8_HALF_COPIES"] = "1"
        copies = {"x": 0, "out": 0}
        def counting(real):
            def call(*args, **kwargs):
                copies["x"] += kwargs.get("x_half") is not None
                copies["out"] += kwargs.get("half_out") is not None
                return real(*args, **kwargs)
            return call
        reals = fg.fp8_gemv, fg.fp8_gemv_silu_mul, fg.fp8_residual_norm
        fg.fp8_gemv, fg.fp8_gemv_silu_mul, fg.fp8_residual_norm = (counting(r) for r in reals)
        with_copies = run(fused, hidden.clone())
        fg.fp8_gemv, fg.fp8_gemv_silu_mul, fg.fp8_residual_norm = reals
        assert all(torch.equal(c, g) for c, g in zip(with_copies, got)), rows
        # one row: every gate/up, down and q/k/v GEMV but the first q/k/v and the last down reads a copy; every
        # output, gate/up + SiLU and down GEMV but the last down writes one
        assert copies == ({"x": 7, "out": 8} if rows == 1 else {"x": 0, "out": 0}), (rows, copies)
    print("ok")
""")


@needs_triton
def test_fp8_norm_epilogues_under_the_interpreter():
    """The RMSNorm in the FP8 h2 GEMVs' epilogues (``INFERNEO_FP8_NORM_EPILOGUE``): kernels and decoder layers."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    for name in ("INFERNEO_FP8_NORM_EPILOGUE", "INFERNEO_FP8_HALF_COPIES", "INFERNEO_FP8_GEMV_CONFIGS"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-c", _EPILOGUE_SCRIPT], capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]

@needs_triton
def test_fp8_gemv_kernels_and_selection_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_gemv_wanted_on_gpu_kernels_in_half_precision_with_the_switch_on():
    on, off = KernelConfig(fp8_gemv=True), KernelConfig(fp8_gemv=False)
    for kernel in ("scaled_mm", "triton_block"):
        assert gemv_wanted(kernel, on, torch.bfloat16) and gemv_wanted(kernel, on, torch.float16)
        assert not gemv_wanted(kernel, off, torch.bfloat16)
        assert not gemv_wanted(kernel, on, torch.float32)
    assert not gemv_wanted("reference", on, torch.bfloat16)


def _fp8_mlp(hidden: int = 64, inter: int = 96) -> nn.Module:
    from types import SimpleNamespace

    mlp = MLP(SimpleNamespace(hidden_size=hidden, intermediate_size=inter, mlp_bias=False))
    method = Fp8LinearMethod(Fp8Scheme("channel", None, "dynamic_token", checkpoint=False))
    mlp.gate_up_proj = QuantizedLinear(method, LinearShape("mlp.gate_up_proj", hidden, (inter, inter)), False,
                                       torch.bfloat16, torch.device("cpu"))
    return mlp


def test_gpu_transform_fuses_fp8_gate_up_and_silu():
    """On a CUDA device (asked for by name; nothing runs), a plain MLP whose gate/up layer is FP8 becomes a
    ``QuantizedSiluMLP`` when ``gemv_silu`` is on; a full-precision MLP does not."""
    model = nn.ModuleList([_fp8_mlp(), MLP(type("C", (), dict(hidden_size=64, intermediate_size=96,
                                                               mlp_bias=False))())])
    no_gpu_kernels = dict(triton_ops=False, triton_gemv=False, cuda_pdl=False)
    use_device_kernels(model, torch.device("cuda"), KernelConfig(gemv_silu=False, **no_gpu_kernels))
    assert [type(m) for m in model] == [MLP, MLP]
    use_device_kernels(model, torch.device("cuda"), KernelConfig(**no_gpu_kernels))
    assert [type(m) for m in model] == [QuantizedSiluMLP, MLP]
    assert model[0].gate_up_proj.method.name == "fp8"


def test_quantized_silu_mlp_falls_back_when_the_gemv_does_not_apply():
    """Without the GEMV (a CPU layer, or rows above ``max_rows``) ``silu_mul`` declines and the MLP projects, then
    activates: the same numbers as the plain MLP."""
    torch.manual_seed(0)
    mlp = _fp8_mlp().to(torch.bfloat16)
    mlp.gate_up_proj.weight.data.copy_(torch.randn(192, 64) * 0.05)
    mlp.gate_up_proj.method.finalize(mlp.gate_up_proj, KernelConfig())
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    assert mlp.gate_up_proj.method.silu_mul(mlp.gate_up_proj, x) is None
    fused = QuantizedSiluMLP.__new__(QuantizedSiluMLP)
    fused.__dict__.update(mlp.__dict__)
    assert torch.equal(fused(x), mlp(x))


@needs_triton
def test_tiling_file_lookup(tmp_path, monkeypatch):
    """The shipped ``fp8_gemv_configs.json`` parses; a shape's entry is found by ``N,K,BLOCK_M``, others take the
    default; ``max_rows`` comes from the file (the default without one)."""
    import json

    from inferneo.kernels import triton_fp8_gemv as fg

    limit, shapes, _, epilogue = fg._tuned()
    for (n, k), tile in epilogue.items():  # one-row h2 tilings of shapes the GEMV table has
        assert (n, k, 1) in shapes and len(fg.split_tile(tile)[0]) == 3 and "h2" in tile
    assert limit >= 1 and shapes
    for (n, k, block_m), tile in shapes.items():
        numbers, _ = fg.split_tile(tile)
        assert len(numbers) in (3, 4)  # + num_stages: the tensor-core kernel
        block_n, block_k, warps = numbers[:3]
        assert min(n, k, block_n) >= 1 and block_m in (1, 2, 4, 8, 16, 32, 64) and block_k >= 16
        assert warps in (1, 2, 4, 8, 16)
    path = tmp_path / "fp8_gemv_configs.json"
    path.write_text(json.dumps({"max_rows": 2, "shapes": {
        "64,128,2": {"block_n": 8, "block_k": 64, "num_warps": 2},
        "64,128,16": {"block_n": 16, "block_k": 64, "num_warps": 4, "num_stages": 3},
        "64,128,32": {"block_n": 32, "block_k": 64, "num_warps": 4, "num_stages": 3, "options": ["bits"]},
        "32,128,1": {"block_n": 16, "block_k": 256, "num_warps": 4, "num_stages": 5, "options": ["h2p", "pre"]},
        "96,128,1": {"block_n": 2, "block_k": 128, "num_warps": 4, "options": ["h2"]}},
        "epilogue_shapes": {"96,128": {"block_n": 4, "block_k": 128, "num_warps": 8, "options": ["h2"]}},
        "norm_shapes": {"64,128": {"block_n": 16, "block_k": 32, "num_warps": 2}}}))
    monkeypatch.setattr(fg, "CONFIG_FILE", path)
    fg._tuned.cache_clear()
    try:
        assert fg.max_rows() == 2
        assert fg.fp8_gemv_config(64, 128, 2) == (8, 64, 2)
        assert fg.fp8_gemv_config(64, 128, 9) == (16, 64, 4, 3)  # 9 rows: the 16-row block's tensor-core tile
        assert fg.fp8_gemv_config(64, 128, 20) == (32, 64, 4, 3, "bits")  # 20 rows: the 32-row block's tile
        assert fg.tile_to_json((32, 64, 4, 3, "bits")) == {"block_n": 32, "block_k": 64, "num_warps": 4,
                                                           "num_stages": 3, "options": ["bits"]}
        assert fg.fp8_gemv_config(32, 128, 1) == (16, 256, 4, 5, "h2p", "pre")  # the pipelined one-row kernel
        assert fg.tile_to_json((16, 256, 4, 5, "h2p", "pre"))["options"] == ["h2p", "pre"]
        assert fg.fp8_gemv_config(64, 128, 1) == fg.default_config(1)  # another row block: the default
        # launches with an RMSNorm epilogue take their own one-row tiling where the file names one
        assert fg.fp8_gemv_config(96, 128, 1) == (2, 128, 4, "h2")
        assert fg.fp8_epilogue_config(96, 128) == (4, 128, 8, "h2")
        assert fg.fp8_epilogue_config(64, 128) == fg.fp8_gemv_config(64, 128, 1)  # else the GEMV's
        row = torch.randn(1, 128).bfloat16()
        q = torch.randn(96, 128).to(torch.float8_e4m3fn)
        assert fg.h2_epilogue_tile(row, q, torch.ones(96), None, gated=True) == (4, 128, 8)
        assert fg.fp8_norm_gemv_config(64, 128) == (16, 32, 2)  # the norm-fused kernel's own entry
        assert fg.fp8_norm_gemv_config(64, 256) == fg.default_config(1)  # else the GEMV's one-row tiling
        with pytest.raises(ValueError, match="unknown tiling options"):
            fg.split_tile((4, 128, 4, "fast"))
        monkeypatch.setattr(fg, "CONFIG_FILE", tmp_path / "absent.json")
        fg._tuned.cache_clear()
        assert fg.max_rows() == fg.DEFAULT_MAX_ROWS and fg.fp8_gemv_config(64, 128, 2) == fg.default_config(2)
    finally:
        fg._tuned.cache_clear()
