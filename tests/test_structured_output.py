"""Structured output in the engine: every constrained output parses and validates, on every engine path.

The tiny random-weight checkpoint's free-running text is gibberish, so whatever shape its outputs take comes from
the grammar alone. The constraint suites (``inferneo.testing.schema_suite``) bound every free string and array,
so each JSON value completes well inside ``max_tokens``.

Checked here: the JSON schema suite (greedy and seeded sampling, with and without free whitespace), regexes,
choices, ``json_object`` and an EBNF grammar; unconstrained requests unchanged by constrained neighbours; the same
constrained greedy outputs across batch compositions, chunked prefill, prefix-cache hits, preemption,
asynchronous scheduling and tensor parallelism; ``n > 1``, seeds, logprobs and stop strings on constrained
requests; bad constraints refused naming the field, with the engine serving on; grammars compiled off the step
loop (a request still compiling holds nobody up, and a grammar that fails to compile fails its request only).
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import replace

import jsonschema
import pytest
import torch

from inferneo import LLM, SamplingParams
from inferneo.engine.protocol import FailureKind, InvalidRequestError
from inferneo.engine.request import Request
from inferneo.model_executor.arch_presets import TokenIdTokenizer
from inferneo.sampling.ops import apply_token_bitmask
from inferneo.sampling_params import StructuredOutputsParams
from inferneo.structured_output.compiler import GrammarCompiler
from inferneo.testing.schema_suite import CHOICES, EBNF_GRAMMAR, EBNF_GRAMMAR_REGEX, REGEXES, SCHEMAS

ENGINE = dict(dtype="float32", max_model_len=1024, num_threads=1)
SEEDS = (11, 12, 13)
SENTENCE = "The quick brown fox jumps over the lazy dog while the cat sleeps. "


def strict_json(text: str):
    """``json.loads`` that also refuses NaN and Infinity (which Python's parser accepts by default)."""
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


# Formats checked as well as the schema: date and uuid. (xgrammar allows "010.0.0.1" as ipv4, as RFC 2673's
# dotted-quad does and Python's ipaddress does not; jsonschema's "time" checker needs an optional parser.)
FORMATS = jsonschema.FormatChecker(formats=["date", "uuid"])


def validate(value, schema: dict) -> None:
    jsonschema.Draft202012Validator(schema, format_checker=FORMATS).validate(value)


def constrained(temperature: float = 0.0, seed: int | None = None, max_tokens: int = 480, **constraint):
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(**constraint))


def prompt(i: int) -> str:
    """Prompts of 3 to about 190 tokens, so longer ones span several KV blocks and prefill chunks."""
    return f"Request {i}: " + SENTENCE * (i % 7)


def assert_no_special_tokens(llm: LLM, label: str, token_ids: list[int]) -> None:
    """No special token (BOS, padding, ChatML markers) inside a constrained output; only an EOS may end it."""
    tokenizer = llm.get_tokenizer()
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    body = token_ids[:-1] if token_ids and token_ids[-1] in llm.engine.input.eos_token_ids else token_ids
    assert not special & set(body), (label, token_ids)


def assert_clean(llm: LLM) -> None:
    kv = llm.engine.kv_cache
    kv.check_integrity([])
    assert kv.num_free_blocks == kv.num_blocks, "KV blocks leaked"
    assert not llm.engine.has_unfinished_requests()


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), **ENGINE)


# ---- the suites ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compact", [False, True], ids=["whitespace", "compact"])
def test_every_schema_output_parses_and_validates(llm, compact):
    """Each schema of the suite, greedy and with three seeds at temperature 1: strict JSON, valid, ended by
    the grammar (finish_reason stop), never cut by max_tokens."""
    assert len(SCHEMAS) >= 30
    cases = [(name, temperature, seed) for name in SCHEMAS
             for temperature, seed in [(0.0, None)] + [(1.0, s) for s in SEEDS]]
    params = [constrained(t, s, json=SCHEMAS[name], disable_any_whitespace=compact) for name, t, s in cases]
    outs = llm.generate([prompt(i) for i in range(len(cases))], params, use_tqdm=False)
    texts: dict[str, set[str]] = {}
    for (name, _, _), out in zip(cases, outs, strict=True):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (name, completion.text)
        assert_no_special_tokens(llm, name, completion.token_ids)
        value = strict_json(completion.text)
        validate(value, SCHEMAS[name])
        texts.setdefault(name, set()).add(completion.text)
        if compact:  # no whitespace but single spaces after separators (raw controls cannot be in strings)
            assert not re.search(r"[\t\n\r]|  ", completion.text.replace('": "', "").replace(", ", "")), (
                name, completion.text)
    # Sampling really samples: most schemas give more than one distinct output over four runs.
    assert sum(len(t) > 1 for t in texts.values()) >= len(SCHEMAS) // 2
    stats = llm.engine.core.stats.grammar
    assert stats.rows > 0 and stats.seconds > 0
    assert_clean(llm)


def test_regex_choice_json_object_and_grammar(llm):
    cases: list[tuple[str, dict, object]] = []
    for name, pattern in REGEXES.items():
        cases.append((f"regex {name}", {"regex": pattern}, re.compile(pattern)))
    for choices in CHOICES:
        cases.append((f"choice {choices[0]}", {"choice": choices}, set(choices)))
    cases.append(("ebnf", {"grammar": EBNF_GRAMMAR}, re.compile(EBNF_GRAMMAR_REGEX)))
    assert len(REGEXES) >= 10
    runs = [(label, spec, check, t, s) for label, spec, check in cases
            for t, s in [(0.0, None)] + [(1.0, s) for s in SEEDS]]
    params = [constrained(t, s, max_tokens=300, **spec) for _, spec, _, t, s in runs]
    outs = llm.generate([prompt(i) for i in range(len(runs))], params, use_tqdm=False)
    for (label, _, check, _, _), out in zip(runs, outs, strict=True):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (label, completion.text)
        assert_no_special_tokens(llm, label, completion.token_ids)
        if isinstance(check, re.Pattern):
            assert check.fullmatch(completion.text), (label, completion.text)
        elif isinstance(check, set):
            assert completion.text in check, (label, completion.text)
        else:
            assert isinstance(strict_json(completion.text), dict), (label, completion.text)
    assert_clean(llm)


def test_json_object(llm):
    """Any JSON object: its strings and nesting are unbounded, so the random model may run to max_tokens; those
    that end are strict JSON objects, and every output opens one."""
    params = [constrained(t, s, max_tokens=400, json_object=True, disable_any_whitespace=compact)
              for compact in (False, True) for t, s in [(0.0, None)] + [(1.0, s) for s in range(10)]]
    outs = [o.outputs[0] for o in llm.generate([prompt(i) for i in range(len(params))], params, use_tqdm=False)]
    ended = [c for c in outs if c.finish_reason == "stop"]
    assert len(ended) >= len(outs) // 2
    assert all(isinstance(strict_json(c.text), dict) for c in ended)
    assert all(c.text.startswith("{") for c in outs)
    assert_clean(llm)


def test_special_tokens_never_stand_for_their_text(llm):
    """A grammar whose text could spell special tokens ("<s>", "</s>", "<|im_start|>"...) never gets the special
    token itself: the detokenizer would drop it (and the text break its constraint), so xgrammar is told they
    are special. Before, every one of these 24 seeded outputs was made of special tokens (its text empty)."""
    pattern = r"(<[a-z/|_]{1,10}>){3}"
    params = [constrained(1.0, seed, max_tokens=120, regex=pattern) for seed in range(24)]
    for out in llm.generate(["tags:"] * len(params), params, use_tqdm=False):
        completion = out.outputs[0]
        assert_no_special_tokens(llm, pattern, completion.token_ids)
        assert re.fullmatch(pattern, completion.text), completion.text
    assert_clean(llm)


# ---- one reference, many engine paths ----------------------------------------------------------------------

REFERENCE_SCHEMAS = ["nested_object", "array_of_objects", "one_of_objects", "ref_defs", "string_patterns",
                     "number_range", "recursive_tree", "function_call", "formats_date_uuid", "mixed_enum"]


def reference_cases() -> list[tuple[str, SamplingParams]]:
    """Constrained greedy requests of every kind, with prompts of 3 to about 190 tokens."""
    specs = [dict(json=SCHEMAS[name], disable_any_whitespace=i % 2 == 1) for i, name in enumerate(REFERENCE_SCHEMAS)]
    specs += [dict(regex=REGEXES[name]) for name in ("iso_date", "email", "word_list", "uuid")]
    specs += [dict(choice=CHOICES[0]), dict(choice=CHOICES[3]), dict(grammar=EBNF_GRAMMAR)]
    return [(prompt(i), constrained(max_tokens=400, **spec)) for i, spec in enumerate(specs)]


CASES = reference_cases()


def token_ids(llm: LLM, cases=CASES) -> list[list[int]]:
    outs = llm.generate([p for p, _ in cases], [s for _, s in cases], use_tqdm=False)
    assert all(o.outputs[0].finish_reason == "stop" for o in outs)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def reference(llm) -> list[list[int]]:
    return token_ids(llm)


def test_batch_composition_and_prefix_cache_hits_do_not_change_outputs(llm, reference):
    hits = llm.engine.kv_cache.prefix_cache_hits
    assert token_ids(llm, CASES[::-1]) == reference[::-1]  # again, in reverse order, its prompts cached
    assert llm.engine.kv_cache.prefix_cache_hits > hits
    assert [token_ids(llm, [case])[0] for case in CASES[:6]] == reference[:6]  # one at a time
    assert_clean(llm)


def test_unconstrained_requests_are_unchanged_by_constrained_neighbours(llm, reference):
    free = [(f"free {i} " + SENTENCE * (i % 4), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
            for i in range(12)]
    alone = token_ids_any(llm, free)
    mixed = [item for pair in zip(free, CASES, strict=False) for item in pair] + CASES[len(free):]
    got = token_ids_any(llm, mixed)
    assert got[0:2 * len(free):2] == alone
    assert got[1:2 * len(free):2] + got[2 * len(free):] == reference
    assert_clean(llm)


def token_ids_any(llm: LLM, cases) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([p for p, _ in cases], [s for _, s in cases],
                                                         use_tqdm=False)]


@pytest.mark.parametrize("options", [
    dict(max_num_batched_tokens=16),  # chunked prefill: most prompts take several steps
    dict(kv_cache_memory="320KiB", max_num_seqs=len(CASES)),  # a few blocks a request: preemption
    dict(async_scheduling=True),
    dict(async_scheduling=True, max_num_batched_tokens=16, kv_cache_memory="320KiB", max_num_seqs=len(CASES)),
], ids=["chunked-prefill", "preemption", "async", "async-chunked-preemption"])
def test_engine_paths_give_the_reference_outputs(tiny_llama_dir, reference, options):
    llm = LLM(str(tiny_llama_dir), **ENGINE, **options)
    assert token_ids(llm) == reference
    if "kv_cache_memory" in options:
        assert llm.engine.core.stats.num_preemptions > 0
    assert llm.engine.core.async_scheduling == options.get("async_scheduling", False)
    assert_clean(llm)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_tensor_parallel_two_ranks_give_the_reference_outputs(tiny_llama_dir, reference, async_scheduling):
    llm = LLM(str(tiny_llama_dir), **ENGINE, tensor_parallel_size=2, async_scheduling=async_scheduling)
    try:
        assert llm.engine.runner.world_size == 2
        assert token_ids(llm) == reference
        assert_clean(llm)
    finally:
        llm.shutdown()


# ---- sampling features on constrained requests ----------------------------------------------------------------


def test_n_and_seeds(llm, reference):
    """n samples of one constrained request are all valid, differ, and repeat with the seed; greedy n=2 gives
    the reference twice."""
    schema = SCHEMAS["function_call"]
    params = replace(constrained(1.0, 7, json=schema), n=4)
    first = llm.generate("call a function", params, use_tqdm=False)[0].outputs
    assert [c.index for c in first] == [0, 1, 2, 3]
    for c in first:
        validate(strict_json(c.text), schema)
    assert len({c.text for c in first}) > 1
    again = llm.generate("call a function", params, use_tqdm=False)[0].outputs
    assert [c.token_ids for c in again] == [c.token_ids for c in first]
    p, greedy = CASES[0]
    twice = llm.generate(p, replace(greedy, n=2), use_tqdm=False)[0].outputs
    assert [c.token_ids for c in twice] == [reference[0], reference[0]]
    assert_clean(llm)


def test_logprobs_are_those_of_the_constrained_distribution(llm, reference):
    """Asking for logprobs changes no token; each sampled token has a finite logprob and rank 1 (greedy over the
    masked logits), and every listed alternative that the grammar allows is finite."""
    cases = [(p, replace(s, logprobs=3)) for p, s in CASES]
    outs = llm.generate([p for p, _ in cases], [s for _, s in cases], use_tqdm=False)
    for out, expected in zip(outs, reference, strict=True):
        completion = out.outputs[0]
        assert completion.token_ids == expected
        assert completion.logprobs is not None and len(completion.logprobs) == len(expected)
        for token, entry in zip(completion.token_ids, completion.logprobs, strict=True):
            assert math.isfinite(entry[token].logprob) and entry[token].logprob <= 0
            assert entry[token].rank == 1
        assert math.isfinite(completion.cumulative_logprob)
    assert_clean(llm)


def test_stop_strings_cut_constrained_output(llm):
    schema = SCHEMAS["flat_required"]
    base = constrained(json=schema, disable_any_whitespace=True)
    full = llm.generate("a record", base, use_tqdm=False)[0].outputs[0].text
    assert full.startswith('{"name": "') and ", " in full
    cut = llm.generate("a record", replace(base, stop=[", "]), use_tqdm=False)[0].outputs[0]
    assert (cut.text, cut.finish_reason, cut.stop_reason) == (full.split(", ")[0], "stop", ", ")
    kept = llm.generate("a record", replace(base, stop=[", "], include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == full.split(", ")[0] + ", "
    assert_clean(llm)


# ---- bad constraints --------------------------------------------------------------------------------------------

BAD = [
    ("structured_outputs.json", dict(json={"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}})),
    ("structured_outputs.json", dict(json={"type": "strin"})),
    ("structured_outputs.json", dict(json="{not json")),
    ("structured_outputs.json", dict(json=[1, 2])),
    ("structured_outputs.regex", dict(regex="(unclosed")),
    ("structured_outputs.regex", dict(regex="[z-a]")),
    ("structured_outputs.regex", dict(regex="")),
    ("structured_outputs.grammar", dict(grammar="root ::= ")),
    ("structured_outputs.grammar", dict(grammar='start ::= "a"')),  # no root rule
    ("structured_outputs.grammar", dict(grammar='root ::= undefined_rule')),
    ("structured_outputs.choice", dict(choice=[])),
    ("structured_outputs.choice", dict(choice=["ok", ""])),
    ("structured_outputs", dict(json={"type": "object"}, regex="a+")),  # two constraints
    ("structured_outputs", dict()),  # none
    ("structured_outputs.json_object", dict(json_object="yes")),
    ("structured_outputs.structural_tag", dict(structural_tag={"type": "no-such-tag"})),
]


@pytest.mark.parametrize(("field", "spec"), BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_constraints_are_refused_naming_the_field(llm, field, spec):
    with pytest.raises(ValueError, match=re.escape(field)) as raised:
        llm.generate("hello", SamplingParams(max_tokens=8, structured_outputs=spec), use_tqdm=False)
    if isinstance(raised.value, InvalidRequestError):
        assert raised.value.param == field
    out = llm.generate("hello", constrained(choice=["yes", "no"]), use_tqdm=False)[0].outputs[0]
    assert out.text in ("yes", "no")
    assert_clean(llm)


# Keywords xgrammar 0.2 parses but does not enforce, and llguidance does not either (it reports them): the engine
# refuses them instead of letting outputs break the schema. (Before the refusal, seeded runs of each broke it: [1, 1]
# under uniqueItems, 3 under not const 3, ...)
UNENFORCEABLE = [
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 3, "uniqueItems": True}, "'/'"),
    ({"type": "integer", "not": {"const": 3}}, "'/'"),
    ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, "'/'"),
    ({"type": "object", "properties": {"a": {"type": "boolean"}}, "if": {"properties": {"a": {"const": True}}},
      "then": {"required": ["a"]}}, "'/'"),
    # oneOf needs exactly one schema to match; xgrammar writes a value of either (6 came out, which both match).
    ({"type": "object", "properties": {"v": {"oneOf": [{"type": "integer"}, {"type": "number"}]}},
      "required": ["v"], "additionalProperties": False}, "'/properties/v'"),
    ({"oneOf": [{"enum": ["a", "b"]}, {"enum": ["b", "c"]}]}, "'/'"),
    # A name matching both patterns must match both schemas; xgrammar wrote a value of either one's.
    ({"type": "object", "patternProperties": {"^a": {"type": "integer"}, "b$": {"type": "string", "maxLength": 2}},
      "additionalProperties": False, "maxProperties": 2}, "'/'"),
    # The pattern's only name is listed: llguidance allowed a comma after "a" and then no token at all.
    # xgrammar passed over the lookahead ("uvy" came out); llguidance refuses lookarounds.
    ({"type": "object", "properties": {"v": {"type": "string", "pattern": "^(?=.*[0-9])[a-z0-9]{3}$"}},
      "required": ["v"], "additionalProperties": False}, "'/properties/v'"),
    (DEAD_END_PATTERN := {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
                          "patternProperties": {"^a$": {"type": "integer", "minimum": 0}},
                          "additionalProperties": False, "required": ["a"]}, "'/'"),
]
# Those xgrammar would loosen but llguidance enforces: they go to llguidance. (Before the refusal xgrammar let
# 90-letter strings through under pattern + maxLength 4, ...) Bounded, so that the tiny model finishes them.
GUIDANCE_ONLY = [
    ({"type": "object", "properties": {"w": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 4}},
      "required": ["w"], "additionalProperties": False}, "'/properties/w'"),
    ({"$defs": {"x": {"allOf": [{"type": "integer"}, {"minimum": 5}, {"maximum": 60}]}}, "$ref": "#/$defs/x"},
     "'/$defs/x'"),
    ({"anyOf": [{"type": "null"}, {"type": "array", "items": {"type": "string", "pattern": "^a[a-c]*$",
                                                                "minLength": 2, "maxLength": 3}, "maxItems": 2}]},
     "'/anyOf/1/items'"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
      "anyOf": [{"required": ["a"]}], "additionalProperties": False}, "'/'"),
    ({"type": "array", "items": {"type": "number", "multipleOf": 3, "minimum": -30, "maximum": 30}, "maxItems": 3},
     "'/items'"),
    # A listed name that a pattern matches takes both schemas (xgrammar wrote "id" twice, the second value under
    # the pattern's schema alone: "id": 1, "id": -6).
    ({"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 5}},
      "patternProperties": {"^i[a-z]?$": {"type": "integer", "minimum": 3, "maximum": 9}},
      "required": ["id"], "additionalProperties": False}, "'/'"),
    # xgrammar wrote the quote and the backslash of these patterns unescaped: "a"b" is not JSON, "a\b" a backspace.
    ({"type": "object", "properties": {"q": {"type": "string", "pattern": '^a"[bc]$'},
                                       "p": {"type": "string", "pattern": r"^[a-c]\\[0-9]$"}},
      "required": ["q", "p"], "additionalProperties": False}, "'/properties/q'"),
    # enum / const values the type does not take: xgrammar wrote 2.5 under "integer", 1 under "string"
    ({"type": "object", "properties": {"i": {"type": "integer", "enum": [1, 2.5, 3]},
                                       "s": {"type": "string", "enum": ["a", 1]}},
      "required": ["i", "s"], "additionalProperties": False}, "'/properties/i'"),
    # formats llguidance does not know (OpenAPI's "password", "byte"): annotations, as xgrammar reads them; they
    # made the whole schema a 400 once something in it needed llguidance. A const that holds one stays whole.
    ({"type": "object", "properties": {"pw": {"type": "string", "format": "password", "pattern": "^[a-z]+$",
                                              "maxLength": 4},
                                       "raw": {"type": "string", "format": "byte", "maxLength": 4},
                                       "kind": {"const": {"format": "password"}}},
      "required": ["pw", "raw", "kind"], "additionalProperties": False}, "'/properties/pw'"),
    # a range below a millionth: xgrammar let an empty value through ({"v": })
    ({"type": "object", "properties": {"v": {"type": "number", "minimum": 1e-7, "maximum": 2e-7}}, "required": ["v"],
      "additionalProperties": False}, "'/properties/v'"),
    ({"type": "object", "patternProperties": {"^a[0-9]$": {"type": "integer", "minimum": 0, "maximum": 9},
                                              "^b[0-9]$": {"type": "boolean"}},
      "additionalProperties": False, "maxProperties": 2}, "'/'"),
    # a format with a length: xgrammar dropped the length (an email ran past its maxLength of 20)
    ({"type": "object", "properties": {"e": {"type": "string", "format": "email", "maxLength": 12}},
      "required": ["e"], "additionalProperties": False}, "'/properties/e'"),
]


@pytest.mark.parametrize(("schema", "where"), UNENFORCEABLE, ids=[str(i) for i in range(len(UNENFORCEABLE))])
def test_schemas_the_grammar_cannot_enforce_are_refused(llm, schema, where):
    with pytest.raises(InvalidRequestError, match=re.escape(where)) as raised:
        llm.generate("hello", constrained(json=schema), use_tqdm=False)
    assert raised.value.param == "structured_outputs.json"
    # A property that is merely *named* like a keyword is fine.
    named = {"type": "object", "properties": {"not": {"type": "boolean"}, "if": {"type": "null"}},
             "required": ["not", "if"], "additionalProperties": False}
    validate(strict_json(llm.generate("x", constrained(json=named), use_tqdm=False)[0].outputs[0].text), named)


@pytest.mark.parametrize(("schema", "where"), GUIDANCE_ONLY, ids=[str(i) for i in range(len(GUIDANCE_ONLY))])
def test_schemas_only_llguidance_enforces_hold(llm, schema, where):
    """Seeded samples at temperature 1, each a valid answer that ended with the schema."""
    outs = llm.generate([prompt(i) for i in range(3)], constrained(temperature=1.0, seed=5, max_tokens=120,
                                                                    json=schema), use_tqdm=False)
    for out in outs:
        assert out.outputs[0].finish_reason == "stop", out.outputs[0].text
        validate(strict_json(out.outputs[0].text), schema)
    assert_clean(llm)


def test_llguidance_is_not_given_a_pattern_whose_names_are_all_listed():
    from inferneo.structured_output.grammars import guidance_grammar

    params = StructuredOutputsParams(json=DEAD_END_PATTERN)
    assert guidance_grammar(DEAD_END_PATTERN, params) is None
    room = {**DEAD_END_PATTERN, "patternProperties": {"^a": {"type": "integer", "minimum": 0}}}  # "ab" is free
    assert guidance_grammar(room, StructuredOutputsParams(json=room)) is not None


def test_a_backtracking_pattern_does_not_stall_the_check():
    """``^(a|aa)+$`` backtracks exponentially on "aaa...b": matched against the listed names, it held the check (on
    the server's event loop) for minutes. The search has a time budget; what it cannot tell counts as a match."""
    import time

    from inferneo.structured_output import grammars

    schema = {"type": "object", "properties": {"a" * 40 + "b": {"type": "integer"}},
              "patternProperties": {"^(a|aa)+$": {"type": "integer"}}, "additionalProperties": False}
    start = time.monotonic()
    with pytest.raises(ValueError, match="may match too"):
        grammars._check_enforceable(schema)
    assert grammars.guidance_grammar(schema, StructuredOutputsParams(json=schema)) is None
    assert time.monotonic() - start < 2.0


# oneOfs whose schemas are exclusive stay with xgrammar: no value matches two of them.
EXCLUSIVE_ONE_OF = [
    {"oneOf": [{"type": "null"}, {"type": "integer"}]},
    {"oneOf": [{"type": "string", "maxLength": 3}, {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}]},
    {"oneOf": [{"enum": ["a", "b"]}, {"enum": ["c", 1]}]},
    # a pydantic discriminated union: the discriminator's const differs in each
    {"$defs": {"Cat": {"type": "object", "properties": {"kind": {"const": "cat", "type": "string"},
                                                        "lives": {"type": "integer", "minimum": 1, "maximum": 9}},
                       "required": ["kind", "lives"]},
               "Dog": {"type": "object", "properties": {"kind": {"const": "dog", "type": "string"},
                                                        "good": {"type": "boolean"}},
                       "required": ["kind", "good"]}},
     "type": "object", "required": ["pet"],
     "properties": {"pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}],
                            "discriminator": {"propertyName": "kind"}}}},
    # xgrammar writes only the listed properties, so an object of either lacks what the other requires
    {"oneOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
               {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]},
]


@pytest.mark.parametrize(("branches", "overlap"), [
    ([{"const": 1}, {"const": 1.0}], (0, 1)),  # the same JSON number
    ([{"const": True}, {"const": 1}], None),  # true is no number
    ([{"type": "boolean"}, {"enum": [1]}, {"type": "number"}], (1, 2)),
    ([{"anyOf": [{"type": "string"}, {"type": "null"}]}, {"type": "integer"}], None),
    ([{"type": "object", "properties": {"a": {"type": "integer"}}},  # {} matches both
      {"type": "object", "properties": {"b": {"type": "integer"}}}], (0, 1)),
    ([{"type": "object", "properties": {"k": {"const": "x"}}, "required": ["k"], "additionalProperties": True},
      {"type": "object", "properties": {"k": {"enum": ["y", "z"]}}, "required": ["k"]}], None),
    ([{"$ref": "#/$defs/missing"}, {"type": "null"}], (0, 1)),  # not proven: left to llguidance
])
def test_one_of_overlap_reads_values_as_json_schema_does(branches, overlap):
    from inferneo.structured_output.disjoint import one_of_overlap

    assert one_of_overlap(branches, {"oneOf": branches}) == overlap


def test_one_of_overlap_of_a_schema_that_refers_to_itself_is_quick():
    """Three required properties that are each the schema again: each level of the proof tried all three, 3^24
    comparisons (the check ran for minutes per request). Now a bounded number per pair, and not proven exclusive."""
    import time

    from inferneo.structured_output.disjoint import one_of_overlap

    node = {"type": "object", "required": ["a", "b", "c"],
            "properties": {name: {"$ref": "#/$defs/N"} for name in "abc"}}
    schema = {"$defs": {"N": node}, "oneOf": [{"$ref": "#/$defs/N"}, {"$ref": "#/$defs/N"}]}
    start = time.monotonic()
    assert one_of_overlap(schema["oneOf"], schema) == (0, 1)
    assert time.monotonic() - start < 1.0
    union = {"oneOf": [{"type": "object", "properties": {"k": {"const": str(i)}}, "required": ["k"]}
                       for i in range(60)]}  # many pairs, each proven in a few steps
    assert one_of_overlap(union["oneOf"], union) is None


@pytest.mark.parametrize("schema", EXCLUSIVE_ONE_OF, ids=[str(i) for i in range(len(EXCLUSIVE_ONE_OF))])
def test_exclusive_one_of_stays_with_xgrammar_and_holds(llm, schema):
    from inferneo.structured_output.grammars import GuidanceGrammar, build_grammar

    assert not isinstance(build_grammar(StructuredOutputsParams(json=schema)), GuidanceGrammar)
    outs = llm.generate([prompt(i) for i in range(3)], constrained(temperature=1.0, seed=5, max_tokens=120,
                                                                    json=schema), use_tqdm=False)
    for out in outs:
        assert out.outputs[0].finish_reason == "stop", out.outputs[0].text
        validate(strict_json(out.outputs[0].text), schema)


@pytest.mark.parametrize(("schema", "where"), GUIDANCE_ONLY[:2], ids=["0", "1"])
def test_without_llguidance_those_schemas_are_refused(monkeypatch, schema, where):
    from inferneo.structured_output import grammars

    monkeypatch.setattr(grammars, "llguidance", lambda: None)
    monkeypatch.setattr(grammars, "_checked", type(grammars._checked)())
    with pytest.raises(grammars.StructuredOutputError, match=re.escape(where) + ".*cannot enforce") as raised:
        grammars.check_structured_outputs(StructuredOutputsParams(json=schema))
    assert raised.value.param == "structured_outputs.json"


# ---- compiling off the step loop ------------------------------------------------------------------------------


def test_a_compiling_grammar_holds_up_no_one(llm):
    """While a grammar compiles (its compile thread held busy here), unconstrained requests run to the end; the
    constrained request starts once its grammar is ready, and its output is valid."""
    engine, core = llm.engine, llm.engine.core
    gate = threading.Event()
    core.grammars._executor.submit(gate.wait, 60)  # the compile thread's next job waits behind this one
    schema = {"type": "object", "properties": {"held": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["held"], "additionalProperties": False}
    engine.add_request("held", "constrained", constrained(json=schema))
    free = [engine.add_request(f"free{i}", prompt(i), SamplingParams(temperature=0, max_tokens=12,
                                                                      ignore_eos=True)) for i in range(4)]
    finished: dict[str, object] = {}
    try:
        for _ in range(200):
            finished.update((o.request_id, o) for o in engine.step() if o.finished)
            if set(free) <= set(finished):
                break
        assert set(finished) == set(free), "unconstrained requests waited for a compile"
        assert "held" in core._compiling
    finally:
        gate.set()
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    validate(strict_json(finished["held"].outputs[0].text), schema)
    assert_clean(llm)


def test_a_grammar_that_fails_to_compile_fails_its_request_only(llm):
    """A constraint that reaches the core and does not compile (the front end's check skipped here) is reported
    as that request's invalid-request failure; the request beside it finishes."""
    core = llm.engine.core
    bad = Request("bad", [5, 6, 7], constrained(max_tokens=8, regex="(unclosed"), max_tokens=8)
    good = Request("good", [5, 6, 7], constrained(max_tokens=8, choice=["ok"]), max_tokens=8)
    core.add_request(bad)
    core.add_request(good)
    outputs, failures = [], []
    while core.has_unfinished_requests():
        outputs += core.step()
        failures += core.take_failures()
    assert [(f.request_ids, f.kind) for f in failures] == [(["bad"], FailureKind.INVALID)]
    assert "structured_outputs.regex" in failures[0].message
    assert [o.request_id for o in outputs if o.finish_reason] == ["good"]
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.num_blocks


def test_a_model_without_a_tokenizer_refuses_constraints_naming_the_field():
    """An architecture preset (dummy weights) has no vocabulary to compile against: the compile fails with an
    invalid-request error that says so, each time it is asked (it used to be xgrammar's "Cannot get the
    vocabulary of the tokenizer <class ...TokenIdTokenizer>")."""
    compiler = GrammarCompiler(lambda: TokenIdTokenizer(384, 2), 384)
    try:
        for _ in range(2):
            with pytest.raises(ValueError, match="has no tokenizer") as raised:
                compiler.submit(StructuredOutputsParams(regex="a+")).result(timeout=30)
            assert raised.value.param == "structured_outputs"
    finally:
        compiler.shutdown()


@pytest.mark.parametrize("vocab", [64, 100, 384])
def test_apply_token_bitmask_matches_the_bits(vocab):
    """The sampler's mask op against a token-by-token reading of the words, for all rows and for some rows, with
    a vocabulary that is and is not a multiple of 32."""
    gen = torch.Generator().manual_seed(vocab)
    width = (vocab + 31) // 32
    logits = torch.randn(6, vocab, generator=gen)
    words = torch.randint(-2**31, 2**31 - 1, (6, width), dtype=torch.int32, generator=gen)
    for rows in ([0, 1, 2, 3, 4, 5], [1, 4], [5]):
        expected = logits.clone()
        for i, row in enumerate(rows):
            for t in range(vocab):
                if not (int(words[i, t // 32]) >> (t % 32)) & 1:
                    expected[row, t] = float("-inf")
        got = apply_token_bitmask(logits.clone(), torch.tensor(rows), words[:len(rows)].contiguous())
        assert torch.equal(got, expected)


@pytest.mark.parametrize(("grammar", "lark"), [
    ('root ::= "a" | "b"', False),
    ('# a comment: with a colon\nroot ::= item+\nitem ::= [a-z]', False),
    ('  my-rule.x ::= "a"\nroot ::= my-rule.x', False),
    ('start: "a" | "b"', True),
    ('%llguidance {}\nstart: item+\nitem: /[a-z]/', True),
    ('start: "a ::= b"', True),  # '::=' inside a Lark string is no GBNF rule
    ('// arithmetic\nstart: NUMBER\n%import common.NUMBER', True),
], ids=["gbnf", "gbnf-comment", "gbnf-dashed-name", "lark", "lark-llguidance", "lark-string", "lark-comment"])
def test_lark_and_gbnf_grammars_are_told_apart(grammar, lark):
    from inferneo.structured_output.grammars import GuidanceGrammar, build_grammar, is_lark

    assert is_lark(grammar) is lark
    if "%import" not in grammar:
        built = build_grammar(StructuredOutputsParams(grammar=grammar))
        assert isinstance(built, GuidanceGrammar) is lark


def test_without_llguidance_a_lark_grammar_is_refused_naming_the_extra(monkeypatch):
    from inferneo.structured_output import grammars

    monkeypatch.setattr(grammars, "llguidance", lambda: None)
    with pytest.raises(grammars.StructuredOutputError, match=r"inferneo\[structured\]") as raised:
        grammars.build_grammar(StructuredOutputsParams(grammar='start: "a"'))
    assert raised.value.param == "structured_outputs.grammar"


DATES = {"type": "object", "properties": {"d": {"type": "string", "format": "date"},
                                          "t": {"type": "string", "format": "date-time"}},
         "required": ["d", "t"], "additionalProperties": False}


@pytest.mark.parametrize("backend", ["auto", "guidance"])
@pytest.mark.parametrize(("d", "t", "valid"), [
    ("2024-02-29", "2023-12-31T23:59:59Z", True),
    ("2000-02-29", "2023-06-30T00:00:00.123+05:30", True),
    ("2023-02-30", "2023-01-01T00:00:00Z", False),
    ("2023-02-29", "2023-01-01T00:00:00Z", False),  # not a leap year (llguidance took it)
    ("1900-02-29", "2023-01-01T00:00:00Z", False),  # by 100, not by 400
    ("2023-04-31", "2023-01-01T00:00:00Z", False),
    ("2023-01-01", "2023-02-30T10:00:00Z", False),
    ("2023-01-01", "2023-01-01T24:00:00Z", False),
    ("0000-01-01", "2023-01-01T00:00:00Z", False),
    ("2023-01-01", "2023-01-01T00:00:00123Z", False),  # decimals without their dot
])
def test_date_formats_know_the_calendar(backend, d, t, valid):
    """format: date / date-time take only calendar dates, on both backends (xgrammar took 2023-02-30, llguidance
    2023-02-29): checked with each backend's own matcher, against datetime's reading of the same dates."""
    import datetime

    import llguidance
    import llguidance.hf
    import xgrammar

    from inferneo.structured_output.grammars import GuidanceGrammar, build_grammar
    from inferneo.testing import make_tiny_tokenizer

    try:
        datetime.date.fromisoformat(d)
        datetime.datetime.fromisoformat(t.replace("Z", "+00:00"))
        assert valid
    except ValueError:
        assert not valid
    text = json.dumps({"d": d, "t": t})
    grammar = build_grammar(StructuredOutputsParams(json=DATES, backend=backend, disable_any_whitespace=True))
    tokenizer = make_tiny_tokenizer()
    if backend == "guidance":
        assert isinstance(grammar, GuidanceGrammar)
        ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer)
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar.text)
        took = matcher.consume_tokens(ll_tokenizer.tokenize_str(text)) and matcher.is_accepting()
    else:
        compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(tokenizer))
        matcher = xgrammar.GrammarMatcher(compiler.compile_grammar(grammar))
        took = matcher.accept_string(text) and matcher.is_completed()
    assert took is valid, text


def test_generated_dates_are_calendar_dates(llm):
    import datetime

    params = SamplingParams(temperature=1.0, seed=5, n=8, max_tokens=120, structured_outputs={"json": DATES})
    for out in llm.generate(["A date:"], params, use_tqdm=False)[0].outputs:
        assert out.finish_reason == "stop", out.text
        value = json.loads(out.text)
        jsonschema.validate(value, DATES)
        datetime.date.fromisoformat(value["d"])
        datetime.datetime.fromisoformat(value["t"].replace("Z", "+00:00"))


@pytest.mark.parametrize(("pattern", "took", "refused"), [
    ("^a(bx+)?d$", ["ad", "abxd", "abxxd"], ["axd", "abd"]),
    ("^v(\\.[0-9]{1,3})?$", ["v", "v.1", "v.123"], ["v1", "v.", "v.1234"]),
    ("^a(x+b)?d$", ["ad", "axbd"], ["axd", "abd"]),
])
def test_an_optional_group_holding_a_repetition_is_enforced_whole(pattern, took, refused):
    """xgrammar (0.2) read such a pattern wrongly in a JSON schema ('^a(bx+)?d$' took 'axd'): the schema goes to
    llguidance, whose matcher takes exactly what the pattern matches."""
    import llguidance
    import llguidance.hf

    from inferneo.structured_output.grammars import GuidanceGrammar, build_grammar
    from inferneo.testing import make_tiny_tokenizer

    schema = {"type": "string", "pattern": pattern}
    grammar = build_grammar(StructuredOutputsParams(json=schema))
    assert isinstance(grammar, GuidanceGrammar)
    ll_tokenizer = llguidance.hf.from_tokenizer(make_tiny_tokenizer())
    for text in took + refused:
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar.text)
        accepted = matcher.consume_tokens(ll_tokenizer.tokenize_str(json.dumps(text))) and matcher.is_accepting()
        assert accepted is (text in took) is bool(re.fullmatch(pattern, text)), text


def test_disable_additional_properties_closes_every_object_that_says_nothing():
    """vLLM's disable_additional_properties: an object schema that does not say what other properties it takes
    takes none (llguidance, which follows JSON Schema, otherwise takes any); one that says keeps its word."""
    import llguidance
    import llguidance.hf

    from inferneo.structured_output.grammars import build_grammar, closed_objects
    from inferneo.testing import make_tiny_tokenizer

    schema = {"type": "object", "properties": {"a": {"type": "integer"},
                                               "o": {"type": "object", "properties": {"b": {"type": "boolean"}}},
                                               "m": {"type": "object", "additionalProperties": {"type": "integer"}}}}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False and closed["properties"]["o"]["additionalProperties"] is False
    assert closed["properties"]["m"]["additionalProperties"] == {"type": "integer"}
    ll_tokenizer = llguidance.hf.from_tokenizer(make_tiny_tokenizer())
    for disable, text, took in [(True, '{"a": 1, "z": 2}', False), (True, '{"o": {"b": true, "c": 1}}', False),
                                (True, '{"a": 1, "m": {"k": 2}}', True), (False, '{"a": 1, "z": 2}', True)]:
        params = StructuredOutputsParams(json=schema, backend="guidance", disable_additional_properties=disable)
        grammar = build_grammar(params)
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar.text)
        assert (matcher.consume_tokens(ll_tokenizer.tokenize_str(text)) and matcher.is_accepting()) is took, text
