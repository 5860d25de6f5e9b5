"""The offline API's structured output: ``SamplingParams(structured_outputs=...)`` with ``LLM.generate`` and
``LLM.chat``, as ``StructuredOutputsParams`` or as a dict, on a tiny random-weight model whose free-running
output is gibberish: every constrained answer must still parse and validate, and unconstrained prompts in the
same call are unaffected."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from inferneo import LLM, SamplingParams
from inferneo.sampling_params import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
PROMPTS = ["Describe a person:", "hello", "the cat sat on the", "JSON please"]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint_factory):
    return LLM(str(tiny_checkpoint_factory("llama")), dtype="float32")


def constrained(max_tokens: int = 200, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.8, seed=1, max_tokens=max_tokens, **kw)


def test_generate_with_a_json_schema_regex_and_choice(llm):
    params = [
        constrained(structured_outputs=StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)),
        constrained(structured_outputs={"regex": r"[A-Z][a-z]{1,8} [0-9]{2}"}),
        constrained(structured_outputs={"choice": ["positive", "negative", "neutral"]}),
        constrained(structured_outputs={"json": json.dumps(SCHEMA)}),
    ]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    person, code, label, person_again = (o.outputs[0] for o in outs)
    for answer in (person, person_again):
        assert answer.finish_reason == "stop", answer.text
        jsonschema.validate(json.loads(answer.text), SCHEMA)
    assert re.fullmatch(r"[A-Z][a-z]{1,8} [0-9]{2}", code.text), code.text
    assert label.text in ("positive", "negative", "neutral")


def test_constrained_requests_leave_unconstrained_ones_unchanged(llm):
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(PROMPTS, free, use_tqdm=False)
    mixed = llm.generate(PROMPTS * 2, [free] * 4 + [constrained(structured_outputs={"json": SCHEMA})] * 4,
                         use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:4]] == [o.outputs[0].token_ids for o in alone]
    for out in mixed[4:]:
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)


def test_chat_with_structured_outputs_and_n(llm):
    conversation = [{"role": "user", "content": "Who are you? Answer in JSON."}]
    outs = llm.chat([conversation, conversation], constrained(n=2, structured_outputs={"json": SCHEMA}),
                    use_tqdm=False)
    answers = [c for o in outs for c in o.outputs]
    assert len(answers) == 4
    for answer in answers:
        jsonschema.validate(json.loads(answer.text), SCHEMA)


@pytest.mark.parametrize("extra", [{"min_tokens": 40}, {"ignore_eos": True}, {"min_tokens": 40, "ignore_eos": True}],
                         ids=["min_tokens", "ignore_eos", "both"])
def test_a_constraint_ends_its_answer_whatever_min_tokens_and_ignore_eos_say(llm, extra):
    """A completed constraint can only end: the answer stops there (finish_reason "stop"), before min_tokens if it
    must and despite ignore_eos, instead of running on unconstrained to max_tokens."""
    kinds = [{"choice": ["yes", "no"]}, {"regex": r"[a-z]{1,5}"}, {"json": SCHEMA}]
    params = [SamplingParams(temperature=t, seed=s, max_tokens=120, structured_outputs=kind, **extra)
              for kind in kinds for t, s in ((0.0, None), (1.0, 3))]
    outs = [o.outputs[0] for o in llm.generate([PROMPTS[0]] * len(params), params, use_tqdm=False)]
    for kind, out in zip([k for k in kinds for _ in range(2)], outs, strict=True):
        assert out.finish_reason == "stop", (kind, out.text)
        assert out.token_ids[-1] in llm.engine.eos_token_ids
        if "choice" in kind:
            assert out.text in kind["choice"]
        elif "regex" in kind:
            assert re.fullmatch(kind["regex"], out.text), out.text
        else:
            jsonschema.validate(json.loads(out.text), SCHEMA)


def test_min_tokens_still_holds_back_the_end_while_the_constraint_can_go_on(llm):
    """Where the constraint allows more than its end, min_tokens keeps the end out as usual."""
    regex = r"[a-z]{1,60}"
    free = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=80, structured_outputs={"regex": regex}),
                        use_tqdm=False)[0].outputs[0]
    assert free.finish_reason == "stop" and len(free.token_ids) < 12, free.text  # it ends early by itself
    held = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=80, min_tokens=12,
                                                   structured_outputs={"regex": regex}), use_tqdm=False)[0].outputs[0]
    assert len(held.token_ids) >= 12 and re.fullmatch(regex, held.text), held.text


def test_a_stop_string_inside_the_constrained_text_ends_the_answer_there(llm):
    """Stop strings still apply under a constraint, as in vLLM: the text ends before the stop string (or with it,
    given include_stop_str_in_output), with finish_reason "stop" and the string as stop_reason."""
    regex = r"ab,cd,ef"
    outs = llm.generate([PROMPTS[0]] * 3, [
        SamplingParams(temperature=0, max_tokens=40, structured_outputs={"regex": regex}),
        SamplingParams(temperature=0, max_tokens=40, stop=[","], structured_outputs={"regex": regex}),
        SamplingParams(temperature=0, max_tokens=40, stop=[","], include_stop_str_in_output=True,
                       structured_outputs={"regex": regex}),
    ], use_tqdm=False)
    whole, cut, kept = (o.outputs[0] for o in outs)
    assert whole.text == "ab,cd,ef" and whole.finish_reason == "stop" and whole.stop_reason is None
    assert cut.text == "ab" and cut.finish_reason == "stop" and cut.stop_reason == ","
    assert kept.text == "ab," and kept.finish_reason == "stop" and kept.stop_reason == ","


# A grammar with a dead end: after "a" it wants a character outside every class (no token can give one); in GBNF
# (xgrammar's) and in Lark (llguidance's).
DEAD_END = r'root ::= "a" [^\x00-\U0010FFFF]'
LARK_DEAD_END = r'start: "a" /[^\x00-\U0010FFFF]/'


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_constraint_that_allows_no_next_token_ends_its_answer_with_error(tiny_llama_dir, llm, async_scheduling):
    """Where the mask leaves no token to sample (the grammar allows none, or none that allowed_token_ids /
    bad_words leave) and the constraint is not complete, the answer ends there with finish_reason "error" and its
    valid prefix: no token the grammar refuses, and no unconstrained text after it. Other requests of the batch
    are unaffected."""
    engine = llm if not async_scheduling else LLM(str(tiny_llama_dir), dtype="float32", async_scheduling=True)
    x = engine.get_tokenizer().convert_tokens_to_ids("x")
    params = [
        SamplingParams(temperature=0, max_tokens=20, structured_outputs={"grammar": DEAD_END}),
        SamplingParams(temperature=1.0, seed=2, max_tokens=20, structured_outputs={"grammar": DEAD_END}),
        SamplingParams(temperature=1.0, seed=2, max_tokens=20, allowed_token_ids=[x],
                       structured_outputs={"choice": ["yes", "no"]}),
        SamplingParams(temperature=0, max_tokens=20, bad_words=["y", "n"], structured_outputs={"choice": ["yes", "no"]}),
        SamplingParams(temperature=1.0, seed=2, max_tokens=20, structured_outputs={"grammar": LARK_DEAD_END}),
        SamplingParams(temperature=0, max_tokens=20, structured_outputs={"choice": ["yes", "no"]}),
    ]
    outs = [o.outputs[0] for o in engine.generate([PROMPTS[0]] * len(params), params, use_tqdm=False)]
    for out, text in zip(outs[:5], ["a", "a", "", "", "a"], strict=True):
        assert (out.text, out.finish_reason) == (text, "error"), out
    assert outs[5].finish_reason == "stop" and outs[5].text in ("yes", "no")
