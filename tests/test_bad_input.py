"""Malformed and hostile requests against a real server, table-driven: every one gets a 4xx in the OpenAI error
shape with a message that names the problem, and afterwards the server is healthy and answers a valid request.

The server runs with its default limits (body size, prompts per request, ``n``, sequences per request) and a small
context (256 tokens), so that the table also shows what the defaults refuse.
"""

from __future__ import annotations

import gzip
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from inferneo.testing.server import RemoteServer

CONTEXT = 256
VOCAB = 384  # the tiny checkpoint's vocabulary
CMPL, CHAT, TOK, DETOK = "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"
USER = [{"role": "user", "content": "hi"}]


@dataclass
class Case:
    """One bad request: ``body`` is sent as JSON unless ``raw`` (bytes) is given."""

    id: str
    path: str
    body: Any = None
    status: int = 400
    says: str = ""
    raw: bytes | None = None
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


def nested_dict(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def cmpl(**fields: Any) -> dict[str, Any]:
    return {"prompt": "hello", "max_tokens": 2, **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": USER, "max_tokens": 2, **fields}


CASES = [
    # ---- the body itself -------------------------------------------------------------------------------------
    Case("truncated-json", CMPL, raw=b'{"prompt": "hi",', says="not valid JSON"),
    Case("trailing-garbage", CMPL, raw=b'{"prompt": "hi"} x', says="not valid JSON"),
    Case("single-quotes", CHAT, raw=b"{'messages': []}", says="not valid JSON"),
    Case("empty-body", CMPL, raw=b"", says="body is empty"),
    Case("whitespace-body", CHAT, raw=b"  \n ", says="body is empty"),
    Case("json-array-body", CMPL, body=[1, 2], says="object"),
    Case("json-null-body", CHAT, body=None, raw=b"null", says="object"),
    Case("json-string-body", TOK, raw=b'"hello"', says="object"),
    Case("invalid-utf8", CMPL, raw=b'{"prompt": "\xff\xfe oops", "max_tokens": 2}', says="UTF-8"),
    Case("invalid-utf8-chat", CHAT, raw=b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}', says="UTF-8"),
    Case("lone-surrogate", CMPL, raw=b'{"prompt": "a \\ud800 b", "max_tokens": 2}', says="surrogate"),
    Case("lone-surrogate-chat", CHAT, raw=b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
         says="surrogate"),
    Case("temperature-past-float32", CMPL, body=cmpl(temperature=1e39), says="temperature must be in [0, 1e+30]"),
    Case("repetition-penalty-underflow", CMPL, body=cmpl(repetition_penalty=1e-300), says="repetition_penalty"),
    Case("chat-repetition-penalty-zero", CHAT, body=chat(repetition_penalty=0), says="repetition_penalty"),
    Case("continue-without-assistant", CHAT, body=chat(continue_final_message=True, add_generation_prompt=False),
         says="continue_final_message needs the last message"),
    Case("nan-temperature", CMPL, raw=b'{"prompt": "hi", "max_tokens": 2, "temperature": NaN}', says="temperature"),
    Case("infinite-top-p", CMPL, raw=b'{"prompt": "hi", "max_tokens": 2, "top_p": Infinity}', says="top_p"),
    Case("infinite-temperature", CHAT,
         raw=b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', says="temperature"),
    Case("deep-nesting-list", CMPL, raw=b'{"prompt": ' + b"[" * 5000 + b'"x"' + b"]" * 5000 + b"}",
         says="nested too deeply"),
    Case("deep-nesting-100", CMPL, body=cmpl(prompt=nested(100)), says="nested too deeply"),
    Case("deep-nesting-dict", CHAT, body=chat(chat_template_kwargs=nested_dict(100)), says="nested too deeply"),
    Case("deep-nesting-metadata", CHAT, body=chat(metadata=nested_dict(40)), says="nested too deeply"),
    # JSON sent as a string inside a field: json.loads recurses, and a deep schema is slow to compile
    Case("deep-json-string-guided", CMPL, body=cmpl(guided_json="[" * 3000), says="nested too deeply"),
    Case("deep-json-string-schema", CHAT, body=chat(structured_outputs={"json": json.dumps(nested_dict(40))}),
         says="structured_outputs.json is nested too deeply"),
    Case("deep-json-string-tag", CMPL, body=cmpl(structured_outputs={"structural_tag": '{"a": ' * 3000}),
         says="nested too deeply"),
    Case("form-content-type", CMPL, body=cmpl(), status=415, headers={"Content-Type": "application/x-www-form-urlencoded"},
         says="Content-Type is application/x-www-form-urlencoded"),
    Case("text-content-type", CHAT, body=chat(), status=415, headers={"Content-Type": "text/plain; charset=utf-8"},
         says="Content-Type: application/json"),
    Case("body-10mb", CMPL, body=cmpl(prompt="a" * 10_000_000), status=413, says="too large"),
    # a compressed body is refused for what it is, not as invalid UTF-8 or JSON
    Case("gzip-body", CMPL, raw=gzip.compress(json.dumps(cmpl()).encode()), status=415,
         headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}, says="encoded (gzip)"),
    Case("deflate-header-plain-body", CHAT, body=chat(), status=415, headers={"Content-Encoding": "deflate"},
         says="without Content-Encoding"),
    # ---- completions: prompt ---------------------------------------------------------------------------------
    Case("prompt-missing", CMPL, body={"max_tokens": 2}, says="prompt"),
    Case("prompt-number", CMPL, body=cmpl(prompt=123), says="prompt"),
    Case("prompt-object", CMPL, body=cmpl(prompt={"text": "hi"}), says="prompt"),
    Case("prompt-empty-list", CMPL, body=cmpl(prompt=[]), says="prompt"),
    Case("prompt-empty-token-list", CMPL, body=cmpl(prompt=[[]]), says="prompt"),
    Case("prompt-mixed-list", CMPL, body=cmpl(prompt=["a", 1]), says="prompt"),
    Case("prompt-bools", CMPL, body=cmpl(prompt=[True, False]), says="prompt"),
    Case("prompt-float-ids", CMPL, body=cmpl(prompt=[1.5, 2.0]), says="prompt"),
    Case("prompt-negative-id", CMPL, body=cmpl(prompt=[5, -1]), says="prompt"),
    Case("prompt-id-past-vocab", CMPL, body=cmpl(prompt=[5, VOCAB]), says=f"[0, {VOCAB})"),
    Case("prompt-huge-id", CMPL, body=cmpl(prompt=[[3], [10**30]]), says=f"[0, {VOCAB})"),
    Case("prompt-empty-string", CMPL, body=cmpl(prompt=""), says="empty"),
    Case("prompt-too-long", CMPL, body=cmpl(prompt="hello " * 2000), says="context length"),
    Case("prompt-ids-too-long", CMPL, body=cmpl(prompt=[7] * CONTEXT), says="context length"),
    Case("prompts-10000", CMPL, body=cmpl(prompt=[f"p{i}" for i in range(10_000)]), says="10000 prompts"),
    Case("prompts-300-token-lists", CMPL, body=cmpl(prompt=[[5, 6]] * 300), says="300 prompts"),
    # ---- completions: numbers out of range -------------------------------------------------------------------
    Case("max-tokens-zero", CMPL, body=cmpl(max_tokens=0), says="max_tokens"),
    Case("max-tokens-negative", CMPL, body=cmpl(max_tokens=-5), says="max_tokens"),
    Case("max-tokens-string", CMPL, body=cmpl(max_tokens="ten"), says="max_tokens"),
    Case("max-tokens-fraction", CMPL, body=cmpl(max_tokens=1.5), says="max_tokens"),
    Case("max-tokens-huge", CMPL, body=cmpl(max_tokens=10**12), says="context length"),
    Case("max-tokens-past-context", CMPL, body=cmpl(max_tokens=CONTEXT + 1), says="context length"),
    Case("n-zero", CMPL, body=cmpl(n=0), says="n"),
    Case("n-negative", CMPL, body=cmpl(n=-3), says="n"),
    Case("n-huge", CMPL, body=cmpl(n=10**6), says="n: 1000000"),
    Case("n-string", CMPL, body=cmpl(n="two"), says="n"),
    Case("n-times-prompts", CMPL, body=cmpl(prompt=["a"] * 100, n=20), says="2000 sequences"),
    Case("logprobs-21", CMPL, body=cmpl(logprobs=21), says="logprobs"),
    Case("logprobs-negative", CMPL, body=cmpl(logprobs=-1), says="logprobs"),
    Case("logprobs-huge", CMPL, body=cmpl(logprobs=10**9), says="logprobs"),
    Case("temperature-negative", CMPL, body=cmpl(temperature=-1), says="temperature"),
    Case("temperature-string", CMPL, body=cmpl(temperature="hot"), says="temperature"),
    Case("top-p-zero", CMPL, body=cmpl(top_p=0), says="top_p"),
    Case("top-p-above-one", CMPL, body=cmpl(top_p=1.5), says="top_p"),
    Case("top-k-below-minus-one", CMPL, body=cmpl(top_k=-2), says="top_k"),
    Case("min-p-above-one", CMPL, body=cmpl(min_p=2), says="min_p"),
    Case("repetition-penalty-zero", CMPL, body=cmpl(repetition_penalty=0), says="repetition_penalty"),
    Case("presence-penalty-3", CMPL, body=cmpl(presence_penalty=3), says="presence_penalty"),
    Case("frequency-penalty-minus-3", CMPL, body=cmpl(frequency_penalty=-3), says="frequency_penalty"),
    Case("seed-too-big", CMPL, body=cmpl(seed=2**64), says="seed"),
    Case("seed-string", CMPL, body=cmpl(seed="lucky"), says="seed"),
    Case("min-tokens-negative", CMPL, body=cmpl(min_tokens=-1), says="min_tokens"),
    Case("priority-string", CMPL, body=cmpl(priority="high"), says="priority"),
    # ---- completions: wrong types and unsupported fields -----------------------------------------------------
    Case("stop-number", CMPL, body=cmpl(stop=123), says="stop"),
    Case("stop-list-of-numbers", CMPL, body=cmpl(stop=[1, 2]), says="stop"),
    Case("stop-too-many", CMPL, body=cmpl(stop=[f"s{i}" for i in range(1000)]), says="stop"),
    Case("stop-token-ids-strings", CMPL, body=cmpl(stop_token_ids=["a"]), says="stop_token_ids"),
    Case("stop-token-ids-negative", CMPL, body=cmpl(stop_token_ids=[-1]), says="stop_token_ids"),
    Case("stream-number", CMPL, body=cmpl(stream=5), says="stream"),
    Case("model-number", CMPL, body=cmpl(model=123), says="model"),
    Case("unknown-model", CMPL, body=cmpl(model="gpt-9"), status=404, says="gpt-9"),
    Case("unknown-field", CMPL, body=cmpl(max_tokenz=3), says="max_tokenz"),
    Case("unknown-nested-field", CMPL, body=cmpl(stream=True, stream_options={"usage": True}), says="usage"),
    Case("suffix", CMPL, body=cmpl(suffix="end"), says="suffix"),
    Case("logit-bias-key-not-an-id", CMPL, body=cmpl(logit_bias={"five": 10}), says="logit_bias"),
    Case("logit-bias-negative-id", CMPL, body=cmpl(logit_bias={"-5": 10}), says="logit_bias"),
    Case("logit-bias-above-100", CMPL, body=cmpl(logit_bias={"5": 101}), says="logit_bias"),
    Case("logit-bias-past-vocabulary", CMPL, body=cmpl(logit_bias={"1000000": 5}), says="vocabulary size"),
    Case("stop-token-ids-past-vocabulary", CMPL, body=cmpl(stop_token_ids=[5, 1000000]), says="vocabulary size"),
    Case("logit-bias-not-a-number", CMPL, body=cmpl(logit_bias={"5": "a lot"}), says="logit_bias"),
    Case("best-of-not-n", CMPL, body=cmpl(best_of=3), says="best_of"),
    # ---- completions: scoring (prompt log-probabilities) ------------------------------------------------------
    Case("max-tokens-zero-without-echo", CMPL, body=cmpl(max_tokens=0), says="max_tokens"),
    Case("max-tokens-negative-with-echo", CMPL, body=cmpl(max_tokens=-1, echo=True), says="max_tokens"),
    Case("prompt-logprobs-with-stream", CMPL, body=cmpl(prompt_logprobs=1, stream=True), says="prompt_logprobs"),
    Case("prompt-logprobs-string", CMPL, body=cmpl(prompt_logprobs="1"), says="prompt_logprobs"),
    Case("prompt-logprobs-above-20", CMPL, body=cmpl(prompt_logprobs=21), says="prompt_logprobs"),
    Case("prompt-logprobs-negative", CMPL, body=cmpl(prompt_logprobs=-1), says="prompt_logprobs"),
    Case("stream-echo-logprobs-n2", CMPL, body=cmpl(echo=True, logprobs=1, stream=True, n=2), says="n"),
    Case("echo-on-chat", CHAT, body=chat(echo=True), says="echo"),
    Case("prompt-logprobs-streamed-chat", CHAT, body=chat(prompt_logprobs=1, stream=True), says="prompt_logprobs"),
    Case("stream-options-without-stream", CMPL, body=cmpl(stream_options={"include_usage": True}),
         says="stream_options"),
    Case("get-completions", CMPL, method="GET", status=405, says="method GET"),
    # ---- no coercion between strings, numbers and booleans (issue 17) ----------------------------------------
    Case("stream-yes", CMPL, body=cmpl(stream="yes"), says="stream: expected a boolean, but got a string"),
    Case("stream-one", CMPL, body=cmpl(stream=1), says="stream: expected a boolean, but got an integer"),
    Case("max-tokens-whole-decimal", CMPL, body=cmpl(max_tokens=2.0), says="max_tokens: expected an integer"),
    Case("n-numeric-string", CMPL, body=cmpl(n="2"), says="n: expected an integer, but got a string"),
    Case("temperature-bool", CMPL, body=cmpl(temperature=True), says="temperature: expected a number"),
    Case("temperature-numeric-string", CMPL, body=cmpl(temperature="0.5"), says="temperature: expected a number"),
    Case("echo-number", CMPL, body=cmpl(echo=1), says="echo: expected a boolean"),
    Case("user-number", CMPL, body=cmpl(user=5), says="user: expected a string"),
    Case("logit-bias-underscore-key", CMPL, body=cmpl(logit_bias={"5_0": 1}), says="decimal digits"),
    Case("stop-string-too-long", CMPL, body=cmpl(stop="z" * 2000), says="at most 1024 characters"),
    # ---- chat ------------------------------------------------------------------------------------------------
    Case("messages-missing", CHAT, body={"max_tokens": 2}, says="messages"),
    Case("messages-empty", CHAT, body=chat(messages=[]), says="messages"),
    Case("messages-string", CHAT, body=chat(messages="hi"), says="messages"),
    Case("message-not-object", CHAT, body=chat(messages=["hi"]), says="message 0"),
    Case("role-missing", CHAT, body=chat(messages=[{"content": "hi"}]), says="role"),
    Case("role-number", CHAT, body=chat(messages=[{"role": 7, "content": "hi"}]), says="role"),
    Case("role-unknown", CHAT, body=chat(messages=[{"role": "wizard", "content": "hi"}]), says="wizard"),
    Case("role-empty", CHAT, body=chat(messages=[{"role": "", "content": "hi"}]), says="role"),
    Case("content-number", CHAT, body=chat(messages=[{"role": "user", "content": 3}]), says="content"),
    Case("content-image", CHAT, body=chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), says="takes text only"),
    Case("second-conversation-bad", CHAT, body=chat(messages=[USER, [{"role": "user"}, 5]]), says="conversation 1"),
    Case("conversation-empty", CHAT, body=chat(messages=[USER, []]), says="conversation 1"),
    Case("conversations-300", CHAT, body=chat(messages=[USER] * 300), says="300 conversations"),
    Case("chat-prompt-too-long", CHAT, body=chat(messages=[{"role": "user", "content": "hello " * 2000}]),
         says="context length"),
    Case("chat-n-huge", CHAT, body=chat(n=500), says="n: 500"),
    Case("chat-logprobs-number", CHAT, body=chat(logprobs=5), says="logprobs"),
    Case("chat-top-logprobs-21", CHAT, body=chat(logprobs=True, top_logprobs=21), says="top_logprobs"),
    Case("chat-top-logprobs-alone", CHAT, body=chat(top_logprobs=2), says="top_logprobs"),
    Case("chat-tool-without-name", CHAT, body=chat(tools=[{"type": "function", "function": {}}]),
         says="tools[0].function.name"),
    Case("chat-response-format-xml", CHAT, body=chat(response_format={"type": "xml"}), says="response_format"),
    Case("chat-max-completion-tokens-zero", CHAT, body=chat(max_completion_tokens=0),
         says="max_completion_tokens"),
    Case("chat-max-completion-tokens-huge", CHAT, body=chat(max_completion_tokens=10**9), says="context length"),
    Case("chat-template-kwargs-string", CHAT, body=chat(chat_template_kwargs="x"), says="chat_template_kwargs"),
    Case("chat-unknown-field", CHAT, body=chat(temprature=0.5), says="temprature"),
    Case("chat-stream-yes", CHAT, body=chat(stream="yes"), says="stream: expected a boolean, but got a string"),
    Case("chat-logprobs-string", CHAT, body=chat(logprobs="true"), says="logprobs: expected a boolean"),
    Case("user-message-without-content", CHAT, body=chat(messages=[{"role": "user"}]),
         says="'user' message needs 'content'"),
    Case("user-message-null-content", CHAT, body=chat(messages=[{"role": "user", "content": None}]),
         says="'user' message needs 'content'"),
    Case("system-message-null-content", CHAT, body=chat(messages=[{"role": "system", "content": None}, *USER]),
         says="'system' message needs 'content'"),
    Case("assistant-tool-calls", CHAT, body=chat(messages=[*USER, {"role": "assistant", "content": None,
                                                                   "tool_calls": [{"id": "1"}]}]),
         says="each tool call must be"),
    Case("message-unknown-key", CHAT, body=chat(messages=[{"role": "user", "content": "x", "colour": "red"}]),
         says="unrecognized key 'colour'"),
    Case("messages-20000", CHAT, body=chat(messages=USER * 20_000), says="at most 16384 messages"),
    Case("metadata-number-value", CHAT, body=chat(metadata={"k": 1}), says="metadata.k: expected a string"),
    # ---- tokenize, detokenize, models, routes ----------------------------------------------------------------
    Case("tokenize-neither", TOK, body={}, says="exactly one"),
    Case("tokenize-both", TOK, body={"prompt": "a", "messages": USER}, says="exactly one"),
    Case("tokenize-prompt-number", TOK, body={"prompt": 5}, says="prompt"),
    Case("tokenize-bad-role", TOK, body={"messages": [{"role": "robot", "content": "x"}]}, says="robot"),
    Case("tokenize-unknown-field", TOK, body={"prompt": "a", "foo": 1}, says="foo"),
    Case("tokenize-flag-string", TOK, body={"prompt": "a", "add_special_tokens": "no"}, says="add_special_tokens"),
    Case("tokenize-message-without-content", TOK, body={"messages": [{"role": "user"}]}, says="needs 'content'"),
    Case("detokenize-missing", DETOK, body={}, says="tokens"),
    Case("detokenize-negative", DETOK, body={"tokens": [1, -1]}, says=f"[0, {VOCAB})"),
    Case("detokenize-past-vocab", DETOK, body={"tokens": [10**6]}, says=f"[0, {VOCAB})"),
    Case("detokenize-strings", DETOK, body={"tokens": ["a"]}, says="tokens"),
    Case("model-unknown", "/v1/models/nope", method="GET", status=404, says="nope"),
    Case("models-post", "/v1/models", body={}, status=405, says="method POST"),
    Case("route-unknown", "/v1/audio/speech", body={"input": "x"}, status=404, says="/v1/audio/speech"),
]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with RemoteServer(tiny_llama_dir, "--max-model-len", str(CONTEXT), "--kv-cache-memory", "32MiB",
                      "--num-threads", "1", "--disable-access-log") as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


def send(http: httpx.Client, case: Case) -> httpx.Response:
    if case.method == "GET":
        return http.get(case.path, headers=case.headers)
    content = case.raw if case.raw is not None else json.dumps(case.body).encode()
    return http.request(case.method, case.path, content=content,
                        headers={"Content-Type": "application/json", **case.headers})


def test_the_table_is_large_and_names_unique():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_request_gets_a_4xx_that_names_the_problem(http, case):
    r = send(http, case)
    assert r.status_code == case.status, r.text[:500]
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and isinstance(error["type"], str)
    assert case.says in error["message"], error
    assert not error["message"].startswith("Value error"), error  # pydantic's prefix is not the client's business
    assert len(error["message"]) < 1000  # a hostile body is not echoed back whole


def test_server_stays_healthy_and_answers_a_valid_request(http):
    """Runs after the table: nothing it sent hurt the server."""
    assert http.get("/health").status_code == 200
    head = http.head("/health")
    assert head.status_code == 200 and head.content == b"", head
    # ignore_eos: sampled at the default temperature, the tiny random model may otherwise end on EOS early
    r = http.post(CMPL, json={"prompt": "hello", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    r = http.post(CHAT, json={"messages": USER, "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert http.get("/health").status_code == 200


def test_limits_leave_room_for_large_valid_requests(http):
    """Just inside the defaults: 256 prompts in one call, and n x prompts = 1024 sequences."""
    r = http.post(CMPL, json={"prompt": [[5, 6, 7]] * 256, "max_tokens": 1})
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["choices"]) == 256
    r = http.post(CMPL, json={"prompt": [[5, 6]] * 8, "n": 128, "max_tokens": 1, "temperature": 1})
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["choices"]) == 1024


def test_a_body_sent_in_chunks_is_limited_too(http):
    """No Content-Length (chunked transfer): the server counts what arrives and stops at the limit."""

    def chunks():
        yield b'{"prompt": "'
        for _ in range(5):
            yield b"a" * 1_000_000
        yield b'", "max_tokens": 1}'

    r = http.post(CMPL, content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    assert "too large" in r.json()["error"]["message"]
    assert http.get("/health").status_code == 200


def test_json_text_inside_fields(http):
    """A tool call's ``arguments`` nested too deeply for ``json.loads`` reach the chat template as text (200, the
    connection kept), and values at the edge of the sampler's bounds still sample inside a constraint."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[" * 3000}}
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]}, *USER]
    r = http.post(TOK, json={"messages": messages})
    assert r.status_code == 200, r.text[:300]  # was a 500 (RecursionError) that also dropped the connection
    r = http.post(CHAT, json={"messages": messages[:2] + [{"role": "tool", "tool_call_id": "c1", "content": "1"}],
                              "max_tokens": 2})
    assert r.status_code == 200, r.text[:300]
    for extreme in ({"temperature": 1e30}, {"temperature": 0, "repetition_penalty": 1e-30},
                    {"temperature": 1, "repetition_penalty": 1e30}):
        r = http.post(CMPL, json={"prompt": "yes or no?", "max_tokens": 4, "seed": 1, **extreme,
                                  "structured_outputs": {"choice": ["yes", "no"]}})
        assert r.status_code == 200, r.text[:300]
        assert r.json()["choices"][0]["text"] in ("yes", "no"), (extreme, r.json())


def test_an_idle_connection_outlives_the_clients_keepalive(server):
    """The server keeps an idle connection open past the 5 s after which httpx (the openai package, InferneoClient)
    stops reusing one, so a client never sends on a connection the server is closing at that moment."""
    host, port = server.base_url.removeprefix("http://").split(":")
    request = f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(request)
        assert conn.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(6)
        conn.sendall(request)
        assert conn.recv(4096).startswith(b"HTTP/1.1 200")  # b"" had the server closed it
