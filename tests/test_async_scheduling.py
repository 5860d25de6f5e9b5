"""Asynchronous scheduling (``async_scheduling=True``) gives exactly the outputs of the synchronous engine.

The next step is scheduled and launched before the current step's tokens reach the host, so decoding requests
run with their input token still on the device; these tests compare every output field with the synchronous
path (itself checked against Hugging Face in test_hf_parity) across chunked prefill, prefix-cache hits,
preemption, stops on EOS / stop ids / max_tokens / the context limit, seeded sampling, logprobs, penalties and bad words (which
make a step wait for the one in flight), allowed_token_ids and aborts, and check that no KV block leaks.
"""

from __future__ import annotations

import numpy as np

from inferneo import LLM, SamplingParams
from inferneo.engine.request import Request

ENGINE = dict(dtype="float32", max_model_len=192, num_threads=1)


def prompts(num: int, seed: int = 0, shared_prefix: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prefix = rng.integers(5, 380, shared_prefix).tolist()
    return [prefix + rng.integers(5, 380, int(n)).tolist() for n in rng.integers(3, 70, num)]


def outputs(llm: LLM, items: list[list[int]], params) -> list[tuple]:
    result = llm.generate(items, params, use_tqdm=False)
    kv = llm.engine.kv_cache
    kv.check_integrity([])
    assert kv.num_free_blocks == kv.num_blocks, "KV blocks leaked"
    assert not llm.engine.has_unfinished_requests()
    return [(c.token_ids, c.finish_reason, c.stop_reason, c.logprobs) for o in result for c in o.outputs]


def both(path, items, params, **engine) -> tuple[list, list, LLM]:
    sync = LLM(str(path), **ENGINE, **engine)
    expected = outputs(sync, items, params)
    fast = LLM(str(path), **ENGINE, async_scheduling=True, **engine)
    assert fast.engine.core.async_scheduling
    return expected, outputs(fast, items, params), fast


def test_greedy_with_chunked_prefill_and_prefix_hits(tiny_llama_dir):
    items = prompts(20, shared_prefix=40)
    params = [SamplingParams(temperature=0, max_tokens=int(n), ignore_eos=True) for n in np.arange(1, 21)]
    expected, got, fast = both(tiny_llama_dir, items, params, max_num_batched_tokens=48, kv_cache_memory="4MiB")
    assert got == expected
    assert fast.engine.kv_cache.prefix_cache_hits > 0
    assert outputs(fast, items, params) == expected  # again, with the prompts' blocks cached


def test_preemption(tiny_llama_dir):
    items = prompts(16, seed=1)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    # A pool of a few blocks per request: running requests are preempted and recomputed.
    expected, got, fast = both(tiny_llama_dir, items, params, kv_cache_memory="200KiB", max_num_seqs=16)
    assert fast.engine.core.stats.num_preemptions > 0
    assert got == expected


def test_stops_eos_stop_ids_and_the_context_limit(tiny_llama_dir):
    items = prompts(12, seed=2)
    sync = LLM(str(tiny_llama_dir), **ENGINE)
    free_run = outputs(sync, items, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    # Stop on a token each prompt is known to produce mid-way, as a stop id and as EOS (via stop_token_ids of
    # the per-request params), and run some prompts into the 192-token context limit.
    params = []
    for i, (tokens, *_rest) in enumerate(free_run):
        if i % 3 == 0:
            params.append(SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[tokens[7]]))
        elif i % 3 == 1:
            params.append(SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[tokens[3]], min_tokens=2))
        else:
            params.append(SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))  # up to the context
    expected, got, _ = both(tiny_llama_dir, items, params)
    assert got == expected
    assert {o[1] for o in got} == {"stop", "length"}


def test_seeded_sampling_logprobs_and_penalties(tiny_llama_dir):
    items = prompts(10, seed=3)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=16, ignore_eos=True, logprobs=2,
                             presence_penalty=0.5 if i % 2 else 0.0) for i in range(10)]
    expected, got, _ = both(tiny_llama_dir, items, params)
    assert got == expected


def test_bad_words_of_several_tokens_and_allowed_token_ids(tiny_llama_dir):
    """A bad word's last token is banned only after the tokens before it, so those steps wait for the token in
    flight (as penalties do); allowed_token_ids does not depend on earlier tokens."""
    items = prompts(8, seed=5)
    sync = LLM(str(tiny_llama_dir), **ENGINE)
    free_run = outputs(sync, items, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    words = [tokens[5:7] for tokens, *_rest in free_run]
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, bad_words_token_ids=[word])
              if i % 2 else SamplingParams(temperature=0.9, seed=i, max_tokens=20, ignore_eos=True,
                                           allowed_token_ids=sorted(set(free_run[i][0]))[:4])
              for i, word in enumerate(words)]
    expected, got, _ = both(tiny_llama_dir, items, params)
    assert got == expected
    for i, (tokens, *_rest) in enumerate(got):
        if i % 2:
            assert tokens[:6] == free_run[i][0][:6] and not any(tokens[j:j + 2] == words[i] for j in range(19))
        else:
            assert set(tokens) <= set(params[i].allowed_token_ids)


def test_aborts_mid_generation_free_everything(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), **ENGINE, async_scheduling=True)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    ids = [engine.add_request(f"r{i}", p, params) for i, p in enumerate(prompts(8, seed=4))]
    for _ in range(6):
        engine.step()
    for request_id in ids[::2]:
        engine.abort_request(request_id)
    finished = set()
    while engine.has_unfinished_requests():
        finished.update(o.request_id for o in engine.step() if o.finished)
    assert finished == set(ids[1::2])
    engine.kv_cache.check_integrity([])
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_a_pending_token_is_counted_by_the_scheduler():
    params = SamplingParams(temperature=0, max_tokens=4)
    request = Request("r", [1, 2, 3], params, max_tokens=4)
    assert request.num_scheduled_tokens == 3
    request.pending_sample = 0
    assert request.num_scheduled_tokens == 4


def test_default_is_on_for_cuda_only(tiny_llama_dir):
    assert not LLM(str(tiny_llama_dir), **ENGINE).engine.core.async_scheduling  # CPU: no gain measured


def test_tensor_parallel_workers_get_the_tokens_in_flight(tiny_llama_dir):
    """At TP=2 the driver broadcasts the previous step's samples to the workers, which read them on their side."""
    items = prompts(8, seed=5, shared_prefix=20)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = outputs(LLM(str(tiny_llama_dir), **ENGINE), items, params)
    llm = LLM(str(tiny_llama_dir), **ENGINE, tensor_parallel_size=2, async_scheduling=True,
              max_num_batched_tokens=48)
    try:
        assert llm.engine.core.async_scheduling
        assert outputs(llm, items, params) == expected
    finally:
        llm.shutdown()


def test_server_with_async_scheduling_matches_offline(tiny_llama_dir):
    import httpx

    from inferneo.testing.server import RemoteServer

    items = ["The capital of France is", "Once upon a time", "1, 2, 3,"]
    offline = LLM(str(tiny_llama_dir), dtype="float32", num_threads=1)
    expected = [o.outputs[0].text for o in offline.generate(
        items, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)]
    with RemoteServer(tiny_llama_dir, "--async-scheduling", "--kv-cache-memory", "16MiB", "--num-threads", "1",
                      "--disable-access-log") as server:
        r = httpx.post(server.url("/v1/completions"), timeout=60,
                       json={"prompt": items, "max_tokens": 24, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])] == expected
