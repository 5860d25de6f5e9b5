"""Sliding-window models give Hugging Face transformers' greedy tokens with prompts and generations well past the
window: Mistral and Phi-3 (every layer slides) and Qwen2 with ``max_window_layers`` (full and sliding layers
mixed), on the PyTorch attention backend and the native CPU one, with the engine's mechanisms forced on."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_hf_parity import ENGINE_VARIANTS, hf_greedy, mixed_prompts

from inferneo import LLM, SamplingParams
from inferneo.kernel_config import KernelConfig

WINDOW = 16
MAX_NEW = 24  # generations run well past the window too
MODELS = {
    "mistral": dict(sliding_window=WINDOW),
    "qwen2-mixed-layers": dict(sliding_window=WINDOW, num_layers=4, max_window_layers=2),  # layers 2 and 3 slide
    "phi3": dict(sliding_window=WINDOW),
}
BACKENDS = {"torch": KernelConfig(cpu_native_kernels=False), "cpu": KernelConfig(cpu_native_kernels=True)}


def _checkpoint(factory, name: str):
    return factory(name.split("-")[0], **MODELS[name])


def _unwindowed(factory, name: str):
    """The same weights without a window (the seed fixes them; checked below)."""
    options = {k: v for k, v in MODELS[name].items() if k not in ("sliding_window", "max_window_layers")}
    return factory(name.split("-")[0], **options)


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.num_blocks, "KV blocks leaked"
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_really_applies_the_window(tiny_checkpoint_factory, name):
    """The reference itself slides: the same weights without a window give other tokens."""
    windowed, plain = _checkpoint(tiny_checkpoint_factory, name), _unwindowed(tiny_checkpoint_factory, name)
    a, b = load_file(windowed / "model.safetensors"), load_file(plain / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    prompts = mixed_prompts(4, 300, seed=11)
    assert [hf_greedy(windowed, p, MAX_NEW) for p in prompts] != [hf_greedy(plain, p, MAX_NEW) for p in prompts]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("name", list(MODELS))
def test_batch_of_16_matches_hf(tiny_checkpoint_factory, name, backend):
    path = _checkpoint(tiny_checkpoint_factory, name)
    llm = LLM(str(path), dtype="float32", kernels=BACKENDS[backend])
    assert llm.engine.core.max_model_len > WINDOW  # the window no longer caps the context
    prompts = mixed_prompts(16, 300, seed=12)
    assert max(map(len, prompts)) > 3 * WINDOW
    assert _greedy(llm, prompts) == [hf_greedy(path, p, MAX_NEW) for p in prompts]
    assert llm.engine.core.stats.max_batch_size >= 16
    windows = [layer.self_attn.sliding_window for layer in llm.engine.runner.model.layers]
    assert windows == ([None, None, WINDOW, WINDOW] if name.startswith("qwen2") else [WINDOW] * 2)


@pytest.mark.parametrize("variant", ["prefix-cache-on", "prefix-cache-off", "chunked-prefill"])
@pytest.mark.parametrize("name", list(MODELS))
def test_engine_mechanisms_keep_parity_with_a_window(tiny_checkpoint_factory, name, variant):
    path = _checkpoint(tiny_checkpoint_factory, name)
    # A shared 40-token prefix (past the window) makes prefix-cache hits happen.
    prompts = mixed_prompts(8, 300, seed=13, shared_prefix=40)
    expected = [hf_greedy(path, p, MAX_NEW) for p in prompts]
    llm = LLM(str(path), dtype="float32", **ENGINE_VARIANTS[variant])
    assert _greedy(llm, prompts) == expected
    assert _greedy(llm, prompts) == expected  # again, with a warm prefix cache where it is on
    if variant == "prefix-cache-on":
        assert llm.engine.kv_cache.prefix_cache_hits > 0
    if variant == "chunked-prefill":
        assert llm.engine.core.stats.num_steps > MAX_NEW + 10
