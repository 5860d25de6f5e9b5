"""Prompts given as embeddings (vLLM's ``prompt_embeds``, with ``enable_prompt_embeds``): the rows of the model's
input embedding layer for some ids (what Hugging Face's ``model.get_input_embeddings()(ids)`` returns) generate
exactly what those ids do as a token prompt, in batches mixed with token prompts, over chunked prefill (the engine
runs at most 32 tokens a step, so the longer prompts are split), with the prefix cache keyed by the rows, and with
log-probabilities; bad tensors are refused naming ``prompt_embeds``."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from inferneo import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
SHORT = list(range(3, 10))  # 7 tokens
LONG = [(7 * i + 11) % 300 + 3 for i in range(70)]  # 70 tokens: three chunks of at most 32
MIDDLE = [(5 * i + 2) % 300 + 3 for i in range(45)]
ENGINE = dict(dtype="float32", kv_cache_memory="16MiB", num_threads=1, max_num_batched_tokens=32)


def _hf_embeddings(folder) -> torch.nn.Module:
    """The checkpoint's input embedding layer as transformers builds it (Gemma 3's scales its rows)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    return model.get_input_embeddings()


def _embeds(layer: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return layer(torch.tensor(ids))


def _tokens_and_logprobs(output) -> tuple[list[int], list[dict[int, float]]]:
    completion = output.outputs[0]
    return list(completion.token_ids), [{t: lp.logprob for t, lp in step.items()} for step in completion.logprobs]


def _assert_same(embedded, tokens) -> None:
    got, got_lp = _tokens_and_logprobs(embedded)
    want, want_lp = _tokens_and_logprobs(tokens)
    assert got == want
    for a, b in zip(got_lp, want_lp, strict=True):
        assert a.keys() == b.keys() and all(math.isclose(a[t], b[t], abs_tol=1e-4) for t in a)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), enable_prompt_embeds=True, **ENGINE), _hf_embeddings(tiny_llama_dir)


def test_embeddings_generate_what_their_tokens_do_mixed_in_a_batch_and_chunked(llama):
    llm, layer = llama
    prompts = [SHORT, {"prompt_embeds": _embeds(layer, LONG)}, LONG, {"prompt_embeds": _embeds(layer, SHORT)},
               {"prompt_embeds": _embeds(layer, MIDDLE).unsqueeze(0)}, MIDDLE]  # [1, n, h]: a batch of one
    out = llm.generate(prompts, GREEDY, use_tqdm=False)
    _assert_same(out[1], out[2])
    _assert_same(out[3], out[0])
    _assert_same(out[4], out[5])
    for embedded, ids in ((out[1], LONG), (out[3], SHORT), (out[4], MIDDLE)):
        assert embedded.prompt is None and embedded.prompt_token_ids == []
        assert embedded.num_prompt_tokens == len(ids)
        assert embedded.outputs[0].text  # detokenized from no prompt context
    # other float dtypes are taken (sent as they are, computed in the model's dtype)
    (half,) = llm.generate({"prompt_embeds": _embeds(layer, SHORT).to(torch.bfloat16)}, GREEDY, use_tqdm=False)
    assert len(half.outputs[0].token_ids) == GREEDY.max_tokens


def test_the_prefix_cache_keys_embedded_blocks_by_their_rows(llama):
    llm, layer = llama
    ids = [(11 * i + 5) % 300 + 3 for i in range(50)]
    rows = _embeds(layer, ids)

    def run(prompt) -> tuple[list[int], int]:
        (out,) = llm.generate([prompt], GREEDY, use_tqdm=False)
        return list(out.outputs[0].token_ids), out.num_cached_tokens

    tokens, cached = run({"prompt_embeds": rows})
    assert cached == 0
    assert run({"prompt_embeds": rows.clone()}) == (tokens, 48)  # the same rows: their three whole blocks hit
    other = rows.clone()
    other[0, 0] += 0.5
    assert run({"prompt_embeds": other})[1] == 0  # other rows, the same placeholders: nothing shared
    tail = rows.clone()
    tail[40:] = _embeds(layer, [7] * 10)
    assert run({"prompt_embeds": tail})[1] == 32  # rows shared up to the third block: its first two blocks hit
    assert run(ids) == (tokens, 0)  # the token prompt never meets the embedded blocks (nor their placeholders)
    assert run({"prompt_embeds": rows, "cache_salt": "tenant"})[1] == 0  # a salt keeps them apart too


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(64), "must be 2-D"),
    (torch.zeros(2, 3, 64), "must be 2-D"),
    (torch.zeros(4, 32), "hidden size 64"),
    (torch.zeros(0, 64), "empty"),
    (torch.zeros(4, 64, dtype=torch.int64), "must hold floats"),
    (torch.full((4, 64), float("nan")), "NaN"),
    (torch.zeros(4, 64).to_sparse(), "dense"),
    ([[0.0] * 64], "torch.Tensor"),
    (torch.zeros(2048, 64), "context length"),
])
def test_bad_embeddings_are_refused(llama, bad, message):
    llm, _ = llama
    with pytest.raises(ValueError, match=message) as info:
        llm.generate({"prompt_embeds": bad}, GREEDY, use_tqdm=False)
    assert info.value.param == "prompt_embeds"


def test_what_embeddings_cannot_be_combined_with(llama):
    llm, layer = llama
    rows = _embeds(layer, SHORT)
    with pytest.raises(ValueError, match="not compatible with prompt embeddings"):
        llm.generate({"prompt_embeds": rows}, SamplingParams(max_tokens=2, prompt_logprobs=1), use_tqdm=False)
    with pytest.raises(ValueError, match="takes only a cache_salt besides"):
        llm.generate({"prompt_embeds": rows, "prompt": "hello"}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="unsupported prompt dict key.*prompt_embeds"):
        llm.embed({"prompt_embeds": rows})
    # truncate_prompt_tokens keeps the last rows, as it keeps a token prompt's last tokens
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, truncate_prompt_tokens=5)
    cut, whole = llm.generate([{"prompt_embeds": rows}, SHORT[-5:]], params, use_tqdm=False)
    assert cut.num_prompt_tokens == 5 and cut.outputs[0].token_ids == whole.outputs[0].token_ids


def test_an_engine_without_the_flag_refuses_embeddings(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), **ENGINE)
    with pytest.raises(ValueError, match="enable_prompt_embeds=True") as info:
        llm.generate({"prompt_embeds": torch.zeros(3, 64)}, GREEDY, use_tqdm=False)
    assert info.value.param == "prompt_embeds"


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "qwen2"])
def test_other_families_read_vllms_embeddings(tiny_checkpoint_factory, arch):
    """What "the embeddings" are follows vLLM: Gemma 2 scales by ``sqrt(hidden_size)`` inside the model, after given
    embeddings, so they are the table's rows unscaled (transformers 4's ``get_input_embeddings()`` output; 5's
    scales them); Gemma 3's embedding lookup scales, so given embeddings are the scaled rows (transformers'
    ``get_input_embeddings()`` output). Either way they generate what the ids do."""
    folder = tiny_checkpoint_factory(arch)
    llm = LLM(str(folder), enable_prompt_embeds=True, **ENGINE)
    layer = _hf_embeddings(folder)
    rows = layer.weight.detach()[LONG] if arch == "gemma2" else _embeds(layer, LONG)
    out = llm.generate([{"prompt_embeds": rows}, LONG], GREEDY, use_tqdm=False)
    _assert_same(out[0], out[1])
