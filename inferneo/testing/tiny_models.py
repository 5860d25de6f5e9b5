"""Tiny random-weight checkpoints in real Hugging Face (and GGUF) format, built offline in well under a second.

Each checkpoint is a folder ``save_pretrained`` wrote (config.json, safetensors, generation_config.json) plus a
real byte-level BPE tokenizer trained on a small built-in corpus, with a ChatML chat template.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from inferneo.model_executor.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from inferneo.model_loader.gguf_loader import permute_rotary
from inferneo.model_loader.hf_files import hf_config, iter_hf_weights, read_json
from inferneo.testing.gguf_quantizers import quantize_blocks
from inferneo.testing.tiny_gguf_families import (
    FAMILY_GGUF_ARCHITECTURES,
    RawGGUFTensor,
    attention_lengths,
    family_gguf_tensors,
    write_family_hparams,
)

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gemma3_multimodal", "mixtral",
                 "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v2", "deepseek_v3")
GEMMA_ARCHITECTURES = ("gemma2", "gemma3", "gemma3_multimodal")
# Architectures whose Hugging Face config takes a sliding window; the Qwen ones also ``max_window_layers``.
WINDOWED_ARCHITECTURES = ("mistral", "qwen2", "qwen3", "phi3", *GEMMA_ARCHITECTURES, "mixtral", "qwen2_moe", "qwen3_moe",
                          "gpt_oss")
# Gemma's tiny settings: a window the parity prompts (up to ~110 tokens + 12 generated) run well past, an attention
# scale that is not head_dim ** -0.5, soft caps low enough to bend the tiny model's logits.
GEMMA_SLIDING_WINDOW = 16
GEMMA_QUERY_PRE_ATTN_SCALAR = 32
GEMMA2_ATTN_SOFTCAP = 2.0
GEMMA_FINAL_SOFTCAP = 4.0
GPT_OSS_SLIDING_WINDOW = 16  # gpt_oss's default: short enough that test prompts run past it
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe")
# Multi-head latent attention with grouped top-k routing, shared experts and a dense first layer.
MLA_ARCHITECTURES = ("deepseek_v2", "deepseek_v3")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
PAD_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(len(SPECIAL_TOKENS))
_MIN_VOCAB = len(SPECIAL_TOKENS) + 256 + 8

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun.
Once upon a time there was a little village near the sea, and the people there were fishermen.
Every morning they went out in their boats, and every evening they came home with their catch.
The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid.
Water boils at one hundred degrees and freezes at zero degrees on the Celsius scale.
A language model predicts the next token given the tokens that came before it in the text.
Inference engines schedule requests, manage a cache of keys and values, and sample new tokens.
Hello! How are you today? I am fine, thank you. What would you like to talk about?
Numbers like 1, 2, 3, 42, 100 and 2024 appear in text, as do dates such as 12/05/2023.
She sells sea shells by the sea shore; the shells she sells are surely sea shells.
In the beginning the universe was created, which made a lot of people very angry.
Please write a short poem about the ocean, the wind, the stars and the quiet night.
The teacher asked the students to read the chapter and answer the questions at the end.
Python is a programming language; def main(): print("hello world") returns None.
Rain falls softly on the roof, and the children listen to the rhythm of the storm.
"""


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int) -> str:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_CORPUS.splitlines(), trainer)
    missing = vocab_size - backend.get_vocab_size()
    backend.add_tokens([f"<|extra_{i}|>" for i in range(missing)])  # corpus ran out of merges
    return backend.to_str()


def make_tiny_tokenizer(vocab_size: int = 384, *, add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of exactly ``vocab_size`` tokens with ``<s>``/``</s>`` and ChatML tokens."""
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be at least {_MIN_VOCAB}; got {vocab_size}")
    backend = Tokenizer.from_str(_trained_tokenizer_json(vocab_size))
    steps: list[processors.PostProcessor] = [processors.ByteLevel(trim_offsets=False)]
    if add_bos:
        steps.append(processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                   special_tokens=[("<s>", BOS_ID)]))
    backend.post_processor = processors.Sequence(steps)
    template = ("{{ bos_token }}" if add_bos else "") + CHATML_TEMPLATE
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=template, clean_up_tokenization_spaces=False,
                                   model_max_length=2048)


def _window_options(arch: str, sliding_window: int | None, max_window_layers: int | None) -> dict[str, Any]:
    """The Hugging Face config values that give ``arch`` a sliding window (none when ``sliding_window`` is None,
    except for gpt_oss and the Gemma architectures, which always alternate sliding-window and full layers)."""
    if arch == "gpt_oss":
        if max_window_layers is not None:
            raise ValueError("max_window_layers is for the Qwen architectures; gpt_oss slides its even layers")
        return {"sliding_window": GPT_OSS_SLIDING_WINDOW if sliding_window is None else sliding_window}
    if arch in GEMMA_ARCHITECTURES:
        if max_window_layers is not None:
            raise ValueError(f"max_window_layers is for the Qwen architectures; {arch} alternates by layer_types")
        return {"sliding_window": sliding_window or GEMMA_SLIDING_WINDOW}
    if sliding_window is None:
        if max_window_layers is not None:
            raise ValueError("max_window_layers needs a sliding_window")
        return {"sliding_window": None} if arch in ("mistral", "mixtral", "phi3") else {"use_sliding_window": False}
    if arch not in WINDOWED_ARCHITECTURES:
        raise ValueError(f"sliding_window is supported for {', '.join(WINDOWED_ARCHITECTURES)}; got {arch!r}")
    if arch in ("mistral", "mixtral", "phi3"):
        if max_window_layers is not None:
            raise ValueError(f"max_window_layers is for the Qwen architectures; {arch} slides every layer")
        return {"sliding_window": sliding_window}
    # Qwen: Qwen2/Qwen3 slide the layers from max_window_layers on, Qwen2-MoE the even ones below it.
    return {"use_sliding_window": True, "sliding_window": sliding_window,
            "max_window_layers": 0 if max_window_layers is None else max_window_layers}


def _hf_config(arch: str, rope_scaling: dict[str, Any] | None, num_experts: int, top_k: int,
               window: dict[str, Any], **common: Any) -> Any:
    from transformers import (
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
    )
    from transformers.models.gemma2 import Gemma2Config
    from transformers.models.gemma3 import Gemma3TextConfig

    hidden = common["hidden_size"]
    if arch == "gpt_oss":
        return _gpt_oss_config(rope_scaling, num_experts, top_k, **window, **common)
    common["rope_scaling"] = dict(rope_scaling) if rope_scaling else None  # the config classes mutate it
    if arch == "mixtral":
        return MixtralConfig(num_local_experts=num_experts, num_experts_per_tok=top_k, **window, **common)
    if arch == "qwen2_moe":  # a shared expert; top-k weights not renormalised
        return Qwen2MoeConfig(num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=hidden // 2,
                              shared_expert_intermediate_size=3 * hidden // 4, norm_topk_prob=False,
                              decoder_sparse_step=1, mlp_only_layers=[], **window, **common)
    if arch == "qwen3_moe":  # top-k weights renormalised, as in the released Qwen3-MoE models
        return Qwen3MoeConfig(num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=hidden // 2,
                              norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                              **window, **common)

    if arch in MLA_ARCHITECTURES:
        return _deepseek_config(arch, num_experts, top_k, **common)

    if arch in GEMMA_ARCHITECTURES:  # layer 0 slides, layer 1 attends to everything (and so on alternately)
        gemma = dict(query_pre_attn_scalar=GEMMA_QUERY_PRE_ATTN_SCALAR,
                     final_logit_softcapping=GEMMA_FINAL_SOFTCAP, hidden_activation="gelu_pytorch_tanh",
                     layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                  for i in range(common["num_hidden_layers"])], **window, **common)
        if arch == "gemma2":
            return Gemma2Config(attn_logit_softcapping=GEMMA2_ATTN_SOFTCAP, **gemma)
        text = Gemma3TextConfig(**gemma)  # rope_scaling (in common) applies to the full-attention layers
        if arch == "gemma3":
            return text
        return _gemma3_multimodal_config(text)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**window, **common)
    if arch == "phi3":
        # Phi3Config keeps LongRoPE's original context length at its top level (4096 unless given).
        original = (rope_scaling or {}).get("original_max_position_embeddings", common["max_position_embeddings"])
        return Phi3Config(resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
                          original_max_position_embeddings=original, **window, **common)
    if arch == "qwen2":
        return Qwen2Config(**window, **common)
    return Qwen3Config(**window, **common)


def _deepseek_config(arch: str, num_experts: int, top_k: int, **common: Any) -> Any:
    """DeepSeek-V2 (no q LoRA, softmax routing limited to the best groups) or DeepSeek-V3 (q LoRA, sigmoid
    routing with a score correction bias, normalised top-k): latent 32 + rope 8 per token in the KV cache, a
    dense first layer, ``num_experts`` experts in 4 groups of which the best 2 are searched, one shared expert."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    hidden = common.pop("hidden_size")
    common.pop("head_dim")
    common["num_key_value_heads"] = common["num_attention_heads"]  # MLA expands the latent to every head
    mla = dict(hidden_size=hidden, kv_lora_rank=hidden // 2, qk_nope_head_dim=16, qk_rope_head_dim=8,
               v_head_dim=12, moe_intermediate_size=hidden // 2, n_routed_experts=num_experts,
               num_experts_per_tok=top_k, n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
               attention_dropout=0.0)
    if arch == "deepseek_v2":
        return DeepseekV2Config(q_lora_rank=None, topk_method="group_limited_greedy", routed_scaling_factor=2.0,
                                norm_topk_prob=False, **mla, **common)
    return DeepseekV3Config(q_lora_rank=hidden // 2 + 8, routed_scaling_factor=2.5, norm_topk_prob=True,
                            rope_interleave=True, **mla, **common)


def _gemma3_multimodal_config(text: Any) -> Any:
    """A Gemma 3 vision-language config around ``text``: a one-layer SigLIP tower on 32-pixel images, four image
    tokens, the image/begin/end-of-image ids the vocabulary's last three (the parity prompts never use them)."""
    from transformers import Gemma3Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=16)
    last = text.vocab_size - 1
    return Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                        image_token_index=last, boi_token_index=last - 2, eoi_token_index=last - 1,
                        tie_word_embeddings=text.tie_word_embeddings, bos_token_id=text.bos_token_id,
                        eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id)


def _gpt_oss_config(rope_scaling: dict[str, Any] | None, num_experts: int, top_k: int, **common: Any) -> Any:
    """gpt-oss: biased attention with sinks, sliding-window layers alternating with full ones (``layer_types``'s
    default), experts with biases and the clamped SwiGLU; plain rope unless ``rope_scaling``."""
    from transformers import GptOssConfig

    rope = {"rope_type": "default", "rope_theta": 150000.0}
    if rope_scaling:
        rope = {"rope_theta": 150000.0, **rope_scaling}
    return GptOssConfig(num_local_experts=num_experts, num_experts_per_tok=top_k,
                        rope_parameters=rope, attention_bias=True, attention_dropout=0.0, **common)


def make_tiny_checkpoint(path: Path, arch: str = "llama", *, vocab_size: int = 384, hidden_size: int = 64,
                         num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                         tie_word_embeddings: bool = False, sharded: bool = False, seed: int = 0,
                         torch_dtype: torch.dtype = torch.float32,
                         rope_scaling: dict[str, Any] | None = None, max_position_embeddings: int = 2048,
                         num_experts: int = 8, top_k: int = 2, sliding_window: int | None = None,
                         max_window_layers: int | None = None, mxfp4: bool = False, biases: bool = False,
                         labels: Sequence[str] | None = None) -> Path:
    """Write a random-weight HF checkpoint of ``arch`` (one of :data:`ARCHITECTURES`) into ``path``.

    ``num_experts`` and ``top_k`` apply to the mixture-of-experts architectures (mixtral, qwen2_moe with a shared
    expert, qwen3_moe); their experts are ``hidden_size // 2`` wide (Mixtral's ``2 * hidden_size``). phi3 is
    saved with Phi-3's fused ``qkv_proj``/``gate_up_proj`` tensors, plain rope and no sliding window. deepseek_v2
    and deepseek_v3 (:data:`MLA_ARCHITECTURES`) use multi-head latent attention (``num_kv_heads`` is ignored) and
    grouped routing over ``num_experts`` experts in 4 groups, behind a dense first layer.

    Weights are drawn with std 0.2 (norm weights around 1, biases around 0, all distinct) so greedy outputs
    depend on the prompt. ``rope_scaling`` is Hugging Face's dict (e.g. ``{"rope_type": "yarn", "factor": 4.0,
    "original_max_position_embeddings": 64}``); for phi3 its ``original_max_position_embeddings`` also becomes
    Phi3Config's top-level value (``max_position_embeddings`` when absent); gemma3 applies it to its
    full-attention layers (e.g. ``{"rope_type": "linear", "factor": 8.0}``); gpt_oss has plain rope without it.
    ``sliding_window`` gives the architectures of :data:`WINDOWED_ARCHITECTURES` a sliding window: on every layer,
    or for the Qwen ones (``use_sliding_window``) on the layers Hugging Face picks from ``max_window_layers``
    (default 0: Qwen2/Qwen3 slide every layer, Qwen2-MoE none). gemma2 and gemma3 always alternate sliding-window
    (``sliding_window``, default :data:`GEMMA_SLIDING_WINDOW`) and full layers, with soft-capped logits (gemma2:
    attention ones too); their norm weights are offsets around 0, as Gemma stores them. gpt_oss always has a window
    (:data:`GPT_OSS_SLIDING_WINDOW` tokens unless given) on its even layers, plus attention sinks and biased
    experts; with ``mxfp4`` its expert weights are rounded to MXFP4 values and saved as MXFP4 blocks and scales
    with ``quantization_config: {"quant_method": "mxfp4"}`` (see :func:`write_mxfp4_experts`). ``biases`` (llama
    only): biases on the attention and MLP projections (``attention_bias``, ``mlp_bias``). ``labels`` saves a
    ``...ForSequenceClassification`` of those labels (``id2label``) instead of the causal LM: the same body and a
    ``score`` head. Returns ``path``.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}; got {arch!r}")
    if min(hidden_size, num_layers, num_heads, num_kv_heads) <= 0:
        raise ValueError("hidden_size, num_layers, num_heads and num_kv_heads must be positive")
    if hidden_size % num_heads or num_heads % num_kv_heads or (hidden_size // num_heads) % 2:
        raise ValueError("hidden_size must split into num_heads even-sized heads, and num_heads into "
                         "num_kv_heads groups")
    if mxfp4 and arch != "gpt_oss":
        raise ValueError("mxfp4 is only supported for arch='gpt_oss'")
    if biases and arch != "llama":
        raise ValueError("biases is only supported for arch='llama'")
    config = _hf_config(
        arch, rope_scaling, num_experts, top_k, _window_options(arch, sliding_window, max_window_layers),
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads, max_position_embeddings=max_position_embeddings, initializer_range=0.2,
        rms_norm_eps=1e-6, tie_word_embeddings=tie_word_embeddings, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        pad_token_id=PAD_ID, **({"attention_bias": True, "mlp_bias": True} if biases else {}),
    )
    if labels is not None:
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
    torch.manual_seed(seed)
    model = (AutoModelForCausalLM if labels is None else AutoModelForSequenceClassification).from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # Gemma stores its norm weights as offsets from 1
                param.normal_(0.0 if arch in GEMMA_ARCHITECTURES else 1.0, 0.1)
            elif name.endswith((".bias", "_bias")):
                param.normal_(0.0, 0.1)
            elif name.endswith(".sinks"):  # gpt_oss: large enough that every head's sink changes the tokens
                param.normal_(0.0, 1.0)
            if mxfp4 and name.endswith(_GPT_OSS_EXPERT_WEIGHTS):  # MXFP4 values, so the checkpoint is lossless
                blocks, scales = quantize_mxfp4(param.transpose(1, 2))
                param.copy_(dequantize_mxfp4(blocks, scales).transpose(1, 2))
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's routing bias: zero at init, not here
                buffer.normal_(0.0, 0.1)
    model = model.to(torch_dtype)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(path, max_shard_size=total // 3 if sharded else "10GB")
    if mxfp4:
        write_mxfp4_experts(path)
    generation = {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, IM_END_ID], "pad_token_id": PAD_ID}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    add_bos = arch in ("llama", "mistral", "mixtral", *GEMMA_ARCHITECTURES)
    make_tiny_tokenizer(vocab_size, add_bos=add_bos).save_pretrained(path)
    return path


_GPT_OSS_EXPERT_WEIGHTS = (".experts.gate_up_proj", ".experts.down_proj")


def write_mxfp4_experts(path: Path) -> None:
    """Rewrite a gpt-oss checkpoint folder's expert weights as MXFP4, the way gpt-oss checkpoints store them.

    HF's ``experts.gate_up_proj`` ``[E, H, 2I]`` and ``experts.down_proj`` ``[E, I, H]`` become
    ``..._blocks``/``..._scales`` of their transposes (``[E, 2I, H]``, ``[E, H, I]``, grouped along the input
    dimension), and ``config.json`` gains ``quantization_config``. Values that are not MXFP4 values are rounded.
    """
    from safetensors.torch import load_file, save_file

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise ValueError(f"write_mxfp4_experts expects one safetensors file in {path}; found {len(files)}")
    tensors = load_file(files[0])
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(_GPT_OSS_EXPERT_WEIGHTS):
            blocks, scales = quantize_mxfp4(tensor.float().transpose(1, 2))
            out[name + "_blocks"], out[name + "_scales"] = blocks, scales
        else:
            out[name] = tensor
    save_file(out, str(files[0]), metadata={"format": "pt"})
    config = read_json(path / "config.json")
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# model_type -> llama.cpp's general.architecture
_GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mixtral": "llama",
                       "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gemma": "gemma", "gemma2": "gemma2",
                       "gemma3_text": "gemma3", "phi3": "phi3"}
# HF expert projection -> llama.cpp's stacked tensor (Mixtral's w1/w3/w2 and Qwen-MoE's names)
_STACKED_EXPERTS = {"w1": "ffn_gate_exps", "gate_proj": "ffn_gate_exps", "w3": "ffn_up_exps", "up_proj": "ffn_up_exps",
                    "w2": "ffn_down_exps", "down_proj": "ffn_down_exps"}
_EXPERT_WEIGHT = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight")
_ROUTERS = ("ffn_gate_inp", "ffn_gate_inp_shexp")  # kept in F32, as llama.cpp keeps its routers


# The tensors a "Q4_K_M" tiny file stores in Q6_K.
_Q4_K_M_SIX_BIT = re.compile(r"blk\.\d+\.attn_v\.weight|blk\.0\.ffn_down\.weight|output\.weight")
_Q4_K_M_SIX_BIT_TYPE = gguf.GGMLQuantizationType.Q6_K


def make_tiny_gguf(hf_dir: Path, out_file: Path, dtype: str = "F32", *, legacy_mla: bool = False,
                   tensor_types: dict[str, str] | None = None, per_expert_tensors: bool = False) -> Path:
    """Convert a tiny checkpoint to GGUF the way llama.cpp does (llama q/k permuted, each layer's experts stacked
    into ``ffn_{gate,up,down}_exps``, Gemma norm weights shifted by 1 and its LM head left out, Phi-3's fused
    tensors kept as ``attn_qkv``/``ffn_up`` with LongRoPE as ``rope_factors_long``/``rope_factors_short``, gpt-oss
    and DeepSeek as :mod:`~inferneo.testing.tiny_gguf_families` describes, tokenizer in metadata). A Gemma
    checkpoint must be tied, with ``query_pre_attn_scalar`` equal to the head size, as llama.cpp's Gemma files cannot
    say otherwise.

    ``dtype`` is F32, F16, any type ``gguf.quants`` can quantize (BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, MXFP4), a
    K-quant (Q4_K, Q5_K, Q6_K: ``gguf_quantizers``), or ``Q4_K_M``: Q4_K with ``attn_v``, layer 0's ``ffn_down`` and
    ``output`` in Q6_K (a fused q/k/v of two types, as llama.cpp's Q4_K_M files have). Norms, biases and routers
    stay F32, and a tensor whose rows do not split into the type's blocks falls back to F16, as in llama.cpp's
    converter. An MXFP4 gpt-oss checkpoint's experts are repacked as ggml MXFP4 whatever ``dtype`` is.
    ``legacy_mla`` writes DeepSeek's ``kv_b_proj`` as one ``attn_kv_b`` tensor, as llama.cpp's converter did
    before it split it. ``tensor_types`` (``{regular expression: type}``) writes the tensors whose llama.cpp name
    matches an expression in that type instead (the first match; F32 tensors and the F16 fallback as above), e.g.
    ``{"blk[.]0[.]ffn_down_exps[.]weight": "Q6_K"}``. ``per_expert_tensors`` writes each expert's projection as its
    own tensor (``blk.N.ffn_gate.E.weight``), as llama.cpp's first Mixtral files (December 2023) did. Returns
    ``out_file``.
    """
    mixed = dtype.upper() == "Q4_K_M"
    overrides = [(re.compile(pattern), gguf.GGMLQuantizationType[kind.upper()])
                 for pattern, kind in (tensor_types or {}).items()]
    try:
        qtype = gguf.GGMLQuantizationType["Q4_K" if mixed else dtype.upper()]
    except KeyError:
        raise ValueError(f"unknown GGUF dtype {dtype!r}") from None
    hf_dir, out_file = Path(hf_dir), Path(out_file)
    config = hf_config(hf_dir)
    family = config["model_type"] in FAMILY_GGUF_ARCHITECTURES
    arch = FAMILY_GGUF_ARCHITECTURES.get(config["model_type"]) or _GGUF_ARCHITECTURES.get(config["model_type"])
    if arch is None:
        raise ValueError(f"cannot convert model_type {config['model_type']!r}")
    gemma = arch in GEMMA_ARCHITECTURES
    if gemma:
        config = _gemma_gguf_config(config)
    writer = gguf.GGUFWriter(out_file, arch)
    head_dim = _write_hparams(writer, config, arch, legacy_mla)
    if gemma:
        _write_gemma_hparams(writer, arch, config)
    if arch == "phi3":
        _write_phi3_hparams(writer, config, head_dim)
    if family:
        write_family_hparams(writer, arch, config, legacy_mla)
    _write_tokenizer(writer, hf_dir, config)
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(scaling, head_dim, config["rope_theta"]))
    tensors = (family_gguf_tensors(hf_dir, config, arch, legacy_mla) if family
               else _gguf_tensors(hf_dir, config, arch))
    if per_expert_tensors:
        tensors = _one_tensor_per_expert(tensors)
    for name, array in tensors:
        kind = next((k for pattern, k in overrides if pattern.fullmatch(name)), None)
        if kind is None:
            kind = _Q4_K_M_SIX_BIT_TYPE if mixed and _Q4_K_M_SIX_BIT.fullmatch(name) else qtype
        _add_tensor(writer, name, array, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file


def _add_tensor(writer: gguf.GGUFWriter, name: str, array: np.ndarray | RawGGUFTensor,
                qtype: gguf.GGMLQuantizationType) -> None:
    """``array`` in ``qtype``, or F32 (norms, biases, routers), or F16 (rows not a whole number of ``qtype``'s
    blocks); bytes already in a ggml type as they are."""
    if isinstance(array, RawGGUFTensor):
        writer.add_tensor(name, array.data, raw_dtype=array.ggml_type)
        return
    kind = qtype
    if array.ndim == 1 or name.endswith(".bias") or name.rsplit(".", 2)[-2] in _ROUTERS:
        kind = gguf.GGMLQuantizationType.F32
    elif array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        kind = gguf.GGMLQuantizationType.F16
    if kind == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, array)
    elif kind == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, array.astype(np.float16))
    else:
        writer.add_tensor(name, quantize_blocks(array, kind), raw_dtype=kind)


def _one_tensor_per_expert(tensors: Iterator[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """Each stacked ``blk.N.ffn_X_exps.weight`` split into ``blk.N.ffn_X.E.weight``, one per expert."""
    for name, array in tensors:
        parts = name.split(".")
        if len(parts) != 4 or not parts[2].endswith("_exps"):
            yield name, array
            continue
        for expert in range(array.shape[0]):
            yield f"blk.{parts[1]}.{parts[2].removesuffix('_exps')}.{expert}.weight", array[expert]


def _gguf_tensors(hf_dir: Path, config: dict[str, Any], arch: str) -> Iterator[tuple[str, np.ndarray]]:
    """(llama.cpp name, float32 array) for every tensor, experts stacked per layer and projection."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    gemma = arch in GEMMA_ARCHITECTURES or arch == "gemma"  # Gemma 1: Llama's names, Gemma's norms and tying
    names = (_GEMMA_GGUF_NAMES if arch in GEMMA_ARCHITECTURES else _PHI3_GGUF_NAMES if arch == "phi3"
             else _GGUF_NAMES)
    for name, tensor in iter_hf_weights(hf_dir):
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            tensor = permute_rotary(tensor, heads if ".q_proj." in name else kv_heads)
        if gemma and name == "lm_head.weight":
            continue  # tied (checked by _gemma_gguf_config): llama.cpp's Gemma files have no LM head
        if gemma and name.endswith("norm.weight"):
            tensor = tensor.float() + 1  # llama.cpp stores Gemma's norm weights with the 1 added
        array = tensor.float().numpy()
        if match := _EXPERT_WEIGHT.fullmatch(name):
            layer, expert, projection = match.groups()
            experts.setdefault((layer, _STACKED_EXPERTS[projection]), {})[int(expert)] = array
        else:
            yield _gguf_name(name, names), array
    for (layer, stacked), by_expert in experts.items():
        yield f"blk.{layer}.{stacked}.weight", np.stack([by_expert[e] for e in range(len(by_expert))])


def _write_hparams(writer: gguf.GGUFWriter, config: dict[str, Any], arch: str, legacy_mla: bool = False) -> int:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    lengths = attention_lengths(arch, config, head_dim, legacy_mla)
    writer.add_name("tiny-" + config["model_type"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(lengths.kv_heads)
    writer.add_key_length(lengths.key_length)
    writer.add_value_length(lengths.value_length)
    writer.add_rope_dimension_count(lengths.rope_dims)
    writer.add_rope_freq_base(float(config["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    num_experts = config.get("num_local_experts") or config.get("num_experts")
    if num_experts:
        writer.add_expert_count(num_experts)
        writer.add_expert_used_count(config["num_experts_per_tok"])
        if config.get("moe_intermediate_size"):
            writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
        if config.get("shared_expert_intermediate_size"):
            writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type") in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType(scaling["rope_type"]))
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        if "original_max_position_embeddings" in scaling:
            writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    return head_dim


def _write_tokenizer(writer: gguf.GGUFWriter, hf_dir: Path, config: dict[str, Any]) -> None:
    spec = read_json(hf_dir / "tokenizer.json")
    by_id = {index: token for token, index in spec["model"]["vocab"].items()}
    types = dict.fromkeys(by_id, int(gguf.TokenType.NORMAL))
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = int(gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED)
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError(f"{hf_dir}/tokenizer.json token ids are not contiguous")
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list([by_id[i] for i in range(len(by_id))])
    writer.add_token_types([types[i] for i in range(len(by_id))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    if config.get("pad_token_id") is not None:
        writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token("TemplateProcessing" in json.dumps(spec.get("post_processor")))
    template_file = hf_dir / "chat_template.jinja"
    tok_config = read_json(hf_dir / "tokenizer_config.json")
    template = template_file.read_text() if template_file.is_file() else tok_config.get("chat_template")
    if template:
        writer.add_chat_template(template)


_GGUF_NAMES = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "block_sparse_moe.gate": "ffn_gate_inp",
    "mlp.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}


_GEMMA_GGUF_NAMES = {
    **_GGUF_NAMES, "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


_PHI3_GGUF_NAMES = {**_GGUF_NAMES, "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}


def _gguf_name(hf_name: str, names: dict[str, str]) -> str:
    stem, _, kind = hf_name.rpartition(".")
    if stem.startswith("model.layers."):
        layer, _, part = stem.removeprefix("model.layers.").partition(".")
        return f"blk.{layer}.{names[part]}.{kind}"
    return f"{names[stem]}.{kind}"


def _gemma_gguf_config(config: dict[str, Any]) -> dict[str, Any]:
    """A Gemma config with the full layers' rope at the top level (as for the other models), checked for what a
    llama.cpp Gemma file cannot say: an untied LM head, an attention scale other than the head size."""
    if not config.get("tie_word_embeddings", True):
        raise ValueError("llama.cpp's Gemma files have no LM head of their own; convert a tied checkpoint")
    head_dim = config.get("head_dim") or 256
    if config.get("query_pre_attn_scalar", 256) != head_dim:
        raise ValueError(f"query_pre_attn_scalar {config.get('query_pre_attn_scalar')} is not the head size "
                         f"{head_dim}: llama.cpp derives the attention scale from the head size (below 27B)")
    full = (config.get("rope_parameters") or {}).get("full_attention")
    if full is None:
        return config
    scaling = {k: v for k, v in full.items() if k != "rope_theta"}
    return dict(config, rope_theta=full.get("rope_theta", 1_000_000.0),
                rope_scaling=scaling if scaling.get("rope_type", "default") != "default" else None)


def _write_gemma_hparams(writer: gguf.GGUFWriter, arch: str, config: dict[str, Any]) -> None:
    """The window, the soft caps and (where it is not llama.cpp's fixed period) which layers slide."""
    if config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))
    for key, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                     ("final_logit_softcapping", writer.add_final_logit_softcapping)):
        if config.get(key) is not None:
            add(float(config[key]))
    period = {"gemma2": 2, "gemma3": 6}[arch]
    sliding = [kind == "sliding_attention" for kind in config["layer_types"]]
    if sliding != [bool((i + 1) % period) for i in range(len(sliding))]:
        writer.add_sliding_window_pattern(sliding)


def _llama3_rope_factors(scaling: dict[str, Any], head_dim: int, theta: float) -> np.ndarray:
    """Per-frequency divisors, computed the way llama.cpp's converter writes ``rope_freqs.weight``."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = (original / wavelen - low) / (high - low)
    factors = np.where(wavelen < original / high, 1.0,
                       np.where(wavelen > original / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def _write_phi3_hparams(writer: gguf.GGUFWriter, config: dict[str, Any], head_dim: int) -> None:
    """Phi-3's original context length and window (0: none), and LongRoPE's factors as llama.cpp's converter writes
    them: two F32 tensors and the attention factor it derives from ``max / original`` positions."""
    original = config.get("original_max_position_embeddings") or config["max_position_embeddings"]
    writer.add_rope_scaling_orig_ctx_len(int(original))
    writer.add_sliding_window(int(config.get("sliding_window") or 0))
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type") not in ("longrope", "su"):
        return
    long, short = (np.asarray(scaling[key], dtype=np.float32) for key in ("long_factor", "short_factor"))
    if not len(long) == len(short) == head_dim // 2:
        raise ValueError(f"LongRoPE factors must have {head_dim // 2} values each")
    factor = config["max_position_embeddings"] / original
    writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0)
    writer.add_tensor("rope_factors_long.weight", long)
    writer.add_tensor("rope_factors_short.weight", short)
