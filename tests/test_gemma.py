"""Gemma 2 and Gemma 3 (text): their configs as published, and what each Gemma feature does.

Greedy parity with Hugging Face (one prompt, 16 mixed prompts, every engine variant) is in ``test_hf_parity``'s
``ARCHS`` (gemma2, gemma3, gemma3-linear-rope). The tiny checkpoints alternate sliding-window (16 tokens) and full
layers, scale attention by ``query_pre_attn_scalar ** -0.5`` with a value other than the head size, and soft-cap
the final logits (Gemma 2 the attention logits too). Here: configs parse as transformers reads them; the window and
the attention soft cap each change the tokens (and HF agrees), the final soft cap the log-probabilities; tensor
parallelism (two ranks over gloo) gives Gemma 2 the same tokens as one rank; a GGUF file written as llama.cpp
writes Gemma reads back as the same model; a vision-language Gemma 3 checkpoint is read as its language model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from test_hf_parity import (
    MAX_NEW,
    TP_ENGINE,
    _hf_model,
    hf_greedy,
    mixed_prompts,
    run_engine,
    two_rank_engine,
)
from transformers import Gemma2Config, Gemma3TextConfig

from inferneo import LLM, SamplingParams
from inferneo.model_executor.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextOfMultimodal
from inferneo.model_executor.models.registry import get_model_class
from inferneo.model_loader.gguf_loader import gguf_config, iter_gguf_weights
from inferneo.model_loader.hf_files import hf_config, iter_hf_weights
from inferneo.testing.tiny_models import GEMMA_FINAL_SOFTCAP, GEMMA_SLIDING_WINDOW, make_tiny_gguf

MODEL_CLASSES = {"gemma2": Gemma2ForCausalLM, "gemma3": Gemma3ForCausalLM}


def _edited_copy(src, dest, **config_changes):
    """A copy of checkpoint ``src`` whose config.json has ``config_changes`` applied (same weights)."""
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(config_changes)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


# ---- config ------------------------------------------------------------------------------------------------------

# The text configs of google/gemma-2-2b and google/gemma-3-1b-it as published (transformers 4.x keys), and
# gemma-3-4b's text part (its global rope scaled by 8).
GEMMA2_2B = {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304,
    "intermediate_size": 9216, "max_position_embeddings": 8192, "num_attention_heads": 8, "num_hidden_layers": 26,
    "num_key_value_heads": 4, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "sliding_window": 4096, "vocab_size": 256000,
}
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attn_logit_softcapping": None,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
    "intermediate_size": 6912, "max_position_embeddings": 32768, "num_attention_heads": 4, "num_hidden_layers": 26,
    "num_key_value_heads": 1, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6, "rope_local_base_freq": 10000,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
    "vocab_size": 262144,
}
GEMMA3_4B_TEXT = dict(GEMMA3_1B, hidden_size=2560, num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4,
                      sliding_window=1024, rope_scaling={"factor": 8.0, "rope_type": "linear"})


def _hf_keys(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}


def test_gemma2_config_as_published():
    config = Gemma2ForCausalLM.config_from_hf(GEMMA2_2B)
    hf = Gemma2Config(**_hf_keys(GEMMA2_2B))
    assert config.layer_types == tuple(hf.layer_types)
    assert [config.sliding_window_for(i) for i in range(2)] == [4096, None]  # layer 0 slides, as in HF
    assert (config.attn_logit_softcap, config.final_logit_softcap) == (50.0, 30.0)
    assert config.tie_word_embeddings  # Gemma ties unless the config says otherwise
    assert (config.head_dim, config.query_pre_attn_scalar, config.gelu_approximate) == (256, 256.0, "tanh")
    assert config.local_rope_theta is None and config.rope_theta == 10000.0
    assert get_model_class(GEMMA2_2B) is Gemma2ForCausalLM


@pytest.mark.parametrize("published", [GEMMA3_1B, GEMMA3_4B_TEXT], ids=["1b", "4b-text"])
def test_gemma3_config_as_published(published):
    config = Gemma3ForCausalLM.config_from_hf(published)
    hf = Gemma3TextConfig(**_hf_keys(published))
    assert config.layer_types == tuple(hf.layer_types)
    assert config.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",)
    assert config.qk_norm and config.attn_logit_softcap is None and config.final_logit_softcap is None
    full, local = hf.rope_parameters["full_attention"], hf.rope_parameters["sliding_attention"]
    assert (config.rope_theta, config.local_rope_theta) == (full["rope_theta"], local["rope_theta"])
    assert (config.rope_scaling or {}).get("factor") == full.get("factor")
    assert config.local_rope_scaling is None
    # Each layer's attention gets the base of its kind, the scaling only on full layers.
    sliding, full_layer = config.attention_config(0), config.attention_config(5)
    assert (sliding.rope_theta, sliding.rope_scaling) == (10000.0, None)
    assert (full_layer.rope_theta, full_layer.rope_scaling) == (config.rope_theta, config.rope_scaling)
    assert get_model_class(published) is Gemma3ForCausalLM


def test_gemma3_config_in_transformers5_form(tmp_path):
    """transformers 5 writes ``rope_parameters`` per layer type and ``layer_types`` explicitly."""
    saved = Gemma3TextConfig(**_hf_keys(GEMMA3_4B_TEXT))
    saved.save_pretrained(tmp_path)
    assert Gemma3ForCausalLM.config_from_hf(hf_config(tmp_path)) == Gemma3ForCausalLM.config_from_hf(GEMMA3_4B_TEXT)


def test_multimodal_gemma3_config_as_published(tmp_path):
    """gemma-3-4b's config.json as published (transformers 4.50): a sparse ``text_config`` inside a vision-language
    config. The engine reads its language model's config, completed with transformers' defaults."""
    published = {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "eos_token_id": [1, 106],
        "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144, "mm_tokens_per_image": 256,
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304, "model_type":
                          "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14,
                          "vision_use_head": False},
        "torch_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(published))
    cfg = hf_config(tmp_path)
    assert get_model_class(cfg) is Gemma3TextOfMultimodal
    config = Gemma3TextOfMultimodal.config_from_hf(cfg)
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads) == (2560, 34, 8, 4)
    assert (config.vocab_size, config.head_dim, config.max_position_embeddings) == (262208, 256, 131072)
    assert config.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",)
    assert config.sliding_window == 1024 and config.tie_word_embeddings
    assert (config.rope_scaling["rope_type"], config.rope_scaling["factor"]) == ("linear", 8.0)
    assert (config.rope_theta, config.local_rope_theta, config.local_rope_scaling) == (1_000_000.0, 10_000.0, None)
    assert cfg["eos_token_id"] == [1, 106] and cfg["torch_dtype"] == "bfloat16"


def test_multimodal_checkpoint_loads_its_language_model_only(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory("gemma3_multimodal", tie_word_embeddings=True)
    names = [name for name, _ in iter_hf_weights(path)]
    assert any(name.startswith("vision_tower.") for name in names)
    cfg = hf_config(path)
    model = Gemma3TextOfMultimodal(Gemma3TextOfMultimodal.config_from_hf(cfg), backend=None)
    loaded = model.load_weights(iter_hf_weights(path))
    assert "layers.0.self_attn.q_norm.weight" in loaded and "embed_tokens.weight" in loaded
    assert not any("vision" in name or "projector" in name for name in loaded)


@pytest.mark.parametrize(("change", "message"), [
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"hidden_activation": "relu"}, "hidden_activation 'relu'"),
])
def test_unsupported_options_fail_at_load(change, message):
    for cls, published in ((Gemma2ForCausalLM, GEMMA2_2B), (Gemma3ForCausalLM, GEMMA3_1B)):
        with pytest.raises(ValueError, match=message):
            cls.config_from_hf({**published, **change})


# ---- each Gemma feature changes the output ------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "change"), [
    ("gemma2", {"sliding_window": 4096}),  # no layer's window binds
    ("gemma3", {"sliding_window": 4096}),
    ("gemma2", {"attn_logit_softcapping": None}),
])
def test_window_and_attention_softcap_change_the_tokens(tiny_checkpoint_factory, tmp_path, arch, change):
    """The same weights without the window (or the attention soft cap) give other tokens, which HF agrees with:
    the feature is applied, and applied as HF applies it."""
    path = tiny_checkpoint_factory(arch)
    other = _edited_copy(path, tmp_path / "edited", **change)
    prompts = mixed_prompts(8, 300, seed=4, shared_prefix=30)
    with_feature = run_engine(LLM(str(path), dtype="float32"), prompts)
    without = run_engine(LLM(str(other), dtype="float32"), prompts)
    assert with_feature == [hf_greedy(path, p) for p in prompts]
    assert without == [hf_greedy(other, p) for p in prompts]
    assert without != with_feature


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_final_softcap_shapes_the_logprobs(tiny_checkpoint_factory, arch):
    """Greedy log-probabilities are those of HF's soft-capped logits (a monotonic cap leaves the tokens alone)."""
    path = tiny_checkpoint_factory(arch)
    prompt = mixed_prompts(1, 300, seed=5)[0]
    llm = LLM(str(path), dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=0)
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    model = _hf_model(str(path))
    with torch.no_grad():
        generated = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0, output_logits=True,
                                   return_dict_in_generate=True)
    hf_logits = torch.cat(generated.logits)  # [MAX_NEW, vocab], after the model's final soft cap
    assert out.token_ids == generated.sequences[0, len(prompt):].tolist()
    assert hf_logits.abs().max() <= GEMMA_FINAL_SOFTCAP
    hf_logprobs = torch.log_softmax(hf_logits.float(), -1)[torch.arange(MAX_NEW), out.token_ids]
    ours = torch.tensor([step[token].logprob for step, token in zip(out.logprobs, out.token_ids, strict=True)])
    torch.testing.assert_close(ours, hf_logprobs, atol=1e-4, rtol=1e-4)
    uncapped = torch.atanh(hf_logits / GEMMA_FINAL_SOFTCAP) * GEMMA_FINAL_SOFTCAP
    uncapped_logprobs = torch.log_softmax(uncapped, -1)[torch.arange(MAX_NEW), out.token_ids]
    assert (uncapped_logprobs - ours).abs().max() > 0.1


# ---- tensor parallelism --------------------------------------------------------------------------------------------

def test_gemma2_tensor_parallel_2_equals_1(tiny_checkpoint_factory):
    """Two ranks over gloo: each holds half the query heads and one kv head, the norms and scaled embeddings
    replicated; greedy tokens equal one rank's, with chunked prefill and a second, prefix-cached round."""
    path = tiny_checkpoint_factory("gemma2", tie_word_embeddings=True)
    prompts = mixed_prompts(6, 300, seed=6, shared_prefix=20)
    expected = run_engine(LLM(str(path), **TP_ENGINE), prompts)
    with two_rank_engine(path) as llm:
        attn = llm.engine.runner.driver.model.layers[0].self_attn
        assert (attn.num_heads, attn.num_kv_heads, attn.sliding_window) == (2, 1, GEMMA_SLIDING_WINDOW)
        assert run_engine(llm, prompts) == expected
        assert run_engine(llm, prompts) == expected


# ---- GGUF ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "checkpoint"), [
    ("gemma2", {}),
    ("gemma3", {"rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
])
def test_gguf_file_gives_the_checkpoint_config_weights_and_tokens(tiny_checkpoint_factory, tmp_path, arch,
                                                                   checkpoint):
    """A Gemma GGUF written as llama.cpp writes one (norms shifted by 1, no LM head, the scale from the head size)
    reads back as the same config and weights, and the engine gives HF's tokens from it."""
    tied = tiny_checkpoint_factory(arch, tie_word_embeddings=True, **checkpoint)
    path = _edited_copy(tied, tmp_path / "hf", query_pre_attn_scalar=16)  # llama.cpp: 1 / sqrt(head_dim)
    gguf_file = make_tiny_gguf(path, tmp_path / f"{arch}.gguf", "F32")
    cls = MODEL_CLASSES[arch]
    from_gguf, expected = cls.config_from_hf(gguf_config(gguf_file)), cls.config_from_hf(hf_config(path))
    assert dataclasses.replace(from_gguf, rms_norm_eps=expected.rms_norm_eps) == expected
    assert from_gguf.rms_norm_eps == pytest.approx(expected.rms_norm_eps)
    weights = dict(iter_gguf_weights(gguf_file))
    hf_weights = dict(iter_hf_weights(path))
    assert weights.keys() == hf_weights.keys()
    for name, tensor in hf_weights.items():
        if name.endswith("norm.weight"):  # the stored 1 + w less 1 is not w, but 1 + it is what HF multiplies by
            assert torch.equal(1 + weights[name], 1 + tensor), name
        else:
            assert torch.equal(weights[name], tensor), name
    prompts = mixed_prompts(6, 300, seed=7)
    assert run_engine(LLM(str(gguf_file), dtype="float32"), prompts) == [hf_greedy(path, p) for p in prompts]


def test_gguf_writer_refuses_what_llama_cpp_cannot_say(tiny_checkpoint_factory, tmp_path):
    with pytest.raises(ValueError, match="tied"):
        make_tiny_gguf(tiny_checkpoint_factory("gemma2"), tmp_path / "untied.gguf")
    with pytest.raises(ValueError, match="query_pre_attn_scalar"):
        make_tiny_gguf(tiny_checkpoint_factory("gemma2", tie_word_embeddings=True), tmp_path / "scaled.gguf")
