"""The Triton LoRA kernels (``kernels/triton_lora.py``) against the PyTorch batched apply, on CPU under Triton's
interpreter in a subprocess (the interpreter must be switched on before triton is imported): mixed slots and
base-model tokens, few tokens (split reduction) and many, fused-projection widths, float32 and bfloat16; and the
one-row path (the row shrink, the delta in the GEMV's epilogue, the fused gate/up + SiLU GEMV with adapters)
against the batched kernels and the PyTorch apply, alone and inside the LoRA layers."""

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


_ROW_SCRIPT = textwrap.dedent("""
    import numpy as np
    import torch
    import torch.nn.functional as F
    import triton  # noqa: F401  (before the shims)
    from tests.triton_interpreter_shims import patch_interpreter
    patch_interpreter()
    from inferneo.kernels._triton_elementwise import silu_and_mul
    from inferneo.kernels.triton_gemv import gemv, gemv_silu_mul
    from inferneo.kernels.triton_lora import lora_apply_triton, lora_shrink_row
    from inferneo.lora.layers import LoRABatch, lora_apply_torch

    def one_token(slot, num_slots, dtype):
        # the grouping of a one-token step whose token runs ``slot`` (-1: the base model)
        segs = torch.zeros(num_slots + 1, dtype=dtype)
        if slot >= 0:
            segs[slot + 1 :] = 1
        sorted_tokens = torch.zeros(1, dtype=dtype)
        groups = [(slot, torch.tensor([0]))] if slot >= 0 else []
        return LoRABatch(groups, sorted_tokens, segs)

    torch.manual_seed(0)
    # (input width, output rows, LoRA width, slots, dtype, GEMV tiles): odd widths, an input wider than one shrink
    # slice (2048), one output row a program and several
    cases = ((300, 11, 12, 3, torch.bfloat16, (1, 1024, 4)), (2100, 6, 16, 2, torch.float16, (4, 512, 4)),
             (64, 5, 48, 1, torch.bfloat16, (2, 64, 4)))
    for k, n, width, num_slots, dtype, config in cases:
        x = torch.randn(1, k).to(dtype)
        w = (torch.randn(2 * n, k) * 0.05).to(dtype)
        bias = torch.randn(2 * n).to(dtype)
        a = (torch.randn(num_slots, width, k) * 0.1).to(dtype)
        b = (torch.randn(num_slots, 2 * n, width) * 0.1).to(dtype)
        for slot in (-1, 0, num_slots - 1):
            # the engine's static buffers are int64, its eager batches int32
            batch = one_token(slot, num_slots, torch.int32 if slot == 0 else torch.int64)
            lora = lora_shrink_row(x, a, b, batch.seg_starts)
            fused = gemv(x, w, bias, lora=lora, config=config)
            plain = gemv(x, w, bias, config=config)
            if slot < 0:
                assert torch.equal(fused, plain), "a base-model token changed"
            unfused = plain.clone()
            lora_apply_triton(unfused, x, a, b, batch)
            ref = F.linear(x.float(), w.float(), bias.float())
            lora_apply_torch(ref, x.float(), a.float(), b.float(), batch)
            err = ((fused.float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (k, n, width, dtype, slot, err)  # two roundings, as the batched path
            # the batched kernels round s and the output where the epilogue does: at most an ulp apart
            assert torch.allclose(fused.float(), unfused.float(), rtol=1e-2, atol=1e-3), (k, slot, dtype)
            act = gemv_silu_mul(x, w, lora=lora, config=config)
            gate_up = gemv(x, w, config=config)  # the unfused path: projection, batched LoRA kernels, then SiLU-and-mul
            lora_apply_triton(gate_up, x, a, b, batch)
            assert torch.allclose(act.float(), silu_and_mul(gate_up).float(), rtol=1e-2, atol=1e-3)
            gu = F.linear(x.float(), w.float())
            lora_apply_torch(gu, x.float(), a.float(), b.float(), batch)
            g, u = gu.chunk(2, dim=-1)
            exact = F.silu(g) * u
            assert act.shape == (1, n)
            # six roundings to 16 bits (the interpreter truncates to bfloat16): a few per cent from float32
            assert ((act.float() - exact).norm() / exact.norm()).item() < 4e-2, (k, slot, dtype)
            if slot < 0:
                assert torch.equal(act, gemv_silu_mul(x, w, config=config)), "a base token changed (SiLU GEMV)"
    print("ok")
""")

_LAYER_SCRIPT = textwrap.dedent("""
    import copy
    import types
    import torch
    from torch import nn
    import triton  # noqa: F401  (before the shims)
    from tests.triton_interpreter_shims import patch_interpreter
    patch_interpreter()
    from inferneo.kernels import triton_gemv
    from inferneo.kernels.triton_lora import lora_apply_triton
    from inferneo.lora.adapter import LoRATarget
    from inferneo.lora.layers import LoRABatch, LoRAGatedMLP, LoRAState, lora_apply_torch, wrap_lora_layers
    from inferneo.lora.rows import lora_linear_row, lora_silu_mul_row
    from inferneo.model_executor.device_kernels import GemvSiluMLP, _adopt
    from inferneo.model_executor.layers.gpu_linear import DecodeGemv, DecodeLinear
    from inferneo.model_executor.models.llama import MLP

    # The real Triton GEMV kernels; only the device test is left out, so that CPU rows run them here.
    ops = types.SimpleNamespace(gemv=triton_gemv.gemv, gemv_silu_mul=triton_gemv.gemv_silu_mul,
                                gemv_applies=lambda x, w: x.dim() == 2 and x.shape[0] == 1 and x.dtype == w.dtype)
    config = types.SimpleNamespace(hidden_size=48, intermediate_size=40, mlp_bias=False)
    torch.manual_seed(0)
    layer = nn.Module()
    layer.mlp = MLP(config)
    model = nn.Module()
    model.layers = nn.ModuleList([layer])
    ref_model = copy.deepcopy(model)  # float32, plain MLP, PyTorch apply
    model.to(torch.bfloat16)
    gemv = DecodeGemv(ops, pdl=False, silu=True)

    def decode_linears(root):
        # use_decode_linears asks for CUDA weights: swap by hand with the same rule
        for parent in list(root.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, DecodeLinear(child, gemv))

    decode_linears(model)
    layer.mlp = _adopt(GemvSiluMLP, layer.mlp, gemv=gemv)
    targets = {
        "mlp.gate_up_proj": LoRATarget("mlp.gate_up_proj", 48, (("gate_proj", 40), ("up_proj", 40))),
        "mlp.down_proj": LoRATarget("mlp.down_proj", 40, (("down_proj", 48),)),
    }
    state = LoRAState(lora_apply_triton, lora_linear_row, lora_silu_mul_row)
    wrapped = wrap_lora_layers(model, targets, 2, 8, state, torch.bfloat16, torch.device("cpu"))
    assert type(layer.mlp) is LoRAGatedMLP, type(layer.mlp)
    ref_state = LoRAState(lora_apply_torch)
    ref_wrapped = wrap_lora_layers(ref_model, targets, 2, 8, ref_state, torch.float32, torch.device("cpu"))
    assert type(ref_model.layers[0].mlp) is MLP
    calls = []
    for fn in ("linear_row", "silu_mul_row"):
        inner = getattr(state, fn)
        setattr(state, fn, lambda *args, inner=inner, fn=fn: calls.append(fn) or inner(*args))
    for key, lora in wrapped.items():
        pairs = [(torch.randn(8 if i else 5, lora.in_features) * 0.2, torch.randn(width, 8 if i else 5) * 0.2)
                 for i, (_, width) in enumerate(lora.target.shards)]
        lora.set_slot(1, [(p[0].to(torch.bfloat16), p[1].to(torch.bfloat16)) for p in pairs])
        ref_wrapped[key].set_slot(1, [(p[0].to(torch.bfloat16).float(), p[1].to(torch.bfloat16).float())
                                      for p in pairs])
    x = torch.randn(1, 48)
    for slot in (1, -1):
        segs = torch.tensor([0, 0, 1] if slot == 1 else [0, 0, 0], dtype=torch.int64)
        groups = [(1, torch.tensor([0]))] if slot == 1 else []
        state.batch = LoRABatch([], torch.zeros(1, dtype=torch.int64), segs)
        ref_state.batch = LoRABatch(groups) if groups else None
        calls.clear()
        got = layer.mlp(x.to(torch.bfloat16)).float()
        assert calls == ["silu_mul_row", "linear_row"], calls  # the fused row path ran, in both projections
        ref = ref_model.layers[0].mlp(x.to(torch.bfloat16).float())
        err = ((got - ref).norm() / ref.norm()).item()
        assert err < 3e-2, (slot, err)
        if slot == 1:
            state.batch, ref_state.batch = None, None
            base = layer.mlp(x.to(torch.bfloat16)).float()
            assert ((got - base).norm() / base.norm()).item() > 0.05, "the adapter changed nothing"
    # a step without adapter tokens keeps the plain fused GEMV + SiLU; more rows take the batched kernels
    state.batch = None
    calls.clear()
    layer.mlp(x.to(torch.bfloat16))
    assert calls == []
    rows = torch.randn(3, 48)
    state.batch = LoRABatch([], torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 0, 2], dtype=torch.int32))
    ref_state.batch = LoRABatch([(1, torch.tensor([0, 2]))])
    got = layer.mlp(rows.to(torch.bfloat16)).float()
    ref = ref_model.layers[0].mlp(rows.to(torch.bfloat16).float())
    assert ((got - ref).norm() / ref.norm()).item() < 3e-2
    print("ok")
""")


def _run_under_interpreter(script: str) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env,
                          cwd=root)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_lora_kernels_match_the_torch_apply_under_the_interpreter():
    _run_under_interpreter(_SCRIPT)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_one_row_lora_in_the_gemv_epilogue_matches_the_batched_kernels():
    _run_under_interpreter(_ROW_SCRIPT)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_lora_layers_take_the_fused_row_path_and_keep_the_silu_gemv():
    _run_under_interpreter(_LAYER_SCRIPT)
