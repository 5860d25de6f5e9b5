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


def test_triton_ops_only_for_cuda_models_with_the_switch_on(monkeypatch):
    import torch

    from inferneo.kernel_config import KernelConfig
    from inferneo.kernels.triton_ops import triton_ops_for

    monkeypatch.setenv("INFERNEO_TRITON_OPS", "0")  # the default only: the engine's KernelConfig decides
    assert triton_ops_for(torch.device("cpu"), KernelConfig(triton_ops=True)) is None
    assert triton_ops_for(torch.device("cuda"), KernelConfig(triton_ops=True)) is not None
    assert triton_ops_for(torch.device("cuda"), KernelConfig(triton_ops=False)) is None
    assert triton_ops_for(torch.device("cuda")) is None


_QK_NORM_SCRIPT = textwrap.dedent("""
    import os
    import torch
    from inferneo.attention.fp8_kv import FP8_KV_DTYPE, KVCacheScales
    from inferneo.kernels import _triton_elementwise as k
    from inferneo.kernels.triton_attention import store_kv
    from inferneo.model_executor.layers.basic import GemmaRMSNorm, RMSNorm
    from inferneo.model_executor.layers.rotary import RotaryEmbedding

    torch.manual_seed(0)
    cases = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 0.02, 0.02)]
    shapes = [(1, 4, 2, 64, RMSNorm), (3, 8, 2, 128, RMSNorm), (5, 6, 1, 64, RMSNorm), (2, 4, 4, 128, GemmaRMSNorm),
              (3, 6, 2, 96, RMSNorm)]  # (Phi-3's head size: not a power of two)
    for dtype, rtol, atol in cases:
        for n, heads, kv_heads, dim, norm_cls in shapes:
            rot = RotaryEmbedding(dim, 512, 10000.0)
            q_norm, k_norm = norm_cls(dim, 1e-6).to(dtype), norm_cls(dim, 1e-6).to(dtype)
            for norm in (q_norm, k_norm):
                norm.weight.data = (torch.rand(dim) + 0.5).to(dtype)
            qkv = (3 * torch.randn(n, (heads + 2 * kv_heads) * dim)).to(dtype)
            pos = torch.randperm(500)[:n] + 7  # not 0..T-1
            q, key, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
            ref_q, ref_k = rot(pos, q_norm(q.reshape(n, heads, dim)), k_norm(key.reshape(n, kv_heads, dim)))
            got = qkv.clone()
            k.qk_norm_rotary_inplace(got, pos, rot.cos_cache, rot.sin_cache, heads, kv_heads, dim, q_norm.weight,
                                     k_norm.weight, 1e-6, weight_offset=norm_cls is GemmaRMSNorm)
            kv_end = (heads + kv_heads) * dim
            torch.testing.assert_close(got[:, : heads * dim].reshape(n, heads, dim), ref_q, rtol=rtol, atol=atol)
            torch.testing.assert_close(got[:, heads * dim : kv_end].reshape(n, kv_heads, dim), ref_k, rtol=rtol,
                                       atol=atol)
            assert torch.equal(got[:, kv_end:], qkv[:, kv_end:]), "values are untouched"
            # With the paged cache: the same rows, and the cache exactly as store_kv writes it (slot -1 skipped).
            cache = torch.zeros(2, 3, kv_heads, 16, dim, dtype=dtype)
            slots = torch.randperm(48)[:n]
            if n > 1:
                slots[n // 2] = -1
            stored = qkv.clone()
            k.qk_norm_rotary_inplace(stored, pos, rot.cos_cache, rot.sin_cache, heads, kv_heads, dim, q_norm.weight,
                                     k_norm.weight, 1e-6, weight_offset=norm_cls is GemmaRMSNorm, kv_cache=cache,
                                     slot_mapping=slots)
            assert torch.equal(stored, got)
            want = torch.zeros_like(cache)
            store_kv(got[:, heads * dim : kv_end].reshape(n, kv_heads, dim), got[:, kv_end:].reshape(n, kv_heads, dim),
                     want, slots)
            assert torch.equal(cache, want) and cache.any()
            # the default reads positions, rotary rows, weights and slots before the PDL wait; none: the same bits
            os.environ["INFERNEO_PREWAIT_LOADS"] = "none"
            early, early_cache = qkv.clone(), torch.zeros_like(cache)
            k.qk_norm_rotary_inplace(early, pos, rot.cos_cache, rot.sin_cache, heads, kv_heads, dim, q_norm.weight,
                                     k_norm.weight, 1e-6, weight_offset=norm_cls is GemmaRMSNorm,
                                     kv_cache=early_cache, slot_mapping=slots)
            del os.environ["INFERNEO_PREWAIT_LOADS"]
            assert torch.equal(early, got) and torch.equal(early_cache, cache)
            for forced in ("2", "5", "64"):  # a token's heads over several programs (at most one a head): same bits
                os.environ["INFERNEO_ROTARY_HEAD_GROUPS"] = forced
                split, split_cache = qkv.clone(), torch.zeros_like(cache)
                k.qk_norm_rotary_inplace(split, pos, rot.cos_cache, rot.sin_cache, heads, kv_heads, dim,
                                         q_norm.weight, k_norm.weight, 1e-6, weight_offset=norm_cls is GemmaRMSNorm,
                                         kv_cache=split_cache, slot_mapping=slots)
                del os.environ["INFERNEO_ROTARY_HEAD_GROUPS"]
                assert torch.equal(split, got) and torch.equal(split_cache, cache), forced
            # An FP8 cache with per-head scales: the same bytes as store_kv's, the rows unchanged.
            scales = KVCacheScales(torch.rand(kv_heads) + 0.25, torch.rand(kv_heads) + 0.25)
            fp8, fp8_want = (torch.zeros(2, 3, kv_heads, 16, dim, dtype=FP8_KV_DTYPE) for _ in range(2))
            rows = qkv.clone()
            k.qk_norm_rotary_inplace(rows, pos, rot.cos_cache, rot.sin_cache, heads, kv_heads, dim, q_norm.weight,
                                     k_norm.weight, 1e-6, weight_offset=norm_cls is GemmaRMSNorm, kv_cache=fp8,
                                     slot_mapping=slots, kv_scales=scales)
            store_kv(got[:, heads * dim : kv_end].reshape(n, kv_heads, dim), got[:, kv_end:].reshape(n, kv_heads, dim),
                     fp8_want, slots, kv_scales=scales)
            assert torch.equal(rows, got)
            assert torch.equal(fp8.view(torch.uint8), fp8_want.view(torch.uint8)) and fp8.view(torch.uint8).any()
            # The rotary kernel without norms (Llama's layers) writes the cache the same way, both cache kinds.
            ref_q, ref_k = rot(pos, q.reshape(n, heads, dim), key.reshape(n, kv_heads, dim))
            for fp8_cache in (False, True):
                plain = qkv.clone()
                k.rotary_inplace(plain, pos, rot.cos_cache, rot.sin_cache, heads + kv_heads, dim)
                rotated = qkv.clone()
                cache_dtype = FP8_KV_DTYPE if fp8_cache else dtype
                cache, want = (torch.zeros(2, 3, kv_heads, 16, dim, dtype=cache_dtype) for _ in range(2))
                k.rotary_inplace(rotated, pos, rot.cos_cache, rot.sin_cache, heads + kv_heads, dim,
                                 num_q_heads=heads, kv_cache=cache, slot_mapping=slots,
                                 kv_scales=scales if fp8_cache else None)
                assert torch.equal(rotated, plain)
                torch.testing.assert_close(plain[:, : heads * dim].reshape(n, heads, dim), ref_q, rtol=rtol,
                                           atol=atol)
                torch.testing.assert_close(plain[:, heads * dim : kv_end].reshape(n, kv_heads, dim), ref_k,
                                           rtol=rtol, atol=atol)
                store_kv(plain[:, heads * dim : kv_end].reshape(n, kv_heads, dim),
                         plain[:, kv_end:].reshape(n, kv_heads, dim), want, slots,
                         kv_scales=scales if fp8_cache else None)
                as_bytes = (lambda c: c.view(torch.uint8)) if fp8_cache else (lambda c: c)
                assert torch.equal(as_bytes(cache), as_bytes(want)) and as_bytes(cache).any()
                for forced in ("1", "2", "64"):  # a token's heads in one program, two, one a head: same bytes
                    os.environ["INFERNEO_ROTARY_HEAD_GROUPS"] = forced
                    again, again_cache = qkv.clone(), torch.zeros_like(cache)
                    k.rotary_inplace(again, pos, rot.cos_cache, rot.sin_cache, heads + kv_heads, dim,
                                     num_q_heads=heads, kv_cache=again_cache, slot_mapping=slots,
                                     kv_scales=scales if fp8_cache else None)
                    del os.environ["INFERNEO_ROTARY_HEAD_GROUPS"]
                    assert torch.equal(again, plain) and torch.equal(as_bytes(again_cache), as_bytes(cache)), forced
            try:
                k.rotary_inplace(qkv.clone(), pos, rot.cos_cache, rot.sin_cache, heads + kv_heads, dim,
                                 kv_cache=cache, slot_mapping=slots)
            except ValueError as e:
                assert "num_q_heads" in str(e)
            else:
                raise AssertionError("writing the cache without num_q_heads must be refused")
    print("ok")
""")


def test_fused_qk_norm_rotary_matches_the_norm_and_rotary_modules():
    """The q/k norm + rotary kernel against the modules, and the cache it (and the rotary kernel without norms)
    writes against ``store_kv``'s bytes: model-dtype and FP8 caches, skipped slots."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _QK_NORM_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_rotary_head_groups_rule(monkeypatch):
    """How many programs a token's heads take when the rotary kernel writes the cache: under 16 tokens, the q/k
    norm + rotary kernel two heads a program (Qwen3-30B-A3B's 36 heads: 18) and the plain rotary kernel enough for
    16 programs, at most one a KV head; one a token from 16 tokens on; ``INFERNEO_ROTARY_HEAD_GROUPS`` forces the
    count, up to one program a head."""
    from inferneo.kernels._triton_elementwise import rotary_head_groups

    monkeypatch.delenv("INFERNEO_ROTARY_HEAD_GROUPS", raising=False)
    assert rotary_head_groups(1, 4, True, 36) == 18
    assert rotary_head_groups(4, 8, True, 40) == 20
    assert rotary_head_groups(16, 4, True, 36) == 1
    assert rotary_head_groups(1, 32, False, 64) == 16 and rotary_head_groups(4, 32, False, 64) == 4
    assert rotary_head_groups(1, 2, False, 10) == 2 and rotary_head_groups(64, 32, False, 64) == 1
    monkeypatch.setenv("INFERNEO_ROTARY_HEAD_GROUPS", "1")
    assert rotary_head_groups(1, 4, True, 36) == 1
    monkeypatch.setenv("INFERNEO_ROTARY_HEAD_GROUPS", "100")
    assert rotary_head_groups(1, 4, True, 36) == 36 and rotary_head_groups(1, 4, False) == 4


# The device transform for a CUDA model, run on CPU tensors under the interpreter: the Triton modules are chosen
# as on a GPU, and the model's logits stay those of the plain PyTorch modules.
_TRANSFORM_SCRIPT = textwrap.dedent("""
    import sys, torch
    from inferneo.kernel_config import KernelConfig
    from inferneo.model_executor.device_kernels import use_device_kernels
    from inferneo.testing.tiny_models import make_tiny_checkpoint
    sys.path.insert(0, sys.argv[2])  # the tests folder
    from test_tensor_parallel_layers import _build, _forward_logits

    for arch in ("llama", "qwen3", "gemma3"):  # no q/k norms; RMSNorm q/k norms; Gemma's offset q/k norms
        model, config = _build(make_tiny_checkpoint(sys.argv[1] + "/" + arch, arch, num_heads=4, num_kv_heads=2))
        expected = _forward_logits(model, config.num_kv_heads, config.head_dim)
        fused_qk = sys.argv[3] == "fused_qk"
        counts = use_device_kernels(model, torch.device("cuda"), KernelConfig(cuda_pdl=False, gemv_silu=True,
                                                                              cuda_fused_qk_norm_rope=fused_qk))
        layers = config.num_layers
        if arch != "gemma3":  # Gemma's norms and GELU MLP stay PyTorch modules
            norms = 2 * layers + 1 + (2 * layers if arch == "qwen3" else 0)
            assert counts["TritonRMSNorm"] == norms and counts["RMSNorm"] == 0, counts
            assert counts["TritonSiluAndMul"] == layers and counts["GemvSiluMLP"] == layers, counts
        # rotary in place on the fused projection; with q/k norms, the norms and rotary in one kernel (switch on)
        assert counts["InplaceRotaryAttention"] == (0 if arch != "llama" else layers), counts
        assert counts["QKNormRotaryAttention"] == (layers if arch != "llama" and fused_qk else 0), counts
        got = _forward_logits(model, config.num_kv_heads, config.head_dim)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
    print("ok")
""")


@pytest.mark.parametrize("qk_norm_rope", ["fused_qk", "plain_qk"])
def test_cuda_transform_chooses_triton_modules_and_keeps_the_logits(tmp_path, qk_norm_rope):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _TRANSFORM_SCRIPT, str(tmp_path), os.path.dirname(__file__),
                           qk_norm_rope], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_early_launch_of_the_norm_and_the_kv_store_follows_its_switch(monkeypatch):
    """INFERNEO_PDL_EARLY_EXTRA (default ``norm,store``): the RMSNorm and KV-store launches ask for the early launch
    (``EARLY``) only with PDL and their part of the switch on; ``none`` turns both off."""
    import torch

    from inferneo import envs
    from inferneo.kernels import _triton_elementwise as elementwise
    from inferneo.kernels import triton_attention

    calls = []

    class Launcher:  # stands in for a Triton kernel: records each launch's keywords
        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append(kw)

    monkeypatch.setattr(elementwise, "_rms_norm_kernel", Launcher())
    monkeypatch.setattr(triton_attention, "_store_kv_kernel", Launcher())
    x, w = torch.randn(2, 64), torch.ones(64)
    k = v = torch.randn(3, 2, 16)
    cache, slots = torch.zeros(2, 4, 2, 16, 16), torch.arange(3)
    for value, norm, store in ((None, True, True), ("none", False, False), ("store", False, True),
                               ("norm", True, False), ("norm,store", True, True)):
        if value is None:
            monkeypatch.delenv("INFERNEO_PDL_EARLY_EXTRA", raising=False)
        else:
            monkeypatch.setenv("INFERNEO_PDL_EARLY_EXTRA", value)
        assert envs.pdl_early_extra() == {name for name, on in (("norm", norm), ("store", store)) if on}
        for pdl in (True, False):
            elementwise.rms_norm(x, None, w, 1e-5, pdl=pdl)
            elementwise.rms_norm(x, x.clone(), w, 1e-5, pdl=pdl)
            triton_attention.store_kv(k, v, cache, slots, pdl=pdl)
            assert [c.get("EARLY", False) for c in calls[-3:]] == [norm and pdl, norm and pdl, store and pdl]


_STORE_SCRIPT = textwrap.dedent("""
    import os
    import torch
    from inferneo.attention.fp8_kv import FP8_KV_DTYPE, KVCacheScales, quantize_kv
    from inferneo.kernels import triton_attention as ops

    torch.manual_seed(0)
    for num_tokens, kv_heads, dim in ((1, 8, 16), (1, 3, 32), (5, 6, 16), (2, 32, 16)):
        k, v = torch.randn(num_tokens, kv_heads, dim), torch.randn(num_tokens, kv_heads, dim)
        slots = torch.randperm(4 * 16)[:num_tokens]
        slots[-1] = -1 if num_tokens > 1 else slots[-1]  # a skipped token
        scales = KVCacheScales(torch.rand(kv_heads) + 0.25, torch.rand(kv_heads) + 0.25)
        for fp8 in (False, True):
            written = []
            for forced in ("", "1", "2", "64"):  # the rule's split, one head a program, two, a whole token
                os.environ["INFERNEO_STORE_KV_HEADS"] = forced
                cache = torch.zeros(2, 4, kv_heads, 16, dim, dtype=FP8_KV_DTYPE if fp8 else torch.float32)
                ops.store_kv(k, v, cache, slots, pdl=False, kv_scales=scales if fp8 else None)
                written.append(cache.view(torch.uint8) if fp8 else cache)
            for other in written[1:]:
                assert torch.equal(written[0], other), (num_tokens, kv_heads, fp8)
            expected = torch.zeros(2, 4, kv_heads, 16, dim, dtype=FP8_KV_DTYPE if fp8 else torch.float32)
            for t, slot in enumerate(slots.tolist()):
                if slot >= 0:  # every other byte of the cache stays zero
                    key = quantize_kv(k[t : t + 1], scales.k)[0] if fp8 else k[t]
                    value = quantize_kv(v[t : t + 1], scales.v)[0] if fp8 else v[t]
                    expected[0, slot // 16, :, slot % 16], expected[1, slot // 16, :, slot % 16] = key, value
            assert torch.equal(written[0], expected.view(torch.uint8) if fp8 else expected), (num_tokens, fp8)
    os.environ["INFERNEO_STORE_KV_HEADS"] = ""  # the rule again
    assert ops.store_kv_heads_per_program(1, 32) == 2 and ops.store_kv_heads_per_program(256, 32) == 32
    assert ops.store_kv_heads_per_program(1, 3) == 1 and ops.store_kv_heads_per_program(4, 8) == 2
    print("ok")
""")


def test_kv_store_writes_the_same_bytes_however_the_heads_are_split():
    """``store_kv`` with a token's heads over several programs (the rule at few tokens, or forced) writes exactly
    the bytes of one program a token: the rows themselves (float32), PyTorch's e4m3 quantization (FP8), no other
    slot, a negative slot skipped; under the interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _STORE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_store_kv_heads_switch_takes_whole_numbers(monkeypatch):
    """INFERNEO_STORE_KV_HEADS: empty or 0 is the rule, a whole number forces it; anything else fails by name."""
    from inferneo import envs

    for value, want in (("", 0), ("0", 0), (" 4 ", 4)):
        monkeypatch.setenv("INFERNEO_STORE_KV_HEADS", value)
        assert envs.store_kv_heads() == want
    for value in ("-2", "two", "1.5"):
        monkeypatch.setenv("INFERNEO_STORE_KV_HEADS", value)
        with pytest.raises(ValueError, match="INFERNEO_STORE_KV_HEADS"):
            envs.store_kv_heads()



def test_decode_prefetch_tiles_switch_takes_whole_numbers(monkeypatch):
    """INFERNEO_DECODE_PREFETCH_TILES: empty is one tile, 0 the whole split, a whole number that many tiles;
    anything else fails by name."""
    from inferneo import envs

    for value, want in (("", 1), ("0", 0), (" 2 ", 2)):
        monkeypatch.setenv("INFERNEO_DECODE_PREFETCH_TILES", value)
        assert envs.decode_prefetch_tiles() == want
    for value in ("-1", "all", "1.5"):
        monkeypatch.setenv("INFERNEO_DECODE_PREFETCH_TILES", value)
        with pytest.raises(ValueError, match="INFERNEO_DECODE_PREFETCH_TILES"):
            envs.decode_prefetch_tiles()

# Prefill and decode steps of a tiny Llama through the CUDA transform with the Triton attention backend (under the
# interpreter): the rotary kernel writes each step's keys and values (no store_kv launch); the logits are the plain
# PyTorch model's (a float32 cache), and with an FP8 cache the logits and cache bytes equal those of the same
# transform with the separate store launch (INFERNEO_CUDA_ROTARY_STORES_KV=0).
_ROTARY_STORE_SCRIPT = textwrap.dedent("""
    import copy, os, sys
    import torch
    from inferneo.attention.fp8_kv import FP8_KV_DTYPE, KVCacheScales
    from inferneo.attention.triton_backend import TritonBackend
    from inferneo.kernel_config import KernelConfig
    from inferneo.kernels import triton_attention
    from inferneo.model_executor.device_kernels import use_device_kernels
    from inferneo.testing.tiny_models import make_tiny_checkpoint
    sys.path.insert(0, sys.argv[2])  # the tests folder
    from paged_decode_steps import generate
    from test_tensor_parallel_layers import _build
    from triton_interpreter_shims import patch_interpreter
    patch_interpreter()

    stores = [0]
    real_store = triton_attention.store_kv

    def counted_store(*args, **kwargs):
        stores[0] += 1
        return real_store(*args, **kwargs)

    triton_attention.store_kv = counted_store

    prompts = [[5, 17, 33, 2, 9, 100, 250, 7], [40, 41, 42, 43, 44]]
    plain, config = _build(make_tiny_checkpoint(sys.argv[1] + "/llama", "llama", num_heads=4, num_kv_heads=2))
    for layer in plain.layers:
        layer.self_attn.backend = TritonBackend(prefill_block_m=16)
    fused = copy.deepcopy(plain)
    counts = use_device_kernels(fused, torch.device("cuda"), KernelConfig(cuda_pdl=False))
    assert counts["InplaceRotaryAttention"] == config.num_layers, counts
    assert all(layer.self_attn.stores_kv for layer in fused.layers)
    steps = 3
    want, _ = generate(plain, prompts, steps)
    forced = [w.argmax(-1) for w in want]
    stores[0] = 0
    got, _ = generate(fused, prompts, steps, forced)
    assert stores[0] == 0, stores  # every step's keys and values were written by the rotary kernel
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
        assert torch.equal(g.argmax(-1), w.argmax(-1))
    for layer in fused.layers:  # an FP8 cache: per-head scales, as the runner sets them
        layer.self_attn.kv_scales = KVCacheScales(torch.rand(config.num_kv_heads) + 0.25,
                                                  torch.rand(config.num_kv_heads) + 0.25)
    stores[0] = 0
    fp8_got, fp8_caches = generate(fused, prompts, steps, forced, FP8_KV_DTYPE)
    assert stores[0] == 0, stores
    os.environ["INFERNEO_CUDA_ROTARY_STORES_KV"] = "0"
    fp8_want, fp8_want_caches = generate(fused, prompts, steps, forced, FP8_KV_DTYPE)
    assert stores[0] == (steps + 1) * config.num_layers, stores  # the switch off: the store launch again
    for g, w in zip(fp8_got, fp8_want):
        assert torch.equal(g, w)
    for c, w in zip(fp8_caches, fp8_want_caches):
        assert torch.equal(c.view(torch.uint8), w.view(torch.uint8))
    print("ok")
""")


def test_rotary_kernel_writes_the_cache_in_decode_steps_of_a_tiny_llama(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("INFERNEO_CUDA_ROTARY_STORES_KV", None)
    proc = subprocess.run([sys.executable, "-c", _ROTARY_STORE_SCRIPT, str(tmp_path), os.path.dirname(__file__)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
