"""gpt-oss GGUF files as llama.cpp's converter writes them (arch ``gpt-oss``): ``attn_sinks``, ``post_attention_norm``,
a biased router, experts split into ``ffn_gate_exps``/``ffn_up_exps``/``ffn_down_exps`` with ``.bias`` tensors (the
MXFP4 checkpoint's experts as ggml MXFP4), the window in ``attention.sliding_window`` on every other layer. The
weights come back as the Hugging Face checkpoint holds them, the engine config equals the checkpoint's, and greedy
tokens equal Hugging Face transformers' (F32 on the source checkpoint; MXFP4 experts with Q8_0 attention on the
weights the file holds)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_gguf_moe import _dequantized_hf_copy, assert_exact_round_trip
from test_hf_parity import hf_greedy, mixed_prompts, run_engine

from inferneo import LLM
from inferneo.model_executor.models.gpt_oss import GptOssForCausalLM
from inferneo.model_executor.mxfp4 import dequantize_mxfp4
from inferneo.model_loader import iter_weights, load_hf_config, resolve_model
from inferneo.model_loader.gguf_families import family_hf_tensors, join_split_tensors
from inferneo.model_loader.gguf_file import read_gguf_header
from inferneo.testing import make_tiny_gguf
from inferneo.testing.tiny_gguf_families import ggml_mxfp4_bytes

_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
         "original_max_position_embeddings": 4096}
VARIANTS = {"plain": {}, "yarn": {"rope_scaling": _YARN}}


@pytest.fixture(scope="module")
def gpt_oss_dir(tiny_checkpoint_factory) -> Path:
    return tiny_checkpoint_factory("gpt_oss", top_k=4)


def _gguf(hf_dir: Path, tmp_path: Path, dtype: str) -> Path:
    return make_tiny_gguf(hf_dir, tmp_path / f"{hf_dir.name}-{dtype}.gguf", dtype)


def test_file_uses_llama_cpp_names_and_hparams(gpt_oss_dir, tmp_path):
    header = read_gguf_header(_gguf(gpt_oss_dir, tmp_path, "F32"))
    hf = load_hf_config(resolve_model(gpt_oss_dir))
    assert header.architecture == "gpt-oss"
    names = {t.name: t.shape for t in header.tensors}
    experts, hidden, inter = hf["num_local_experts"], hf["hidden_size"], hf["intermediate_size"]
    assert names["blk.0.attn_sinks.weight"] == (hf["num_attention_heads"],)
    assert names["blk.0.ffn_gate_exps.weight"] == names["blk.0.ffn_up_exps.weight"] == (experts, inter, hidden)
    assert names["blk.0.ffn_down_exps.weight"] == (experts, hidden, inter)
    assert names["blk.0.ffn_gate_exps.bias"] == (experts, inter) and names["blk.0.ffn_down_exps.bias"] == (experts,
                                                                                                            hidden)
    assert names["blk.0.ffn_gate_inp.weight"] == (experts, hidden) and "blk.0.ffn_gate_inp.bias" in names
    assert "blk.0.post_attention_norm.weight" in names and "blk.0.ffn_norm.weight" not in names
    meta = header.metadata
    assert meta["gpt-oss.attention.sliding_window"] == hf["sliding_window"]
    assert meta["gpt-oss.expert_count"] == experts and meta["gpt-oss.expert_used_count"] == hf["num_experts_per_tok"]
    assert meta["gpt-oss.expert_feed_forward_length"] == inter


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_f32_round_trip_is_exact(variant, tiny_checkpoint_factory, tmp_path):
    hf_dir = tiny_checkpoint_factory("gpt_oss", top_k=4, **VARIANTS[variant])
    model_class, ours = assert_exact_round_trip(hf_dir, _gguf(hf_dir, tmp_path, "F32"))
    assert model_class is GptOssForCausalLM
    assert ours.layer_types == ("sliding_attention", "full_attention")
    if variant == "yarn":
        assert ours.rope_scaling["rope_type"] == "yarn" and ours.rope_scaling["truncate"] is False
    else:
        assert ours.rope_scaling is None  # not gpt-oss's default yarn: the file has plain rope


def test_split_and_fused_gate_up_give_hf_layout(gpt_oss_dir):
    """llama.cpp's split ``ffn_gate_exps``/``ffn_up_exps`` and its fused ``ffn_gate_up_exps`` (gate rows, then up
    rows) both come back as Hugging Face's interleaved ``gate_up_proj`` ``[E, H, 2I]`` and its bias."""
    hf = dict(iter_weights(resolve_model(gpt_oss_dir)))
    weight, bias = hf["model.layers.1.mlp.experts.gate_up_proj"], hf["model.layers.1.mlp.experts.gate_up_proj_bias"]
    gate_w, up_w = weight[..., 0::2].transpose(1, 2), weight[..., 1::2].transpose(1, 2)  # [E, I, H]
    split = [("blk.1.ffn_up_exps.weight", up_w), ("blk.1.ffn_gate_exps.bias", bias[:, 0::2]),
             ("blk.1.ffn_gate_exps.weight", gate_w), ("blk.1.ffn_up_exps.bias", bias[:, 1::2])]
    fused = [("blk.1.ffn_gate_up_exps.weight", torch.cat((gate_w, up_w), dim=1)),
             ("blk.1.ffn_gate_up_exps.bias", torch.cat((bias[:, 0::2], bias[:, 1::2]), dim=1))]
    for stream in (split, fused):
        out = {name: t for gguf_name, tensor in join_split_tensors("gpt-oss", stream)
               for name, t in family_hf_tensors("gpt-oss", gguf_name, tensor)}
        assert out.keys() == {"model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.gate_up_proj_bias"}
        assert torch.equal(out["model.layers.1.mlp.experts.gate_up_proj"], weight)
        assert torch.equal(out["model.layers.1.mlp.experts.gate_up_proj_bias"], bias)
    with pytest.raises(ValueError, match="half of a split tensor pair for: blk.1.ffn_gate_up_exps.weight"):
        list(join_split_tensors("gpt-oss", split[:1]))


def test_ggml_mxfp4_decodes_as_our_mxfp4_decoder():
    """Hugging Face's MXFP4 blocks repacked into ggml's layout: ``gguf.quants`` de-quantizes them to exactly the
    values :func:`dequantize_mxfp4` gives (every nibble, every e8m0 scale but 255, which is NaN in OCP MX)."""
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 255, 2, 16), dtype=torch.uint8, generator=generator)
    scales = torch.arange(255, dtype=torch.uint8).view(1, 255, 1).expand(3, 255, 2).contiguous()
    ggml = ggml_mxfp4_bytes(blocks, scales)
    assert ggml.shape == (3, 255, 2 * 17)
    with np.errstate(over="ignore"):  # the largest scales overflow to inf in both decoders
        theirs = torch.from_numpy(gguf.quants.dequantize(ggml, gguf.GGMLQuantizationType.MXFP4))
    ours = dequantize_mxfp4(blocks, scales)
    assert theirs.shape == ours.shape == (3, 255, 64)
    assert torch.equal(theirs, ours)  # equal values; ggml's zero code 8 is +0.0 where OCP's is -0.0


def test_f32_gguf_matches_hf(gpt_oss_dir, tmp_path):
    llm = LLM(str(_gguf(gpt_oss_dir, tmp_path, "F32")), dtype="float32")
    assert any(type(m).__name__ == "FusedMoE" for m in llm.engine.runner.model.modules())
    prompts = mixed_prompts(16, 300, seed=2)  # the batch test_hf_parity uses; most run past the 16-token window
    assert run_engine(llm, prompts) == [hf_greedy(gpt_oss_dir, p) for p in prompts]


def test_mxfp4_experts_gguf_matches_hf_on_its_dequantized_weights(tiny_checkpoint_factory, tmp_path):
    """An MXFP4 checkpoint converted with Q8_0 for the other weights: the experts stay ggml MXFP4 (repacked, no
    rounding), attention is Q8_0; against Hugging Face on the weights the file holds, de-quantized."""
    hf_dir = tiny_checkpoint_factory("gpt_oss", top_k=4, mxfp4=True)
    gguf_file = _gguf(hf_dir, tmp_path, "Q8_0")
    kinds = {t.name: t.type_name for t in read_gguf_header(gguf_file).tensors}
    assert kinds["blk.0.ffn_gate_exps.weight"] == kinds["blk.0.ffn_down_exps.weight"] == "MXFP4"
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.ffn_gate_exps.bias"] == "F32"
    reference = _dequantized_hf_copy(hf_dir, gguf_file, tmp_path / "dequantized")
    config = json.loads((reference / "config.json").read_text())
    del config["quantization_config"]  # the copy holds the de-quantized float weights
    (reference / "config.json").write_text(json.dumps(config))
    original = {n: t for n, t in iter_weights(resolve_model(hf_dir)) if not n.endswith(("_blocks", "_scales"))}
    differs = [n for n, t in iter_weights(resolve_model(reference)) if n in original and not torch.equal(t, original[n])]
    assert "model.layers.0.self_attn.q_proj.weight" in differs  # attention really was quantized
    llm = LLM(str(gguf_file), dtype="float32", max_num_batched_tokens=32)
    prompts = mixed_prompts(8, 300, seed=21, shared_prefix=20)
    assert run_engine(llm, prompts) == [hf_greedy(reference, p) for p in prompts]
