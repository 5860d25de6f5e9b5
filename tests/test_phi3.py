"""Phi-3 (dense): greedy token ids equal Hugging Face transformers' ``generate`` (float32) on a checkpoint
saved with Phi-3's fused ``qkv_proj``/``gate_up_proj`` tensors, alone and in a batch, with chunked prefill and
prefix caching on and off; LongRoPE configs are refused with a message naming them."""

from __future__ import annotations

import functools
import json
import shutil

import pytest
from test_hf_parity import ENGINE_VARIANTS, MAX_NEW, hf_greedy, mixed_prompts, run_engine

from inferneo import LLM
from inferneo.model_executor.models.phi3 import Phi3ForCausalLM
from inferneo.model_executor.models.registry import get_model_class
from inferneo.model_loader.hf_files import hf_config, iter_hf_weights

VARIANTS = ("prefix-cache-on", "prefix-cache-off", "chunked-prefill")


@functools.cache
def _expected(path: str, prompts: tuple[tuple[int, ...], ...]) -> list[list[int]]:
    return [hf_greedy(path, list(p)) for p in prompts]


@pytest.fixture(scope="module")
def phi3_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("phi3")


def test_checkpoint_is_fused_and_registered(phi3_dir):
    names = {name for name, _ in iter_hf_weights(phi3_dir)}
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.0.mlp.gate_up_proj.weight" in names
    assert not any(".q_proj." in n or ".gate_proj." in n for n in names)
    assert get_model_class(hf_config(phi3_dir)) is Phi3ForCausalLM


def test_single_prompt_matches_hf(phi3_dir):
    llm = LLM(str(phi3_dir), dtype="float32")
    assert type(llm.engine.runner.model) is Phi3ForCausalLM
    prompt = mixed_prompts(1, 300, seed=1)[0]
    assert run_engine(llm, [prompt]) == [hf_greedy(phi3_dir, prompt)]


def test_batch_of_mixed_lengths_matches_hf(phi3_dir):
    llm = LLM(str(phi3_dir), dtype="float32")
    prompts = mixed_prompts(16, 300, seed=2)
    assert run_engine(llm, prompts) == _expected(str(phi3_dir), tuple(map(tuple, prompts)))
    assert llm.engine.core.stats.max_batch_size >= 16


@pytest.mark.parametrize("variant", VARIANTS)
def test_engine_mechanisms_keep_hf_parity(phi3_dir, variant):
    prompts = mixed_prompts(16, 300, seed=3, shared_prefix=40)
    prompts.append(list(prompts[0]))
    expected = _expected(str(phi3_dir), tuple(map(tuple, prompts)))
    llm = LLM(str(phi3_dir), dtype="float32", **ENGINE_VARIANTS[variant])
    assert run_engine(llm, prompts) == expected
    if variant == "chunked-prefill":
        assert llm.engine.core.stats.num_steps > MAX_NEW + 10
    assert run_engine(llm, prompts) == expected  # second round, warm prefix cache where on
    hits = llm.engine.kv_cache.prefix_cache_hits
    if variant == "prefix-cache-on":
        assert hits > 0
    if variant == "prefix-cache-off":
        assert hits == 0


def test_wrong_fused_shape_is_reported(phi3_dir):
    model = Phi3ForCausalLM(Phi3ForCausalLM.config_from_hf(hf_config(phi3_dir)), backend=None)
    weights = list(iter_hf_weights(phi3_dir))
    assert "layers.0.self_attn.qkv_proj.weight#2" in model.load_weights(weights)
    bad = [(n, t[:-1] if n.endswith("qkv_proj.weight") else t) for n, t in weights]
    with pytest.raises(ValueError, match="qkv_proj"):
        model.load_weights(bad)


_LONGROPE = {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
             "original_max_position_embeddings": 1024}


@pytest.mark.parametrize("rope_type", ["longrope", "su"])
def test_longrope_config_is_refused(rope_type):
    cfg = {"architectures": ["Phi3ForCausalLM"], "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
           "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": {**_LONGROPE, "type": rope_type}}
    with pytest.raises(ValueError, match=f"{rope_type}.*LongRoPE"):
        Phi3ForCausalLM.config_from_hf(cfg)


def test_longrope_checkpoint_is_refused_by_the_engine(phi3_dir, tmp_path):
    folder = tmp_path / "phi3-longrope"
    shutil.copytree(phi3_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {**_LONGROPE, "rope_type": "longrope"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="longrope"):
        LLM(str(folder), dtype="float32")
