"""Phi-3 (dense): checkpoints with Phi-3's fused ``qkv_proj``/``gate_up_proj`` tensors load (and a wrong fused shape
is reported). Hugging Face parity runs in test_hf_parity.py with every other architecture, LongRoPE in
test_rope_scaling.py."""

from __future__ import annotations

import pytest

from inferneo.model_executor.models.phi3 import Phi3ForCausalLM
from inferneo.model_executor.models.registry import get_model_class
from inferneo.model_loader.hf_files import hf_config, iter_hf_weights


@pytest.fixture(scope="module")
def phi3_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("phi3")


def test_checkpoint_is_fused_and_registered(phi3_dir):
    names = {name for name, _ in iter_hf_weights(phi3_dir)}
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.0.mlp.gate_up_proj.weight" in names
    assert not any(".q_proj." in n or ".gate_proj." in n for n in names)
    assert get_model_class(hf_config(phi3_dir)) is Phi3ForCausalLM


def test_wrong_fused_shape_is_reported(phi3_dir):
    model = Phi3ForCausalLM(Phi3ForCausalLM.config_from_hf(hf_config(phi3_dir)), backend=None)
    weights = list(iter_hf_weights(phi3_dir))
    assert "layers.0.self_attn.qkv_proj.weight#2" in model.load_weights(weights)
    bad = [(n, t[:-1] if n.endswith("qkv_proj.weight") else t) for n, t in weights]
    with pytest.raises(ValueError, match="qkv_proj"):
        model.load_weights(bad)


def test_tensor_parallel_two_ranks_match_hf(phi3_dir):
    """Two ranks over gloo: each loads its slice of every part of the fused qkv_proj/gate_up_proj tensors."""
    from test_hf_parity import hf_greedy, mixed_prompts, run_engine, two_rank_engine

    prompts = mixed_prompts(6, 300, seed=31, shared_prefix=20)
    expected = [hf_greedy(phi3_dir, p) for p in prompts]
    with two_rank_engine(phi3_dir) as llm:
        model = llm.engine.runner.driver.model
        assert type(model) is Phi3ForCausalLM
        assert (model.layers[0].self_attn.num_heads, model.layers[0].self_attn.num_kv_heads) == (2, 1)
        assert run_engine(llm, prompts) == expected
