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
    return [compiled.matcher(frozenset({EOS_ID})) for _ in range(count)]


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


# Only llguidance enforces this schema (xgrammar would drop the anyOf beside the properties), so the compiler gives it
# to llguidance; PAIR stays with xgrammar.
PAIR = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "s": {"enum": ["x", "y"]}},
        "required": ["n", "s"], "additionalProperties": False}
EITHER = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "b": {"type": "integer", "minimum": 0, "maximum": 99}},
          "anyOf": [{"required": ["a"]}, {"required": ["b"]}], "additionalProperties": False}
LOGITS = 400  # the logits are wider than the tokenizer's 384 tokens


def _bits(mask: torch.Tensor) -> torch.Tensor:
    return ((mask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).view(mask.shape[0], -1)


def test_a_step_mixes_xgrammar_and_llguidance_rows():
    """One bitmask for both backends, rows interleaved: each row is what its matcher alone gives; no row allows a
    special token or an id past the vocabulary; the stop token comes only once the constraint is complete, and
    taking it ends the constraint; every finished text validates."""
    import json

    import jsonschema

    tokenizer = make_tiny_tokenizer(VOCAB)
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    compiler = GrammarCompiler(lambda: tokenizer, LOGITS)
    record = compiler.submit(StructuredOutputsParams(json=PAIR)).result()
    either = compiler.submit(StructuredOutputsParams(json=EITHER)).result()
    assert (record.backend, either.backend) == ("xgrammar", "llguidance")
    schemas = [PAIR, EITHER] * 4
    compiled = [record, either] * 4
    batch = MatcherBatch(2)
    mixed = [c.matcher(frozenset({EOS_ID})) for c in compiled]
    alone = [c.matcher(frozenset({EOS_ID})) for c in compiled]  # the reference: one matcher, one fill at a time
    texts: list[list[int]] = [[] for _ in compiled]
    gen = torch.Generator().manual_seed(1)
    width = (LOGITS + 31) // 32
    for _ in range(300):
        live = [i for i in range(len(mixed)) if mixed[i].constrains]
        if not live:
            break
        mask = torch.zeros(len(live), width, dtype=torch.int32)
        batch.fill([mixed[i] for i in live], mask)
        one = torch.zeros(1, width, dtype=torch.int32)
        for row, i in enumerate(live):
            alone[i].fill(one, 0)
            assert torch.equal(mask[row], one[0]), (i, row)
        bits = _bits(mask)
        assert not bits[:, VOCAB:].any()  # nothing past the tokenizer's vocabulary
        assert not bits[:, sorted(special - {EOS_ID})].any()  # no special token but the stop token
        scores = torch.rand(len(live), LOGITS, generator=gen).masked_fill(bits[:, :LOGITS] == 0, -1.0)
        scores[:, EOS_ID] *= 3  # end as soon as allowed, so the loop finishes
        tokens = scores.argmax(-1).tolist()
        for row, (i, token) in enumerate(zip(live, tokens, strict=True)):
            if token == EOS_ID:  # allowed only where the text is complete
                jsonschema.validate(json.loads(tokenizer.decode(texts[i])), schemas[i])
            else:
                texts[i].append(token)
            assert bits[row, token]
            alone[i].accept_token(token)
        batch.accept([mixed[i] for i in live], tokens)
        assert [g.constrains for g in mixed] == [g.constrains for g in alone]
        assert not any(g.broken for g in mixed)
    assert not any(g.constrains for g in mixed)  # every sequence ended its constraint with the stop token
    assert [g.num_accepted for g in mixed] == [len(t) + 1 for t in texts]
    batch.shutdown()
    compiler.shutdown()


def test_a_refused_token_turns_an_llguidance_constraint_off():
    tokenizer = make_tiny_tokenizer(VOCAB)
    compiler = GrammarCompiler(lambda: tokenizer, LOGITS)
    either = compiler.submit(StructuredOutputsParams(json=EITHER)).result()
    letter = tokenizer.convert_tokens_to_ids("a")
    early_stop = either.matcher(frozenset({EOS_ID}))
    broken = either.matcher(frozenset({EOS_ID}))
    MatcherBatch(1).accept([early_stop, broken], [EOS_ID, letter])  # "{" is the only start
    assert all(g.broken and not g.constrains and g.num_accepted == 1 for g in (early_stop, broken))
    compiler.shutdown()
