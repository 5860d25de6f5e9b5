"""The threaded matcher batch (xgrammar's BatchGrammarMatcher) gives the bitmasks and acceptances of one matcher
at a time: the path a many-core machine takes, checked on any machine."""

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
    rows = 2 * MatcherBatch.MIN_ROWS
    serial, threaded = MatcherBatch(1), MatcherBatch(4)
    a, b = _grammars(compiled, rows), _grammars(compiled, rows)
    gen = torch.Generator().manual_seed(0)
    width = (VOCAB + 31) // 32
    steps = 0
    for _ in range(60):
        live = [i for i in range(rows) if a[i].constrains]
        if not live:
            break
        mask_a = torch.empty(len(live), width, dtype=torch.int32)
        mask_b = torch.empty(len(live), width, dtype=torch.int32)
        serial.fill([a[i] for i in live], mask_a)
        threaded.fill([b[i] for i in live], mask_b)
        assert torch.equal(mask_a, mask_b)
        # a random allowed token per row (bit t of word t // 32), the same for both
        bits = ((mask_a.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).view(len(live), -1)[:, :VOCAB]
        scores = torch.rand(len(live), VOCAB, generator=gen).masked_fill(bits == 0, -1.0)
        tokens = scores.argmax(-1).tolist()
        serial.accept([a[i] for i in live], tokens)
        threaded.accept([b[i] for i in live], tokens)
        assert [g.constrains for g in a] == [g.constrains for g in b]
        assert not any(g.broken for g in a + b)
        steps += 1
    assert steps > 10  # the JSON took a while: the batch path ran on many rows for many steps
    compiler.shutdown()


def test_refused_token_turns_the_constraint_off_in_both_paths():
    compiler = GrammarCompiler(lambda: make_tiny_tokenizer(VOCAB), VOCAB)
    compiled = compiler.submit(StructuredOutputsParams(regex="[0-9]+")).result()
    letter = make_tiny_tokenizer(VOCAB).convert_tokens_to_ids("a")
    for batch in (MatcherBatch(1), MatcherBatch(4)):
        grammars = _grammars(compiled, MatcherBatch.MIN_ROWS)
        batch.accept(grammars, [letter] * len(grammars))
        assert all(g.broken and not g.constrains and g.num_accepted == 1 for g in grammars)
    compiler.shutdown()
