"""The fused peer all-reduce + residual add + RMSNorm kernel, on CPU under Triton's interpreter (in a subprocess:
the interpreter must be on before triton is imported).

One process plays rank 0 of 2 (or of 4): every rank's staging buffer and flag array live in ordinary memory, the
other ranks' flags for this call are already raised, and the kernel must raise its own flag in every peer's array,
take (reset) the flags it waited for, and produce the sum over ranks plus the residual, normalized, exactly as
NCCL's sum followed by the model's RMSNorm would. The two-GPU run (``benchmarks/gpu/tp_suite.py``) checks the real
thing: the barrier across devices and the greedy tokens against TP=1.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent("""
    import torch
    from inferneo.kernels.triton_peer_norm import peer_reduce_add_rms_norm

    MAX_ROWS = 1024  # the flag layout PeerAllReduce uses: [staging buffer][row][source rank]

    def rms_norm(x, w, eps):
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).float()
        return (w.float() * normed).to(x.dtype)

    torch.manual_seed(0)
    for world, rows, cols, dtype, buffer_index in ((2, 3, 96, torch.float32, 0), (2, 70, 64, torch.bfloat16, 1),
                                                   (4, 5, 200, torch.float32, 1)):
        rank = 0
        shares = [torch.randn(rows, cols, dtype=dtype) for _ in range(world)]
        flags = [torch.zeros(2 * MAX_ROWS * world, dtype=torch.int32) for _ in range(world)]
        flag_base = buffer_index * MAX_ROWS * world
        programs = rows  # one per row
        for pid in range(programs):  # the peers have already staged their parts and signalled us
            for peer in range(1, world):
                flags[rank][flag_base + pid * world + peer] = 1
        stage_ptrs = torch.tensor([s.data_ptr() for s in shares], dtype=torch.int64)
        flag_ptrs = torch.tensor([f.data_ptr() for f in flags], dtype=torch.int64)
        residual = torch.randn(rows, cols, dtype=dtype)
        weight = torch.rand(cols, dtype=dtype) + 0.5
        total = torch.stack([s.float() for s in shares]).sum(0).to(dtype)
        new_residual = (total.float() + residual.float()).to(dtype)
        expected = rms_norm(new_residual, weight, 1e-6)

        out = peer_reduce_add_rms_norm(stage_ptrs, flag_ptrs, flag_base, rank, world, rows, residual, weight, 1e-6)

        tol = 1e-5 if dtype == torch.float32 else 2e-2  # the interpreter's bfloat16 casts may round differently
        torch.testing.assert_close(residual, new_residual, rtol=tol, atol=tol)
        torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
        assert int(flags[rank].sum()) == 0, "the flags we waited for must be reset for the next call"
        for peer in range(1, world):  # our flag is raised in every peer's array, once per program, in our slot
            raised = flags[peer].view(2, MAX_ROWS, world)[buffer_index, :programs, rank]
            assert raised.eq(1).all() and int(flags[peer].sum()) == programs, (world, peer)
    print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_fused_reduce_add_norm_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
