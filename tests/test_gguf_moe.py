"""GGUF files of the mixture-of-experts models (llama.cpp's layout: Mixtral as arch ``llama`` with experts,
``qwen2moe``, ``qwen3moe``; stacked ``ffn_*_exps`` expert tensors, ``ffn_gate_inp`` routers, Qwen2-MoE's
``ffn_*_shexp`` shared expert): the weights come back under the Hugging Face checkpoint's names, the config gives the
same model, and greedy tokens equal Hugging Face transformers' on the weights the file holds (F32, and Q8_0 through a
Hugging Face copy of the dequantized weights)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from test_hf_parity import hf_greedy, mixed_prompts, run_engine

from inferneo import LLM
from inferneo.model_executor.models.registry import get_model_class
from inferneo.model_loader import iter_weights, load_hf_config, resolve_model
from inferneo.model_loader.gguf_file import read_gguf_header
from inferneo.model_loader.gguf_loader import gguf_hf_tensors
from inferneo.testing import make_tiny_gguf
from inferneo.testing.tiny_models import MOE_ARCHITECTURES

GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}


@pytest.fixture(scope="module", params=MOE_ARCHITECTURES)
def moe_dir(request, tiny_checkpoint_factory) -> Path:
    return tiny_checkpoint_factory(request.param)


def _gguf(hf_dir: Path, tmp_path: Path, dtype: str) -> Path:
    return make_tiny_gguf(hf_dir, tmp_path / f"{hf_dir.name}-{dtype}.gguf", dtype)


def test_file_uses_llama_cpp_names_and_hparams(moe_dir, tmp_path):
    header = read_gguf_header(_gguf(moe_dir, tmp_path, "F32"))
    hf = load_hf_config(resolve_model(moe_dir))
    arch = GGUF_ARCH[hf["model_type"]]
    assert header.architecture == arch
    experts = hf.get("num_local_experts") or hf["num_experts"]
    assert header.metadata[f"{arch}.expert_count"] == experts
    assert header.metadata[f"{arch}.expert_used_count"] == hf["num_experts_per_tok"]
    names = {t.name: t.shape for t in header.tensors}
    width = hf.get("moe_intermediate_size") or hf["intermediate_size"]
    assert names["blk.0.ffn_gate_exps.weight"] == (experts, width, hf["hidden_size"])
    assert names["blk.0.ffn_up_exps.weight"] == (experts, width, hf["hidden_size"])
    assert names["blk.0.ffn_down_exps.weight"] == (experts, hf["hidden_size"], width)
    assert names["blk.0.ffn_gate_inp.weight"] == (experts, hf["hidden_size"])
    assert not any(".experts." in n for n in names)
    shared = {"blk.0.ffn_gate_shexp.weight", "blk.0.ffn_up_shexp.weight", "blk.0.ffn_down_shexp.weight",
              "blk.0.ffn_gate_inp_shexp.weight"}
    if hf["model_type"] == "qwen2_moe":
        assert shared <= names.keys()
        assert header.metadata[f"{arch}.expert_shared_feed_forward_length"] == hf["shared_expert_intermediate_size"]
    else:
        assert not shared & names.keys()


def assert_exact_round_trip(hf_dir: Path, gguf_file: Path) -> tuple[type, Any]:
    """The file's weights equal the checkpoint's bit for bit under the same names, and its config gives the same
    model class and engine config (``rms_norm_eps`` up to its float32 rounding in GGUF). Returns the model class
    and the engine config built from the file."""
    source = resolve_model(gguf_file)
    expected, loaded = dict(iter_weights(resolve_model(hf_dir))), dict(iter_weights(source))
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    hf, from_gguf = load_hf_config(resolve_model(hf_dir)), load_hf_config(source)
    model_class = get_model_class(hf)
    assert get_model_class(from_gguf) is model_class
    ours, theirs = model_class.config_from_hf(from_gguf), model_class.config_from_hf(hf)
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps)
    assert dataclasses.replace(ours, rms_norm_eps=theirs.rms_norm_eps) == theirs
    return model_class, ours


def test_f32_round_trip_is_exact(moe_dir, tmp_path):
    assert_exact_round_trip(moe_dir, _gguf(moe_dir, tmp_path, "F32"))


def test_stacked_expert_tensor_splits_per_expert():
    stacked = torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(3, 4, 2)
    mixtral = dict(gguf_hf_tensors("blk.5.ffn_up_exps.weight", stacked, "mixtral"))
    assert list(mixtral) == [f"model.layers.5.block_sparse_moe.experts.{e}.w3.weight" for e in range(3)]
    assert all(torch.equal(mixtral[f"model.layers.5.block_sparse_moe.experts.{e}.w3.weight"], stacked[e])
               for e in range(3))
    qwen = dict(gguf_hf_tensors("blk.1.ffn_down_exps.weight", stacked, "qwen"))
    assert list(qwen) == [f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in range(3)]
    assert list(dict(gguf_hf_tensors("blk.2.ffn_gate_inp.weight", stacked[0], "mixtral"))) == [
        "model.layers.2.block_sparse_moe.gate.weight"]
    gate = dict(gguf_hf_tensors("blk.2.ffn_gate_inp_shexp.weight", torch.ones(8), "qwen"))
    assert gate["model.layers.2.mlp.shared_expert_gate.weight"].shape == (1, 8)
    with pytest.raises(ValueError, match="experts, rows, cols"):
        list(gguf_hf_tensors("blk.0.ffn_gate_exps.weight", stacked[0], "qwen"))


def test_f32_gguf_matches_hf(moe_dir, tmp_path):
    llm = LLM(str(_gguf(moe_dir, tmp_path, "F32")), dtype="float32")
    assert any(type(m).__name__ == "FusedMoE" for m in llm.engine.runner.model.modules())
    prompts = mixed_prompts(16, 300, seed=2)  # the batch test_hf_parity uses: its HF tokens are cached
    assert run_engine(llm, prompts) == [hf_greedy(moe_dir, p) for p in prompts]


def _dequantized_hf_copy(hf_dir: Path, gguf_file: Path, folder: Path) -> Path:
    """``hf_dir`` with its weights replaced by what ``gguf_file`` holds (dequantized to float32)."""
    shutil.copytree(hf_dir, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    tensors = {name: t.contiguous() for name, t in iter_weights(resolve_model(gguf_file))}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_q8_0_gguf_matches_hf_on_its_dequantized_weights(moe_dir, tmp_path):
    gguf_file = _gguf(moe_dir, tmp_path, "Q8_0")
    kinds = {t.name: t.type_name for t in read_gguf_header(gguf_file).tensors}
    assert kinds["blk.0.ffn_gate_exps.weight"] == "Q8_0" and kinds["blk.0.ffn_gate_inp.weight"] == "F32"
    reference = _dequantized_hf_copy(moe_dir, gguf_file, tmp_path / "dequantized")
    original = dict(iter_weights(resolve_model(moe_dir)))
    differs = [n for n, t in iter_weights(resolve_model(reference)) if not torch.equal(t, original[n])]
    assert any(".experts." in n for n in differs)  # the experts really were quantized
    llm = LLM(str(gguf_file), dtype="float32", max_num_batched_tokens=32)
    prompts = mixed_prompts(8, 300, seed=21, shared_prefix=20)
    assert run_engine(llm, prompts) == [hf_greedy(reference, p) for p in prompts]


def test_mixtral_file_with_one_tensor_per_expert_loads_as_the_stacked_one(tiny_checkpoint_factory, tmp_path):
    """llama.cpp's first Mixtral files (December 2023, still widely shared) hold each expert's projection as its
    own tensor, ``blk.N.ffn_gate.E.weight``; they give the weights and tokens of today's stacked ``ffn_gate_exps``."""
    hf_dir = tiny_checkpoint_factory("mixtral")
    stacked = _gguf(hf_dir, tmp_path, "Q8_0")
    old = make_tiny_gguf(hf_dir, tmp_path / "per-expert.gguf", "Q8_0", per_expert_tensors=True)
    assert read_gguf_header(old).tensor("blk.0.ffn_gate.3.weight") is not None
    expected = {name: t for name, t in iter_weights(resolve_model(stacked))}
    loaded = {name: t for name, t in iter_weights(resolve_model(old))}
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(t, expected[name]) for name, t in loaded.items())
    prompts = mixed_prompts(4, 300, seed=5)
    assert run_engine(LLM(str(old), dtype="float32"), prompts) == run_engine(LLM(str(stacked), dtype="float32"),
                                                                             prompts)
