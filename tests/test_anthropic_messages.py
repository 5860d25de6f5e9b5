"""Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``) over real HTTP: a real
``inferneo serve`` of the tiny random model with the Hermes-style template and an API key, driven by the unmodified
``anthropic`` package, and checked against the chat endpoint's answers to the same conversations (greedy, so they
must be equal)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import anthropic
import httpx
import jsonschema
import openai
import pytest
from test_structured_server import TIME, WEATHER

from inferneo.entrypoints.openai.guards import GuardMiddleware, ServerGuards
from inferneo.entrypoints.openai.request_log import shorten_prompts
from inferneo.testing.server import RemoteServer

KEY = "sk-anthropic-test"
QUESTION = "What is the weather in Paris?"
# Greedy: the newest SDK no longer names the sampling settings (Anthropic's latest models fix them), so they go in
# extra_body; older SDKs and Claude Code send them as fields, which the server takes.
GREEDY = {"temperature": 0}
WEATHER_TOOL = {"name": WEATHER["function"]["name"], "description": WEATHER["function"]["description"],
                "input_schema": WEATHER["function"]["parameters"]}
TIME_TOOL = {"name": TIME["function"]["name"], "input_schema": TIME["function"]["parameters"]}


@pytest.fixture(scope="module")
def server(hermes_model_dir):
    with RemoteServer(hermes_model_dir, "--served-model-name", "tiny", "--api-key", KEY, "--kv-cache-memory",
                      "32MiB", "--num-threads", "1", "--disable-access-log") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def chat_client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key=KEY, max_retries=0, timeout=120)


def chat_answer(chat_client, messages, **kwargs):
    return chat_client.chat.completions.create(model="tiny", messages=messages, temperature=0, **kwargs)


def text_of(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def prompt_tokens(usage) -> int:
    """The prompt's tokens in Anthropic's usage: those computed plus those read from the prefix cache."""
    return usage.input_tokens + (usage.cache_read_input_tokens or 0) + (usage.cache_creation_input_tokens or 0)


def test_a_message_is_the_chat_answer_to_the_same_conversation(client, chat_client):
    """The system prompt is the chat's system message (given as a string, as text blocks or as a system message);
    the text, the token counts and the stop are the chat endpoint's."""
    message = client.messages.create(model="tiny", max_tokens=12, extra_body=GREEDY, system="Be brief.",
                                     messages=[{"role": "user", "content": QUESTION}])
    chat = chat_answer(chat_client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}],
                       max_tokens=12)
    assert message.type == "message" and message.role == "assistant" and message.model == "tiny"
    assert message.id.startswith("msg_")
    assert text_of(message) == chat.choices[0].message.content
    assert prompt_tokens(message.usage) == chat.usage.prompt_tokens
    assert message.usage.output_tokens == chat.usage.completion_tokens
    assert message.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[chat.choices[0].finish_reason]
    assert message.stop_sequence is None
    # (Claude Code's billing block, which changes with every request, is left out of the prompt)
    blocks = client.messages.create(model="tiny", max_tokens=12, extra_body=GREEDY,
                                    system=[{"type": "text", "text": "x-anthropic-billing-header: cch=12ab;"},
                                            {"type": "text", "text": "Be brief."}],
                                    messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}])
    assert text_of(blocks) == text_of(message) and prompt_tokens(blocks.usage) == prompt_tokens(message.usage)
    in_messages = client.messages.create(model="tiny", max_tokens=12, extra_body=GREEDY,  # a system message
                                         messages=[{"role": "user", "content": QUESTION},
                                                   {"role": "system", "content": "Be brief."}])
    assert text_of(in_messages) == text_of(message)
    unprompted = client.messages.create(model="tiny", max_tokens=1, messages=[{"role": "user", "content": QUESTION}])
    assert prompt_tokens(unprompted.usage) < prompt_tokens(message.usage)  # the system prompt is in the prompt


def test_stop_sequences_and_max_tokens_stop_the_answer(client, chat_client):
    messages = [{"role": "user", "content": QUESTION}]
    cut = client.messages.create(model="tiny", max_tokens=6, extra_body=GREEDY, messages=messages)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 6
    answer = text_of(cut)
    stop = next(answer[i:i + 2] for i in range(1, len(answer) - 1) if answer[i:i + 2].strip())
    stopped = client.messages.create(model="tiny", max_tokens=6, extra_body=GREEDY, messages=messages,
                                     stop_sequences=["never in this answer", stop])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert text_of(stopped) == answer[:answer.index(stop)]
    assert text_of(stopped) == chat_answer(chat_client, messages, max_tokens=6, stop=[stop]).choices[0].message.content


def test_the_stream_is_anthropics_event_sequence(client, server):
    """``event:`` lines name each event's type; message_start and ping first, then the text block, then
    message_delta and message_stop; the events reassemble (as the SDK accumulates them) into the whole message.
    (The SDK's stream passes on no ping.)"""
    kwargs = dict(model="tiny", max_tokens=10, extra_body=GREEDY, system="Be brief.",
                  messages=[{"role": "user", "content": QUESTION}])
    body = {key: value for key, value in kwargs.items() if key != "extra_body"}
    whole = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        kinds = [event.type for event in stream if event.type not in ("text",)]
        final = stream.get_final_message()
    assert text_of(final) == text_of(whole) and final.stop_reason == whole.stop_reason
    assert prompt_tokens(final.usage) == prompt_tokens(whole.usage)
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[1:-2] == ["content_block_start"] + ["content_block_delta"] * (len(kinds) - 5) + ["content_block_stop"]
    with httpx.stream("POST", server.url("/v1/messages"), json={**body, **GREEDY, "stream": True},
                      headers={"x-api-key": KEY}, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [block.split("\n") for block in raw.strip().split("\n\n")]
    assert all(len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: ") for lines in events)
    assert [json.loads(data[6:])["type"] for _, data in events] == [name[7:] for name, _ in events]
    names = [name[7:] for name, _ in events]  # (the engine's pieces, so the number of deltas, may differ)
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert "[DONE]" not in raw
    texts = [json.loads(data[6:])["delta"]["text"] for name, data in events if name == "event: content_block_delta"]
    assert "".join(texts) == text_of(whole)


def test_a_forced_tool_is_a_tool_use_block_whose_input_fits_the_schema(client):
    kwargs = dict(model="tiny", max_tokens=128, extra_body=GREEDY, messages=[{"role": "user", "content": QUESTION}],
                  tools=[WEATHER_TOOL], tool_choice={"type": "tool", "name": "get_weather"})
    message = client.messages.create(**kwargs)
    (block,) = message.content
    assert block.type == "tool_use" and block.name == "get_weather" and block.id.startswith("toolu_")
    jsonschema.validate(block.input, WEATHER_TOOL["input_schema"])
    assert message.stop_reason == "tool_use"
    with client.messages.stream(**kwargs) as stream:
        kinds = {event.type for event in stream}
        final = stream.get_final_message()
    assert "input_json" in kinds  # the SDK's event for an input_json_delta
    (streamed,) = final.content
    assert streamed.type == "tool_use" and streamed.input == block.input and final.stop_reason == "tool_use"
    any_tool = client.messages.create(**{**kwargs, "tool_choice": {"type": "any", "disable_parallel_tool_use": True}})
    assert [b.type for b in any_tool.content] == ["tool_use"] and any_tool.stop_reason == "tool_use"


def test_calls_in_the_answer_are_tool_use_blocks_after_its_text(client, chat_client):
    """With tool_choice auto, the server's tool-call parser (Hermes, from the template) reads the answer: its text
    is a text block, each call a tool_use block, whole and streamed, as the chat endpoint reads them. (A grammar
    makes the random model write the calls.)"""
    answer = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n'
              '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
    grammar = {"grammar": f"root ::= {json.dumps(answer)}"}
    kwargs = dict(model="tiny", max_tokens=400, messages=[{"role": "user", "content": QUESTION}],
                  tools=[WEATHER_TOOL, TIME_TOOL], extra_body={**GREEDY, "structured_outputs": grammar})
    message = client.messages.create(**kwargs)
    assert [block.type for block in message.content] == ["text", "tool_use", "tool_use"]
    assert message.content[0].text == "Let me look." and message.stop_reason == "tool_use"
    calls = [(block.name, block.input) for block in message.content[1:]]
    assert calls == [("get_weather", {"city": "Oslo", "days": 2}), ("get_time", {"zone": "CET"})]
    chat = chat_answer(chat_client, [{"role": "user", "content": QUESTION}], max_tokens=400, tools=[WEATHER, TIME],
                       extra_body={"structured_outputs": grammar}).choices[0]
    assert chat.message.content == "Let me look."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in chat.message.tool_calls] == calls
    with client.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    assert [(b.type, getattr(b, "text", None), getattr(b, "name", None), getattr(b, "input", None))
            for b in final.content] == [("text", "Let me look.", None, None), ("tool_use", None, *calls[0]),
                                        ("tool_use", None, *calls[1])]
    assert final.stop_reason == "tool_use"
    one = client.messages.create(**kwargs, tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert [(block.name, block.input) for block in one.content[1:]] == calls[:1]


def test_tool_results_are_the_chat_tool_messages(client, chat_client):
    """An assistant's tool_use block and the user's tool_result block are the chat's tool call and tool message;
    count_tokens counts the prompt the message reports."""
    call = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris", "days": 1}}
    messages = [{"role": "user", "content": QUESTION},
                {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}, call]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny."},
                                             {"type": "text", "text": "And tomorrow?"}]}]
    message = client.messages.create(model="tiny", max_tokens=8, extra_body=GREEDY, messages=messages,
                                     tools=[WEATHER_TOOL], tool_choice={"type": "none"})
    chat = chat_answer(chat_client, [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps(call["input"])}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny."},
        {"role": "user", "content": "And tomorrow?"}], max_tokens=8, tools=[WEATHER], tool_choice="none")
    assert text_of(message) == chat.choices[0].message.content
    assert prompt_tokens(message.usage) == chat.usage.prompt_tokens
    counted = client.messages.count_tokens(model="tiny", messages=messages, tools=[WEATHER_TOOL],
                                           tool_choice={"type": "none"})
    assert counted.input_tokens == prompt_tokens(message.usage)
    plain = client.messages.count_tokens(model="tiny", system="Be brief.",
                                         messages=[{"role": "user", "content": QUESTION}])
    assert plain.input_tokens == chat_answer(chat_client, [{"role": "system", "content": "Be brief."},
                                                           {"role": "user", "content": QUESTION}],
                                             max_tokens=1).usage.prompt_tokens


def anthropic_error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and set(body) == {"type", "error"}
    assert body["error"]["type"] == kind and set(body["error"]) == {"type", "message"}
    return body["error"]["message"]


@pytest.mark.parametrize(("body", "words"), [
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({"model": "tiny", "max_tokens": "5", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens: expected"),
    ({"model": "tiny", "max_tokens": 5, "messages": "hi"}, "messages"),
    ({"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
     "'document' blocks are not supported"),
    ({"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": [{"text": "hi"}]}]},
     "must be an object with a 'type'"),
    ({"model": "tiny", "max_tokens": 5, "system": 5, "messages": [{"role": "user", "content": "hi"}]},
     "system: must be a string or a list of text blocks"),
    ({"model": "tiny", "max_tokens": 5, "tools": [{"type": "web_search_20250305", "name": "web_search"}],
      "messages": [{"role": "user", "content": "hi"}]}, "server tool"),
    ({"model": "tiny", "max_tokens": 5, "temperature": 1.5, "messages": [{"role": "user", "content": "hi"}]},
     "temperature"),
    ({"model": "tiny", "max_tokens": 5, "n": 2, "messages": [{"role": "user", "content": "hi"}]}, "n"),
    ({"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER_TOOL],
      "tool_choice": {"type": "tool", "name": "get_time"}}, "get_time"),
    ({"model": "tiny", "max_tokens": 10**6, "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
])
def test_bad_requests_get_400_in_anthropics_shape(server, body, words):
    response = httpx.post(server.url("/v1/messages"), json=body, headers={"x-api-key": KEY}, timeout=60)
    assert words in anthropic_error(response, 400, "invalid_request_error")


def test_errors_of_the_sdk_and_the_key(client, server):
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["error"]["type"] == "not_found_error" and "claude-sonnet-4-5" in str(missing.value)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}])
    body = {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, {"x-api-key": "wrong"}, {"authorization": "Bearer wrong"}):
        response = httpx.post(server.url("/v1/messages"), json=body, headers=headers, timeout=60)
        assert "API key" in anthropic_error(response, 401, "authentication_error")
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0).messages.create(**body)
    assert httpx.post(server.url("/v1/messages"), json=body, headers={"authorization": f"Bearer {KEY}"},
                      timeout=60).status_code == 200
    response = httpx.post(server.url("/v1/messages/count_tokens"), json={"model": "tiny", "messages": []},
                          headers={"x-api-key": KEY}, timeout=60)
    anthropic_error(response, 400, "invalid_request_error")
    response = httpx.post(server.url("/v1/messages"), content=b"{not json", headers={"x-api-key": KEY}, timeout=60)
    anthropic_error(response, 400, "invalid_request_error")
    response = httpx.get(server.url("/v1/messages"), headers={"x-api-key": KEY}, timeout=60)
    assert "GET" in anthropic_error(response, 405, "invalid_request_error")
    # the OpenAI routes keep OpenAI's shape (and take Anthropic's header too)
    response = httpx.post(server.url("/v1/chat/completions"), json={"model": "nope", "messages": []},
                          headers={"x-api-key": KEY}, timeout=60)
    assert response.status_code == 400 and set(response.json()) == {"error"}


def test_the_guards_refuse_in_anthropics_shape_on_its_routes(server):
    """The guards' refusals (here a body sent as another media type) and a stream cut by --request-timeout: in
    Anthropic's shape on the Messages routes (the timeout a last ``error`` event, no ``[DONE]``), OpenAI's
    elsewhere."""
    response = httpx.post(server.url("/v1/messages/count_tokens"), content=b'{"model": "tiny"}',
                          headers={"x-api-key": KEY, "content-type": "text/plain"}, timeout=60)
    assert "Content-Type" in anthropic_error(response, 415, "invalid_request_error")

    async def slow_stream(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"event: ping\ndata: {}\n\n", "more_body": True})
        await asyncio.sleep(10)

    guard = GuardMiddleware(slow_stream, SimpleNamespace(api_keys=[]), ServerGuards(request_timeout=0.2))

    def streamed(path: str) -> bytes:
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        asyncio.run(guard({"type": "http", "method": "GET", "path": path, "headers": []}, receive, send))
        return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")

    name, data = streamed("/v1/messages").decode().split("\n\n")[1].split("\n")
    assert name == "event: error" and json.loads(data[6:])["error"]["type"] == "overloaded_error"
    assert b"[DONE]" not in streamed("/v1/messages") and streamed("/v1/chat/completions").endswith(b"data: [DONE]\n\n")


def test_logged_bodies_cut_the_system_prompt_too():
    """``--log-requests --max-log-len N`` cuts a Messages body's prompts: ``system`` and the messages' text."""
    body = {"model": "tiny", "max_tokens": 5, "system": "a long system prompt",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a long question"}]}]}
    cut = json.loads(shorten_prompts(json.dumps(body), 6))
    assert cut["system"] == "a long" and cut["messages"][0]["content"][0]["text"] == "a long"
