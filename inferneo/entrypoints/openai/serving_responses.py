"""``POST /v1/responses``: OpenAI's Responses API over the chat path, whole or as a stream of typed events.

The request becomes a chat request (``protocol_responses.ResponsesRequest.to_chat``) and runs as one; its answer
leaves as a response object whose ``output`` holds a ``reasoning`` item (a reasoning model's thinking, as one
``reasoning_text`` part, with the server's ``--reasoning-parser``), a ``message`` item (the text, as one
``output_text`` part) and a ``function_call`` item for each tool call the server's tool-call parser (or a forced
``tool_choice``) found. Streamed, the events are OpenAI's: ``response.created``, ``response.in_progress``, then
for each item ``response.output_item.added``, its deltas (``response.reasoning_text.delta`` or
``response.output_text.delta`` after ``response.content_part.added``; ``response.function_call_arguments.delta``)
and its ``...done`` events, and last ``response.completed`` (or
``response.incomplete`` when ``max_output_tokens`` cut the answer) carrying the whole response. Each event is a
server-sent event named by its type, with a ``sequence_number`` counting from 0; no ``[DONE]`` line follows.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from inferneo.entrypoints.openai.errors import APIError, to_api_error
from inferneo.entrypoints.openai.protocol import MAX_TOOLS, ChatCompletionRequest, now
from inferneo.entrypoints.openai.protocol_responses import (
    InputTokensRequest,
    ResponsesRequest,
    in_responses_terms,
)
from inferneo.entrypoints.openai.reasoning import TokenCounter
from inferneo.entrypoints.openai.serving_chat import (
    AnswerReader,
    StartedChat,
    answer_reader,
    chat_logprobs,
    count_prompt_tokens,
    start_chat,
    tool_call_id,
)
from inferneo.entrypoints.openai.serving_common import (
    ServerContext,
    cancel_on_disconnect,
    collect_finals,
    event_stream,
    sse,
    text_tokens,
)
from inferneo.entrypoints.openai.tool_parsers import (
    ParsedPiece,
    calls_of,
)
from inferneo.json_text import loads_bounded


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


async def create_response(ctx: ServerContext, req: ResponsesRequest, raw: Request) -> Response:
    req.check_supported()
    chat = req.to_chat(ctx.image_files)
    response_id = _item_id("resp")
    try:
        started = await start_chat(ctx, chat, response_id, "input")
    except APIError as exc:  # the checks of the chat request: named in this request's terms
        raise in_responses_terms(exc) from None
    job = _Response(ctx, req, chat, response_id, started)
    if req.stream:
        return event_stream(job.events(), started.group.abort)
    return await cancel_on_disconnect(raw, job.whole())


async def count_input_tokens(ctx: ServerContext, body: InputTokensRequest) -> dict[str, Any]:
    """``POST /v1/responses/input_tokens``: the prompt tokens the request's input, instructions and tools take, as
    :func:`create_response` would render them for the model, each image as many tokens as the model reads it in
    (nothing is generated)."""
    req = body.as_response_request()
    req.check_supported()
    try:
        count = await count_prompt_tokens(ctx, req.to_chat(ctx.image_files))
    except APIError as exc:
        raise in_responses_terms(exc) from None
    return {"object": "response.input_tokens", "input_tokens": count}


class _Response:
    """One response in flight."""

    def __init__(self, ctx: ServerContext, req: ResponsesRequest, chat: ChatCompletionRequest, response_id: str,
                 started: StartedChat) -> None:
        self.ctx = ctx
        self.req = req
        self.chat = chat
        self.id = response_id
        self.model = started.model
        self.group = started.group
        self.created_at = now()
        self.top_k = (req.top_logprobs or 0) if req.wants_logprobs() else None
        # a grammar forces the answer to be calls (tool_choice required or a named function): no message item
        self.forced_calls = chat.tool_mode() in ("required", "named")
        self.max_calls = 1 if req.parallel_tool_calls is False else (req.max_tool_calls or MAX_TOOLS)
        self.temperature = started.params.temperature  # as sampled: the request's, else the model's default
        self.top_p = started.params.top_p
        self.reasoning = ctx.reasoning
        self.thinking_open = bool(started.thinking_open and started.thinking_open[0])

    def new_reader(self) -> AnswerReader:
        """A fresh reader of the answer: its thinking, text and tool calls."""
        return answer_reader(self.ctx, self.chat, self.thinking_open)

    def new_counter(self) -> TokenCounter | None:
        """With a reasoning parser: a fresh count of the answer's thinking tokens."""
        return self.reasoning.token_counter(self.thinking_open) if self.reasoning is not None else None

    def logprobs(self, choice, answer: list[bool] | None = None) -> list[dict[str, Any]]:
        """The log-probabilities of a choice's (or delta's) tokens that are part of its text, in the chat shape
        (which the Responses API's ``output_text.logprobs`` shares); with a reasoning parser, only those of the
        tokens that ``answer`` (``TokenCounter.add``'s, one per token) marks the answer's, not the thinking's
        nor a marker's."""
        if self.top_k is None:
            return []
        token_ids, logprobs = text_tokens(choice, False, answer)
        return chat_logprobs(token_ids, logprobs, self.top_k, self.ctx.token_bytes)

    def body(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None,
             cut: bool = False) -> dict[str, Any]:
        """The response object: ``status`` ``in_progress``, ``completed``, ``incomplete`` (``cut``: by
        ``max_output_tokens``) or ``failed``, the request's settings as they took effect."""
        req = self.req
        fmt = req.text.format if req.text is not None and req.text.format is not None else None
        text = {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}}
        if req.text is not None and req.text.verbosity is not None:
            text["verbosity"] = req.text.verbosity
        tool_choice = req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none")
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "completed_at": now() if status != "in_progress" else None, "background": False, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": req.max_tool_calls, "metadata": req.metadata or {}, "model": self.model,
            "output": output, "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": req.reasoning.model_dump() if req.reasoning is not None else None,
            "service_tier": "default", "store": False, "temperature": self.temperature, "text": text,
            "tool_choice": tool_choice,
            "tools": [tool.model_dump(exclude_none=True) for tool in req.tools or ()],
            "top_logprobs": req.top_logprobs, "top_p": self.top_p, "truncation": "disabled", "usage": usage,
            "user": req.user,
        }

    async def whole(self) -> Response:
        finals = await collect_finals(self.group)
        final = finals[0]
        choice = final.outputs[0]
        cut = choice.finish_reason == "length"
        counter = self.new_counter()
        answer = counter.add(choice.token_ids) if counter is not None else None  # which tokens are the answer's
        reader = self.new_reader()
        piece = reader.read(choice.text, last=True)
        output = []
        if piece.reasoning and self.chat.include_reasoning:
            output.append(_reasoning_item(_item_id("rs"), piece.reasoning,
                                          "incomplete" if cut and reader.thinking else "completed"))
        content, calls = piece.content, calls_of(piece.calls)
        last = len(calls) - 1  # the call the answer ended in: the one a cut may have cut short
        calls = calls[:self.max_calls]
        if content or not (calls or self.forced_calls):
            logprobs = None
            if self.top_k is not None:  # with calls: the tokens the text takes, not those of the calls
                logprobs = self.logprobs(choice, answer)  # nor those of the thinking and markers
                if last >= 0:
                    logprobs = logprobs[:_tokens_covering(logprobs, len(content.encode()))]
            output.append(_message_item(_item_id("msg"), content, logprobs, "incomplete" if cut else "completed"))
        output += [_call_item(_item_id("fc"), reader.call_id(), call.name, call.arguments,
                              _call_status(call.arguments, cut and i == last))
                   for i, call in enumerate(calls)]
        usage = _usage(len(final.prompt_token_ids), len(choice.token_ids), final.num_cached_tokens,
                       counter.count if counter is not None else 0)
        return JSONResponse(self.body("incomplete" if cut else "completed", output, usage, cut))

    async def events(self) -> AsyncIterator[bytes]:
        """The stream's events; an error after the first is OpenAI's ``error`` event, then ``response.failed``
        with the response as it stood (no chat-style error line, no ``[DONE]``)."""
        stream = _EventWriter(self)
        yield stream.event("response.created", response=self.body("in_progress", [], None))
        yield stream.event("response.in_progress", response=self.body("in_progress", [], None))
        try:
            async for event in self._answer_events(stream):
                yield event
        except Exception as exc:  # the engine failed the request mid-answer: the client gets it in this API's form
            error = to_api_error(exc).body()["error"]  # the error body every endpoint sends (its type by status)
            code = error["code"] or error["type"]
            yield stream.event("error", code=code, message=error["message"], param=error["param"])
            failed = self.body("failed", stream.output, None)
            failed["error"] = {"code": code, "message": error["message"]}
            yield stream.event("response.failed", response=failed)

    async def _answer_events(self, stream: _EventWriter) -> AsyncIterator[bytes]:
        reader = self.new_reader()
        stream.call_id = reader.call_id
        counter = self.new_counter()
        num_prompt = num_cached = num_output = 0
        finish_reason = None
        async for _, delta in self.group:
            if delta.finished:
                num_prompt, num_cached = len(delta.prompt_token_ids), delta.num_cached_tokens
            if not delta.outputs:
                continue
            choice = delta.outputs[0]
            num_output += len(choice.token_ids)
            if choice.finish_reason is not None:
                finish_reason = choice.finish_reason
            # with a reasoning parser, the thinking's tokens are not the text's
            logprobs = self.logprobs(choice, counter.add(choice.token_ids) if counter is not None else None)
            piece = reader.read(choice.text, choice.finish_reason is not None)
            thinking = piece.reasoning if self.chat.include_reasoning else ""
            for event in stream.piece(ParsedPiece(piece.content, piece.calls), logprobs, thinking):
                yield event
        cut = finish_reason == "length"
        for event in stream.close_all(cut, cut and reader.thinking):
            yield event
        usage = _usage(num_prompt, num_output, num_cached, counter.count if counter is not None else 0)
        status = "incomplete" if cut else "completed"
        yield stream.event(f"response.{status}", response=self.body(status, stream.output, usage, cut))


class _EventWriter:
    """The output items of a streamed response, opened and closed as the answer's pieces arrive, and the events
    that say so (numbered in order)."""

    def __init__(self, job: _Response) -> None:
        self.job = job
        self.sequence = 0
        self.output: list[dict[str, Any]] = []  # every item opened so far, as it stands
        self.message: dict[str, Any] | None = None  # the open message item, if any
        self.thinking: dict[str, Any] | None = None  # the open reasoning item, if any
        self.calls: dict[int, dict[str, Any]] = {}  # parser call index -> its function_call item
        self.last_call = -1  # the parser's index of the last call the answer began (kept or not)
        self.pending_logprobs: list[dict[str, Any]] = []  # of tokens not yet sent with a text delta
        self.text_bytes = 0  # UTF-8 bytes of the message text sent so far
        self.call_id: Callable[[], str] = tool_call_id  # makes a call's id: the answer's reader's, once it reads
        self.sent_token_bytes = 0  # bytes of the tokens whose log-probabilities went with it

    def event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return b"event: " + kind.encode() + b"\n" + sse(payload)

    def piece(self, parsed: ParsedPiece, logprobs: list[dict[str, Any]], thinking: str = "") -> list[bytes]:
        """The events for one parsed piece of the answer (and the log-probabilities of its tokens), after the
        piece of ``thinking`` that came before it, if any."""
        events: list[bytes] = []
        self.pending_logprobs += logprobs
        if thinking:
            if self.thinking is None:
                events += self._open_thinking()
            self.thinking["content"][0]["text"] += thinking
            events.append(self.event("response.reasoning_text.delta", item_id=self.thinking["id"],
                                     output_index=self._index(self.thinking), content_index=0, delta=thinking))
        if parsed.content or parsed.calls:
            events += self._close_thinking(False)
        if parsed.content:
            if self.message is None:
                events += self._open_message()
            part = self.message["content"][0]
            part["text"] += parsed.content
            # the tokens that this text takes (as the whole response counts them: _tokens_covering)
            self.text_bytes += len(parsed.content.encode())
            taken = _tokens_covering(self.pending_logprobs, self.text_bytes - self.sent_token_bytes)
            sent, self.pending_logprobs = self.pending_logprobs[:taken], self.pending_logprobs[taken:]
            self.sent_token_bytes += sum(len(entry["bytes"] or ()) for entry in sent)
            if self.job.top_k is not None:
                part["logprobs"] += sent
            events.append(self.event("response.output_text.delta", item_id=self.message["id"],
                                     output_index=self._index(self.message), content_index=0,
                                     delta=parsed.content, logprobs=sent))
        for call in parsed.calls:
            self.last_call = max(self.last_call, call.index)
            if call.index >= self.job.max_calls:
                continue
            item = self.calls.get(call.index)
            if item is None:
                events += self._close_message(False)
                item = _call_item(_item_id("fc"), self.call_id(), call.name or "", "", "in_progress")
                self.calls[call.index] = item
                self.output.append(item)
                events.append(self.event("response.output_item.added", output_index=self._index(item),
                                         item=dict(item)))
            if call.arguments:
                item["arguments"] += call.arguments
                events.append(self.event("response.function_call_arguments.delta", item_id=item["id"],
                                         output_index=self._index(item), delta=call.arguments))
        return events

    def close_all(self, cut: bool, thinking_cut: bool = False) -> list[bytes]:
        """The ``...done`` events of every item still open (an empty message when the answer had no item); the
        reasoning item is incomplete only when the cut came inside the thinking (``thinking_cut``)."""
        events: list[bytes] = self._close_thinking(thinking_cut)
        if not any(item["type"] != "reasoning" for item in self.output) and not self.job.forced_calls:
            events += self._open_message()
        if self.message is not None and self.last_call < 0 and self.job.top_k is not None:
            self.message["content"][0]["logprobs"] += self.pending_logprobs  # no call: every token is the text's
            self.pending_logprobs = []
        events += self._close_message(cut)
        for call_index, item in self.calls.items():
            item["status"] = _call_status(item["arguments"], cut and call_index == self.last_call)
            index = self._index(item)
            events.append(self.event("response.function_call_arguments.done", item_id=item["id"],
                                     output_index=index, name=item["name"], arguments=item["arguments"]))
            events.append(self.event("response.output_item.done", output_index=index, item=item))
        return events

    def _index(self, item: dict[str, Any]) -> int:
        return next(i for i, other in enumerate(self.output) if other is item)

    def _open_message(self) -> list[bytes]:
        logprobs = [] if self.job.top_k is not None else None
        self.message = _message_item(_item_id("msg"), "", logprobs, "in_progress")
        return self._open_text_item(self.message)

    def _open_thinking(self) -> list[bytes]:
        self.thinking = _reasoning_item(_item_id("rs"), "", "in_progress")
        return self._open_text_item(self.thinking)

    def _close_message(self, cut: bool) -> list[bytes]:
        message, self.message = self.message, None
        if message is None:
            return []
        return self._close_text_item(message, cut, "response.output_text.done",
                                     logprobs=message["content"][0].get("logprobs") or [])

    def _close_thinking(self, cut: bool) -> list[bytes]:
        item, self.thinking = self.thinking, None
        if item is None:
            return []
        return self._close_text_item(item, cut, "response.reasoning_text.done")

    def _open_text_item(self, item: dict[str, Any]) -> list[bytes]:
        """Add an item of one text part (a message or reasoning item): its ``added`` events, the part empty."""
        self.output.append(item)
        index = self._index(item)
        part = {**item["content"][0], "text": ""}
        return [self.event("response.output_item.added", output_index=index, item={**item, "content": []}),
                self.event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                           part=part)]

    def _close_text_item(self, item: dict[str, Any], cut: bool, text_done: str, **done_fields: Any) -> list[bytes]:
        """The ``done`` events of an item of one text part: ``text_done`` (with ``done_fields``) for its text, then
        the part's and the item's."""
        item["status"] = "incomplete" if cut else "completed"
        part = item["content"][0]
        index = self._index(item)
        return [self.event(text_done, item_id=item["id"], output_index=index, content_index=0, text=part["text"],
                           **done_fields),
                self.event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                           part=part),
                self.event("response.output_item.done", output_index=index, item=item)]


def _message_item(item_id: str, text: str, logprobs: list[dict[str, Any]] | None, status: str) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
    if logprobs is not None:
        part["logprobs"] = logprobs
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": [part]}


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    """A reasoning item: the model's thinking as one ``reasoning_text`` part (no summary is written)."""
    return {"id": item_id, "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}],
            "status": status}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def _tokens_covering(logprobs: list[dict[str, Any]], text_bytes: int) -> int:
    """How many of the leading tokens (chat-shape log-probability entries, with their own ``bytes``) the first
    ``text_bytes`` bytes of the answer take: each token that starts within them. A message's ``output_text``
    carries these tokens' log-probabilities, whole and streamed alike; the tokens of tool calls split out of the
    text after it do not count."""
    taken = covered = 0
    for entry in logprobs:
        if covered >= text_bytes:
            break
        covered += len(entry["bytes"] or ())
        taken += 1
    return taken


def _call_status(arguments: str, cut: bool) -> str:
    """A function_call item's final status: ``incomplete`` when ``max_output_tokens`` cut the answer while it wrote
    this call (``cut``) before its ``arguments`` were a whole JSON value (a client must not run it), else
    ``completed``."""
    if cut:
        try:
            loads_bounded(arguments)
        except ValueError:
            return "incomplete"
    return "completed"


def _usage(input_tokens: int, output_tokens: int, cached_tokens: int, reasoning_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached_tokens},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": input_tokens + output_tokens}
