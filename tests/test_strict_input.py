"""Strict input against a real server over HTTP: no coercion between strings, numbers and booleans anywhere in the
request schema, chat messages that need content, a cap on every string and list a client can send, and oversized
bodies answered with a 413 that a plain HTTP client can read.

The server runs with a body limit of 40 MiB (ten times the default), so that the caps on prompt text and token-id
lists, which a default-sized body cannot reach, are reached here too. The oversized-body tests also run the guard
middleware under uvicorn's two HTTP implementations (httptools, which ``inferneo serve`` uses, and h11).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.client import HTTPConnection
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import uvicorn

from inferneo.entrypoints.openai import protocol
from inferneo.entrypoints.openai.guards import DISCARD_MAX_BYTES, GuardMiddleware, ServerGuards
from inferneo.entrypoints.openai.protocol import (
    MAX_ALLOWED_TOKEN_IDS,
    MAX_CONTENT_PARTS,
    MAX_ID_CHARS,
    MAX_LOGIT_BIAS,
    MAX_MESSAGES,
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE_CHARS,
    MAX_MODEL_CHARS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TEMPLATE_KWARGS,
    MAX_TEXT_CHARS,
    MAX_TOKEN_IDS,
    MAX_TOOLS,
)
from inferneo.entrypoints.openai.protocol_responses import ResponsesRequest
from inferneo.testing.server import RemoteServer

BODY_LIMIT = 40 * 2**20
CMPL, CHAT, TOK, DETOK = "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"
RESP = "/v1/responses"
USER = [{"role": "user", "content": "hi"}]
BASE = {CMPL: {"prompt": "hi", "max_tokens": 1}, CHAT: {"messages": USER, "max_tokens": 1}, TOK: {"prompt": "hi"},
        DETOK: {"tokens": [5]}, RESP: {"input": "hi", "max_output_tokens": 1}}


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with RemoteServer(tiny_llama_dir, "--max-model-len", "256", "--kv-cache-memory", "32MiB", "--num-threads", "1",
                      "--disable-access-log", "--max-request-body-bytes", str(BODY_LIMIT)) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


def refused(r: httpx.Response, param: str | None, says: str = "", status: int = 400) -> dict:
    """Assert an OpenAI-shaped error with this status and param; return its body."""
    assert r.status_code == status, r.text[:500]
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert says in error["message"], error
    assert len(error["message"]) < 1000, "a long input is not echoed back"
    return error


# ---- strict types ------------------------------------------------------------------------------------------------

# The JSON type each field takes, for every field of every request body: the test below sends each field values of
# the other JSON types and expects 400 naming it. `test_the_type_table_covers_every_field` keeps this complete.
SAMPLING = {
    "model": "str", "max_tokens": "int", "temperature": "float", "top_p": "float", "n": "int", "stop": "str|list",
    "seed": "int", "presence_penalty": "float", "frequency_penalty": "float", "logit_bias": "dict", "stream": "bool",
    "stream_options": "object", "user": "str", "top_k": "int", "min_p": "float", "repetition_penalty": "float",
    "min_tokens": "int", "ignore_eos": "bool", "stop_token_ids": "list", "allowed_token_ids": "list",
    "bad_words": "list", "skip_special_tokens": "bool",
    "spaces_between_special_tokens": "bool", "include_stop_str_in_output": "bool", "priority": "int",
    "response_format": "object", "structured_outputs": "object", "guided_json": "str|dict", "guided_regex": "str",
    "guided_choice": "list", "guided_grammar": "str", "structural_tag": "str|dict",
    "guided_whitespace_pattern": "str", "guided_decoding_backend": "str", "truncate_prompt_tokens": "int",
    "use_beam_search": "bool", "length_penalty": "float", "return_token_ids": "bool",
    "return_tokens_as_token_ids": "bool", "cache_salt": "str",
}
FIELDS = {
    CMPL: {**SAMPLING, "prompt": "prompt", "echo": "bool", "logprobs": "int", "prompt_logprobs": "int", "best_of": "int", "suffix": "str",
           "prompt_embeds": "str|list"},
    CHAT: {**SAMPLING, "messages": "messages", "max_completion_tokens": "int", "logprobs": "bool",
           "top_logprobs": "int", "tools": "list", "tool_choice": "str|dict",
           "parallel_tool_calls": "bool", "functions": "list", "function_call": "str|dict", "metadata": "dict",
           "store": "bool", "service_tier": "str", "add_generation_prompt": "bool", "chat_template_kwargs": "dict",
           "reasoning_effort": "str", "verbosity": "str", "prompt_cache_key": "str", "prompt_cache_retention": "str",
           "safety_identifier": "str", "prediction": "object", "modalities": "list", "audio": "object",
           "web_search_options": "object", "continue_final_message": "bool", "include_reasoning": "bool",
           "prompt_logprobs": "int"},
    TOK: {"model": "str", "prompt": "str", "messages": "messages", "add_special_tokens": "bool",
          "add_generation_prompt": "bool", "return_token_strs": "bool", "continue_final_message": "bool",
          "chat_template_kwargs": "dict", "tools": "list"},
    DETOK: {"model": "str", "tokens": "list"},
    RESP: {"model": "str", "input": "str|list", "instructions": "str", "max_output_tokens": "int", "temperature": "float",
           "top_p": "float", "top_logprobs": "int", "include": "list", "tools": "list", "tool_choice": "str|dict",
           "parallel_tool_calls": "bool", "max_tool_calls": "int", "text": "object", "reasoning": "object",
           "stream": "bool", "stream_options": "object", "store": "bool", "background": "bool",
           "previous_response_id": "str", "conversation": "str|dict", "truncation": "str", "metadata": "dict",
           "user": "str", "service_tier": "str", "safety_identifier": "str", "prompt_cache_key": "str",
           "prompt_cache_retention": "str", "seed": "int", "top_k": "int", "min_p": "float",
           "repetition_penalty": "float", "priority": "int", "cache_salt": "str", "structured_outputs": "object"},
}
MODELS = {CMPL: protocol.CompletionRequest, CHAT: protocol.ChatCompletionRequest, TOK: protocol.TokenizeRequest,
          DETOK: protocol.DetokenizeRequest, RESP: ResponsesRequest}
# Values of the wrong JSON type for each kind: strings for numbers and booleans, numbers for booleans and strings,
# booleans for numbers, a decimal number for an integer, containers for scalars and scalars for containers.
WRONG: dict[str, list[Any]] = {
    "bool": ["yes", "true", 1, 0, 1.0, [], {}],
    "int": ["2", 2.0, 2.5, True, False, [2], {}],
    "float": ["0.5", "1", True, False, [1], {}],
    "str": [1, 1.5, True, ["x"], {}],
    "str|list": [1, 1.5, True, {}, [1], [True]],
    "str|dict": [1, 1.5, True, ["none"]],
    "list": ["x", 1, True, {}],
    "dict": ["x", 1, True, []],
    "object": ["x", 1, True, []],
    "prompt": [1, 1.5, True, {"text": "hi"}, [True], [1.5], ["a", 1]],
    "messages": ["hi", 1, True, {"role": "user", "content": "hi"}, [1], [True]],
}
TYPE_CASES = [(path, name) for path, fields in FIELDS.items() for name in fields]


def test_the_type_table_covers_every_field():
    for path, model in MODELS.items():
        assert set(FIELDS[path]) == set(model.model_fields), path


@pytest.mark.parametrize(("path", "name"), TYPE_CASES, ids=[f"{p.strip('/')}-{n}" for p, n in TYPE_CASES])
def test_a_value_of_the_wrong_json_type_is_refused_naming_the_field(http, path, name):
    kind = FIELDS[path][name]
    for value in WRONG[kind]:
        body = {**BASE[path], name: value}
        if path == TOK and name == "messages":
            body.pop("prompt")
        r = http.post(path, json=body)
        assert r.status_code == 400, f"{name}={value!r}: {r.status_code} {r.text[:300]}"
        error = r.json()["error"]
        assert error["param"] == name, f"{name}={value!r}: {error}"
        assert name in error["message"]


@pytest.mark.parametrize("path", [CMPL, CHAT])
def test_the_issue_cases_stream_yes_and_a_decimal_max_tokens(http, path):
    error = refused(http.post(path, json={**BASE[path], "stream": "yes"}), "stream")
    assert error["message"] == "stream: expected a boolean, but got a string instead"
    error = refused(http.post(path, json={**BASE[path], "max_tokens": 1.0}), "max_tokens")
    assert error["message"] == "max_tokens: expected an integer, but got a decimal number instead"
    error = refused(http.post(path, json={**BASE[path], "temperature": True}), "temperature")
    assert error["message"] == "temperature: expected a number, but got a boolean instead"


@pytest.mark.parametrize("path", [CMPL, CHAT])
def test_an_integer_is_a_valid_number_for_float_fields(http, path):
    """What OpenAI accepts still works: ``"temperature": 1`` and every other float field given as an integer."""
    body = {**BASE[path], "temperature": 1, "top_p": 1, "presence_penalty": 0, "frequency_penalty": 1, "min_p": 0,
            "repetition_penalty": 1, "logit_bias": {"5": 1}, "max_tokens": 2, "stream": False, "seed": 3}
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text[:300]
    r = http.post(path, json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]


@pytest.mark.parametrize("key", ["5_0", " 5", "+5", "0x5", "5.0", "-5", ""])
def test_logit_bias_keys_are_decimal_token_ids_without_coercion(http, key):
    refused(http.post(CMPL, json={**BASE[CMPL], "logit_bias": {key: 1}}), "logit_bias", "decimal digits")


# ---- chat messages -----------------------------------------------------------------------------------------------


def msg(**fields: Any) -> dict[str, Any]:
    return {"role": "user", "content": "hi", **fields}


NO_CONTENT = [
    ("user-missing", {"role": "user"}, "'user' message needs 'content'"),
    ("user-null", {"role": "user", "content": None}, "'user' message needs 'content'"),
    ("system-null", {"role": "system", "content": None}, "'system' message needs 'content'"),
    ("developer-missing", {"role": "developer"}, "'developer' message needs 'content'"),
    ("assistant-null", {"role": "assistant", "content": None}, "'assistant' message needs 'content'"),
    ("assistant-null-no-tool-calls", {"role": "assistant", "content": None, "tool_calls": []}, "needs 'content'"),
    ("tool-missing", {"role": "tool", "tool_call_id": "c1"}, "'tool' message needs 'content'"),
    ("parts-empty", msg(content=[]), "empty list"),
]
BAD_MESSAGES = [
    ("tool-calls-no-function", {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
     "tool call 0: each tool call must be"),
    ("tool-calls-on-user", {"role": "user", "content": "x", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, "only an 'assistant'"),
    ("tool-without-id", {"role": "tool", "content": "x"}, "needs 'tool_call_id'"),
    ("function-call", {"role": "assistant", "content": "x", "function_call": {"name": "f", "arguments": "{}"}},
     "tool calling"),
    ("unknown-key", msg(colour="red"), "unrecognized key 'colour'"),
    ("part-unknown-key", msg(content=[{"type": "text", "text": "a", "colour": "red"}]), "unrecognized key 'colour'"),
    ("part-text-number", msg(content=[{"type": "text", "text": 5}]), "only text"),
    ("name-number", msg(name=5), "'name' must be a string"),
    ("tool-call-id-number", {"role": "tool", "content": "x", "tool_call_id": 5}, "'tool_call_id' must be a string"),
    ("refusal-bool", {"role": "assistant", "content": "x", "refusal": True}, "'refusal' must be a string"),
    ("tool-calls-string", {"role": "assistant", "content": "x", "tool_calls": ""}, "'tool_calls' must be a list"),
]


@pytest.mark.parametrize(("case", "message", "says"), NO_CONTENT + BAD_MESSAGES,
                         ids=[c for c, _, _ in NO_CONTENT + BAD_MESSAGES])
def test_a_bad_message_is_refused_naming_messages(http, case, message, says):
    conversation = [{"role": "system", "content": "be brief"}, message]
    for path, body in ((CHAT, {"messages": conversation, "max_tokens": 1}), (TOK, {"messages": conversation}),
                       (CHAT, {"messages": [USER, conversation], "max_tokens": 1})):
        error = refused(http.post(path, json=body), "messages", says)
        nested = isinstance(body["messages"][0], list)
        assert error["message"].startswith("messages: conversation 1: message 1" if nested else
                                           "messages: message 1"), error


def test_messages_as_openai_clients_send_them_are_accepted(http, server):
    """The OpenAI client sends a previous answer back with every key, most of them null; tool_calls may be empty."""
    import openai

    client = openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    messages: list[Any] = [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]
    answer = client.chat.completions.create(model=model, messages=messages, max_tokens=2).choices[0].message
    messages += [answer, {"role": "user", "content": [{"type": "text", "text": "and"}, {"type": "text", "text": "?"}],
                          "name": "bob"}]
    assert client.chat.completions.create(model=model, messages=messages, max_tokens=2).choices
    dumped = [{"role": "user", "content": "hi"}, answer.model_dump(), {"role": "user", "content": "more"}]
    assert set(dumped[1]) >= {"refusal", "tool_calls", "function_call", "annotations", "audio"}
    r = http.post(CHAT, json={"messages": dumped, "max_tokens": 1})
    assert r.status_code == 200, r.text[:300]
    r = http.post(CHAT, json={"messages": [msg(), {"role": "assistant", "content": "ok", "tool_calls": [],
                                                   "reasoning_content": "hm"}, msg()], "max_tokens": 1})
    assert r.status_code == 200, r.text[:300]


# ---- caps --------------------------------------------------------------------------------------------------------


def many_messages(count: int) -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": "x"} for i in range(count)]


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": USER, "max_tokens": 1, **fields}


def cmpl(**fields: Any) -> dict[str, Any]:
    return {"prompt": "hi", "max_tokens": 1, **fields}


# (id, path, body one past the cap, param, what the message says, a body at the cap (None: none cheap to send), the
# statuses it may get). At the cap a request passes the check: 200, or refused for a reason other than the cap.
CAPS = [
    ("stop-strings", CMPL, cmpl(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]), "stop", "at most 64 stop",
     cmpl(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS)]), {200}),
    ("stop-chars", CMPL, cmpl(stop="z" * (MAX_STOP_CHARS + 1)), "stop", "at most 1024 characters",
     cmpl(stop=["z" * MAX_STOP_CHARS]), {200}),
    ("stop-token-ids", CMPL, cmpl(stop_token_ids=[5] * (MAX_STOP_TOKEN_IDS + 1)), "stop_token_ids", "at most 1024",
     cmpl(stop_token_ids=[5] * MAX_STOP_TOKEN_IDS), {200}),
    ("allowed-token-ids", CMPL, cmpl(allowed_token_ids=[5] * (MAX_ALLOWED_TOKEN_IDS + 1)), "allowed_token_ids",
     "at most 262144", cmpl(allowed_token_ids=[5] * 1024), {200}),
    ("bad-words", CMPL, cmpl(bad_words=["w"] * (MAX_STOP_STRINGS + 1)), "bad_words", "at most 64",
     cmpl(bad_words=["w"] * MAX_STOP_STRINGS), {200}),
    ("stop-token-id-huge", CMPL, cmpl(stop_token_ids=[2**31]), "stop_token_ids", "token ids must be in",
     cmpl(stop_token_ids=[2**31 - 1]), {400}),  # within the cap, past the vocabulary
    ("logit-bias-entries", CHAT, chat(logit_bias={str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}), "logit_bias",
     "at most 1024 entries", None, None),
    ("model", CMPL, cmpl(model="m" * (MAX_MODEL_CHARS + 1)), "model", "at most 4096 characters",
     cmpl(model="m" * MAX_MODEL_CHARS), {404}),
    ("user", CHAT, chat(user="u" * (MAX_ID_CHARS + 1)), "user", "at most 256 characters",
     chat(user="u" * MAX_ID_CHARS), {200}),
    ("service-tier", CHAT, chat(service_tier="t" * (MAX_ID_CHARS + 1)), "service_tier", "at most 256",
     chat(service_tier="auto"), {200}),
    ("prompt-cache-key", CHAT, chat(prompt_cache_key="k" * (MAX_ID_CHARS + 1)), "prompt_cache_key", "at most 256",
     chat(prompt_cache_key="k" * MAX_ID_CHARS), {200}),
    ("prompt-cache-retention", CHAT, chat(prompt_cache_retention="r" * (MAX_ID_CHARS + 1)), "prompt_cache_retention",
     "at most 256", chat(prompt_cache_retention="24h"), {200}),
    ("safety-identifier", CHAT, chat(safety_identifier="s" * (MAX_ID_CHARS + 1)), "safety_identifier",
     "at most 256", chat(safety_identifier="s" * MAX_ID_CHARS), {200}),
    ("prediction-chars", CHAT, chat(prediction={"type": "content", "content": "p" * (MAX_TEXT_CHARS + 1)}),
     "prediction.content", f"at most {MAX_TEXT_CHARS}", chat(prediction={"type": "content", "content": "p"}),
     {200}),
    ("prediction-parts", CHAT, chat(prediction={"type": "content",
                                                "content": [{"type": "text", "text": "a"}] * (MAX_CONTENT_PARTS + 1)}),
     "prediction.content", "at most 4096 content parts", None, None),
    ("tool-choice", CHAT, chat(tool_choice="n" * (MAX_ID_CHARS + 1)), "tool_choice", "at most 256",
     chat(tool_choice="none"), {200}),
    ("function-call", CHAT, chat(function_call="n" * (MAX_ID_CHARS + 1)), "function_call", "at most 256",
     chat(function_call="none"), {200}),
    ("tools", CHAT, chat(tools=[{"type": "function"}] * (MAX_TOOLS + 1)), "tools", "at most 128 items", None, None),
    ("functions", CHAT, chat(functions=[{"name": "f"}] * (MAX_TOOLS + 1)), "functions", "at most 128 items",
     None, None),
    ("metadata-pairs", CHAT, chat(metadata={f"k{i}": "v" for i in range(MAX_METADATA_PAIRS + 1)}), "metadata",
     "at most 16 key-value pairs", chat(metadata={f"k{i}": "v" for i in range(MAX_METADATA_PAIRS)}), {200}),
    ("metadata-key", CHAT, chat(metadata={"k" * (MAX_METADATA_KEY_CHARS + 1): "v"}), "metadata", "at most 64",
     chat(metadata={"k" * MAX_METADATA_KEY_CHARS: "v"}), {200}),
    ("metadata-value", CHAT, chat(metadata={"k": "v" * (MAX_METADATA_VALUE_CHARS + 1)}), "metadata", "at most 512",
     chat(metadata={"k": "v" * MAX_METADATA_VALUE_CHARS}), {200}),
    ("template-kwargs", CHAT, chat(chat_template_kwargs={f"k{i}": 1 for i in range(MAX_TEMPLATE_KWARGS + 1)}),
     "chat_template_kwargs", "at most 64 entries",
     chat(chat_template_kwargs={f"k{i}": 1 for i in range(MAX_TEMPLATE_KWARGS)}), {200}),
    ("template-kwargs-key", CHAT, chat(chat_template_kwargs={"k" * (MAX_ID_CHARS + 1): 1}), "chat_template_kwargs",
     "at most 256", chat(chat_template_kwargs={"k" * MAX_ID_CHARS: 1}), {200}),
    ("response-format-key", CHAT, chat(response_format={"type": "text", "schema": {}}), "response_format.schema",
     "Unrecognized request argument supplied: response_format.schema", chat(response_format={"type": "text"}),
     {200}),
    ("function-name", CHAT, chat(tools=[{"type": "function", "function": {"name": "f" * 65}}]),
     "tools[0].function.name", "at most 64", chat(tools=[{"type": "function", "function": {"name": "f" * 64}}]),
     {200}),
    ("choices", CMPL, cmpl(structured_outputs={"choice": ["c"] * 4097}), "structured_outputs.choice",
     "at most 4096 choices", cmpl(structured_outputs={"choice": ["c"] * 4096}), {200}),
    ("regex-chars", CMPL, cmpl(guided_regex="a" * (2**20 + 1)), "guided_regex", "at most 1048576", None, None),
    ("messages", CHAT, chat(messages=many_messages(MAX_MESSAGES + 1)), "messages", "at most 16384 messages",
     None, None),
    ("content-parts", CHAT, chat(messages=[msg(content=[{"type": "text", "text": "a"}] * (MAX_CONTENT_PARTS + 1))]),
     "messages", "at most 4096 content parts",
     chat(messages=[msg(content=[{"type": "text", "text": ""}] * MAX_CONTENT_PARTS)]), {200, 400}),
    ("message-name", CHAT, chat(messages=[msg(name="n" * (MAX_ID_CHARS + 1))]), "messages", "at most 256",
     chat(messages=[msg(name="n" * MAX_ID_CHARS)]), {200}),
    ("tool-call-id", CHAT, chat(messages=[msg(), {"role": "tool", "content": "4", "tool_call_id": "i" * 257}]),
     "messages", "at most 256", None, None),
    ("content-chars", CHAT, chat(messages=[msg(content="c" * (MAX_TEXT_CHARS + 1))]), "messages",
     f"at most {MAX_TEXT_CHARS}", None, None),
    ("content-parts-chars", TOK, {"messages": [msg(content=[{"type": "text", "text": "c" * MAX_TEXT_CHARS},
                                                            {"type": "text", "text": ""}])]},
     "messages", f"at most {MAX_TEXT_CHARS}", None, None),
    ("prompt-chars", CMPL, cmpl(prompt="p" * (MAX_TEXT_CHARS + 1)), "prompt", f"at most {MAX_TEXT_CHARS}", None,
     None),
    ("prompt-list-chars", CMPL, cmpl(prompt=["a", "p" * (MAX_TEXT_CHARS + 1)]), "prompt", "prompt 1 has", None,
     None),
    ("prompt-token-ids", CMPL, cmpl(prompt=[5] * (MAX_TOKEN_IDS + 1)), "prompt", f"at most {MAX_TOKEN_IDS}", None,
     None),
    ("prompt-token-id-lists", CMPL, cmpl(prompt=[[5], [5] * (MAX_TOKEN_IDS + 1)]), "prompt", "prompt 1 has", None,
     None),
    ("suffix-chars", CMPL, cmpl(suffix="s" * (MAX_TEXT_CHARS + 1)), "suffix", f"at most {MAX_TEXT_CHARS}", None,
     None),
    ("tokenize-prompt-chars", TOK, {"prompt": "p" * (MAX_TEXT_CHARS + 1)}, "prompt", f"at most {MAX_TEXT_CHARS}",
     None, None),
    ("detokenize-tokens", DETOK, {"tokens": [5] * (MAX_TOKEN_IDS + 1)}, "tokens", f"at most {MAX_TOKEN_IDS}", None,
     None),
]


@pytest.mark.parametrize(("case", "path", "over", "param", "says", "at", "statuses"), CAPS, ids=[c[0] for c in CAPS])
def test_every_string_and_list_has_a_cap(http, case, path, over, param, says, at, statuses):
    content = json.dumps(over).encode()
    assert len(content) < BODY_LIMIT  # the cap, not the body limit, refuses it
    refused(http.post(path, content=content, headers={"Content-Type": "application/json"}), param, says)
    if at is not None:
        r = http.post(path, json=at)
        assert r.status_code in statuses, r.text[:300]
        if r.status_code != 200:
            assert says not in r.json()["error"]["message"]


def test_every_cap_is_documented():
    """Each MAX_ constant of protocol.py is named in docs/reliability.md, with its value."""
    doc = (Path(__file__).parents[1] / "docs" / "reliability.md").read_text()
    caps = {name: value for name, value in vars(protocol).items() if name.startswith("MAX_")}
    assert len(caps) >= 15
    for name, value in caps.items():
        row = next((line for line in doc.splitlines() if f"`{name}`" in line), None)
        assert row is not None, f"{name} is not in docs/reliability.md"
        assert re.search(rf"\b{value:,}\b|\b{value}\b", row), f"{name} = {value} is not in its row: {row}"


# ---- oversized bodies --------------------------------------------------------------------------------------------


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response (status, headers, body by Content-Length) off a socket, skipping 100 Continue."""
    data = b""
    while True:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"the connection closed before a whole response head: {data!r}"
            data += chunk
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if status != 100:
            break
    length = int(headers["content-length"])
    while len(data) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed before the whole response body"
        data += chunk
    return status, headers, data[:length]


def request_head(path: str, length: int | None, expect: bool = False) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: localhost", "Content-Type: application/json"]
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    if expect:
        lines.append("Expect: 100-continue")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def big_body(size: int) -> bytes:
    return b'{"prompt": "' + b"a" * size + b'", "max_tokens": 1}'


def chunked(body: bytes, piece: int = 256 * 1024) -> bytes:
    out = [b"%x\r\n%s\r\n" % (len(body[i:i + piece]), body[i:i + piece]) for i in range(0, len(body), piece)]
    return b"".join(out) + b"0\r\n\r\n"


def assert_413(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 413, body[:300]
    assert headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "request_too_large" and "too large" in error["message"]


def send_whole_then_read(port: int, path: str, body: bytes, chunk_it: bool) -> tuple[int, dict[str, str], bytes]:
    """What a plain client does: send the whole request, then read the answer. Fails on a connection reset."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(request_head(path, None if chunk_it else len(body)) + (chunked(body) if chunk_it else body))
        return read_response(sock)


def expect_continue(port: int, path: str, size: int) -> tuple[int, dict[str, str], bytes, bytes]:
    """Send only the head with Expect: 100-continue and a Content-Length of ``size``; return the answer and what
    the server sent after it before closing."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request_head(path, size, expect=True))
        first = sock.recv(12)
        assert first.startswith(b"HTTP/1.1 4"), f"the server asked for the body: {first!r}"
        status, headers, body = read_response(_Prefixed(sock, first))
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
        return status, headers, body, rest


class _Prefixed:
    """A socket whose first ``recv`` returns bytes already read."""

    def __init__(self, sock: socket.socket, prefix: bytes) -> None:
        self.sock, self.prefix = sock, prefix

    def recv(self, size: int) -> bytes:
        if self.prefix:
            data, self.prefix = self.prefix, b""
            return data
        return self.sock.recv(size)


OVER = BODY_LIMIT + 8 * 2**20  # over this module's server limit, within what the server reads and throws away


@pytest.mark.parametrize("chunk_it", [False, True], ids=["content-length", "chunked"])
def test_a_plain_client_reads_the_413_of_an_oversized_body(server, chunk_it):
    status, headers, body = send_whole_then_read(server.port, CMPL, big_body(OVER), chunk_it)
    assert_413(status, headers, body)
    assert httpx.get(server.url("/health")).status_code == 200


def test_http_client_and_httpx_read_the_413(server):
    payload = big_body(OVER)
    conn = HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", CHAT, body=payload, headers={"Content-Type": "application/json"})
    answer = conn.getresponse()
    assert answer.status == 413
    assert json.loads(answer.read())["error"]["code"] == "request_too_large"
    conn.close()
    r = httpx.post(server.url(TOK), content=payload, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_expect_100_continue_over_the_limit_is_answered_before_the_body(server):
    status, headers, body, rest = expect_continue(server.port, CMPL, 10 * BODY_LIMIT)
    assert_413(status, headers, body)
    assert headers["connection"] == "close" and rest == b""
    # within the limit the server asks for the body and answers as usual
    payload = json.dumps(BASE[TOK]).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(request_head(TOK, len(payload), expect=True))
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(payload)
        status, _, body = read_response(sock)
        assert status == 200 and json.loads(body)["count"] >= 1


def test_a_body_declared_past_what_the_server_would_discard_is_answered_at_once(server):
    """Content-Length past the discard bound: the 413 comes without waiting for the body (nothing is sent)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request_head(CMPL, BODY_LIMIT + DISCARD_MAX_BYTES + 1))
        started = time.monotonic()
        assert_413(*read_response(sock))
        assert time.monotonic() - started < 10


# The same guard under uvicorn's two HTTP implementations, in front of a tiny app, with a 1 MiB limit.

SMALL_LIMIT = 2**20


async def _echo_size(scope, receive, send) -> None:
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = json.dumps({"size": size}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module", params=["httptools", "h11"])
def guarded(request):
    app = GuardMiddleware(_echo_size, SimpleNamespace(api_keys=[]), ServerGuards(max_body_bytes=SMALL_LIMIT))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, http=request.param, lifespan="off",
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield server.servers[0].sockets[0].getsockname()[1]
    server.should_exit = True
    thread.join(30)


@pytest.mark.parametrize("chunk_it", [False, True], ids=["content-length", "chunked"])
def test_both_http_implementations_let_a_plain_client_read_the_413(guarded, chunk_it):
    for size in (SMALL_LIMIT + 1, 20 * SMALL_LIMIT):
        assert_413(*send_whole_then_read(guarded, "/echo", b"x" * size, chunk_it))
    status, _, body = send_whole_then_read(guarded, "/echo", b"x" * SMALL_LIMIT, chunk_it)
    assert status == 200 and json.loads(body) == {"size": SMALL_LIMIT}


def test_both_http_implementations_answer_expect_100_continue_before_the_body(guarded):
    status, headers, body, rest = expect_continue(guarded, "/echo", 10 * SMALL_LIMIT)
    assert_413(status, headers, body)
    assert rest == b""


def test_current_openai_fields_are_accepted_or_refused_by_name(http):
    """Fields that today's OpenAI SDKs and agent frameworks send: hints are accepted (and change nothing here),
    output this server cannot make is a 400 naming the field, never an "Unrecognized request argument"."""
    accepted = chat(n=None, reasoning_effort="low", verbosity="low", prompt_cache_key="conversation-17",
                    prompt_cache_retention="in-memory", safety_identifier="user-hash", modalities=["text"],
                    prediction={"type": "content", "content": "Paris"}, audio=None, web_search_options=None,
                    store=False, metadata={"k": "v"}, temperature=0, max_tokens=4, ignore_eos=True)
    r = http.post(CHAT, json=accepted)
    assert r.status_code == 200, r.text[:300]
    plain = http.post(CHAT, json=chat(temperature=0, max_tokens=4, ignore_eos=True)).json()
    assert r.json()["choices"][0]["message"] == plain["choices"][0]["message"]  # n null: one choice, the same one
    assert http.post(CMPL, json=cmpl(n=None)).status_code == 200
    refused(http.post(CHAT, json=chat(modalities=["text", "audio"])), "modalities", "audio output is not supported")
    refused(http.post(CHAT, json=chat(audio={"voice": "alloy", "format": "wav"})), "audio", "not available")
    refused(http.post(CHAT, json=chat(web_search_options={})), "web_search_options", "not available")
    refused(http.post(CHAT, json=chat(verbosity="loud")), "verbosity")
    refused(http.post(CHAT, json=chat(reasoning_effort="bogus")), "reasoning_effort")
    streamed = http.post(CHAT, json=chat(stream=True, stream_options={"include_usage": True,
                                                                      "include_obfuscation": False}))
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    refused(http.post(CHAT, json=chat(prediction={"type": "text", "content": "x"})), "prediction.type")
