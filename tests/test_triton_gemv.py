"""The Triton GEMV for one-row decode steps against ``F.linear``, run on CPU under Triton's interpreter in a
subprocess (the interpreter must be switched on before triton is imported), and the layer that dispatches to it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inferneo.kernel_config import KernelConfig
from inferneo.model_executor.layers.gpu_linear import (
    DecodeGemv,
    DecodeLinear,
    decode_gemv,
    linear,
    use_decode_linears,
)

_SCRIPT = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from inferneo.kernels.triton_gemv import DEFAULT_CONFIG, gemv

    torch.manual_seed(0)
    for n, k in ((37, 300), (64, 1024), (5, 2500)):
        for bias in (False, True):
            for dtype in (torch.bfloat16, torch.float16):
                w = torch.randn(n, k, dtype=dtype)
                x = torch.randn(1, k, dtype=dtype)
                b = torch.randn(n, dtype=dtype) if bias else None
                ref = F.linear(x.float(), w.float(), None if b is None else b.float())
                for config in (DEFAULT_CONFIG, (4, 256, 4), (16, 128, 4)):
                    got = gemv(x, w, b, config=config)
                    assert got.shape == (1, n) and got.dtype == dtype
                    # float32 accumulation, then one rounding to the output dtype (bf16 keeps 8 bits)
                    err = ((got.float() - ref).norm() / ref.norm()).item()
                    assert err < (6e-3 if dtype == torch.bfloat16 else 1e-3), (n, k, bias, dtype, config, err)

    # The gated MLP's gate/up projection with SiLU-and-multiply in one kernel: the same numbers, bit for bit, as
    # the GEMV followed by the SiLU-and-mul kernel (it rounds at the same three places).
    from inferneo.kernels._triton_elementwise import silu_and_mul
    from inferneo.kernels.triton_gemv import gemv_silu_mul
    for d, k in ((37, 300), (64, 1024), (3, 2500)):
        for dtype in (torch.bfloat16, torch.float16):
            w = torch.randn(2 * d, k, dtype=dtype) * 0.05
            x = torch.randn(1, k, dtype=dtype)
            for config in (DEFAULT_CONFIG, (4, 256, 4)):
                fused = gemv_silu_mul(x, w, config=config)
                unfused = silu_and_mul(gemv(x, w, config=config))
                assert fused.shape == (1, d) and fused.dtype == dtype
                assert torch.equal(fused, unfused), (d, k, dtype, config, (fused.float() - unfused.float()).abs().max())
                g, u = F.linear(x.float(), w.float()).chunk(2, dim=-1)
                ref = F.silu(g) * u
                assert ((fused.float() - ref).norm() / ref.norm()).item() < 2e-2

    # The RMSNorm (with or without the residual add) inside the GEMV that reads it: the residual sum exactly as the
    # RMSNorm kernel stores it, the product as that kernel's output through the GEMV (to rounding), inputs unwritten.
    from inferneo.kernels._triton_elementwise import rms_norm
    from inferneo.kernels.triton_gemv import norm_gemv
    for n, k in ((37, 300), (64, 1024), (5, 2500)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            w, nw = torch.randn(n, k, dtype=dtype) * 0.05, (torch.rand(k) + 0.5).to(dtype)
            for residual, bias, config in ((True, False, None), (True, True, (4, 4)), (False, True, (64, 8))):
                x, res = torch.randn(1, k, dtype=dtype), torch.randn(1, k, dtype=dtype) if residual else None
                b = torch.randn(n, dtype=dtype) if bias else None
                x0, res0 = x.clone(), None if res is None else res.clone()
                got, total = norm_gemv(x, res, nw, 1e-6, w, b, config=config)
                assert torch.equal(x, x0) and (res is None or torch.equal(res, res0)), "inputs are not written"
                if residual:
                    normed, want_total = rms_norm(x0.clone(), res0.clone(), nw, 1e-6)
                    assert torch.equal(total, want_total)
                else:
                    normed = rms_norm(x0, None, nw, 1e-6)
                    assert total is None
                want = F.linear(normed.float(), w.float(), None if b is None else b.float())
                err = ((got.float() - want).norm() / want.norm()).item()
                assert got.shape == (1, n) and got.dtype == dtype and err < (6e-3 if dtype != torch.float32 else 1e-6), (
                    n, k, dtype, residual, bias, config, err)
    print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_gemv_matches_linear_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_decode_linear_shares_parameters_and_falls_back_off_the_gpu():
    torch.manual_seed(0)
    layer = nn.Linear(32, 24, bias=True)
    wrapped = DecodeLinear(layer)
    assert wrapped.weight is layer.weight and wrapped.bias is layer.bias
    for rows in (1, 3):
        x = torch.randn(rows, 32)
        assert torch.equal(wrapped(x), layer(x))
        assert torch.equal(linear(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias))
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    assert decode_gemv(torch.device("cpu"), KernelConfig()) is None  # no GEMV for a CPU model
    assert use_decode_linears(model, None) == 0
    gemv = DecodeGemv(object(), pdl=False, silu=True)  # even with a GEMV: CPU weights, nothing swapped
    assert use_decode_linears(model, gemv) == 0
    assert all(type(m) is not DecodeLinear for m in model.modules())


def test_decode_gemv_follows_the_kernel_switches(monkeypatch):
    """The GEMV, its fused SiLU and PDL come from the engine's KernelConfig, not from the process environment."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("INFERNEO_TRITON_GEMV", "0")  # the environment's default only
    cuda = torch.device("cuda", 0)
    on = decode_gemv(cuda, KernelConfig(triton_gemv=True, gemv_silu=False, cuda_pdl=False))
    assert on is not None and (on.silu, on.pdl) == (False, False)
    assert decode_gemv(cuda, KernelConfig(triton_gemv=False)) is None
    assert decode_gemv(cuda) is None  # no switches given: the environment's


def test_gemv_config_lookup(tmp_path, monkeypatch):
    """Tuned shapes take their entry of ``gemv_configs.json``, the others the default; the shipped file parses."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    import json

    from inferneo.kernels import triton_gemv

    shipped = triton_gemv._tuned_configs()
    for (n, k), (block_n, block_k, warps) in shipped.items():
        assert n >= 1 and k >= 1 and block_n >= 1 and block_k >= 16 and warps in (1, 2, 4, 8, 16)
    for (n, k), (block_n, warps) in triton_gemv._tuned_norm_configs().items():  # norm_gemv's ("norm N,K")
        assert n >= 1 and k >= 1 and block_n >= 1 and warps in (1, 2, 4, 8, 16)
    path = tmp_path / "gemv_configs.json"
    path.write_text(json.dumps({"5120,2048": {"block_n": 4, "block_k": 2048, "num_warps": 8},
                                "norm 5120,2048": {"block_n": 16, "num_warps": 4}}))
    monkeypatch.setattr(triton_gemv, "TUNED_CONFIG_FILE", path)
    triton_gemv._tuned_configs.cache_clear()
    triton_gemv._tuned_norm_configs.cache_clear()
    try:
        assert triton_gemv.gemv_config(5120, 2048) == (4, 2048, 8)
        assert triton_gemv.gemv_config(2048, 5120) == triton_gemv.DEFAULT_CONFIG
        assert triton_gemv._tuned_norm_configs() == {(5120, 2048): (16, 4)}
    finally:
        triton_gemv._tuned_configs.cache_clear()
        triton_gemv._tuned_norm_configs.cache_clear()
