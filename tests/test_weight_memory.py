"""Weights are held once: the resident memory building the default model's engine adds, less its KV cache and the
fixed cost of building any engine, stays within 1.15x the weight bytes (``inferneo/testing/weight_memory.py``).
The memory is what the process holds once glibc's heap has given its free pages back: the CPU warm-up pass leaves
its step buffers cached in the heap for the first requests (sized by the token budget and the model's widths, not
its weights: printed beside, and bounded below).

Each measurement is a fresh process. The fixed cost (libraries loaded on first use, native kernels, the tokenizer)
is a tiny checkpoint's build with the same switches and the default model's tokenizer, so that what is left is
what the weights cost. The default model is a Q4_1 GGUF; the float32 and bfloat16 runs load safetensors copies of
it written here (so they keep measuring the full-precision paths whatever the GGUF loader keeps in memory).
In the README's test command (about 50 s): as a slow-only test it went unrun while the CPU warm-up's cached buffers
broke it (2026-12-05/06).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inferneo.model_executor.layers.rotary import RotaryEmbedding, share_rotary_tables
from inferneo.testing.weight_memory import (
    measure_engine_memory,
    resident_bytes,
    weight_excess,
    write_default_model_copy,
)
from inferneo.worker.cpu_tuning import keep_freed_memory_mapped, release_freed_memory

LIMIT = 1.15
NATIVE_OFF = {"INFERNEO_CPU_KERNELS": "0", "INFERNEO_CPU_ONEDNN": "0", "INFERNEO_CPU_NATIVE_LINEAR": "0"}


@pytest.fixture(scope="module")
def default_copies(tmp_path_factory) -> dict[torch.dtype, Path]:
    root = tmp_path_factory.mktemp("default-model")
    return {dtype: write_default_model_copy(root / str(dtype).removeprefix("torch."), dtype)
            for dtype in (torch.float32, torch.bfloat16)}


@pytest.mark.parametrize(("dtype", "env"), [
    pytest.param(torch.float32, {}, id="float32"),
    pytest.param(torch.float32, NATIVE_OFF, id="float32-native-off"),
    pytest.param(torch.bfloat16, {}, id="bfloat16"),
])
def test_default_model_holds_its_weights_once(default_copies, tiny_checkpoint_factory, dtype, env):
    folder = default_copies[dtype]
    tiny = tiny_checkpoint_factory("llama", tie_word_embeddings=True, torch_dtype=dtype)
    fixed = measure_engine_memory(tiny, env=env, tokenizer=str(folder))
    measured = measure_engine_memory(folder, env=env)
    assert measured.dtype == str(dtype).removeprefix("torch.")
    assert measured.weight_bytes == 134_515_008 * dtype.itemsize  # SmolLM2-135M's parameters, the tied head once
    if measured.host_held is None:
        pytest.skip("glibc's malloc_trim is not available here: the heap's cached pages cannot be told apart")
    excess = weight_excess(measured, fixed, held=True)
    cached = measured.host_added - measured.host_held
    print(f"{dtype} {env or 'defaults'}: held {measured.host_held / 2**20:.0f} MiB (and {cached / 2**20:.0f} MiB of "
          f"freed step buffers cached), KV {measured.kv_bytes / 2**20:.0f} MiB, fixed "
          f"{(fixed.host_held - fixed.kv_bytes - fixed.weight_bytes) / 2**20:.0f} MiB, weights "
          f"{measured.weight_bytes / 2**20:.0f} MiB -> {excess:.3f}x")
    assert excess <= LIMIT, (f"building the engine holds {excess:.2f}x the weight bytes beyond its KV cache and fixed "
                             f"cost (limit {LIMIT}x): {measured} against {fixed}")
    # the warm-up's cached buffers: a step's working set, well under the weights of this model
    assert cached < 0.75 * measured.weight_bytes, (cached, measured)


def test_rotary_layers_with_equal_tables_share_one_pair():
    """Thirty layers of one model build equal tables: one pair stays; a layer with another base keeps its own."""
    model = torch.nn.ModuleList([RotaryEmbedding(64, 512, 10000.0) for _ in range(3)] + [RotaryEmbedding(64, 512, 1e6)])
    expected = [(m.cos_cache.clone(), m.sin_cache.clone()) for m in model]
    assert share_rotary_tables(model) == 2
    assert model[1].cos_cache is model[0].cos_cache and model[2].sin_cache is model[0].sin_cache
    assert model[3].cos_cache is not model[0].cos_cache
    for module, (cos, sin) in zip(model, expected, strict=True):
        assert torch.equal(module.cos_cache, cos) and torch.equal(module.sin_cache, sin)
    assert share_rotary_tables(model) == 0  # already shared


@pytest.mark.skipif(not keep_freed_memory_mapped(), reason="glibc's mallopt is not available here")
def test_release_freed_memory_gives_back_what_the_raised_thresholds_keep():
    """Under the engine's malloc thresholds a freed 256 MiB block stays resident; the release hands it back."""
    block = torch.ones(64 * 2**20)  # 256 MiB, touched
    held = resident_bytes()
    del block
    assert resident_bytes() > held - 64 * 2**20  # still resident: glibc keeps it for reuse
    assert release_freed_memory()
    assert resident_bytes() < held - 192 * 2**20
