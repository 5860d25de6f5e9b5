"""DeepSeek-V2/V3 GGUF files as llama.cpp's converter writes them (arch ``deepseek2``): latent attention as
``attn_q`` or ``attn_q_a``/``attn_q_a_norm``/``attn_q_b``, ``attn_kv_a_mqa``, ``attn_kv_a_norm`` and ``kv_b_proj``
split into ``attn_k_b``/``attn_v_b`` (older files: one ``attn_kv_b``), a dense first layer, stacked experts, shared
experts, grouped routing in the metadata and V3's ``exp_probs_b``. The weights come back under the Hugging Face
checkpoint's names, the engine config equals the checkpoint's, and greedy tokens equal Hugging Face transformers'
(F32 on the source checkpoint, Q8_0 on the weights the file holds)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_gguf_moe import _dequantized_hf_copy, assert_exact_round_trip
from test_hf_parity import hf_greedy, mixed_prompts, run_engine

from inferneo import LLM
from inferneo.model_executor.models.deepseek import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from inferneo.model_loader import iter_weights, load_hf_config, resolve_model
from inferneo.model_loader.gguf_file import read_gguf_header
from inferneo.model_loader.gguf_loader import gguf_config
from inferneo.testing import make_tiny_gguf
from inferneo.testing.tiny_models import MLA_ARCHITECTURES

MODEL_CLASS = {"deepseek_v2": DeepseekV2ForCausalLM, "deepseek_v3": DeepseekV3ForCausalLM}


@pytest.fixture(scope="module", params=MLA_ARCHITECTURES)
def deepseek_dir(request, tiny_checkpoint_factory) -> Path:
    return tiny_checkpoint_factory(request.param)


def _gguf(hf_dir: Path, tmp_path: Path, dtype: str, legacy_mla: bool = False) -> Path:
    suffix = "-legacy" if legacy_mla else ""
    return make_tiny_gguf(hf_dir, tmp_path / f"{hf_dir.name}-{dtype}{suffix}.gguf", dtype, legacy_mla=legacy_mla)


def test_file_uses_llama_cpp_names_and_hparams(deepseek_dir, tmp_path):
    header = read_gguf_header(_gguf(deepseek_dir, tmp_path, "F32"))
    hf = load_hf_config(resolve_model(deepseek_dir))
    v3 = hf["model_type"] == "deepseek_v3"
    assert header.architecture == "deepseek2"
    names = {t.name: t.shape for t in header.tensors}
    heads, hidden, latent = hf["num_attention_heads"], hf["hidden_size"], hf["kv_lora_rank"]
    nope, rope, v_dim = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"], hf["v_head_dim"]
    assert names["blk.0.attn_kv_a_mqa.weight"] == (latent + rope, hidden)
    assert names["blk.0.attn_kv_a_norm.weight"] == (latent,)
    assert names["blk.0.attn_k_b.weight"] == (heads, latent, nope)  # each head's key rows, transposed
    assert names["blk.0.attn_v_b.weight"] == (heads, v_dim, latent)
    assert "blk.0.attn_kv_b.weight" not in names
    if v3:
        assert names["blk.0.attn_q_a.weight"] == (hf["q_lora_rank"], hidden)
        assert {"blk.0.attn_q_a_norm.weight", "blk.0.attn_q_b.weight"} <= names.keys()
        assert "blk.0.attn_q.weight" not in names
    else:
        assert names["blk.0.attn_q.weight"] == (heads * (nope + rope), hidden)
    # layer 0 dense, layer 1 routed with a shared expert (and V3's routing bias)
    assert {"blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"} <= names.keys()
    experts, width = hf["n_routed_experts"], hf["moe_intermediate_size"]
    assert names["blk.1.ffn_gate_exps.weight"] == (experts, width, hidden)
    assert names["blk.1.ffn_down_exps.weight"] == (experts, hidden, width)
    assert names["blk.1.ffn_gate_shexp.weight"] == (hf["n_shared_experts"] * width, hidden)
    assert ("blk.1.exp_probs_b.bias" in names) == v3 and "blk.0.ffn_gate_exps.weight" not in names
    meta = header.metadata
    assert meta["deepseek2.attention.head_count_kv"] == 1
    assert meta["deepseek2.attention.key_length"] == latent + rope
    assert meta["deepseek2.attention.key_length_mla"] == nope + rope
    assert meta["deepseek2.attention.value_length_mla"] == v_dim
    assert meta["deepseek2.rope.dimension_count"] == rope
    assert meta["deepseek2.leading_dense_block_count"] == hf["first_k_dense_replace"]
    assert meta["deepseek2.expert_group_count"] == hf["n_group"]
    assert meta["deepseek2.expert_group_used_count"] == hf["topk_group"]
    assert meta["deepseek2.expert_shared_count"] == hf["n_shared_experts"]
    assert meta["deepseek2.expert_weights_scale"] == pytest.approx(hf["routed_scaling_factor"])
    assert meta.get("deepseek2.expert_weights_norm", False) == hf["norm_topk_prob"]
    gating = gguf.ExpertGatingFuncType.SIGMOID if v3 else gguf.ExpertGatingFuncType.SOFTMAX
    assert meta["deepseek2.expert_gating_func"] == gating.value


@pytest.mark.parametrize("legacy_mla", [False, True], ids=["split-kv_b", "attn_kv_b"])
def test_f32_round_trip_is_exact(deepseek_dir, legacy_mla, tmp_path):
    """Both layouts of ``kv_b_proj`` give the checkpoint's weights and config."""
    source = resolve_model(_gguf(deepseek_dir, tmp_path, "F32", legacy_mla))
    assert any(t.name == "blk.0.attn_kv_b.weight" for t in read_gguf_header(source.path).tensors) == legacy_mla
    model_class, _ = assert_exact_round_trip(deepseek_dir, source.path)
    assert model_class is MODEL_CLASS[load_hf_config(resolve_model(deepseek_dir))["model_type"]]


# DeepSeek-V3's own yarn: factor 40 over 4096 positions, mscale = mscale_all_dim (llama.cpp keeps only the latter)
_YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def test_yarn_round_trip(tiny_checkpoint_factory, tmp_path):
    hf_dir = tiny_checkpoint_factory("deepseek_v3", rope_scaling=_YARN, max_position_embeddings=163840)
    gguf_file = _gguf(hf_dir, tmp_path, "F32")
    assert read_gguf_header(gguf_file).metadata["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1)
    _, config = assert_exact_round_trip(hf_dir, gguf_file)
    assert config.rope_scaling["rope_type"] == "yarn" and config.rope_scaling["mscale_all_dim"] == 1.0


def test_f32_gguf_matches_hf(deepseek_dir, tmp_path):
    llm = LLM(str(_gguf(deepseek_dir, tmp_path, "F32")), dtype="float32")
    assert any(type(m).__name__ == "LatentAttention" for m in llm.engine.runner.model.modules())
    prompts = mixed_prompts(16, 300, seed=2)  # the batch test_hf_parity uses
    assert run_engine(llm, prompts) == [hf_greedy(deepseek_dir, p) for p in prompts]


def test_q8_0_gguf_matches_hf_on_its_dequantized_weights(tiny_checkpoint_factory, tmp_path):
    hf_dir = tiny_checkpoint_factory("deepseek_v3")
    gguf_file = _gguf(hf_dir, tmp_path, "Q8_0")
    kinds = {t.name: t.type_name for t in read_gguf_header(gguf_file).tensors}
    assert kinds["blk.1.ffn_gate_exps.weight"] == kinds["blk.0.attn_kv_a_mqa.weight"] == "Q8_0"
    assert kinds["blk.0.attn_v_b.weight"] == "Q8_0" and kinds["blk.1.exp_probs_b.bias"] == "F32"
    reference = _dequantized_hf_copy(hf_dir, gguf_file, tmp_path / "dequantized")
    original = dict(iter_weights(resolve_model(hf_dir)))
    differs = [n for n, t in iter_weights(resolve_model(reference)) if not torch.equal(t, original[n])]
    assert "model.layers.0.self_attn.kv_b_proj.weight" in differs and any(".experts." in n for n in differs)
    llm = LLM(str(gguf_file), dtype="float32", max_num_batched_tokens=32)
    prompts = mixed_prompts(8, 300, seed=21, shared_prefix=20)
    assert run_engine(llm, prompts) == [hf_greedy(reference, p) for p in prompts]


def _routing_file(path: Path, gating: int | None, routing_bias: bool) -> Path:
    """A deepseek2 file with just what the config needs, its gating function and (maybe) V3's routing bias."""
    writer = gguf.GGUFWriter(path, "deepseek2")
    for key, value in (("embedding_length", 64), ("attention.head_count", 4), ("feed_forward_length", 128),
                       ("block_count", 2), ("rope.dimension_count", 8), ("attention.kv_lora_rank", 32),
                       ("attention.key_length_mla", 24), ("attention.value_length_mla", 12), ("expert_count", 8),
                       ("expert_used_count", 2), ("expert_feed_forward_length", 32),
                       ("leading_dense_block_count", 1)):
        writer.add_uint32(f"deepseek2.{key}", value)
    if gating is not None:
        writer.add_uint32("deepseek2.expert_gating_func", gating)
    writer.add_tensor("token_embd.weight", np.zeros((32, 64), dtype=np.float32))
    if routing_bias:
        writer.add_tensor("blk.1.exp_probs_b.bias", np.zeros(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_version_follows_the_gating_function(tmp_path):
    """Sigmoid gating is DeepSeek-V3; softmax, or no gating key (older V2 files, which llama.cpp reads as softmax),
    is V2; a V3 routing bias in a softmax file and unknown gating functions are refused."""
    v3 = gguf_config(_routing_file(tmp_path / "v3.gguf", 2, True))
    assert v3["architectures"] == ["DeepseekV3ForCausalLM"] and v3["scoring_func"] == "sigmoid"
    assert v3["topk_method"] == "noaux_tc" and v3["num_key_value_heads"] == 4 and v3["qk_nope_head_dim"] == 16
    for name, gating in (("v2.gguf", 1), ("old-v2.gguf", None)):
        v2 = gguf_config(_routing_file(tmp_path / name, gating, False))
        assert v2["architectures"] == ["DeepseekV2ForCausalLM"] and v2["topk_method"] == "greedy"
    with pytest.raises(ValueError, match="exp_probs_b .* needs sigmoid gating"):
        gguf_config(_routing_file(tmp_path / "mixed.gguf", 1, True))
    with pytest.raises(ValueError, match="expert_gating_func 7 is not supported"):
        gguf_config(_routing_file(tmp_path / "unknown.gguf", 7, False))
