"""The Triton LoRA kernels (``kernels/triton_lora.py``) against the PyTorch batched apply, on CPU under Triton's
interpreter in a subprocess (the interpreter must be switched on before triton is imported): mixed slots and
base-model tokens, few tokens (split reduction) and many, fused-projection widths, float32 and bfloat16."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent("""
    import numpy as np
    import torch
    import triton  # noqa: F401  (before the shims)
    from tests.triton_interpreter_shims import patch_interpreter
    patch_interpreter()
    from inferneo.kernels.triton_lora import lora_apply_triton
    from inferneo.lora.layers import LoRABatch, lora_apply_torch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cases = [(5, 1024, 48, 96, 3), (70, 40, 16, 72, 2), (1, 600, 12, 20, 4), (33, 64, 64, 130, 1)]
    for tokens, k, width, n, num_slots in cases:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(tokens, k).to(dtype)
            a = (torch.randn(num_slots, width, k) * 0.1).to(dtype)
            b = (torch.randn(num_slots, n, width) * 0.1).to(dtype)
            base = torch.randn(tokens, n).to(dtype)
            slots = rng.integers(-1, num_slots, tokens)
            slots[0] = num_slots - 1  # at least one adapted token
            groups = [(s, torch.from_numpy(np.flatnonzero(slots == s))) for s in range(num_slots) if (slots == s).any()]
            order = np.argsort(slots, kind="stable")
            order = order[slots[order] >= 0].astype(np.int32)
            segs = np.zeros(num_slots + 1, dtype=np.int32)
            np.cumsum(np.bincount(slots[slots >= 0], minlength=num_slots), out=segs[1:])
            ref = base.clone().float()
            lora_apply_torch(ref, x.float(), a.float(), b.float(), LoRABatch(groups))
            got = base.clone()
            lora_apply_triton(got, x, a, b, LoRABatch([], torch.from_numpy(order), torch.from_numpy(segs)))
            untouched = torch.from_numpy(slots < 0)
            assert torch.equal(got[untouched], base[untouched]), "a base-model token changed"
            err = ((got.float() - ref).norm() / (ref - base.float()).norm()).item()
            assert err < (2e-2 if dtype == torch.bfloat16 else 1e-5), (tokens, k, width, n, dtype, err)
    print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_lora_kernels_match_the_torch_apply_under_the_interpreter():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=600, env=env,
                          cwd=root)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
