"""Gemma 3 with images (``Gemma3ForConditionalGeneration``): its image half (transformers' SigLIP tower and Gemma 3
projector) gives transformers' image features, and its prompts expand each ``<start_of_image>`` as Gemma 3's own
processor does, with the same pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from inferneo.model_executor.models.gemma import Gemma3ForCausalLM
from inferneo.model_executor.models.gemma3_vision import Gemma3VisionLanguageModel
from inferneo.model_executor.models.llava import vision_language_class
from inferneo.model_loader.hf_files import (
    iter_hf_weights,
    read_json,
    vision_language_model_config,
    with_both_spellings,
)
from inferneo.multimodal.config import vision_language_of
from inferneo.multimodal.prompts import ImagePrompts
from inferneo.testing.vision_models import GEMMA3_TOKENS_PER_IMAGE, make_tiny_gemma3


def images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8))
            for h, w in rng.integers(24, 64, (count, 2))]


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return make_tiny_gemma3(tmp_path_factory.mktemp("gemma3"))


def served_config(path) -> dict:
    return with_both_spellings(vision_language_model_config(read_json(path / "config.json")))


def hf_processor(path):
    from transformers import AutoImageProcessor, AutoTokenizer, Gemma3Processor

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.boi_token, tokenizer.eoi_token, tokenizer.image_token = (
        "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    tokenizer.boi_token_id, tokenizer.eoi_token_id, tokenizer.image_token_id = tokenizer.convert_tokens_to_ids(
        [tokenizer.boi_token, tokenizer.eoi_token, tokenizer.image_token])
    return Gemma3Processor(image_processor=AutoImageProcessor.from_pretrained(path), tokenizer=tokenizer,
                           image_seq_length=GEMMA3_TOKENS_PER_IMAGE)


def test_config_reads_gemma3_image_settings(gemma3):
    cfg = served_config(gemma3)
    config = vision_language_of(cfg)
    assert cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert (config.num_image_tokens, config.begin_token_id, config.end_token_id, config.image_token_id) == (
        GEMMA3_TOKENS_PER_IMAGE, 381, 382, 383)


def test_image_features_match_transformers(gemma3):
    """encode_image is transformers' get_image_features for the same pixels (tower, pooling, norm, projection)."""
    from transformers import Gemma3ForConditionalGeneration

    cfg = served_config(gemma3)
    cls = vision_language_class(Gemma3ForCausalLM, vision_language_of(cfg), Gemma3VisionLanguageModel)
    model = cls(cls.config_from_hf(cfg), backend=None)
    loaded = model.load_weights(iter_hf_weights(gemma3))
    assert any(name.startswith("multi_modal_projector.mm_input_projection_weight") for name in loaded)
    hf = Gemma3ForConditionalGeneration.from_pretrained(gemma3, dtype=torch.float32).eval()
    pixels = hf_processor(gemma3).image_processor(images=images(2), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = hf.get_image_features(pixel_values=pixels).pooler_output
        for index in range(2):
            ours = model.encode_image(pixels[index])
            assert ours.shape == (GEMMA3_TOKENS_PER_IMAGE, 64)
            torch.testing.assert_close(ours, expected[index], rtol=0, atol=1e-6)
    assert not torch.allclose(expected[0], expected[1])


@pytest.mark.parametrize("text", ["Describe <start_of_image> please.", "<start_of_image> or <start_of_image>?"])
def test_prompt_expansion_matches_processor(gemma3, text):
    """ImagePrompts turns each begin-of-image token into Gemma 3's image sequence ("\\n\\n", begin, the image
    tokens, end, "\\n\\n") and preprocesses the images as Gemma3Processor does."""
    processor = hf_processor(gemma3)
    pictures = images(text.count("<start_of_image>"), seed=1)
    expected = processor(text=text, images=pictures, return_tensors="pt")
    prompts = ImagePrompts(gemma3, vision_language_of(served_config(gemma3)), processor.tokenizer)
    ids, inputs = prompts.prepare(processor.tokenizer.encode(text), pictures)
    assert ids == expected["input_ids"][0].tolist()
    for image, pixels in zip(inputs, expected["pixel_values"], strict=True):
        assert ids[image.offset:image.end] == [383] * GEMMA3_TOKENS_PER_IMAGE
        assert ids[image.offset - 1] == 381 and ids[image.end] == 382
        torch.testing.assert_close(image.tensor(), pixels)
