"""The CPU engine's warm-up pass at start-up (``inferneo/worker/memory.py::warm_up``): one worst-case step before
the first request, so that the first requests do not pay for fresh memory pages."""

from __future__ import annotations

from test_hf_parity import mixed_prompts, run_engine

from inferneo import LLM
from inferneo.engine import core_builder


def test_cpu_engine_warms_up_once_with_its_token_budget_and_leaves_the_cache_alone(tiny_llama_dir, monkeypatch):
    calls = []
    real = core_builder.warm_up

    def spy(runner, num_tokens, num_seqs):
        calls.append((num_tokens, num_seqs))
        return real(runner, num_tokens, num_seqs)

    monkeypatch.setattr(core_builder, "warm_up", spy)
    kwargs = {"dtype": "float32", "max_model_len": 128, "max_num_batched_tokens": 160, "max_num_seqs": 5}
    llm = LLM(str(tiny_llama_dir), **kwargs)
    assert calls == [(160, 5)]  # the scheduler's token budget and sequence count, once
    # the pass wrote its keys and values into a scratch cache of its own: the engine's cache is untouched
    assert all(not cache.any() for cache in llm.engine.runner.kv_caches)
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.num_blocks
    monkeypatch.setattr(core_builder, "warm_up", lambda *args: 0.0)
    cold = LLM(str(tiny_llama_dir), **kwargs)
    prompts = mixed_prompts(7, 300, seed=3)
    assert run_engine(llm, prompts) == run_engine(cold, prompts)
