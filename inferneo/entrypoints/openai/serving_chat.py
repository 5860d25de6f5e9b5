"""``POST /v1/chat/completions``: one conversation, or (an extension) a list of them, whole or streamed.

With ``tools``, an answer may hold tool calls: read from the model's own format by the server's tool-call parser
for ``tool_choice: "auto"``, or forced by a grammar for ``"required"`` and a named function (``constraints``).
They leave as OpenAI's ``message.tool_calls`` (streamed: ``delta.tool_calls`` pieces, the name in a call's first
piece), with ``finish_reason`` ``"tool_calls"`` when the model stopped after calling (``"stop"`` when ``tool_choice``
named the function, as OpenAI answers)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from inferneo.engine.beam_search_group import BeamSearchGroup
from inferneo.engine.protocol import InvalidRequestError
from inferneo.engine.request_group import EngineRequest, RequestGroup
from inferneo.entrypoints.openai.beam_requests import beam_search_of, submit_beam_search
from inferneo.entrypoints.openai.completion_scoring import finite, prompt_logprobs_json, token_name
from inferneo.entrypoints.openai.constraints import structured_outputs_of
from inferneo.entrypoints.openai.errors import bad_request, renamed, to_api_error
from inferneo.entrypoints.openai.protocol import ChatCompletionRequest, now, random_id
from inferneo.entrypoints.openai.reasoning import AnswerSplitter, ReasoningPiece, TokenCounter
from inferneo.entrypoints.openai.serving_common import (
    SSE_DONE,
    ServerContext,
    StreamUsage,
    cancel_on_disconnect,
    check_common,
    check_logprobs,
    collect_finals,
    conversation_chars,
    event_stream,
    render_chat,
    sampling_params,
    sse,
    text_tokens,
    truncate_prompts,
    usage_of,
)
from inferneo.entrypoints.openai.tool_parsers import (
    NamedFunctionParser,
    ParsedCall,
    ParsedPiece,
    RequiredCallsParser,
    ToolCallParser,
    calls_of,
)
from inferneo.multimodal.inputs import ImageInput
from inferneo.outputs import Logprob
from inferneo.sampling_params import SamplingParams


def _check_unsupported(req: ChatCompletionRequest) -> None:
    if req.functions or req.function_call not in (None, "none"):
        raise bad_request("functions and function_call (the deprecated form of tool calling) are not supported; "
                          "send tools and tool_choice", "functions" if req.functions else "function_call")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")


def tool_parser_for(ctx: ServerContext, req: ChatCompletionRequest) -> ToolCallParser | None:
    """A fresh parser for one choice's answer, or None when its text is all content (or, with a reasoning parser
    that hands out the calls itself, harmony's, when there is nothing else to read)."""
    mode = req.tool_mode()
    if mode == "named":
        return NamedFunctionParser(req.named_tool())
    if mode == "required":
        return RequiredCallsParser()
    if ctx.reasoning is not None and ctx.reasoning.carries_calls:
        return None
    if mode == "auto" and ctx.tool_parser is not None:
        return ctx.tool_parser({tool.function.name: tool.function.parameters for tool in req.tools or ()})
    return None


def keeps_tool_markers(ctx: ServerContext, req: ChatCompletionRequest) -> bool:
    """Whether ``req``'s answers are decoded with their special tokens, for a tool-call parser whose format's markers
    are special tokens (``ToolCallParser.keeps_special_tokens``: Mistral's ``[TOOL_CALLS]``), as vLLM decodes them."""
    parser = ctx.tool_parser
    return (req.tool_mode() == "auto" and parser is not None and parser.keeps_special_tokens
            and not (ctx.reasoning is not None and ctx.reasoning.carries_calls))


class AnswerReader:
    """One choice's answer read as it comes: the reasoning parser's split first (the thinking, and harmony's tool
    calls), then the tool-call parser over the rest. Read whole (one piece, ``last``) or piece by piece, an answer
    gives the same thinking, content and calls."""

    def __init__(self, splitter: AnswerSplitter | None, parser: ToolCallParser | None,
                 format_call_id: Callable[[], str | None] | None = None) -> None:
        self.splitter = splitter
        self.parser = parser
        self.format_call_id = format_call_id  # the ids the model's format needs (ToolCallParser.call_id), if any

    def read(self, text: str, last: bool) -> ReasoningPiece:
        """The thinking, content and tool-call pieces that ``text`` (the next piece; the answer's end when
        ``last``) completes."""
        out = ReasoningPiece(content=text)
        if self.splitter is not None:
            out = self.splitter.feed(text)
            if last:
                out.add(self.splitter.finish())
        if self.parser is not None:
            parsed = self.parser.feed(out.content) if out.content else ParsedPiece()
            if last:
                parsed.add(self.parser.finish())
            out.content, out.calls = parsed.content, parsed.calls + out.calls
        return out

    def call_id(self, api_id: Callable[[], str] | None = None) -> str:
        """A fresh id for a call read from this answer: of the shape the model's tool-call format needs, if it needs
        one, else ``api_id()`` (OpenAI's ``call_...`` unless given)."""
        return (self.format_call_id and self.format_call_id()) or (api_id or tool_call_id)()

    @property
    def thinking(self) -> bool:
        """Whether the answer so far ends inside its thinking (a cut there leaves the thinking unfinished)."""
        return self.splitter is not None and self.splitter.thinking


def answer_reader(ctx: ServerContext, req: ChatCompletionRequest, thinking_open: bool) -> AnswerReader:
    """A fresh reader of one choice's answer: the server's reasoning parser (its answer starting inside the
    thinking when ``thinking_open``) and the request's tool-call parser (``tool_parser_for``); its calls' ids are
    shaped as the server's tool-call format needs (Mistral's: 9 letters and digits), whatever parser reads them."""
    splitter = ctx.reasoning.splitter(thinking_open) if ctx.reasoning is not None else None
    ids = ctx.tool_parser.call_id if ctx.tool_parser is not None else None
    return AnswerReader(splitter, tool_parser_for(ctx, req), ids)


def tool_call_id() -> str:
    """A fresh id for a tool call, in OpenAI's shape: ``call_`` and 24 random characters."""
    return f"call_{uuid.uuid4().hex[:24]}"


async def create_chat_completion(ctx: ServerContext, req: ChatCompletionRequest, raw: Request) -> Response:
    _check_unsupported(req)
    request_id = random_id("chatcmpl")
    started = await start_chat(ctx, req, request_id, "messages")
    job = _Chat(ctx, request_id, req, started)
    if req.stream:
        return event_stream(job.events(), started.group.abort)
    return await cancel_on_disconnect(raw, job.response())


@dataclass(frozen=True, slots=True)
class StartedChat:
    """A chat request submitted to the engine: the served model name it addressed, its request group (one engine
    request per conversation), the number of conversations, and the sampling parameters (the request's settings
    with the model's defaults filled in; the conversations' differ only in ``max_tokens``)."""

    model: str
    group: RequestGroup | BeamSearchGroup
    num_conversations: int
    params: SamplingParams
    thinking_open: tuple[bool, ...] | None = None  # with a reasoning parser: each conversation's answer starts
    # inside an open thinking block (``ReasoningParser.opens``)
    num_prompt_tokens: int = 0  # of all the conversations
    prompt_token_ids: tuple[list[int], ...] = ()  # each conversation's, as rendered


async def render_conversations(ctx: ServerContext, req: ChatCompletionRequest) -> tuple[list[list[int]], list[list]]:
    """The prompt token ids of each of ``req``'s conversations, as the model's chat template renders them with the
    request's tools and template options (off the event loop when long), and each conversation's images (their
    URLs, in order; the prompt holds the model's image placeholder for each)."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    try:
        split = [ctx.engine.input.conversation_images(c) for c in req.conversations()]
    except ValueError as exc:
        raise bad_request(str(exc), "messages") from None
    conversations = [conversation for conversation, _ in split]
    ids = await ctx.tokenize_off_loop(
        sum(map(conversation_chars, conversations)),
        lambda: [render_chat(ctx.tokenizer, c, req.generation_prompt(), ctx.template_kwargs(req.template_kwargs()),
                             tools=tools,
                             continue_final_message=req.continue_final_message) for c in conversations])
    return ids, [images for _, images in split]


async def count_prompt_tokens(ctx: ServerContext, req: ChatCompletionRequest) -> int:
    """The prompt tokens of ``req``'s one conversation as generation would read them (its model checked, the chat
    template rendered, each image counted as the tokens the model reads it in); ``APIError`` as ``start_chat``
    gives it. The count endpoints of the Responses and Messages APIs answer with it."""
    ctx.model_name(req.model)
    prompt_ids, images = await render_conversations(ctx, req)
    (prompt_ids,), _ = await prepare_images(ctx, prompt_ids, images, None)
    return len(prompt_ids)


async def prepare_images(ctx: ServerContext, prompt_ids: list[list[int]], images: list[list],
                         truncate_prompt_tokens: int | None) -> tuple[list[list[int]], list[list[ImageInput] | None]]:
    """A vision-language model's prompts with their image placeholders expanded, and their images read and
    preprocessed (off the event loop: images may be fetched); a text model's prompts as they are."""
    input_side = ctx.engine.input
    if input_side.images is None:
        return prompt_ids, [None] * len(prompt_ids)
    try:
        prepared = await asyncio.to_thread(
            lambda: [input_side.prepare_images(ids, found, truncate_prompt_tokens)
                     for ids, found in zip(prompt_ids, images, strict=True)])
    except InvalidRequestError as exc:  # the images came in the messages
        raise renamed(to_api_error(exc), "multi_modal_data", "messages") from None
    return [ids for ids, _ in prepared], [inputs for _, inputs in prepared]


async def start_chat(ctx: ServerContext, req: ChatCompletionRequest, request_id: str, param: str) -> StartedChat:
    """Check ``req``, render its conversations and submit them to the engine as requests ``{request_id}-{i}``. An
    ``APIError`` (4xx) for what cannot run; ``param`` names the field holding the conversation in engine refusals
    (a prompt too long)."""
    model = ctx.model_name(req.model)
    lora = ctx.lora_for(model)  # now: an unload while the conversation renders off the loop must not drop it
    try:
        ctx.engine.input.check_generates()  # before the chat template, which such a model may lack
    except InvalidRequestError as exc:
        raise to_api_error(exc) from None
    check_common(req)
    if req.prompt_logprobs is not None and req.stream:
        raise bad_request("prompt_logprobs is not available with stream", "prompt_logprobs")
    beam = beam_search_of(req)
    constraint = structured_outputs_of(req)
    engine = ctx.engine
    check_logprobs(engine, {"top_logprobs": req.top_logprobs, "prompt_logprobs": req.prompt_logprobs})
    prompt_ids, images = await render_conversations(ctx, req)
    if beam is not None and any(images):
        raise bad_request("beam search takes text only: a conversation with images cannot use it", "messages")
    prompt_ids, image_inputs = await prepare_images(ctx, prompt_ids, images, req.truncate_prompt_tokens)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    prompt_ids = truncate_prompts(prompt_ids, req.truncate_prompt_tokens, engine.max_model_len, max_tokens)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    # Without max_tokens, a chat answer may use the rest of the context (as far as the KV cache allows).
    room = min(engine.max_model_len, engine.kv_capacity_tokens)
    reasoning = ctx.reasoning
    thinking_open = tuple(reasoning.opens(ids) for ids in prompt_ids) if reasoning else None
    keeps_markers = keeps_tool_markers(ctx, req)
    requests = []
    try:
        for i, ids in enumerate(prompt_ids):
            limit = max_tokens if max_tokens is not None else max(room - len(ids), 1)
            constraint_i = constraint
            if constraint is not None and reasoning is not None:  # the constraint applies after the thinking
                constraint_i = dataclasses.replace(constraint, reasoning=reasoning.span(thinking_open[i]))
            params = sampling_params(req, ctx.defaults, limit, logprobs, constraint_i, req.prompt_logprobs)
            if (reasoning is not None and reasoning.keeps_special_tokens) or keeps_markers:  # the format's
                params.skip_special_tokens = params.spaces_between_special_tokens = False  # markers: parsers read them
            requests.append(EngineRequest(f"{request_id}-{i}", ids, params, req.priority, lora=lora,
                                          cache_salt=req.cache_salt, images=image_inputs[i]))
        if beam is not None:
            group = submit_beam_search(engine, request_id, prompt_ids, beam,
                                       [r.params.max_tokens for r in requests], req.priority, lora,
                                       ctx.tokenizer, params.skip_special_tokens, param, req.cache_salt)
        else:
            group = engine.submit(requests, param=param)
    except Exception as exc:
        error = to_api_error(exc)
        if req.max_completion_tokens is not None:  # the sampling parameters and the engine call it max_tokens
            error = renamed(error, "max_tokens", "max_completion_tokens")
        raise error from None
    return StartedChat(model, group, len(requests), params, thinking_open, sum(map(len, prompt_ids)),
                       tuple(prompt_ids))


class _Chat:
    """One chat call in flight."""

    def __init__(self, ctx: ServerContext, request_id: str, req: ChatCompletionRequest, started: StartedChat) -> None:
        self.ctx = ctx
        self.reasoning = ctx.reasoning
        self.thinking_open = started.thinking_open or ()
        self.token_bytes = ctx.token_bytes
        self.single_call = req.parallel_tool_calls is False  # keep only the first call of an auto answer
        # a grammar forces the answer to be calls (tool_choice required or named): its message has no content
        self.forced_calls = req.tool_mode() in ("required", "named")
        # OpenAI's finish reason for an answer that called tools: "tool_calls", but "stop" when tool_choice named the
        # function (the answer could be nothing else), as vLLM answers too
        self.calls_finish = _calls_finish_reason if req.tool_mode() != "named" else _same_finish_reason
        self.request_id = request_id
        self.model = started.model
        self.req = req
        self.group = started.group
        self.num_conversations = started.num_conversations
        self.num_prompt_tokens = started.num_prompt_tokens
        self.prompt_token_ids = started.prompt_token_ids
        self.created = now()
        self.top_k = (req.top_logprobs or 0) if req.logprobs else None
        as_ids = req.return_tokens_as_token_ids
        self.as_ids = ctx.options.return_tokens_as_token_ids if as_ids is None else as_ids
        # the answers' role: --response-role after a new assistant turn, else the continued last message's (vLLM's)
        self.roles = [ctx.options.response_role if req.generation_prompt() else _last_role(c)
                      for c in req.conversations()]

    async def response(self) -> Response:
        finals = await collect_finals(self.group)
        choices = []
        reasoning_tokens = 0
        for i in sorted(finals):
            for choice in finals[i].outputs:
                answer = None
                if self.reasoning is not None:
                    counter = self.reasoning.token_counter(self.thinking_open[i])
                    answer = counter.add(choice.token_ids)
                    reasoning_tokens += counter.count
                reader = self._reader(i)
                piece = reader.read(choice.text, last=True)
                message, finish_reason = self._message(piece.content, calls_of(piece.calls), choice.finish_reason,
                                                       self.roles[i], reader.call_id)
                logprobs = None
                if self.top_k is not None:
                    logprobs = {"content": self._logprobs(choice, answer)}
                if self.reasoning is not None and self.req.include_reasoning:
                    message.update(_reasoning_fields(piece.reasoning or None))
                body = {
                    "index": i * self.req.n + choice.index,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                    "stop_reason": choice.stop_reason,
                }
                if self.req.prompt_logprobs is not None:
                    body["prompt_logprobs"] = prompt_logprobs_json(finals[i].prompt_logprobs)
                if self.req.return_token_ids:
                    body["prompt_token_ids"] = finals[i].prompt_token_ids
                    body["token_ids"] = choice.token_ids
                choices.append(body)
        response = {
            "id": self.request_id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": choices, "system_fingerprint": self.ctx.fingerprint(self.model),
            "usage": usage_of(finals.values(), reasoning_tokens if self.reasoning is not None else None),
        }
        if self.req.prompt_logprobs is not None and len(finals) == 1:  # vLLM's place, for one conversation
            response["prompt_logprobs"] = prompt_logprobs_json(finals[0].prompt_logprobs)
        if self.req.return_token_ids and len(finals) == 1:  # vLLM's place, for one conversation
            response["prompt_token_ids"] = finals[0].prompt_token_ids
        return JSONResponse(response)

    def _logprobs(self, choice, answer: list[bool] | None = None) -> list[dict[str, Any]]:
        """The chat logprobs of a choice's (or delta's) tokens that are part of its text: all of them (the
        thinking's too, as vLLM sends), except that ``include_reasoning: false`` leaves out those that ``answer``
        (the reasoning parser's flags, one per token) does not mark the answer's, so the thinking stays hidden."""
        if self.req.include_reasoning:
            answer = None
        token_ids, logprobs = text_tokens(choice, self.req.include_stop_str_in_output, answer)
        return chat_logprobs(token_ids, logprobs, self.top_k, self.token_bytes, self.as_ids)

    def _reader(self, conversation: int) -> AnswerReader:
        """A fresh reader of one of conversation ``conversation``'s answers."""
        return answer_reader(self.ctx, self.req, bool(self.thinking_open and self.thinking_open[conversation]))

    def _message(self, content: str, calls: list[ParsedCall], finish_reason: str | None,
                 role: str = "assistant", call_id: Callable[[], str] = tool_call_id) -> tuple[dict[str, Any], str | None]:
        """A whole answer (its content and the tool calls read from it) as a message of ``role``, and its finish
        reason; ``call_id`` makes each call's id."""
        if self.single_call:
            calls = calls[:1]
        if not calls:
            return {"role": role, "content": content or (None if self.forced_calls else "")}, finish_reason
        tool_calls = [{"id": call_id(), "type": "function",
                       "function": {"name": call.name, "arguments": call.arguments}} for call in calls]
        return ({"role": role, "content": content or None, "tool_calls": tool_calls},
                self.calls_finish(finish_reason))

    async def events(self) -> AsyncIterator[bytes]:
        req, n = self.req, self.req.n
        counts = StreamUsage(req.stream_options, self.num_prompt_tokens, self.ctx.options.force_include_usage)
        base: dict[str, Any] = {"id": self.request_id, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.model, "system_fingerprint": self.ctx.fingerprint(self.model)}

        def chunk(key: int, delta: dict[str, Any], logprobs: Any = None, finish_reason: str | None = None,
                  stop_reason: int | str | None = None, token_ids: list[int] | None = None) -> bytes:
            body = {"index": key, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
                    "stop_reason": stop_reason}
            payload = {**base, "choices": [body]}
            if token_ids is not None:  # return_token_ids (vLLM's): the prompt's ids first, then each chunk's new ids
                body["token_ids"] = token_ids
                if delta.get("role"):  # a choice's first chunk; at the top too for one conversation (vLLM's place)
                    body["prompt_token_ids"] = self.prompt_token_ids[key // n]
                    if self.num_conversations == 1:
                        payload["prompt_token_ids"] = body["prompt_token_ids"]
            return sse(counts.put(payload, reasoning_tokens() if counts.continuous else None))

        streams = {}
        counters: dict[int, TokenCounter] = {}
        ids = bool(req.return_token_ids)

        def reasoning_tokens() -> int | None:
            return sum(c.count for c in counters.values()) if self.reasoning is not None else None

        for key in range(self.num_conversations * n):
            if self.reasoning is not None:
                counters[key] = self.reasoning.token_counter(self.thinking_open[key // n])
            streams[key] = _ToolCallStream(self._reader(key // n), self.single_call, self.req.include_reasoning,
                                           self.calls_finish)
            yield chunk(key, {"role": self.roles[key // n], "content": None if self.forced_calls else ""},
                        token_ids=[] if ids else None)
        async for i, delta in self.group:
            counts.add(i, delta)
            for choice in delta.outputs:
                key = i * n + choice.index
                answer = counters[key].add(choice.token_ids) if key in counters else None
                message, finish_reason = streams[key].delta(choice.text, choice.finish_reason)
                logprobs = None
                if self.top_k is not None and (content := self._logprobs(choice, answer)):
                    logprobs = {"content": content}
                if not message and logprobs is None and finish_reason is None and not (ids and choice.token_ids):
                    continue
                yield chunk(key, message, logprobs, finish_reason,
                            choice.stop_reason if finish_reason is not None else None,
                            choice.token_ids if ids else None)
        if counts.include:
            yield sse({**base, "choices": [], "usage": counts.totals(reasoning_tokens())})
        yield SSE_DONE


class _ToolCallStream:
    """One streamed choice's text, read by ``reader``, as OpenAI deltas: ``reasoning`` (with a reasoning parser;
    also sent as ``reasoning_content`` unless ``include_reasoning`` is off), ``content``, and ``tool_calls`` pieces
    whose first piece carries the call's id, type and name; ``calls_finish``: the finish reason of an answer that
    called tools (``_Chat.calls_finish``)."""

    def __init__(self, reader: AnswerReader, single_call: bool, include_reasoning: bool = True,
                 calls_finish: Callable[[str | None], str | None] | None = None) -> None:
        self.reader = reader
        self.single_call = single_call
        self.include_reasoning = include_reasoning
        self.calls_finish = calls_finish or _calls_finish_reason  # the finish reason of an answer with calls
        self.ids: list[str] = []  # one per call started

    def delta(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The delta for the next piece of text (the last piece when ``finish_reason`` is set)."""
        message: dict[str, Any] = {}
        parsed = self.reader.read(text, finish_reason is not None)
        if parsed.reasoning and self.include_reasoning:
            message.update(_reasoning_fields(parsed.reasoning))
        if parsed.content:
            message["content"] = parsed.content
        pieces: list[dict[str, Any]] = []
        for piece in parsed.calls:
            if self.single_call and piece.index > 0:
                continue
            if pieces and pieces[-1]["index"] == piece.index:  # one entry per call in a chunk, as OpenAI sends
                pieces[-1]["function"]["arguments"] += piece.arguments
                continue
            entry: dict[str, Any] = {"index": piece.index}
            if piece.index == len(self.ids):
                self.ids.append(self.reader.call_id())
                entry.update(id=self.ids[-1], type="function",
                             function={"name": piece.name, "arguments": piece.arguments})
            else:
                entry["function"] = {"arguments": piece.arguments}
            pieces.append(entry)
        if pieces:
            message["tool_calls"] = pieces
        if self.ids and finish_reason is not None:
            finish_reason = self.calls_finish(finish_reason)
        return message, finish_reason


def _reasoning_fields(reasoning: str | None) -> dict[str, str | None]:
    """A message's (or delta's) thinking: ``reasoning`` (vLLM's field) and ``reasoning_content`` (its earlier name,
    which DeepSeek's API and many clients read)."""
    return {"reasoning": reasoning, "reasoning_content": reasoning}


def _calls_finish_reason(finish_reason: str | None) -> str | None:
    """An answer that called tools and then stopped finished with ``tool_calls``; one cut short keeps ``length``."""
    return "tool_calls" if finish_reason == "stop" else finish_reason


def _same_finish_reason(finish_reason: str | None) -> str | None:
    """A call to the function ``tool_choice`` named keeps its finish reason (``stop``, or ``length``)."""
    return finish_reason


def _last_role(conversation) -> str:
    """The role of a conversation's last message (that an answer without a new assistant turn continues)."""
    last = conversation[-1] if conversation else {}
    role = last.get("role") if isinstance(last, dict) else getattr(last, "role", None)
    return role or "assistant"


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], top_k: int,
                  token_bytes: Callable[[int, str], list[int]], as_ids: bool = False) -> list[dict[str, Any]]:
    """The chat shape: per token its text, log-probability, bytes (``token_bytes(id, text)``: the token's own, so
    that a character split over tokens can be rebuilt) and the ``top_k`` most likely. ``as_ids``
    (``--return-tokens-as-token-ids``): ``token`` reads ``token_id:N``; ``bytes`` stay the token's own."""
    content = []
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        sampled = entry.get(token_id)
        text = (sampled.decoded_token if sampled else None) or ""
        ranked = sorted(((tid, lp) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= top_k),
                        key=lambda item: item[1].rank)[:top_k]
        content.append({
            "token": token_name(token_id, text, as_ids),
            "logprob": finite(sampled.logprob) if sampled else -9999.0,
            "bytes": token_bytes(token_id, text),
            "top_logprobs": [{"token": token_name(tid, lp.decoded_token, as_ids), "logprob": finite(lp.logprob),
                              "bytes": token_bytes(tid, lp.decoded_token or "")} for tid, lp in ranked],
        })
    return content

