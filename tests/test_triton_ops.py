"""The fused Triton kernels (RMSNorm + residual, SiLU-and-mul, rotary in place) against the PyTorch path, run on
CPU under Triton's interpreter in a subprocess (the interpreter must be switched on before triton is imported)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

_SCRIPT = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from inferneo.kernels import _triton_elementwise as k
    from inferneo.model_executor.layers.basic import RMSNorm
    from inferneo.model_executor.layers.rotary import RotaryEmbedding

    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.07)):
        x, r = torch.randn(5, 96, dtype=dtype), torch.randn(5, 96, dtype=dtype)
        norm = RMSNorm(96, 1e-5).to(dtype)
        norm.weight.data = torch.rand(96).to(dtype) + 0.5
        ref = norm(x.clone())
        assert torch.allclose(k.rms_norm(x.clone(), None, norm.weight, 1e-5).float(), ref.float(), atol=tol)
        ref_out, ref_res = norm(x.clone(), r.clone())
        res = r.clone()
        out, res_out = k.rms_norm(x.clone(), res, norm.weight, 1e-5)
        assert res_out is res, "the residual is updated in place"
        assert torch.allclose(out.float(), ref_out.float(), atol=tol)
        assert torch.allclose(res.float(), ref_res.float(), atol=tol)

        g = torch.randn(7, 160, dtype=dtype)
        gate, up = g.chunk(2, dim=-1)
        assert torch.allclose(k.silu_and_mul(g).float(), (F.silu(gate) * up).float(), atol=tol)

        heads, kv_heads, dim, n = 4, 2, 16, 6
        rot = RotaryEmbedding(dim, 64, 10000.0)
        qkv = torch.randn(n, (heads + 2 * kv_heads) * dim, dtype=dtype)
        pos = torch.tensor([0, 3, 5, 7, 63, 1])
        q, key, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        ref_q, ref_k = rot(pos, q.reshape(n, heads, dim), key.reshape(n, kv_heads, dim))
        got = qkv.clone()
        k.rotary_inplace(got, pos, rot.cos_cache, rot.sin_cache, heads + kv_heads, dim)
        assert torch.allclose(got[:, : heads * dim].reshape(n, heads, dim).float(), ref_q.float(), atol=tol)
        kv_end = (heads + kv_heads) * dim
        assert torch.allclose(got[:, heads * dim : kv_end].reshape(n, kv_heads, dim).float(), ref_k.float(), atol=tol)
        assert torch.equal(got[:, kv_end:], qkv[:, kv_end:]), "values are not rotated"
    print("ok")
""")


def test_fused_kernels_match_the_pytorch_path():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_cuda_ops_are_only_used_for_cuda_tensors():
    import torch

    from inferneo.kernels.triton_ops import cuda_ops_for

    assert cuda_ops_for(torch.zeros(2)) is None
