"""What the completion and chat handlers share: the server context, sampling parameters, chat templates,
server-sent events, and cancelling work when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from inferneo.engine.async_engine import AsyncEngine
from inferneo.engine.fingerprint import system_fingerprint
from inferneo.engine.input_processor import truncate_prompt
from inferneo.engine.protocol import InvalidRequestError, LoraRef
from inferneo.engine.request_group import DeltaAccumulator
from inferneo.entrypoints.chat_template_kwargs import template_kwargs_error
from inferneo.entrypoints.openai.errors import APIError, bad_request, to_api_error
from inferneo.entrypoints.openai.protocol import Conversation, StreamOptions, _SamplingBody, now, usage
from inferneo.entrypoints.openai.reasoning import ReasoningParser, reasoning_for_tokenizer
from inferneo.entrypoints.openai.response_options import ResponseOptions
from inferneo.entrypoints.openai.token_bytes import token_bytes_reader
from inferneo.entrypoints.openai.tool_parsers import TOOL_CALL_PARSERS, ToolCallParser, default_parser_name
from inferneo.lora.registry import LoRARegistry
from inferneo.outputs import RequestOutput
from inferneo.sampling_params import SamplingParams, StructuredOutputsParams

# Prompt text (characters, all of a request's prompts or messages together) from which a request's tokenization runs
# on the server's tokenizer thread instead of the event loop: a few milliseconds of tokenizing, below which the
# thread hop would cost more than the loop's pause.
T = TypeVar("T")

OFF_LOOP_TEXT_CHARS = 16_384

@dataclass(slots=True)
class ServerContext:
    """The engine and the server-wide settings every handler needs.

    ``tool_call_parser`` is the ``--tool-call-parser`` flag: a name in ``TOOL_CALL_PARSERS``, ``"none"`` (tool
    calls of ``tool_choice: "auto"`` answers stay in ``content``), or None: the chat template decides
    (``default_parser_name``). ``tool_parser`` is the parser class that results, or None. ``reasoning_parser``
    is the ``--reasoning-parser`` flag (a name in ``reasoning.REASONING_PARSERS``, or None: answers are not split);
    ``reasoning`` that parser in the model's vocabulary (``reasoning.reasoning_for_tokenizer``). The ``openai``
    tool-call parser goes only with the ``openai_gptoss`` reasoning parser (chosen by default for a harmony template
    only then). ``options``: the server-wide options of answers (``--response-role`` and the like)."""

    engine: AsyncEngine
    served_model_names: list[str]
    model_path: str
    api_keys: list[str] = field(default_factory=list)
    tool_call_parser: str | None = None
    loras: LoRARegistry | None = None  # the LoRA adapters served by name (None: --enable-lora is off)
    reasoning_parser: str | None = None
    default_chat_template_kwargs: dict[str, Any] | None = None  # --default-chat-template-kwargs
    options: ResponseOptions = field(default_factory=ResponseOptions)
    # Reads an uploaded image by file id (the Files API's store, once the app has one): ``(file_id, field)`` -> its
    # ``data:`` URL, for the Responses API's ``input_image`` parts (``protocol_responses.ImageFileReader``).
    image_files: Callable[[str, str], str] | None = None
    created: int = field(default_factory=now)
    defaults: SamplingParams = field(init=False)
    tool_parser: type[ToolCallParser] | None = field(init=False)
    reasoning: ReasoningParser | None = field(init=False)
    # One thread: the tokenizer is used from one thread at a time (a fast tokenizer's state is not shared safely).
    tokenizer_thread: ThreadPoolExecutor = field(init=False)
    token_bytes: Callable[[int, str], list[int]] = field(init=False)  # a token's bytes, for chat logprobs
    _fingerprint: str | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.defaults = self.engine.default_sampling_params()
        self.tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inferneo-tokenizer")
        self.token_bytes = token_bytes_reader(self.tokenizer)
        self.reasoning = (reasoning_for_tokenizer(self.reasoning_parser, self.tokenizer)
                          if self.reasoning_parser is not None else None)
        harmony = self.reasoning is not None and self.reasoning.carries_calls
        name = self.tool_call_parser
        if name is None:
            template = getattr(self.tokenizer, "chat_template", None)
            name = default_parser_name(template if isinstance(template, str) else str(template or ""))
            if name == "openai" and not harmony:
                name = None
        if name not in (None, "none", *TOOL_CALL_PARSERS):
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)} or 'none'; "
                             f"got {name!r}")
        if name == "openai" and not harmony:
            raise ValueError("tool_call_parser 'openai' reads gpt-oss's harmony calls, which the reasoning parser "
                             "'openai_gptoss' splits out: give both")
        self.tool_parser = TOOL_CALL_PARSERS.get(name) if name else None
        core = getattr(getattr(self.engine, "info", None), "fingerprint", "")
        self._fingerprint = system_fingerprint(core, getattr(self.tokenizer, "chat_template", None)) if core else None

    def fingerprint(self, model: str) -> str | None:
        """``system_fingerprint`` of the answers of served name (or adapter) ``model`` (``engine.fingerprint``)."""
        if self._fingerprint is None or self.loras is None or model not in self.loras.adapters:
            return self._fingerprint
        return system_fingerprint(self._fingerprint, None, self.loras.adapters[model].path)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def template_kwargs(self, requested: dict[str, Any] | None) -> dict[str, Any] | None:
        """A request's ``chat_template_kwargs`` over the server's defaults (``--default-chat-template-kwargs``)."""
        if not self.default_chat_template_kwargs:
            return requested
        return {**self.default_chat_template_kwargs, **(requested or {})}

    async def tokenize_off_loop(self, text_chars: int, tokenize: Callable[[], T]) -> T:
        """``tokenize()`` (a request's prompts to token ids, or its base64 prompt embeddings to tensors): on the
        tokenizer thread when the request carries at least ``OFF_LOOP_TEXT_CHARS`` characters of text, so that a
        long prompt does not pause every other request and stream while it is read; inline otherwise."""
        if text_chars < OFF_LOOP_TEXT_CHARS:
            return tokenize()
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_thread, tokenize)

    def model_name(self, requested: str | None) -> str:
        """The served name a request addressed (the first one when it named none); 404 for an unknown one."""
        if requested is None:
            return self.served_model_names[0]
        if self.loras is not None and requested in self.loras.adapters:
            return requested
        if requested not in self.served_model_names:
            adapters = list(self.loras.adapters) if self.loras is not None else []
            served = ", ".join(repr(n) for n in self.served_model_names)
            if adapters:
                shown = ", ".join(repr(n) for n in adapters[:MAX_NAMES_SHOWN])
                more = f" and {len(adapters) - MAX_NAMES_SHOWN} more" if len(adapters) > MAX_NAMES_SHOWN else ""
                served += f", and the LoRA adapters {shown}{more}"
            raise APIError(404, f"The model '{requested}' does not exist; this server serves {served}",
                           param="model", code="model_not_found")
        return requested

    def lora_for(self, model: str) -> LoraRef | None:
        """The adapter a request addressed by its ``model`` (a served name returned by ``model_name``). Look it up
        together with ``model_name``, before any ``await``: an adapter unloaded meanwhile is no longer found, and
        the request would run with the base model under the adapter's name."""
        return self.loras.get(model) if self.loras is not None else None


MAX_NAMES_SHOWN = 20  # adapters a 404 for an unknown model lists (GET /v1/models lists them all)


def check_common(req: _SamplingBody) -> None:
    """400 for OpenAI fields this server cannot honour."""
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")


def check_logprobs(engine: AsyncEngine, counts: dict[str, int | None]) -> None:
    """400 naming the field for a count of log-probabilities per token (``{"top_logprobs": 5}``) past the
    engine's ``--max-logprobs`` (``InputProcessor.max_logprobs``)."""
    try:
        for param, count in counts.items():
            engine.input.check_logprobs(count, param)
    except InvalidRequestError as exc:
        raise to_api_error(exc) from None


def sampling_params(req: _SamplingBody, defaults: SamplingParams, max_tokens: int | None,
                    logprobs: int | None, structured_outputs: StructuredOutputsParams | None = None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """Request fields, else the model's generation-config defaults, else the OpenAI defaults; the answer's
    constraint (``constraints.structured_outputs_of``) is given as ``structured_outputs``."""

    def pick(name: str) -> Any:
        value = getattr(req, name)
        return getattr(defaults, name) if value is None else value

    try:
        return SamplingParams(
            n=req.n, temperature=pick("temperature"), top_p=pick("top_p"), top_k=pick("top_k"),
            min_p=pick("min_p"), repetition_penalty=pick("repetition_penalty"),
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            seed=req.seed, max_tokens=max_tokens, min_tokens=req.min_tokens, stop=req.stop,
            stop_token_ids=req.stop_token_ids or [], ignore_eos=req.ignore_eos, logprobs=logprobs,
            allowed_token_ids=req.allowed_token_ids, bad_words=req.bad_words,
            skip_special_tokens=req.skip_special_tokens,
            spaces_between_special_tokens=req.spaces_between_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            logit_bias=token_bias(req.logit_bias), structured_outputs=structured_outputs,
            prompt_logprobs=prompt_logprobs,
        )
    except ValueError as exc:
        raise to_api_error(exc) from None


def truncate_prompts(prompt_ids: list[list[int]], keep: int | None, max_model_len: int,
                     max_tokens: int | None) -> list[list[int]]:
    """vLLM's ``truncate_prompt_tokens`` of each prompt (``input_processor.truncate_prompt``); a ``keep`` past the
    context length is a 400."""
    try:
        return [truncate_prompt(ids, keep, max_model_len, max_tokens) for ids in prompt_ids]
    except InvalidRequestError as exc:
        raise to_api_error(exc) from None


def token_bias(logit_bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's ``logit_bias`` (token ids as JSON object keys, so strings) with integer keys; 400 for a key that is
    not a token id."""
    if not logit_bias:
        return None
    biases = {}
    for token, bias in logit_bias.items():
        try:
            biases[int(token)] = bias
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids (integers as strings), got {token!r}",
                              "logit_bias") from None
    return biases


def render_chat(tokenizer, conversation: Conversation, add_generation_prompt: bool,
                template_kwargs: dict[str, Any] | None, add_special_tokens: bool = False,
                tools: list[dict[str, Any]] | None = None, continue_final_message: bool = False) -> list[int]:
    """Token ids of a conversation under the model's chat template (as ``LLM.chat`` renders it); ``tools`` (the
    request's, as ``{"type": "function", "function": {...}}``) go to the template's ``tools`` variable;
    ``continue_final_message``: the rendering stops at the end of the last message's text, so the answer continues
    it."""
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request("this model has no chat template; use /v1/completions", "messages")
    if (error := template_kwargs_error(template_kwargs)) is not None:
        raise bad_request(error, "chat_template_kwargs")
    extra = dict(template_kwargs or {})
    if continue_final_message:
        extra["continue_final_message"] = True
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, tools=tools,
                                             add_generation_prompt=add_generation_prompt, **extra)
    except Exception as exc:  # jinja raises its own errors for conversations a template refuses
        raise bad_request(f"the chat template cannot render these messages: {exc}", "messages") from None
    return tokenizer(text, add_special_tokens=add_special_tokens, verbose=False).input_ids


def text_tokens(choice, include_stop: bool, answer: list[bool] | None = None) -> tuple[list[int], list]:
    """A choice's (or a streamed delta's) token ids and log-probabilities that are part of its text: all but the
    stop token (EOS or a ``stop_token_ids`` entry) that ended it, unless ``include_stop``
    (``include_stop_str_in_output``); with ``answer`` (a reasoning parser's ``TokenCounter.add``, one flag per
    token), only the answer's own tokens, not the thinking's nor a marker's. Their log-probabilities are the ones an
    answer reports, as OpenAI's match the content's tokens."""
    count = len(choice.token_ids)
    if count and not include_stop and choice.finish_reason == "stop" and not isinstance(choice.stop_reason, str):
        count -= 1
    token_ids, logprobs = choice.token_ids[:count], (choice.logprobs or [])[:count]
    if answer is None:
        return token_ids, logprobs
    kept = [i for i, own in enumerate(answer[:len(token_ids)]) if own]
    return [token_ids[i] for i in kept], [logprobs[i] for i in kept if i < len(logprobs)]


def conversation_chars(conversation: Conversation) -> int:
    """The characters of text in a conversation's messages (string contents and text parts)."""
    total = 0
    for message in conversation:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(part.get("text") or "") for part in content if isinstance(part, dict))
    return total


async def collect_finals(group) -> dict[int, RequestOutput]:
    """The whole output of every prompt of a request group, by prompt index, assembled from its deltas once all
    have finished; engine errors become API errors."""
    gathered: dict[int, DeltaAccumulator] = {}
    finals: dict[int, RequestOutput] = {}
    try:
        async for index, delta in group:
            accumulator = gathered.setdefault(index, DeltaAccumulator())
            accumulator.add(delta)
            if delta.finished:
                finals[index] = accumulator.result()
    except Exception as exc:
        raise to_api_error(exc) from None
    finally:
        group.abort()
    return finals


def usage_of(outputs: Iterable[RequestOutput], reasoning_tokens: int | None = None) -> dict[str, Any]:
    """Token usage of finished requests (a prompt counts once however many choices it has); ``reasoning_tokens``
    when a reasoning parser counted the thinking."""
    outputs = list(outputs)
    return usage(sum(o.num_prompt_tokens for o in outputs),
                 sum(len(c.token_ids) for o in outputs for c in o.outputs),
                 sum(o.num_cached_tokens for o in outputs), reasoning_tokens)


class StreamUsage:
    """The token counts of a streamed answer as its chunks go out, and what ``stream_options`` asks the chunks to
    carry: with ``include_usage``, ``usage`` in every chunk (null, or with ``continuous_usage_stats`` the counts so
    far) and the totals in a last chunk; ``force`` as if both were asked. The prompt tokens (all the request's
    prompts, each once however many choices it has) count from the first chunk; the completion tokens as the
    choices' tokens arrive; the cached tokens as each prompt's first output tells them."""

    def __init__(self, options: StreamOptions | None, num_prompt_tokens: int, force: bool = False) -> None:
        # force (--enable-force-include-usage): both, whatever the request asked (vLLM's should_include_usage)
        self.include = force or bool(options and options.include_usage)
        self.continuous = force or bool(self.include and options.continuous_usage_stats)
        self.num_prompt_tokens = num_prompt_tokens
        self.num_completion_tokens = 0
        self._cached: dict[int, int] = {}  # by prompt index

    def add(self, index: int, delta: RequestOutput) -> None:
        """Count a delta of prompt ``index``: its choices' new tokens and the prompt's cached tokens."""
        self._cached[index] = delta.num_cached_tokens
        self.num_completion_tokens += sum(len(choice.token_ids) for choice in delta.outputs)

    def totals(self, reasoning_tokens: int | None = None) -> dict[str, Any]:
        """OpenAI's ``usage`` of what has been generated so far (the whole answer's, once it has ended)."""
        return usage(self.num_prompt_tokens, self.num_completion_tokens, sum(self._cached.values()),
                     reasoning_tokens)

    def put(self, payload: dict[str, Any], reasoning_tokens: int | None = None) -> dict[str, Any]:
        """``payload`` (a chunk) with the ``usage`` it carries, if it carries one."""
        if self.include:
            payload["usage"] = self.totals(reasoning_tokens) if self.continuous else None
        return payload


def sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event: compact UTF-8 JSON (what ``json.dumps(payload, ensure_ascii=False,
    separators=(",", ":"))`` writes, in about a third of the time), with the three characters that clients
    splitting lines like ``str.splitlines`` (httpx's ``iter_lines`` among them) take for line breaks written as
    JSON escapes, so an event is always one line. (JSON already escapes the ASCII ones.)"""
    data = _json_encode(payload)
    for raw, escaped in _LINE_BREAKS:
        if raw in data:
            data = data.replace(raw, escaped)
    return b"data: " + data + b"\n\n"


_json_encode = msgspec.json.Encoder().encode
_LINE_BREAKS = tuple((chr(c).encode(), f"\\u{c:04x}".encode()) for c in (0x85, 0x2028, 0x2029))
SSE_DONE = b"data: [DONE]\n\n"


def event_stream(events: AsyncIterator[bytes], on_close: Callable[[], None]) -> StreamingResponse:
    """An SSE response; an error mid-stream becomes an error event, and closing it always runs ``on_close``."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    yield event
        except Exception as exc:
            yield sse(to_api_error(exc).body())
            yield SSE_DONE
        finally:
            on_close()

    return _EventStreamResponse(body(), media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _EventStreamResponse(StreamingResponse):
    """A streaming response that closes its body generator as soon as the exchange ends, however it ends.

    When the client leaves, Starlette cancels the writer; if the writer was waiting in ``send`` rather than in the
    generator, the generator is left suspended at a ``yield`` and would only run its clean-up (the abort) once the
    garbage collector finds it, which a reference cycle through the cancellation's traceback can delay for a long
    time. Closing it here aborts the engine requests at once.
    """

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run ``work``; if the client disconnects first, cancel it (which aborts its engine requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task  # let its clean-up (the abort) run before we answer
    if task.cancelled():
        return Response(status_code=499)  # nobody is listening; the status is for the logs
    return task.result()
