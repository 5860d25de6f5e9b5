"""Reasoning models (``--reasoning-parser``): the thinking split from the answer, with tool calls and structured
output applied to the answer after it.

The server tests serve a scripted model (``testing.scripted_models``) whose greedy answer is always
``<think> they are there</think> The capital and``: from ChatML's generation prompt it opens the block itself (as
Qwen3's hybrid models do); with ``chat_template_kwargs: {"thinking_open": true}`` the template opens it in the
prompt (as DeepSeek-R1's does) and the answer starts inside it. They run a real server over HTTP, with the openai
package where it reads the fields.
"""

from __future__ import annotations

import json
import random

import anthropic
import httpx
import openai
import pytest
import torch

from inferneo.entrypoints.openai.reasoning import (
    REASONING_PARSERS,
    ReasoningMarkers,
    ReasoningPiece,
    ReasoningSplitter,
    ThinkingFormat,
)
from inferneo.entrypoints.openai.serving_chat import AnswerReader
from inferneo.sampling_params import ReasoningSpan, StructuredOutputsParams
from inferneo.structured_output.compiler import SequenceMatcher
from inferneo.structured_output.reasoning_gate import ReasoningGate
from inferneo.testing.scripted_models import make_scripted_checkpoint
from inferneo.testing.server import RemoteServer
from inferneo.testing.tiny_models import make_tiny_tokenizer

THINK = ThinkingFormat("<think>", "</think>")
SCRIPT = ["\n", "<think>", " they", " are", " there", "</think>", " The", " capital", " and"]
THINKING, ANSWER = "they are there", "The capital and"
# ChatML, with an assistant message's earlier thinking rendered before its content (as Qwen3's template does within
# a tool-calling turn), and the block opened in the generation prompt on request
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message.reasoning_content %}{{ '<think>' + message.reasoning_content + '</think>' }}{% endif %}"
    "{{ (message['content'] or '') + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if thinking_open %}{{ '<think>' }}{% endif %}{% endif %}"
)
USER = [{"role": "user", "content": "What is the capital?"}]
OPEN = {"chat_template_kwargs": {"thinking_open": True}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Oslo", "Rome"]}}, "required": ["city"],
    "additionalProperties": False}}}


# ---- the splitter and the gate, alone ------------------------------------------------------------------------------

SPLITS = [
    ("a block, then the answer", "<think>\nLet me see.\n</think>\n\nParis.", False, "Let me see.", "Paris."),
    ("opened by the prompt", "Let me see.\n</think>\n\nParis.", True, "Let me see.", "Paris."),
    ("no block", "Paris.", False, "", "Paris."),
    ("no block, blank first", "\n\nParis.", False, "", "\n\nParis."),
    ("an unclosed block is all thinking", "<think>cut sh", False, "cut sh", ""),
    ("opened by the prompt, never closed", "still thinking", True, "still thinking", ""),
    ("a tag later in the answer is text", "Paris. <think>x</think>", False, "", "Paris. <think>x</think>"),
    ("less-than signs in the thinking", "<think>a < b and </th is not</think>ok", False, "a < b and </th is not", "ok"),
    ("a partial tag at the end", "<think>hm </thi", False, "hm </thi", ""),
    ("empty", "", True, "", ""),
    ("a blank block", "<think>\n\n</think>\n\nHi", False, "", "Hi"),
]


@pytest.mark.parametrize(("text", "open_at_start", "reasoning", "content"), [c[1:] for c in SPLITS],
                         ids=[c[0] for c in SPLITS])
def test_splitter_whole_and_in_any_pieces(text, open_at_start, reasoning, content):
    whole = AnswerReader(ReasoningSplitter(THINK, open_at_start), None).read(text, last=True)
    assert (whole.reasoning, whole.content) == (reasoning, content)
    for cut in range(len(text) + 1):  # every split into three pieces gives the same result
        for cut2 in range(cut, len(text) + 1):
            splitter = ReasoningSplitter(THINK, open_at_start)
            out = splitter.feed(text[:cut])
            out.add(splitter.feed(text[cut:cut2]))
            out.add(splitter.feed(text[cut2:]))
            out.add(splitter.finish())
            assert (out.reasoning, out.content) == (reasoning, content), (cut, cut2)


NEW_FORMATS = ["glm45", "mimo", "seed_oss", "mistral"]


def _format_cases(fmt: ThinkingFormat) -> list[tuple[str, bool, str, str]]:
    """(text, open_at_start, reasoning, content): thinking then an answer, no thinking, thinking cut short (at
    max_tokens, inside a marker too), an answer that uses the format's brackets, and a tool call after the thinking
    (Magistral thinks, then calls tools)."""
    s, e = fmt.start, fmt.end
    return [
        (f"{s}\nLet me see: 2 < 3 [x].\n{e}\n\nParis.", False, "Let me see: 2 < 3 [x].", "Paris."),
        (f"Let me see.{e}Paris.", True, "Let me see.", "Paris."),
        ("Paris [is] <big>.", False, "", "Paris [is] <big>."),
        (f"{s}cut sh", False, "cut sh", ""),
        (f"{s}almost done {e[:-2]}", False, f"almost done {e[:-2]}", ""),
        (f"{s}hm{e}[TOOL_CALLS]get_time[ARGS]{{}}", False, "hm", "[TOOL_CALLS]get_time[ARGS]{}"),
    ]


@pytest.mark.parametrize("name", NEW_FORMATS)
def test_new_formats_split_whole_and_in_random_pieces(name):
    fmt = REASONING_PARSERS[name]
    assert isinstance(fmt, ThinkingFormat)
    rng = random.Random(name)
    for text, open_at_start, reasoning, content in _format_cases(fmt):
        whole = AnswerReader(ReasoningSplitter(fmt, open_at_start), None).read(text, last=True)
        assert (whole.reasoning, whole.content) == (reasoning, content), text
        for _ in range(30):
            splitter, out, at = ReasoningSplitter(fmt, open_at_start), ReasoningPiece(), 0
            while at < len(text):
                size = rng.randint(1, 6)
                out.add(splitter.feed(text[at:at + size]))
                at += size
            out.add(splitter.finish())
            assert (out.reasoning, out.content) == (reasoning, content), text


def test_the_names_read_their_models_tags():
    assert REASONING_PARSERS["glm45"] == REASONING_PARSERS["mimo"] == THINK
    assert REASONING_PARSERS["seed_oss"] == ThinkingFormat("<seed:think>", "</seed:think>")
    assert REASONING_PARSERS["mistral"] == ThinkingFormat("[THINK]", "[/THINK]")


def test_special_markers_keep_special_tokens():
    """Magistral's ``[THINK]`` and ``[/THINK]`` are special tokens: the answers are decoded keeping them, and the
    counter, the span and the prompt's open block read their ids."""
    tokenizer = make_tiny_tokenizer(384)
    tokenizer.add_tokens(["[THINK]", "[/THINK]"], special_tokens=True)
    markers = ReasoningMarkers.for_tokenizer("mistral", tokenizer)
    assert (markers.start_id, markers.end_id, markers.keeps_special_tokens) == (384, 385, True)
    assert markers.span(False) == ReasoningSpan(385, 384, False) and markers.describe() == "[THINK] ... [/THINK]"
    assert markers.opens(tokenizer.encode("[INST]hi[/INST][THINK]")) and not markers.opens(tokenizer.encode("hi"))
    counter = markers.token_counter(False)
    assert counter.add([384, 5, 385, 6]) == [False, False, False, True] and counter.count == 3
    plain = _think_tokenizer()
    plain.add_tokens(["[THINK]", "[/THINK]"])  # as plain tokens (older tokenizers): nothing to keep
    assert not ReasoningMarkers.for_tokenizer("mistral", plain).keeps_special_tokens
    assert not ReasoningMarkers.for_tokenizer("glm45", plain).keeps_special_tokens
    with pytest.raises(ValueError, match="'<seed:think>' and '</seed:think>' as one token"):
        ReasoningMarkers.for_tokenizer("seed_oss", plain)


def _think_tokenizer():
    tokenizer = make_tiny_tokenizer(384)
    tokenizer.add_tokens(["<think>", "</think>"])
    return tokenizer


def test_markers_need_single_tokens_and_read_the_prompt():
    tokenizer = _think_tokenizer()
    markers = ReasoningMarkers.for_tokenizer("qwen3", tokenizer)
    assert (markers.start_id, markers.end_id) == (384, 385)
    assert markers.opens(tokenizer.encode("<|im_start|>assistant\n<think>\n"))
    assert not markers.opens(tokenizer.encode("<|im_start|>assistant\n"))
    assert not markers.opens(tokenizer.encode("<think>\n\n</think>\n\n"))  # enable_thinking false
    with pytest.raises(ValueError, match="'<think>' and '</think>' as one token"):
        ReasoningMarkers.for_tokenizer("deepseek_r1", make_tiny_tokenizer(384))
    special = make_tiny_tokenizer(384)
    special.add_tokens(["<think>", "</think>"], special_tokens=True)
    assert ReasoningMarkers.for_tokenizer("qwen3", special).keeps_special_tokens  # decoded keeping them
    assert not markers.keeps_special_tokens
    with pytest.raises(ValueError, match="reasoning_parser must be one of qwen3"):
        ReasoningMarkers.for_tokenizer("nope", tokenizer)
    counter = markers.token_counter(False)
    assert counter.add([384, 5, 6]) == [False, False, False]  # the thinking's tokens are not the answer's
    assert counter.add([385, 7, 384]) == [False, True, True]
    assert counter.count == 4  # <think> 5 6 </think>
    blank_first = markers.token_counter(False)
    space = tokenizer.encode(" ", add_special_tokens=False)
    assert len(space) == 1 and blank_first.add([*space, 384, 5, 385, 7]) == [True, False, False, False, True]
    assert blank_first.count == 3  # blank before <think>: still the thinking's block, as the splitter reads it
    no_block = markers.token_counter(False)
    no_block.add([5, 385, 6])
    assert no_block.count == 0
    opened = markers.token_counter(True)
    opened.add([5, 6, 7])
    assert opened.count == 3  # never closed: all of it
    assert set(REASONING_PARSERS) >= {"qwen3", "deepseek_r1"}


class _OnlyToken(SequenceMatcher):
    """A matcher allowing one token, then only EOS (0)."""

    def __init__(self, token: int) -> None:
        super().__init__()
        self.token, self.taken = token, []

    def accept_token(self, token_id: int) -> None:
        self.taken.append(token_id)

    @property
    def constrains(self) -> bool:
        return len(self.taken) < 2

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = 0
        allowed = self.token if not self.taken else 0
        bitmask[row, allowed // 32] = 1 << (allowed % 32)


def _allowed(gate: ReasoningGate) -> set[int]:
    words = torch.zeros(1, 2, dtype=torch.int32)
    gate.fill(words, 0)
    bits = [(int(words[0, i // 32]) >> (i % 32)) & 1 for i in range(64)]
    return {i for i, bit in enumerate(bits) if bit}


@pytest.mark.parametrize("start", [40, 63])  # 63: the high bit of its word (a negative int32)
def test_gate_frees_the_thinking_then_hands_over(start):
    inner = _OnlyToken(7)
    gate = ReasoningGate(inner, ReasoningSpan(end_token_id=41, start_token_id=start))
    assert _allowed(gate) == {7, start} and gate.constrains and gate.in_force
    gate.accept_token(start)  # opens the block: every token is free until the end token
    assert _allowed(gate) == set(range(64)) and not gate.in_force
    for token in (3, 9, start):
        gate.accept_token(token)
    assert _allowed(gate) == set(range(64))
    gate.accept_token(41)
    assert _allowed(gate) == {7} and gate.in_force and inner.taken == []
    gate.accept_token(7)
    assert inner.taken == [7] and _allowed(gate) == {0} and gate.num_accepted == 6

    answer_first = ReasoningGate(_OnlyToken(7), ReasoningSpan(end_token_id=41, start_token_id=start))
    answer_first.accept_token(7)  # the answer began without a block: the matcher took it
    assert answer_first.inner.taken == [7] and _allowed(answer_first) == {0}

    opened = ReasoningGate(_OnlyToken(7), ReasoningSpan(end_token_id=41, start_token_id=start, open_at_start=True))
    assert _allowed(opened) == set(range(64))
    opened.accept_token(41)
    assert _allowed(opened) == {7}


def test_span_rides_on_the_constraint_without_changing_its_key():
    plain = StructuredOutputsParams(regex="(yes|no)")
    gated = StructuredOutputsParams(regex="(yes|no)", reasoning={"end_token_id": 5, "start_token_id": 4})
    assert gated.reasoning == ReasoningSpan(5, 4) and gated.key == plain.key
    with pytest.raises(ValueError, match="end_token_id must be a token id"):
        StructuredOutputsParams(regex="x", reasoning={"end_token_id": "5"})
    with pytest.raises(ValueError, match="open_at_start must be a boolean"):
        ReasoningSpan(5, 4, "yes")


# ---- a real server -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scripted_dir(tmp_path_factory):
    return make_scripted_checkpoint(tmp_path_factory.mktemp("scripted-think"), SCRIPT,
                                    added_tokens=("<think>", "</think>"), chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def server(scripted_dir):
    with RemoteServer(scripted_dir, "--served-model-name", "think", "--reasoning-parser", "qwen3",
                      "--tool-call-parser", "hermes", "--kv-cache-memory", "16MiB", "--num-threads", "1",
                      "--disable-access-log") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)


def _chat(client, **kwargs):
    body = {"model": "think", "messages": USER, "max_tokens": 40, "temperature": 0, **kwargs}
    extra = body.pop("extra_body", {})
    return client.chat.completions.create(**body, extra_body=extra or None)


@pytest.mark.parametrize("opened", [False, True], ids=["model-opens", "prompt-opens"])
def test_chat_returns_the_thinking_apart(client, opened):
    r = _chat(client, extra_body=OPEN if opened else {})
    message = r.choices[0].message
    assert message.content == ANSWER and r.choices[0].finish_reason == "stop"
    assert message.reasoning == message.reasoning_content == THINKING
    assert r.usage.completion_tokens == (9 if not opened else 8)  # the script, with <|im_end|>
    assert r.usage.completion_tokens_details.reasoning_tokens == (5 if not opened else 4)  # <think> .. </think>


@pytest.mark.parametrize("opened", [False, True], ids=["model-opens", "prompt-opens"])
def test_streamed_thinking_equals_the_whole(client, opened):
    extra = {**(OPEN if opened else {}), "n": 2}
    # continuous_usage_stats: every chunk has the usage so far, its reasoning tokens too
    stream = _chat(client, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True},
                   extra_body=extra)
    reasoning, content, usage = {0: "", 1: ""}, {0: "", 1: ""}, None
    thinking_so_far = []
    for chunk in stream:
        usage = chunk.usage
        thinking_so_far.append(usage.completion_tokens_details.reasoning_tokens)
        for choice in chunk.choices:
            delta = choice.delta
            assert (delta.model_extra or {}).get("reasoning") == (delta.model_extra or {}).get("reasoning_content")
            reasoning[choice.index] += (delta.model_extra or {}).get("reasoning") or ""
            content[choice.index] += delta.content or ""
            assert "<think>" not in (delta.content or "") and "</think>" not in (delta.content or "")
    assert reasoning == {0: THINKING, 1: THINKING} and content == {0: ANSWER, 1: ANSWER}
    assert usage.completion_tokens_details.reasoning_tokens == 2 * (5 if not opened else 4)
    assert thinking_so_far == sorted(thinking_so_far) and thinking_so_far[0] == 0


def test_include_reasoning_false_leaves_it_out(server, client):
    message = _chat(client, extra_body={"include_reasoning": False}).choices[0].message
    assert message.content == ANSWER and "reasoning" not in (message.model_extra or {})
    r = httpx.post(server.url("/v1/chat/completions"), json={
        "model": "think", "messages": USER, "max_tokens": 40, "include_reasoning": "no"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "include_reasoning"


@pytest.mark.parametrize("opened", [False, True], ids=["model-opens", "prompt-opens"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_structured_output_applies_after_the_thinking(client, opened, stream):
    """The regex constrains the answer, not the thinking: the model thinks its script, then answers yes or no."""
    extra = {**(OPEN if opened else {}), "structured_outputs": {"regex": "(yes|no)"}}
    if not stream:
        message = _chat(client, extra_body=extra).choices[0].message
        reasoning, content = message.reasoning, message.content
    else:
        reasoning = content = ""
        for chunk in _chat(client, stream=True, extra_body=extra):
            for choice in chunk.choices:
                reasoning += (choice.delta.model_extra or {}).get("reasoning") or ""
                content += choice.delta.content or ""
    assert reasoning == THINKING and content in ("yes", "no")


def test_json_schema_after_the_thinking(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    message = _chat(client, response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
                    max_tokens=60).choices[0].message
    assert message.reasoning == THINKING and isinstance(json.loads(message.content)["ok"], bool)


def test_tool_calls_are_read_from_the_answer(client):
    grammar = 'root ::= "<tool_call>{\\"name\\": \\"get_weather\\", \\"arguments\\": {\\"city\\": \\"Oslo\\"}}</tool_call>"'
    r = _chat(client, tools=[WEATHER], max_tokens=200, extra_body={"structured_outputs": {"grammar": grammar}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.reasoning == THINKING
    assert choice.message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == \
        [("get_weather", {"city": "Oslo"})]
    forced = _chat(client, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                   max_tokens=400).choices[0]
    assert forced.message.reasoning == THINKING and forced.finish_reason == "tool_calls"
    assert forced.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(forced.message.tool_calls[0].function.arguments)["city"] in ("Oslo", "Rome")


def test_earlier_thinking_goes_back_to_the_template(server):
    """An assistant message's thinking, under either name, reaches the chat template as ``reasoning_content``."""
    messages = [*USER, {"role": "assistant", "content": "x", "reasoning": "first"},
                {"role": "user", "content": "y"}, {"role": "assistant", "content": "z", "reasoning_content": "2nd"}]
    r = httpx.post(server.url("/tokenize"), json={"model": "think", "messages": messages}, timeout=60)
    assert r.status_code == 200, r.text
    text = httpx.post(server.url("/detokenize"), json={"tokens": r.json()["tokens"]}, timeout=60).json()["prompt"]
    assert "assistant\n<think>first</think>x<|im_end|>" in text and "<think>2nd</think>z" in text


def test_anthropic_messages_give_the_thinking_as_a_thinking_block(server, client):
    """``/v1/messages`` (through the anthropic package): the thinking is a ``thinking`` block before the text, whole
    and streamed (``thinking_delta`` then ``text_delta``); a thinking block sent back in an assistant turn reaches the
    template as that message's ``reasoning_content``, as the chat endpoint renders it."""
    messages_client = anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    kwargs = dict(model="think", max_tokens=40, messages=USER, extra_body={"temperature": 0})
    message = messages_client.messages.create(**kwargs)
    thinking, text = message.content
    assert (thinking.type, thinking.thinking, text.type, text.text) == ("thinking", THINKING, "text", ANSWER)
    assert message.stop_reason == "end_turn"
    with messages_client.messages.stream(**kwargs) as stream:
        deltas = [event.delta.type for event in stream if event.type == "content_block_delta"]
        final = stream.get_final_message()
    assert [block.model_dump(exclude={"parsed_output"}) for block in final.content] == [
        block.model_dump() for block in message.content]
    assert deltas[0] == "thinking_delta" and deltas[-1] == "text_delta"
    earlier = [*USER, {"role": "assistant", "content": [{"type": "thinking", "thinking": "2nd", "signature": ""},
                                                        {"type": "text", "text": "z"}]},
               {"role": "user", "content": "y"}]
    counted = messages_client.messages.count_tokens(model="think", messages=earlier).input_tokens
    chat = _chat(client, max_tokens=1, messages=[*USER, {"role": "assistant", "content": "z", "reasoning_content": "2nd"},
                                                 {"role": "user", "content": "y"}])
    assert counted == chat.usage.prompt_tokens


def test_responses_api_reasoning_item(client):
    r = client.responses.create(model="think", input="What is the capital?", max_output_tokens=40, temperature=0)
    assert [item.type for item in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == THINKING and r.output[0].summary == []
    assert r.output_text == ANSWER
    assert r.usage.output_tokens_details.reasoning_tokens == 5
    events = list(client.responses.create(model="think", input="What is the capital?", max_output_tokens=40,
                                          temperature=0, stream=True))
    kinds = [e.type for e in events]
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert deltas == THINKING
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    final = events[-1].response
    assert final.status == "completed" and [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == THINKING and final.output_text == ANSWER
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_responses_input_takes_a_reasoning_item(client):
    first = client.responses.create(model="think", input="What is the capital?", max_output_tokens=40, temperature=0)
    follow_up = [{"role": "user", "content": "What is the capital?"},
                 *[item.model_dump(exclude_none=True) for item in first.output],
                 {"role": "user", "content": "And then?"}]
    again = client.responses.create(model="think", input=follow_up, max_output_tokens=40, temperature=0)
    assert again.output_text == ANSWER
    counted = client.responses.input_tokens.count(model="think", input=follow_up)
    plain = client.responses.input_tokens.count(model="think", input=[follow_up[0], follow_up[2], follow_up[3]])
    assert counted.input_tokens > plain.input_tokens  # the thinking went into the assistant turn's rendering
    with pytest.raises(openai.BadRequestError, match="reasoning_text part"):
        client.responses.create(model="think", input=[{"type": "reasoning", "content": [{"type": "x"}]}])


def test_without_the_parser_the_tags_stay_in_the_content(scripted_dir):
    with RemoteServer(scripted_dir, "--served-model-name", "think", "--kv-cache-memory", "16MiB",
                      "--num-threads", "1", "--disable-access-log") as srv:
        r = httpx.post(srv.url("/v1/chat/completions"), json={"model": "think", "messages": USER, "max_tokens": 40,
                                                              "temperature": 0}, timeout=60).json()
    message = r["choices"][0]["message"]
    assert message["content"] == "<think> they are there</think> The capital and" and "reasoning" not in message
    assert "completion_tokens_details" not in r["usage"]


def test_inferneo_client_reads_the_thinking(server):
    """Inferneo's own client types the fields: message and delta ``reasoning``, ``reasoning_tokens``."""
    from inferneo import InferneoClient

    with InferneoClient(server.url(""), max_retries=0) as inferneo_client:
        r = inferneo_client.chat.completions.create(model="think", messages=USER, max_tokens=40, temperature=0)
        assert r.choices[0].message.reasoning == r.choices[0].message.reasoning_content == THINKING
        assert r.choices[0].message.content == ANSWER and r.usage.completion_tokens_details.reasoning_tokens == 5
        pieces = [(c.choices[0].delta.reasoning or "", c.choices[0].delta.content or "")
                  for c in inferneo_client.chat.completions.create(model="think", messages=USER, max_tokens=40,
                                                                   temperature=0, stream=True) if c.choices]
    assert "".join(p[0] for p in pieces) == THINKING and "".join(p[1] for p in pieces) == ANSWER


def _reasoning_item(text: str) -> dict:
    return {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def test_responses_input_reasoning_items_in_odd_places(server, client):
    """Reasoning items in a row are one turn's thinking; one that another role's message follows belongs to no turn
    (it does not ride on to a later assistant message); the count is that of the chat rendering of the same turns."""
    user = [{"role": "user", "content": c} for c in ("hi", "q", "more")]
    answer = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]}

    def chat_count(messages: list[dict]) -> int:
        r = httpx.post(server.url("/tokenize"), json={"model": "think", "messages": messages}, timeout=60)
        assert r.status_code == 200, r.text
        return len(r.json()["tokens"])

    def responses_count(items: list[dict]) -> int:
        return client.responses.input_tokens.count(model="think", input=items).input_tokens

    chat_answer = {"role": "assistant", "content": "ok"}
    stray = [user[0], _reasoning_item("a b c d e f g h"), user[1], answer, user[2]]
    assert responses_count(stray) == chat_count([user[0], user[1], chat_answer, user[2]])
    first = [_reasoning_item("a b c d"), user[0], answer, user[1]]
    assert responses_count(first) == chat_count([user[0], chat_answer, user[1]])
    two = [user[0], _reasoning_item("alpha"), _reasoning_item("beta"), answer, user[1]]
    assert responses_count(two) == chat_count([user[0], {**chat_answer, "reasoning_content": "alpha\nbeta"}, user[1]])
    assert client.responses.create(model="think", input=stray, max_output_tokens=40, temperature=0).output_text \
        == ANSWER


@pytest.mark.parametrize(("max_output_tokens", "status"), [(3, "incomplete"), (5, "completed")],
                         ids=["cut-in-the-thinking", "cut-after-it"])
def test_responses_reasoning_item_is_incomplete_only_when_cut_inside_it(client, max_output_tokens, status):
    """A cut that comes after ``</think>`` (before any answer text) leaves the thinking whole: its item is
    completed, whole and streamed; the response is incomplete either way."""
    ask = {"model": "think", "input": "What is the capital?", "max_output_tokens": max_output_tokens,
           "temperature": 0}
    whole = client.responses.create(**ask)
    streamed = list(client.responses.create(**ask, stream=True))[-1].response
    for r in (whole, streamed):
        assert r.status == "incomplete" and r.output[0].type == "reasoning"
        assert r.output[0].status == status


@pytest.mark.parametrize("opened", [False, True], ids=["model-opens", "prompt-opens"])
def test_include_reasoning_false_hides_the_thinking_from_logprobs(client, opened):
    """With ``include_reasoning: false`` the logprobs are the answer's tokens only (no ``<think>`` or thinking token
    text leaks through them), whole and streamed alike; by default they are every token's, as vLLM sends."""
    extra = {**(OPEN if opened else {}), "include_reasoning": False}
    whole = _chat(client, logprobs=True, top_logprobs=1, extra_body=extra).choices[0]
    streamed = [lp.token for chunk in _chat(client, logprobs=True, top_logprobs=1, stream=True, extra_body=extra)
                for choice in chunk.choices if choice.logprobs for lp in choice.logprobs.content or []]
    answer = [" The", " capital", " and"]
    assert [lp.token for lp in whole.logprobs.content] == streamed == answer
    assert whole.message.content == ANSWER
    default = _chat(client, logprobs=True, extra_body=OPEN if opened else {}).choices[0]
    assert [lp.token for lp in default.logprobs.content][-3:] == answer and len(default.logprobs.content) > 3


def test_blank_before_the_block_is_counted_as_the_splitter_reads_it(tmp_path):
    """A model that writes a blank token before ``<think>``: the block is still its thinking (split out), and
    ``reasoning_tokens`` counts it."""
    script = ["\n", " ", "<think>", " they", "</think>", " The", " capital"]
    model = make_scripted_checkpoint(tmp_path, script, added_tokens=("<think>", "</think>"), chat_template=TEMPLATE)
    with RemoteServer(model, "--served-model-name", "think", "--reasoning-parser", "qwen3", "--kv-cache-memory",
                      "16MiB", "--num-threads", "1", "--disable-access-log") as srv:
        r = httpx.post(srv.url("/v1/chat/completions"), json={"model": "think", "messages": USER, "max_tokens": 20,
                                                              "temperature": 0}, timeout=60).json()
    message = r["choices"][0]["message"]
    assert (message["reasoning"], message["content"]) == ("they", "The capital")
    assert r["usage"]["completion_tokens_details"]["reasoning_tokens"] == 3  # <think> they </think>
