"""Phi-3 GGUF files as llama.cpp's converter writes them (arch ``phi3``): the checkpoint's fused ``qkv_proj`` and
``gate_up_proj`` kept as ``attn_qkv`` and ``ffn_up`` (no rotary permutation), the window in
``attention.sliding_window`` (0 for none) and LongRoPE as the ``rope_factors_long``/``rope_factors_short`` tensors.
The weights come back under the Hugging Face names, the engine config equals the checkpoint's, and greedy tokens
equal Hugging Face transformers' (F32 on the source checkpoint, Q8_0 on the weights the file holds)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_gguf_moe import _dequantized_hf_copy
from test_hf_parity import hf_greedy, mixed_prompts, run_engine

from inferneo import LLM
from inferneo.model_executor.models.phi3 import Phi3ForCausalLM
from inferneo.model_executor.models.registry import get_model_class
from inferneo.model_loader import iter_weights, load_hf_config, resolve_model
from inferneo.model_loader.gguf_file import read_gguf_header
from inferneo.model_loader.gguf_loader import gguf_config
from inferneo.testing import make_tiny_gguf

# float32-exact factors, so the file holds the checkpoint's values exactly
_LONGROPE = dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.125, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0],
                               "long_factor": [1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 16.0],
                               "original_max_position_embeddings": 64}, max_position_embeddings=2048)
VARIANTS = {"plain": {}, "longrope": _LONGROPE, "window": {"sliding_window": 16}}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def phi3_variant(request, tiny_checkpoint_factory) -> tuple[str, Path]:
    return request.param, tiny_checkpoint_factory("phi3", **VARIANTS[request.param])


def _gguf(hf_dir: Path, tmp_path: Path, dtype: str) -> Path:
    return make_tiny_gguf(hf_dir, tmp_path / f"{hf_dir.name}-{dtype}.gguf", dtype)


def test_file_uses_llama_cpp_names_and_hparams(phi3_variant, tmp_path):
    variant, hf_dir = phi3_variant
    header = read_gguf_header(_gguf(hf_dir, tmp_path, "F32"))
    hf = load_hf_config(resolve_model(hf_dir))
    assert header.architecture == "phi3"
    names = {t.name: t.shape for t in header.tensors}
    hidden, inter, head_dim = hf["hidden_size"], hf["intermediate_size"], hf["head_dim"]
    qkv_rows = (hf["num_attention_heads"] + 2 * hf["num_key_value_heads"]) * head_dim
    assert names["blk.0.attn_qkv.weight"] == (qkv_rows, hidden)
    assert names["blk.0.ffn_up.weight"] == (2 * inter, hidden)  # gate rows, then up rows
    assert not {"blk.0.attn_q.weight", "blk.0.ffn_gate.weight"} & names.keys()
    meta = header.metadata
    assert meta["phi3.attention.sliding_window"] == (hf["sliding_window"] or 0)
    assert meta["phi3.rope.scaling.original_context_length"] == hf["original_max_position_embeddings"]
    longrope = {"rope_factors_long.weight", "rope_factors_short.weight"}
    if variant == "longrope":
        assert names["rope_factors_long.weight"] == (head_dim // 2,)
        assert longrope <= names.keys() and "phi3.rope.scaling.attn_factor" in meta
    else:
        assert not longrope & names.keys()


def test_f32_round_trip_is_exact(phi3_variant, tmp_path):
    _, hf_dir = phi3_variant
    source = resolve_model(_gguf(hf_dir, tmp_path, "F32"))
    expected, loaded = dict(iter_weights(resolve_model(hf_dir))), dict(iter_weights(source))
    assert loaded.keys() == expected.keys()
    assert "model.layers.0.self_attn.qkv_proj.weight" in loaded and "model.layers.0.mlp.gate_up_proj.weight" in loaded
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    hf, from_gguf = load_hf_config(resolve_model(hf_dir)), load_hf_config(source)
    assert get_model_class(from_gguf) is get_model_class(hf) is Phi3ForCausalLM
    ours, theirs = Phi3ForCausalLM.config_from_hf(from_gguf), Phi3ForCausalLM.config_from_hf(hf)
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps)  # a float32 in GGUF
    assert dataclasses.replace(ours, rms_norm_eps=theirs.rms_norm_eps) == theirs


@pytest.mark.parametrize("variant", ["plain", "longrope"])
def test_f32_gguf_matches_hf(variant, tiny_checkpoint_factory, tmp_path):
    hf_dir = tiny_checkpoint_factory("phi3", **VARIANTS[variant])
    llm = LLM(str(_gguf(hf_dir, tmp_path, "F32")), dtype="float32", max_num_batched_tokens=48)
    if variant == "longrope":  # past the original 64 positions: the long factors
        assert llm.engine.runner.model.layers[0].self_attn.rotary.scaling["rope_type"] == "longrope"
        prompts = mixed_prompts(6, 300, seed=13, shared_prefix=65)
    else:
        prompts = mixed_prompts(16, 300, seed=2)
    assert run_engine(llm, prompts) == [hf_greedy(hf_dir, p) for p in prompts]


def test_q8_0_gguf_matches_hf_on_its_dequantized_weights(tiny_checkpoint_factory, tmp_path):
    hf_dir = tiny_checkpoint_factory("phi3")
    gguf_file = _gguf(hf_dir, tmp_path, "Q8_0")
    kinds = {t.name: t.type_name for t in read_gguf_header(gguf_file).tensors}
    assert kinds["blk.0.attn_qkv.weight"] == "Q8_0" and kinds["blk.0.ffn_up.weight"] == "Q8_0"
    reference = _dequantized_hf_copy(hf_dir, gguf_file, tmp_path / "dequantized")
    original = dict(iter_weights(resolve_model(hf_dir)))
    differs = [n for n, t in iter_weights(resolve_model(reference)) if not torch.equal(t, original[n])]
    assert "model.layers.0.mlp.gate_up_proj.weight" in differs  # the weights really were quantized
    llm = LLM(str(gguf_file), dtype="float32", max_num_batched_tokens=32)
    prompts = mixed_prompts(8, 300, seed=21, shared_prefix=20)
    assert run_engine(llm, prompts) == [hf_greedy(reference, p) for p in prompts]


def _minimal_phi3_file(path: Path, rotary_dims: int, long_factors: int | None = None) -> Path:
    """A phi3 file with just the keys the config needs: head size 16, ``rotary_dims`` rotated dimensions."""
    writer = gguf.GGUFWriter(path, "phi3")
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_feed_forward_length(128)
    writer.add_block_count(1)
    writer.add_context_length(2048)
    writer.add_rope_dimension_count(rotary_dims)
    writer.add_rope_scaling_orig_ctx_len(64)
    writer.add_tensor("token_embd.weight", np.zeros((32, 64), dtype=np.float32))
    if long_factors is not None:
        writer.add_tensor("rope_factors_long.weight", np.ones(long_factors, dtype=np.float32))
        writer.add_tensor("rope_factors_short.weight", np.ones(long_factors, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_rotary_layouts_are_refused(tmp_path):
    assert gguf_config(_minimal_phi3_file(tmp_path / "full.gguf", 16, 8))["rope_scaling"]["rope_type"] == "longrope"
    with pytest.raises(ValueError, match="rope.dimension_count 8 is not the head size 16"):
        gguf_config(_minimal_phi3_file(tmp_path / "partial.gguf", 8))
    with pytest.raises(ValueError, match="rope_factors_long and rope_factors_short of 8 values"):
        gguf_config(_minimal_phi3_file(tmp_path / "factors.gguf", 16, 4))
