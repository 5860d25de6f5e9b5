"""Phi-3 (dense): checkpoints with Phi-3's fused ``qkv_proj``/``gate_up_proj`` tensors load (and a wrong fused shape
is reported); LongRoPE configs are refused with a message naming them. Hugging Face parity runs in
test_hf_parity.py with every other architecture."""

from __future__ import annotations

import json
import shutil

import pytest

from inferneo import LLM
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
