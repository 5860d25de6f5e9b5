"""Real architectures from their published ``config.json`` values, for benchmarks with dummy weights.

``LLM(model="preset:llama-2-7b", load_format="dummy")`` builds Llama-2-7B's exact shapes with random weights
drawn on the device; no weight or tokenizer file is needed. Such a model has no tokenizer: prompts must be
token ids (a text prompt raises a ValueError that says so) and outputs carry token ids with empty text.

The preset is written once as a small Hugging Face folder (``config.json``, ``generation_config.json``) under
the temp directory, so the rest of the loader treats it like any local model folder.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

PREFIX = "preset:"
MARKER_FILE = "inferneo_preset.json"

_LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "rope_scaling": None, "vocab_size": 32000, "tie_word_embeddings": False, "attention_bias": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
}
_LLAMA2_70B = dict(_LLAMA2_7B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                   num_attention_heads=64, num_key_value_heads=8)
_LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": None, "vocab_size": 128256, "tie_word_embeddings": False, "attention_bias": False,
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}
# Qwen/Qwen3-30B-A3B's config.json: 48 layers, 128 experts of width 768, 8 active per token (about 3.3B active of
# 30.5B parameters).
_QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
    "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "max_position_embeddings": 40960, "max_window_layers": 48, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "rope_scaling": None, "vocab_size": 151936, "tie_word_embeddings": False, "attention_bias": False,
    "sliding_window": None, "use_sliding_window": False, "router_aux_loss_coef": 0.001,
    "output_router_logits": False, "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
}
_QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "rope_scaling": None, "vocab_size": 152064, "tie_word_embeddings": False, "sliding_window": 131072,
    "use_sliding_window": False, "max_window_layers": 28, "bos_token_id": 151643, "eos_token_id": 151643,
    "torch_dtype": "bfloat16",
}
_QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
    "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "rope_scaling": None, "vocab_size": 151936, "tie_word_embeddings": True,
    "attention_bias": False, "sliding_window": None, "use_sliding_window": False, "max_window_layers": 28,
    "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
}
_GEMMA2_2B = {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
    "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "vocab_size": 256000, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "attention_bias": False,
    "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "bfloat16",
}
_GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 256, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None, "vocab_size": 262144,
    "query_pre_attn_scalar": 256, "sliding_window": 512, "sliding_window_pattern": 6,
    "attn_logit_softcapping": None, "final_logit_softcapping": None, "attention_bias": False,
    "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "bfloat16",
}
# openai/gpt-oss-20b's config.json, without its quantization_config (dummy weights are drawn in the model dtype,
# which is what the MXFP4 experts become once de-quantized at load) and without its layer_types, which are the
# default the model fills in (sliding window on even layers, full attention on odd ones) for any layer count.
_GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_act": "silu",
    "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64,
    "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 32, "num_experts_per_tok": 4,
    "experts_per_token": 4, "sliding_window": 128, "attention_bias": True, "attention_dropout": 0.0,
    "swiglu_limit": 7.0, "max_position_embeddings": 131072, "initial_context_length": 4096, "rms_norm_eps": 1e-5,
    "rope_theta": 150000.0, "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                             "truncate": False, "original_max_position_embeddings": 4096},
    "vocab_size": 201088, "tie_word_embeddings": False, "router_aux_loss_coef": 0.9, "output_router_logits": False,
    "pad_token_id": 199999, "bos_token_id": 199998, "eos_token_id": 200002, "torch_dtype": "bfloat16",
}

PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": _LLAMA2_7B,
    "llama-2-70b": _LLAMA2_70B,
    "qwen3-30b-a3b": _QWEN3_30B_A3B,
    "llama-3-8b": _LLAMA3_8B,
    "qwen2.5-7b": _QWEN25_7B,
    "qwen3-0.6b": _QWEN3_06B,
    "gemma-2-2b": _GEMMA2_2B,
    "gemma-3-1b": _GEMMA3_1B,
    "gpt-oss-20b": _GPT_OSS_20B,
}


def preset_name(model: str) -> str | None:
    """The preset named by ``preset:NAME`` (case-insensitive), None for any other model string.

    Raises ValueError for an unknown preset name.
    """
    if not model.lower().startswith(PREFIX):
        return None
    name = model[len(PREFIX):].strip().lower()
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return name


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of the preset's ``config.json`` values, with ``overrides`` applied (e.g. tiny sizes in tests)."""
    config = dict(PRESETS[name])
    config.update(overrides)
    return config


def materialize_preset(name: str, root: Path | None = None) -> Path:
    """The preset's model folder (created on first use): config, generation config and a marker file."""
    folder = (root or Path(tempfile.gettempdir()) / "inferneo-presets") / name
    config = preset_config(name)
    files = {
        "config.json": config,
        "generation_config.json": {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]},
        MARKER_FILE: {"preset": name},
    }
    folder.mkdir(parents=True, exist_ok=True)
    for filename, content in files.items():
        path = folder / filename
        text = json.dumps(content, indent=2)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
    return folder


def is_preset_folder(folder: Path) -> bool:
    """True for a folder written by ``materialize_preset``."""
    return (folder / MARKER_FILE).is_file()


class TokenIdTokenizer:
    """Stands in for a tokenizer where there is none: token ids in, token ids out, empty text.

    Text prompts and chat templates raise ValueError; decoding gives ``""`` so detokenization costs nothing.
    """

    chat_template = None
    backend_tokenizer = None
    is_fast = False

    def __init__(self, vocab_size: int, eos_token_id: int | None, bos_token_id: int | None = None,
                 name: str = "this model") -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.pad_token_id = None
        self.eos_token = f"<{eos_token_id}>" if eos_token_id is not None else None
        self.added_tokens_decoder: dict[int, Any] = {}
        self.name = name

    def __len__(self) -> int:
        return self.vocab_size

    def _no_text(self) -> ValueError:
        return ValueError(f"{self.name} has no tokenizer (an architecture preset with dummy weights): "
                          "pass prompts as lists of token ids")

    def __call__(self, text, *args, **kwargs):
        raise self._no_text()

    def encode(self, text, *args, **kwargs):
        raise self._no_text()

    def apply_chat_template(self, *args, **kwargs):
        raise self._no_text()

    def decode(self, ids, *args, **kwargs) -> str:
        return ""

    def convert_ids_to_tokens(self, ids):
        return [f"<{i}>" for i in ids] if isinstance(ids, list) else f"<{ids}>"
