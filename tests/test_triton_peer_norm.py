"""The fused peer all-reduce + residual add + RMSNorm kernel, on CPU under Triton's interpreter (in a subprocess:
the interpreter must be on before triton is imported).

One process plays rank 0 of 2 (or of 4): every rank's staging buffer and flag array live in ordinary memory, the
other ranks' flags for this call are already raised, and the kernel must raise its own flag in every peer's array,
take (reset) the flags it waited for, and produce the sum over ranks plus the residual, normalized, exactly as
NCCL's sum followed by the model's RMSNorm would. The pushed variant is played the same way: the peers' rows are
already in rank 0's receive buffer (plain tensors here), and the kernel must send rank 0's rows into every peer's
buffer, sum, and mark its own buffer empty again. The two-GPU run (``benchmarks/gpu/tp_suite.py``) checks the real
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


_PUSH_SCRIPT = textwrap.dedent("""
    import torch
    from inferneo.kernels.triton_peer_norm import pushed_reduce_add_rms_norm

    EMPTY = -32768  # the bits of a 16-bit -0
    torch.manual_seed(0)
    for world, rows, cols, dtype in ((2, 1, 96, torch.bfloat16), (4, 3, 200, torch.float16)):
        rank = 0
        shares = [torch.randn(rows, cols, dtype=dtype) for _ in range(world)]
        shares[rank][0, :5] = -0.0  # must reach the peers as +0 (-0 means "empty")
        recv = [torch.full((world, rows, cols), -0.0, dtype=dtype) for _ in range(world)]
        words = [r.view(torch.int16) for r in recv]  # the kernel's view of a receive buffer
        for src in range(world):  # the peers have already pushed their rows into rank 0's buffer
            if src != rank:
                recv[rank][src] = shares[src]
        residual = torch.randn(rows, cols, dtype=dtype)
        weight = torch.rand(cols, dtype=dtype) + 0.5
        total = torch.stack([s.float() for s in shares]).sum(0).to(dtype)
        new_residual = (total.float() + residual.float()).to(dtype)
        xf = new_residual.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype).float()
        expected = (weight.float() * normed).to(dtype)

        out = pushed_reduce_add_rms_norm(shares[rank], words, rank, residual, weight, 1e-6)

        torch.testing.assert_close(residual, new_residual, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
        assert recv[rank].view(torch.int16).eq(EMPTY).all(), "rank 0's buffer must be empty again for its next use"
        for peer in range(1, world):  # rank 0's rows arrived in its slot of every peer's buffer, -0 sent as +0
            assert torch.equal(recv[peer][rank], shares[rank]), peer
            assert not recv[peer][rank].view(torch.int16).eq(EMPTY).any(), peer
            others = [src for src in range(world) if src != rank]
            assert recv[peer][others].view(torch.int16).eq(EMPTY).all(), "only rank 0's slot is written"
    print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_pushed_rows_and_their_norm_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", _PUSH_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
