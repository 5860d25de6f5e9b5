"""gpt-oss's harmony answers (``--reasoning-parser openai_gptoss``): channels split into reasoning, content and
tool calls, whole and streamed alike.

The server tests serve a context-scripted model (``testing.scripted_models.make_context_scripted_checkpoint``)
with the harmony markers as special tokens and a harmony-like chat template: a question ending in ``capital?`` gets
an analysis message then a final one; one ending in ``weather?`` gets a call to ``get_weather``. Its answers repeat
tokens (``<|channel|>``, ``<|message|>``, ``assistant``), which a model whose every token has one successor cannot
write.
"""

from __future__ import annotations

import json

import openai
import pytest

from inferneo.entrypoints.openai.harmony import MARKERS, HarmonyMarkers, HarmonySplitter, route_of
from inferneo.entrypoints.openai.reasoning import REASONING_PARSERS, reasoning_for_tokenizer
from inferneo.entrypoints.openai.serving_chat import AnswerReader
from inferneo.entrypoints.openai.streamed_text import marker_tail
from inferneo.entrypoints.openai.tool_parsers import calls_of, default_parser_name
from inferneo.testing.scripted_models import ScriptedAnswer, make_context_scripted_checkpoint
from inferneo.testing.server import RemoteServer
from inferneo.testing.tiny_models import make_tiny_tokenizer

SPECIAL = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>")
WORDS = ("capital?", "weather?", "assistant", "analysis", "final", "commentary", " to=functions.get_weather ",
         "json", '{"city":"Oslo"}', "We", " need", " to", " answer.", "Paris.")
TAIL = ("<|end|>", "<|start|>", "assistant")  # a user message's end, then the generation prompt
THINK_ANSWER = ScriptedAnswer(("capital?", *TAIL), (
    "<|channel|>", "analysis", "<|message|>", "We", " need", " to", " answer.", "<|end|>",
    "<|start|>", "assistant", "<|channel|>", "final", "<|message|>", "Paris.", "<|return|>"))
CALL_ANSWER = ScriptedAnswer(("weather?", *TAIL), (
    "<|channel|>", "commentary", " to=functions.get_weather ", "<|constrain|>", "json", "<|message|>",
    '{"city":"Oslo"}', "<|call|>"))
TEMPLATE = ("{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|start|>assistant{% endif %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Oslo", "Rome"]}}, "required": ["city"],
    "additionalProperties": False}}}

# ---- the splitter, alone -------------------------------------------------------------------------------------------

THINK_TEXT = ("<|channel|>analysis<|message|>We need to answer.<|end|><|start|>assistant<|channel|>final"
              "<|message|>Paris.")
CASES = [
    ("analysis then final", THINK_TEXT, "We need to answer.", "Paris.", []),
    ("a call, channel first",
     '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Oslo"}',
     "", "", [("get_weather", '{"city":"Oslo"}')]),
    ("a call, recipient first",
     '<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant to=functions.get_weather<|channel|>'
     'commentary json<|message|>{"city":"Rome"}', "Look it up.", "", [("get_weather", '{"city":"Rome"}')]),
    ("a preamble, then two calls",
     '<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant<|channel|>commentary to=functions.a'
     '<|message|>{}<|call|><|start|>assistant<|channel|>commentary to=functions.b<|message|>{"x": "<|"}',
     "", "Checking.", [("a", "{}"), ("b", '{"x": "<|"}')]),
    ("two analysis messages are joined", "<|channel|>analysis<|message|>One.<|end|><|start|>assistant<|channel|>"
     "analysis<|message|>Two.<|end|><|start|>assistant<|channel|>final<|message|>Done.<|return|>",
     "One.\nTwo.", "Done.", []),
    ("plain text (a grammar from the first token)", '{"ok": true}', "", '{"ok": true}', []),
    ("cut in a header", "<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant<|chan", "Hm.", "", []),
    ("cut in a body", "<|channel|>final<|message|>Par", "", "Par", []),
    ("less-than signs in a body", "<|channel|>final<|message|>a <| b < c<|return|>", "", "a <| b < c", []),
    ("an unknown channel is content", "<|channel|>other<|message|>x<|end|>", "", "x", []),
    ("empty", "", "", "", []),
]


@pytest.mark.parametrize(("text", "reasoning", "content", "calls"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_splitter_whole_and_in_any_pieces(text, reasoning, content, calls):
    whole = AnswerReader(HarmonySplitter(), None).read(text, last=True)
    assert (whole.reasoning, whole.content) == (reasoning, content)
    assert [(c.name, c.arguments) for c in calls_of(whole.calls)] == calls
    for cut in range(len(text) + 1):  # every split into three pieces gives the same result
        for cut2 in range(cut, len(text) + 1, 3):
            splitter = HarmonySplitter()
            out = splitter.feed(text[:cut])
            for piece in (splitter.feed(text[cut:cut2]), splitter.feed(text[cut2:]), splitter.finish()):
                out.add(piece)
            assert (out.reasoning, out.content) == (reasoning, content), (cut, cut2)
            assert [(c.name, c.arguments) for c in calls_of(out.calls)] == calls, (cut, cut2)


def test_streaming_holds_back_only_what_is_undecided():
    splitter = HarmonySplitter()
    assert splitter.feed("<|channel|>final").content == ""  # a header goes nowhere until its <|message|>
    assert splitter.feed("<|message|>Par").content == "Par"
    assert splitter.feed("is.<|e").content == "is."  # "<|e" may be <|end|>
    assert splitter.feed("nd|>").content == ""
    call = HarmonySplitter().feed("<|channel|>commentary to=functions.f<|message|>{")
    assert [(c.index, c.name, c.arguments) for c in call.calls] == [(0, "f", ""), (0, None, "{")]
    assert marker_tail("abc<|ca", MARKERS) == 4 and marker_tail("abc<", MARKERS) == 1
    assert marker_tail("abc", MARKERS) == 0
    assert route_of("<|start|>assistant to=functions.x<|channel|>commentary json").name == "x"


def _harmony_tokenizer():
    tokenizer = make_tiny_tokenizer(384)
    tokenizer.add_tokens(list(SPECIAL), special_tokens=True)
    tokenizer.add_tokens(["analysis"])
    return tokenizer


def test_parser_needs_the_markers_and_counts_the_analysis_tokens():
    assert "openai_gptoss" in REASONING_PARSERS
    tokenizer = _harmony_tokenizer()
    markers = reasoning_for_tokenizer("openai_gptoss", tokenizer)
    assert isinstance(markers, HarmonyMarkers) and markers.keeps_special_tokens and markers.carries_calls
    assert markers.span(False) is None and not markers.opens([1, 2])
    with pytest.raises(ValueError, match="harmony"):
        reasoning_for_tokenizer("openai_gptoss", make_tiny_tokenizer(384))
    ids = tokenizer.encode("<|channel|>analysis<|message|>ab<|end|><|start|>assistant<|channel|>final<|message|>cd",
                           add_special_tokens=False)
    counter = markers.token_counter(False)
    for token in ids:  # one at a time, as a stream comes
        counter.add([token])
    thinking = tokenizer.encode("<|channel|>analysis<|message|>ab<|end|>", add_special_tokens=False)
    assert counter.count == len(thinking)
    plain = markers.token_counter(False)
    plain.add(tokenizer.encode("ab<|channel|>analysis<|message|>cd", add_special_tokens=False))
    assert plain.count == 0


# ---- a real server -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def harmony_dir(tmp_path_factory):
    return make_context_scripted_checkpoint(tmp_path_factory.mktemp("scripted-harmony"), [THINK_ANSWER, CALL_ANSWER],
                                            added_tokens=WORDS, special_tokens=SPECIAL,
                                            eos_tokens=("<|return|>", "<|call|>"), chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def server(harmony_dir):
    with RemoteServer(harmony_dir, "--served-model-name", "oss", "--reasoning-parser", "openai_gptoss",
                      "--tool-call-parser", "openai", "--kv-cache-memory", "16MiB", "--num-threads", "1",
                      "--disable-access-log") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)


def _ask(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What about the {question}"}]


def test_the_fixture_repeats_tokens_exactly(harmony_dir):
    """Offline, through the real engine: the scripted answers, markers kept, whatever comes before the tail."""
    from inferneo import LLM, SamplingParams

    llm = LLM(str(harmony_dir), kv_cache_memory="16MiB", num_threads=1)
    params = SamplingParams(temperature=0, max_tokens=40, skip_special_tokens=False,
                            spaces_between_special_tokens=False)
    long_prompt = [{"role": "user", "content": "ab <|channel|> cd analysis " * 150 + "weather?"}]
    outputs = llm.chat([_ask("capital?"), long_prompt], params, use_tqdm=False)
    assert outputs[0].outputs[0].text == "".join(THINK_ANSWER.answer[:-1])
    assert outputs[1].outputs[0].text == "".join(CALL_ANSWER.answer[:-1])
    assert [o.outputs[0].finish_reason for o in outputs] == ["stop", "stop"] and len(outputs[1].prompt_token_ids) > 900


def test_chat_splits_reasoning_and_content(client):
    r = client.chat.completions.create(model="oss", messages=_ask("capital?"), max_tokens=40, temperature=0)
    message = r.choices[0].message
    assert message.content == "Paris." and r.choices[0].finish_reason == "stop"
    assert message.reasoning == message.reasoning_content == "We need to answer."
    assert r.usage.completion_tokens == len(THINK_ANSWER.answer)
    assert r.usage.completion_tokens_details.reasoning_tokens == 8  # <|channel|>analysis<|message|> ... <|end|>


def test_chat_tool_call(client):
    r = client.chat.completions.create(model="oss", messages=_ask("weather?"), tools=[WEATHER], max_tokens=40,
                                       temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == \
        [("get_weather", {"city": "Oslo"})]


@pytest.mark.parametrize("question", ["capital?", "weather?"])
def test_streamed_equals_whole(client, question):
    whole = client.chat.completions.create(model="oss", messages=_ask(question), tools=[WEATHER], max_tokens=40,
                                           temperature=0).choices[0]
    reasoning, content, calls, finish = "", "", {}, None
    for chunk in client.chat.completions.create(model="oss", messages=_ask(question), tools=[WEATHER],
                                                max_tokens=40, temperature=0, stream=True):
        for choice in chunk.choices:
            delta = choice.delta
            reasoning += (delta.model_extra or {}).get("reasoning") or ""
            content += delta.content or ""
            assert "<|" not in (delta.content or "") and "<|" not in ((delta.model_extra or {}).get("reasoning") or "")
            indexes = [call.index for call in delta.tool_calls or ()]
            assert len(indexes) == len(set(indexes))  # one entry per call in a chunk, as OpenAI sends
            for call in delta.tool_calls or ():
                entry = calls.setdefault(call.index, {"name": None, "arguments": ""})
                entry["name"] = entry["name"] or call.function.name
                entry["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert reasoning == (whole.message.reasoning or "") and content == (whole.message.content or "")
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or ()]
    assert finish == whole.finish_reason


def test_responses_api_items(client):
    r = client.responses.create(model="oss", input=_ask("capital?"), max_output_tokens=40, temperature=0)
    assert [item.type for item in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "We need to answer." and r.output_text == "Paris."
    assert r.usage.output_tokens_details.reasoning_tokens == 8
    call = client.responses.create(model="oss", input=_ask("weather?"), tools=[{"type": "function", **WEATHER[
        "function"]}], max_output_tokens=40, temperature=0)
    assert [(item.type, item.name, item.arguments) for item in call.output] == \
        [("function_call", "get_weather", '{"city":"Oslo"}')]
    events = list(client.responses.create(model="oss", input=_ask("capital?"), max_output_tokens=40, temperature=0,
                                          stream=True))
    final = events[-1].response
    assert [item.type for item in final.output] == ["reasoning", "message"] and final.output_text == "Paris."


@pytest.mark.parametrize(("max_output_tokens", "status"), [(5, "incomplete"), (10, "completed")],
                         ids=["cut-in-the-analysis", "cut-in-the-final-header"])
def test_responses_reasoning_item_is_incomplete_only_when_cut_inside_it(client, max_output_tokens, status):
    ask = {"model": "oss", "input": _ask("capital?"), "max_output_tokens": max_output_tokens, "temperature": 0}
    whole = client.responses.create(**ask)
    streamed = list(client.responses.create(**ask, stream=True))[-1].response
    for r in (whole, streamed):
        assert r.status == "incomplete" and r.output[0].type == "reasoning"
        assert r.output[0].status == status


def test_responses_logprobs_cover_only_the_answer_text(client):
    """``output_text.logprobs`` are those of the final message's body: not the analysis message's tokens, nor the
    final message's header markers; each streamed delta carries its own text's tokens, and streamed equals whole."""
    ask = {"model": "oss", "input": _ask("capital?"), "max_output_tokens": 40, "temperature": 0, "top_logprobs": 1,
           "include": ["message.output_text.logprobs"]}
    whole = client.responses.create(**ask)
    assert [lp.token for lp in whole.output[1].content[0].logprobs] == ["Paris."]
    events = list(client.responses.create(**ask, stream=True))
    deltas = [(e.delta, [lp.token for lp in e.logprobs]) for e in events if e.type == "response.output_text.delta"]
    assert deltas == [("Paris.", ["Paris."])]
    assert [lp.token for lp in events[-1].response.output[1].content[0].logprobs] == ["Paris."]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_structured_output_applies_from_the_first_token(client, stream):
    """A constraint makes the answer the constrained text, with no channels: all content."""
    body = {"model": "oss", "messages": _ask("capital?"), "max_tokens": 40, "temperature": 0,
            "extra_body": {"structured_outputs": {"regex": "(yes|no)"}}}
    if not stream:
        message = client.chat.completions.create(**body).choices[0].message
        assert message.content in ("yes", "no") and message.reasoning is None
        return
    content = "".join(choice.delta.content or "" for chunk in client.chat.completions.create(**body, stream=True)
                      for choice in chunk.choices)
    assert content in ("yes", "no")


def test_forced_tool_choice_is_read_from_the_plain_answer(client):
    choice = client.chat.completions.create(model="oss", messages=_ask("capital?"), tools=[WEATHER],
                                            tool_choice="required", parallel_tool_calls=False, max_tokens=300,
                                            temperature=0).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(choice.message.tool_calls[0].function.arguments)["city"] in ("Oslo", "Rome")


def test_fixture_refuses_a_script_its_context_cannot_decide(tmp_path):
    same_tail = ScriptedAnswer(("capital?", *TAIL), ("<|channel|>", "final", "<|return|>"))
    other = ScriptedAnswer(("weather?", "capital?", *TAIL), ("<|channel|>", "analysis", "<|return|>"))
    with pytest.raises(ValueError, match="not decided by the 5 tokens"):
        make_context_scripted_checkpoint(tmp_path, [same_tail, other], added_tokens=WORDS, special_tokens=SPECIAL)
    assert default_parser_name("<|start|>assistant<|channel|>final<|message|>") == "openai"


def test_openai_tool_parser_needs_the_harmony_reasoning_parser():
    from types import SimpleNamespace

    from inferneo.entrypoints.openai.serving_common import ServerContext
    from inferneo.sampling_params import SamplingParams

    tokenizer = _harmony_tokenizer()
    tokenizer.chat_template = "<|start|>assistant<|channel|>final<|message|>"
    engine = SimpleNamespace(tokenizer=tokenizer, default_sampling_params=SamplingParams)
    with pytest.raises(ValueError, match="reasoning parser 'openai_gptoss'"):
        ServerContext(engine, ["m"], "m", tool_call_parser="openai")
    assert ServerContext(engine, ["m"], "m").tool_parser is None  # the template's default needs it too
    paired = ServerContext(engine, ["m"], "m", reasoning_parser="openai_gptoss")
    assert paired.tool_parser is not None and paired.reasoning.carries_calls
