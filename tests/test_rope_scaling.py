"""Rope scaling: each type's inverse frequencies, attention factor and cos/sin tables equal transformers' rope init
functions and rotary modules, and greedy tokens through the engine equal Hugging Face's for yarn (Llama, Qwen2),
dynamic NTK (Llama) and LongRoPE (Phi-3, with the short and the long factors)."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from test_hf_parity import MAX_NEW, _hf_model, hf_greedy, kv_bytes_per_block, mixed_prompts, run_engine
from transformers import LlamaConfig, Phi3Config, Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from inferneo import LLM
from inferneo.model_executor.layers.rotary import (
    LongRopeSwitch,
    MRotaryEmbedding,
    RotaryEmbedding,
    mrope_section_of,
    rope_frequencies,
    rope_scaling_from_hf,
)
from inferneo.model_executor.models.phi3 import Phi3ForCausalLM
from inferneo.model_executor.models.registry import get_model_class

HEAD_DIM = 16
SHORT = [1.0, 1.1, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0]
LONG = [1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 16.0]

# name -> (config class, max_position_embeddings, top-level extras, rope_scaling)
CASES = {
    "linear": (LlamaConfig, 256, {}, {"rope_type": "linear", "factor": 2.5}),
    "llama3": (LlamaConfig, 256, {}, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "dynamic": (LlamaConfig, 256, {}, {"rope_type": "dynamic", "factor": 4.0}),
    "yarn": (LlamaConfig, 256, {}, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    "yarn-beta-no-truncate": (Qwen2Config, 256, {}, {"rope_type": "yarn", "factor": 8.0, "beta_fast": 16,
                                                     "beta_slow": 2, "truncate": False,
                                                     "original_max_position_embeddings": 32}),
    "yarn-mscale": (LlamaConfig, 256, {}, {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0,
                                           "mscale_all_dim": 0.707, "original_max_position_embeddings": 16}),
    "yarn-attention-factor": (LlamaConfig, 256, {}, {"rope_type": "yarn", "factor": 2.0, "attention_factor": 0.9,
                                                     "original_max_position_embeddings": 128}),
    "yarn-implicit-factor": (LlamaConfig, 256, {}, {"rope_type": "yarn", "factor": None,
                                                    "original_max_position_embeddings": 32}),
    "longrope": (Phi3Config, 2048, {"original_max_position_embeddings": 64},
                 {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG}),
    "longrope-explicit": (Phi3Config, 2048, {"original_max_position_embeddings": 64},
                          {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "factor": 3.0,
                           "attention_factor": 1.1}),
}


def _hf_config(name: str):
    cls, max_position, extras, scaling = CASES[name]
    return cls(hidden_size=4 * HEAD_DIM, num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM,
               max_position_embeddings=max_position, rope_scaling=dict(scaling), **extras)


def _engine_scaling(config) -> dict | None:
    """The scaling the engine reads from the config as saved (config.json)."""
    saved = json.loads(config.to_json_string())
    if isinstance(config, Phi3Config):
        return Phi3ForCausalLM.config_from_hf(saved | {"vocab_size": 64, "intermediate_size": 8,
                                                       "num_hidden_layers": 1}).rope_scaling
    return rope_scaling_from_hf(saved)


def _hf_rotary(config):
    return (Phi3RotaryEmbedding if isinstance(config, Phi3Config) else LlamaRotaryEmbedding)(config)


@pytest.mark.parametrize("name", list(CASES))
def test_frequencies_equal_transformers_init_functions(name):
    config = _hf_config(name)
    rope_type = config.rope_parameters["rope_type"]
    theta = config.rope_parameters["rope_theta"]
    scaling = _engine_scaling(config)
    max_position = config.max_position_embeddings
    if rope_type == "longrope":  # the engine picks by its context length; HF by the sequence's length
        original = config.original_max_position_embeddings
        for engine_len, hf_seq_len in ((original, None), (original + 1, original + 1)):
            inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](config, seq_len=hf_seq_len)
            ours = rope_frequencies(HEAD_DIM, theta, scaling, engine_len)
            torch.testing.assert_close(ours.inv_freq, inv_freq, rtol=0, atol=0)
            assert ours.attention_factor == pytest.approx(factor, rel=1e-12)
        return
    inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](config)
    ours = rope_frequencies(HEAD_DIM, theta, scaling, max_position)
    torch.testing.assert_close(ours.inv_freq, inv_freq, rtol=1e-7, atol=0)
    assert ours.attention_factor == pytest.approx(factor, rel=1e-12)
    if rope_type == "yarn":
        assert ours.attention_factor != 1.0


@pytest.mark.parametrize("name", list(CASES))
def test_cos_sin_tables_equal_transformers_rotary(name):
    """The tables the engine's kernels read, against transformers' rotary module output at the same positions."""
    config = _hf_config(name)
    scaling = _engine_scaling(config)
    length = config.max_position_embeddings
    if name.startswith("longrope"):
        length = config.original_max_position_embeddings  # a context within the original: the short factors
    ours = RotaryEmbedding(HEAD_DIM, length, config.rope_parameters["rope_theta"], scaling)
    positions = torch.arange(length)[None]
    cos, sin = _hf_rotary(config)(torch.zeros(1, dtype=torch.float32), positions)
    half = HEAD_DIM // 2
    torch.testing.assert_close(ours.cos_cache, cos[0, :, :half], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.sin_cache, sin[0, :, :half], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cos[0, :, half:], cos[0, :, :half])  # rotate-half layout: both halves alike


def test_longrope_long_context_tables_equal_transformers_past_the_original_length():
    """With a context past the original length the table has a row per position (short below it, long from it)
    and then the long rows of the positions below it; each equals transformers' rotary at that rotation."""
    config = _hf_config("longrope")
    original = config.original_max_position_embeddings
    length = 3 * original
    ours = RotaryEmbedding(HEAD_DIM, length, 10000.0, _engine_scaling(config))
    assert ours.switch == LongRopeSwitch(original, length) and ours.cos_cache.shape[0] == length + original
    half = HEAD_DIM // 2
    long_cos, long_sin = _hf_rotary(config)(torch.zeros(1), torch.arange(length)[None])  # longer than the original
    short_cos, short_sin = _hf_rotary(config)(torch.zeros(1), torch.arange(original)[None])
    for rows, cos, sin in ((slice(0, original), short_cos[0], short_sin[0]),
                           (slice(original, length), long_cos[0, original:], long_sin[0, original:]),
                           (slice(length, length + original), long_cos[0, :original], long_sin[0, :original])):
        torch.testing.assert_close(ours.cos_cache[rows], cos[:, :half], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.sin_cache[rows], sin[:, :half], rtol=1e-5, atol=1e-5)
    assert RotaryEmbedding(HEAD_DIM, original, 10000.0, _engine_scaling(config)).switch is None


def test_phi3_reads_older_longrope_names_and_top_level_original_length():
    base = {"architectures": ["Phi3ForCausalLM"], "vocab_size": 64, "hidden_size": 64, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 8192}
    for kind in ("su", "yarn", "longrope"):
        scaling = {"type": kind, "short_factor": SHORT, "long_factor": LONG, "original_max_position_embeddings": 99}
        cfg = Phi3ForCausalLM.config_from_hf({**base, "rope_scaling": scaling,
                                              "original_max_position_embeddings": 2048})
        assert cfg.rope_scaling["rope_type"] == "longrope"
        assert cfg.rope_scaling["original_max_position_embeddings"] == 2048  # the top-level value wins
        assert cfg.rope_scaling["factor"] == 4.0
    cfg = Phi3ForCausalLM.config_from_hf({**base, "rope_scaling": {"type": "su", "short_factor": SHORT,
                                                                   "long_factor": LONG}})
    assert cfg.rope_scaling["original_max_position_embeddings"] == 4096  # Phi3Config's default
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        Phi3ForCausalLM.config_from_hf({**base, "partial_rotary_factor": 0.75})


def test_mrope_equals_transformers_qwen2_vl_rotary():
    """M-RoPE (Qwen2-VL): [3, T] positions rotate as transformers' rotary module and ``apply_rotary_pos_emb``
    over its recomposed sections; [T] positions (text) as the plain rotary embedding; the sections are read from
    transformers 4's ``rope_scaling`` (type "mrope", which is plain rope) and 5's ``rope_parameters``."""
    from transformers import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, apply_rotary_pos_emb

    sections = (2, 3, 3)
    config = Qwen2VLTextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                               rope_parameters={"rope_type": "default", "mrope_section": list(sections),
                                                "rope_theta": 10000.0})
    assert mrope_section_of(config.to_dict()) == sections
    old = {"rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
    assert mrope_section_of(old) == sections and rope_scaling_from_hf(old) is None
    rotary = MRotaryEmbedding(HEAD_DIM, 64, 10000.0, None, sections)
    generator = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 64, (3, 9), generator=generator)
    q, k = torch.randn(9, 4, HEAD_DIM, generator=generator), torch.randn(9, 2, HEAD_DIM, generator=generator)
    got_q, got_k = rotary(positions, q, k)
    cos, sin = Qwen2VLRotaryEmbedding(config)(q, positions[:, None, :])
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    torch.testing.assert_close(got_q, want_q[0].transpose(0, 1))
    torch.testing.assert_close(got_k, want_k[0].transpose(0, 1))
    plain = RotaryEmbedding(HEAD_DIM, 64, 10000.0)
    for got, want in zip(rotary(positions[0], q, k), plain(positions[0], q, k), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="three sections adding up to head_dim / 2"):
        MRotaryEmbedding(HEAD_DIM, 64, 10000.0, None, (4, 4, 4))


def test_unsupported_and_incomplete_scalings_are_refused():
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'mrope'"):
        rope_frequencies(HEAD_DIM, 1e4, {"rope_type": "mrope"}, 64)
    with pytest.raises(ValueError, match="'yarn' needs original_max_position_embeddings"):
        rope_frequencies(HEAD_DIM, 1e4, {"rope_type": "yarn", "factor": 4.0}, 64)
    with pytest.raises(ValueError, match="short_factor has 3 values"):
        rope_frequencies(HEAD_DIM, 1e4, {"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": LONG,
                                         "original_max_position_embeddings": 8, "factor": 2.0}, 64)
    dynamic = rope_scaling_from_hf({"max_position_embeddings": 128, "rope_scaling": {"type": "dynamic", "factor": 2}})
    assert dynamic == {"rope_type": "dynamic", "factor": 2, "original_max_position_embeddings": 128}
    with pytest.raises(ValueError, match="dynamic .* beyond the original 128 positions"):
        rope_frequencies(HEAD_DIM, 1e4, dynamic, 129)


# ---- greedy parity through the engine -----------------------------------------------------------------------------

_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
ENGINE_CASES = {
    # prompts of 3..82 tokens plus 12 new ones: most cross the original 32 positions
    "llama-yarn": ("llama", dict(rope_scaling=_YARN, max_position_embeddings=128)),
    "llama-yarn-mscale": ("llama", dict(rope_scaling={**_YARN, "factor": 16.0, "mscale": 1.0, "mscale_all_dim": 0.5,
                                                      "truncate": False})),
    "llama-dynamic": ("llama", dict(rope_scaling={"rope_type": "dynamic", "factor": 4.0},
                                    max_position_embeddings=128)),
    "qwen2-yarn": ("qwen2", dict(rope_scaling={**_YARN, "beta_fast": 16, "beta_slow": 2},
                                 max_position_embeddings=128)),
}


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_scaled_rope_matches_hf(tiny_checkpoint_factory, case):
    arch, kwargs = ENGINE_CASES[case]
    path = tiny_checkpoint_factory(arch, **kwargs)
    prompts = mixed_prompts(12, 300, seed=11, shared_prefix=10)
    expected = [hf_greedy(path, p) for p in prompts]
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=32)  # chunked prompts, prefix-cache hits
    assert run_engine(llm, prompts) == expected
    assert run_engine(llm, prompts) == expected
    assert llm.engine.kv_cache.prefix_cache_hits > 0


_PHI3_LONGROPE = dict(rope_scaling={"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                                    "original_max_position_embeddings": 64}, max_position_embeddings=2048)


def test_phi3_longrope_short_factors_match_hf(tiny_checkpoint_factory):
    """A context within the original 64 positions: the short factors, as Hugging Face uses for such sequences."""
    path = tiny_checkpoint_factory("phi3", **_PHI3_LONGROPE)
    assert get_model_class(json.loads((path / "config.json").read_text())) is Phi3ForCausalLM
    prompts = [p[:64 - 12] for p in mixed_prompts(10, 300, seed=12)]
    expected = [hf_greedy(path, p) for p in prompts]
    llm = LLM(str(path), dtype="float32", max_model_len=64)
    assert llm.engine.runner.model.layers[0].self_attn.rotary.scaling["rope_type"] == "longrope"
    assert run_engine(llm, prompts) == expected


def test_phi3_longrope_long_factors_match_hf(tiny_checkpoint_factory):
    """The full context (longer than the original 64): prompts longer than the original context take the long
    factors at every position, as Hugging Face rotates them."""
    path = tiny_checkpoint_factory("phi3", **_PHI3_LONGROPE)
    prompts = mixed_prompts(10, 300, seed=13, shared_prefix=65)
    expected = [hf_greedy(path, p) for p in prompts]
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=48)
    assert run_engine(llm, prompts) == expected


_SWITCH_ENGINES = {
    "chunked": dict(max_num_batched_tokens=16),
    "preempted": dict(kv_cache_blocks=12, max_num_seqs=9),
    "async": dict(async_scheduling=True, max_num_batched_tokens=16),
    "speculative": dict(speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1}),
}


@functools.cache
def _hf_greedy_recomputed(path, prompt: tuple[int, ...] | list[int]) -> list[int]:
    """Hugging Face's greedy tokens with every step computed from the whole sequence (no cache): the rotation each
    step's length asks for, which Phi-3's generation reaches by dropping its cache where a sequence grows past the
    original length (transformers 5.25; 5.17 kept the cache there and mixed the two rotations)."""
    prompt = list(prompt)
    with torch.no_grad():
        out = _hf_model(str(path)).generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                                              dtype=torch.long),
                                            max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0,
                                            use_cache=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("engine", list(_SWITCH_ENGINES))
def test_phi3_longrope_switches_per_sequence_as_hf(tiny_checkpoint_factory, engine):
    """In a context past the original 64 positions, each sequence rotates as Hugging Face's generation does: a
    short prompt with the short factors, its tokens from position 64 on with the long ones (some prompts here cross
    it while decoding), a long prompt with the long factors everywhere. Short and long prompts share a 48-token
    prefix in one batch, so the prefix cache must keep their blocks apart; prompts are chunked, or preempted."""
    path = tiny_checkpoint_factory("phi3", **_PHI3_LONGROPE)
    rng = np.random.default_rng(14)
    prefix = rng.integers(5, 300, 48).tolist()
    lengths = [8, 12, 14, 20, 30, 40, 4, 15, 60]  # prompt lengths 52..108: short, crossing 64, long
    prompts = [prefix + rng.integers(5, 300, n).tolist() for n in lengths]
    assert any(len(p) <= 64 < len(p) + 12 for p in prompts) and any(len(p) > 64 for p in prompts)
    expected = [_hf_greedy_recomputed(path, tuple(p)) for p in prompts]
    options = dict(_SWITCH_ENGINES[engine])
    if "kv_cache_blocks" in options:
        options["kv_cache_memory"] = options.pop("kv_cache_blocks") * kv_bytes_per_block(str(path))
    llm = LLM(str(path), dtype="float32", **options)
    assert llm.engine.runner.rope_switch is not None
    assert run_engine(llm, prompts) == expected
    assert run_engine(llm, prompts[::-1]) == expected[::-1]  # again, from cached blocks in the other order
    assert llm.engine.kv_cache.prefix_cache_hits > 0
    assert llm.engine.core.scheduler.num_rope_recomputes >= 2  # the prompts that grew past 64, each run
    if engine == "preempted":
        assert llm.engine.core.stats.num_preemptions > 0
    if engine == "speculative":
        assert llm.engine.core.stats.num_draft_tokens > 0


@pytest.mark.parametrize("where", ["top", "rope_scaling", "rope_parameters", "per_layer_type"])
def test_partial_rotary_embeddings_are_refused_for_every_family(where):
    """No model here rotates part of a head: a config asking for it is refused wherever it says so, never served
    with whole-head rotary; a factor of 1 is whole heads."""
    from inferneo.model_executor.models.llama import LlamaForCausalLM

    base = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "max_position_embeddings": 512, "architectures": ["LlamaForCausalLM"]}
    partial = {"partial_rotary_factor": 0.5}
    placed = {"top": partial, "rope_scaling": {"rope_scaling": {"rope_type": "default", **partial}},
              "rope_parameters": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, **partial}},
              "per_layer_type": {"rope_parameters": {"full_attention": {"rope_type": "default", **partial}}}}[where]
    with pytest.raises(ValueError, match=r"LlamaForCausalLM with partial_rotary_factor 0.5 is not supported"):
        LlamaForCausalLM.config_from_hf({**base, **placed})
    assert LlamaForCausalLM.config_from_hf({**base, "partial_rotary_factor": 1.0}).num_heads == 4
