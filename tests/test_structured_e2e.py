"""Structured output and tool calling through the client, the batching tools and ``inferneo batch``, against a real
``inferneo serve`` on a tiny random-weight model (whose free-running output is gibberish): every constrained
answer validates, streamed or not, and a bad constraint is a 400 naming the field that fails only its own
prompts."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from inferneo.batch import read_results, request_line
from inferneo.batching import DynamicBatcher, stream_batches
from inferneo.client import AsyncInferneoClient, BadRequestError, InferneoClient
from inferneo.testing.server import RemoteServer

MODEL = "tiny"
WORD = r"^[A-Z][a-z]{1,12}$"


class Address(BaseModel):
    street: str = Field(pattern=WORD)
    number: int = Field(ge=1, le=999)


class Person(BaseModel):
    name: str = Field(pattern=WORD)
    role: Literal["admin", "user", "guest"]
    age: int = Field(ge=0, le=120)
    tags: list[Literal["a", "b", "c"]] = Field(max_length=3)
    address: Address | None = None


class Lookup(BaseModel):
    """Look a word up."""

    word: str = Field(pattern=WORD)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "pattern": WORD}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"]}}}


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with RemoteServer(tiny_llama_dir, "--served-model-name", MODEL, "--max-model-len", "1024",
                      "--kv-cache-memory", "64MiB", "--num-threads", "1", "--disable-access-log") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with InferneoClient(server.base_url, max_retries=0) as c:
        yield c


# ---- the client ----------------------------------------------------------------------------------------------------


def test_parse_many_answers_all_valid(client):
    conversations = [ask(f"Person {i}?") for i in range(6)]
    out = client.chat.completions.parse(model=MODEL, messages=conversations, response_format=Person, n=2,
                                        max_tokens=300, temperature=1.0, seed=7)
    assert len(out.choices) == 12
    assert all(isinstance(c.message.parsed, Person) and c.finish_reason == "stop" for c in out.choices)
    text = client.completions.parse(model=MODEL, prompt=["a", "b", "c"], response_format=Person, max_tokens=300)
    assert all(isinstance(c.parsed, Person) for c in text.choices)


def test_streamed_json_schema_and_vllm_constraints(client):
    schema = Person.model_json_schema()
    pieces = []
    with client.chat.completions.create(model=MODEL, messages=ask("Who?"), max_tokens=300, stream=True,
                                        response_format={"type": "json_schema",
                                                         "json_schema": {"name": "p", "schema": schema}}) as stream:
        for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
    jsonschema.validate(json.loads("".join(pieces)), schema)

    regex = client.completions.create(model=MODEL, prompt=["x", "y"], max_tokens=30,
                                      structured_outputs={"regex": r"[0-9]{3}-[A-Z]{2}"})
    assert all(len(c.text) == 6 and c.text[3] == "-" for c in regex.choices)
    choice = client.chat.completions.create(model=MODEL, messages=ask("?"), max_tokens=10,
                                            structured_outputs={"choice": ["yes", "no"]})
    assert choice.choices[0].message.content in ("yes", "no")


def test_async_parse(server):
    async def run():
        async with AsyncInferneoClient(server.base_url, max_retries=0) as aclient:
            return await asyncio.gather(*(aclient.chat.completions.parse(
                model=MODEL, messages=ask(f"{i}"), response_format=Person, max_tokens=300) for i in range(4)))

    assert all(isinstance(out.choices[0].message.parsed, Person) for out in asyncio.run(run()))


def test_tool_calls_required_named_streamed_and_round_trip(client):
    required = client.chat.completions.create(model=MODEL, messages=ask("Weather?"), tools=[WEATHER, TIME],
                                              tool_choice="required", parallel_tool_calls=False, max_tokens=300)
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"]
        jsonschema.validate(json.loads(call.function.arguments), schema)

    named = client.chat.completions.create(model=MODEL, messages=ask("Time?"), tools=[WEATHER, TIME],
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           max_tokens=100, stream=True)
    calls: dict[int, dict] = {}
    finish_reasons = []
    with named as stream:
        for chunk in stream:
            finish_reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]
            for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                call["id"] = call["id"] or delta.id
                if delta.function is not None:
                    call["name"] = call["name"] or delta.function.name
                    call["arguments"] += delta.function.arguments or ""
    (call,) = calls.values()
    assert call["id"] and call["name"] == "get_time" and json.loads(call["arguments"])["zone"] in ("UTC", "CET")
    assert finish_reasons == ["stop"]  # OpenAI's for a named function (required: "tool_calls")

    parsed = client.chat.completions.parse(model=MODEL, messages=ask("Look up"), tools=[Lookup],
                                           tool_choice="required", parallel_tool_calls=False, max_tokens=100)
    tool_call = parsed.choices[0].message.tool_calls[0]
    assert isinstance(tool_call.function.parsed_arguments, Lookup)

    history = [*ask("Look up"), {"role": "assistant", "content": None, "tool_calls": [
        tool_call.model_dump(include={"id": True, "type": True, "function": {"name", "arguments"}})]},
        {"role": "tool", "tool_call_id": tool_call.id, "content": "found"}]
    answer = client.chat.completions.parse(model=MODEL, messages=history, tools=[Lookup], response_format=Person,
                                           tool_choice="none", max_tokens=300)
    assert isinstance(answer.choices[0].message.parsed, Person)


def test_bad_constraints_are_400s_naming_the_field(client):
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
         "response_format"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ]
    for fields, field in cases:
        with pytest.raises(BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=5, **fields)
        assert refused.value.status_code == 400 and (refused.value.param or "").startswith(field), fields


# ---- the batching tools ------------------------------------------------------------------------------------------


def test_stream_batches_and_dynamic_batcher_parse_every_answer(client):
    prompts = [f"text {i}" if i % 2 else ask(f"chat {i}") for i in range(10)]
    results = list(stream_batches(client, MODEL, prompts, batch_size=4, response_format=Person, max_tokens=300))
    assert [r.index for r in results] == list(range(10))
    assert all(r.ok and isinstance(r.parsed, Person) for r in results), [r.error for r in results]

    bad_schema = {"type": "object", "properties": {"x": {"type": "nope"}}}
    with DynamicBatcher(client, MODEL, max_wait_time=0.05, max_tokens=300, response_format=Person) as batcher:
        people = [batcher.submit(f"p{i}") for i in range(6)]
        labels = [batcher.submit(ask(f"l{i}"), response_format={"enum": ["on", "off"]}) for i in range(3)]
        broken = batcher.submit("b", response_format=bad_schema)
        batcher.flush()
    assert all(isinstance(f.result().parsed, Person) for f in people)
    assert all(f.result().parsed in ("on", "off") for f in labels)
    with pytest.raises(BadRequestError) as refused:
        broken.result()
    assert refused.value.param.startswith("response_format")


# ---- inferneo batch ----------------------------------------------------------------------------------------------


def test_inferneo_batch_passes_constraints_and_tools_through(server, tmp_path):
    requests = tmp_path / "requests.jsonl"
    with requests.open("w") as f:
        for i in range(4):
            f.write(request_line(f"person-{i}", {"model": MODEL, "messages": ask(f"{i}"), "max_tokens": 300},
                                 response_format=Person))
        f.write(request_line("text-person", {"model": MODEL, "prompt": "x", "max_tokens": 300},
                             response_format=Person))
        f.write(request_line("tool", {"model": MODEL, "messages": ask("w"), "max_tokens": 200,
                                      "tool_choice": "required", "parallel_tool_calls": False}, tools=[WEATHER]))
        f.write(request_line("regex", {"model": MODEL, "prompt": "x", "max_tokens": 20,
                                       "structured_outputs": {"regex": "[a-c]{4}"}}))
        f.write(request_line("bad", {"model": MODEL, "prompt": "x", "max_tokens": 5,
                                     "structured_outputs": {"grammar": "root ::= missing"}}))
    results = tmp_path / "results.jsonl"
    subprocess.run([sys.executable, "-m", "inferneo.cli", "batch", "--url", server.base_url, "-i", str(requests),
                    "-o", str(results), "--no-progress"], check=True, timeout=300, capture_output=True)

    records = {r.custom_id: r for r in read_results(results)}
    tool = records["tool"].response.choices[0]
    assert tool.finish_reason == "tool_calls" and tool.message.tool_calls[0].function.name == "get_weather"
    assert len(records["regex"].response.choices[0].text) == 4
    assert records["bad"].response is None and records["bad"].error["message"]
    raw = {json.loads(line)["custom_id"]: json.loads(line) for line in results.read_text().splitlines()}
    assert raw["bad"]["response"]["status_code"] == 400
    assert raw["bad"]["response"]["body"]["error"]["param"].startswith("structured_outputs")

    people = [r for r in read_results(results, Person) if "person" in r.custom_id]
    assert len(people) == 5 and all(r.ok and isinstance(r.parsed, Person) for r in people)


def test_length_bounded_strings_hold_their_bound_in_characters(client):
    """``maxLength`` counts characters of the text the client receives: no byte sequence the grammar lets
    through may decode to replacement characters (UTF-8-encoded surrogates, for one)."""
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 8},
                                               "b": {"type": "string", "maxLength": 8}}, "required": ["a", "b"]}
    out = client.chat.completions.create(model=MODEL, messages=[ask(str(i)) for i in range(32)], max_tokens=200,
                                         temperature=1.0, seed=3, structured_outputs={"json": schema})
    for choice in out.choices:
        assert "\ufffd" not in choice.message.content, choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)
