"""Prompt log-probabilities (``SamplingParams.prompt_logprobs``) equal Hugging Face's ``log_softmax`` of the logits
on the same float32 weights, for every prompt token: its log-probability (to 1e-4), its rank and the top-k ids;
with chunked prefill, with asynchronous scheduling, next to ordinary requests in one batch, with prefix-cache hits
around, for ``max_tokens=0`` (scoring only), and over two tensor-parallel ranks."""

from __future__ import annotations

import functools

import pytest
import torch
from test_hf_parity import engine_options, mixed_prompts, two_rank_engine
from transformers import AutoModelForCausalLM

from inferneo import LLM, SamplingParams

TOP = 3
CONFIGS = {
    "whole-prompts": {},
    # 16-token steps: long prompts are scored over several chunks, mixed with other requests' decodes
    "chunked-prefill": dict(max_num_batched_tokens=16),
    "chunked-async": dict(max_num_batched_tokens=16, async_scheduling=True),
    # a KV pool too small for the batch: requests are preempted and recomputed, positions are scored once
    "preemption": "preemption-with-prefix-cache",
}


@functools.cache
def _hf_model(path: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@functools.cache
def hf_prompt_logprobs(path: str, prompt_ids: tuple[int, ...]) -> torch.Tensor:
    """HF's ``log_softmax`` (float32) at every prompt position: row ``i`` scores prompt token ``i + 1``."""
    with torch.no_grad():
        logits = _hf_model(path)(torch.tensor([prompt_ids])).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def assert_matches_hf(path, prompt_ids: list[int], prompt_logprobs, top: int = TOP) -> None:
    """Every position: None first, then the prompt token's log-probability (1e-4) and rank, the top-``top`` ids."""
    ref = hf_prompt_logprobs(str(path), tuple(prompt_ids))
    assert prompt_logprobs is not None and len(prompt_logprobs) == len(prompt_ids)
    assert prompt_logprobs[0] is None
    for i in range(1, len(prompt_ids)):
        entry, row, token = prompt_logprobs[i], ref[i - 1], prompt_ids[i]
        assert abs(entry[token].logprob - row[token].item()) < 1e-4, (i, entry[token], row[token].item())
        # ranks and top-k ids as HF orders them, up to near-ties (values within 1e-4 may swap places)
        lp = row[token].item()
        assert int((row > lp + 1e-4).sum()) + 1 <= entry[token].rank <= int((row > lp - 1e-4).sum()) + 1
        got_top = [tid for _, tid in sorted((e.rank, tid) for tid, e in entry.items() if tid != token or e.rank <= top)]
        assert len(got_top) == top
        assert [row[tid].item() for tid in got_top] == pytest.approx(row.topk(top).values.tolist(), abs=1e-4)
        for tid in got_top:
            assert abs(entry[tid].logprob - row[tid].item()) < 1e-4


@pytest.fixture(scope="module", params=list(CONFIGS))
def llm(request, tiny_llama_dir):
    config = CONFIGS[request.param]
    options = engine_options(tiny_llama_dir, config) if isinstance(config, str) else {"kv_cache_memory": "16MiB",
                                                                                       **config}
    engine = LLM(str(tiny_llama_dir), dtype="float32", num_threads=1, **options)
    yield engine
    engine.shutdown()


def test_prompt_logprobs_match_hf_in_a_mixed_batch(llm, tiny_llama_dir, request):
    prompts = mixed_prompts(6, 300, seed=7)
    prompts[2] = prompts[2][:1]  # one token: nothing to score but the empty row list
    scoring = SamplingParams(temperature=0, max_tokens=16, prompt_logprobs=TOP, ignore_eos=True)
    plain = SamplingParams(temperature=0, max_tokens=16, logprobs=2, ignore_eos=True)
    score_only = SamplingParams(max_tokens=0, prompt_logprobs=0)
    params = [scoring, plain, scoring, plain, scoring, score_only]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    alone = llm.generate([prompts[1], prompts[3]], plain, use_tqdm=False)
    for prompt, p, out in zip(prompts, params, outputs, strict=True):
        if p.prompt_logprobs is None:
            assert out.prompt_logprobs is None
            continue
        assert_matches_hf(tiny_llama_dir, prompt, out.prompt_logprobs, top=p.prompt_logprobs)
    # the scoring requests change nothing for their neighbours
    assert [outputs[1].outputs[0].token_ids, outputs[3].outputs[0].token_ids] == [a.outputs[0].token_ids
                                                                                 for a in alone]
    # the first generated token of a scoring request is what HF's last prompt position predicts
    first = outputs[0].outputs[0].token_ids[0]
    ref = _hf_model(str(tiny_llama_dir))(torch.tensor([prompts[0]])).logits[0, -1]
    assert first == int(ref.argmax())
    # max_tokens=0: the prompt scored, nothing generated
    assert outputs[5].outputs[0].token_ids == [] and outputs[5].outputs[0].finish_reason == "length"
    llm.engine.kv_cache.check_integrity([])
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.num_blocks
    if "preemption" in request.node.callspec.id:
        assert llm.engine.core.stats.num_preemptions > 0


def test_prefix_cache_hits_do_not_lose_prompt_logprobs(llm, tiny_llama_dir):
    """A scoring request whose prompt is cached recomputes it (its num_cached_tokens is 0) and still matches HF;
    the blocks it computed serve later ordinary requests."""
    prompt = mixed_prompts(1, 300, seed=11, shared_prefix=48)[0]
    plain = SamplingParams(temperature=0, max_tokens=2)
    warm = llm.generate([prompt], plain, use_tqdm=False)[0]
    hit = llm.generate([prompt], plain, use_tqdm=False)[0]
    assert hit.num_cached_tokens >= 32 and hit.outputs[0].token_ids == warm.outputs[0].token_ids
    scored = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=TOP),
                          use_tqdm=False)[0]
    assert scored.num_cached_tokens == 0
    assert_matches_hf(tiny_llama_dir, prompt, scored.prompt_logprobs)
    assert scored.outputs[0].token_ids == warm.outputs[0].token_ids
    # a prompt sharing the cached prefix, scored in the same batch as an ordinary request that hits the cache
    other = prompt[:40] + [7, 8, 9, 10, 11]
    out_plain, out_scored = llm.generate([other, other], [plain, SamplingParams(max_tokens=1, prompt_logprobs=1)],
                                         use_tqdm=False)
    assert out_plain.num_cached_tokens >= 32 and out_scored.num_cached_tokens == 0
    assert_matches_hf(tiny_llama_dir, other, out_scored.prompt_logprobs, top=1)


def test_n_choices_score_the_prompt_once(llm, tiny_llama_dir):
    prompt = mixed_prompts(1, 300, seed=13)[0]
    out = llm.generate([prompt], SamplingParams(n=2, temperature=0, max_tokens=2, prompt_logprobs=1),
                       use_tqdm=False)[0]
    assert len(out.outputs) == 2
    assert_matches_hf(tiny_llama_dir, prompt, out.prompt_logprobs, top=1)


def test_bad_prompt_logprobs_values_are_refused(llm):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)  # 0 only scores a prompt: prompt_logprobs must be set
    with pytest.raises(ValueError, match="prompt_logprobs"):
        llm.generate([[1, 2, 3]], SamplingParams(prompt_logprobs=21), use_tqdm=False)


def test_tensor_parallel_prompt_logprobs_match_hf(tiny_llama_dir):
    """Every rank runs the same prompt rows through its shard of the LM head; the driver gets HF's values."""
    prompts = mixed_prompts(3, 300, seed=17)
    with two_rank_engine(tiny_llama_dir) as llm:
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2),
                               use_tqdm=False)
    for prompt, out in zip(prompts, outputs, strict=True):
        assert_matches_hf(tiny_llama_dir, prompt, out.prompt_logprobs, top=2)
