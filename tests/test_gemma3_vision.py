"""Gemma 3 with images (``Gemma3ForConditionalGeneration``): its image half (transformers' SigLIP tower and Gemma 3
projector) gives transformers' image features, and its prompts expand each ``<start_of_image>`` as Gemma 3's own
processor does, with the same pixels."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from inferneo import LLM, SamplingParams
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


MAX_NEW = 8
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, logprobs=0)
ONE = "<|im_start|>user\nWhat is in <start_of_image> this picture of the quick brown fox?<|im_end|>\n"
TWO = "Compare <start_of_image> with <start_of_image>: which one is brighter, and why?"
TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps"


@functools.cache
def _hf_model(path: str):
    from transformers import Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # as ignore_eos
    return model


def hf_greedy(path, prompt_ids: list[int], pictures: list[Image.Image], *,
              bidirectional: bool = True) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens and their log-probabilities for the expanded ids, with Gemma3Processor's pixels
    and (``bidirectional``) its ``token_type_ids``, which make each image's tokens attend to each other."""
    model = _hf_model(str(path))
    ids = torch.tensor([prompt_ids])
    inputs = {"input_ids": ids}
    if pictures:
        inputs["pixel_values"] = hf_processor(path).image_processor(images=pictures,
                                                                    return_tensors="pt")["pixel_values"]
        if bidirectional:
            inputs["token_type_ids"] = (ids == model.config.image_token_id).long()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    return tokens, [torch.log_softmax(logits[0], -1)[t].item() for logits, t in zip(out.logits, tokens, strict=True)]


def pictures_of(request) -> list[Image.Image]:
    if isinstance(request, str):
        return []
    image = request["multi_modal_data"]["image"]
    return image if isinstance(image, list) else [image]


def ours(output) -> tuple[list[int], list[float]]:
    tokens = list(output.outputs[0].token_ids)
    return tokens, [step[t].logprob for step, t in zip(output.outputs[0].logprobs, tokens, strict=True)]


def same(a: tuple[list[int], list[float]], b: tuple[list[int], list[float]]) -> bool:
    """The same greedy tokens with log-probabilities within float32 noise."""
    return a[0] == b[0] and bool(np.allclose(a[1], b[1], rtol=0, atol=1e-4))


def check_against_hf(path, llm: LLM, batch, params: SamplingParams = GREEDY) -> list:
    outputs = llm.generate(batch, params, use_tqdm=False)
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.num_blocks, "KV blocks leaked"
    for output, request in zip(outputs, batch, strict=True):
        expected = hf_greedy(path, list(output.prompt_token_ids), pictures_of(request))
        assert same(ours(output), expected), (ours(output), expected)
    return outputs


@pytest.fixture(scope="module")
def llm(gemma3):
    return LLM(str(gemma3), dtype="float32", max_model_len=512)


def test_batch_of_image_and_text_prompts_equals_hugging_face(gemma3, llm):
    pictures = images(4, seed=3)
    batch = [{"prompt": ONE, "multi_modal_data": {"image": pictures[0]}},
             TEXT,
             {"prompt": TWO, "multi_modal_data": {"image": [pictures[1], pictures[2]]}},
             {"prompt": ONE, "multi_modal_data": {"image": pictures[3]}}]
    outputs = check_against_hf(gemma3, llm, batch)
    assert [o.prompt_token_ids.count(383) for o in outputs] == [4, 0, 8, 4]
    got = [list(o.outputs[0].token_ids) for o in outputs]
    assert got[0] != got[3], "two images under the same text gave the same tokens: the image is not read"
    # The bidirectional image block matters: transformers without it (causal only) scores otherwise, so an engine
    # that ignored it would fail the comparison above.
    for output, request in zip(outputs, batch, strict=True):
        if not isinstance(request, str):
            causal = hf_greedy(gemma3, list(output.prompt_token_ids), pictures_of(request), bidirectional=False)
            assert not same(ours(output), causal)


def test_chunked_prefill_keeps_each_image_whole(gemma3):
    """A 6-token budget chunks the text around the images, and never ends a chunk inside one (4 tokens each)."""
    llm = LLM(str(gemma3), dtype="float32", max_model_len=512, max_num_batched_tokens=6)
    pictures = images(3, seed=7)
    batch = [{"prompt": TWO, "multi_modal_data": {"image": pictures[:2]}},
             {"prompt": ONE, "multi_modal_data": {"image": pictures[2]}}]
    outputs = check_against_hf(gemma3, llm, batch)
    assert llm.engine.core.stats.num_steps > len(outputs[0].prompt_token_ids) // 6  # chunked


def test_tensor_parallel_ranks_see_the_image_blocks(gemma3):
    """Two ranks (gloo): the driver's image features and each image's block of rows reach the other rank."""
    llm = LLM(str(gemma3), dtype="float32", max_model_len=512, max_num_batched_tokens=6, tensor_parallel_size=2,
              num_threads=1)
    try:
        pictures = images(3, seed=11)
        check_against_hf(gemma3, llm, [{"prompt": TWO, "multi_modal_data": {"image": pictures[:2]}}, TEXT,
                                       {"prompt": ONE, "multi_modal_data": {"image": pictures[2]}}])
    finally:
        llm.shutdown()


def test_an_image_larger_than_a_step_is_refused_at_start(gemma3):
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(3\) must be >= the 4 tokens of one image"):
        LLM(str(gemma3), dtype="float32", max_model_len=512, max_num_batched_tokens=3)


def test_prefix_cache_hit_on_a_repeated_image(gemma3):
    llm = LLM(str(gemma3), dtype="float32", block_size=4, max_model_len=512)
    prompt = {"prompt": ONE, "multi_modal_data": {"image": images(1, seed=11)[0]}}
    first = check_against_hf(gemma3, llm, [prompt])
    again = check_against_hf(gemma3, llm, [prompt])
    image_end = first[0].prompt_token_ids.index(383) + 4
    assert again[0].num_cached_tokens > image_end
    assert same(ours(again[0]), ours(first[0]))


def test_a_window_shorter_than_an_image_cuts_the_image_block_as_transformers_does(tmp_path):
    """Sliding layers of 3 tokens, images of 4: an image's rows see the image's keys within the window only."""
    path = make_tiny_gemma3(tmp_path, sliding_window=3)
    llm = LLM(str(path), dtype="float32", max_model_len=512)
    pictures = images(2, seed=13)
    check_against_hf(path, llm, [{"prompt": TWO, "multi_modal_data": {"image": pictures}}])
