"""``POST /v1/responses`` over real HTTP: a real ``inferneo serve`` on the tiny random model with the Hermes-style
template (conftest's ``hermes_server``), driven by the unmodified ``openai`` package's Responses client, and
checked against the chat endpoint's answers to the same conversations (greedy, so they must be equal)."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from test_structured_server import TOOLS, City

FLAT_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]
WEATHER_PARAMETERS = TOOLS[0]["function"]["parameters"]
QUESTION = "What is the weather in Paris?"


def chat_answer(hermes_client, messages, **kwargs):
    return hermes_client.chat.completions.create(model="tiny", messages=messages, temperature=0, **kwargs)


def test_a_response_is_the_chat_answer_to_the_same_conversation(hermes_client):
    """``instructions`` is the system message, a string ``input`` the user's; the text, the token counts and the
    stop are the chat endpoint's."""
    response = hermes_client.responses.create(model="tiny", instructions="Be brief.", input=QUESTION, temperature=0,
                                       max_output_tokens=12)
    chat = chat_answer(hermes_client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}],
                       max_tokens=12)
    assert response.object == "response" and response.id.startswith("resp_") and response.model == "tiny"
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    cut = chat.choices[0].finish_reason == "length"
    assert response.status == ("incomplete" if cut else "completed")
    assert message.status == response.status
    assert response.store is False and response.instructions == "Be brief." and response.temperature == 0


def test_input_items_are_the_conversation(hermes_client):
    """A list of message items (string or text-part content, every role) gives the chat answer of those
    messages."""
    items = [{"role": "developer", "content": "Answer in French."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"},
                                                             {"type": "input_text", "text": ", who are you?"}]},
             {"role": "assistant", "content": [{"type": "output_text", "text": "A model."}]},
             {"role": "user", "content": QUESTION}]
    response = hermes_client.responses.create(model="tiny", input=items, temperature=0, max_output_tokens=10)
    chat = chat_answer(hermes_client, [{"role": "developer", "content": "Answer in French."},
                                {"role": "user", "content": "Hello, who are you?"},
                                {"role": "assistant", "content": "A model."},
                                {"role": "user", "content": QUESTION}], max_tokens=10)
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens


def test_max_output_tokens_cuts_the_answer_as_incomplete(hermes_client, hermes_server):
    response = hermes_client.responses.create(model="tiny", input=QUESTION, temperature=0, max_output_tokens=3,
                                       extra_body={"min_p": 0.0})
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3 and response.output[0].status == "incomplete"
    events = list(hermes_client.responses.create(model="tiny", input=QUESTION, temperature=0, max_output_tokens=3,
                                          stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == response.output_text


def test_the_stream_is_openais_event_sequence(hermes_client, hermes_server):
    """Events numbered from 0 without gaps; created and in_progress first; the message's item, part, deltas and
    their done events in order; completed last with the whole response, equal to the unstreamed one."""
    kwargs = dict(model="tiny", input=QUESTION, temperature=1.0, max_output_tokens=40,
                  extra_body={"seed": 1, "structured_outputs": {"grammar": 'root ::= "It is " ("sunny" | "wet") "."'}})
    whole = hermes_client.responses.create(**kwargs)
    assert whole.status == "completed" and whole.output_text in ("It is sunny.", "It is wet.")
    events = list(hermes_client.responses.create(**kwargs, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[4:4 + len(deltas)] == ["response.output_text.delta"] * len(deltas)
    assert kinds[4 + len(deltas):] == ["response.output_text.done", "response.content_part.done",
                                       "response.output_item.done", "response.completed"]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    item_id = events[2].item.id
    assert all(e.item_id == item_id and e.output_index == 0 for e in deltas)
    text = "".join(e.delta for e in deltas)
    assert text == events[-4].text == events[-3].part.text == events[-2].item.content[0].text == whole.output_text
    assert events[-1].response.output_text == whole.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens
    # the SDK's own accumulator agrees
    with hermes_client.responses.stream(**kwargs) as stream:
        for _ in stream:
            pass
        assert stream.get_final_response().output_text == whole.output_text
    # every event line names its type (server-sent event names, as OpenAI sends them)
    raw = {k: v for k, v in kwargs.items() if k != "extra_body"} | kwargs["extra_body"] | {"stream": True}
    with httpx.stream("POST", hermes_server.url("/v1/responses"), json=raw, timeout=120) as r:
        lines = [line for line in r.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    payloads = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert names == [p["type"] for p in payloads]
    assert names[:2] == ["response.created", "response.in_progress"] and names[-1] == "response.completed"


def check_weather(arguments: str) -> dict:
    value = json.loads(arguments)
    jsonschema.validate(value, WEATHER_PARAMETERS)
    return value


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "get_weather"}])
def test_a_function_call_round_trip(hermes_client, tool_choice):
    """A forced call leaves as one ``function_call`` item (no message); sent back with its output as input items,
    it reaches the template as the chat endpoint's assistant tool call and tool message."""
    response = hermes_client.responses.create(model="tiny", input=QUESTION, tools=FLAT_TOOLS, tool_choice=tool_choice,
                                       parallel_tool_calls=False, temperature=0, max_output_tokens=200)
    (call,) = response.output
    assert call.type == "function_call" and call.status == "completed" and call.call_id.startswith("call_")
    if isinstance(tool_choice, dict):
        assert call.name == "get_weather"
    if call.name == "get_weather":
        check_weather(call.arguments)
    follow_up = [{"role": "user", "content": QUESTION}, call.model_dump(exclude_none=True),
                 {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}]
    answer = hermes_client.responses.create(model="tiny", input=follow_up, tools=FLAT_TOOLS, temperature=0,
                                     max_output_tokens=6, tool_choice="none")
    chat = chat_answer(hermes_client, [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny, 21 C"}], tools=TOOLS, tool_choice="none",
        max_tokens=6)
    assert answer.output_text == chat.choices[0].message.content
    assert answer.usage.input_tokens == chat.usage.prompt_tokens


def test_streamed_function_calls_equal_the_whole_ones(hermes_client):
    kwargs = dict(model="tiny", input=QUESTION, tools=FLAT_TOOLS, tool_choice={"type": "function", "name": "get_time"},
                  parallel_tool_calls=False, temperature=0, max_output_tokens=200)
    whole = hermes_client.responses.create(**kwargs)
    events = list(hermes_client.responses.create(**kwargs, stream=True))
    kinds = [e.type for e in events]
    assert "response.content_part.added" not in kinds  # a forced call has no message
    added = next(e for e in events if e.type == "response.output_item.added")
    assert added.item.type == "function_call" and added.item.name == "get_time" and added.item.arguments == ""
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert arguments == done.arguments == whole.output[0].arguments
    assert events[-1].type == "response.completed"
    assert [(o.type, o.name, o.arguments) for o in events[-1].response.output] == \
        [(o.type, o.name, o.arguments) for o in whole.output]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "get_weather"}])
def test_a_call_cut_by_max_output_tokens_is_incomplete(hermes_client, tool_choice):
    """A forced call whose arguments ``max_output_tokens`` cut short is an ``incomplete`` item, not a completed one
    that a client would run with half its arguments; whole and streamed alike."""
    kwargs = dict(model="tiny", input=QUESTION, tools=FLAT_TOOLS, tool_choice=tool_choice, parallel_tool_calls=False,
                  temperature=0)
    full = hermes_client.responses.create(**kwargs, max_output_tokens=200)
    assert full.status == "completed" and full.output[0].status == "completed"
    kwargs["max_output_tokens"] = full.usage.output_tokens - 5  # the answer's last tokens close the arguments
    whole = hermes_client.responses.create(**kwargs)
    assert whole.status == "incomplete"
    (call,) = whole.output
    assert call.type == "function_call" and call.status == "incomplete", call
    with pytest.raises(json.JSONDecodeError):
        json.loads(call.arguments)
    events = list(hermes_client.responses.create(**kwargs, stream=True))
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [(item.arguments, item.status) for item in done] == [(call.arguments, "incomplete")]
    assert events[-1].type == "response.incomplete"
    assert [(o.arguments, o.status) for o in events[-1].response.output] == [(call.arguments, "incomplete")]


def test_auto_splits_the_models_text_and_its_call_into_two_items(hermes_client):
    """With ``tool_choice`` auto the server's Hermes parser reads the model's own format (a grammar makes the
    random model write it): a message item with the text before the call, then the call, whole and streamed."""
    grammar = ('root ::= "I will check.\\n<tool_call>\\n{\\"name\\": \\"get_weather\\", \\"arguments\\": '
               '{\\"city\\": \\"" ("Paris" | "Rome") "\\", \\"days\\": " [1-7] "}}\\n</tool_call>"')
    kwargs = dict(model="tiny", input=QUESTION, tools=FLAT_TOOLS, temperature=1.0, max_output_tokens=200,
                  extra_body={"seed": 3, "structured_outputs": {"grammar": grammar}})
    whole = hermes_client.responses.create(**kwargs)
    assert [o.type for o in whole.output] == ["message", "function_call"]
    assert whole.output_text == "I will check." and whole.output[1].name == "get_weather"
    assert check_weather(whole.output[1].arguments)["city"] in ("Paris", "Rome")
    final = list(hermes_client.responses.create(**kwargs, stream=True))[-1].response
    assert [(o.type, getattr(o, "arguments", None)) for o in final.output] == \
        [(o.type, getattr(o, "arguments", None)) for o in whole.output]
    assert final.output_text == "I will check."
    # tool_choice none: the same text is all message
    none = hermes_client.responses.create(**kwargs, tool_choice="none")
    assert [o.type for o in none.output] == ["message"] and "<tool_call>" in none.output_text


def test_a_json_schema_format_is_followed(hermes_client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 7}},
              "required": ["city", "days"], "additionalProperties": False}
    response = hermes_client.responses.create(model="tiny", input=QUESTION, temperature=0, max_output_tokens=60,
                                       text={"format": {"type": "json_schema", "name": "forecast", "schema": schema}})
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text.format.type == "json_schema" and response.text.format.name == "forecast"


def test_output_text_logprobs_are_the_chat_logprobs(hermes_client):
    response = hermes_client.responses.create(model="tiny", input=QUESTION, temperature=0, max_output_tokens=5,
                                       top_logprobs=2, include=["message.output_text.logprobs"])
    chat = chat_answer(hermes_client, [{"role": "user", "content": QUESTION}], max_tokens=5, logprobs=True, top_logprobs=2)
    logprobs = response.output[0].content[0].logprobs
    expected = chat.choices[0].logprobs.content
    assert [(p.token, p.logprob, [t.token for t in p.top_logprobs]) for p in logprobs] == \
        [(p.token, p.logprob, [t.token for t in p.top_logprobs]) for p in expected]
    assert len(logprobs) == 5 and all(len(p.top_logprobs) == 2 for p in logprobs)
    streamed = list(hermes_client.responses.create(model="tiny", input=QUESTION, temperature=0, max_output_tokens=5,
                                            top_logprobs=2, include=["message.output_text.logprobs"], stream=True))
    sent = [p for e in streamed if e.type == "response.output_text.delta" for p in e.logprobs]
    assert [p.token for p in sent] == [p.token for p in logprobs]


def test_langchain_on_the_responses_api(hermes_server):
    """LangChain's ``ChatOpenAI(use_responses_api=True)``: a plain answer (equal to the chat endpoint's), a
    structured one by ``text.format`` and by a forced function call, and a bound tool's call."""
    langchain_openai = pytest.importorskip("langchain_openai")
    kwargs = dict(base_url=hermes_server.url("/v1"), api_key="unused", model="tiny", max_tokens=200, temperature=0,
                  max_retries=0)
    llm = langchain_openai.ChatOpenAI(use_responses_api=True, **kwargs)
    answer = llm.invoke(QUESTION)
    chat = langchain_openai.ChatOpenAI(**kwargs).invoke(QUESTION)
    assert answer.text == chat.text and answer.usage_metadata["output_tokens"] > 0
    assert isinstance(llm.with_structured_output(City).invoke("Describe a city."), City)
    assert isinstance(llm.with_structured_output(City, method="function_calling").invoke("Describe a city."), City)

    def get_weather(city: Literal["Paris", "Rome", "Oslo"]) -> str:
        """The weather in a city."""
        return "sunny"

    (call,) = llm.bind_tools([get_weather], tool_choice="get_weather", parallel_tool_calls=False).invoke(
        QUESTION).tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"] in ("Paris", "Rome", "Oslo")


BAD_BODIES = [
    ("empty input", {"input": []}, "input"),
    ("input of another type", {"input": 5}, "input"),
    ("a stored response", {"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ("a conversation", {"input": "x", "conversation": "conv_1"}, "conversation"),
    ("background", {"input": "x", "background": True}, "background"),
    ("truncation auto", {"input": "x", "truncation": "auto"}, "truncation"),
    ("a web search tool", {"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ("an image for a text model",
     {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ("a file part", {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "x"}]}]}, "input"),
    ("an unknown item", {"input": [{"type": "reasoning", "summary": []}]}, "input"),
    ("an item that is no object", {"input": ["hello"]}, "input"),
    ("a message role", {"input": [{"role": "tool", "content": "x"}]}, "input"),
    ("a field of no item", {"input": [{"role": "user", "content": "x", "colour": "red"}]}, "input"),
    ("a call without its id", {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input"),
    ("an unknown field", {"input": "x", "frobnicate": 1}, "frobnicate"),
    ("a string for a number", {"input": "x", "max_output_tokens": "5"}, "max_output_tokens"),
    ("a string for a boolean", {"input": "x", "stream": "yes"}, "stream"),
    ("past the context", {"input": "x", "max_output_tokens": 10**7}, "max_output_tokens"),
    ("an include not offered", {"input": "x", "include": ["reasoning.encrypted_content"]}, "include"),
    ("a tool choice of no tool", {"input": "x", "tools": FLAT_TOOLS, "tool_choice": {"type": "function",
                                                                                      "name": "nope"}},
     "tool_choice"),
    ("a tool choice shape", {"input": "x", "tool_choice": {"type": "function", "function": {"name": "f"}}},
     "tool_choice"),
    ("a schema format without a schema", {"input": "x", "text": {"format": {"type": "json_schema", "name": "s"}}},
     "text.format"),
    ("too much metadata", {"input": "x", "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ("too many content parts", {"input": [{"role": "user", "content": [{"type": "input_text", "text": "a"}] * 4097}]},
     "input"),
    ("a conversation of another type", {"input": "x", "conversation": 5}, "conversation"),
    ("a schema the grammar cannot take",
     {"input": "x", "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "nonsense"}}}},
     "text.format.schema"),
    ("tool parameters that are no object schema",
     {"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"type": 5}}]}, "tools[0].parameters"),
    ("two tools of one name", {"input": "x", "tools": [FLAT_TOOLS[0], FLAT_TOOLS[0]]}, "tools"),
    ("a call output of another type", {"input": [{"type": "function_call_output", "call_id": "c", "output": 5}]},
     "input"),
    ("stream options without a stream", {"input": "x", "stream_options": {"include_obfuscation": False}},
     "stream_options"),
]


@pytest.mark.parametrize("case,body,param", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_a_bad_request_is_a_400_naming_the_field(hermes_server, case, body, param):
    r = httpx.post(hermes_server.url("/v1/responses"), json={"model": "tiny", **body}, timeout=60)
    assert r.status_code == 400, (case, r.status_code, r.text[:300])
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param, (case, error)
    assert "response_format" not in error["message"] and "function." not in error["message"], error  # its terms
    assert "Value error" not in error["message"], error  # pydantic's wording, not the API's


def test_nothing_is_stored_to_retrieve(hermes_client):
    """A response's id names nothing afterwards: retrieving, deleting or cancelling it is OpenAI's 404."""
    response = hermes_client.responses.create(model="tiny", input="Hi", max_output_tokens=2)
    for call in (hermes_client.responses.retrieve, hermes_client.responses.delete, hermes_client.responses.cancel,
                 hermes_client.responses.input_items.list):
        with pytest.raises(openai.NotFoundError, match="stores no responses"):
            call(response.id)


def test_an_unknown_model_is_a_404_and_the_server_keeps_serving(hermes_server, hermes_client):
    r = httpx.post(hermes_server.url("/v1/responses"), json={"model": "nope", "input": "x"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert hermes_client.responses.create(model="tiny", input="Hi", max_output_tokens=2).status in ("completed",
                                                                                              "incomplete")


def test_input_tokens_count_what_a_response_would_read(hermes_client, hermes_server):
    """``client.responses.input_tokens.count`` (``POST /v1/responses/input_tokens``): the prompt tokens that a response
    to the same input reports as its ``input_tokens``, tools and instructions included; bad input is a 400 naming
    the field, in the Responses API's terms, and an unknown model a 404."""
    asks = [dict(input=QUESTION), dict(instructions="Be brief.", input=QUESTION),
            dict(input=QUESTION, tools=FLAT_TOOLS, tool_choice="auto"),
            dict(input=[{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hi"}])]
    counts = []
    for ask in asks:
        counted = hermes_client.responses.input_tokens.count(model="tiny", **ask)
        response = hermes_client.responses.create(model="tiny", max_output_tokens=1, **ask)
        assert counted.object == "response.input_tokens"
        assert counted.input_tokens == response.usage.input_tokens, ask
        counts.append(counted.input_tokens)
    assert counts[1] > counts[0] and counts[2] > counts[0]  # the instructions and the tools take tokens
    bad = [({"model": "tiny", "input": QUESTION, "tools": [{"type": "web_search"}]}, "tools"),
           ({"model": "tiny", "input": QUESTION, "previous_response_id": "resp_1"}, "previous_response_id"),
           ({"model": "tiny", "input": [{"role": "user", "content": QUESTION, "name": 3}]}, "input"),
           ({"model": "tiny"}, "input"),
           ({"model": "tiny", "input": QUESTION, "stream": True}, "stream")]
    for body, param in bad:
        r = httpx.post(hermes_server.url("/v1/responses/input_tokens"), json=body, timeout=60)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] is not None and r.json()["error"]["param"].startswith(param), r.text
    r = httpx.post(hermes_server.url("/v1/responses/input_tokens"), json={"model": "nope", "input": "x"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_logprobs_of_a_text_and_a_call_are_the_texts_whole_and_streamed(hermes_client):
    """With a call split out of the text, the message's ``output_text.logprobs`` are the tokens the text takes
    (each token that starts within its bytes), not the call's: the same list whole and streamed, and the stream's
    deltas carry exactly that list."""
    grammar = ('root ::= "I will check.\\n<tool_call>\\n{\\"name\\": \\"get_weather\\", \\"arguments\\": '
               '{\\"city\\": \\"" ("Paris" | "Rome") "\\", \\"days\\": " [1-7] "}}\\n</tool_call>"')
    kwargs = dict(model="tiny", input=QUESTION, tools=FLAT_TOOLS, temperature=1.0, max_output_tokens=200,
                  top_logprobs=2, include=["message.output_text.logprobs"],
                  extra_body={"seed": 3, "structured_outputs": {"grammar": grammar}})
    whole = hermes_client.responses.create(**kwargs)
    assert [o.type for o in whole.output] == ["message", "function_call"]
    text = whole.output[0].content[0].text.encode()
    tokens = whole.output[0].content[0].logprobs
    covered = b"".join(bytes(t.bytes) for t in tokens)
    assert covered.startswith(text) and len(covered) - len(tokens[-1].bytes) < len(text)  # exactly the text's
    assert len(tokens) < whole.usage.output_tokens  # the call's tokens are not among them
    events = list(hermes_client.responses.create(**kwargs, stream=True))
    streamed = events[-1].response.output[0].content[0].logprobs
    deltas = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in tokens]
    assert [(t.token, t.logprob) for t in deltas] == [(t.token, t.logprob) for t in tokens]
