"""The tool-call parsers of the model families vLLM names: ``mistral``, ``qwen3_coder``, ``pythonic``,
``deepseek_v3`` and ``deepseek_v31``. Each on text, whole and streamed in random pieces (the same content and calls
either way), malformed calls left as content; the chat-template detection; and one real server (``--tool-call-parser
mistral --reasoning-parser mistral``) over HTTP with the ``openai`` client, serving a context-scripted model that
writes Mistral's special tokens, with 9-character call ids that its chat template takes back in the history, and
Magistral's ``[THINK] ... [/THINK]`` before an answer that calls a tool (chat and Responses)."""

from __future__ import annotations

import functools
import json
import random
import re

import anthropic
import httpx
import openai
import pytest

from inferneo.entrypoints.openai.tool_parsers import (
    TOOL_CALL_PARSERS,
    DeepSeekV3ToolParser,
    DeepSeekV31ToolParser,
    MistralToolParser,
    ParsedCall,
    PythonicToolParser,
    Qwen3CoderToolParser,
    default_parser_name,
    parse_all,
)
from inferneo.testing.scripted_models import ScriptedAnswer, make_context_scripted_checkpoint
from inferneo.testing.server import RemoteServer


def pieces_of(text: str, rng: random.Random) -> list[str]:
    """``text`` cut at random places into pieces of 1 to 8 characters."""
    out, at = [], 0
    while at < len(text):
        size = rng.randint(1, 8)
        out.append(text[at:at + size])
        at += size
    return out


def streamed(parser, pieces: list[str]) -> tuple[str, list[ParsedCall]]:
    """``pieces`` fed one by one, the results joined as a client joins deltas."""
    content, calls = "", []
    for piece in [*map(parser.feed, pieces), parser.finish()]:
        content += piece.content
        for call in piece.calls:
            if call.index == len(calls):
                assert call.name, "a call's first piece names the function"
                calls.append(ParsedCall(call.name, call.arguments))
            else:
                assert call.name is None
                calls[call.index].arguments += call.arguments
    return content, calls


def check(new_parser, text: str, content: str, calls: list[tuple[str, dict]]) -> None:
    """The whole text, and the text in one-character pieces and in random pieces, give ``content`` and ``calls``."""
    expected = (content, [ParsedCall(name, json.dumps(args, ensure_ascii=False)) for name, args in calls])
    assert parse_all(new_parser(), text) == expected
    assert streamed(new_parser(), list(text)) == expected
    rng = random.Random(text)
    for _ in range(20):
        pieces = pieces_of(text, rng)
        assert streamed(new_parser(), pieces) == expected, pieces


# ---- mistral -------------------------------------------------------------------------------------------------------

MISTRAL = [
    ("array of two", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
     '{"name": "get_time", "arguments": {}}]', "", [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    ("array after text, blank after the marker", 'Let me check.\n[TOOL_CALLS] [{"name": "a", "arguments": '
     '{"s": "]}[TOOL_CALLS]"}}]', "Let me check.", [("a", {"s": "]}[TOOL_CALLS]"})]),
    ("one object, no array", '[TOOL_CALLS]{"name": "a", "arguments": {"x": 1}}', "", [("a", {"x": 1})]),
    ("named form, two calls", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}', "",
     [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    ("named form with a call id", "Sure.[TOOL_CALLS]f[CALL_ID]a1B2c3D4e[ARGS]{\"q\": \"héllo ☃\"}", "Sure.",
     [("f", {"q": "héllo ☃"})]),
    ("text after the calls", "[TOOL_CALLS]f[ARGS]{} and done", " and done", [("f", {})]),
    ("plain text", "Paris is sunny [today].", "Paris is sunny [today].", []),
    ("a marker-like word stays", "see [TOOL_CALL here [TOOL", "see [TOOL_CALL here [TOOL", []),
    ("prose after the marker stays", "hi [TOOL_CALLS] not a call", "hi [TOOL_CALLS] not a call", []),
    ("an array that is no call stays", '[TOOL_CALLS][{"name": 1}] x', '[TOOL_CALLS][{"name": 1}] x', []),
    ("bad JSON stays", "[TOOL_CALLS][{nope}]", "[TOOL_CALLS][{nope}]", []),
    ("arguments not an object stay", "[TOOL_CALLS]f[ARGS][1]", "[TOOL_CALLS]f[ARGS][1]", []),
    ("a bad call after a good one", '[TOOL_CALLS]f[ARGS]{}[TOOL_CALLS]g h', "[TOOL_CALLS]g h", [("f", {})]),
    ("cut short stays", 'ok [TOOL_CALLS]f[ARGS]{"x": ', 'ok [TOOL_CALLS]f[ARGS]{"x": ', []),
    ("cut in the name stays", "[TOOL_CALLS]get_wea", "[TOOL_CALLS]get_wea", []),
]


@pytest.mark.parametrize(("case", "text", "content", "calls"), MISTRAL, ids=[c[0] for c in MISTRAL])
def test_mistral(case, text, content, calls):
    check(MistralToolParser, text, content, calls)


def test_mistral_ids_are_nine_letters_and_digits_and_its_markers_are_kept():
    parser = MistralToolParser()
    ids = {parser.call_id() for _ in range(50)}
    assert len(ids) == 50 and all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in ids)
    assert MistralToolParser.keeps_special_tokens and not Qwen3CoderToolParser.keeps_special_tokens
    assert PythonicToolParser.call_id() is None  # any id will do: each API makes its own


# ---- qwen3_coder ---------------------------------------------------------------------------------------------------

SCHEMAS = {"f": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "t": {"type": "number"}, "ok": {"type": "boolean"},
    "o": {"type": "object"}, "a": {"type": "array"}, "n": {"type": ["string", "null"]},
    "u": {"anyOf": [{"type": "integer"}, {"type": "null"}]}, "code": {"type": "string"}}}}


def _qwen(*parameters: tuple[str, str], name: str = "f") -> str:
    body = "".join(f"<parameter={key}>\n{value}\n</parameter>\n" for key, value in parameters)
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


QWEN3_CODER = [
    ("typed by the schema", "Let me check.\n" + _qwen(
        ("city", "Paris"), ("days", "3"), ("t", "2.5"), ("ok", "True"), ("o", '{"k": [1]}'), ("a", "[1, 'x']"),
        ("n", "null"), ("u", "None"), ("extra", " 5 ")),
     "Let me check.", [("f", {"city": "Paris", "days": 3, "t": 2.5, "ok": True, "o": {"k": [1]}, "a": [1, "x"],
                              "n": None, "u": None, "extra": " 5 "})]),
    ("a string stays as written", _qwen(("city", "007"), ("n", "None here")), "",
     [("f", {"city": "007", "n": "None here"})]),
    ("a value that is not its type stays text", _qwen(("days", "many"), ("ok", "maybe"), ("o", "{bad")), "",
     [("f", {"days": "many", "ok": "maybe", "o": "{bad"})]),
    ("a whole number is an integer", _qwen(("t", "3.0")), "", [("f", {"t": 3})]),
    ("an unknown tool's values are strings", _qwen(("x", "1"), name="g"), "", [("g", {"x": "1"})]),
    ("code holding the tags", _qwen(("code", "a </parameter> b\n</tool_call>\n<tool_call> c")), "",
     [("f", {"code": "a </parameter> b\n</tool_call>\n<tool_call> c"})]),
    ("multi-line value", _qwen(("code", "line 1\n\nline 3\n")), "", [("f", {"code": "line 1\n\nline 3\n"})]),
    ("two calls and text after", _qwen(("days", "1")) + "\n" + _qwen(name="g") + " done", " done",
     [("f", {"days": 1}), ("g", {})]),
    ("no </tool_call> at the end", _qwen(("days", "2"))[:-len("</tool_call>")], "", [("f", {"days": 2})]),
    ("plain text", "use <tool> or <tool_c", "use <tool> or <tool_c", []),
    ("a block that is no call stays", "<tool_call>\nnope\n</function>\n</tool_call> after",
     "<tool_call>\nnope\n</function>\n</tool_call> after", []),
    ("text outside parameters stays", "<tool_call>\n<function=f>\nhi\n</function>\n</tool_call>",
     "<tool_call>\n<function=f>\nhi\n</function>\n</tool_call>", []),
    ("a stray tag before a block", "I write <tool_call> tags.\n" + _qwen(name="g"), "I write <tool_call> tags.",
     [("g", {})]),
    ("cut short stays", "x <tool_call>\n<function=f>\n<parameter=city>\nPar",
     "x <tool_call>\n<function=f>\n<parameter=city>\nPar", []),
]


@pytest.mark.parametrize(("case", "text", "content", "calls"), QWEN3_CODER, ids=[c[0] for c in QWEN3_CODER])
def test_qwen3_coder(case, text, content, calls):
    check(functools.partial(Qwen3CoderToolParser, SCHEMAS), text, content, calls)


# ---- pythonic ------------------------------------------------------------------------------------------------------

PYTHONIC = [
    ("two calls", '[get_weather(city="Paris", days=3), t(x=[1, (2, 3)], y={"a": None}, z="])", w=-1.5, b=True)]',
     "", [("get_weather", {"city": "Paris", "days": 3}),
          ("t", {"x": [1, [2, 3]], "y": {"a": None}, "z": "])", "w": -1.5, "b": True})]),
    ("blanks around", ' \n[now()]\n', "", [("now", {})]),
    ("text after the calls", "[a()] then more", " then more", [("a", {})]),
    ("escapes in strings", '[a(x="\\d\\n")]', "", [("a", {"x": "\\d\n"})]),
    ("plain text", "Plain [a()] text", "Plain [a()] text", []),
    ("a list that is no call", "[1] is a list", "[1] is a list", []),
    ("a bracketed note", "[Note] read this", "[Note] read this", []),
    ("a markdown link", "[link text](https://x.org/a_(b)) more", "[link text](https://x.org/a_(b)) more", []),
    ("quotes of either kind", """[a(x="a]'b", y='c"d)', z="e\\"]")]""", "",
     [("a", {"x": "a]'b", "y": 'c"d)', "z": 'e"]'})]),
    ("a positional argument", "[a(1)]", "[a(1)]", []),
    ("a name is not a literal", "[a(x=foo)]", "[a(x=foo)]", []),
    ("a call is not a literal", "[a(x=__import__('os'))]", "[a(x=__import__('os'))]", []),
    ("a set is not JSON", "[a(x={1, 2})]", "[a(x={1, 2})]", []),
    ("unfinished", '[a(x="unclosed', '[a(x="unclosed', []),
]


@pytest.mark.parametrize(("case", "text", "content", "calls"), PYTHONIC, ids=[c[0] for c in PYTHONIC])
def test_pythonic(case, text, content, calls):
    check(PythonicToolParser, text, content, calls)


# ---- deepseek ------------------------------------------------------------------------------------------------------

B, E, CB, CE, SEP = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", \
    "<｜tool▁sep｜>"


def _v3(name: str, args: str) -> str:
    return f"{CB}function{SEP}{name}\n```json\n{args}\n```{CE}"


def _v31(name: str, args: str) -> str:
    return f"{CB}{name}{SEP}{args}{CE}"


PARIS = '{"city": "Paris"}'
OVER_LINES = '{\n  "a": [1,\n 2]\n}'
DEEPSEEK_V3 = [
    ("two calls after text", f"Let me see.\n{B}{_v3('get_weather', PARIS)}\n{_v3('t', '{}')}{E} ok",
     "Let me see. ok", [("get_weather", {"city": "Paris"}), ("t", {})]),
    ("arguments over lines", f"{B}{_v3('f', OVER_LINES)}{E}", "", [("f", {"a": [1, 2]})]),
    ("plain text", "plain <｜tool", "plain <｜tool", []),
    ("the other format stays", f"x{B}{_v31('f', '{}')}{E}", f"x{B}{_v31('f', '{}')}{E}", []),
    ("bad JSON stays", f"{B}{_v3('f', '{nope')}{E}", f"{B}{_v3('f', '{nope')}{E}", []),
    ("a bad call after a good one", f"{B}{_v3('f', '{}')}junk{E}", "junk" + E, [("f", {})]),
    ("cut short stays", f"a {B}{CB}function{SEP}x\n```json\n{{", f"a {B}{CB}function{SEP}x\n```json\n{{", []),
]

DEEPSEEK_V31 = [
    ("two calls after text", f"Hi{B}{_v31('get_weather', PARIS)}{_v31('t', '{}')}{E}", "Hi",
     [("get_weather", {"city": "Paris"}), ("t", {})]),
    ("text after the calls", f"{B}{_v31('f', '{}')}{E}\nDone.", "\nDone.", [("f", {})]),
    ("the other format stays", f"{B}{_v3('f', '{}')}{E}", f"{B}{_v3('f', '{}')}{E}", []),
    ("arguments not an object stay", f"{B}{_v31('f', '[1]')}{E}", f"{B}{_v31('f', '[1]')}{E}", []),
    ("no calls' end", f"{B}{_v31('f', '{}')}", "", [("f", {})]),
]


@pytest.mark.parametrize(("case", "text", "content", "calls"), DEEPSEEK_V3, ids=[c[0] for c in DEEPSEEK_V3])
def test_deepseek_v3(case, text, content, calls):
    check(DeepSeekV3ToolParser, text, content, calls)


@pytest.mark.parametrize(("case", "text", "content", "calls"), DEEPSEEK_V31, ids=[c[0] for c in DEEPSEEK_V31])
def test_deepseek_v31(case, text, content, calls):
    check(DeepSeekV31ToolParser, text, content, calls)


def test_streaming_holds_back_only_what_is_undecided():
    mistral = MistralToolParser()
    assert mistral.feed("Sure [TOOL_").content == "Sure"  # may be the marker: held, with the blank before it
    assert mistral.feed("CALLER] ok").content == " [TOOL_CALLER] ok"
    qwen = Qwen3CoderToolParser()
    assert qwen.feed("a <tool").content == "a" and qwen.feed("box>").content == " <toolbox>"
    pythonic = PythonicToolParser()
    assert pythonic.feed("[link](u").content == "[link](u"  # its list closed and is no call: content at once
    assert pythonic.feed("rl)").content == "rl)"
    deepseek = DeepSeekV31ToolParser()
    assert deepseek.feed("x <｜tool").content == "x" and deepseek.feed("box").content == " <｜toolbox"


# ---- the chat template's pick --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("template", "expected"), [
    ("{% for c in m.tool_calls %}[TOOL_CALLS][{{ c | tojson }}]{% endfor %}", "mistral"),
    ("[TOOL_CALLS]{{ c.function.name }}[ARGS]{{ c.function.arguments }}", "mistral"),
    ("<tool_call>\n<function={{ c.name }}>\n<parameter={{ k }}>", "qwen3_coder"),
    ("<tool_call>\n{{ c | tojson }}\n</tool_call>", "hermes"),
    ("[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]", "pythonic"),
    ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{{ t }}<｜tool▁sep｜>{{ n }}\\n```json\\n", "deepseek_v3"),
    ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{{ n }}<｜tool▁sep｜>{{ a }}<｜tool▁call▁end｜>", "deepseek_v31"),
])
def test_the_chat_template_picks_the_family(template, expected):
    assert default_parser_name(template) == expected
    assert expected in TOOL_CALL_PARSERS


# ---- a real server: mistral ----------------------------------------------------------------------------------------

SPECIAL = ("[INST]", "[/INST]", "[TOOL_CALLS]", "[ARGS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[THINK]", "[/THINK]")
WORDS = ("weather?", "Checking.", "get_weather", "get_time", '{"city": "Oslo"}', "{}", "Done.", "time?", "Hmm.")
CALL_ANSWER = ScriptedAnswer(("weather?", "[/INST]"), (
    "Checking.", "[TOOL_CALLS]", "get_weather", "[ARGS]", '{"city": "Oslo"}', "[TOOL_CALLS]", "get_time", "[ARGS]",
    "{}", "</s>"))
AFTER_RESULTS = ScriptedAnswer(("[/TOOL_RESULTS]",), ("Done.", "</s>"))
# Magistral: thinking between special tokens, then the answer, here a call
THINK_ANSWER = ScriptedAnswer(("time?", "[/INST]"), (
    "[THINK]", "Hmm.", "[/THINK]", "Checking.", "[TOOL_CALLS]", "get_time", "[ARGS]", "{}", "</s>"))
# Mistral's templates (v3 on) in short: calls written back with their ids, which must be 9 characters long
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.role == 'user' %}[INST]{{ m.content }}[/INST]"
    "{% elif m.role == 'assistant' %}{{ m.content or '' }}{% for c in m.tool_calls or [] %}"
    "{% if c.id is not defined or c.id | length != 9 %}"
    "{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{% endif %}"
    "[TOOL_CALLS]{{ c.function.name }}[ARGS]{{ c.function.arguments }}{% endfor %}</s>"
    "{% elif m.role == 'tool' %}{% if m.tool_call_id | length != 9 %}"
    "{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{% endif %}"
    "[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]{% endif %}{% endfor %}"
)
TOOLS = [{"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": props}}}
         for name, props in (("get_weather", {"city": {"type": "string"}}), ("get_time", {}))]
USER = [{"role": "user", "content": "weather?"}]
EXPECTED = [("get_weather", {"city": "Oslo"}), ("get_time", {})]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_context_scripted_checkpoint(tmp_path_factory.mktemp("scripted-mistral"),
                                              [CALL_ANSWER, AFTER_RESULTS, THINK_ANSWER], added_tokens=WORDS,
                                              special_tokens=SPECIAL, chat_template=TEMPLATE)
    with RemoteServer(folder, "--served-model-name", "mistral", "--tool-call-parser", "mistral",
                      "--reasoning-parser", "mistral",
                      "--kv-cache-memory", "16MiB", "--num-threads", "1", "--disable-access-log") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)


def _is_mistral_id(call_id: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9]{9}", call_id) is not None


def test_mistral_calls_whole_then_answered_in_the_history(client, server):
    r = client.chat.completions.create(model="mistral", messages=USER, tools=TOOLS, max_tokens=30, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == EXPECTED
    assert all(_is_mistral_id(c.id) for c in calls) and calls[0].id != calls[1].id
    # the template takes the ids back: the conversation goes on with the tools' results
    history = [*USER, choice.message.model_dump(exclude_none=True),
               *({"role": "tool", "tool_call_id": c.id, "content": "ok"} for c in calls)]
    follow = client.chat.completions.create(model="mistral", messages=history, tools=TOOLS, max_tokens=10,
                                            temperature=0)
    assert follow.choices[0].message.content == "Done." and not follow.choices[0].message.tool_calls
    # an id of another shape is refused by the template: a 400, not a 500
    history[1]["tool_calls"][0]["id"] = history[2]["tool_call_id"] = "call_0123456789"
    bad = httpx.post(server.url("/v1/chat/completions"), json={"model": "mistral", "messages": history,
                                                               "tools": TOOLS, "max_tokens": 5}, timeout=60)
    assert bad.status_code == 400 and "length 9" in bad.json()["error"]["message"]


def test_mistral_ids_for_a_call_tool_choice_forces(client):
    """A call that a grammar forces (not read by the mistral parser) also gets an id Mistral's template takes."""
    done = {"type": "function", "function": {"name": "done", "parameters": {
        "type": "object", "properties": {}, "additionalProperties": False}}}
    r = client.chat.completions.create(model="mistral", messages=USER, tools=[*TOOLS, done], max_tokens=20,
                                       temperature=0, tool_choice={"type": "function", "function": {"name": "done"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "done" and _is_mistral_id(call.id)


def test_mistral_calls_streamed(client):
    stream = client.chat.completions.create(model="mistral", messages=USER, tools=TOOLS, max_tokens=30,
                                            temperature=0, stream=True)
    content, calls, finish = "", {}, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for piece in delta.tool_calls or ():
            if piece.id is not None:
                calls[piece.index] = [piece.id, piece.function.name, piece.function.arguments or ""]
            else:
                calls[piece.index][2] += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert content == "Checking." and finish == "tool_calls"
    assert [(name, json.loads(args)) for _, name, args in calls.values()] == EXPECTED
    assert all(_is_mistral_id(call_id) for call_id, _, _ in calls.values())


def test_mistral_calls_in_the_responses_api(client):
    r = client.responses.create(model="mistral", input="weather?", tools=[
        {"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
        for t in TOOLS], max_output_tokens=30, temperature=0)
    calls = [item for item in r.output if item.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == EXPECTED
    assert all(_is_mistral_id(c.call_id) for c in calls)


def test_mistral_calls_in_the_messages_api(server):
    """Anthropic's Messages API: tool_use ids of Mistral's shape too (its template takes them back), streamed or not."""
    client = anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in TOOLS]
    message = client.messages.create(model="mistral", max_tokens=30, messages=USER, tools=tools,
                                     extra_body={"temperature": 0})
    uses = [block for block in message.content if block.type == "tool_use"]
    assert [(u.name, u.input) for u in uses] == EXPECTED and all(_is_mistral_id(u.id) for u in uses)
    with client.messages.stream(model="mistral", max_tokens=30, messages=USER, tools=tools,
                                extra_body={"temperature": 0}) as stream:
        final = stream.get_final_message()
    uses = [block for block in final.content if block.type == "tool_use"]
    assert [(u.name, u.input) for u in uses] == EXPECTED and all(_is_mistral_id(u.id) for u in uses)


def test_magistral_thinks_then_calls(client):
    """``[THINK] ... [/THINK]`` (special tokens) split out, then the answer's ``[TOOL_CALLS]`` read: both formats'
    markers kept in the decoded text, none of them in what the client gets; the same streamed."""
    time_user = [{"role": "user", "content": "time?"}]
    r = client.chat.completions.create(model="mistral", messages=time_user, tools=TOOLS, max_tokens=30,
                                       temperature=0)
    choice = r.choices[0]
    assert (choice.message.reasoning, choice.message.content) == ("Hmm.", "Checking.")
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_time", {})]
    assert choice.finish_reason == "tool_calls" and _is_mistral_id(choice.message.tool_calls[0].id)
    assert r.usage.completion_tokens_details.reasoning_tokens == 3  # [THINK] Hmm. [/THINK]
    stream = client.chat.completions.create(model="mistral", messages=time_user, tools=TOOLS, max_tokens=30,
                                            temperature=0, stream=True)
    reasoning, content, names = "", "", []
    for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning", None) or ""
        content += delta.content or ""
        names += [piece.function.name for piece in delta.tool_calls or () if piece.function.name]
    assert (reasoning, content, names) == ("Hmm.", "Checking.", ["get_time"])
    response = client.responses.create(model="mistral", input="time?", max_output_tokens=30, temperature=0, tools=[
        {"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
        for t in TOOLS])
    assert [item.type for item in response.output] == ["reasoning", "message", "function_call"]
    assert response.output[0].content[0].text == "Hmm." and response.output[2].name == "get_time"
    # without tools, the answer after the thinking is all content, as written
    plain = client.chat.completions.create(model="mistral", messages=time_user, max_tokens=30, temperature=0)
    assert plain.choices[0].message.reasoning == "Hmm."
    assert plain.choices[0].message.content == "Checking.[TOOL_CALLS]get_time[ARGS]{}"


def test_magistral_thinking_cut_at_max_tokens(client):
    r = client.chat.completions.create(model="mistral", messages=[{"role": "user", "content": "time?"}],
                                       tools=TOOLS, max_tokens=2, temperature=0)
    choice = r.choices[0]
    assert (choice.message.reasoning, choice.message.content, choice.finish_reason) == ("Hmm.", "", "length")
    assert not choice.message.tool_calls and r.usage.completion_tokens_details.reasoning_tokens == 2


def test_magistral_structured_output_starts_after_the_thinking(client):
    """The constraint waits for ``[/THINK]`` (a special token's id): the thinking is the model's own, the answer
    the regex's."""
    r = client.chat.completions.create(model="mistral", messages=[{"role": "user", "content": "time?"}],
                                       max_tokens=10, temperature=0,
                                       extra_body={"structured_outputs": {"regex": "(yes|no)"}})
    message = r.choices[0].message
    assert message.reasoning == "Hmm." and message.content in ("yes", "no")
