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


def test_a_llama_gguf_with_attention_and_mlp_biases_loads_and_matches_hf(tiny_checkpoint_factory, tmp_path,
                                                                         monkeypatch):
    """llama.cpp reads ``ffn_{gate,up,down}.bias`` of a Llama (Hugging Face's ``mlp_bias``) and attention biases;
    such a file loads (it was refused: its MLP biases had no place), F32 gives HF's greedy tokens, and a Q8_0 file
    kept in blocks scores the next token as its de-quantized weights do, within 1e-2 in log-probability (its
    int8 dot products round the activations; the biases, std 0.1, move these scores by far more when misplaced)."""
    from test_hf_parity import hf_greedy, mixed_prompts, run_engine

    hf_dir = tiny_checkpoint_factory("llama", hidden_size=256, biases=True)
    prompts = mixed_prompts(6, 384, seed=3)
    f32 = make_tiny_gguf(hf_dir, tmp_path / "biased-F32.gguf", dtype="F32")
    assert run_engine(LLM(str(f32), dtype="float32"), prompts) == [hf_greedy(hf_dir, p) for p in prompts]
    q8 = make_tiny_gguf(hf_dir, tmp_path / "biased-Q8_0.gguf", dtype="Q8_0")
    scores = SamplingParams(temperature=0, max_tokens=1, logprobs=5)

    def first_scores(llm: LLM) -> list[dict[int, float]]:
        return [{t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()}
                for o in llm.generate(prompts, scores, use_tqdm=False)]

    kept = first_scores(LLM(str(q8), dtype="float32"))
    monkeypatch.setenv("INFERNEO_GGUF_DEQUANTIZE", "1")
    for got, want in zip(kept, first_scores(LLM(str(q8), dtype="float32")), strict=True):
        common = got.keys() & want.keys()
        assert len(common) >= 4 and max(abs(got[t] - want[t]) for t in common) < 1e-2, (got, want)


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
