"""The per-CPU choice of linear kernels: features read from the CPU, candidates per feature set, the start-up tune
and its cache, the switches, and every kernel this machine runs against ``F.linear``."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inferneo.kernel_config import KernelConfig
from inferneo.kernels.cpu_features import CpuFeatures, cpu_features, features_from_capability, parse_cpuinfo
from inferneo.kernels.cpu_select import (
    LinearKernel,
    LinearShape,
    candidate_kernels,
    cpu_default_dtype,
    missing_features,
    prompt_attention_sdpa_min_tokens,
)
from inferneo.kernels.cpu_tune_cache import TuneCache, TuneKey, TuneResult
from inferneo.model_executor.layers.cpu_linear import (
    PackedLinear,
    PanelEmbedding,
    PanelLinear,
    kernel_built,
    linear_module,
    onednn_available,
    pack_linears,
    panel_kernels,
)
from inferneo.model_executor.layers.cpu_linear_tune import LinearChooser, decode_sample, fastest

P, PM, DNN, T = LinearKernel.PANEL, LinearKernel.PANEL_MATMUL, LinearKernel.ONEDNN, LinearKernel.TORCH
BF16, F32 = torch.bfloat16, torch.float32

# Flag lines as /proc/cpuinfo prints them (abridged to the x86 vector extensions), one per CPU kind.
SAPPHIRE_RAPIDS = ("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "sse4_2 avx f16c fma avx2 avx512f avx512dq "
                   "avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16 avx_vnni amx_bf16 amx_tile amx_int8")
GENOA = ("AMD EPYC 9B14 96-Core Processor", "sse4_2 avx f16c fma avx2 avx512f avx512dq avx512bw avx512vl "
         "avx512_vnni avx512_bf16")
SKYLAKE = ("Intel(R) Xeon(R) CPU @ 2.00GHz", "sse4_2 avx f16c fma avx2 avx512f avx512dq avx512bw avx512vl")
ZEN3 = ("AMD EPYC 7B13", "sse4_2 avx f16c fma avx2")


def features(kind: tuple[str, str]) -> CpuFeatures:
    text = f"processor\t: 0\nmodel name\t: {kind[0]}\nflags\t\t: fpu vme {kind[1]}\n\nprocessor\t: 1\n"
    found = parse_cpuinfo(text)
    assert found is not None and found.model == kind[0]
    return found


def test_cpuinfo_flags_become_a_typed_record():
    amx = features(SAPPHIRE_RAPIDS)
    assert amx.amx_bf16 and amx.avx512_bf16 and amx.avx512f and amx.avx512_core and amx.avx2 and amx.fma
    assert amx.native_bf16 and "amx_int8" in amx.flags and "avx512_fp16" in amx.flags and "fpu" not in amx.flags
    assert features(GENOA).native_bf16 and not features(GENOA).amx_bf16
    assert not features(SKYLAKE).native_bf16 and features(SKYLAKE).avx512_core
    avx2 = features(ZEN3)
    assert avx2.avx2 and avx2.fma and not avx2.avx512f and not avx2.native_bf16
    assert avx2.summary() == "avx2 fma f16c"
    assert parse_cpuinfo("processor : 0\nFeatures : fp asimd\n") is None  # not x86: the PyTorch fallback
    assert features_from_capability("AVX512", "x").avx512_core and not features_from_capability("DEFAULT", "x").flags
    here = cpu_features()
    assert here.model and here is cpu_features()  # read once


@pytest.mark.parametrize(("kind", "dtype", "tied", "expected"), [
    (SAPPHIRE_RAPIDS, BF16, False, [DNN, P, T]),  # AMX: oneDNN first, it alone reaches the tile units
    (SAPPHIRE_RAPIDS, F32, False, [P, DNN, T]),
    (SAPPHIRE_RAPIDS, F32, True, [P, PM, DNN, T]),
    (SAPPHIRE_RAPIDS, BF16, True, [DNN, P, T]),
    (GENOA, BF16, False, [P, DNN, T]),  # AVX512_BF16 without AMX: the panel kernel first
    (GENOA, F32, False, [P, DNN, T]),
    (GENOA, BF16, True, [P, DNN, T]),
    (SKYLAKE, BF16, False, [DNN, T]),  # AVX-512 without the bfloat16 dot product: no bfloat16 panel kernel
    (SKYLAKE, F32, False, [P, DNN, T]),
    (ZEN3, BF16, False, [P, T]),  # AVX2 only: oneDNN packs no bfloat16 weights; the 8-lane panel widens them
    (ZEN3, F32, False, [DNN, P, T]),  # oneDNN's AVX2 float32 first (it won from 16 rows), the tune times both
    (ZEN3, F32, True, [PM, DNN, P, T]),
    (ZEN3, torch.float16, False, [T]),
])
def test_candidates_follow_the_features(kind, dtype, tied, expected):
    assert candidate_kernels(features(kind), dtype, LinearShape(1536, 576, tied)) == expected


def test_candidates_without_the_native_linear_switch():
    assert candidate_kernels(features(GENOA), BF16, LinearShape(64, 64), native_linear=False) == [DNN, T]
    assert candidate_kernels(features(SAPPHIRE_RAPIDS), F32, LinearShape(64, 64, True), native_linear=False) == [
        PM, DNN, T]


def test_missing_features_are_named():
    assert missing_features(P, BF16, features(SKYLAKE)) == "avx512_bf16"
    assert missing_features(P, F32, features(ZEN3)) is None and missing_features(P, BF16, features(ZEN3)) is None
    assert missing_features(P, F32, features(("Intel(R) Xeon(R) CPU E5-2670", "sse4_2 avx"))) == "avx2 and fma and f16c"
    assert "amx_bf16" in missing_features(DNN, BF16, features(ZEN3))
    assert missing_features(DNN, BF16, features(SKYLAKE)) is None and missing_features(T, BF16, features(ZEN3)) is None


@pytest.mark.parametrize(("kind", "checkpoint", "expected"), [
    (SAPPHIRE_RAPIDS, BF16, BF16), (SAPPHIRE_RAPIDS, torch.float16, BF16), (GENOA, BF16, BF16),
    (SKYLAKE, BF16, F32), (ZEN3, BF16, F32), (ZEN3, torch.float16, F32),
    (SAPPHIRE_RAPIDS, F32, F32), (SAPPHIRE_RAPIDS, None, F32),  # a float32 checkpoint stays float32
])
def test_default_dtype_follows_the_hardware(kind, checkpoint, expected):
    assert cpu_default_dtype(features(kind), checkpoint) == expected


def test_engine_default_dtype_on_this_cpu_and_explicit_choices():
    from inferneo.config import EngineConfig

    native = cpu_features().native_bf16
    assert EngineConfig(device="cpu").torch_dtype(BF16) == (BF16 if native else F32)
    assert EngineConfig(device="cpu").torch_dtype(F32) == F32
    assert EngineConfig(device="cpu", dtype="bfloat16").torch_dtype(F32) == BF16  # an explicit --dtype wins
    assert EngineConfig(device="cpu", dtype="float32").torch_dtype(BF16) == F32


def test_fastest_by_geometric_mean_and_ties_to_the_first():
    # the panel kernel at 2x and 1x the best (geometric mean 1.41) beats oneDNN at 1x and 2.5x (1.58)
    assert fastest({DNN: [1.0, 10.0], P: [2.0, 4.0], T: [3.0, 30.0]}) is P
    assert fastest({P: [1.0, 2.0], DNN: [1.0, 2.0]}) is P
    assert fastest({DNN: [5.0], T: [4.0]}) is T
    assert fastest({DNN: [1.03, 2.0], T: [1.0, 1.98]}) is DNN  # within 5%: the first candidate stays


def key(**changes) -> TuneKey:
    fields = dict(cpu_model="AMD EPYC 7B13", cpu_flags="avx2 fma", torch_version="2.13.0+cpu",
                  kernel_source="0123456789ab", threads=2,
                  dtype="float32", shape="960x576", rows=(32, 256), candidates=("onednn", "torch"))
    return TuneKey(**{**fields, **changes})


def test_tune_cache_writes_reads_and_misses_on_another_cpu_or_torch(tmp_path, caplog):
    path = tmp_path / "sub" / "cpu_tune.json"
    TuneCache(path).put(key(), TuneResult("onednn", {"onednn": [1e-4, 1e-3], "torch": [2e-4, 3e-3]}))
    again = TuneCache(path)  # a later start
    assert again.get(key()) == TuneResult("onednn", {"onednn": [1e-4, 1e-3], "torch": [2e-4, 3e-3]})
    for changed in (key(cpu_model="Intel(R) Xeon(R) Platinum 8481C"), key(torch_version="2.14.0+cpu"),
                    key(cpu_flags="avx2 fma avx512f"), key(kernel_source="ba9876543210"), key(threads=8),
                    key(shape="576x576"),
                    key(candidates=("panel", "onednn", "torch"))):
        assert again.get(changed) is None
    TuneCache(path).put(key(dtype="bfloat16"), TuneResult("torch", {}))  # a second entry keeps the first
    assert TuneCache(path).get(key()).kernel == "onednn" and TuneCache(path).get(key(dtype="bfloat16")).kernel == "torch"
    assert json.loads(path.read_text())["version"] == 1
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert TuneCache(path).get(key()) is None
    assert "unreadable" in caplog.text


def test_tune_cache_path_from_the_environment(monkeypatch, tmp_path):
    from inferneo.kernels.cpu_tune_cache import default_cache_path

    monkeypatch.delenv("INFERNEO_CPU_TUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_path() == tmp_path / "inferneo" / "cpu_tune.json"
    monkeypatch.setenv("INFERNEO_CPU_TUNE_CACHE", str(tmp_path / "mine.json"))
    assert default_cache_path() == tmp_path / "mine.json"


def small_model(dtype: torch.dtype = F32, tied: bool = True) -> nn.Module:
    """Two layers of one shape, one of another, and an output head (tied to the embedding when ``tied``)."""
    torch.manual_seed(0)
    model = nn.Module()
    model.embed_tokens = nn.Embedding(300, 64)
    model.layers = nn.ModuleList([nn.Linear(64, 192), nn.Linear(64, 192), nn.Linear(192, 64, bias=False)])
    model.lm_head = nn.Linear(64, 300, bias=False)
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    return model.to(dtype)


def forward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    h = model.embed_tokens(ids)
    h = model.layers[2](torch.relu(model.layers[0](h) + model.layers[1](h)))
    return model.lm_head(h)


def chooser(tmp_path, **switches) -> LinearChooser:
    kernels = KernelConfig(**{"cpu_linear_tune": True, **switches})
    ops = {dtype: panel_kernels(dtype, kernels) for dtype in (F32, BF16)}
    return LinearChooser(kernels, lambda k, d: kernel_built(ops, k, d), cache=TuneCache(tmp_path / "t.json"),
                         decode_rows=4, prefill_rows=16)


def test_the_tune_measures_once_then_reads_the_cache(tmp_path, caplog):
    ids = torch.arange(0, 300, 7)
    model = small_model()
    expected = forward(model, ids)
    first = chooser(tmp_path)
    with caplog.at_level(logging.INFO, logger="inferneo.model_executor.layers.cpu_linear_tune"):
        pack_linears(model, first.kernels, chooser=first)
    choices = {str(c.shape): c for c in first.choices[F32]}
    assert set(choices) == {"192x64", "64x192", "300x64 tied"}
    assert all(c.how == "measured" and set(c.seconds) == {k.value for k in first.candidates(F32, c.shape)}
               for c in choices.values())
    assert {len(times) for times in choices["300x64 tied"].seconds.values()} == {1}  # a head: decode rows only
    assert {len(times) for times in choices["192x64"].seconds.values()} == {2}
    torch.testing.assert_close(forward(model, ids), expected, rtol=1e-5, atol=1e-5)
    log = caplog.text
    # the CPU line is logged once per process: an earlier test's engine may have logged it already
    from inferneo.model_executor.layers import cpu_linear_tune
    cpu_line = f"CPU: {cpu_features().model}, features {cpu_features().summary()}"
    assert cpu_line in log or cpu_line in cpu_linear_tune._logged
    assert "linear kernel for float32:" in log and "measured, ms per call at 4/16 rows" in log

    second = chooser(tmp_path)
    pack_linears(small_model(), second.kernels, chooser=second)
    assert {str(c.shape): (c.kernel, c.how) for c in second.choices[F32]} == {
        shape: (c.kernel, "cached") for shape, c in choices.items()}


def test_switches_force_or_skip_the_tune(tmp_path, caplog, monkeypatch):
    model = small_model(tied=False)
    off = chooser(tmp_path, cpu_linear_tune=False)
    pack_linears(model, off.kernels, chooser=off)
    assert all(c.how in ("tune off", "only") and c.kernel is off.candidates(F32, c.shape)[0]
               for c in off.choices[F32])
    assert not (tmp_path / "t.json").exists()

    forced = chooser(tmp_path, cpu_linear_kernel="torch")
    model = small_model()
    pack_linears(model, forced.kernels, chooser=forced)
    assert all(type(layer) is nn.Linear for layer in [*model.layers, model.lm_head])
    assert {c.how for c in forced.choices[F32]} == {"forced"}

    monkeypatch.setenv("INFERNEO_CPU_LINEAR_KERNEL", "panel")
    panel_forced = chooser(tmp_path, cpu_linear_tune=False)
    assert panel_forced.kernels.cpu_linear_kernel == "panel"
    model = small_model()
    with caplog.at_level(logging.WARNING):
        pack_linears(model, panel_forced.kernels, chooser=panel_forced)
    if panel_kernels(F32) is None:  # a machine without the float32 panel kernel warns and chooses as usual
        assert "INFERNEO_CPU_LINEAR_KERNEL=panel cannot run float32" in caplog.text
        assert {c.how for c in panel_forced.choices[F32]} <= {"tune off", "only"}
    else:
        assert all(isinstance(layer, PanelLinear) for layer in model.layers)

    monkeypatch.setenv("INFERNEO_CPU_LINEAR_KERNEL", "mkl")
    with pytest.raises(ValueError, match="INFERNEO_CPU_LINEAR_KERNEL.*panel-matmul.*got 'mkl'"):
        KernelConfig()
    monkeypatch.setenv("INFERNEO_CPU_LINEAR_KERNEL", "onednn")
    monkeypatch.setenv("INFERNEO_CPU_LINEAR_TUNE", "0")
    assert (KernelConfig().cpu_linear_kernel, KernelConfig().cpu_linear_tune) == ("onednn", False)


def test_decode_sample_streams_past_the_cache():
    layers = [nn.Linear(256, 256) for _ in range(10)]  # 256 KiB each in float32
    assert len(decode_sample(layers, cache_bytes=600 * 1024)) == 5
    assert len(decode_sample(layers, cache_bytes=1 << 30)) == 10
    head = nn.Linear(256, 4096)  # 4 MiB: more than twice 2 x 600 KiB
    (proxy,) = decode_sample([head], cache_bytes=600 * 1024)
    assert (proxy.in_features, proxy.out_features) == (256, 1152)  # 1.2 MiB of rows, a multiple of 64
    assert proxy.weight.data_ptr() == head.weight.data_ptr() and torch.equal(proxy.bias, head.bias[:1152])
    assert decode_sample([head], cache_bytes=4 << 20) == [head]


def _require(kernel: LinearKernel, dtype: torch.dtype) -> None:
    """Skip unless ``kernel`` runs ``dtype`` here, naming the CPU feature (or build) that is missing."""
    if kernel is LinearKernel.PANEL_MATMUL and dtype != F32:
        pytest.skip("panel-matmul is a float32 layout (a tied output head's), with no bfloat16 form")
    lacking = missing_features(kernel, dtype, cpu_features())
    if lacking:
        pytest.skip(f"{kernel.value} in {dtype} needs {lacking}: this CPU ({cpu_features().model}) lacks it")
    if kernel is LinearKernel.PANEL and panel_kernels(dtype, avx2_float32_panel=True) is None:
        pytest.skip("the native CPU kernels did not build here (no compiler?)")
    if kernel is LinearKernel.ONEDNN and not onednn_available(dtype):
        pytest.skip(f"this PyTorch build's oneDNN cannot pack {dtype} weights")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("kernel", list(LinearKernel), ids=lambda k: k.value)
def test_every_kernel_this_cpu_runs_matches_f_linear(kernel, dtype):
    _require(kernel, dtype)
    tied = kernel is LinearKernel.PANEL_MATMUL
    torch.manual_seed(1)
    linear = nn.Linear(96, 200, bias=not tied).to(dtype)
    layer = linear_module(kernel, linear, ops=panel_kernels(dtype), tied=tied)
    tol = 1e-5 if dtype == F32 else 8e-3
    for rows in (1, 7, 32, 256):
        x = torch.randn(rows, 96, dtype=dtype)
        expected = F.linear(x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float())
        torch.testing.assert_close(layer(x).float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_forced_kernels_pack_the_model_as_named(tmp_path, dtype):
    """Each kernel this machine runs, forced for a whole model with a tied head, gives the reference logits."""
    ids = torch.arange(0, 300, 11)
    reference = forward(small_model(dtype), ids).float()
    for kernel in LinearKernel:
        shape = LinearShape(192, 64, tied=kernel is LinearKernel.PANEL_MATMUL)
        if kernel not in chooser(tmp_path).candidates(dtype, shape):
            continue
        model = small_model(dtype)
        forced = chooser(tmp_path, cpu_linear_kernel=kernel.value)
        pack_linears(model, forced.kernels, chooser=forced)
        expected_type = {P: PanelLinear, PM: PanelLinear, DNN: PackedLinear, T: nn.Linear}[kernel]
        if kernel is not LinearKernel.PANEL_MATMUL:  # a float32 layout for tied heads only
            assert all(type(layer) is expected_type for layer in model.layers), kernel
        if type(model.lm_head) is PanelLinear:
            assert type(model.embed_tokens) is PanelEmbedding
        tol = 1e-4 if dtype == F32 else 5e-2
        torch.testing.assert_close(forward(model, ids).float(), reference, rtol=tol, atol=tol)


# ---- through the engine -----------------------------------------------------------------------------------------


def test_engine_with_the_tune_on_keeps_hf_greedy_tokens(tiny_checkpoint_factory, monkeypatch, tmp_path, caplog):
    """The default start-up path (candidates measured, the choice cached and logged) gives Hugging Face's float32
    tokens; a second engine reads the choice from the cache."""
    from test_hf_parity import hf_greedy, mixed_prompts, run_engine

    from inferneo import LLM

    monkeypatch.setenv("INFERNEO_CPU_TUNE_CACHE", str(tmp_path / "tune.json"))
    path = tiny_checkpoint_factory("llama")
    with caplog.at_level(logging.INFO, logger="inferneo.model_executor.layers.cpu_linear_tune"):
        llm = LLM(str(path), dtype="float32", max_num_batched_tokens=64,
                  kernels=KernelConfig(cpu_linear_tune=True, cpu_linear_kernel="auto"))
    assert "linear kernel for float32:" in caplog.text
    assert (tmp_path / "tune.json").exists() == ("measured" in caplog.text)
    prompts = mixed_prompts(6, 300, seed=3)
    assert run_engine(llm, prompts) == [hf_greedy(path, p) for p in prompts]


def _bf16_kernels_here() -> list[LinearKernel]:
    return [k for k in candidate_kernels(cpu_features(), BF16, LinearShape(64, 64))
            if k is LinearKernel.TORCH or (k is LinearKernel.PANEL and panel_kernels(BF16) is not None)
            or (k is LinearKernel.ONEDNN and onednn_available(BF16))]


@pytest.mark.parametrize("kernel", _bf16_kernels_here(), ids=lambda k: k.value)
def test_bfloat16_engine_picks_the_float32_models_greedy_tokens(tiny_checkpoint_factory, kernel):
    """bfloat16 greedy decoding through each bfloat16 kernel this CPU runs: teacher-forced through the same weights
    in float32 (Hugging Face), every token the engine picked is the arg-max or within bfloat16's rounding of it."""
    from test_hf_parity import mixed_prompts, run_engine
    from transformers import AutoModelForCausalLM

    from inferneo import LLM

    path = tiny_checkpoint_factory("llama")
    llm = LLM(str(path), dtype="bfloat16", max_num_batched_tokens=64,
              kernels=KernelConfig(cpu_linear_kernel=kernel.value, cpu_linear_tune=False))
    assert llm.engine.dtype == "bfloat16"
    prompts = mixed_prompts(6, 300, seed=4)
    outputs = run_engine(llm, prompts)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt, tokens in zip(prompts, outputs, strict=True):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
        picked = logits.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)
        gap = logits.max(dim=1).values - picked
        scale = logits.abs().max(dim=1).values
        assert (gap <= 0.03 * scale).all(), (gap, scale)
        assert tokens[0] == int(logits[0].argmax()) or gap[0] <= 0.01 * scale[0]


def test_prompt_attention_takes_sdpa_only_for_bfloat16_on_amx():
    """Fresh prompts of 128 tokens and more take SDPA only where it was measured faster: bfloat16 on AMX-BF16."""
    assert prompt_attention_sdpa_min_tokens(features(SAPPHIRE_RAPIDS), BF16) == 128
    assert prompt_attention_sdpa_min_tokens(features(SAPPHIRE_RAPIDS), F32) is None
    for kind in (GENOA, SKYLAKE, ZEN3):
        for dtype in (BF16, F32):
            assert prompt_attention_sdpa_min_tokens(features(kind), dtype) is None
