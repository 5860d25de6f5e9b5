"""The request body of ``POST /v1/responses`` (OpenAI's Responses API), and its translation to a chat request.

This server keeps no state between requests: a response is not stored (``store`` is accepted and answered as
``false``), so ``previous_response_id`` and ``conversation`` are refused; a client sends the whole conversation in
``input`` (earlier answers' ``message`` and ``function_call`` items, and ``function_call_output`` items for the
tools' results), as OpenAI's own clients do with ``store: false``. Output is text; input is text, and images
(``input_image`` parts of user messages, by ``image_url``: a ``data:`` URL or an ``http(s)`` URL) for a
vision-language model, which become the chat request's ``image_url`` parts; tools are functions.

The body is checked as strictly as the other endpoints' (``protocol.py``): unknown fields and wrong types are
refused with 400 naming the field. :meth:`ResponsesRequest.to_chat` turns a valid body into the equivalent
:class:`~inferneo.entrypoints.openai.protocol.ChatCompletionRequest`, so sampling, structured output, tool calling
and their checks are the chat endpoint's.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from inferneo.entrypoints.openai.errors import APIError, bad_request, renamed, validation_message
from inferneo.entrypoints.openai.protocol import (
    INT64_MAX,
    MAX_CONTENT_PARTS,
    MAX_FUNCTION_NAME_CHARS,
    MAX_ID_CHARS,
    MAX_MESSAGES,
    MAX_MODEL_CHARS,
    MAX_TEXT_CHARS,
    MAX_TOOLS,
    ChatCompletionRequest,
    FunctionDefinition,
    FunctionName,
    StructuredOutputsBody,
    _Body,
    check_metadata,
)

INCLUDE_LOGPROBS = "message.output_text.logprobs"
"""The one ``include`` value this server answers: the output text's token log-probabilities."""

_TEXT_PARTS = ("input_text", "output_text", "text")
_IMAGE_KEYS = {"type", "image_url", "file_id", "detail"}
# Reads an uploaded image file: ``(file_id, field) -> data: URL``, an ``APIError`` 400 naming ``field`` when the
# file is not there or not an image's (``batch_api.StoredFiles.image_data_url``).
ImageFileReader = Callable[[str, str], str]
_MESSAGE_ROLES = ("user", "system", "developer", "assistant")


class FunctionTool(FunctionDefinition):
    """One entry of ``tools``: ``{"type": "function", "name": ..., "parameters": {...}}`` (the Responses API's flat
    form of a chat ``tools[i]``: its ``function`` with the ``type`` beside it)."""

    type: Literal["function"]

    def chat_form(self) -> dict[str, Any]:
        """The chat endpoint's shape of this tool."""
        return {"type": "function", "function": self.model_dump(exclude={"type"}, exclude_none=True)}


class TextFormat(_Body):
    """``text.format``: ``text``, ``json_object``, or ``json_schema`` with its ``name`` and ``schema`` inline."""

    type: Literal["text", "json_object", "json_schema"]
    name: FunctionName | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    strict: bool | None = None

    def response_format(self) -> dict[str, Any]:
        """The chat endpoint's ``response_format`` for this format."""
        if self.type != "json_schema":
            if self.name is not None or self.schema_ is not None:
                raise ValueError(f"name and schema go only with type 'json_schema', not {self.type!r}")
            return {"type": self.type}
        if self.name is None or self.schema_ is None:
            raise ValueError("type 'json_schema' needs a name and a schema")
        schema = {"name": self.name, "schema": self.schema_, "description": self.description, "strict": self.strict}
        return {"type": "json_schema", "json_schema": {k: v for k, v in schema.items() if v is not None}}


class TextConfig(_Body):
    """``text``: the answer's format, and OpenAI's ``verbosity`` hint (accepted, nothing to do here)."""

    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(_Body):
    """``reasoning``: ``effort`` goes to the chat template (gpt-oss's reads it), as the chat endpoint's
    ``reasoning_effort`` does; ``summary`` (no summaries are written here) is accepted and ignored."""

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesStreamOptions(_Body):
    include_obfuscation: bool | None = None  # OpenAI pads its events against side channels; nothing to do here


class ResponsesRequest(_Body):
    """``POST /v1/responses``: one conversation (``input``: a string, or a list of items), answered as a response
    with ``message`` and ``function_call`` output items, whole or as a stream of events."""

    model: str | None = Field(None, max_length=MAX_MODEL_CHARS)
    input: str | list[Any]
    instructions: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    max_output_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_logprobs: int | None = Field(None, ge=0, le=INT64_MAX)
    include: list[str] | None = Field(None, max_length=16)
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(None, ge=1, le=MAX_TOOLS)
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool | None = False
    stream_options: ResponsesStreamOptions | None = None
    store: bool | None = None
    background: bool | None = None
    previous_response_id: str | None = Field(None, max_length=MAX_ID_CHARS)
    conversation: str | dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = Field(None, max_length=MAX_ID_CHARS)
    service_tier: str | None = Field(None, max_length=MAX_ID_CHARS)
    safety_identifier: str | None = Field(None, max_length=MAX_ID_CHARS)
    prompt_cache_key: str | None = Field(None, max_length=MAX_ID_CHARS)
    prompt_cache_retention: str | None = Field(None, max_length=MAX_ID_CHARS)
    # Inferneo extensions, as on the chat endpoint (vLLM's names; ``structured_outputs`` as there).
    seed: int | None = None
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    priority: int = 0
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS)  # vLLM's, as on chat completions
    structured_outputs: StructuredOutputsBody | None = None

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, value: Any) -> Any:
        for i, tool in enumerate(value if isinstance(value, list) else ()):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if isinstance(kind, str) and kind != "function":
                raise ValueError(f"tools[{i}]: only function tools are supported here, not {kind[:80]!r}")
        return value

    @field_validator("input", mode="before")
    @classmethod
    def _check_input(cls, value: Any) -> Any:
        if not isinstance(value, str | list):
            raise ValueError("must be a string or a non-empty list of input items")
        if isinstance(value, str):
            if len(value) > MAX_TEXT_CHARS:
                raise ValueError(f"at most {MAX_TEXT_CHARS} characters")
        elif not value:
            raise ValueError("must be a string or a non-empty list of input items")
        elif len(value) > MAX_MESSAGES:
            raise ValueError(f"at most {MAX_MESSAGES} items")
        return value

    @field_validator("conversation", mode="before")
    @classmethod
    def _check_conversation(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str | dict):
            raise ValueError("must be a conversation id (a string) or an object")
        return value

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_metadata(value)

    @field_validator("include")
    @classmethod
    def _check_include(cls, value: list[str] | None) -> list[str] | None:
        for item in value or ():
            if item != INCLUDE_LOGPROBS:
                raise ValueError(f"{item[:80]!r} is not available on this server (it offers only "
                                 f"{INCLUDE_LOGPROBS!r})")
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _check_tool_choice(cls, value: Any) -> Any:
        if value is None or value in ("auto", "none", "required"):
            return value
        if isinstance(value, dict) and value.get("type") == "function" and set(value) == {"type", "name"} \
                and isinstance(value["name"], str) and value["name"]:
            return value
        raise ValueError("must be 'auto', 'none', 'required' or {'type': 'function', 'name': ...}")

    def wants_logprobs(self) -> bool:
        """Whether the output text carries its tokens' log-probabilities (``include`` or ``top_logprobs``)."""
        return INCLUDE_LOGPROBS in (self.include or ()) or self.top_logprobs is not None

    def check_supported(self) -> None:
        """400 for what a stateless server cannot do."""
        if self.previous_response_id is not None:
            raise bad_request("this server stores no responses, so previous_response_id cannot be followed; send "
                              "the earlier turns in input (their message and function_call items)",
                              "previous_response_id")
        if self.conversation is not None:
            raise bad_request("this server stores no conversations; send the earlier turns in input",
                              "conversation")
        if self.background:
            raise bad_request("background responses are not supported: this server keeps no responses to poll; "
                              "use stream for long answers", "background")
        if self.truncation == "auto":
            raise bad_request("truncation 'auto' is not supported: an input longer than the context is refused; "
                              "leave truncation out or set 'disabled'", "truncation")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")

    def to_chat(self, image_file: ImageFileReader | None = None) -> ChatCompletionRequest:
        """The chat completion request this one asks for (an ``APIError`` 400 naming the field when the input or a
        setting cannot be one); ``image_file`` reads the images given by ``file_id`` (None: refused)."""
        body: dict[str, Any] = {
            "model": self.model, "messages": self.messages(image_file), "stream": bool(self.stream),
            "max_tokens": self.max_output_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "parallel_tool_calls": self.parallel_tool_calls, "seed": self.seed, "top_k": self.top_k,
            "min_p": self.min_p, "repetition_penalty": self.repetition_penalty, "priority": self.priority,
            "cache_salt": self.cache_salt,
        }
        if self.wants_logprobs():
            body.update(logprobs=True, top_logprobs=self.top_logprobs or 0)
        if self.tools:
            body["tools"] = [tool.chat_form() for tool in self.tools]
        if isinstance(self.tool_choice, dict):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice["name"]}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        if self.text is not None and self.text.format is not None:
            try:
                body["response_format"] = self.text.format.response_format()
            except ValueError as exc:
                raise bad_request(str(exc), "text.format") from None
        if self.structured_outputs is not None:
            body["structured_outputs"] = self.structured_outputs.model_dump(by_alias=True, exclude_none=True)
        if self.reasoning is not None and self.reasoning.effort is not None:
            body["reasoning_effort"] = self.reasoning.effort
        body = {k: v for k, v in body.items() if v is not None}
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise in_responses_terms(APIError(400, *validation_message(exc.errors()[0]))) from None

    def messages(self, image_file: ImageFileReader | None = None) -> list[dict[str, Any]]:
        """``instructions`` and ``input`` as chat messages: message items as they are (text parts joined; a user
        message's ``input_image`` parts the chat request's ``image_url`` parts, between its runs of text),
        ``function_call`` items as an assistant message's tool calls, ``function_call_output`` items as tool
        messages, a ``reasoning`` item (a previous answer's thinking) as the ``reasoning_content`` of the assistant
        message right after it (which chat templates such as Qwen3's render within a tool-calling turn). Reasoning
        items in a row are one turn's thinking, joined with a newline; thinking that no assistant message follows
        (another role's message comes next, or the input ends) belongs to no turn and is left out."""
        messages: list[dict[str, Any]] = []
        if self.instructions is not None:
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
            return messages
        thinking: str | None = None  # a reasoning item's text, for the assistant message that follows it
        for i, item in enumerate(self.input):
            where = f"input[{i}]"
            if not isinstance(item, dict):
                raise bad_request(f"{where}: must be an object (a message or a function call item)", "input")
            kind = item.get("type", "message")
            if kind == "reasoning":
                text = _reasoning_text(item, where)
                thinking = text if thinking is None else f"{thinking}\n{text}"
                continue
            if kind == "message":
                messages.append(_message(item, where, image_file))
            elif kind == "function_call":
                call = _function_call(item, where)
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                    last["tool_calls"].append(call)  # calls of one turn: one assistant message
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "function_call_output":
                messages.append(_function_output(item, where))
            else:
                raise bad_request(f"{where}: items of type {str(kind)[:80]!r} are not supported here (message, "
                                  "function_call, function_call_output and reasoning are)", "input")
            if thinking is not None and messages[-1]["role"] == "assistant":  # (a turn's later calls: joined)
                earlier = messages[-1].get("reasoning_content")
                messages[-1]["reasoning_content"] = thinking if earlier is None else f"{earlier}\n{thinking}"
            thinking = None  # the next item took it, or another role's turn came between it and any answer
        return messages


_CHAT_FIELDS = (  # a chat request's field path (its start) -> the Responses request's field it came from
    (re.compile(r"messages\b.*"), "input"),
    (re.compile(r"max_tokens\b"), "max_output_tokens"),
    (re.compile(r"(top_)?logprobs\b"), "top_logprobs"),
    (re.compile(r"reasoning_effort\b"), "reasoning.effort"),
    (re.compile(r"response_format(\.json_schema)?"), "text.format"),
    (re.compile(r"tools(\[\d+\]|\.\d+)\.function"), lambda m: f"tools[{m.group(1).strip('[].')}]"),
)


class InputTokensRequest(_Body):
    """``POST /v1/responses/input_tokens``: the input side of a Responses request (the fields OpenAI's count takes),
    whose prompt the server renders as :class:`ResponsesRequest` would and counts, generating nothing."""

    # The values are checked as ResponsesRequest checks them (as_response_request): the same messages.
    model: Any = None
    input: Any = None
    instructions: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    text: Any = None
    reasoning: Any = None
    previous_response_id: Any = None
    conversation: Any = None
    truncation: Any = None

    def as_response_request(self) -> ResponsesRequest:
        """The Responses request with this input, validated as one (a 400 naming the field when it is not)."""
        try:
            return ResponsesRequest.model_validate(self.model_dump(exclude_unset=True))
        except ValidationError as exc:
            raise APIError(400, *validation_message(exc.errors()[0])) from None


def responses_param(chat_param: str | None) -> str | None:
    """The field of a Responses request that a chat request's field path ``chat_param`` (of :meth:`to_chat`'s
    request) came from: ``messages...`` is ``input``, ``response_format.json_schema.schema`` is
    ``text.format.schema``, ``tools[0].function.parameters`` is ``tools[0].parameters``, ...; others are the same."""
    for pattern, name in _CHAT_FIELDS:
        match = pattern.match(chat_param or "")
        if match:
            return (name(match) if callable(name) else name) + chat_param[match.end():]
    return chat_param


def in_responses_terms(error: APIError) -> APIError:
    """A chat endpoint's error about :meth:`ResponsesRequest.to_chat`'s request, naming the Responses request's
    field instead (in ``param`` and where the message starts with it; a field named like ``max_tokens``, no
    English word, wherever the message names it)."""
    param = responses_param(error.param)
    if param == error.param:
        return error
    if "_" in error.param:
        return renamed(error, error.param, param)
    message = error.message
    if message.startswith(error.param):
        message = param + message[len(error.param):]
    return APIError(error.status, message, param, error.code, error.headers)


def _string(item: dict[str, Any], key: str, where: str, max_chars: int = MAX_TEXT_CHARS) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise bad_request(f"{where}.{key}: must be a string", "input")
    if len(value) > max_chars:
        raise bad_request(f"{where}.{key}: at most {max_chars} characters", "input")
    return value


def _allowed_keys(item: dict[str, Any], keys: set[str], where: str) -> None:
    extra = sorted(set(item) - keys)
    if extra:
        raise bad_request(f"{where}: unknown field {extra[0][:80]!r}", "input")


def _text_of(content: Any, field: str) -> str:
    """A message item's content or a call output (``field``: where it is, for the error) given as a string or as
    text parts, as one string; 400 for images, files and audio."""
    parts = _content_parts(content, field, images=False)
    assert isinstance(parts, str)
    return parts


def _content_parts(content: Any, field: str, images: bool,
                   image_file: ImageFileReader | None = None) -> str | list[dict[str, Any]]:
    """A message item's content as one string (text parts joined), or, where ``images`` are taken (a user
    message's) and some part is one, as the chat request's parts: each run of text parts one ``text`` part, each
    ``input_image`` an ``image_url`` part (which the chat request joins with newlines, as it joins its own parts)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{field}: must be a string or a list of content parts", "input")
    if len(content) > MAX_CONTENT_PARTS:
        raise bad_request(f"{field}: at most {MAX_CONTENT_PARTS} content parts", "input")
    parts: list[dict[str, Any]] = []
    texts: list[str] = []  # the text parts since the last image
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if images and kind == "input_image":
            if texts:
                parts.append({"type": "text", "text": "".join(texts)})
                texts = []
            parts.append(_image_part(part, f"{field}[{j}]", image_file))
            continue
        if kind not in _TEXT_PARTS:
            taken = ", ".join((*_TEXT_PARTS[:2], "input_image") if images else _TEXT_PARTS[:2])
            where = "" if images or kind != "input_image" else " (images go in user messages)"
            raise bad_request(f"{field}[{j}]: only text{' and image' if images else ''} parts ({taken}) are "
                              f"supported{where}, not {str(kind)[:80]!r}", "input")
        texts.append(_string(part, "text", f"{field}[{j}]"))
    if not parts:
        return "".join(texts)
    if texts:
        parts.append({"type": "text", "text": "".join(texts)})
    return parts


def _image_part(part: dict[str, Any], field: str, image_file: ImageFileReader | None) -> dict[str, Any]:
    """An ``input_image`` part as the chat request's ``image_url`` part (the chat request checks the URL and
    ``detail`` and the model reads the image); an image by ``file_id`` is read by ``image_file`` (one of the
    server's uploaded files, as a data: URL)."""
    _allowed_keys(part, _IMAGE_KEYS, field)
    file_id = part.get("file_id")
    if file_id is not None:
        if part.get("image_url") is not None:
            raise bad_request(f"{field}: give the image by image_url or by file_id, not both", "input")
        if not isinstance(file_id, str) or not file_id:
            raise bad_request(f"{field}.file_id: must be the id of an uploaded file", "input")
        if image_file is None:
            raise bad_request(f"{field}.file_id: images by file_id are not supported here; send the image in "
                              "image_url, as a data: URL (base64) or an http(s) URL", "input")
        part = {**part, "image_url": image_file(file_id, f"{field}.file_id")}
    url = part.get("image_url")
    if not isinstance(url, str) or not url:
        raise bad_request(f"{field}.image_url: must be the image's URL, a data: URL (base64) or an http(s) URL",
                          "input")
    detail = part.get("detail")
    if detail is not None and detail not in ("auto", "low", "high"):
        raise bad_request(f"{field}.detail: must be 'auto', 'low' or 'high'", "input")
    return {"type": "image_url", "image_url": {"url": url, **({"detail": detail} if detail else {})}}


def _message(item: dict[str, Any], where: str, image_file: ImageFileReader | None) -> dict[str, Any]:
    _allowed_keys(item, {"type", "role", "content", "id", "status", "phase"}, where)
    role = item.get("role")
    if role not in _MESSAGE_ROLES:
        raise bad_request(f"{where}.role: must be one of {', '.join(_MESSAGE_ROLES)}", "input")
    return {"role": role,
            "content": _content_parts(item.get("content"), f"{where}.content", role == "user", image_file)}


def _reasoning_text(item: dict[str, Any], where: str) -> str:
    """A reasoning item's thinking: its ``reasoning_text`` parts joined (else its summary's text)."""
    _allowed_keys(item, {"type", "id", "summary", "content", "encrypted_content", "status"}, where)
    parts = item.get("content") or item.get("summary") or []
    if not isinstance(parts, list) or len(parts) > MAX_CONTENT_PARTS:
        raise bad_request(f"{where}.content: must be a list of at most {MAX_CONTENT_PARTS} reasoning_text parts",
                          "input")
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") not in ("reasoning_text", "summary_text"):
            raise bad_request(f"{where}.content[{j}]: must be a reasoning_text part", "input")
        texts.append(_string(part, "text", f"{where}.content[{j}]"))
    return "".join(texts)


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    _allowed_keys(item, {"type", "call_id", "name", "arguments", "id", "status"}, where)
    return {"id": _string(item, "call_id", where, MAX_ID_CHARS), "type": "function",
            "function": {"name": _string(item, "name", where, MAX_FUNCTION_NAME_CHARS),
                         "arguments": _string(item, "arguments", where)}}


def _function_output(item: dict[str, Any], where: str) -> dict[str, Any]:
    _allowed_keys(item, {"type", "call_id", "output", "id", "status"}, where)
    return {"role": "tool", "tool_call_id": _string(item, "call_id", where, MAX_ID_CHARS),
            "content": _text_of(item.get("output"), f"{where}.output")}
