"""Request parsing and parameter mapping of the server, without a model: prompt and message forms, the defaults
chain (request, then generation_config, then OpenAI), and how errors map to statuses."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from inferneo.engine.async_engine import (
    EngineDeadError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
)
from inferneo.entrypoints.openai.errors import to_api_error
from inferneo.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from inferneo.entrypoints.openai.serving_common import sampling_params
from inferneo.sampling_params import SamplingParams


@pytest.mark.parametrize(("prompt", "expected"), [
    ("hi", ["hi"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_prompt_forms(prompt, expected):
    assert CompletionRequest(prompt=prompt).prompt_list() == expected


@pytest.mark.parametrize("prompt", [[], [[]], ["a", 1], [1.5], None, {"text": "x"}, [True]])
def test_bad_prompts_are_refused(prompt):
    with pytest.raises(ValidationError, match="prompt"):
        CompletionRequest(prompt=prompt)


def test_messages_one_conversation_or_many_and_text_parts():
    one = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                      {"type": "text", "text": "b"}]}])
    assert one.conversations() == [[{"role": "user", "content": "a\nb"}]]
    many = ChatCompletionRequest(messages=[[{"role": "user", "content": "x"}],
                                           [{"role": "system", "content": ""}, {"role": "user", "content": "y"}]])
    assert many.conversations() == [[{"role": "user", "content": "x"}],
                                    [{"role": "system", "content": ""}, {"role": "user", "content": "y"}]]
    for bad in ([], [[]], [{"role": "user", "content": 3}], [{"role": "user", "content": [{"type": "image_url"}]}],
                [{"role": "system", "content": None}], [{"role": "user"}]):
        with pytest.raises(ValidationError, match="messages"):
            ChatCompletionRequest(messages=bad)


def test_unknown_fields_are_refused():
    with pytest.raises(ValidationError, match="max_tokenz"):
        CompletionRequest(prompt="x", max_tokenz=3)


def test_omitted_fields_take_generation_config_defaults_then_openai_ones():
    defaults = SamplingParams(temperature=0.3, top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.2)
    params = sampling_params(CompletionRequest(prompt="x"), defaults, 16, None)
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty) == (
        0.3, 0.9, 20, 0.05, 1.2)
    asked = CompletionRequest(prompt="x", temperature=1.0, top_p=0.5, top_k=-1, repetition_penalty=1.0,
                              stop="END", seed=4, n=2, presence_penalty=0.5, min_tokens=2, ignore_eos=True,
                              stop_token_ids=[7], skip_special_tokens=False)
    params = sampling_params(asked, defaults, 16, 3)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (1.0, 0.5, 0, 1.0)
    assert params.stop == ["END"] and params.seed == 4 and params.n == 2 and params.presence_penalty == 0.5
    assert params.min_tokens == 2 and params.ignore_eos and params.stop_token_ids == [7]
    assert params.logprobs == 3 and params.max_tokens == 16 and not params.skip_special_tokens
    plain = sampling_params(CompletionRequest(prompt="x"), SamplingParams(), 16, None)
    assert (plain.temperature, plain.top_p, plain.top_k) == (1.0, 1.0, 0)


def test_errors_map_to_statuses():
    assert to_api_error(InvalidRequestError("too long", "prompt")).status == 400
    full = to_api_error(QueueFullError("busy"))
    assert full.status == 429 and full.headers["Retry-After"] == "1"
    assert to_api_error(EngineDeadError("dead")).status == 503
    assert to_api_error(RequestFailedError("boom")).status == 500
    bad = to_api_error(ValueError("top_p must be in (0, 1], got 2"))
    assert bad.status == 400 and bad.param == "top_p"
    assert to_api_error(KeyError("x")).status == 500


def test_an_event_is_one_line_whatever_the_text_holds():
    """Text with U+0085, U+2028 or U+2029 (which httpx's iter_lines, like str.splitlines, takes for line
    breaks) still streams as one ``data:`` line per event, and decodes to the same text."""
    import json

    from httpx._decoders import LineDecoder

    from inferneo.entrypoints.openai.serving_common import sse

    text = "a\x85b\u2028c\u2029d\ne\x1cé"
    event = sse({"choices": [{"text": text}]})
    lines = [line for line in LineDecoder().decode(event.decode()) if line]
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert json.loads(lines[0][len("data: "):]) == {"choices": [{"text": text}]}


def test_reasoning_effort_reaches_the_chat_template(tiny_llama_dir):
    """As in vLLM, ``reasoning_effort`` is a chat-template variable (gpt-oss's template reads it); an explicit
    ``chat_template_kwargs`` entry wins."""
    from transformers import AutoTokenizer

    from inferneo.entrypoints.openai.serving_common import render_chat

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    tokenizer.chat_template = ("{% for m in messages %}{{ m.content }}{% endfor %}"
                               "|effort={{ reasoning_effort | default('unset') }}")
    messages = [{"role": "user", "content": "hi"}]

    def rendered(**fields) -> str:
        req = ChatCompletionRequest(messages=messages, **fields)
        return tokenizer.decode(render_chat(tokenizer, req.conversations()[0], True, req.template_kwargs()))

    assert rendered().endswith("|effort=unset")
    assert rendered(reasoning_effort="high").endswith("|effort=high")
    assert rendered(reasoning_effort="high", chat_template_kwargs={"reasoning_effort": "low"}).endswith("|effort=low")


def test_long_prompts_are_tokenized_off_the_event_loop():
    """A request with at least ``OFF_LOOP_TEXT_CHARS`` characters of text is tokenized on the server's tokenizer
    thread (the event loop keeps serving other requests meanwhile); shorter ones inline; errors come back as
    raised."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from inferneo.entrypoints.openai.serving_common import (
        OFF_LOOP_TEXT_CHARS,
        ServerContext,
        conversation_chars,
    )

    engine = SimpleNamespace(default_sampling_params=SamplingParams, tokenizer=SimpleNamespace(chat_template=None))
    ctx = ServerContext(engine, ["m"], "m", tool_call_parser="none")

    def where() -> list[list[int]]:
        return [[len(threading.current_thread().name)], [threading.current_thread() is threading.main_thread()]]

    def fails() -> list[list[int]]:
        raise ValueError("refused")

    async def run():
        small = await ctx.tokenize_off_loop(OFF_LOOP_TEXT_CHARS - 1, where)
        large = await ctx.tokenize_off_loop(OFF_LOOP_TEXT_CHARS, where)
        with pytest.raises(ValueError, match="refused"):
            await ctx.tokenize_off_loop(OFF_LOOP_TEXT_CHARS, fails)
        return small, large

    small, large = asyncio.run(run())
    assert small[1] == [True] and large[1] == [False]
    ctx.tokenizer_thread.shutdown()
    assert conversation_chars([{"role": "user", "content": "abc"},
                               {"role": "user", "content": [{"type": "text", "text": "de"}, {"type": "image"}]},
                               {"role": "assistant", "content": None}]) == 5
