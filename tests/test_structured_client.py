"""The client's and the batching tools' side of structured output, without a server: the fields reach the wire,
answers' tool calls are typed, ``parse`` reads answers into pydantic models / types / JSON schemas and fails
clearly when they do not validate, and the batching tools parse per prompt. (The same against a real
``inferneo serve`` is in test_structured_e2e.py.)"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Literal

import httpx
import pytest
from pydantic import BaseModel, Field

from inferneo.batching import AdaptiveBatcher, DynamicBatcher, astream_batches, stream_batches
from inferneo.client import (
    AsyncInferneoClient,
    InferneoClient,
    LengthFinishReasonError,
    OutputFormat,
    StructuredOutputError,
    function_tool,
)
from inferneo.client.types import ChatCompletion, ChatCompletionChunk


class City(BaseModel):
    name: str = Field(max_length=20)
    country: Literal["FR", "DE", "JP"]


class GetWeather(BaseModel):
    """The weather in a city."""

    city: str


PARIS = '{"name": "Paris", "country": "FR"}'


def answer_for(text: str) -> tuple[str | None, str, list | None]:
    """What the fake model answers to a prompt: (content, finish_reason, tool_calls)."""
    if "CUT" in text:
        return '{"name": "Par', "length", None
    if "BAD" in text:
        return '{"name": "Paris", "country": "US"}', "stop", None
    if "DEAD" in text:  # a constraint's dead end: whatever the text, it is not a finished answer
        return PARIS, "error", None
    if "TOOL" in text:
        call = {"id": "call_1", "type": "function", "function": {"name": "GetWeather", "arguments": '{"city": "Oslo"}'}}
        return None, "tool_calls", [call]
    return PARIS, "stop", None


class FakeServer:
    """Records every request body and answers chat and completions calls (one choice per prompt)."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        head = {"id": "x", "created": 0, "model": "m"}
        if request.url.path.endswith("/chat/completions"):
            conversations = body["messages"] if isinstance(body["messages"][0], list) else [body["messages"]]
            choices = []
            for i, conv in enumerate(conversations):
                content, finish, calls = answer_for(conv[-1]["content"])
                message = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
                choices.append({"index": i, "message": message, "finish_reason": finish})
            return httpx.Response(200, json={**head, "object": "chat.completion", "choices": choices})
        prompts = body["prompt"]  # one prompt (a string or token ids) or a list of them, as the server reads it
        if not isinstance(prompts, list) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        choices = []
        for i, prompt in enumerate(prompts):
            content, finish, _ = answer_for(prompt)
            choices.append({"index": i, "text": content or "", "finish_reason": finish})
        return httpx.Response(200, json={**head, "object": "text_completion", "choices": choices})

    def client(self) -> InferneoClient:
        return InferneoClient("http://fake", max_retries=0,
                              http_client=httpx.Client(transport=httpx.MockTransport(self.handle)))

    def async_client(self) -> AsyncInferneoClient:
        async def handler(request: httpx.Request) -> httpx.Response:
            return self.handle(request)

        return AsyncInferneoClient("http://fake", max_retries=0,
                                   http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)))


USER = [{"role": "user", "content": "A city?"}]


# ---- fields on the wire, typed answers ---------------------------------------------------------------------------


def test_structured_and_tool_fields_reach_the_wire():
    fake = FakeServer()
    client = fake.client()
    tools = [function_tool(GetWeather)]
    client.chat.completions.create(messages=USER, response_format={"type": "json_object"}, tools=tools,
                                   tool_choice="required", parallel_tool_calls=False,
                                   structured_outputs={"choice": ["a", "b"]})
    client.completions.create(prompt="x", response_format={"type": "json_object"},
                              structured_outputs={"regex": "[0-9]+"})
    chat, completion = fake.bodies
    assert chat["response_format"] == {"type": "json_object"} and chat["tool_choice"] == "required"
    assert chat["parallel_tool_calls"] is False and chat["structured_outputs"] == {"choice": ["a", "b"]}
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "GetWeather", "description": "The weather in a city.", "strict": True,
        "parameters": GetWeather.model_json_schema()}}]
    assert completion["response_format"] == {"type": "json_object"}
    assert completion["structured_outputs"] == {"regex": "[0-9]+"}
    with pytest.raises(TypeError):
        client.completions.create(prompt="x", tools=tools)  # tools are a chat field


def test_tool_calls_are_typed_in_answers_and_stream_deltas():
    out = ChatCompletion.model_validate({"id": "x", "created": 0, "model": "m", "choices": [{
        "index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}}]})
    call = out.choices[0].message.tool_calls[0]
    assert call.id == "call_1" and call.function.name == "f" and json.loads(call.function.arguments) == {"a": 1}

    events = [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"a": '}},
        {"index": 0, "function": {"arguments": "1}"}},
    ]
    sse = "".join("data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                                         "choices": [{"index": 0, "delta": {"tool_calls": [e]}}]}) + "\n\n"
                  for e in events) + "data: [DONE]\n\n"
    transport = httpx.MockTransport(lambda r: httpx.Response(200, text=sse,
                                                             headers={"content-type": "text/event-stream"}))
    client = InferneoClient("http://fake", http_client=httpx.Client(transport=transport))
    chunks: list[ChatCompletionChunk] = list(client.chat.completions.create(messages=USER, stream=True))
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks]
    assert deltas[0].id == "call_1" and deltas[0].function.name == "f"
    assert "".join(d.function.arguments for d in deltas) == '{"a": 1}'


# ---- parse ---------------------------------------------------------------------------------------------------------


def test_parse_with_a_pydantic_model():
    fake = FakeServer()
    out = fake.client().chat.completions.parse(messages=USER, response_format=City, max_tokens=64)
    message = out.choices[0].message
    assert message.parsed == City(name="Paris", country="FR") and message.refusal is None
    sent = fake.bodies[0]["response_format"]
    assert sent == {"type": "json_schema",
                    "json_schema": {"name": "City", "schema": City.model_json_schema(), "strict": True}}
    assert fake.bodies[0]["max_tokens"] == 64


def test_parse_with_a_schema_a_wire_format_or_another_type():
    fake = FakeServer()
    client = fake.client()
    schema = {"title": "a city!", "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    out = client.chat.completions.parse(messages=USER, response_format=schema)
    assert out.choices[0].message.parsed == {"name": "Paris", "country": "FR"}
    assert fake.bodies[-1]["response_format"]["json_schema"]["name"] == "a_city_"

    out = client.chat.completions.parse(messages=USER, response_format={"type": "json_object"})
    assert out.choices[0].message.parsed == {"name": "Paris", "country": "FR"}
    assert fake.bodies[-1]["response_format"] == {"type": "json_object"}

    @dataclass
    class Place:
        name: str
        country: str

    out = client.chat.completions.parse(messages=USER, response_format=Place)
    assert out.choices[0].message.parsed == Place("Paris", "FR")
    with pytest.raises(TypeError):
        OutputFormat.of(object())


def test_parse_errors_name_the_choice_and_keep_the_content():
    client = FakeServer().client()
    with pytest.raises(LengthFinishReasonError) as cut:
        client.chat.completions.parse(messages=[{"role": "user", "content": "CUT"}], response_format=City)
    assert cut.value.finish_reason == "length" and cut.value.content == '{"name": "Par'
    with pytest.raises(StructuredOutputError) as bad:
        client.chat.completions.parse(messages=[{"role": "user", "content": "BAD"}], response_format=City)
    assert not isinstance(bad.value, LengthFinishReasonError) and "country" in str(bad.value)
    assert bad.value.content == '{"name": "Paris", "country": "US"}' and bad.value.__cause__ is not None
    with pytest.raises(StructuredOutputError, match="dead end") as dead:
        client.chat.completions.parse(messages=[{"role": "user", "content": "DEAD"}], response_format=City)
    assert not isinstance(dead.value, LengthFinishReasonError) and dead.value.finish_reason == "error"
    schema = {"type": "object", "properties": {"country": {"enum": ["FR"]}}}
    with pytest.raises(StructuredOutputError, match="country"):  # checked with jsonschema
        client.chat.completions.parse(messages=[{"role": "user", "content": "BAD"}], response_format=schema)


def test_parse_reads_tool_calls_of_pydantic_tools():
    fake = FakeServer()
    out = fake.client().chat.completions.parse(messages=[{"role": "user", "content": "TOOL"}], tools=[GetWeather],
                                               response_format=City, tool_choice="required")
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.parsed is None
    assert choice.message.tool_calls[0].function.parsed_arguments == GetWeather(city="Oslo")
    assert fake.bodies[0]["tools"][0]["function"]["name"] == "GetWeather"


def test_completions_parse_and_async_parse():
    fake = FakeServer()
    out = fake.client().completions.parse(prompt=["a", "b"], response_format=City)
    assert [c.parsed for c in out.choices] == [City(name="Paris", country="FR")] * 2

    async def run():
        async with fake.async_client() as client:
            chat = await client.chat.completions.parse(messages=USER, response_format=City)
            text = await client.completions.parse(prompt="a", response_format=City)
            return chat.choices[0].message.parsed, text.choices[0].parsed

    assert asyncio.run(run()) == (City(name="Paris", country="FR"),) * 2


# ---- the batching tools ------------------------------------------------------------------------------------------


def test_stream_batches_parses_prompts_and_conversations_and_fails_bad_answers_alone():
    fake = FakeServer()
    prompts = ["a", [{"role": "user", "content": "b"}], "BAD", [{"role": "user", "content": "CUT"}], [1, 2, 3]]
    results = list(stream_batches(fake.client(), "m", prompts, batch_size=5, response_format=City, max_tokens=9))
    assert [r.index for r in results] == [0, 1, 2, 3, 4]
    assert [r.ok for r in results] == [True, True, False, False, True]
    assert results[0].parsed == results[1].parsed == results[4].parsed == City(name="Paris", country="FR")
    assert isinstance(results[2].error, StructuredOutputError) and results[2].choices  # what was written is kept
    assert isinstance(results[3].error, LengthFinishReasonError)
    with pytest.raises(StructuredOutputError):
        _ = results[2].parsed
    assert results[1].text == PARIS
    # One call per kind of prompt: text, chat, token ids; each carries the model's JSON schema.
    assert len(fake.bodies) == 3
    assert all(b["response_format"]["json_schema"]["schema"] == City.model_json_schema() for b in fake.bodies)


def test_astream_batches_and_adaptive_batcher_parse():
    fake = FakeServer()

    async def run():
        async with fake.async_client() as client:
            return [r async for r in astream_batches(client, "m", ["a", [{"role": "user", "content": "b"}]],
                                                     response_format=City)]

    assert [r.parsed.name for r in asyncio.run(run())] == ["Paris", "Paris"]
    results = AdaptiveBatcher(fake.client(), "m", response_format=City).run(["a", "b", "c"])
    assert [r.parsed.country for r in results] == ["FR"] * 3
    plain = AdaptiveBatcher(fake.client(), "m").run(["a"])
    assert plain[0].parsed is None and plain[0].text == PARIS


def test_dynamic_batcher_formats_for_all_and_per_submit():
    fake = FakeServer()
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    with DynamicBatcher(fake.client(), "m", max_batch_size=100, max_wait_time=30, response_format=City) as batcher:
        typed = [batcher.submit(f"q{i}") for i in range(3)]
        as_dicts = [batcher.submit(f"r{i}", response_format=schema) for i in range(2)]
        chat = batcher.submit([{"role": "user", "content": "hi"}])
        plain = batcher.submit("s", response_format=None)
        bad = batcher.submit("BAD")
        batcher.flush()
    assert [f.result().parsed for f in typed] == [City(name="Paris", country="FR")] * 3
    assert [f.result().parsed for f in as_dicts] == [{"name": "Paris", "country": "FR"}] * 2
    assert chat.result().parsed.name == "Paris" and plain.result().parsed is None
    with pytest.raises(StructuredOutputError):
        bad.result()
    # Same model: one call (the bad answer's prompt went with the other City prompts); the schema dict, the
    # conversation and the plain prompt each had their own.
    sizes = sorted(len(b.get("prompt") or b.get("messages")) for b in fake.bodies)
    assert sizes == [1, 1, 2, 4]
    assert "response_format" not in next(b for b in fake.bodies if b.get("prompt") == "s")
