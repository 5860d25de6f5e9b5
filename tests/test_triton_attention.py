"""The Triton attention backend equals the PyTorch reference, run on CPU through Triton's interpreter.

``TRITON_INTERPRET`` is read when any ``@triton.jit`` function is decorated (triton's own library functions
included, at ``import triton``) and when an interpreted kernel calls a helper. So this module sets it before
importing triton and keeps it set while its tests run (restored in between). If triton was imported earlier
without it, the module is skipped, and ``test_triton_attention_process.py`` runs it in a process of its own. Two
shims fix interpreter gaps of triton 3.6 with numpy 2: loop bounds loaded from memory (1-element arrays) and
``tl.dot`` on bfloat16 (stored as raw uint16 bits).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys

import numpy as np
import pytest
import torch
from triton_interpreter_shims import patch_interpreter

_ALREADY_IMPORTED = "triton" in sys.modules
_PREVIOUS = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton")
finally:
    if _PREVIOUS is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS
if _ALREADY_IMPORTED and type(triton.language.standard.sum).__name__ != "InterpretedFunction":
    pytest.skip("triton was imported before this module without TRITON_INTERPRET=1; test_triton_attention_process.py runs it in its own process",
                allow_module_level=True)


def _interpreted_kernels():
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        gemv = "inferneo.kernels.triton_fp8_gemv"  # its e4m3 widening, which reads TRITON_INTERPRET at import
        if gemv in sys.modules:
            importlib.reload(sys.modules[gemv])
        name = "inferneo.kernels.triton_attention"
        if name in sys.modules:
            return importlib.reload(sys.modules[name])
        return importlib.import_module(name)
    finally:
        if _PREVIOUS is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _PREVIOUS


patch_interpreter()
ops = _interpreted_kernels()

from inferneo.attention import get_attention_backend  # noqa: E402
from inferneo.attention.check_cases import (  # noqa: E402
    STANDARD_CASES,
    VARIANT_OPTIONS,
    AttentionCase,
    build_step,
    compare_backends,
    compare_fp8_backend,
    relative_error,
    variant_options,
)
from inferneo.attention.fp8_kv import FP8_KV_DTYPE, KVCacheScales, dequantize_kv  # noqa: E402
from inferneo.attention.triton_backend import TritonBackend  # noqa: E402


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


TOLERANCE = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def _check(case: AttentionCase, dtype: torch.dtype, backend: TritonBackend | None = None, seed: int = 0,
           **options):
    step = build_step(case, dtype, "cpu", seed=seed)
    out, ref, cache, ref_cache = compare_backends(backend or TritonBackend(prefill_block_m=16), step, **options)
    assert torch.equal(cache, ref_cache), "new keys/values went to the wrong slots"
    assert torch.isfinite(out).all()
    err = relative_error(out, ref)
    assert err < TOLERANCE[dtype], f"{case.name} {dtype}: relative error {err:.2e}"
    return out, ref


@pytest.mark.parametrize("case", STANDARD_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_reference(case, dtype):
    _check(case, dtype)


@pytest.mark.parametrize("splits", [2, 3, 8])
@pytest.mark.parametrize("group", [1, 4])
def test_split_kv_decode_matches_reference(splits, group):
    """Flash-decoding: contexts cut into splits (some empty for short requests), merged by the reduction."""
    case = AttentionCase("split", 4 * group, 4, 64, 16, decode_lens=(1, 16, 70, 130, 200))
    _check(case, torch.float32, TritonBackend(decode_splits=splits))


@pytest.mark.parametrize("name", ["plain", "window-softcap-sinks"])
@pytest.mark.parametrize("group", [1, 4])
def test_split_merge_inside_the_decode_kernel_equals_the_reduction_kernel(monkeypatch, name, group):
    """INFERNEO_DECODE_FUSED_REDUCE: the last split of each (request, KV head) merges the group's heads in the
    decode kernel; the same output as the separate reduction, bit for bit, and the tickets back at zero."""
    case = AttentionCase("fused-merge", 4 * group, 4, 32, 16, decode_lens=(1, 16, 70, 130, 200))
    options = {} if name == "plain" else variant_options(name, case.num_heads)
    outs = {}
    for fused in ("0", "1"):
        monkeypatch.setenv("INFERNEO_DECODE_FUSED_REDUCE", fused)
        outs[fused] = _check(case, torch.float32, TritonBackend(decode_splits=3), **options)[0]
    assert torch.equal(outs["0"], outs["1"])
    assert not ops._decode_tickets(torch.device("cpu")).any()


@pytest.mark.parametrize("name", ["plain", "window-softcap-sinks"])
@pytest.mark.parametrize("splits", [1, 3])
def test_reads_before_the_wait_leave_decode_unchanged(monkeypatch, name, splits):
    """INFERNEO_PREWAIT_LOADS=decode,reduce against none: the lengths read before the PDL wait (on CUDA also an L2
    prefetch of the first KV tile) and the reduction's partials beside their log-sum-exps give the same output bit
    for bit here (on an H200 ``reduce`` sums in another order: one bf16 ulp apart at 32 requests), groups of 1 and
    4, empty splits included."""
    for group in (1, 4):
        case = AttentionCase("prewait", 4 * group, 4, 32, 16, decode_lens=(1, 16, 70, 130, 200))
        options = {} if name == "plain" else variant_options(name, case.num_heads)
        outs = {}
        for prewait in ("none", "decode,reduce"):
            monkeypatch.setenv("INFERNEO_PREWAIT_LOADS", prewait)
            outs[prewait] = _check(case, torch.float32, TritonBackend(decode_splits=splits), **options)[0]
        assert torch.equal(outs["none"], outs["decode,reduce"])


def test_split_merge_default_one_request_one_query_head_per_kv_head(monkeypatch):
    """Unset, INFERNEO_DECODE_FUSED_REDUCE merges in the decode kernel at one request with one query head per KV
    head only (measured faster for Llama-2-7B on an H200, slower with eight query heads per KV head)."""
    used = []
    monkeypatch.setattr(ops, "_decode_tickets", lambda device: used.append(1) or torch.zeros(4096, dtype=torch.int32))
    monkeypatch.delenv("INFERNEO_DECODE_FUSED_REDUCE", raising=False)
    for heads, kv_heads, batch, env, want in ((4, 4, 1, None, True), (8, 2, 1, None, False), (4, 4, 2, None, False),
                                              (4, 4, 1, "0", False), (8, 2, 2, "1", True)):
        if env is not None:
            monkeypatch.setenv("INFERNEO_DECODE_FUSED_REDUCE", env)
        used.clear()
        q = torch.randn(batch, heads, 32)
        cache = torch.randn(2, 8 * batch, kv_heads, 16, 32)
        tables = torch.arange(8 * batch).reshape(batch, 8)
        lens = torch.full((batch,), 100)
        out = torch.empty_like(q)
        ops.paged_decode(q, cache, tables, lens, 0.2, out, num_splits=3)
        assert bool(used) is want, (heads, kv_heads, batch, env)
        monkeypatch.delenv("INFERNEO_DECODE_FUSED_REDUCE", raising=False)


class _LaunchSpy:
    """Stands in for a Triton kernel: records each launch's grid and keyword arguments, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(dict(kwargs, grid=grid))
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_decode_launch_knob_sets_what_the_call_leaves_unset(monkeypatch):
    """INFERNEO_DECODE_LAUNCH (a benchmark A/B knob) replaces the heuristic's tile, warps, stages and splits, not
    what the caller passes (pairs separated by commas or ``+``); every launch gives the reference's output; a
    malformed value is refused by name."""
    spy = _LaunchSpy(ops._decode_kernel)
    monkeypatch.setattr(ops, "_decode_kernel", spy)
    q = torch.randn(2, 4, 32)
    cache = torch.randn(2, 16, 4, 16, 32)
    tables = torch.arange(16).reshape(2, 8)
    lens = torch.tensor([100, 37])
    outs = {}
    for env, kwargs in (("", {}), ("block_n=16,num_warps=2+num_stages=3,num_splits=4", {}),
                        ("block_n=16+num_warps=2,num_splits=4", {"num_splits": 1, "block_n": 32})):
        monkeypatch.setenv("INFERNEO_DECODE_LAUNCH", env)
        out = torch.empty_like(q)
        ops.paged_decode(q, cache, tables, lens, 0.2, out, **kwargs)
        outs[env, tuple(kwargs)] = out
    default, tuned, explicit = spy.launches
    assert (tuned["BLOCK_N"], tuned["num_warps"], tuned["num_stages"], tuned["grid"][2]) == (16, 2, 3, 4)
    assert (explicit["BLOCK_N"], explicit["num_warps"], explicit["num_stages"], explicit["grid"][2]) == (32, 2, 2, 1)
    assert default["BLOCK_N"] != 16 and default["num_stages"] == 2
    ref = outs["", ()]
    for out in outs.values():
        assert relative_error(out, ref) < 1e-5
    for bad in ("block_n=48", "warps=2", "num_splits=0", "block_n=32;num_warps=2", "num_warps=two"):
        monkeypatch.setenv("INFERNEO_DECODE_LAUNCH", bad)
        with pytest.raises(ValueError, match="INFERNEO_DECODE_LAUNCH"):
            ops.paged_decode(q, cache, tables, lens, 0.2, torch.empty_like(q))


def test_fp8_cache_decode_takes_narrow_tiles_at_a_few_programs_a_sm(monkeypatch):
    """An FP8 cache whose unsplit decode has 1-15 (request, KV head) programs a SM takes 32-token tiles and 2 warps
    (the interpreter counts 8 SMs); fewer programs (the split rule's case), more, a bfloat16 cache, or a tile the
    caller or INFERNEO_DECODE_LAUNCH sets keep the usual launch. Outputs agree with the usual launch's."""
    monkeypatch.delenv("INFERNEO_DECODE_LAUNCH", raising=False)
    spy = _LaunchSpy(ops._decode_kernel)
    monkeypatch.setattr(ops, "_decode_kernel", spy)
    scales = KVCacheScales(torch.full((4,), 2.0**-4), torch.full((4,), 2.0**-3))
    expected = {}
    for batch, fp8, kwargs, narrow in ((4, True, {}, True), (31, True, {}, True), (1, True, {}, False),
                                       (32, True, {}, False), (4, False, {}, False), (4, True, {"block_n": 64}, False)):
        gen = torch.Generator().manual_seed(batch)
        q = torch.randn(batch, 4, 32, generator=gen, dtype=torch.bfloat16)
        cache = torch.randn(2, 8 * batch, 4, 16, 32, generator=gen).to(FP8_KV_DTYPE if fp8 else torch.bfloat16)
        tables = torch.arange(8 * batch).reshape(batch, 8)
        lens = torch.randint(1, 129, (batch,), generator=gen)
        assert ops.narrow_fp8_decode_tiles(cache, batch * 4, 8) is (narrow or bool(kwargs))
        out = torch.empty_like(q)
        ops.paged_decode(q, cache, tables, lens, 0.2, out, kv_scales=scales if fp8 else None, **kwargs)
        launch = spy.launches[-1]
        assert ((launch["BLOCK_N"], launch["num_warps"]) == (32, 2)) is narrow, (batch, fp8, kwargs)
        if narrow:
            usual = torch.empty_like(q)
            ops.paged_decode(q, cache, tables, lens, 0.2, usual, kv_scales=scales, block_n=64, num_warps=4)
            expected[batch] = relative_error(out.float(), usual.float())
    assert max(expected.values()) < 1e-2


def test_fp8_cache_decode_widens_to_float16_for_bfloat16_queries(monkeypatch):
    """``default_fp8_widen``: an FP8 cache read by bfloat16 queries takes the float16 dots (2) in decode launches,
    split or not; a bfloat16 cache, float32 queries and prefill keep 0; ``INFERNEO_FP8_KV_WIDEN`` overrides. The
    launches' outputs agree with widening 0's."""
    monkeypatch.delenv("INFERNEO_FP8_KV_WIDEN", raising=False)
    monkeypatch.delenv("INFERNEO_DECODE_LAUNCH", raising=False)
    spy = _LaunchSpy(ops._decode_kernel)
    monkeypatch.setattr(ops, "_decode_kernel", spy)
    scales = KVCacheScales(torch.full((4,), 2.0**-4), torch.full((4,), 2.0**-3))
    for batch, fp8, dtype, want in ((4, True, torch.bfloat16, 2), (1, True, torch.bfloat16, 2),
                                    (4, False, torch.bfloat16, 0), (4, True, torch.float32, 0)):
        gen = torch.Generator().manual_seed(batch)
        q = torch.randn(batch, 4, 32, generator=gen, dtype=dtype)
        cache = torch.randn(2, 8 * batch, 4, 16, 32, generator=gen).to(FP8_KV_DTYPE if fp8 else dtype)
        tables = torch.arange(8 * batch).reshape(batch, 8)
        lens = torch.randint(1, 129, (batch,), generator=gen)
        out = torch.empty_like(q)
        ops.paged_decode(q, cache, tables, lens, 0.2, out, kv_scales=scales if fp8 else None)
        launch = spy.launches[-1]
        assert launch["WIDEN"] == want and (launch["NUM_SPLITS"] == 1) is (batch > 1), (batch, fp8, dtype, launch)
        assert ops.default_fp8_widen(cache, q) == want
        if want:
            usual = torch.empty_like(q)
            ops.paged_decode(q, cache, tables, lens, 0.2, usual, kv_scales=scales, fp8_widen=0)
            assert relative_error(out.float(), usual.float()) < 1e-2
    cache = torch.zeros(2, 8, 4, 16, 32).to(FP8_KV_DTYPE)
    q = torch.zeros(1, 4, 32, dtype=torch.bfloat16)
    assert ops._prefill_fp8_widen() == 0
    monkeypatch.setenv("INFERNEO_FP8_KV_WIDEN", "0")
    assert ops.default_fp8_widen(cache, q) == 0 and ops._prefill_fp8_widen() == 0
    monkeypatch.setenv("INFERNEO_FP8_KV_WIDEN", "2")
    assert ops._prefill_fp8_widen() == 2
    monkeypatch.setenv("INFERNEO_FP8_KV_WIDEN", "fast")
    with pytest.raises(ValueError, match="INFERNEO_FP8_KV_WIDEN"):
        ops.default_fp8_widen(cache, q)


def _norm_rope_reference(x, w, cos, sin, eps, offset):
    """Per-head RMSNorm (rounded to the model dtype as ``RMSNorm`` does) and rotate-half rotary, in PyTorch."""
    dtype, half = x.dtype, x.shape[-1] // 2
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xn = (normed * (1 + w.float())) if offset else (w.float() * normed.to(dtype).float())
    xn = xn.to(dtype).float()
    a, b = xn[..., :half], xn[..., half:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(dtype)


@pytest.mark.parametrize("variant", ["plain", "window-sinks", "gemma-offset"])
def test_decode_applies_the_qk_norms_and_rotary_itself(variant):
    """``paged_decode(qk_rotary=...)`` on the raw q/k/v projection output: the same attention output as the norms
    and rotary applied first and the new K/V stored first, and the same cache afterwards (the split holding the
    new token writes it); three splits, so that the new token is in the first, second or third of them."""
    torch.manual_seed(0)
    dtype, heads, kv_heads, dim, bs = torch.float32, 8, 2, 32, 16
    lens = torch.tensor([1, 20, 45])
    batch, blocks = len(lens), 4
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim, dtype=dtype)
    q = qkv[:, : heads * dim].view(batch, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(batch, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim :].view(batch, kv_heads, dim)
    cache = torch.randn(2, batch * blocks, kv_heads, bs, dim, dtype=dtype)
    tables = torch.arange(batch * blocks, dtype=torch.int64).flip(0).view(batch, blocks).contiguous()
    positions = lens - 1
    slots = tables[torch.arange(batch), positions // bs] * bs + positions % bs
    angles = torch.arange(64, dtype=torch.float32)[:, None] * (0.1 / (1 + torch.arange(dim // 2)))[None, :]
    cos, sin = angles.cos(), angles.sin()
    qw, kw = 1 + 0.1 * torch.randn(dim), 1 + 0.1 * torch.randn(dim)
    eps, offset = 1e-6, variant == "gemma-offset"
    options = {}
    if variant == "window-sinks":
        options = dict(sliding_window=24, sinks=torch.linspace(-1.0, 2.0, heads))
    # reference: the norms and rotary first, the new K/V into the cache, then the plain decode kernel
    ref_cache = cache.clone()
    q_ref = _norm_rope_reference(q, qw, cos[positions], sin[positions], eps, offset)
    k_ref = _norm_rope_reference(k, kw, cos[positions], sin[positions], eps, offset)
    for b in range(batch):
        block, off = divmod(int(slots[b]), bs)
        ref_cache[0, block, :, off] = k_ref[b]
        ref_cache[1, block, :, off] = v[b]
    ref = torch.empty(batch, heads, dim, dtype=dtype)
    ops.paged_decode(q_ref, ref_cache, tables, lens, dim ** -0.5, ref, num_splits=3, **options)
    got = torch.empty_like(ref)
    rotary = ops.QKRotary(k, v, positions, slots, cos, sin, qw, kw, eps, offset)
    qkv_before = qkv.clone()
    ops.paged_decode(q, cache, tables, lens, dim ** -0.5, got, num_splits=3, qk_rotary=rotary, **options)
    assert torch.equal(qkv, qkv_before)  # the projection output is read, not rotated in place
    torch.testing.assert_close(cache, ref_cache, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_large_group_and_non_power_of_two_shapes():
    """A group of 8 query heads per KV head, a head size (80) and a KV head count (3) padded in the kernels."""
    _check(AttentionCase("gqa8", 16, 2, 64, 16, decode_lens=(3, 40), prefills=((5, 21),)), torch.float32)
    _check(AttentionCase("d80", 4, 2, 80, 16, decode_lens=(3, 40), prefills=((17, 21),)), torch.float32)
    _check(AttentionCase("kv3", 6, 3, 64, 16, decode_lens=(5, 20), prefills=((3, 18),)), torch.float32)


def test_prefill_tiles_of_several_sizes_agree():
    """Spans longer than one query tile, contexts off tile boundaries, and block size 32."""
    case = AttentionCase("tiles", 4, 2, 64, 32, prefills=((0, 70), (50, 45), (64, 64)))
    for block_m in (16, 32, 64):
        _check(case, torch.float32, TritonBackend(prefill_block_m=block_m))


def test_strided_qkv_views_like_the_model_passes():
    """q/k/v as column slices of one fused projection output (row stride larger than the head block)."""
    case = AttentionCase("strided", 4, 2, 64, 16, decode_lens=(9,), prefills=((3, 12),))
    step = build_step(case, torch.float32, "cpu")
    fused = torch.cat([step.q.flatten(1), step.k.flatten(1), step.v.flatten(1)], dim=1)
    q, k, v = fused.split([4 * 64, 2 * 64, 2 * 64], dim=1)
    step.q, step.k, step.v = q.view(-1, 4, 64), k.view(-1, 2, 64), v.view(-1, 2, 64)
    assert not step.q.is_contiguous()
    out, ref, cache, ref_cache = compare_backends(TritonBackend(prefill_block_m=16), step)
    assert torch.equal(cache, ref_cache)
    assert relative_error(out, ref) < TOLERANCE[torch.float32]


def test_split_count_depends_on_shapes_only():
    assert ops.choose_num_splits(128, 32, 1024, 64, 132) == 1  # enough programs already
    assert ops.choose_num_splits(1, 32, 2048, 64, 132) == 16  # about four programs per SM, two tiles each
    assert ops.choose_num_splits(1, 16, 2048, 64, 132) == 16  # two tiles each: still two programs per SM
    assert ops.choose_num_splits(1, 8, 2048, 64, 132) == 32  # two tiles each would leave SMs idle: one each
    assert ops.choose_num_splits(1, 32, 1024, 64, 132) == 8
    assert ops.choose_num_splits(1, 8, 1024, 64, 132) == 16  # at most one split per tile
    assert ops.choose_num_splits(1, 8, 192, 64, 132) == 3
    assert ops.choose_num_splits(1, 8, 16, 16, 132) == 1
    assert ops.choose_num_splits(1, 4, 2048, 64, 132, split_tiles=0) == 32  # four KV heads: one tile a split
    assert ops.choose_num_splits(1, 4, 2048, 64, 132, split_tiles=2) == 16  # the override: two tiles a split
    assert ops.choose_num_splits(32, 4, 2048, 64, 132, split_tiles=2) == 5  # it never adds splits
    assert ops.decode_block_n(16) == 16 and ops.decode_block_n(4096) == 64


def test_registry_and_layout():
    backend = get_attention_backend("triton")
    assert isinstance(backend, TritonBackend) and backend.name == "triton"
    assert backend.kv_cache_shape(10, 16, 2, 64) == (2, 10, 2, 16, 64)
    with pytest.raises(ValueError):
        backend.kv_cache_shape(10, 8, 2, 64)


def test_tiny_model_greedy_tokens_equal_the_torch_backend(tiny_checkpoint_factory, monkeypatch):
    """End to end (float32): the engine's greedy tokens with the Triton backend equal those with the reference,
    over batched decodes, chunked prefill and prefix-cache hits."""
    from inferneo import LLM, SamplingParams
    from inferneo.worker import model_runner

    path = tiny_checkpoint_factory("llama")
    rng = np.random.default_rng(0)
    prefix = rng.integers(5, 300, 20).tolist()
    prompts = [prefix + rng.integers(5, 300, int(n)).tolist() for n in (3, 11, 30)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    results = {}
    for name in ("torch", "triton"):
        monkeypatch.setattr(model_runner, "default_attention_backend", lambda device, kernels, name=name:
                            get_attention_backend(name, device, kernels))
        llm = LLM(str(path), dtype="float32", max_num_batched_tokens=24, enable_prefix_caching=True)
        assert llm.engine.runner.backend.name == name
        results[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm.engine.kv_cache.prefix_cache_hits > 0
    assert results["triton"] == results["torch"]


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("name", list(VARIANT_OPTIONS))
def test_variants_match_reference(name, splits):
    """Windows (decode scans only the window, split or not; prefill tiles over cached context), soft-capping and
    sinks (added once, in the split reduction) against the PyTorch reference."""
    case = AttentionCase("variants", 8, 2, 32, 16, decode_lens=(1, 19, 40, 130),
                         prefills=((0, 45), (23, 30), (70, 5)))
    options = variant_options(name, case.num_heads)
    out, ref = _check(case, torch.float32, TritonBackend(prefill_block_m=16, decode_splits=splits), **options)
    plain = compare_backends(TritonBackend(prefill_block_m=16), build_step(case, torch.float32, "cpu"))[1]
    assert relative_error(ref, plain) > 1e-3  # the option matters on this case


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_variants_in_half_precision(dtype):
    case = AttentionCase("variants-half", 4, 4, 64, 16, decode_lens=(5, 70), prefills=((17, 40),))
    _check(case, dtype, TritonBackend(prefill_block_m=32, decode_splits=2),
           **variant_options("window-softcap-sinks", case.num_heads))


@pytest.mark.parametrize("widen", [0, 1, 2])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("group", [1, 4])
def test_fp8_cache_every_code_against_dequantized_reference(monkeypatch, splits, group, widen):
    """An FP8 (e4m3) cache holding every finite byte code, subnormals and both zeros included, with per-KV-head key
    and value scales: the decode kernel (split and not; one query head per KV head, as Llama-2-7B, and four) and the
    prefill kernel with bfloat16 queries, which widen the bytes by integer operations, against the reference
    attention on the de-quantized cache. The scales are powers of two, so the de-quantized cache is exact in
    bfloat16 and the stored bytes are the drawn codes. ``widen`` (``INFERNEO_FP8_KV_WIDEN``, decode and prefill) 1:
    the candidate widening (same bits); 2: float16 queries and hardware-converted float16 tiles (here their
    plain-Triton twins: the interpreter runs no PTX)."""
    _fp8_code_case(monkeypatch, splits, group, widen)


def _fp8_code_case(monkeypatch, splits: int, group: int, widen: int, q_factor: float = 1.0):
    monkeypatch.setenv("INFERNEO_FP8_KV_WIDEN", str(widen))
    case = AttentionCase("fp8-codes", 4 * group, 4, 64, 16, decode_lens=(1, 16, 70, 130, 200),
                         prefills=((0, 21), (45, 19)))
    step = build_step(case, torch.bfloat16, "cpu", seed=3)
    if q_factor != 1.0:
        step = dataclasses.replace(step, q=step.q * q_factor, scale=step.scale / q_factor)
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 256, step.ref_cache.shape, generator=gen, dtype=torch.uint8)
    codes = torch.where((codes & 0x7F) == 0x7F, codes ^ 0x01, codes)  # 0x7F / 0xFF are e4m3's NaNs
    flat = codes.view(-1)
    flat[:256] = torch.arange(256, dtype=torch.uint8)  # every code at least once...
    flat[0x7F], flat[0xFF] = 0x7E, 0xFE  # ...but the NaNs
    scales = KVCacheScales(torch.tensor([2.0**-6, 2.0**-5, 2.0**-7, 2.0**-6]),
                           torch.tensor([2.0**-4, 2.0**-3, 2.0**-5, 2.0**-2]))
    stored = codes.view(FP8_KV_DTYPE)
    step = dataclasses.replace(step, ref_cache=torch.stack([dequantize_kv(stored[0], scales.k, torch.bfloat16, 0),
                                                            dequantize_kv(stored[1], scales.v, torch.bfloat16, 0)]))
    out, ref, cache, ref_cache = compare_fp8_backend(TritonBackend(prefill_block_m=16, decode_splits=splits), step,
                                                     scales)
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
    untouched = ref_cache.view(torch.uint8) == codes  # the step's new tokens overwrote their own slots only
    assert untouched.float().mean() > 0.9
    assert torch.isfinite(out).all()
    err = relative_error(out, ref)
    assert err < TOLERANCE[torch.bfloat16], f"relative error {err:.2e}"


@pytest.mark.parametrize("q_factor", [2.0**16, 2.0**-12])
def test_fp8_cache_float16_dots_with_large_and_small_queries(monkeypatch, q_factor):
    """``INFERNEO_FP8_KV_WIDEN=2`` makes bfloat16 queries float16 times 2^-4: queries 2^16 times larger than usual
    (beyond float16's range unshifted) or 2^12 times smaller (many of their float16 forms subnormal), with the
    score scale divided by the same factor, still match the reference attention."""
    _fp8_code_case(monkeypatch, 1, 1, 2, q_factor)
