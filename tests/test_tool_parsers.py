"""The tool-call parsers on text: Hermes / Qwen blocks, Llama 3 JSON, and the answers a grammar forces; each
streamed in pieces of every size gives what the whole text gives."""

from __future__ import annotations

import json

import jsonschema
import pytest

from inferneo.entrypoints.openai.tool_parsers import (
    HermesToolParser,
    Llama3JsonToolParser,
    NamedFunctionParser,
    ParsedCall,
    RequiredCallsParser,
    default_parser_name,
    function_parameters,
    parse_all,
    required_calls_schema,
)


def streamed(parser, text: str, size: int) -> tuple[str, list[ParsedCall]]:
    """``text`` fed in pieces of ``size`` characters, the pieces joined as a client joins deltas."""
    content, calls = "", []
    pieces = [parser.feed(text[i:i + size]) for i in range(0, len(text), size)] + [parser.finish()]
    for piece in pieces:
        content += piece.content
        for call in piece.calls:
            if call.index == len(calls):
                assert call.name, "a call's first piece names the function"
                calls.append(ParsedCall(call.name, call.arguments))
            else:
                assert call.name is None
                calls[call.index].arguments += call.arguments
    return content, calls


HERMES = [
    ("one call", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "", [("get_weather", {"city": "Paris"})]),
    ("content then two calls", 'Let me look.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
     '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>', "Let me look.", [("a", {"x": 1}), ("b", {})]),
    ("plain text", "Paris is sunny today.", "Paris is sunny today.", []),
    ("a tag-like word stays", "use <tool> here <tool_c", "use <tool> here <tool_c", []),
    ("bad json stays content", "<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
    ("no name stays content", '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>',
     []),
    ("unclosed block stays content", 'ok <tool_call>{"name": "a"', 'ok <tool_call>{"name": "a"', []),
    ("a stray open tag before a real block", 'I use <tool_call> tags. <tool_call>{"name": "t", "arguments": {}}'
     '</tool_call>', "I use <tool_call> tags.", [("t", {})]),
    ("a stray open tag before a block that is no call", "a <tool_call> b <tool_call>{x}</tool_call>",
     "a <tool_call> b <tool_call>{x}</tool_call>", []),
    ("a block that is no call keeps the blank before it", "A < B and\n <tool_call>{x}</tool_call> end",
     "A < B and\n <tool_call>{x}</tool_call> end", []),
    ("braces and tags inside strings", '<tool_call>{"name": "say", "arguments": {"t": "}</tool_"}}</tool_call>',
     "", [("say", {"t": "}</tool_"})]),
    ("arguments missing means none", '<tool_call>{"name": "now"}</tool_call>', "", [("now", {})]),
    ("trailing text after calls", '<tool_call>{"name": "a", "arguments": {}}</tool_call> done', " done",
     [("a", {})]),
    ("non-ascii", '<tool_call>{"name": "f", "arguments": {"q": "héllo ☃"}}</tool_call>', "",
     [("f", {"q": "héllo ☃"})]),
    ("a closing tag inside a string argument", '<tool_call>{"name": "write", "arguments": {"text": "end it with '
     '</tool_call> here"}}</tool_call> done', " done", [("write", {"text": "end it with </tool_call> here"})]),
    ("an opening tag inside a string argument", 'Sure. <tool_call>{"name": "w", "arguments": {"t": "<tool_call>x'
     '</tool_call>"}}</tool_call>', "Sure.", [("w", {"t": "<tool_call>x</tool_call>"})]),
    ("an escaped quote before a tag in a string", '<tool_call>{"name": "q", "arguments": {"t": "a \\" '
     '</tool_call> b"}}</tool_call>', "", [("q", {"t": 'a " </tool_call> b'})]),
    ("a block whose string never ends stays content", '<tool_call>{"name": "a", "arguments": {"t": "x</tool_call>'
     ' more', '<tool_call>{"name": "a", "arguments": {"t": "x</tool_call> more', []),
    ("a block that is no JSON ends at its first closing tag", '<tool_call>say "hi</tool_call> then',
     '<tool_call>say "hi</tool_call> then', []),
]

LLAMA3 = [
    ("one call", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "",
     [("get_weather", {"city": "Paris"})]),
    ("two calls", '{"name": "a", "parameters": {"x": [1, {"y": "}"}]}}; {"name": "b", "parameters": {}}', "",
     [("a", {"x": [1, {"y": "}"}]}), ("b", {})]),
    ("python tag", '<|python_tag|>{"name": "a", "arguments": {}}', "", [("a", {})]),
    ("leading blanks", '\n  {"name": "a", "parameters": {}}', "", [("a", {})]),
    ("plain text", "The weather is fine.", "The weather is fine.", []),
    ("json that is no call", '{"x": 1}', '{"x": 1}', []),
    ("unfinished", '{"name": "a", "parameters": {', '{"name": "a", "parameters": {', []),
    ("text after a call", '{"name": "a", "parameters": {}} and more', " and more", [("a", {})]),
]


def check(parser_type, text, content, calls):
    expected = [ParsedCall(name, json.dumps(args, ensure_ascii=False)) for name, args in calls]
    whole = parse_all(parser_type(), text)
    assert whole == (content, expected)
    for size in (1, 2, 3, 7, len(text) or 1):
        assert streamed(parser_type(), text, size) == (content, expected), size


@pytest.mark.parametrize(("case", "text", "content", "calls"), HERMES, ids=[c[0] for c in HERMES])
def test_hermes(case, text, content, calls):
    check(HermesToolParser, text, content, calls)


@pytest.mark.parametrize(("case", "text", "content", "calls"), LLAMA3, ids=[c[0] for c in LLAMA3])
def test_llama3_json(case, text, content, calls):
    check(Llama3JsonToolParser, text, content, calls)


def test_hermes_holds_back_only_what_may_start_a_tag():
    parser = HermesToolParser()
    assert parser.feed("Sure").content == "Sure"
    assert parser.feed(" <tool").content == ""  # may be a block: held, with the blank before it
    assert parser.feed("box>").content == " <toolbox>"  # it was not


def test_named_function_streams_every_piece_as_arguments():
    parser = NamedFunctionParser("get_weather")
    first = parser.feed('{"city"')
    assert [(c.index, c.name, c.arguments) for c in first.calls] == [(0, "get_weather", '{"city"')]
    assert [(c.name, c.arguments) for c in parser.feed(': "Paris"}').calls] == [(None, ': "Paris"}')]
    assert parser.finish().calls == []
    assert parse_all(NamedFunctionParser("f"), "") == ("", [ParsedCall("f", "")])


def test_required_calls():
    text = '[{"name": "a", "parameters": {"s": "]}"}}, {"name": "b", "parameters": {}}]'
    expected = [ParsedCall("a", '{"s": "]}"}'), ParsedCall("b", "{}")]
    for size in (1, 5, len(text)):
        assert streamed(RequiredCallsParser(), text, size) == ("", expected)
    assert parse_all(RequiredCallsParser(), "not json") == ("not json", [])


@pytest.mark.parametrize(("text", "calls"), [
    ('[{"name":', []),
    ('[{"name": "get_weather", "parameters": {"ci', [ParsedCall("get_weather", '{"ci')]),
    ('[{"name": "a", "parameters": {}}, {"na', [ParsedCall("a", "{}")]),
    ('[{"name": "say \\"hi\\"", "parameters": ', [ParsedCall('say "hi"', "")]),
])
def test_required_calls_cut_short_keep_the_decided_call_and_no_json_in_content(text, calls):
    """The length limit may stop the array anywhere: a call whose name is complete comes out with its arguments so
    far (as a named function's call does); the grammar's JSON never becomes content."""
    for size in (1, 4, len(text)):
        assert streamed(RequiredCallsParser(), text, size) == ("", calls)


def test_required_calls_schema_accepts_calls_of_the_tools_only():
    tools = [{"name": "a", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}},
                                         "required": ["x"]}},
             {"name": "b", "parameters": None}]
    one = required_calls_schema(tools, parallel=False)
    jsonschema.validate([{"name": "a", "parameters": {"x": 1}}], one)
    jsonschema.validate([{"name": "b", "parameters": {}}], one)
    for bad in ([], [{"name": "c", "parameters": {}}], [{"name": "a", "parameters": {}}],
                [{"name": "b", "parameters": {"y": 1}}], [{"name": "b", "parameters": {}}] * 2):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, one)
    jsonschema.validate([{"name": "b", "parameters": {}}] * 2, required_calls_schema(tools, parallel=True))


def test_required_calls_schema_keeps_each_tools_own_references():
    """pydantic writes nested models as ``$defs`` + ``#/$defs/...`` references and a recursive model as ``#``:
    inside the calls array they must still resolve to the tool's own definitions."""
    nested = {"$defs": {"Pt": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"],
                               "additionalProperties": False}},
              "type": "object", "properties": {"p": {"$ref": "#/$defs/Pt"}}, "required": ["p"]}
    tree = {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#"}}},
            "required": ["v"], "additionalProperties": False}
    schema = required_calls_schema([{"name": "n", "parameters": nested}, {"name": "t", "parameters": tree}],
                                   parallel=True)
    jsonschema.validate([{"name": "n", "parameters": {"p": {"x": 1.5}}},
                         {"name": "t", "parameters": {"v": 1, "kids": [{"v": 2, "kids": [{"v": 3}]}]}}], schema)
    for bad in ([{"name": "n", "parameters": {"p": {"x": "no"}}}], [{"name": "n", "parameters": {"p": {}}}],
                [{"name": "t", "parameters": {"v": 1, "kids": [{"v": "x"}]}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    # xgrammar resolves the re-rooted references too (the grammar the server compiles)
    xgr = pytest.importorskip("xgrammar")
    grammar = xgr.Grammar.from_json_schema(json.dumps(schema))
    accepts = xgr.testing._is_grammar_accept_string
    assert accepts(grammar, '[{"name": "n", "parameters": {"p": {"x": 1.5}}}]')
    assert accepts(grammar, '[{"name": "t", "parameters": {"v": 1, "kids": [{"v": 2}]}}]')
    assert not accepts(grammar, '[{"name": "t", "parameters": {"v": 1, "kids": [{"v": "x"}]}}]')


def test_parameters_that_say_no_type_describe_an_object():
    assert function_parameters({}) == {"type": "object"}
    assert function_parameters({"properties": {"a": {"type": "string"}}})["type"] == "object"
    kept = {"anyOf": [{"type": "object"}, {"type": "null"}]}
    assert function_parameters(kept) is kept
    jsonschema.validate([{"name": "f", "parameters": {"any": [1]}}],
                        required_calls_schema([{"name": "f", "parameters": {}}], parallel=False))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "f", "parameters": "text"}],
                            required_calls_schema([{"name": "f", "parameters": {}}], parallel=False))


@pytest.mark.parametrize(("template", "expected"), [
    ("{% for m in messages %}<tool_call>{% endfor %}", "hermes"),
    ("{{ '<|python_tag|>' }}", "llama3_json"),
    ("{% if message.role == 'ipython' %}{% endif %}", "llama3_json"),
    ('{"name": function name, "parameters": dictionary}', "llama3_json"),
    ("{% for m in messages %}{{ m.content }}{% endfor %}", None),
    (None, None),
])
def test_the_chat_template_decides_the_default_parser(template, expected):
    assert default_parser_name(template) == expected
