"""The matcher batch (xgrammar's BatchGrammarMatcher, on one thread or several) gives the bitmasks and acceptances
of one matcher at a time: the path every step takes, with the threads of a many-core machine checked here too."""

from __future__ import annotations

import torch

from inferneo.sampling_params import StructuredOutputsParams
from inferneo.structured_output.compiler import GrammarCompiler, MatcherBatch, SequenceGrammar
from inferneo.testing.schema_suite import RECORD_SCHEMA
from inferneo.testing.tiny_models import EOS_ID, make_tiny_tokenizer

VOCAB = 384


def _grammars(compiled, count: int) -> list[SequenceGrammar]:
    return [SequenceGrammar(compiled, frozenset({EOS_ID})) for _ in range(count)]


def test_threaded_batch_equals_one_at_a_time():
    compiler = GrammarCompiler(lambda: make_tiny_tokenizer(VOCAB), VOCAB)
    compiled = compiler.submit(StructuredOutputsParams(json=RECORD_SCHEMA)).result()
    rows = 32
    batches = [MatcherBatch(1), MatcherBatch(4)]
    a = _grammars(compiled, rows)  # one matcher at a time: the reference
    others = [_grammars(compiled, rows) for _ in batches]
    gen = torch.Generator().manual_seed(0)
    width = (VOCAB + 31) // 32
    steps = 0
    for _ in range(60):
        live = [i for i in range(rows) if a[i].constrains]
        if not live:
            break
        mask_a = torch.empty(len(live), width, dtype=torch.int32)
        for row, i in enumerate(live):
            a[i].fill(mask_a, row)
        for batch, grammars in zip(batches, others, strict=True):
            mask_b = torch.empty(len(live), width, dtype=torch.int32)
            batch.fill([grammars[i] for i in live], mask_b)
            assert torch.equal(mask_a, mask_b)
        # a random allowed token per row (bit t of word t // 32), the same for both
        bits = ((mask_a.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).view(len(live), -1)[:, :VOCAB]
        scores = torch.rand(len(live), VOCAB, generator=gen).masked_fill(bits == 0, -1.0)
        tokens = scores.argmax(-1).tolist()
        for i, token in zip(live, tokens, strict=True):
            a[i].accept_token(token)
        for batch, grammars in zip(batches, others, strict=True):
            batch.accept([grammars[i] for i in live], tokens)
            assert [g.constrains for g in a] == [g.constrains for g in grammars]
            assert [g.num_accepted for g in a] == [g.num_accepted for g in grammars]
            assert not any(g.broken for g in grammars)
        steps += 1
    assert steps > 10  # the JSON took a while: the batch path ran on many rows for many steps
    for batch in batches:
        batch.shutdown()
    compiler.shutdown()


def test_refused_token_turns_the_constraint_off_in_both_paths():
    compiler = GrammarCompiler(lambda: make_tiny_tokenizer(VOCAB), VOCAB)
    compiled = compiler.submit(StructuredOutputsParams(regex="[0-9]+")).result()
    letter = make_tiny_tokenizer(VOCAB).convert_tokens_to_ids("a")
    for batch in (MatcherBatch(1), MatcherBatch(4)):
        grammars = _grammars(compiled, 16)
        batch.accept(grammars, [letter] * len(grammars))
        assert all(g.broken and not g.constrains and g.num_accepted == 1 for g in grammars)
    compiler.shutdown()
