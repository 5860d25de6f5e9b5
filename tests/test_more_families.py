"""Greedy parity with Hugging Face for more dense families: Gemma 1, Granite, SmolLM3, OLMo, OLMo 2, Command-R,
Cohere 2, GLM-4, GLM-4-0414, StarCoder2, ERNIE 4.5 (dense) and EXAONE 4.

Each family's tiny checkpoint (2 layers, hidden 64, float32) is built from transformers' own config class with
random weights (norm weights and biases perturbed, so that every one of them changes the tokens). One engine per
family, on the path the engine picks by default on CPU (native kernels where the family's modules allow them), with
prefix caching on and small prefill chunks: one prompt, then a batch of mixed-length prompts with a shared prefix
and a repeated prompt, each continuation equal to Hugging Face's ``generate``. Also: GLM-4-0414 over two
tensor-parallel ranks (gloo) gives Hugging Face's tokens; OLMo 2 refuses tensor parallelism by name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_hf_parity import hf_greedy, mixed_prompts, run_engine
from transformers import AutoModelForCausalLM

from inferneo import LLM
from inferneo.model_executor.models.registry import get_model_class
from inferneo.model_loader.hf_files import hf_config
from inferneo.testing.tiny_models import BOS_ID, EOS_ID, PAD_ID, make_tiny_tokenizer

_COMMON = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, bos_token_id=BOS_ID,
               eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def _gemma() -> Any:
    from transformers import GemmaConfig

    return GemmaConfig(**_COMMON, head_dim=32, hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-6)


def _granite() -> Any:
    from transformers import GraniteConfig

    return GraniteConfig(**_COMMON, rms_norm_eps=1e-6, embedding_multiplier=6.0, attention_multiplier=0.05,
                         residual_multiplier=0.4, logits_scaling=3.0)


def _smollm3() -> Any:
    from transformers import SmolLM3Config

    # NoPE on layer 1 of 2 (the default drops rotary on every 4th layer)
    return SmolLM3Config(**_COMMON, rms_norm_eps=1e-6, no_rope_layer_interval=2)


def _olmo() -> Any:
    from transformers import OlmoConfig

    return OlmoConfig(**_COMMON, clip_qkv=0.5)  # small enough that the clamp changes the tokens


def _olmo2() -> Any:
    from transformers import Olmo2Config

    return Olmo2Config(**_COMMON, rms_norm_eps=1e-6)


def _cohere() -> Any:
    from transformers import CohereConfig

    return CohereConfig(**_COMMON, logit_scale=0.5, layer_norm_eps=1e-5)


def _cohere2() -> Any:
    from transformers import Cohere2Config

    # layer 0 slides over 16 tokens (the prompts run past it) and rotates, layer 1 attends to all without positions
    return Cohere2Config(**_COMMON, logit_scale=0.5, sliding_window=16,
                         layer_types=["sliding_attention", "full_attention"])


def _glm() -> Any:
    from transformers import GlmConfig

    return GlmConfig(**_COMMON, head_dim=16, partial_rotary_factor=0.5, rms_norm_eps=1e-6)


def _glm4() -> Any:
    from transformers import Glm4Config

    return Glm4Config(**_COMMON, head_dim=16, partial_rotary_factor=0.5, rms_norm_eps=1e-6)


def _starcoder2() -> Any:
    from transformers import Starcoder2Config

    return Starcoder2Config(**_COMMON, sliding_window=16, norm_epsilon=1e-5)


def _ernie4_5() -> Any:
    from transformers import Ernie4_5Config

    return Ernie4_5Config(**_COMMON, head_dim=16, use_bias=True, rms_norm_eps=1e-6)


def _exaone4() -> Any:
    from transformers import Exaone4Config

    # layer 0 slides over 16 tokens and rotates, layer 1 is global without positions
    return Exaone4Config(**_COMMON, head_dim=16, rms_norm_eps=1e-6, sliding_window=16,
                         layer_types=["sliding_attention", "full_attention"])


# family -> (a function building its transformers config, the engine's model class name)
FAMILIES: dict[str, tuple[Callable[[], Any], str]] = {
    "gemma": (_gemma, "GemmaForCausalLM"),
    "granite": (_granite, "GraniteForCausalLM"),
    "smollm3": (_smollm3, "SmolLM3ForCausalLM"),
    "olmo": (_olmo, "OlmoForCausalLM"),
    "olmo2": (_olmo2, "Olmo2ForCausalLM"),
    "cohere": (_cohere, "CohereForCausalLM"),
    "cohere2": (_cohere2, "Cohere2ForCausalLM"),
    "glm": (_glm, "GlmForCausalLM"),
    "glm4": (_glm4, "Glm4ForCausalLM"),
    "starcoder2": (_starcoder2, "Starcoder2ForCausalLM"),
    "ernie4_5": (_ernie4_5, "Ernie4_5ForCausalLM"),
    "exaone4": (_exaone4, "Exaone4ForCausalLM"),
}


def _make_checkpoint(path: Path, config: Any) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")) or "norm" in name:  # set to 0 or 1 at init
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(path)
    make_tiny_tokenizer(config.vocab_size).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> tuple[str, Path]:
    build, class_name = FAMILIES[request.param]
    return class_name, _make_checkpoint(tmp_path_factory.mktemp(request.param), build())


def test_greedy_matches_hf(family):
    class_name, path = family
    assert get_model_class(hf_config(path)).__name__ == class_name
    llm = LLM(str(path), dtype="float32", max_model_len=256, enable_prefix_caching=True, max_num_batched_tokens=32,
              max_num_seqs=8, kv_cache_memory="16MiB")
    try:
        assert type(llm.engine.runner.model).__name__ == class_name
        one = mixed_prompts(1, 300, seed=1)[0]
        assert run_engine(llm, [one]) == [hf_greedy(path, one)]
        prompts = mixed_prompts(5, 300, seed=3, shared_prefix=20)
        prompts.append(list(prompts[0]))  # a full prefix-cache hit
        assert run_engine(llm, prompts) == [hf_greedy(path, p) for p in prompts]
        assert llm.engine.kv_cache.prefix_cache_hits > 0
    finally:
        llm.shutdown()


def test_gemma_gguf_matches_hf(tmp_path):
    """A Gemma 1 GGUF file as llama.cpp writes one (arch ``gemma``: Llama's tensor names, norm weights with the 1
    added, no LM head) reads back as the same model: Hugging Face's tokens."""
    from inferneo.testing.tiny_models import make_tiny_gguf

    path = _make_checkpoint(tmp_path / "hf", _gemma())
    gguf_file = make_tiny_gguf(path, tmp_path / "gemma.gguf")
    prompts = mixed_prompts(3, 300, seed=5)
    llm = LLM(str(gguf_file), dtype="float32", max_model_len=256, kv_cache_memory="16MiB")
    try:
        assert type(llm.engine.runner.model).__name__ == "GemmaForCausalLM"
        assert run_engine(llm, prompts) == [hf_greedy(path, p) for p in prompts]
    finally:
        llm.shutdown()


def test_olmo2_refuses_tensor_parallelism(tmp_path):
    """OLMo 2's q/k norms span every head, which no rank holding some of them can compute: refused, by name."""
    from inferneo.model_executor.models.olmo import Olmo2ForCausalLM
    from inferneo.model_executor.tensor_parallel import shard_model

    config = Olmo2ForCausalLM.config_from_hf(_olmo2().to_dict() | {"architectures": ["Olmo2ForCausalLM"]})
    with torch.device("meta"):
        model = Olmo2ForCausalLM(config, backend=None)
    with pytest.raises(ValueError, match="Olmo2ForCausalLM does not support tensor_parallel_size > 1"):
        shard_model(model, tp=None, device=torch.device("cpu"), dtype=torch.float32)


def test_glm4_tensor_parallel_two_ranks_match_hf(tmp_path):
    """Two ranks over gloo with Llama's sharding: each loads its slice of both halves of GLM's fused gate_up_proj,
    its heads (with their partial interleaved rotary) and its q/k/v biases."""
    from test_hf_parity import two_rank_engine

    path = _make_checkpoint(tmp_path, _glm4())
    prompts = mixed_prompts(4, 300, seed=31, shared_prefix=20)
    expected = [hf_greedy(path, p) for p in prompts]
    with two_rank_engine(path) as llm:
        model = llm.engine.runner.driver.model
        assert type(model).__name__ == "Glm4ForCausalLM"
        assert (model.layers[0].self_attn.num_heads, model.layers[0].self_attn.num_kv_heads) == (2, 1)
        assert run_engine(llm, prompts) == expected


# Config values as published (the keys that matter; transformers 4.x spellings) -> what the engine reads from them.
PUBLISHED = {
    "gemma-7b": ({"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "hidden_act": "gelu",
                  "hidden_size": 3072, "intermediate_size": 24576, "num_attention_heads": 16, "num_key_value_heads": 16,
                  "head_dim": 256, "num_hidden_layers": 28, "vocab_size": 256000, "rms_norm_eps": 1e-6},
                 {"head_dim": 256, "gelu_approximate": "tanh", "tie_word_embeddings": True}),
    "granite-3.1-2b": ({"architectures": ["GraniteForCausalLM"], "model_type": "granite", "hidden_size": 2048,
                        "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
                        "num_hidden_layers": 40, "vocab_size": 49155, "attention_multiplier": 0.015625,
                        "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "logits_scaling": 8.0,
                        "tie_word_embeddings": True},
                       {"attention_multiplier": 0.015625, "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                        "logits_scaling": 8.0}),
    "smollm3-3b": ({"architectures": ["SmolLM3ForCausalLM"], "model_type": "smollm3", "hidden_size": 2048,
                    "intermediate_size": 11008, "num_attention_heads": 16, "num_key_value_heads": 4,
                    "num_hidden_layers": 8, "vocab_size": 128256, "no_rope_layers": [1, 1, 1, 0, 1, 1, 1, 0],
                    "use_sliding_window": False, "sliding_window": None},
                   {"rope_layers": (True, True, True, False) * 2, "sliding_window": None, "tie_word_embeddings": True}),
    "command-r7b": ({"architectures": ["Cohere2ForCausalLM"], "model_type": "cohere2", "hidden_size": 4096,
                     "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "num_hidden_layers": 8, "vocab_size": 256000, "logit_scale": 0.25, "layer_norm_eps": 1e-5,
                     "sliding_window": 4096, "sliding_window_pattern": 4},
                    {"logit_scale": 0.25, "rms_norm_eps": 1e-5, "sliding_window": 4096,
                     "layer_types": (("sliding_attention",) * 3 + ("full_attention",)) * 2}),
    "glm-4-9b-chat-hf": ({"architectures": ["GlmForCausalLM"], "model_type": "glm", "hidden_size": 4096,
                          "intermediate_size": 13696, "num_attention_heads": 32, "num_key_value_heads": 2,
                          "head_dim": 128, "num_hidden_layers": 40, "vocab_size": 151552, "attention_bias": True,
                          "partial_rotary_factor": 0.5, "rope_theta": 10000.0},
                         {"rotary_dim": 64, "qkv_bias": True, "o_bias": False}),
    "starcoder2-3b": ({"architectures": ["Starcoder2ForCausalLM"], "model_type": "starcoder2", "hidden_size": 3072,
                       "intermediate_size": 12288, "num_attention_heads": 24, "num_key_value_heads": 2,
                       "num_hidden_layers": 30, "vocab_size": 49152, "hidden_act": "gelu_pytorch_tanh",
                       "norm_epsilon": 1e-5, "use_bias": True, "sliding_window": 4096},
                      {"qkv_bias": True, "o_bias": True, "mlp_bias": True, "sliding_window": 4096,
                       "tie_word_embeddings": True}),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_config_is_read(name):
    published, expected = PUBLISHED[name]
    config = get_model_class(published).config_from_hf(published)
    assert {key: getattr(config, key) for key in expected} == expected


@pytest.mark.parametrize("published, message", [
    ({"architectures": ["CohereForCausalLM"], "use_qk_norm": True}, "use_qk_norm"),
    ({"architectures": ["Starcoder2ForCausalLM"], "hidden_act": "relu"}, "hidden_act 'relu'"),
    ({"architectures": ["GemmaForCausalLM"], "hidden_act": "silu"}, "hidden_act 'silu'"),
])
def test_unsupported_variants_are_refused(published, message):
    cfg = dict(published, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
               vocab_size=384)
    with pytest.raises(ValueError, match=message):
        get_model_class(cfg).config_from_hf(cfg)
