"""Greedy token ids equal Hugging Face transformers' ``generate`` on the same weights (float32).

One table, :data:`ARCHS`, names every supported architecture's tiny checkpoint; every test here runs over all of
them: one prompt, a batch of mixed-length prompts, and the engine's mechanisms forced on (:data:`ENGINE_VARIANTS`:
prefix caching on and off, chunked prefill, preemption under a small KV pool, with and without prefix caching).
Adding an architecture is one line in :data:`ARCHS`. Hugging Face's tokens are computed once per
(checkpoint, prompt) and shared by every test and module that asks for them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from inferneo import LLM, SamplingParams
from inferneo.kernel_config import KernelConfig


@dataclass(frozen=True)
class ParityArch:
    """One architecture under test: ``arch`` and ``checkpoint`` are ``tiny_checkpoint_factory``'s arguments;
    ``modules`` are module type names the engine's model must contain (the model class, FusedMoE, ...)."""

    arch: str
    checkpoint: dict[str, Any] = field(default_factory=dict)
    modules: tuple[str, ...] = ()


_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}
ARCHS = {
    "llama": ParityArch("llama", modules=("LlamaForCausalLM",)),
    "llama-tied": ParityArch("llama", {"tie_word_embeddings": True}),
    "llama3-rope": ParityArch("llama", {"rope_scaling": _LLAMA3_ROPE}),
    "mistral": ParityArch("mistral", modules=("LlamaForCausalLM",)),
    "qwen2": ParityArch("qwen2", modules=("Qwen2ForCausalLM",)),
    "qwen3": ParityArch("qwen3", modules=("Qwen3ForCausalLM",)),
    "phi3": ParityArch("phi3", modules=("Phi3ForCausalLM",)),
    # Gemma: tied like the released Gemma 2; Gemma 3 also with its full layers' rope scaled as in the 4B-27B models.
    "gemma2": ParityArch("gemma2", {"tie_word_embeddings": True}, modules=("Gemma2ForCausalLM", "GemmaRMSNorm")),
    "gemma3": ParityArch("gemma3", modules=("Gemma3ForCausalLM", "GemmaRMSNorm")),
    "gemma3-linear-rope": ParityArch("gemma3", {"rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
    # A vision-language Gemma 3 checkpoint served as text only (its vision tower is not loaded).
    "gemma3-multimodal": ParityArch("gemma3_multimodal", {"tie_word_embeddings": True},
                                    modules=("Gemma3TextOfMultimodal",)),
    "mixtral": ParityArch("mixtral", modules=("MixtralForCausalLM", "FusedMoE")),
    "qwen2_moe": ParityArch("qwen2_moe", modules=("Qwen2MoeForCausalLM", "FusedMoE")),
    "qwen3_moe": ParityArch("qwen3_moe", modules=("Qwen3MoeForCausalLM", "FusedMoE")),
    "deepseek_v2": ParityArch("deepseek_v2", modules=("DeepseekV2ForCausalLM", "LatentAttention", "DeepseekMoE")),
    "deepseek_v3": ParityArch("deepseek_v3", modules=("DeepseekV3ForCausalLM", "LatentAttention", "DeepseekMoE")),
    # 16-token window on alternate layers (prompts run past it), attention sinks, top-4 of 8 biased experts
    "gpt_oss": ParityArch("gpt_oss", {"top_k": 4}, modules=("GptOssForCausalLM", "FusedMoE")),
}
MAX_NEW = 12


@functools.cache
def _hf_model(path: str):
    kwargs = {}
    quant = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    if quant.get("quant_method") == "mxfp4":
        # de-quantized by HF's own code; transformers >= 5.2x would otherwise fetch MXFP4 kernels from the Hub
        # whenever the `kernels` package is installed (it is a dependency of transformers now)
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    model.generation_config.eos_token_id = None  # run to max_new_tokens, like ignore_eos, without masking EOS
    return model


@functools.cache
def _hf_greedy(path: str, prompt_ids: tuple[int, ...], max_new: int) -> tuple[int, ...]:
    model = _hf_model(path)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new, do_sample=False, pad_token_id=0,
        )
    return tuple(out[0, len(prompt_ids):].tolist())


def hf_greedy(path, prompt_ids: list[int], max_new: int = MAX_NEW) -> list[int]:
    """Hugging Face's greedy continuation of ``prompt_ids`` (float32), computed once per (checkpoint, prompt)."""
    return list(_hf_greedy(str(path), tuple(prompt_ids), max_new))


def mixed_prompts(num: int, vocab: int, seed: int = 0, shared_prefix: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prefix = rng.integers(5, vocab, shared_prefix).tolist()
    return [prefix + rng.integers(5, vocab, int(n)).tolist() for n in rng.integers(3, 70, num)]


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


def run_engine(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    llm.engine.kv_cache.check_integrity([])
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.num_blocks, "KV blocks leaked"
    assert not llm.engine.has_unfinished_requests()
    return [o.outputs[0].token_ids for o in outputs]


# A small engine for the two-rank (gloo) tests: short context and KV pool, small chunks, one thread per rank.
TP_ENGINE = dict(dtype="float32", max_model_len=256, kv_cache_memory="32MiB", max_num_batched_tokens=32,
                 num_threads=1)


@contextlib.contextmanager
def two_rank_engine(path) -> Iterator[LLM]:
    """An :data:`TP_ENGINE` engine over two tensor-parallel ranks (gloo on CPU), shut down afterwards."""
    llm = LLM(str(path), tensor_parallel_size=2, **TP_ENGINE)
    try:
        yield llm
    finally:
        llm.shutdown()


# The preemption variants give the KV cache this many blocks (of 16 tokens): a fraction of what 17 prompts of up to
# ~120 tokens need at once. ``engine_options`` turns it into bytes for the checkpoint at hand.
PREEMPTION_KV_BLOCKS = 14
ENGINE_VARIANTS: dict[str, dict[str, Any]] = {
    "prefix-cache-on": dict(enable_prefix_caching=True),
    "prefix-cache-off": dict(enable_prefix_caching=False),
    "chunked-prefill": dict(max_num_batched_tokens=16),
    "preemption": dict(kv_cache_blocks=PREEMPTION_KV_BLOCKS, enable_prefix_caching=False),
    "preemption-with-prefix-cache": dict(kv_cache_blocks=PREEMPTION_KV_BLOCKS),
}


@functools.cache
def kv_bytes_per_block(path: str) -> int:
    """Bytes one KV block of ``path``'s model takes in float32, as the engine's runner counts them."""
    probe = LLM(path, dtype="float32", load_format="dummy", max_model_len=64, max_num_seqs=1)
    try:
        return probe.engine.runner.kv_bytes_per_block
    finally:
        probe.shutdown()


def engine_options(path, variant: str) -> dict[str, Any]:
    """``LLM`` keyword arguments of ``ENGINE_VARIANTS[variant]`` for ``path``: a ``kv_cache_blocks`` count becomes
    ``kv_cache_memory`` bytes for that checkpoint's KV block size."""
    options = dict(ENGINE_VARIANTS[variant])
    blocks = options.pop("kv_cache_blocks", None)
    if blocks is not None:
        options["kv_cache_memory"] = blocks * kv_bytes_per_block(str(path))
    return options


@pytest.fixture(scope="module", params=list(ARCHS))
def parity_arch(request, tiny_checkpoint_factory) -> tuple[ParityArch, Path]:
    spec = ARCHS[request.param]
    return spec, tiny_checkpoint_factory(spec.arch, **spec.checkpoint)


def test_single_prompt_matches_hf(parity_arch):
    spec, path = parity_arch
    llm = LLM(str(path), dtype="float32")
    # the model's module classes and their bases (the CPU kernels swap in subclasses, e.g. NativeGemmaRMSNorm)
    kinds = {cls.__name__ for m in llm.engine.runner.model.modules() for cls in type(m).__mro__}
    assert set(spec.modules) <= kinds
    prompt = mixed_prompts(1, 300, seed=1)[0]
    assert run_engine(llm, [prompt]) == [hf_greedy(path, prompt)]


def test_batch_of_mixed_lengths_matches_hf(parity_arch):
    _, path = parity_arch
    llm = LLM(str(path), dtype="float32")
    prompts = mixed_prompts(16, 300, seed=2)
    expected = [hf_greedy(path, p) for p in prompts]
    got = run_engine(llm, prompts)
    assert got == expected
    # The sixteen requests really were batched together.
    assert llm.engine.core.stats.max_batch_size >= 16


@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
def test_engine_mechanisms_keep_hf_parity(parity_arch, variant):
    _, path = parity_arch
    # A shared 40-token prefix makes prefix-cache hits happen; two identical prompts make full hits happen.
    prompts = mixed_prompts(16, 300, seed=3, shared_prefix=40)
    prompts.append(list(prompts[0]))
    expected = [hf_greedy(path, p) for p in prompts]
    llm = LLM(str(path), dtype="float32", **engine_options(path, variant))
    got = run_engine(llm, prompts)
    assert got == expected
    stats, kv = llm.engine.core.stats, llm.engine.kv_cache
    if variant == "chunked-prefill":
        assert stats.num_steps > MAX_NEW + 10  # prompts went in across many steps
    if variant.startswith("preemption"):
        assert kv.num_blocks == PREEMPTION_KV_BLOCKS
        assert stats.num_preemptions > 0
    # A second round on the same engine (now with a warm prefix cache) gives the same tokens.
    assert run_engine(llm, prompts) == expected
    if variant in ("prefix-cache-on", "preemption-with-prefix-cache"):
        assert kv.prefix_cache_hits > 0
    if variant == "prefix-cache-off":
        assert kv.prefix_cache_hits == 0


@pytest.mark.parametrize("switch,expected_linear", [
    ("INFERNEO_CPU_ONEDNN", "Linear"),  # packing off: the plain PyTorch matmuls, the reference path
    ("INFERNEO_CPU_NATIVE_LINEAR", "PackedLinear"),  # the native panel kernel off: oneDNN for float32
])
def test_other_matmul_paths_also_match_hf(tiny_checkpoint_factory, monkeypatch, switch, expected_linear):
    """The float32 linears that the default panel kernel replaces give the same tokens."""
    monkeypatch.setenv(switch, "0")
    path = tiny_checkpoint_factory("qwen2")
    llm = LLM(str(path), dtype="float32")
    kinds = {type(m).__name__ for m in llm.engine.runner.model.modules()}
    assert expected_linear in kinds and not kinds & ({"Linear", "PackedLinear", "PanelLinear"} - {expected_linear})
    prompts = mixed_prompts(8, 300, seed=5)
    assert run_engine(llm, prompts) == [hf_greedy(path, p) for p in prompts]


def test_pure_pytorch_paths_also_match_hf(tiny_checkpoint_factory, monkeypatch):
    """With the native CPU kernels off (reference attention, norms and rotary), the tokens are the same."""
    monkeypatch.setenv("INFERNEO_CPU_KERNELS", "0")  # read when the engine's KernelConfig is built: no cache to clear
    path = tiny_checkpoint_factory("llama")
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=32)
    assert llm.engine.runner.backend.name == "torch"
    kinds = {type(m).__name__ for m in llm.engine.runner.model.modules()}
    assert {"RMSNorm", "Attention", "SiluAndMul"} <= kinds and not {"NativeRMSNorm", "NativeSiluAndMul"} & kinds
    prompts = mixed_prompts(8, 300, seed=6, shared_prefix=20)
    assert run_engine(llm, prompts) == [hf_greedy(path, p) for p in prompts]


def llm_with_kernels(path, kernels: KernelConfig, **kwargs) -> LLM:
    """An LLM whose engine uses ``kernels`` (``EngineConfig.kernels``, handed down to where the model is built)."""
    llm = LLM(str(path), dtype="float32", kernels=kernels, **kwargs)
    assert llm.engine.runner.kernels == kernels
    return llm


def test_two_engines_in_one_process_use_their_own_kernels(tiny_checkpoint_factory, monkeypatch):
    """Two LLMs side by side, one with the native CPU kernels and packed linears, one on the plain PyTorch path:
    each builds its own module types (whatever the environment says), and both give Hugging Face's tokens."""
    monkeypatch.setenv("INFERNEO_CPU_KERNELS", "0")  # the environment only sets the defaults
    monkeypatch.setenv("INFERNEO_CPU_ONEDNN", "0")
    path = tiny_checkpoint_factory("llama")
    fast = llm_with_kernels(path, KernelConfig(cpu_native_kernels=True, cpu_onednn_linear=True),
                            max_num_batched_tokens=32)
    plain = llm_with_kernels(path, KernelConfig(), max_num_batched_tokens=32)  # from the environment: all off
    assert not plain.engine.runner.kernels.cpu_native_kernels and not plain.engine.runner.kernels.cpu_onednn_linear
    kinds = {name: {type(m).__name__ for m in llm.engine.runner.model.modules()}
             for name, llm in (("fast", fast), ("plain", plain))}
    if fast.engine.runner.backend.name == "cpu":  # the native kernels built here
        assert {"NativeRMSNorm", "NativeSiluAndMul", "InplaceRotaryAttention", "NativeDecoderLayer"} <= kinds["fast"]
        assert not {"RMSNorm", "SiluAndMul", "Attention", "DecoderLayer"} & kinds["fast"]
    assert kinds["fast"] & {"PackedLinear", "PanelLinear"} and "Linear" not in kinds["fast"]
    assert "RowPassMLP" in kinds["fast"]
    assert plain.engine.runner.backend.name == "torch"
    assert kinds["plain"] >= {"RMSNorm", "SiluAndMul", "Attention", "MLP", "Linear", "DecoderLayer"}
    assert not kinds["plain"] & {"NativeRMSNorm", "NativeSiluAndMul", "InplaceRotaryAttention", "RowPassMLP",
                                 "PackedLinear", "PanelLinear", "NativeDecoderLayer"}
    prompts = mixed_prompts(8, 300, seed=9, shared_prefix=20)
    expected = [hf_greedy(path, p) for p in prompts]
    assert run_engine(fast, prompts) == expected
    assert run_engine(plain, prompts) == expected
    assert run_engine(fast, prompts) == expected  # the first engine is unchanged by the second


def test_prompt_side_cpu_paths_match_hf(tiny_checkpoint_factory, monkeypatch):
    """Long prompts on CPU: the MLP in passes of rows (forced down to 16 rows here) and every prompt token through
    the paged attention kernel, alone, after a cached prefix and in chunks, give Hugging Face's tokens."""
    from inferneo.model_executor import device_kernels
    from inferneo.model_executor.layers import cpu_linear

    passes = []

    def counted(x, gate_up, down):
        rows = cpu_linear.mlp_row_chunk(x, gate_up, down)
        passes.append(rows)
        return rows

    monkeypatch.setattr(cpu_linear, "MLP_PASS_BYTES", 16 * 256 * 4)  # tiny model: gate/up is 256 wide
    monkeypatch.setattr(device_kernels, "mlp_row_chunk", counted)
    path = tiny_checkpoint_factory("llama")
    prompts = mixed_prompts(6, 300, seed=7, shared_prefix=90)
    expected = [hf_greedy(path, p) for p in prompts]
    for kwargs in ({}, {"max_num_batched_tokens": 48}):
        llm = LLM(str(path), dtype="float32", **kwargs)
        assert run_engine(llm, prompts) == expected
        assert run_engine(llm, prompts) == expected  # the second round starts from cached prefixes
        assert llm.engine.kv_cache.prefix_cache_hits > 0
    assert 16 in passes  # some steps did run the MLP in passes


def test_sdpa_prompt_path_matches_hf(tiny_checkpoint_factory, monkeypatch):
    """A head size the vector attention kernel does not take (12): prompt spans go through SDPA instead."""
    from inferneo.attention import cpu_native

    path = tiny_checkpoint_factory("llama", hidden_size=48, num_heads=4, num_kv_heads=2)
    prompts = mixed_prompts(8, 300, seed=8, shared_prefix=20)
    expected = [hf_greedy(path, p) for p in prompts]
    calls = []
    sdpa = cpu_native.F.scaled_dot_product_attention
    monkeypatch.setattr(cpu_native.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=32)
    assert run_engine(llm, prompts) == expected
    assert calls


# Architectures whose feed-forward blocks are SiLU-gated whatever the checkpoint says: a config asking for another
# activation is refused, rather than served as SiLU (Hugging Face computes the one ``hidden_act`` names).
SILU_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2",
              "deepseek_v3")


@pytest.mark.parametrize("arch", SILU_ARCHS)
def test_a_hidden_act_other_than_silu_is_refused_at_load(tiny_checkpoint_factory, tmp_path, arch):
    path = tmp_path / arch
    shutil.copytree(tiny_checkpoint_factory(arch), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match=r"hidden_act 'gelu' is not supported; supported: silu, swish"):
        LLM(str(path), dtype="float32")
    (path / "config.json").write_text(json.dumps({**config, "hidden_act": "swish"}))  # transformers' other SiLU name
    prompt = mixed_prompts(1, 300, seed=1)[0]
    assert run_engine(LLM(str(path), dtype="float32"), [prompt]) == [hf_greedy(path, prompt)]


@pytest.mark.parametrize("arch", ["gemma2", "gpt_oss"])
def test_models_with_their_own_activation_ignore_hidden_act(tiny_checkpoint_factory, tmp_path, arch):
    """Gemma reads ``hidden_activation`` and gpt-oss computes its clamped SwiGLU: both ignore ``hidden_act``, as
    Hugging Face does."""
    path = tmp_path / arch
    shutil.copytree(tiny_checkpoint_factory(arch), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    prompt = mixed_prompts(1, 300, seed=1)[0]
    assert run_engine(LLM(str(path), dtype="float32"), [prompt]) == [hf_greedy(path, prompt)]
