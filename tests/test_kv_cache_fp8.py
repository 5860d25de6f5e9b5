"""``--kv-cache-dtype fp8``: float8 e4m3 keys and values with per-head scales (``inferneo.attention.fp8_kv``).

Each backend's FP8 path is checked against the PyTorch reference attention on the de-quantized keys and values
(``check_cases.compare_fp8_backend``), with the stored bytes equal to PyTorch's own quantization; the Triton
kernels run under Triton's interpreter in a subprocess (``TRITON_INTERPRET`` must be set before triton is
imported). Engine-level: the block count for the same KV memory, checkpoint scales loaded and used, backends
that cannot store FP8 refused, and the greedy agreement of the default model with an FP8 cache against its
float32 cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from parity_fixture import copy_parity_model, pattern_prompts
from safetensors.torch import load_file, save_file

from inferneo import LLM, SamplingParams
from inferneo.attention import get_attention_backend
from inferneo.attention.check_cases import (
    STANDARD_CASES,
    VARIANT_OPTIONS,
    build_step,
    compare_fp8_backend,
    fp8_case_scales,
    relative_error,
    variant_options,
)
from inferneo.attention.fp8_kv import FP8_KV_DTYPE, KVCacheScales, dequantize_kv, quantize_kv
from inferneo.kernels.cpu import load_cpu_kernels
from inferneo.quantization.kv_cache import CheckpointKVScales, check_fp8_kv_cache_supported
from inferneo.testing.agreement import greedy_agreement

TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 1.5e-2}


def _cpu_or_skip(name: str):
    if name == "cpu" and load_cpu_kernels() is None:
        pytest.skip("the native CPU kernels do not build here")
    return get_attention_backend(name)


def rounding_sweep() -> torch.Tensor:
    """float32 values that exercise e4m3 rounding: every e4m3 value and the midpoints between neighbours (ties to
    even), just above and below them, subnormals, +-0, and values past 448 (saturation)."""
    grid = torch.arange(256, dtype=torch.uint8).view(FP8_KV_DTYPE).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    values = torch.cat([grid, mids, mids * (1 + 2**-12), mids * (1 - 2**-12), torch.tensor([-0.0, 465.0, 1e4, -1e4,
                                                                                              2.0**-10, -(2.0**-10)])])
    return values.float()


# ---- backends against the reference on de-quantized keys and values ------------------------------------------


@pytest.mark.parametrize("case", STANDARD_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend_name", ["torch", "cpu"])
def test_fp8_backend_matches_reference_on_dequantized_kv(backend_name, case, dtype):
    backend = _cpu_or_skip(backend_name)
    step = build_step(case, dtype, "cpu")
    out, ref, cache, ref_cache = compare_fp8_backend(backend, step, fp8_case_scales(case.num_kv_heads, "cpu"))
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8)), "stored FP8 bytes differ"
    err = relative_error(out, ref)
    assert err < TOLERANCE[dtype], f"{backend_name} {case.name} {dtype}: relative error {err:.2e}"


@pytest.mark.parametrize("variant", list(VARIANT_OPTIONS))
@pytest.mark.parametrize("backend_name", ["torch", "cpu"])
def test_fp8_backend_variants_match_reference(backend_name, variant):
    """Sliding windows, soft-capping and sinks over an FP8 cache (a mixed decode + prompt step)."""
    backend = _cpu_or_skip(backend_name)
    case = STANDARD_CASES[-1]
    step = build_step(case, torch.float32, "cpu")
    out, ref, _, _ = compare_fp8_backend(backend, step, fp8_case_scales(case.num_kv_heads, "cpu"),
                                         **variant_options(variant, case.num_heads))
    assert relative_error(out, ref) < TOLERANCE[torch.float32]


def test_fp8_store_rounds_like_pytorch():
    """The native store quantizes every value of the sweep to PyTorch's e4m3 bytes (ties to even, subnormals,
    -0.0, saturation at +-448), with a per-head scale."""
    kernels = load_cpu_kernels()
    if kernels is None:
        pytest.skip("the native CPU kernels do not build here")
    values = rounding_sweep()
    head_dim = 16
    n = (values.numel() + head_dim - 1) // head_dim
    k = torch.zeros(n * head_dim)
    k[: values.numel()] = values
    k = k.view(n, 1, head_dim).expand(n, 2, head_dim).contiguous()
    k[:, 1] *= 0.375  # the second head: its own scale
    scales = KVCacheScales(torch.tensor([1.0, 0.375]), torch.tensor([0.5, 2.0]))
    cache = torch.zeros(2, 2, n, 16 * head_dim, dtype=FP8_KV_DTYPE)  # one token per block: the layout's key transpose
    kernels.store_kv(k, -k, cache, torch.arange(n) * 16, k_scale=scales.k, v_scale=scales.v)
    keys = cache[0].view(torch.uint8).view(2, n, head_dim, 16)[..., 0]  # token 0 of each block
    values_stored = cache[1].view(torch.uint8).view(2, n, 16, head_dim)[:, :, 0]
    assert torch.equal(keys, quantize_kv(k, scales.k).view(torch.uint8).transpose(0, 1))
    assert torch.equal(values_stored, quantize_kv(-k, scales.v).view(torch.uint8).transpose(0, 1))


def test_dequantize_inverts_quantize_on_the_grid():
    """Every finite e4m3 value times a scale comes back exactly; out-of-range values saturate to +-448 * scale."""
    scale = torch.tensor([0.5, 3.0])
    grid = torch.arange(256, dtype=torch.uint8).view(FP8_KV_DTYPE).float()
    grid = grid[torch.isfinite(grid)]
    x = torch.stack([grid * 0.5, grid * 3.0], dim=1)  # [values, heads]
    assert torch.equal(dequantize_kv(quantize_kv(x, scale), scale, torch.float32), x)
    big = torch.tensor([[1e6, -1e6]])
    assert dequantize_kv(quantize_kv(big, scale), scale, torch.float32).tolist() == [[224.0, -1344.0]]


_TRITON_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import torch
    import triton  # noqa: F401  (TRITON_INTERPRET=1: the interpreter)
    from triton_interpreter_shims import patch_interpreter
    patch_interpreter()
    from inferneo.attention.check_cases import (STANDARD_CASES, VARIANT_OPTIONS, AttentionCase, build_step,
        compare_fp8_backend, fp8_case_scales, relative_error, variant_options)
    from inferneo.attention.fp8_kv import FP8_KV_DTYPE, KVCacheScales, quantize_kv
    from inferneo.attention.triton_backend import TritonBackend
    from inferneo.kernels import triton_attention as ops
    from test_kv_cache_fp8 import TOLERANCE, rounding_sweep

    # The store's rounding: every value of the sweep, two heads with their own scales.
    values = rounding_sweep()
    n = (values.numel() + 15) // 16
    k = torch.zeros(n * 16)
    k[: values.numel()] = values
    k = k.view(n, 1, 16).expand(n, 2, 16).contiguous()
    scales = KVCacheScales(torch.tensor([1.0, 0.375]), torch.tensor([0.5, 2.0]))
    cache = torch.zeros(2, n, 2, 16, 16, dtype=FP8_KV_DTYPE)
    ops.store_kv(k, -k, cache, torch.arange(n) * 16, kv_scales=scales)
    assert torch.equal(cache[0, :, :, 0].view(torch.uint8), quantize_kv(k, scales.k).view(torch.uint8)), "keys"
    assert torch.equal(cache[1, :, :, 0].view(torch.uint8), quantize_kv(-k, scales.v).view(torch.uint8)), "values"

    def check(case, dtype, backend, **options):
        step = build_step(case, dtype, "cpu")
        out, ref, cache, ref_cache = compare_fp8_backend(backend, step, fp8_case_scales(case.num_kv_heads, "cpu"),
                                                         **options)
        assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8)), f"{case.name}: stored bytes"
        err = relative_error(out, ref)
        assert err < TOLERANCE[dtype], f"{case.name} {dtype} {options}: relative error {err:.2e}"

    for case in STANDARD_CASES:
        for dtype in (torch.float32, torch.bfloat16):
            check(case, dtype, TritonBackend(prefill_block_m=16))
    check(AttentionCase("split", 8, 2, 64, 16, decode_lens=(1, 16, 70, 130, 200)), torch.float32,
          TritonBackend(decode_splits=3))
    for name in VARIANT_OPTIONS:
        case = STANDARD_CASES[-1]
        check(case, torch.float32, TritonBackend(prefill_block_m=16), **variant_options(name, case.num_heads))
    print("ok")
""")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_fp8_kernels_match_reference_under_the_interpreter():
    """Triton's store (bytes equal to PyTorch's quantization), decode (split and not) and prefill kernels over an
    FP8 cache, with windows, soft-capping and sinks, against the reference on de-quantized keys and values."""
    tests_dir = str(Path(__file__).parent)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, tests_dir], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# ---- the engine ------------------------------------------------------------------------------------------------


def test_fp8_block_count_doubles_against_bf16(tiny_checkpoint_factory, caplog):
    """The same kv_cache_memory holds twice the blocks of bfloat16 (four times float32's); the count is logged."""
    path = str(tiny_checkpoint_factory("llama"))
    blocks = {}
    for dtype, kv in (("float32", "auto"), ("bfloat16", "auto"), ("bfloat16", "fp8"), ("float32", "fp8_e4m3")):
        with caplog.at_level(logging.INFO, logger="inferneo.worker.model_runner"):
            llm = LLM(path, dtype=dtype, kv_cache_dtype=kv, kv_cache_memory="1MiB", load_format="dummy",
                      max_model_len=64, max_num_seqs=256)  # room for 1,024 blocks: the memory decides
        blocks[dtype, kv] = llm.engine.kv_cache.num_blocks
        assert llm.engine.runner.kv_caches[0].dtype == (FP8_KV_DTYPE if kv != "auto" else getattr(torch, dtype))
        assert f"KV cache: {blocks[dtype, kv]} blocks" in caplog.text
    assert blocks["bfloat16", "fp8"] == 2 * blocks["bfloat16", "auto"]
    assert blocks["float32", "fp8_e4m3"] == blocks["bfloat16", "fp8"] == 4 * blocks["float32", "auto"]


def _add_kv_scales(path: Path, scales: dict[str, torch.Tensor]) -> None:
    """Write ``scales`` (checkpoint names) into the checkpoint's safetensors file, beside its weights."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    tensors.update(scales)
    save_file(tensors, file, metadata={"format": "pt"})


def test_checkpoint_kv_scales_are_loaded_and_used(tiny_checkpoint_factory):
    """Per-head k_scale/v_scale, per-tensor ones and an older kv_scale load into the layers, and the FP8 cache
    holds the float32 engine's keys and values divided by them: within half an e4m3 step in layer 0 (whose inputs
    are the same in both engines), within 25% in the later layers (whose inputs drift with the FP8 attention before
    them); ignoring a scale of 0.01-0.05 would be off by 95% or more."""
    path = tiny_checkpoint_factory("llama", num_layers=3)
    heads = 2  # the tiny checkpoint's KV heads
    per_head = torch.tensor([0.02, 0.05])
    _add_kv_scales(path, {
        "model.layers.0.self_attn.k_scale": per_head, "model.layers.0.self_attn.v_scale": per_head.flip(0),
        "model.layers.1.self_attn.k_scale": torch.tensor(0.03), "model.layers.1.self_attn.v_scale": torch.tensor(0.01),
        "model.layers.2.self_attn.kv_scale": torch.tensor([0.04]),
    })
    options = dict(dtype="float32", max_model_len=64, enable_prefix_caching=False)
    prompt = list(range(5, 40))
    greedy = SamplingParams(temperature=0, max_tokens=1)
    # The same block count in both (FP8 blocks take a quarter of the bytes), so the prompt lands in the same blocks.
    reference = LLM(str(path), kv_cache_memory="1MiB", **options)  # kv_cache_dtype auto: the scales are dropped
    reference.generate([prompt], greedy, use_tqdm=False)
    llm = LLM(str(path), kv_cache_dtype="fp8", kv_cache_memory="256KiB", **options)
    llm.generate([prompt], greedy, use_tqdm=False)
    layers = [layer.self_attn.kv_scales for layer in llm.engine.runner.model.layers]
    expected = [(per_head, per_head.flip(0)), (torch.full((heads,), 0.03), torch.full((heads,), 0.01)),
                (torch.full((heads,), 0.04), torch.full((heads,), 0.04))]
    for got, (k_scale, v_scale) in zip(layers, expected, strict=True):
        torch.testing.assert_close(got.k, k_scale, rtol=0, atol=0)
        torch.testing.assert_close(got.v, v_scale, rtol=0, atol=0)
    for i, (cache, ref_cache) in enumerate(zip(llm.engine.runner.kv_caches, reference.engine.runner.kv_caches,
                                               strict=True)):
        # Both caches are in the backend's layout [2, Hkv, blocks, ...]: one scale per half and head.
        scale = torch.stack([layers[i].k, layers[i].v]).view(2, heads, 1, 1)
        got = cache.float() * scale
        assert ref_cache.abs().max() > 0.1
        if i == 0:
            bound = ref_cache.abs() / 16 + scale * 2.0**-10 + 1e-6  # half an e4m3 step: 2^-4 relative, 2^-10 low
            assert (got - ref_cache).abs().le(bound).all()
        else:
            assert relative_error(got, ref_cache) < 0.25, f"layer {i}"


def test_checkpoint_kv_scale_names():
    """The scale names of vLLM, compressed-tensors (current and older) and ModelOpt are taken out of the weights;
    a k_scale/v_scale pair wins over an older kv_scale of the same layer; other tensors pass through."""
    weights = [
        ("model.layers.0.self_attn.kv_scale", torch.tensor(9.0)),
        ("model.layers.0.self_attn.k_scale", torch.tensor(1.0)), ("model.layers.0.self_attn.v_scale", torch.tensor(2.0)),
        ("model.layers.3.self_attn.kv_scale", torch.tensor(8.0)),
        ("model.layers.1.self_attn.k_proj.k_scale", torch.tensor(3.0)),
        ("model.layers.1.self_attn.v_proj.v_scale", torch.tensor(4.0)),
        ("model.layers.2.self_attn.k_proj.output_scale", torch.tensor(5.0)),
        ("model.layers.2.self_attn.v_proj.output_scale", torch.tensor(6.0)),
        ("model.layers.4.self_attn.qkv_proj.k_scale", torch.tensor(10.0)),  # fused q/k/v (Phi-3)
        ("model.layers.4.self_attn.qkv_proj.v_scale", torch.tensor(11.0)),
        ("model.layers.0.self_attn.k_proj.weight_scale", torch.tensor(7.0)),
        ("model.layers.0.self_attn.k_proj.weight", torch.zeros(2, 2)),
    ]
    found = CheckpointKVScales()
    kept = [name for name, _ in found.split(weights)]
    assert kept == ["model.layers.0.self_attn.k_proj.weight_scale", "model.layers.0.self_attn.k_proj.weight"]
    assert {layer: {k: float(v) for k, v in found.layer_scales(layer).items()} for layer in found.scales} == {
        "layers.0.self_attn": {"k": 1.0, "v": 2.0}, "layers.1.self_attn": {"k": 3.0, "v": 4.0},
        "layers.2.self_attn": {"k": 5.0, "v": 6.0}, "layers.3.self_attn": {"k": 8.0, "v": 8.0},
        "layers.4.self_attn": {"k": 10.0, "v": 11.0}}
    scales = KVCacheScales.ones(2, torch.device("cpu"))
    with pytest.raises(ValueError, match="1 or 2"):
        scales.set("k", torch.ones(3))
    with pytest.raises(ValueError, match="finite and positive"):
        scales.set("v", torch.tensor(0.0))


def test_fp8_kv_refused_before_ada(monkeypatch):
    """The device check (its CUDA queries stubbed: no GPU here) refuses compute capability below 8.9 and accepts a
    Hopper GPU."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"compute capability 8.9\+.*NVIDIA A100 has 8.0"):
        check_fp8_kv_cache_supported(torch.device("cuda"), [], "LlamaForCausalLM")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_kv_cache_supported(torch.device("cuda"), [], "LlamaForCausalLM")


def test_fp8_kv_with_tensor_parallelism_equals_one_rank(tiny_checkpoint_factory):
    """Two ranks (gloo) each hold one of the two KV heads in FP8, with that head's scale of the checkpoint's
    per-head k_scale/v_scale: greedy tokens equal one rank's FP8 cache."""
    path = tiny_checkpoint_factory("llama", num_layers=2)
    _add_kv_scales(path, {"model.layers.0.self_attn.k_scale": torch.tensor([0.02, 0.05]),
                          "model.layers.0.self_attn.v_scale": torch.tensor([0.04, 0.03]),
                          "model.layers.1.self_attn.kv_scale": torch.tensor(0.04)})
    options = dict(dtype="float32", max_model_len=128, kv_cache_dtype="fp8", kv_cache_memory="1MiB", num_threads=1)
    prompts = [list(range(5, 40)), [7, 8, 9, 10] * 5]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outputs = []
    for tp in (1, 2):
        llm = LLM(str(path), tensor_parallel_size=tp, **options)
        try:
            runner = llm.engine.runner.driver if tp > 1 else llm.engine.runner
            scales = runner.model.layers[0].self_attn.kv_scales
            expected = ([0.02, 0.05], [0.04, 0.03]) if tp == 1 else ([0.02], [0.04])  # rank 0: the first head's
            torch.testing.assert_close((scales.k, scales.v), tuple(torch.tensor(e) for e in expected))
            outputs.append([o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)])
        finally:
            llm.shutdown()
    assert outputs[0] == outputs[1]


def test_fp8_kv_refused_for_latent_attention(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory("deepseek_v2")
    with pytest.raises(ValueError, match="kv_cache_dtype fp8 is not supported by the 'mla-torch' attention backend"):
        LLM(str(path), kv_cache_dtype="fp8", load_format="dummy", max_model_len=64)


def test_fp8_kv_on_the_torch_backend_and_unknown_dtype(tiny_checkpoint_factory, monkeypatch):
    """The PyTorch backend (native kernels switched off) runs an FP8 engine too, with the same greedy tokens as
    the native CPU backend's FP8 engine; an unknown kv_cache_dtype is refused by the config."""
    path = str(tiny_checkpoint_factory("llama"))
    prompts = [list(range(5, 5 + n)) for n in (7, 30, 18)]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens = {}
    for native in ("0", "1"):
        if native == "1" and load_cpu_kernels() is None:
            continue
        monkeypatch.setenv("INFERNEO_CPU_KERNELS", native)
        llm = LLM(path, dtype="float32", kv_cache_dtype="fp8", max_model_len=64, max_num_batched_tokens=16)
        tokens[llm.engine.runner.backend.name] = [o.outputs[0].token_ids
                                                  for o in llm.generate(prompts, greedy, use_tqdm=False)]
    assert "torch" in tokens and all(t == tokens["torch"] for t in tokens.values())
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        LLM(path, kv_cache_dtype="int8")


def test_trained_parity_model_greedy_agreement_fp8_vs_bf16_kv(tmp_path):
    """The trained parity model (``tests/data/parity-llama``, written by ``benchmarks/gpu/train_parity_fixture.py``:
    wide greedy margins, so a difference is the cache's, not a near-tie's) in bfloat16 with an FP8 KV cache against
    its bfloat16 KV cache: 64 prompts x 40 greedy tokens, free-running, prefix caching and chunked prefill on. At
    least 95% of the tokens agree position-wise, and the same KV memory holds twice the blocks. (The default model's
    figures, with its many near-ties, come from ``benchmarks/kv_fp8_agreement.py``: docs/quantization.md.)"""
    folder = copy_parity_model(tmp_path / "parity-llama")
    options = dict(dtype="bfloat16", max_model_len=256, kv_cache_memory="8MiB", max_num_batched_tokens=48,
                   enable_prefix_caching=True, enable_chunked_prefill=True)
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = pattern_prompts(64)
    runs, blocks = {}, {}
    for kv in ("auto", "fp8"):
        llm = LLM(str(folder), kv_cache_dtype=kv, **options)
        runs[kv] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        blocks[kv] = llm.engine.kv_cache.num_blocks
        llm.shutdown()
    prefix, positional = greedy_agreement(runs["fp8"], runs["auto"])
    print(f"parity model, fp8 KV vs bf16 KV: {positional:.2%} position-wise, {prefix:.2%} before the first "
          f"divergence; blocks {blocks}")
    assert len(prompts) == 64 and all(len(t) == 40 for t in runs["auto"])
    assert positional >= 0.95
    assert blocks["fp8"] == 2 * blocks["auto"]

