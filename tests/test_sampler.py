"""Tests for the batched sampler: greedy, filters, distribution, seeds, penalties, min_tokens, logprobs."""

from __future__ import annotations

import itertools

import pytest
import torch

from inferneo.engine.request import Request
from inferneo.sampling import Sampler, SamplerOutput, SamplingMetadata, SamplingRow
from inferneo.sampling.ops import apply_penalties
from inferneo.sampling_params import SamplingParams

CPU = torch.device("cpu")
_ids = itertools.count()


def make_request(prompt: list[int] | None = None, output: list[int] | None = None,
                 eos: frozenset[int] = frozenset({2}), **params: object) -> Request:
    return Request(request_id=f"r{next(_ids)}", prompt_token_ids=prompt or [1, 3], output_token_ids=output or [],
                   sampling_params=SamplingParams(**params), max_tokens=16, eos_token_ids=eos)


def rows(requests: list[Request]) -> list[SamplingRow]:
    """The sampler's view of these requests (what the engine core hands the runner)."""
    return [r.sampling_row for r in requests]


def sample(logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
    metadata = SamplingMetadata.build(rows(requests), logits.shape[1], CPU)
    return Sampler()(logits, metadata)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_greedy_is_argmax_and_fast_path() -> None:
    logits = torch.randn(6, 50)
    requests = [make_request(temperature=0.0) for _ in range(6)]
    md = SamplingMetadata.build(rows(requests), 50, CPU)
    assert md.all_greedy and md.temperature is None and md.top_k is None and md.top_p is None
    assert md.output_counts is None and md.prompt_mask is None and md.max_num_logprobs is None
    out = Sampler()(logits, md)
    assert out.sampled_token_ids.dtype == torch.int64
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.logprob_token_ids is None and out.sampled_token_ranks is None
    # Any float dtype is accepted; bf16 argmax matches the float32 argmax of the same values.
    half = logits.to(torch.bfloat16)
    assert torch.equal(sample(half, requests).sampled_token_ids, half.float().argmax(-1))


def test_mixed_greedy_and_random_rows() -> None:
    vocab = 40
    logits = torch.randn(6, vocab)
    logits[1::2] = 0.0  # random rows: uniform, so they must spread out
    requests = [make_request(temperature=0.0 if i % 2 == 0 else 1.0, top_p=0.99) for i in range(6)]
    md = SamplingMetadata.build(rows(requests), vocab, CPU)
    assert not md.all_greedy and not md.all_random
    assert md.greedy_mask.tolist() == [True, False] * 3
    before = logits.clone()
    seen: set[int] = set()
    for _ in range(20):
        out = Sampler()(logits, md).sampled_token_ids
        assert torch.equal(out[0::2], logits[0::2].argmax(-1))
        seen.update(out[1::2].tolist())
    assert len(seen) > 20
    assert torch.equal(logits, before)  # filters work on a copy


@pytest.mark.parametrize("params", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0),
                                    dict(top_k=1, top_p=0.5), dict(top_k=3, top_p=1e-6)])
def test_degenerate_filters_equal_greedy(params: dict) -> None:
    logits = torch.randn(16, 100) * 3
    requests = [make_request(temperature=1.5, **params) for _ in range(16)]
    for _ in range(5):
        assert torch.equal(sample(logits, requests).sampled_token_ids, logits.argmax(-1))


def test_per_row_filters_restrict_the_support() -> None:
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    row = probs.log()
    cases = [  # (params, allowed tokens)
        (dict(top_k=2), {0, 1}),
        (dict(top_k=3), {0, 1, 2}),
        (dict(top_p=0.65), {0, 1}),  # 0.4 + 0.3 reaches 0.65
        (dict(top_p=0.75), {0, 1, 2}),
        (dict(top_p=0.3), {0}),
        (dict(min_p=0.3), {0, 1, 2}),  # keep p >= 0.12
        (dict(min_p=0.5), {0, 1}),  # keep p >= 0.2
        (dict(top_k=4, top_p=0.8), {0, 1, 2}),
        (dict(), {0, 1, 2, 3, 4}),
    ]
    reps = 200
    requests = [make_request(temperature=1.0, **p) for p, _ in cases for _ in range(reps)]
    logits = row.repeat(len(requests), 1)
    out = sample(logits, requests).sampled_token_ids.view(len(cases), reps)
    for (params, allowed), tokens in zip(cases, out, strict=True):
        assert set(tokens.tolist()) == allowed, params


def test_top_k_alone_uses_topk_path_with_mixed_rows() -> None:
    logits = torch.randn(3, 30)
    requests = [make_request(top_k=5), make_request(), make_request(temperature=0.0)]
    md = SamplingMetadata.build(rows(requests), 30, CPU)
    assert md.top_p is None and md.max_top_k == 5 and md.top_k.tolist() == [5, 30, 30]
    top5 = set(logits[0].topk(5).indices.tolist())
    row1: set[int] = set()
    for _ in range(60):
        out = Sampler()(logits, md).sampled_token_ids
        assert out[0].item() in top5
        assert out[2].item() == logits[2].argmax().item()
        row1.add(out[1].item())
    assert len(row1) > 5  # the unfiltered row is not truncated to the batch's top-k


def _chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    return float(((counts - expected) ** 2 / expected).sum())


# 99.9th percentile of chi-square with 4 degrees of freedom.
_CHI2_4DOF_999 = 18.47


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_empirical_distribution_matches_softmax(temperature: float) -> None:
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0])
    draws = 20000
    requests = [make_request(temperature=temperature)]
    md = SamplingMetadata.build(rows(requests * draws), 5, CPU)
    tokens = Sampler()(row.repeat(draws, 1), md).sampled_token_ids
    assert _chi_square(tokens, torch.softmax(row / temperature, -1)) < _CHI2_4DOF_999


def test_seeded_rows_follow_the_softmax_too() -> None:
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0])
    draws = 2000
    requests = [make_request(seed=s) for s in range(draws)]
    tokens = sample(row.repeat(draws, 1), requests).sampled_token_ids
    assert _chi_square(tokens, torch.softmax(row, -1)) < _CHI2_4DOF_999


def test_seeded_request_is_independent_of_the_batch() -> None:
    vocab, steps = 64, 12
    step_logits = torch.randn(steps, vocab)
    params = dict(seed=1234, temperature=1.2, top_k=40, top_p=0.95)

    alone = make_request(**params)
    solo: list[int] = []
    for t in range(steps):
        token = sample(step_logits[t : t + 1], [alone]).sampled_token_ids.item()
        alone.append_output_token(token)
        solo.append(token)
    assert len(set(solo)) > 1  # it really sampled

    torch.manual_seed(99)
    seeded = make_request(**params)
    batched: list[int] = []
    for t in range(steps):
        others = [make_request(temperature=0.0 if j % 3 == 0 else 0.9, seed=j if j % 3 == 1 else None,
                               top_p=0.8 if j % 2 else 1.0, top_k=5 * j) for j in range(31)]
        pos = (7 * t) % 32
        requests = others[:pos] + [seeded] + others[pos:]
        logits = torch.randn(32, vocab)
        logits[pos] = step_logits[t]
        token = sample(logits, requests).sampled_token_ids[pos].item()
        seeded.append_output_token(token)
        batched.append(token)
    assert batched == solo


def test_penalties_match_hand_computed_values() -> None:
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5, -2.0, 3.0],
                           [1.0, 2.0, -1.0, 0.5, -2.0, 3.0]])
    penalized = make_request(prompt=[1, 2], output=[2, 3, 3], temperature=0.0, repetition_penalty=2.0,
                             frequency_penalty=0.5, presence_penalty=0.25, logprobs=6)
    plain = make_request(prompt=[1, 2], output=[2, 3, 3], temperature=0.0, logprobs=6)
    # repetition over {1, 2, 3}: 2.0 -> 1.0, -1.0 -> -2.0, 0.5 -> 0.25; then frequency (counts 2:1, 3:2)
    # and presence: token 2: -2.0 - 0.5 - 0.25 = -2.75; token 3: 0.25 - 1.0 - 0.25 = -1.0.
    expected = torch.tensor([1.0, 1.0, -2.75, -1.0, -2.0, 3.0])

    md = SamplingMetadata.build(rows([penalized, plain]), 6, CPU)
    assert md.output_counts.tolist()[0] == [0, 0, 1, 2, 0, 0]
    assert md.output_counts.tolist()[1] == [0] * 6  # rows without penalties ship no tokens
    assert md.prompt_mask.tolist()[0] == [False, True, True, False, False, False]
    direct = apply_penalties(logits.clone(), md.output_counts, md.prompt_mask, md.repetition_penalty,
                             md.frequency_penalty, md.presence_penalty)
    torch.testing.assert_close(direct[0], expected)
    torch.testing.assert_close(direct[1], logits[1])

    before = logits.clone()
    out = Sampler()(logits, md)
    assert torch.equal(logits, before)  # the caller's logits are untouched
    for row, ref in enumerate([expected, logits[1]]):
        got = torch.empty(6).scatter_(0, out.logprob_token_ids[row, 1:], out.logprobs[row, 1:])
        torch.testing.assert_close(got, torch.log_softmax(ref, -1))


def test_each_penalty_alone() -> None:
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    cases = [
        (dict(repetition_penalty=4.0), [1.0, 0.5, -4.0, 0.5]),  # prompt {1}, output {2}
        (dict(frequency_penalty=-1.0), [1.0, 2.0, 1.0, 0.5]),  # token 2 twice, negative penalty rewards
        (dict(presence_penalty=1.5), [1.0, 2.0, -2.5, 0.5]),
    ]
    for params, want in cases:
        req = make_request(prompt=[1], output=[2, 2], **params)
        md = SamplingMetadata.build(rows([req]), 4, CPU)
        got = apply_penalties(logits.clone(), md.output_counts, md.prompt_mask, md.repetition_penalty,
                              md.frequency_penalty, md.presence_penalty)
        torch.testing.assert_close(got[0], torch.tensor(want), msg=str(params))


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    logits = torch.tensor([[0.0, 0.0, 9.0, 0.0, 8.0, 1.0]])  # EOS 2 then stop id 4 are the favourites
    req = make_request(temperature=0.0, min_tokens=3, stop_token_ids=[4], eos=frozenset({2}), logprobs=1)
    for step in range(3):
        md = SamplingMetadata.build(rows([req]), 6, CPU)
        assert md.min_tokens_ids is not None and sorted(md.min_tokens_ids.tolist()) == [2, 4]
        out = Sampler()(logits, md)
        assert out.sampled_token_ids.item() == 5, step
        assert out.logprob_token_ids[0, 1].item() == 5  # the masked tokens drop out of the top-k too
        req.append_output_token(5)
    md = SamplingMetadata.build(rows([req]), 6, CPU)
    assert md.min_tokens_ids is None
    assert Sampler()(logits, md).sampled_token_ids.item() == 2


def test_min_tokens_with_ignore_eos_still_masks_stop_ids() -> None:
    logits = torch.tensor([[0.0, 0.0, 9.0, 0.0, 8.0, 1.0]])
    req = make_request(temperature=0.0, min_tokens=2, stop_token_ids=[4], ignore_eos=True)
    md = SamplingMetadata.build(rows([req]), 6, CPU)
    assert md.min_tokens_ids.tolist() == [4]
    assert Sampler()(logits, md).sampled_token_ids.item() == 2  # EOS does not end an ignore_eos request


def test_random_rows_respect_min_tokens() -> None:
    logits = torch.zeros(50, 4)
    requests = [make_request(min_tokens=1, stop_token_ids=[3], eos=frozenset({0})) for _ in range(50)]
    tokens = set(sample(logits, requests).sampled_token_ids.tolist())
    assert tokens == {1, 2}


def test_logprobs_values_ranks_and_order() -> None:
    vocab = 20
    logits = torch.randn(4, vocab)
    requests = [make_request(temperature=0.0), make_request(temperature=0.0, logprobs=0),
                make_request(temperature=5.0, logprobs=5), make_request(temperature=0.3, top_k=3, logprobs=2)]
    md = SamplingMetadata.build(rows(requests), vocab, CPU)
    assert md.max_num_logprobs == 5
    ref = torch.log_softmax(logits, -1)  # before temperature and filters
    for _ in range(10):
        out = Sampler()(logits, md)
        ids, lps, ranks = out.logprob_token_ids, out.logprobs, out.sampled_token_ranks
        assert ids.shape == lps.shape == (4, 6) and lps.dtype == torch.float32
        assert torch.equal(ids[:, 0], out.sampled_token_ids)
        torch.testing.assert_close(lps, ref.gather(1, ids))
        top = ref.topk(5, -1)
        assert torch.equal(ids[:, 1:], top.indices)
        assert torch.all(lps[:, 1:-1] >= lps[:, 2:])
        order = ref.argsort(-1, descending=True)
        want_ranks = (order == out.sampled_token_ids[:, None]).int().argmax(-1) + 1
        assert torch.equal(ranks, want_ranks)
        assert ranks[0].item() == ranks[1].item() == 1
        assert ranks[3].item() <= 3


def test_logprobs_zero_returns_only_the_sampled_token() -> None:
    logits = torch.randn(2, 10)
    out = sample(logits, [make_request(temperature=0.0, logprobs=0), make_request(temperature=0.0)])
    assert out.logprobs.shape == (2, 1)
    torch.testing.assert_close(out.logprobs[:, 0], torch.log_softmax(logits, -1).amax(-1))


def test_metadata_skips_unused_features() -> None:
    requests = [make_request(temperature=0.8), make_request(temperature=0.0, seed=3),
                make_request(temperature=1.0, seed=5, frequency_penalty=0.1)]
    md = SamplingMetadata.build(rows(requests), 10, CPU)
    assert md.all_random is False and md.num_random == 2
    assert md.top_k is None and md.top_p is None and md.min_p is None
    assert md.seeded_rows == [2] and md.generators == [requests[2].generator]  # greedy seeds draw nothing
    assert md.temperature.tolist() == pytest.approx([0.8, 1.0, 1.0])
    assert md.frequency_penalty is not None and md.presence_penalty is None and md.repetition_penalty is None
    assert md.prompt_mask is None and md.output_counts is not None


def test_out_of_range_token_ids_are_ignored() -> None:
    req = make_request(prompt=[1, 99], output=[7, 3], repetition_penalty=2.0, min_tokens=1,
                       stop_token_ids=[50], eos=frozenset({8}))
    md = SamplingMetadata.build(rows([req]), 8, CPU)
    assert md.prompt_mask[0].nonzero().flatten().tolist() == [1]
    assert md.output_counts[0].nonzero().flatten().tolist() == [3, 7]
    assert md.min_tokens_ids is None


def test_logit_bias_moves_greedy_and_random_rows_and_their_logprobs() -> None:
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0, 0.5]] * 4)
    requests = [make_request(temperature=0.0),  # no bias: the argmax, 2
                make_request(temperature=0.0, logit_bias={2: -100.0}),  # the favourite banned: 3 next
                make_request(temperature=0.0, logit_bias={0: 4.5, 4: 6.0}),  # 0.5 + 6 beats 5: token 4
                make_request(temperature=1.0, logit_bias={1: 100.0}, logprobs=1)]  # all but forced
    md = SamplingMetadata.build(rows(requests), 5, CPU)
    assert md.bias_rows.tolist() == [1, 2, 2, 3] and md.bias_ids.tolist() == [2, 0, 4, 1]
    for _ in range(20):
        out = sample(logits, requests)
        assert out.sampled_token_ids.tolist() == [2, 3, 4, 1]
    # Log-probabilities describe the biased distribution (as with penalties), and the caller's logits are kept.
    assert out.logprob_token_ids[3, 0].item() == 1 and out.logprobs[3, 0].item() > -1e-3
    assert torch.equal(logits, torch.tensor([[0.0, 1.0, 5.0, 2.0, 0.5]] * 4))


def test_logit_bias_only_greedy_batch_leaves_the_fast_path() -> None:
    logits = torch.tensor([[0.0, 1.0, 5.0]])
    md = SamplingMetadata.build(rows([make_request(temperature=0.0, logit_bias={0: 10.0})]), 3, CPU)
    assert md.all_greedy and md.bias_rows is not None
    assert Sampler()(logits, md).sampled_token_ids.tolist() == [0]
    # A bias on an id past the logits (a tokenizer larger than the model's head) is never applied out of range.
    md = SamplingMetadata.build(rows([make_request(temperature=0.0, logit_bias={7: 100.0})]), 3, CPU)
    assert md.bias_rows is None and Sampler()(logits, md).sampled_token_ids.tolist() == [2]


@pytest.mark.parametrize("bias", [{-1: 1.0}, {3: 100.5}, {3: float("nan")}, {"3": 1.0}, {3: True}])
def test_logit_bias_values_are_checked(bias) -> None:
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=bias)


@pytest.mark.parametrize("keep_allowed_argmax", [True, False])
def test_greedy_under_bitmask_equals_masking_every_row(keep_allowed_argmax: bool) -> None:
    """The greedy fast path of structured output (argmax kept where the grammar allows it, else the masked
    argmax of that row alone) picks what masking the whole row and taking its argmax picks."""
    from inferneo.sampling.ops import apply_token_bitmask, greedy_under_bitmask

    gen = torch.Generator().manual_seed(0)
    for batch, vocab, constrained in [(64, 1000, 64), (8, 384, 3), (16, 97, 16)]:
        for trial in range(12):
            logits = torch.randn(batch, vocab, generator=gen)
            words = torch.randint(-2**31, 2**31 - 1, (constrained, (vocab + 31) // 32), dtype=torch.int32,
                                  generator=gen)
            rows = torch.randperm(batch, generator=gen)[:constrained].sort().values
            if trial % 2:  # the grammar allows the model's own pick: the case the fast path skips
                for i, token in enumerate(logits.argmax(-1)[rows].tolist()):
                    words[i, token // 32] |= -(2**31) if token % 32 == 31 else 1 << (token % 32)
            reference = logits.clone()
            apply_token_bitmask(reference, rows, words)
            before = logits.clone()
            got = greedy_under_bitmask(logits, rows, words, keep_allowed_argmax)
            assert torch.equal(got, reference.argmax(-1))
            assert torch.equal(logits, before)  # the caller's logits are untouched


def test_min_tokens_ban_gives_way_only_where_a_constraint_allows_nothing_else():
    from inferneo.sampling.ops import apply_min_tokens_ban

    ninf = float("-inf")
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5],     # free row: EOS (3) banned
                           [ninf, ninf, ninf, 0.5],  # a completed constraint: only EOS (3) left: kept
                           [ninf, 2.0, ninf, 0.5]])  # constrained, but another token is allowed: EOS banned
    rows, ids = torch.tensor([0, 1, 2]), torch.tensor([3, 3, 3])
    free = logits.clone()
    apply_min_tokens_ban(free, rows, ids, constrained=False)
    assert torch.isneginf(free[:, 3]).all()
    masked = logits.clone()
    apply_min_tokens_ban(masked, rows, ids, constrained=True)
    assert masked[0, 3] == ninf and masked[1, 3] == 0.5 and masked[2, 3] == ninf
    assert torch.equal(masked[:, :3], logits[:, :3])


def test_allowed_token_ids_limit_greedy_and_random_rows_and_their_logprobs() -> None:
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0, 0.5]] * 3)
    requests = [make_request(temperature=0.0, allowed_token_ids=[0, 3]),  # 2 is out: 3 is the best left
                make_request(temperature=1.0, allowed_token_ids=[1, 4, 9], logprobs=1),  # 9: past the vocabulary
                make_request(temperature=0.0)]  # unrestricted: 2
    md = SamplingMetadata.build(rows(requests), 5, CPU)
    assert md.allowed_rows.tolist() == [0, 1] and md.allowed_mask.tolist() == [
        [True, False, False, True, False], [False, True, False, False, True]]
    seen = set()
    for _ in range(40):
        out = sample(logits, requests)
        assert out.sampled_token_ids[0].item() == 3 and out.sampled_token_ids[2].item() == 2
        seen.add(out.sampled_token_ids[1].item())
        # the log-probabilities are those of the allowed tokens only: their top alternative is token 1
        assert out.logprob_token_ids[1, 1].item() == 1
        assert torch.logsumexp(out.logprobs[1, 1:], 0).item() <= 1e-6
    assert seen == {1, 4}
    assert torch.equal(logits, torch.tensor([[0.0, 1.0, 5.0, 2.0, 0.5]] * 3))
    # a greedy batch with allowed tokens leaves the argmax fast path
    md = SamplingMetadata.build(rows(requests[:1]), 5, CPU)
    assert md.all_greedy and Sampler()(logits[:1], md).sampled_token_ids.tolist() == [3]


def test_bad_words_ban_the_last_token_after_the_rest_of_the_word() -> None:
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0, 0.5]] * 4)
    words = [[2, 3], [4]]  # a two-token word (2 then 3) and a one-token word (4)
    requests = [make_request(temperature=0.0, bad_words_token_ids=words),  # no output: only 4 banned, 2 stays
                make_request(temperature=0.0, output=[7, 2], bad_words_token_ids=words),  # 2 3 would complete it
                make_request(temperature=0.0, output=[2, 7], bad_words_token_ids=[[2, 7, 2]]),  # 2 7 2 would
                make_request(temperature=0.0, output=[3], bad_words_token_ids=[[3, 2]])]
    md = SamplingMetadata.build(rows(requests), 5, CPU)
    assert list(zip(md.bad_words_rows.tolist(), md.bad_words_ids.tolist(), strict=True)) == [
        (0, 4), (1, 3), (1, 4), (2, 2), (3, 2)]
    assert sample(logits, requests).sampled_token_ids.tolist() == [2, 2, 3, 3]
    # the prompt does not count: a word's first tokens there ban nothing
    prompt_only = make_request(temperature=0.0, prompt=[1, 2], bad_words_token_ids=[[2, 2]])
    assert sample(logits[:1], [prompt_only]).sampled_token_ids.tolist() == [2]


@pytest.mark.parametrize("kwargs, field", [
    ({"allowed_token_ids": []}, "allowed_token_ids"), ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
    ({"allowed_token_ids": 3}, "allowed_token_ids"), ({"allowed_token_ids": ["3"]}, "allowed_token_ids"),
    ({"bad_words": [""]}, "bad_words"), ({"bad_words": [" "]}, "bad_words"), ({"bad_words": [3]}, "bad_words"),
    ({"bad_words_token_ids": [[]]}, "bad_words_token_ids"), ({"bad_words_token_ids": [3]}, "bad_words_token_ids"),
])
def test_allowed_and_bad_words_values_are_checked(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)
    assert SamplingParams(bad_words="word").bad_words == ["word"]
