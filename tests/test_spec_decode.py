"""Speculative decoding by prompt lookup (``speculative_config``): drafts change how many steps a request takes,
never its tokens.

The engine tests run the trained parity model (``tests/data/parity-llama``: it continues repeated patterns, so
n-gram drafts are mostly right) against Hugging Face's greedy tokens across batch compositions, chunked prefill,
prefix hits and preemption; a tiny random model with drafts that are wrong at chosen places (an oracle proposer)
checks every acceptance length; stops, log-probabilities and random sampling are compared with the same engine
without speculation; the server runs with the flag over real HTTP. A request's drafts run as decode rows (one per
position): their packing, attention over rows of one request, and steps padded to graph buckets are checked too.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import subprocess
import sys

import httpx
import numpy as np
import openai
import pytest
import torch
from parity_fixture import copy_parity_model, pattern_prompts
from test_hf_parity import TP_ENGINE, hf_greedy, kv_bytes_per_block, mixed_prompts

from inferneo import LLM, SamplingParams
from inferneo.attention import AttentionMetadata, PrefillSpan
from inferneo.attention.cpu_native import CpuNativeBackend
from inferneo.attention.torch_ref import TorchReferenceBackend
from inferneo.config import EngineConfig, add_engine_args
from inferneo.sampling.metadata import SamplingRow
from inferneo.spec_decode.acceptance import accepted_prefix
from inferneo.spec_decode.config import SpeculativeConfig, parse_speculative_config
from inferneo.spec_decode.ngram import NgramProposer, TokenHistory
from inferneo.spec_decode.state import SpeculationState
from inferneo.testing.server import RemoteServer
from inferneo.worker.cuda_graphs import decode_buckets, graph_layout
from inferneo.worker.step_inputs import ScheduledSequence, pack_step, step_layout

NGRAM4 = {"method": "ngram", "num_speculative_tokens": 4}
MAX_NEW = 40


@pytest.fixture(scope="module")
def parity_dir(tmp_path_factory):
    return copy_parity_model(tmp_path_factory.mktemp("spec") / "parity-llama")


def generate_ids(llm: LLM, prompts, params: SamplingParams) -> list[list[int]]:
    outputs = llm.generate(prompts, params, use_tqdm=False)
    kv = llm.engine.kv_cache
    kv.check_integrity([])
    assert kv.num_free_blocks == kv.num_blocks, "KV blocks leaked"
    return [o.outputs[0].token_ids for o in outputs]


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


# ---- the pieces ------------------------------------------------------------------------------------------------


def test_ngram_proposer_takes_the_longest_latest_match():
    propose = NgramProposer(SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=3)).propose
    assert propose([1, 2, 3, 9, 9, 1, 2, 3, 7, 7, 2, 3]) == [7, 7, 2]  # "2 3" last seen before "7 7 2"
    assert propose([5, 1, 2, 3, 4, 8, 2, 3, 6, 1, 2, 3]) == [4, 8, 2]  # "1 2 3" beats the later "2 3"
    assert propose([1, 2, 3, 4, 5, 6]) == []  # the last token never occurred before
    assert propose([4, 4]) == [4]  # only what exists follows a match
    assert propose([1, 2, 3, 4, 1, 2, 3, 4, 1], max_drafts=2) == [2, 3]
    assert propose([1, 2, 3, 1], max_drafts=0) == []
    assert propose([7]) == []
    strict = NgramProposer(SpeculativeConfig(num_speculative_tokens=2, prompt_lookup_max=3, prompt_lookup_min=2))
    assert strict.propose([1, 5, 6, 2, 5]) == []  # a 1-token match is not enough
    assert strict.propose([2, 5, 6, 2, 5]) == [6, 2]


def test_token_history_follows_a_growing_list():
    propose = NgramProposer(SpeculativeConfig(num_speculative_tokens=3)).propose
    history = TokenHistory()
    tokens = [1, 2, 3, 1]
    assert propose(tokens, history=history) == [2, 3, 1]
    rng = random.Random(0)
    for _ in range(300):  # grows past several buffer sizes, a few tokens at a time
        tokens += [rng.randrange(50) for _ in range(rng.randint(1, 5))]
        assert propose(tokens, history=history) == propose(tokens)
        assert history.array(tokens).tolist() == tokens
    assert history.array([4, 5]).tolist() == [4, 5]  # another (shorter) list: read afresh


def test_a_request_checks_as_many_drafts_as_its_keep_rate_makes_worth_it():
    state = SpeculationState()
    assert state.draft_limit(4) == 4 and state.draft_limit(0) == 0  # untried: every draft
    state.record(4, 4)
    assert state.draft_limit(4) == 4
    for _ in range(8):
        state.record(4, 1)  # one of two tried drafts kept: the rate heads for 0.5
    assert 0.5 < state.keep_rate < 0.55 and state.draft_limit(4) == 2  # 0.53 ** 3 < 0.15 <= 0.53 ** 2
    for _ in range(8):
        state.record(2, 0)
    assert state.keep_rate < 0.15
    limits = [state.draft_limit(4) for _ in range(8)]
    assert limits == [0, 0, 0, 1, 0, 0, 0, 1]  # a probe every fourth step
    for _ in range(12):
        state.record(1, 1)
    assert state.draft_limit(4) == 4  # drafts became right again


def test_accepted_prefix_keeps_confirmed_drafts_and_one_model_token():
    assert accepted_prefix([], [7]) == [7]
    assert accepted_prefix([4, 5, 6], [9, 1, 1, 1]) == [9]  # the first draft rejected: the model's own token
    assert accepted_prefix([4, 5, 6], [4, 9, 1, 1]) == [4, 9]
    assert accepted_prefix([4, 5, 6], [4, 5, 6, 3]) == [4, 5, 6, 3]  # all confirmed, and the bonus token
    with pytest.raises(ValueError, match="samples 3 tokens"):
        accepted_prefix([1, 2], [1, 2])


def test_speculative_config_reads_vllm_style_json():
    config = parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3}')
    assert config == SpeculativeConfig(num_speculative_tokens=5, prompt_lookup_max=3, prompt_lookup_min=1)
    assert parse_speculative_config({"num_speculative_tokens": 2}) == SpeculativeConfig(2)
    assert parse_speculative_config({"num_speculative_tokens": 2, "prompt_lookup_min": 6}).prompt_lookup_max == 6
    assert parse_speculative_config(None) is None
    assert EngineConfig(speculative_config=NGRAM4).speculative_config == SpeculativeConfig(4)
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--speculative-config", json.dumps(NGRAM4)])
    assert EngineConfig.from_cli_args(args).speculative_config == SpeculativeConfig(4)
    assert EngineConfig.from_cli_args(parser.parse_args([])).speculative_config is None


@pytest.mark.parametrize("value,message", [
    ("{nope", "not valid JSON"),
    ("[4]", "must be a JSON object"),
    ({"method": "eagle", "num_speculative_tokens": 2}, "method must be one of ngram"),
    ({"method": "ngram"}, "num_speculative_tokens is required"),
    ({"num_speculative_tokens": 2, "model": "x"}, "unknown key"),
    ({"num_speculative_tokens": True}, "positive integer"),
    ({"num_speculative_tokens": "4"}, "positive integer"),
    ({"num_speculative_tokens": 0}, "positive integer"),
    ({"num_speculative_tokens": 17}, "at most 16"),
    ({"num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "must not exceed"),
    ({"num_speculative_tokens": 2, "disable_by_batch_size": 0}, "disable_by_batch_size must be a positive"),
])
def test_bad_speculative_configs_are_refused_by_name(value, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(speculative_config=value)
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    text = value if isinstance(value, str) else json.dumps(value)
    with pytest.raises(SystemExit):
        parser.parse_args(["--speculative-config", text])


def test_speculation_refuses_asynchronous_scheduling_and_pipelines():
    with pytest.raises(ValueError, match="synchronous scheduling"):
        EngineConfig(speculative_config=NGRAM4, async_scheduling=True)
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        EngineConfig(speculative_config=NGRAM4, pipeline_parallel_size=2)


# ---- the engine against Hugging Face ---------------------------------------------------------------------------

VARIANTS = {
    "default": {},
    "prefix-cache-off": dict(enable_prefix_caching=False),
    "chunked-prefill": dict(max_num_batched_tokens=16),
    "preemption": dict(kv_cache_blocks=14),
    "eight-drafts": dict(speculative_config={"num_speculative_tokens": 8}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_speculation_gives_hf_greedy_tokens(parity_dir, variant):
    options = {"speculative_config": NGRAM4, **VARIANTS[variant]}
    if "kv_cache_blocks" in options:
        options["kv_cache_memory"] = options.pop("kv_cache_blocks") * kv_bytes_per_block(str(parity_dir))
    prompts = pattern_prompts(16, seed=1)
    prompts.append(list(prompts[1]))  # a full prefix hit
    expected = [hf_greedy(parity_dir, p, MAX_NEW) for p in prompts]
    llm = LLM(str(parity_dir), dtype="float32", max_model_len=256, **options)
    assert generate_ids(llm, prompts[:1], GREEDY) == expected[:1]
    assert generate_ids(llm, prompts, GREEDY) == expected
    stats = llm.engine.core.stats
    # Drafts were made and mostly kept: the model continues the patterns its prompts repeat.
    assert stats.num_draft_tokens > 200 and stats.num_accepted_tokens > 0.5 * stats.num_draft_tokens
    assert stats.num_generation_tokens == MAX_NEW * (len(prompts) + 1)
    if variant == "preemption":
        assert llm.engine.kv_cache.num_blocks == 14 and stats.num_preemptions > 0
    if variant == "chunked-prefill":
        assert stats.max_batch_size > 1
    if variant == "default":
        assert llm.engine.kv_cache.prefix_cache_hits > 0
        # one request alone: far fewer steps than tokens
        single = LLM(str(parity_dir), dtype="float32", max_model_len=256, speculative_config=NGRAM4)
        assert generate_ids(single, prompts[:1], GREEDY) == expected[:1]
        assert single.engine.core.stats.num_steps < MAX_NEW / 2


class OracleProposer:
    """Drafts the true continuation (Hugging Face's) with one token made wrong, at a place that moves with the
    sequence's length, so every acceptance length from none to all happens."""

    def __init__(self, expected: dict[tuple[int, ...], list[int]], k: int) -> None:
        self.expected, self.k = expected, k

    def propose(self, token_ids: list[int], max_drafts: int | None = None, history=None) -> list[int]:
        for prompt, continuation in self.expected.items():
            if tuple(token_ids[: len(prompt)]) == prompt:
                done = len(token_ids) - len(prompt)
                drafts = list(continuation[done : done + min(self.k, max_drafts or self.k)])
                wrong = done % (self.k + 2)  # k + 1: all drafts right
                if wrong < len(drafts):
                    drafts[wrong] = (drafts[wrong] + 1) % 300 + 5
                return drafts
        raise AssertionError("a draft was asked for an unknown sequence")


# ---- drafts as decode rows (the steps CUDA graphs replay) ---------------------------------------------------


def _sequence(tokens: list[int], computed: int, blocks: list[int], new: int, drafts: int = 0,
              samples: bool = True) -> ScheduledSequence:
    row = SamplingRow(SamplingParams(), tokens[:computed], [], frozenset(), None)
    return ScheduledSequence(tokens, computed, new, blocks, -1, samples, row, num_draft_tokens=drafts)


def test_a_request_with_drafts_packs_as_one_decode_row_per_token():
    bs, spare = 4, 50
    plain = _sequence(list(range(10, 19)), 8, [5, 6, 7], 1)  # position 8: block 7, offset 0
    drafted = _sequence(list(range(20, 28)) + [90, 91, 92], 7, [1, 2, 3], 4, drafts=3)  # positions 7..10
    prompt = _sequence(list(range(30, 36)), 0, [9, 4], 6)
    assert (plain.decode_rows, drafted.decode_rows, prompt.decode_rows) == (1, 4, 0)

    layout = step_layout([plain, drafted, prompt], bs)
    buf = np.full(layout.size, -7, dtype=np.int64)
    packed = pack_step(buf, layout, [plain, drafted, prompt], bs, None, spare)
    lo = layout
    assert (packed.num_decode, packed.num_real_decode, packed.num_decode_sequences) == (5, 5, 2)
    assert packed.shares_requests and [packed.first_row(i) for i in range(3)] == [0, 1, 5]
    assert list(buf[lo.ids : lo.ids + 5]) == [18, 27, 90, 91, 92]
    assert list(buf[lo.positions : lo.positions + 5]) == [8, 7, 8, 9, 10]
    assert list(buf[lo.seq_lens : lo.seq_lens + 5]) == [9, 8, 9, 10, 11]  # each row sees the rows before it
    assert list(buf[lo.slots : lo.slots + 5]) == [7 * bs, 2 * bs + 3, 3 * bs, 3 * bs + 1, 3 * bs + 2]
    tables = buf[lo.tables : lo.tables + 5 * lo.width].reshape(5, lo.width)
    assert tables.tolist() == [[5, 6, 7], [1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3]]
    (span,) = packed.spans
    assert (span.start, span.num_tokens) == (5, 6)
    assert list(buf[lo.sample_rows : lo.sample_rows + packed.num_samples]) == [0, 1, 2, 3, 4, 10]

    # Decode-only, padded to a graph bucket: the padding rows follow the drafts' rows.
    items = [plain, drafted]
    layout = graph_layout(decode_buckets(8), max_blocks_per_seq=4)
    buf = np.zeros(layout.size, dtype=np.int64)
    packed = pack_step(buf, layout, items, bs, 8, spare)
    assert (packed.num_decode, packed.num_real_decode, packed.num_samples) == (8, 5, 5) and packed.samples_are_prefix
    assert list(buf[layout.seq_lens : layout.seq_lens + 8]) == [9, 8, 9, 10, 11, 1, 1, 1]
    assert list(buf[layout.slots + 5 : layout.slots + 8]) == [spare * bs] * 3

    # Without drafts nothing is shared, and the fused per-row store-and-attend stays allowed.
    packed = pack_step(np.zeros(step_layout([plain], bs).size, np.int64), step_layout([plain], bs), [plain], bs,
                       None, spare)
    assert not packed.shares_requests and packed.first_row(0) == 0


def test_cpu_attention_stores_every_drafted_row_before_any_row_attends():
    """Rows of one request at consecutive positions: each sees the keys of the rows before it, as the reference
    backend (which stores every row first) computes. (The native backend's fused store-and-attend, which it does
    not take for such a step, hands rows out in order, so a race there would rarely show in a test.)"""
    torch.manual_seed(0)
    bs, heads, kv_heads, dim, blocks = 16, 4, 2, 32, 6
    native, reference = CpuNativeBackend(), TorchReferenceBackend()
    caches = [torch.zeros(b.kv_cache_shape(blocks, bs, kv_heads, dim)) for b in (native, reference)]
    context = 21  # tokens already cached: rows at positions 21..25 (one plain request row, then 4 of a draft)
    history = torch.randn(context, kv_heads, dim), torch.randn(context, kv_heads, dim)
    table = torch.tensor([[3, 1, 4, 0]])
    slots = table[0, torch.arange(context) // bs] * bs + torch.arange(context) % bs
    for backend, cache in zip((native, reference), caches, strict=True):
        meta = AttentionMetadata(bs, 0, slots, None, None, [PrefillSpan(0, context, 0, table[0])])
        backend.forward(torch.randn(context, heads, dim), *history, cache, meta, 0.2)
    rows = 5
    positions = torch.arange(context, context + rows)
    q, k, v = torch.randn(rows, heads, dim), torch.randn(rows, kv_heads, dim), torch.randn(rows, kv_heads, dim)
    outs = []
    for backend, cache in zip((native, reference), caches, strict=True):
        meta = AttentionMetadata(bs, rows, table[0, positions // bs] * bs + positions % bs, table.repeat(rows, 1),
                                 positions + 1, decode_rows_share_requests=True)
        backend.prepare(meta)
        outs.append(backend.forward(q, k, v, cache, meta, 0.2))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs[1][1:], outs[1][:1].expand(rows - 1, -1, -1))


def test_steps_with_drafts_replay_padded_decode_buckets(parity_dir):
    """The CUDA-graph path on CPU: decode buckets set, so every decode-only step (drafts included) is padded to
    a bucket's rows, as a graph would run it; the tokens stay Hugging Face's."""
    prompts = pattern_prompts(6, seed=3)
    expected = [hf_greedy(parity_dir, p, MAX_NEW) for p in prompts]
    llm = LLM(str(parity_dir), dtype="float32", max_model_len=256, speculative_config=NGRAM4)
    runner = llm.engine.runner
    assert runner.max_decode_rows == runner.max_num_seqs * 5
    pick, seen = runner._decode_bucket, []

    def spy(items):
        bucket = pick(items)
        if bucket is not None:
            seen.append((sum(it.num_draft_tokens for it in items), bucket - sum(it.decode_rows for it in items)))
        return bucket

    runner.decode_buckets, runner._decode_bucket = [1, 2, 4, 8, 16, 24, 32], spy
    try:
        assert generate_ids(llm, prompts, GREEDY) == expected
        assert generate_ids(llm, prompts[:1], GREEDY) == expected[:1]
    finally:
        runner.decode_buckets = []
        del runner._decode_bucket
    assert any(drafts > 0 and pad > 0 for drafts, pad in seen), "no padded step verified drafts"
    assert llm.engine.core.stats.num_accepted_tokens > 0


@pytest.mark.parametrize("options", [{}, dict(max_num_batched_tokens=16), dict(enable_prefix_caching=False)],
                         ids=["default", "chunked-prefill", "prefix-cache-off"])
def test_wrong_drafts_never_change_the_tokens(tiny_checkpoint_factory, options):
    path = tiny_checkpoint_factory("llama")
    prompts = mixed_prompts(12, 300, seed=4, shared_prefix=20)
    expected = [hf_greedy(path, p, 24) for p in prompts]
    llm = LLM(str(path), dtype="float32", speculative_config={"num_speculative_tokens": 5}, **options)
    llm.engine.core.proposer = OracleProposer({tuple(p): e for p, e in zip(prompts, expected, strict=True)}, 5)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    assert generate_ids(llm, prompts, params) == expected
    stats = llm.engine.core.stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens


def test_speculation_under_tensor_parallelism_gives_hf_tokens(parity_dir):
    prompts = pattern_prompts(6, seed=2)
    expected = [hf_greedy(parity_dir, p, MAX_NEW) for p in prompts]
    llm = LLM(str(parity_dir), tensor_parallel_size=2, speculative_config=NGRAM4, **TP_ENGINE)
    try:
        assert generate_ids(llm, prompts, GREEDY) == expected
        assert llm.engine.core.stats.num_accepted_tokens > 50
    finally:
        llm.shutdown()


# ---- the same outputs as without speculation -------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(parity_dir):
    """The parity model with and without speculation (float32)."""
    plain = LLM(str(parity_dir), dtype="float32", max_model_len=256)
    spec = LLM(str(parity_dir), dtype="float32", max_model_len=256, speculative_config=NGRAM4)
    return plain, spec


def _comparable(output) -> tuple:
    o = output.outputs[0]
    return (o.token_ids, o.text, o.finish_reason, o.stop_reason)


def _late_token(tokens: list[int], decode=None) -> int:
    """The token of ``tokens`` whose first occurrence comes last (only tokens that decode to printable ASCII when
    ``decode`` is given): a stop there ends the sequence after several steps of kept drafts."""
    first: dict[int, int] = {}
    for index, token in enumerate(tokens):
        if decode is None or (decode([token]).isascii() and decode([token]).isprintable()):
            first.setdefault(token, index)
    return max(first, key=first.__getitem__)


def test_stops_and_limits_inside_kept_drafts_end_where_they_would(engines, parity_dir):
    plain, spec = engines
    prompts = pattern_prompts(8, seed=3)
    reference = [hf_greedy(parity_dir, p, MAX_NEW) for p in prompts]
    decode = plain.get_tokenizer().decode
    stops = [
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[_late_token(reference[0])]),
        SamplingParams(temperature=0, max_tokens=30, stop=[decode([_late_token(reference[1], decode)])]),
        SamplingParams(temperature=0, max_tokens=30, stop=[decode([_late_token(reference[2], decode)])],
                       include_stop_str_in_output=True),
    ]
    others = [
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),  # the limit falls inside a run of drafts
        SamplingParams(temperature=0, max_tokens=30, min_tokens=6, stop_token_ids=[reference[3][2]]),
    ]
    before = spec.engine.core.stats.num_accepted_tokens
    for params in stops + others:
        want = [_comparable(o) for o in plain.generate(prompts, params, use_tqdm=False)]
        got = [_comparable(o) for o in spec.generate(prompts, params, use_tqdm=False)]
        assert got == want, params
        if params in stops:  # the stop ended a sequence after several tokens
            assert any(reason == "stop" and len(ids) > 4 for ids, _, reason, _ in want), want
    assert spec.engine.core.stats.num_accepted_tokens > before + 100
    kv = spec.engine.kv_cache
    assert kv.num_free_blocks == kv.num_blocks


def test_log_probabilities_are_those_of_plain_decoding(engines):
    plain, spec = engines
    prompts = pattern_prompts(4, seed=5)
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=3, ignore_eos=True)
    want = plain.generate(prompts, params, use_tqdm=False)
    got = spec.generate(prompts, params, use_tqdm=False)
    for w, g in zip(want, got, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert len(g.outputs[0].logprobs) == 24
        for wl, gl in zip(w.outputs[0].logprobs, g.outputs[0].logprobs, strict=True):
            assert list(gl) == list(wl)
            assert all(abs(gl[t].logprob - wl[t].logprob) < 1e-4 and gl[t].rank == wl[t].rank for t in wl)
        assert g.outputs[0].cumulative_logprob == pytest.approx(w.outputs[0].cumulative_logprob, abs=1e-3)


def test_no_drafts_while_more_requests_run_than_disable_by_batch_size(parity_dir):
    llm = LLM(str(parity_dir), dtype="float32", max_model_len=256,
              speculative_config={**NGRAM4, "disable_by_batch_size": 2})
    prompts = pattern_prompts(4, seed=9)
    expected = [hf_greedy(parity_dir, p, MAX_NEW) for p in prompts]
    stats = llm.engine.core.stats
    assert generate_ids(llm, prompts[:3], GREEDY) == expected[:3]  # three at once, all to the end
    assert stats.num_draft_tokens == 0
    assert generate_ids(llm, prompts[3:], GREEDY) == expected[3:]  # one alone
    assert stats.num_accepted_tokens > 10


def test_requests_that_read_their_own_tokens_decode_one_at_a_time(engines):
    plain, spec = engines
    prompts = pattern_prompts(4, seed=6)
    core = spec.engine.core
    for params in (SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.3),
                   SamplingParams(temperature=0, max_tokens=16, frequency_penalty=0.5),
                   SamplingParams(temperature=0, max_tokens=16, min_tokens=16, ignore_eos=False)):
        drafts = core.stats.num_draft_tokens
        want = [_comparable(o) for o in plain.generate(prompts, params, use_tqdm=False)]
        assert [_comparable(o) for o in spec.generate(prompts, params, use_tqdm=False)] == want
        assert core.stats.num_draft_tokens == drafts  # none drafted


def _position_histograms(llm: LLM, prompt: list[int], count: int) -> list[collections.Counter]:
    params = [SamplingParams(temperature=2.0, max_tokens=6, seed=seed, ignore_eos=True) for seed in range(count)]
    outputs = llm.generate([prompt] * count, params, use_tqdm=False)
    return [collections.Counter(o.outputs[0].token_ids[i] for o in outputs) for i in range(1, 6)]


def _top_token_shares(reference: list[collections.Counter], histograms: list[collections.Counter]) -> list[float]:
    """At each position, the share of samples holding the reference's most frequent token there (the pattern's
    next token: the token drafts propose)."""
    return [h[r.most_common(1)[0][0]] / sum(h.values()) for r, h in zip(reference, histograms, strict=True)]


def test_random_sampling_keeps_its_distribution(engines, monkeypatch):
    """At temperature 2 the pattern's next token has about half of each position's probability. Over 400 seeded
    samples its share with speculation matches plain decoding's within sampling noise (standard error about
    0.035 for the difference), while a broken acceptance rule (keeping every draft) pushes it up, and is caught."""
    plain, spec = engines
    prompt = pattern_prompts(1, seed=7)[0]
    want = _position_histograms(plain, prompt, 400)
    reference = _top_token_shares(want, want)
    assert all(0.2 < share < 0.9 for share in reference), reference  # random, and drafts are often right
    accepted_before = spec.engine.core.stats.num_accepted_tokens
    got = _top_token_shares(want, _position_histograms(spec, prompt, 400))
    assert spec.engine.core.stats.num_accepted_tokens > accepted_before + 100
    assert max(abs(g - r) for g, r in zip(got, reference, strict=True)) < 0.12, (got, reference)

    def keep_every_draft(drafts, sampled):
        return [*drafts, sampled[-1]]

    monkeypatch.setattr("inferneo.engine.core.accepted_prefix", keep_every_draft)
    broken = _top_token_shares(want, _position_histograms(spec, prompt, 400))
    assert max(b - r for b, r in zip(broken, reference, strict=True)) > 0.2, (broken, reference)


def test_seeded_sampling_draws_as_plain_decoding_does(engines):
    """A seeded request's rows past a rejected draft drew noise from its generator too; the generator is rewound
    to the kept rows, so its ``k``-th token always uses the ``k``-th draw: seeded outputs equal plain decoding's,
    whatever drafts the request (or, through ``disable_by_batch_size`` and the step's budget, its batch) got."""
    plain, spec = engines
    prompts = pattern_prompts(6, seed=31)
    params = [SamplingParams(temperature=2.0, top_k=40, max_tokens=30, seed=5 + i, ignore_eos=True)
              for i in range(len(prompts))]
    stats = spec.engine.core.stats
    drafts, accepted = stats.num_draft_tokens, stats.num_accepted_tokens
    want = generate_ids(plain, prompts, params)
    assert generate_ids(spec, prompts[:1], params[:1]) == want[:1]  # alone
    assert generate_ids(spec, prompts, params) == want  # in a batch
    drafts, accepted = stats.num_draft_tokens - drafts, stats.num_accepted_tokens - accepted
    assert accepted > 20 and drafts - accepted > 20, (drafts, accepted)  # drafts kept, and drafts rejected


# ---- the server ------------------------------------------------------------------------------------------------


def test_server_with_speculation_answers_as_hf_and_counts_drafts(parity_dir, engines):
    prompts = pattern_prompts(3, seed=8)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = engines[0].generate(prompts, params, use_tqdm=False)  # without speculation: HF's tokens, as text
    assert [o.outputs[0].token_ids for o in plain] == [hf_greedy(parity_dir, p, 24) for p in prompts]
    expected = [o.outputs[0].text for o in plain]
    with RemoteServer(parity_dir, "--served-model-name", "parity", "--dtype", "float32", "--max-model-len", "256",
                      "--kv-cache-memory", "16MiB", "--speculative-config", json.dumps(NGRAM4),
                      "--disable-access-log") as server:
        client = openai.OpenAI(base_url=server.url("/v1"), api_key="none")
        for prompt, want in zip(prompts, expected, strict=True):
            whole = client.completions.create(model="parity", prompt=prompt, max_tokens=24, temperature=0,
                                              extra_body={"ignore_eos": True})
            assert whole.choices[0].text == want and whole.usage.completion_tokens == 24
            stream = client.completions.create(model="parity", prompt=prompt, max_tokens=24, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
            assert "".join(c.choices[0].text for c in stream if c.choices) == want
        metrics = httpx.get(server.url("/metrics")).text
    counts = {line.split("{")[0]: float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith("inferneo:spec_decode_")}
    assert counts["inferneo:spec_decode_num_draft_tokens_total"] > 40
    assert 0 < counts["inferneo:spec_decode_num_accepted_tokens_total"] <= counts[
        "inferneo:spec_decode_num_draft_tokens_total"]


def test_serve_refuses_a_bad_speculative_config_at_start(parity_dir):
    proc = subprocess.run([sys.executable, "-m", "inferneo.cli", "serve", "--model", str(parity_dir),
                           "--speculative-config", '{"method": "eagle", "num_speculative_tokens": 2}'],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "speculative_config.method must be one of ngram" in proc.stderr
