"""Tiny random-weight vision-language checkpoints for tests: transformers' own ``LlavaForConditionalGeneration``
over the tiny Llama (or Qwen2) of :mod:`~inferneo.testing.tiny_models`, a CLIP or SigLIP vision tower of 32-pixel
images in 8-pixel patches, the tiny tokenizer with ``<image>`` added as its last token, and the image processor's
config (:func:`make_tiny_llava`); Qwen2-VL and Qwen2.5-VL (:func:`make_tiny_qwen2_vl`) and Gemma 3
(:func:`make_tiny_gemma3`) the same way."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from inferneo.testing.tiny_models import BOS_ID, EOS_ID, IM_END_ID, PAD_ID, make_tiny_tokenizer

IMAGE_TOKEN = "<image>"
# A LLaVA-1.5-style chat template: it reads each message's content as a list of parts and writes the image
# placeholder itself (as llava-hf's repositories keep it, in chat_template.json).
PARTS_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
IMAGE_SIZE = 32
PATCH_SIZE = 8


def _save(model, path: Path) -> Path:
    """``model`` saved into ``path`` (made), with the tiny tokenizer's generation config; returns the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    generation = {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, IM_END_ID], "pad_token_id": PAD_ID}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return path


def make_tiny_llava(path: Path, *, vision: str = "clip", strategy: str = "default", text_arch: str = "llama",
                    vocab_size: int = 384, hidden_size: int = 64, feature_layer: int | list[int] = -2,
                    seed: int = 0, parts_template: bool = False) -> Path:
    """Write a random-weight LLaVA checkpoint into ``path`` and return it: ``vision`` "clip" or "siglip",
    ``strategy`` LLaVA's ``vision_feature_select_strategy`` ("default" drops the tower's first position, "full"
    keeps it), the language model a tiny ``text_arch`` ("llama" or "qwen2") whose last token id is ``<image>``.
    Weights are drawn with std 0.2 (norm weights around 1) so that greedy outputs depend on the image.
    ``parts_template``: the tokenizer has no chat template; ``chat_template.json`` holds :data:`PARTS_TEMPLATE`."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2Config,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    vision_config = CLIPVisionConfig(projection_dim=32, **tower) if vision == "clip" else SiglipVisionConfig(**tower)
    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
                max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                pad_token_id=PAD_ID, tie_word_embeddings=False)
    text_config = LlamaConfig(**text) if text_arch == "llama" else Qwen2Config(**text)
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=vocab_size - 1,
                         vision_feature_select_strategy=strategy, vision_feature_layer=feature_layer,
                         initializer_range=0.2)
    config.text_config.initializer_range = 0.2
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "language_model" in name and name.endswith("norm.weight"):
                param.normal_(1.0, 0.1)
            elif "language_model" in name or "projector" in name:
                param.normal_(0.0, 0.2)
    path = _save(model, path)
    tokenizer = make_tiny_tokenizer(vocab_size - 1, add_bos=text_arch == "llama")
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == vocab_size - 1
    if parts_template:
        tokenizer.chat_template = None
        (path / "chat_template.json").write_text(json.dumps({"chat_template": PARTS_TEMPLATE}) + "\n")
    tokenizer.save_pretrained(path)
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    processor = (CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=size) if vision == "clip"
                 else SiglipImageProcessor(size=size))
    processor.save_pretrained(path)
    return path


# Qwen2-VL's image tokens, added after the tiny tokenizer's vocabulary (in this order: the last three ids).
QWEN_VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
# ChatML, with Qwen2-VL's image markers for the image parts of a message whose content is a list of parts.
QWEN_VL_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN_PATCH_SIZE = 14  # Qwen2-VL's own: a 56×56 image is 4×4 patches, 2×2 tokens at merge size 2
QWEN_MAX_PIXELS = 112 * 112  # images are resized down to at most 8×8 patches (16 tokens)


def make_tiny_qwen2_vl(path: Path, *, version: str = "2", vocab_size: int = 384, hidden_size: int = 64,
                       seed: int = 0, tie_word_embeddings: bool = False) -> Path:
    """Write a random-weight Qwen2-VL (``version`` "2") or Qwen2.5-VL ("2.5") checkpoint into ``path`` and return
    it: transformers' own model of a two-layer language model (M-RoPE sections [2, 3, 3] of 16-wide heads, rope
    base 1e6 as Qwen2-VL's) and a two-block vision transformer of 14-pixel patches, the tiny tokenizer with
    :data:`QWEN_VISION_TOKENS` as its last three tokens and :data:`QWEN_VL_TEMPLATE`, and the image processor's
    config (min 56×56, at most :data:`QWEN_MAX_PIXELS` pixels); ``tie_word_embeddings`` as Qwen2-VL 2B's. Weights
    are drawn with std 0.2 (norm weights around 1) so that greedy outputs depend on the image."""
    import transformers

    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                rms_norm_eps=1e-6, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
                initializer_range=0.2)
    if version == "2":
        vision = dict(depth=2, embed_dim=32, num_heads=2, hidden_size=hidden_size, mlp_ratio=2,
                      patch_size=QWEN_PATCH_SIZE, spatial_merge_size=2, temporal_patch_size=2)
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    elif version == "2.5":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
                      patch_size=QWEN_PATCH_SIZE, spatial_merge_size=2, temporal_patch_size=2,
                      window_size=56, fullatt_block_indexes=[1])
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"version must be '2' or '2.5'; got {version!r}")
    start, pad, end = vocab_size - 3, vocab_size - 2, vocab_size - 1
    config = config_cls(text_config=text, vision_config=vision, image_token_id=pad, video_token_id=pad,
                        vision_start_token_id=start, vision_end_token_id=end,
                        tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_q.weight"):
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.2)
    path = _save(model, path)
    tokenizer = make_tiny_tokenizer(vocab_size - 3, add_bos=False)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_VISION_TOKENS)})
    assert tokenizer.convert_tokens_to_ids(QWEN_VISION_TOKENS[1]) == pad
    tokenizer.chat_template = QWEN_VL_TEMPLATE
    tokenizer.save_pretrained(path)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=QWEN_MAX_PIXELS, patch_size=QWEN_PATCH_SIZE,
                             merge_size=2, temporal_patch_size=2).save_pretrained(path)
    return path


GEMMA3_BOI, GEMMA3_EOI, GEMMA3_IMAGE = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
# Gemma 3's chat template, cut to what the tests need: each message's parts, an image part as the begin-of-image
# token (the processor expands it), a text part as its text.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GEMMA3_TOKENS_PER_IMAGE = 4


def make_tiny_gemma3(path: Path, *, vocab_size: int = 384, hidden_size: int = 64, seed: int = 0,
                     sliding_window: int = 16) -> Path:
    """Write a random-weight ``Gemma3ForConditionalGeneration`` checkpoint into ``path`` and return it: a tiny
    Gemma 3 language model (its last three token ids ``<start_of_image>``, ``<end_of_image>`` and
    ``<image_soft_token>``), a SigLIP tower of 32-pixel images in 8-pixel patches pooled to
    :data:`GEMMA3_TOKENS_PER_IMAGE` tokens, the tokenizer (with Gemma 3's image tokens named as its processor reads
    them), a chat template and Gemma 3's image processor config. Weights are drawn with std 0.05 (norm weights
    0.3), where the tiny model's greedy answers vary with the image."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        SiglipVisionConfig,
    )
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_use_head=False)
    text = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=hidden_size // 4, max_position_embeddings=2048, rms_norm_eps=1e-6,
                            sliding_window=sliding_window, layer_types=["sliding_attention", "full_attention"],
                            query_pre_attn_scalar=32, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                            pad_token_id=PAD_ID, initializer_range=0.2)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=GEMMA3_TOKENS_PER_IMAGE,
                          boi_token_index=vocab_size - 3, eoi_token_index=vocab_size - 2,
                          image_token_index=vocab_size - 1, initializer_range=0.2)
    config.architectures = ["Gemma3ForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vision_tower" in name:
                continue
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.3)  # Gemma's norms scale by 1 + weight
            else:
                param.normal_(0.0, 0.05)
    path = _save(model, path)
    tokenizer = make_tiny_tokenizer(vocab_size - 3)
    tokenizer.add_special_tokens({"additional_special_tokens": [GEMMA3_BOI, GEMMA3_EOI, GEMMA3_IMAGE]})
    assert tokenizer.convert_tokens_to_ids(GEMMA3_IMAGE) == vocab_size - 1
    tokenizer.chat_template = GEMMA3_TEMPLATE
    tokenizer.save_pretrained(path)
    Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)
    return path
