"""Qwen2-VL and Qwen2.5-VL with images: transformers' own vision transformer in front of the engine's Qwen2 with
M-RoPE generates Hugging Face's greedy tokens (float32, the same tiny random weights) for batches that mix image
and text-only prompts, two images of different sizes in one prompt, chunked prefill through an image's tokens,
prefix-cache hits on a repeated image prompt, preemption, both CPU attention paths, and checkpoints of transformers
4's layout; the M-RoPE positions equal transformers' ``get_rope_index``."""

from __future__ import annotations

import functools
import json

import msgspec
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from inferneo import LLM, SamplingParams
from inferneo.kernel_config import KernelConfig
from inferneo.multimodal.inputs import ImageInput
from inferneo.multimodal.mrope import mrope_delta, mrope_positions
from inferneo.testing.vision_models import make_tiny_qwen2_vl

MAX_NEW = 10
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
ONE_IMAGE = f"<|im_start|>user\n{IMAGE}what is the quick brown fox doing?<|im_end|>\n<|im_start|>assistant\n"
TWO_IMAGES = f"<|im_start|>user\n{IMAGE} and {IMAGE}: which one is brighter?<|im_end|>\n<|im_start|>assistant\n"
TEXT_ONLY = "<|im_start|>user\nwhat is the quick brown fox doing?<|im_end|>\n<|im_start|>assistant\n"
BACKENDS = {"torch": KernelConfig(cpu_native_kernels=False), "native": KernelConfig(cpu_native_kernels=True)}


def images(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    """Random RGB images of these (height, width) sizes (56×56 is 2×2 tokens; the largest, 112×112, 4×4)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.fixture(scope="module", params=["2", "2.5"])
def qwen_vl(request, tmp_path_factory):
    return make_tiny_qwen2_vl(tmp_path_factory.mktemp(f"qwen{request.param}-vl"), version=request.param)


@functools.cache
def _hf_model(path: str):
    import transformers

    config = json.loads((transformers.utils.hub.Path(path) / "config.json").read_text())
    model_cls = getattr(transformers, config["architectures"][0])
    model = model_cls.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # as ignore_eos: MAX_NEW tokens, EOS among them
    return model, transformers.AutoImageProcessor.from_pretrained(path)


def hf_greedy(path, prompt_ids: list[int], pictures: list[Image.Image], max_new: int = MAX_NEW) -> list[int]:
    """transformers' greedy tokens for the expanded prompt ids and the same processor's patches of the images."""
    model, processor = _hf_model(str(path))
    ids = torch.tensor([prompt_ids])
    inputs = {"input_ids": ids}
    if pictures:
        inputs.update(processor(images=pictures, return_tensors="pt"))
        inputs["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def generate(llm: LLM, batch) -> tuple[list, list[list[int]]]:
    outputs = llm.generate(batch, GREEDY, use_tqdm=False)
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.num_blocks, "KV blocks leaked"
    return outputs, [list(o.outputs[0].token_ids) for o in outputs]


def expected_for(path, outputs, batch) -> list[list[int]]:
    pictures = [[] if isinstance(r, str) else r["multi_modal_data"]["image"] for r in batch]
    pictures = [p if isinstance(p, list) else [p] for p in pictures]
    return [hf_greedy(path, list(o.prompt_token_ids), p) for o, p in zip(outputs, pictures, strict=True)]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_batch_of_image_and_text_prompts_equals_hugging_face(qwen_vl, backend):
    """One image, two images of different sizes, text alone, and the first image's prompt again with another
    image, in one batch whose 8-token chunks split every image's tokens."""
    llm = LLM(str(qwen_vl), dtype="float32", max_num_batched_tokens=8, max_model_len=512, block_size=4,
              kernels=BACKENDS[backend])
    model = llm.engine.runner.model
    attention = type(model.layers[0].self_attn).__name__
    assert attention == ("MRopeInplaceRotaryAttention" if backend == "native" else "Attention")
    first, small, wide = images([(56, 56), (56, 84), (112, 84)])
    batch = [{"prompt": ONE_IMAGE, "multi_modal_data": {"image": first}},
             {"prompt": TWO_IMAGES, "multi_modal_data": {"image": [small, wide]}},
             TEXT_ONLY,
             {"prompt": ONE_IMAGE, "multi_modal_data": {"image": wide}}]
    outputs, got = generate(llm, batch)
    pad = model.image_token_id
    assert [o.prompt_token_ids.count(pad) for o in outputs] == [4, 6 + 12, 0, 12]  # grid / merge²
    assert got == expected_for(qwen_vl, outputs, batch)
    assert got[0] != got[3], "two images under the same text gave the same tokens: the image is not read"
    assert llm.engine.core.stats.num_steps > len(outputs[1].prompt_token_ids) // 8  # chunked prefill


def test_tensor_parallel_ranks_take_the_drivers_features_and_3d_positions(qwen_vl):
    """Two ranks (gloo): the driver's image features and the ``[3, T]`` positions of steps with image tokens reach
    the other rank with the step."""
    llm = LLM(str(qwen_vl), dtype="float32", max_num_batched_tokens=8, max_model_len=512, block_size=4,
              tensor_parallel_size=2, num_threads=1)
    try:
        first, small, wide = images([(56, 56), (56, 84), (112, 84)], seed=2)
        batch = [{"prompt": ONE_IMAGE, "multi_modal_data": {"image": first}},
                 {"prompt": TWO_IMAGES, "multi_modal_data": {"image": [small, wide]}}, TEXT_ONLY]
        outputs, got = generate(llm, batch)
        assert got == expected_for(qwen_vl, outputs, batch)
    finally:
        llm.shutdown()


def test_a_repeated_image_prompt_hits_the_prefix_cache(qwen_vl):
    llm = LLM(str(qwen_vl), dtype="float32", max_model_len=512, block_size=4)
    picture, other = images([(84, 112), (84, 112)], seed=5)
    prompt = {"prompt": TWO_IMAGES, "multi_modal_data": {"image": [picture, other]}}
    outputs, got = generate(llm, [prompt])
    again, got_again = generate(llm, [prompt])
    last_image = len(outputs[0].prompt_token_ids) - outputs[0].prompt_token_ids[::-1].index(
        llm.engine.runner.model.image_token_id)
    assert again[0].num_cached_tokens >= last_image  # both images' tokens, and the text between them, are hits
    assert got_again == got == expected_for(qwen_vl, outputs, [prompt])
    # the memory profile encodes the largest image the processor leaves (112×112: 8×8 patches, 16 tokens) too
    from inferneo.worker.memory import dummy_image

    assert dummy_image(llm.engine.runner).shape == (16, 64)


def test_preemption_keeps_hugging_face_tokens(qwen_vl):
    """A preempted sequence's recomputation runs its prompt and generated tokens as one span: its image tokens'
    3D positions and the shifted positions after them come back the same."""
    from tests.test_hf_parity import kv_bytes_per_block

    llm = LLM(str(qwen_vl), dtype="float32", max_model_len=512, kv_cache_memory=8 * kv_bytes_per_block(str(qwen_vl)))
    pictures = images([(112, 112), (56, 112), (84, 84)], seed=9)
    batch = [{"prompt": ONE_IMAGE, "multi_modal_data": {"image": picture}} for picture in pictures]
    longer = SamplingParams(max_tokens=3 * MAX_NEW, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(batch, longer, use_tqdm=False)
    assert llm.engine.core.stats.num_preemptions > 0
    assert [list(o.outputs[0].token_ids) for o in outputs] == [
        hf_greedy(qwen_vl, list(o.prompt_token_ids), [p], 3 * MAX_NEW) for o, p in zip(outputs, pictures, strict=True)]


def _copy_checkpoint(source, target, rename, flatten_config: bool) -> None:
    """``source``'s checkpoint into ``target`` with its weights renamed by ``rename`` and (``flatten_config``) its
    config as transformers 4 wrote it: the text config at the top level, ``rope_scaling`` of type "mrope"."""
    target.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
        (target / name).write_bytes((source / name).read_bytes())
    weights = load_file(str(source / "model.safetensors"))
    save_file({rename(name): tensor for name, tensor in weights.items()}, str(target / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    if flatten_config:
        text = config.pop("text_config")
        rope = text.pop("rope_parameters")
        config.update({k: v for k, v in text.items() if k not in ("model_type", "architectures")})
        config.update(rope_theta=rope["rope_theta"],
                      rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    (target / "config.json").write_text(json.dumps(config))


def test_checkpoint_layouts_read_the_same(qwen_vl, tmp_path):
    """transformers saves ``model.layers.*``, ``visual.*`` and ``lm_head.*`` (as transformers 4 did); its
    in-memory names, which some checkpoints carry, are ``model.language_model.*`` and ``model.visual.*``; and
    transformers 4 wrote the text config at the top level. Each answers the same."""
    assert any(name.startswith("visual.") for name in load_file(str(qwen_vl / "model.safetensors")))
    nested = tmp_path / "nested"
    _copy_checkpoint(qwen_vl, nested, lambda name: name.replace("model.", "model.language_model.", 1)
                     .replace("visual.", "model.visual.", 1) if not name.startswith("lm_head.") else name, False)
    flat = tmp_path / "flat"
    _copy_checkpoint(qwen_vl, flat, lambda name: name, True)
    batch = [{"prompt": ONE_IMAGE, "multi_modal_data": {"image": images([(56, 112)], seed=7)[0]}}]
    got = [generate(LLM(str(path), dtype="float32", max_model_len=512), batch)[1] for path in (qwen_vl, nested, flat)]
    assert got[0] == got[1] == got[2]


def test_tied_embeddings_equal_hugging_face(tmp_path):
    """Qwen2-VL 2B ties its output head to the embeddings; transformers 5 says so at the config's top level."""
    path = make_tiny_qwen2_vl(tmp_path, tie_word_embeddings=True)
    llm = LLM(str(path), dtype="float32", max_model_len=512)
    batch = [{"prompt": ONE_IMAGE, "multi_modal_data": {"image": images([(84, 56)], seed=2)[0]}}, TEXT_ONLY]
    outputs, got = generate(llm, batch)
    assert got == expected_for(path, outputs, batch)


def test_mrope_positions_equal_transformers_rope_index(qwen_vl):
    """Positions of a prompt with text, two images of different grids, text between and after, against
    ``get_rope_index``; the delta of the tokens after the prompt against its ``rope_deltas``; and any span of the
    prompt (a chunk) alone gives that span's positions."""
    model, _ = _hf_model(str(qwen_vl))
    pad = model.config.image_token_id
    grids = [(1, 4, 6), (1, 8, 4)]  # patch grids: 2×3 and 4×2 tokens
    ids, records = [5, 6, 7], []
    for grid, gap in zip(grids, (4, 3), strict=True):
        count = grid[0] * grid[1] * grid[2] // 4
        records.append(ImageInput(len(ids), count, b"", (), f"{grid}", grid))
        ids += [pad] * count + [9] * gap
    tensor = torch.tensor([ids])
    expected, deltas = model.model.get_rope_index(tensor, (tensor == pad).int(), image_grid_thw=torch.tensor(grids))
    assert np.array_equal(mrope_positions(records, 0, len(ids), 2), expected[:, 0].numpy())
    assert mrope_delta(records, 2) == int(deltas[0, 0])
    assert np.array_equal(mrope_positions(records, 5, 17, 2), expected[:, 0, 5:17].numpy())
    after = mrope_positions(records, len(ids), len(ids) + 3, 2)
    assert np.array_equal(after, np.tile(np.arange(len(ids), len(ids) + 3) + int(deltas[0, 0]), (3, 1)))


def test_image_records_without_a_grid_still_decode():
    """``ImageInput.grid`` is a trailing field with a default: a record of the earlier five fields decodes."""
    old = msgspec.msgpack.encode([3, 4, b"\0" * 4, [1], "digest"])
    record = msgspec.msgpack.decode(old, type=ImageInput)
    assert record.grid == () and record.end == 7
