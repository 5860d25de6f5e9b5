"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: Anthropic's Messages API over the chat path.

A Messages request runs as its chat completion request (``protocol.MessagesRequest.to_chat``, submitted by the chat
endpoint's ``start_chat`` and read by its ``answer_reader``: the server's reasoning and tool-call parsers, or the
grammar of a forced ``tool_choice``). Its answer leaves as Anthropic's ``Message``: a ``thinking`` block (a
reasoning model's thinking, with the server's ``--reasoning-parser``), a ``text`` block, and a ``tool_use`` block
(``input``: the call's arguments, parsed) for each tool call; ``stop_reason`` ``end_turn``, ``max_tokens``,
``stop_sequence`` (with ``stop_sequence`` the string that matched) or ``tool_use``. ``usage`` counts as Anthropic
does: ``input_tokens`` are the prompt tokens computed afresh, ``cache_read_input_tokens`` those the prefix cache
held (their sum is the prompt, which ``count_tokens`` gives), ``output_tokens`` the answer's.

Streamed, the events are Anthropic's, each a server-sent event named by its type: ``message_start`` (the message,
empty), ``ping``, then for each block ``content_block_start``, its ``content_block_delta`` events (``text_delta``,
``thinking_delta``, ``input_json_delta``: pieces of the call's arguments) and ``content_block_stop``; last
``message_delta`` (the stop reason and the usage) and ``message_stop``. An error after the first event is an
``error`` event; no ``[DONE]`` line follows.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from inferneo.entrypoints.anthropic.errors import anthropic_error_body
from inferneo.entrypoints.anthropic.protocol import CountTokensRequest, MessagesRequest, in_messages_terms
from inferneo.entrypoints.openai.errors import APIError, to_api_error
from inferneo.entrypoints.openai.protocol import MAX_TOOLS, ChatCompletionRequest
from inferneo.entrypoints.openai.serving_chat import (
    AnswerReader,
    StartedChat,
    answer_reader,
    count_prompt_tokens,
    start_chat,
)
from inferneo.entrypoints.openai.serving_common import (
    ServerContext,
    cancel_on_disconnect,
    collect_finals,
    event_stream,
    sse,
)
from inferneo.entrypoints.openai.tool_parsers import ToolCallPiece, calls_of
from inferneo.json_text import loads_bounded


async def create_message(ctx: ServerContext, req: MessagesRequest, raw: Request) -> Response:
    """Answer a Messages request: the whole ``Message``, or (``stream``) Anthropic's events."""
    chat = req.to_chat()
    message_id = f"msg_{uuid.uuid4().hex}"
    try:
        started = await start_chat(ctx, chat, message_id, "messages")
    except APIError as exc:  # the checks of the chat request: named in this request's terms
        raise in_messages_terms(exc) from None
    job = _Message(ctx, chat, message_id, started)
    if req.stream:
        return event_stream(job.events(), started.group.abort)
    return await cancel_on_disconnect(raw, job.whole())


async def count_message_tokens(ctx: ServerContext, req: CountTokensRequest) -> dict[str, int]:
    """``POST /v1/messages/count_tokens``: the prompt tokens of the request's system prompt, messages and tools, as
    :func:`create_message` renders them for the model, each image as many tokens as the model reads it in (nothing
    is generated)."""
    try:
        return {"input_tokens": await count_prompt_tokens(ctx, req.to_chat())}
    except APIError as exc:
        raise in_messages_terms(exc) from None


def tool_use_id() -> str:
    """A fresh id for a ``tool_use`` block, in Anthropic's shape: ``toolu_`` and 24 random characters."""
    return f"toolu_{uuid.uuid4().hex[:24]}"


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's ``input``: its arguments (a JSON string) as an object; ``{}`` when they are not one (a call that
    ``max_tokens`` cut short)."""
    try:
        value = loads_bounded(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def stop_reason_of(finish_reason: str | None, engine_stop: int | str | None, called: bool) -> tuple[str, str | None]:
    """Anthropic's ``stop_reason`` and ``stop_sequence`` for an answer that finished with ``finish_reason`` (the
    engine's ``stop_reason``: the stop string that matched, a stop token id, or None) and called tools or not."""
    if finish_reason == "length":
        return "max_tokens", None
    if called:
        return "tool_use", None
    if isinstance(engine_stop, str):
        return "stop_sequence", engine_stop
    return "end_turn", None


def usage_of(num_prompt: int, num_cached: int, num_output: int) -> dict[str, int]:
    """Anthropic's ``usage``: the prompt tokens split into those computed (``input_tokens``) and those read from the
    prefix cache; nothing is written to a cache on request, so ``cache_creation_input_tokens`` is 0."""
    return {"input_tokens": num_prompt - num_cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": num_cached, "output_tokens": num_output}


class _Message:
    """One Messages request in flight."""

    def __init__(self, ctx: ServerContext, chat: ChatCompletionRequest, message_id: str,
                 started: StartedChat) -> None:
        self.ctx = ctx
        self.chat = chat
        self.id = message_id
        self.model = started.model
        self.group = started.group
        self.num_prompt = started.num_prompt_tokens
        self.thinking_open = bool(started.thinking_open and started.thinking_open[0])
        self.max_calls = 1 if chat.parallel_tool_calls is False else MAX_TOOLS  # disable_parallel_tool_use

    def new_reader(self) -> AnswerReader:
        """A fresh reader of the answer: its thinking, text and tool calls."""
        return answer_reader(self.ctx, self.chat, self.thinking_open)

    def body(self, content: list[dict[str, Any]], stop_reason: str | None, stop_sequence: str | None,
             usage: dict[str, int]) -> dict[str, Any]:
        """The ``Message`` object."""
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage}

    async def whole(self) -> Response:
        finals = await collect_finals(self.group)
        final = finals[0]
        choice = final.outputs[0]
        reader = self.new_reader()
        piece = reader.read(choice.text, last=True)
        content: list[dict[str, Any]] = []
        if piece.reasoning and self.chat.include_reasoning:
            content.append(_thinking_block(piece.reasoning))
        if piece.content:
            content.append({"type": "text", "text": piece.content})
        calls = calls_of(piece.calls)[:self.max_calls]
        content += [_tool_use_block(reader.call_id(tool_use_id), call.name, tool_input(call.arguments))
                    for call in calls]
        stop_reason, stop_sequence = stop_reason_of(choice.finish_reason, choice.stop_reason, bool(calls))
        usage = usage_of(len(final.prompt_token_ids), final.num_cached_tokens, len(choice.token_ids))
        return JSONResponse(self.body(content, stop_reason, stop_sequence, usage))

    async def events(self) -> AsyncIterator[bytes]:
        """The stream's events; an error after the first is Anthropic's ``error`` event, which ends the stream."""
        stream = _BlockStream(self.max_calls)
        yield stream.event("message_start", message=self.body([], None, None, {
            "input_tokens": self.num_prompt, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
            "output_tokens": 0}))
        yield stream.event("ping")
        try:
            async for event in self._answer_events(stream):
                yield event
        except Exception as exc:  # the engine failed the request mid-answer: the client gets it in this API's form
            error = to_api_error(exc)
            yield stream.event("error", error=anthropic_error_body(error.status, error.message)["error"])

    async def _answer_events(self, stream: _BlockStream) -> AsyncIterator[bytes]:
        reader = self.new_reader()
        stream.call_id = reader.call_id
        num_cached = num_output = 0
        finish_reason, engine_stop = None, None
        async for _, delta in self.group:
            num_cached = delta.num_cached_tokens
            if not delta.outputs:
                continue
            choice = delta.outputs[0]
            num_output += len(choice.token_ids)
            if choice.finish_reason is not None:
                finish_reason, engine_stop = choice.finish_reason, choice.stop_reason
            piece = reader.read(choice.text, choice.finish_reason is not None)
            thinking = piece.reasoning if self.chat.include_reasoning else ""
            for event in stream.piece(thinking, piece.content, piece.calls):
                yield event
        for event in stream.close():
            yield event
        stop_reason, stop_sequence = stop_reason_of(finish_reason, engine_stop, stream.called)
        yield stream.event("message_delta", delta={"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                           usage=usage_of(self.num_prompt, num_cached, num_output))
        yield stream.event("message_stop")


class _BlockStream:
    """The content blocks of a streamed message, opened and closed one after another as the answer's pieces
    arrive, and the events that say so."""

    def __init__(self, max_calls: int) -> None:
        self.max_calls = max_calls
        self.num_blocks = 0  # blocks opened so far (the next one's index)
        self.open_type: str | None = None  # the type of the open block (the last opened), if one is open
        self.calls: dict[int, int] = {}  # the parser's call index -> its tool_use block's index
        self.call_id: Callable[[Callable[[], str]], str] = lambda api_id: api_id()  # the answer's reader's, once
        # it reads (AnswerReader.call_id)

    @property
    def called(self) -> bool:
        """Whether the answer called a tool (a call kept: within ``max_calls``)."""
        return bool(self.calls)

    @staticmethod
    def event(kind: str, **fields: Any) -> bytes:
        """One server-sent event: its ``event:`` line names its type, its ``data:`` line holds the JSON."""
        return b"event: " + kind.encode() + b"\n" + sse({"type": kind, **fields})

    def piece(self, thinking: str, text: str, calls: list[ToolCallPiece]) -> list[bytes]:
        """The events for the next piece of the answer: its thinking, its text and pieces of its tool calls."""
        events: list[bytes] = []
        if thinking:
            if self.open_type != "thinking":
                events += self._open(_thinking_block(""))
            events.append(self._delta({"type": "thinking_delta", "thinking": thinking}))
        if text:
            if self.open_type != "text":
                events += self._open({"type": "text", "text": ""})
            events.append(self._delta({"type": "text_delta", "text": text}))
        for call in calls:
            if call.index >= self.max_calls:
                continue
            if call.index not in self.calls:
                events += self._open(_tool_use_block(self.call_id(tool_use_id), call.name or "", {}))
                self.calls[call.index] = self.num_blocks - 1
            if call.arguments:
                events.append(self._delta({"type": "input_json_delta", "partial_json": call.arguments},
                                          self.calls[call.index]))
        return events

    def close(self) -> list[bytes]:
        """The stop event of the block still open, if any."""
        if self.open_type is None:
            return []
        self.open_type = None
        return [self.event("content_block_stop", index=self.num_blocks - 1)]

    def _open(self, block: dict[str, Any]) -> list[bytes]:
        events = self.close()
        events.append(self.event("content_block_start", index=self.num_blocks, content_block=block))
        self.num_blocks += 1
        self.open_type = block["type"]
        return events

    def _delta(self, delta: dict[str, Any], index: int | None = None) -> bytes:
        return self.event("content_block_delta", index=self.num_blocks - 1 if index is None else index, delta=delta)


def _thinking_block(thinking: str) -> dict[str, Any]:
    """A ``thinking`` block (its ``signature``, which Anthropic's service uses to check thinking sent back, is
    empty: this server checks none)."""
    return {"type": "thinking", "thinking": thinking, "signature": ""}


def _tool_use_block(block_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": block_id, "name": name, "input": arguments}
