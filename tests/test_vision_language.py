"""Images in prompts: LLaVA-style models (a CLIP or SigLIP vision tower, LLaVA's projector, a Llama or Qwen2
language model) generate Hugging Face's greedy tokens for the same images, across batches of image and text
prompts, chunked prefill through an image's tokens, prefix-cache hits and preemption; blocks holding image tokens
are keyed by the image; and prompts whose images do not fit their placeholders are refused."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from inferneo import LLM, BeamSearchParams, SamplingParams
from inferneo.engine.protocol import InvalidRequestError
from inferneo.testing.vision_models import make_tiny_llava
from tests.test_hf_parity import kv_bytes_per_block

MAX_NEW = 10
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
TEXT = "USER: <image>\nwhat is the quick brown fox doing here? ASSISTANT:"
TWO_IMAGES = "USER: <image> and <image>: which one is brighter? ASSISTANT:"


def images(count: int, seed: int = 0) -> list[Image.Image]:
    """Random RGB images of assorted sizes (the image processor resizes and crops them)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8))
            for h, w in rng.integers(24, 64, (count, 2))]


# (vision tower, select strategy, language model, feature layer)
VARIANTS = {
    "clip-default-llama": ("clip", "default", "llama", -2),
    "siglip-full-qwen2": ("siglip", "full", "qwen2", -1),
    "clip-full-two-layers": ("clip", "full", "llama", [-2, -1]),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def llava(request, tmp_path_factory):
    vision, strategy, text_arch, layer = VARIANTS[request.param]
    return make_tiny_llava(tmp_path_factory.mktemp(request.param), vision=vision, strategy=strategy,
                           text_arch=text_arch, feature_layer=layer)


@functools.cache
def _hf_model(path: str):
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # as ignore_eos: MAX_NEW tokens, EOS among them
    return model, AutoImageProcessor.from_pretrained(path)


def hf_greedy(path, prompt_ids: list[int], pictures: list[Image.Image], max_new: int = MAX_NEW) -> list[int]:
    """transformers' greedy tokens for the expanded prompt ids and the images' pixels from the same processor."""
    model, processor = _hf_model(str(path))
    ids = torch.tensor([prompt_ids])
    inputs = {"input_ids": ids}
    if pictures:
        inputs["pixel_values"] = processor(images=pictures, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def requests(pictures: list[Image.Image]) -> list:
    """Four prompts: two with one image each, one with two images, one of text alone."""
    return [
        {"prompt": TEXT, "multi_modal_data": {"image": pictures[0]}},
        {"prompt": TWO_IMAGES, "multi_modal_data": {"image": [pictures[1], pictures[2]]}},
        "USER: what is the quick brown fox doing here? ASSISTANT:",
        {"prompt": TEXT, "multi_modal_data": {"image": pictures[3]}},
    ]


def expected_for(path, outputs, batch, max_new: int = MAX_NEW) -> list[list[int]]:
    pictures = [[] if isinstance(r, str) else r["multi_modal_data"]["image"] for r in batch]
    pictures = [p if isinstance(p, list) else [p] for p in pictures]
    return [hf_greedy(path, list(o.prompt_token_ids), p, max_new) for o, p in zip(outputs, pictures, strict=True)]


def generate(llm: LLM, batch, params: SamplingParams = GREEDY) -> tuple[list, list[list[int]]]:
    outputs = llm.generate(batch, params, use_tqdm=False)
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.num_blocks, "KV blocks leaked"
    return outputs, [list(o.outputs[0].token_ids) for o in outputs]


def test_batch_of_image_and_text_prompts_equals_hugging_face(llava):
    llm = LLM(str(llava), dtype="float32", max_num_batched_tokens=16, max_model_len=512)
    pictures = images(4)
    batch = requests(pictures)
    outputs, got = generate(llm, batch)
    model = llm.engine.runner.model
    per_image = model.num_image_tokens
    assert [o.prompt_token_ids.count(model.image_token_id) for o in outputs] == [per_image, 2 * per_image, 0,
                                                                                  per_image]
    assert got == expected_for(llava, outputs, batch)
    assert got[0] != got[3], "two images under the same text gave the same tokens: the image is not read"
    assert llm.engine.core.stats.num_steps > 2 * len(outputs[1].prompt_token_ids) // 16  # chunked prefill


def test_tensor_parallel_ranks_read_the_drivers_image_features(tmp_path):
    """Two ranks (gloo): the driver encodes the images and broadcasts their features to the other rank, whose
    shard of the language model reads them in place of the image tokens' embeddings; chunked prefill splits the
    images."""
    path = make_tiny_llava(tmp_path)
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=16, max_model_len=512, tensor_parallel_size=2,
              num_threads=1)
    try:
        batch = requests(images(4, seed=3))
        outputs, got = generate(llm, batch)
        assert got == expected_for(path, outputs, batch)
    finally:
        llm.shutdown()


def test_image_limits_and_local_files(tmp_path):
    """limit_mm_per_prompt caps a prompt's images; file:// URLs read files under allowed_local_media_path alone
    (links resolved first) and answer as the same image given as a PIL image does."""
    path = make_tiny_llava(tmp_path / "model")
    media = tmp_path / "media"
    media.mkdir()
    picture = images(1, seed=9)[0]
    picture.save(media / "cat.png")
    (tmp_path / "secret.png").write_bytes((media / "cat.png").read_bytes())
    (media / "link.png").symlink_to(tmp_path / "secret.png")
    llm = LLM(str(path), dtype="float32", max_model_len=512, limit_mm_per_prompt={"image": 1},
              allowed_local_media_path=str(media))
    try:
        by_file, by_pil = (llm.generate({"prompt": TEXT, "multi_modal_data": {"image": image}}, GREEDY,
                                        use_tqdm=False)[0] for image in ((media / "cat.png").as_uri(), picture))
        assert by_file.outputs[0].token_ids == by_pil.outputs[0].token_ids
        with pytest.raises(ValueError, match=r"at most 1 image here \(limit_mm_per_prompt\), got 2"):
            llm.generate({"prompt": TWO_IMAGES, "multi_modal_data": {"image": [picture, picture]}}, GREEDY,
                         use_tqdm=False)
        for outside in ((media / "link.png").as_uri(), (tmp_path / "secret.png").as_uri(), media.as_uri()):
            with pytest.raises(ValueError, match="is not a file under the folder"):
                llm.generate({"prompt": TEXT, "multi_modal_data": {"image": outside}}, GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()
    with pytest.raises(ValueError, match="limit_mm_per_prompt: unknown modality 'images'"):
        LLM(str(path), limit_mm_per_prompt={"images": 1})


def test_prefix_cache_hits_are_keyed_by_the_image(llava):
    block_size = 16 if torch.cuda.is_available() else 4  # the Triton backend pages >= 16 tokens
    llm = LLM(str(llava), dtype="float32", block_size=block_size, max_model_len=512)
    first, second = images(2, seed=5)
    prompt = {"prompt": TEXT, "multi_modal_data": {"image": first}}
    outputs, got = generate(llm, [prompt])
    image_end = outputs[0].prompt_token_ids.index(llm.engine.runner.model.image_token_id)
    again, got_again = generate(llm, [prompt])  # the same image: the blocks through the image are hits
    assert got_again == got
    assert again[0].num_cached_tokens > image_end + llm.engine.runner.model.num_image_tokens
    other, got_other = generate(llm, [{"prompt": TEXT, "multi_modal_data": {"image": second}}])
    assert other[0].num_cached_tokens <= image_end  # only the text before the image
    assert got_other == expected_for(llava, other, [{"multi_modal_data": {"image": second}}])
    assert got_other != got


def test_preemption_keeps_hugging_face_tokens(llava):
    blocks = 10  # of 16 tokens: two prompts fit, and then their answers need more than there is
    llm = LLM(str(llava), dtype="float32", max_model_len=512,
              kv_cache_memory=blocks * kv_bytes_per_block(str(llava)))
    batch = requests(images(4, seed=9))
    longer = SamplingParams(max_tokens=3 * MAX_NEW, temperature=0.0, ignore_eos=True)
    outputs, got = generate(llm, batch, longer)
    assert llm.engine.core.stats.num_preemptions > 0
    assert got == expected_for(llava, outputs, batch, 3 * MAX_NEW)


def test_images_that_do_not_fit_the_prompt_are_refused(tmp_path):
    llm = LLM(str(make_tiny_llava(tmp_path)), dtype="float32", max_model_len=512)
    picture = images(1)[0]
    with pytest.raises(InvalidRequestError, match="1 image placeholder .* and 2 images"):
        llm.generate({"prompt": TEXT, "multi_modal_data": {"image": [picture, picture]}}, GREEDY)
    with pytest.raises(InvalidRequestError, match="1 image placeholder .* and 0 images"):
        llm.generate(TEXT, GREEDY)
    with pytest.raises(InvalidRequestError, match="not valid base64"):
        llm.generate({"prompt": TEXT, "multi_modal_data": {"image": "data:image/png;base64,@@@"}}, GREEDY)
    huge = Image.new("1", (8000, 8000))  # a few kilobytes of PNG declaring 64 million pixels
    with pytest.raises(InvalidRequestError, match="8000x8000 pixels; at most 40 million"):
        llm.generate({"prompt": TEXT, "multi_modal_data": {"image": data_url(huge)}}, GREEDY)
    with pytest.raises(ValueError, match="images only"):
        llm.generate({"prompt": TEXT, "multi_modal_data": {"audio": picture}}, GREEDY)
    with pytest.raises(ValueError, match="text prompts only"):
        llm.beam_search([{"prompt": TEXT, "multi_modal_data": {"image": picture}}], BeamSearchParams(beam_width=2, max_tokens=4))
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.num_blocks


def test_a_text_model_refuses_images(tiny_checkpoint_factory):
    llm = LLM(str(tiny_checkpoint_factory("llama")), dtype="float32")
    with pytest.raises(InvalidRequestError, match="text only"):
        llm.generate({"prompt": "hello", "multi_modal_data": {"image": images(1)[0]}}, GREEDY)


def data_url(picture: Image.Image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_with_image(picture, url: bool = True) -> list[dict]:
    part = ({"type": "image_url", "image_url": {"url": data_url(picture)}} if url
            else {"type": "image_pil", "image_pil": picture})
    return [{"role": "user", "content": [{"type": "text", "text": "look:"}, part,
                                         {"type": "text", "text": "what is it?"}]}]


def test_chat_with_image_parts_equals_generate_on_the_rendered_prompt(tmp_path):
    llm = LLM(str(make_tiny_llava(tmp_path)), dtype="float32", max_model_len=512)
    first, second = images(2, seed=3)
    chats = llm.chat([chat_with_image(first), chat_with_image(second, url=False)], GREEDY, use_tqdm=False)
    for output, picture in zip(chats, (first, second), strict=True):
        assert "look:\n<image>\nwhat is it?" in output.prompt
        direct = llm.generate({"prompt_token_ids": llm.get_tokenizer()(output.prompt, add_special_tokens=False)
                               .input_ids, "multi_modal_data": {"image": picture}}, GREEDY, use_tqdm=False)[0]
        assert direct.prompt_token_ids == output.prompt_token_ids
        assert direct.outputs[0].token_ids == output.outputs[0].token_ids
    assert chats[0].outputs[0].token_ids != chats[1].outputs[0].token_ids


def test_sleep_keeps_answers_and_weight_updates_are_refused(tmp_path):
    path = make_tiny_llava(tmp_path)
    llm = LLM(str(path), dtype="float32", max_model_len=512)
    batch = requests(images(4, seed=21))
    _, before = generate(llm, batch)
    from safetensors.torch import load_file

    name, tensor = next(iter(load_file(str(path / "model.safetensors")).items()))
    with pytest.raises(ValueError, match="vision-language models are not supported"):
        llm.update_weights([(name, tensor)])
    llm.sleep(level=1)
    llm.wake_up()
    assert generate(llm, batch)[1] == before


def test_a_template_of_content_parts_reads_parts(tmp_path):
    """A LLaVA-1.5-style template (from chat_template.json) loops over each message's parts and writes the image
    placeholder itself: messages reach it as parts, text-only ones too, and the answer equals generate's."""
    llm = LLM(str(make_tiny_llava(tmp_path, parts_template=True)), dtype="float32", max_model_len=512)
    picture = images(1, seed=8)[0]
    output = llm.chat(chat_with_image(picture), GREEDY, use_tqdm=False)[0]
    assert output.prompt == "USER: look: <image>\nwhat is it? ASSISTANT:"
    ids = llm.get_tokenizer()(output.prompt, add_special_tokens=False).input_ids  # as chat tokenizes a rendering
    direct = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": picture}}, GREEDY,
                          use_tqdm=False)[0]
    assert direct.prompt_token_ids == output.prompt_token_ids
    assert direct.outputs[0].token_ids == output.outputs[0].token_ids
    text_only = llm.chat([{"role": "user", "content": "hello there"}], GREEDY, use_tqdm=False)[0]
    assert text_only.prompt == "USER: hello there ASSISTANT:"


def test_the_memory_profile_runs_the_vision_tower(tmp_path):
    """On CUDA the KV budget comes from a profiled step; for a vision-language model it also encodes a blank image,
    so the tower's activations are counted (here: the call itself, on the CPU)."""
    from inferneo.worker.memory import dummy_image

    llm = LLM(str(make_tiny_llava(tmp_path)), dtype="float32", max_model_len=512)
    model = llm.engine.runner.model
    features = dummy_image(llm.engine.runner)
    assert features.shape == (model.num_image_tokens, 64)
