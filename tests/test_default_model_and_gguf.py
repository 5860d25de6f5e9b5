"""The bundled default model answers sensibly; safetensors and GGUF copies of the same weights agree."""

from __future__ import annotations

import subprocess
import sys

import pytest

from inferneo import LLM, SamplingParams
from inferneo.testing import make_tiny_gguf

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def default_llm():
    return LLM()


def test_default_model_knows_the_capital_of_france(default_llm):
    out = default_llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8),
                               use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    # SmolLM2's tokenizer adds no BOS to plain text.
    assert out.prompt_token_ids == default_llm.get_tokenizer()("The capital of France is").input_ids
    assert out.prompt_token_ids[0] != default_llm.get_tokenizer().bos_token_id


def test_default_model_chat_stops_at_im_end(default_llm):
    out = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] == default_llm.get_tokenizer().convert_tokens_to_ids("<|im_end|>")
    assert "<|im_end|>" not in out.text


@pytest.mark.parametrize("gguf_dtype", ["F32", "F16"])
def test_gguf_and_safetensors_give_identical_greedy_outputs(tiny_checkpoint_factory, tmp_path, gguf_dtype):
    hf_dir = tiny_checkpoint_factory("llama", tie_word_embeddings=False)
    if gguf_dtype == "F16":
        # F16 rounds the weights; the same rounding applied to the safetensors copy must give the same tokens.
        hf_dir = tiny_checkpoint_factory("llama", tie_word_embeddings=False, torch_dtype=__import__("torch").float16)
    gguf_file = make_tiny_gguf(hf_dir, tmp_path / f"tiny-{gguf_dtype}.gguf", dtype=gguf_dtype)
    prompts = [[5 + i, 17, 33 + 2 * i, 90] for i in range(8)] + ["the quick brown fox"]
    from_st = LLM(str(hf_dir), dtype="float32").generate(prompts, GREEDY, use_tqdm=False)
    from_gguf = LLM(str(gguf_file), dtype="float32").generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in from_gguf] == [o.outputs[0].token_ids for o in from_st]
    assert from_gguf[-1].prompt_token_ids == from_st[-1].prompt_token_ids


def test_cli_generate_prints_a_continuation(tiny_checkpoint_factory):
    path = str(tiny_checkpoint_factory("llama"))
    result = subprocess.run(
        [sys.executable, "-m", "inferneo.cli", "generate", "the cat", "--model", path, "--max-tokens", "5"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    expected = LLM(path).generate("the cat", SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert result.stdout.strip() == expected[0].outputs[0].text.strip()


def test_cli_reports_a_missing_model_cleanly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "inferneo.cli", "generate", "x", "--model", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "error" in result.stderr and "missing" in result.stderr
    assert "Traceback" not in result.stderr
