"""The request bodies of Anthropic's Messages API (``POST /v1/messages`` and ``/v1/messages/count_tokens``), and
their translation to a chat completion request.

The bodies are checked as strictly as the OpenAI endpoints' (``openai/protocol.py``): unknown fields and wrong types
are refused with 400 naming the field. A message's ``content`` is a string or a list of ``text``, ``image`` (a
user's, by ``base64`` data or by ``url``, for a vision-language model: the chat request's ``image_url`` parts),
``tool_use`` (an assistant's), ``tool_result`` (a user's), ``thinking`` and ``redacted_thinking`` (an assistant's)
blocks (a ``system`` message, which the SDK's types allow, holds text); documents, images inside a ``tool_result``
and server tools are refused. Fields of Anthropic's service that change nothing here (``metadata``,
``service_tier``, ``thinking``, ``cache_control`` on the request, its blocks and tools) are checked and ignored; the
chat endpoint's extensions (``seed``, ``structured_outputs``, ``chat_template_kwargs``, ...) are taken.

:meth:`MessagesRequest.to_chat` turns a valid body into the equivalent
:class:`~inferneo.entrypoints.openai.protocol.ChatCompletionRequest`: ``system`` (and the ``system`` messages'
text) is the system message, a ``tool_use`` block an assistant tool call, a ``tool_result`` block a ``tool``
message, and a conversation that ends with the assistant's turn is continued (Anthropic's prefill; the chat
request's ``continue_final_message``).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator

from inferneo.entrypoints.openai.errors import APIError, validation_message
from inferneo.entrypoints.openai.protocol import (
    INT64_MAX,
    MAX_CONTENT_PARTS,
    MAX_ID_CHARS,
    MAX_MESSAGES,
    MAX_MODEL_CHARS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TEXT_CHARS,
    MAX_TOOLS,
    ChatCompletionRequest,
    FunctionName,
    StructuredOutputsBody,
    _Body,
)
from inferneo.multimodal.image_loading import MAX_IMAGE_BYTES

_BLOCK_TYPES = ("text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking")
CacheControl = dict[str, Any] | None
"""A block's (or the request's) ``cache_control``: Anthropic's prompt-cache hint. The prefix cache needs none, so it
is accepted and ignored."""


def _blocks(value: Any) -> Any:
    """A ``content`` given as a string is one text block; a list must hold only the block types offered here."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if isinstance(value, list):
        if len(value) > MAX_CONTENT_PARTS:
            raise ValueError(f"at most {MAX_CONTENT_PARTS} content blocks, got {len(value)}")
        for j, block in enumerate(value):
            kind = block.get("type") if isinstance(block, dict) else None
            if not isinstance(kind, str):
                raise ValueError(f"block {j}: must be an object with a 'type' ({', '.join(_BLOCK_TYPES)})")
            if kind not in _BLOCK_TYPES:
                raise ValueError(f"block {j}: {kind[:80]!r} blocks are not supported by this server (it takes "
                                 f"{', '.join(_BLOCK_TYPES)})")
    return value


class TextBlock(_Body):
    """``{"type": "text", "text": ...}``."""

    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)
    cache_control: CacheControl = None
    citations: list[dict[str, Any]] | None = None  # an earlier answer's citations (none are written here): ignored


class Base64ImageSource(_Body):
    """An image's bytes inline: ``{"type": "base64", "media_type": "image/png", "data": ...}``."""

    type: Literal["base64"]
    media_type: Literal["image/png", "image/jpeg", "image/gif", "image/webp"]
    data: str = Field(min_length=1, max_length=MAX_IMAGE_BYTES * 4 // 3 + 4)

    def url(self) -> str:
        """The image as a ``data:`` URL (which the chat request's ``image_url`` part carries)."""
        return f"data:{self.media_type};base64,{self.data}"


class URLImageSource(_Body):
    """An image the server fetches: ``{"type": "url", "url": "https://..."}``."""

    type: Literal["url"]
    url: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)


class ImageBlock(_Body):
    """A user's image: ``{"type": "image", "source": {...}}`` (base64 data or a URL; Anthropic's ``file`` sources
    name files of its Files API, which this server does not keep)."""

    type: Literal["image"]
    source: Annotated[Base64ImageSource | URLImageSource, Field(discriminator="type")]
    cache_control: CacheControl = None

    def chat_part(self) -> dict[str, Any]:
        """The chat request's ``image_url`` part for this image (which checks and reads it)."""
        url = self.source.url() if isinstance(self.source, Base64ImageSource) else self.source.url
        return {"type": "image_url", "image_url": {"url": url}}


def _result_blocks(value: Any) -> Any:
    """A ``tool_result``'s ``content``: a string or text blocks (images there are refused, by name)."""
    value = _blocks(value)
    for j, block in enumerate(value if isinstance(value, list) else ()):
        if block.get("type") == "image":
            raise ValueError(f"block {j}: images inside a tool_result are not supported by this server; put the "
                             "image in the user message's content, beside the tool_result")
    return value


class ToolUseBlock(_Body):
    """An assistant's call of a tool: ``{"type": "tool_use", "id", "name", "input": {...}}``."""

    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    name: FunctionName
    input: dict[str, Any]
    cache_control: CacheControl = None


class ToolResultBlock(_Body):
    """A tool's result, in the user's turn after the call: ``{"type": "tool_result", "tool_use_id", "content"}``
    (``content`` a string or text blocks; ``is_error`` is accepted: the text says what went wrong)."""

    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    content: Annotated[list[TextBlock], BeforeValidator(_result_blocks)] = Field(default_factory=list)
    is_error: bool | None = None
    cache_control: CacheControl = None

    def text(self) -> str:
        return "\n".join(block.text for block in self.content)


class ThinkingBlock(_Body):
    """An earlier answer's thinking, sent back in its assistant turn."""

    type: Literal["thinking"]
    thinking: str = Field(max_length=MAX_TEXT_CHARS)
    signature: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    cache_control: CacheControl = None


class RedactedThinkingBlock(_Body):
    """Thinking Anthropic's service encrypted: opaque, so left out of the prompt."""

    type: Literal["redacted_thinking"]
    data: str = Field(max_length=MAX_TEXT_CHARS)
    cache_control: CacheControl = None


ContentBlock = Annotated[TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock
                         | RedactedThinkingBlock,
                         Field(discriminator="type")]
_ROLE_BLOCKS = {"user": ("text", "image", "tool_result"), "assistant": ("text", "tool_use", "thinking", "redacted_thinking"),
                "system": ("text",)}
# Claude Code starts its system prompt with a text block of billing metadata for Anthropic's service, which changes
# with every request: left out, so that the prompt's prefix stays the same and the prefix cache serves it.
_BILLING_HEADER = "x-anthropic-billing-header"


class InputMessage(_Body):
    """One turn of ``messages``: the user's or the assistant's, its content a string or a list of blocks; or a
    ``system`` message (text), which the SDK's types allow and recent Claude Code sends."""

    role: Literal["user", "assistant", "system"]
    content: Annotated[list[ContentBlock], BeforeValidator(_blocks), Field(min_length=1)]

    @model_validator(mode="after")
    def _blocks_of_the_role(self) -> InputMessage:
        for j, block in enumerate(self.content):
            if block.type not in _ROLE_BLOCKS[self.role]:
                raise ValueError(f"content[{j}]: a {self.role} message cannot hold a {block.type} block (it may "
                                 f"hold {', '.join(_ROLE_BLOCKS[self.role])})")
        return self


class Tool(_Body):
    """A tool the model may call (a client tool: Anthropic's server tools are not offered here)."""

    name: FunctionName
    description: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    strict: bool | None = None
    cache_control: CacheControl = None

    def chat_form(self) -> dict[str, Any]:
        """The chat endpoint's shape of this tool."""
        function = {"name": self.name, "description": self.description, "parameters": self.input_schema,
                    "strict": self.strict}
        return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}


class ToolChoice(_Body):
    """``tool_choice``: ``auto`` (the model decides), ``any`` (some tool), ``tool`` (the one ``name``d) or
    ``none``; ``disable_parallel_tool_use`` keeps one call."""

    type: Literal["auto", "any", "tool", "none"]
    name: FunctionName | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _name_with_tool(self) -> ToolChoice:
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("name goes with type 'tool' (the tool to call), and only with it")
        if self.type == "none" and self.disable_parallel_tool_use is not None:
            raise ValueError("disable_parallel_tool_use does not go with type 'none'")
        return self

    def chat_form(self) -> str | dict[str, Any]:
        """The chat endpoint's ``tool_choice``."""
        if self.type == "tool":
            return {"type": "function", "function": {"name": self.name}}
        return {"auto": "auto", "any": "required", "none": "none"}[self.type]


class Metadata(_Body):
    """``metadata``: Anthropic's ``user_id`` (accepted, ignored)."""

    user_id: str | None = Field(None, max_length=MAX_ID_CHARS)


class ThinkingConfig(_Body):
    """``thinking``: Anthropic's extended-thinking switch. A local model thinks as its chat template and the
    server's ``--reasoning-parser`` say, so it is accepted and ignored."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=0, le=INT64_MAX)
    display: Literal["summarized", "omitted"] | None = None


class JsonOutputFormat(_Body):
    """``output_config.format``: the answer's text is JSON matching ``schema``."""

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Body):
    """``output_config``: the answer's ``format`` (a JSON schema, as the chat endpoint's ``response_format``) and
    ``effort`` (the chat template's ``reasoning_effort``, as the chat endpoint passes it)."""

    format: JsonOutputFormat | None = None
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None


def _system(value: Any) -> Any:
    """``system``: a string, or text blocks (kept as a list, to be joined as the chat endpoint joins parts)."""
    blocks = value if isinstance(value, list) else []
    if not isinstance(value, str | list | None) or any(not isinstance(b, dict) or b.get("type") != "text"
                                                        for b in blocks):
        raise ValueError("must be a string or a list of text blocks")
    return value


class _Conversation(_Body):
    """What a Messages request and a token count share: the model, the conversation, the system prompt and tools."""

    model: str = Field(min_length=1, max_length=MAX_MODEL_CHARS)
    messages: list[InputMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: Annotated[str | list[TextBlock] | None, BeforeValidator(_system)] = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    cache_control: CacheControl = None
    # Inferneo's extension, as on the chat endpoint (vLLM's name): the chat template's variables
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("system", mode="after")
    @classmethod
    def _system_size(cls, value: str | list[TextBlock] | None) -> str | list[TextBlock] | None:
        if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
            raise ValueError(f"at most {MAX_TEXT_CHARS} characters")
        return value

    @field_validator("tools", mode="before")
    @classmethod
    def _client_tools_only(cls, value: Any) -> Any:
        for i, tool in enumerate(value if isinstance(value, list) else ()):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if isinstance(kind, str) and kind != "custom":
                raise ValueError(f"[{i}]: only client tools (name, description, input_schema) are supported here, "
                                 f"not Anthropic's server tool {kind[:80]!r}")
        return value

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, value: list[Tool] | None) -> list[Tool] | None:
        names = [tool.name for tool in value or ()]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"two tools are named {name!r}; names must be unique")
        return value

    def chat_fields(self) -> dict[str, Any]:
        """The chat request's fields for the conversation, tools and output format (no sampling settings)."""
        messages = self.chat_messages()
        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                "chat_template_kwargs": self.chat_template_kwargs}
        if messages[-1]["role"] == "assistant":  # prefill: the answer continues the assistant's last turn
            body.update(add_generation_prompt=False, continue_final_message=True)
        if self.tools:
            body["tools"] = [tool.chat_form() for tool in self.tools]
        if self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice.chat_form()
            if self.tool_choice.disable_parallel_tool_use:
                body["parallel_tool_calls"] = False
        if self.output_config is not None:
            if self.output_config.format is not None:
                body["response_format"] = {"type": "json_schema", "json_schema": {
                    "name": "output", "schema": self.output_config.format.schema_}}
            if self.output_config.effort is not None:
                body["reasoning_effort"] = self.output_config.effort
        return body

    def chat_messages(self) -> list[dict[str, Any]]:
        """``system`` and ``messages`` as chat messages: text blocks joined as the chat endpoint joins text parts
        (a newline between them), an assistant's ``tool_use`` blocks its ``tool_calls`` and its ``thinking`` its
        ``reasoning_content``, each ``tool_result`` block a ``tool`` message (in the order of the user's blocks:
        text around the results becomes user messages between them), a user's ``image`` blocks ``image_url`` parts
        among its text. ``system`` and the text of ``system``
        messages (in their order) are the one system message first (chat templates take no other)."""
        system: list[str] = []
        if isinstance(self.system, str):
            system.append(self.system)
        elif self.system is not None:
            system += [block.text for block in self.system if not block.text.startswith(_BILLING_HEADER)]
        for message in self.messages:
            if message.role == "system":
                system += [block.text for block in message.content if not block.text.startswith(_BILLING_HEADER)]
        messages: list[dict[str, Any]] = [{"role": "system", "content": "\n".join(system)}] if system else []
        for message in self.messages:
            if message.role == "system":
                continue
            if message.role == "assistant":
                messages.append(_assistant_message(message.content))
                continue
            parts: list[dict[str, Any]] = []
            for block in message.content:
                if isinstance(block, ToolResultBlock):
                    if parts:
                        messages.append(_user_message(parts))
                        parts = []
                    messages.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text()})
                elif isinstance(block, ImageBlock):
                    parts.append(block.chat_part())
                else:
                    parts.append({"type": "text", "text": block.text})
            if parts:
                messages.append(_user_message(parts))
        return messages

    def _to_chat(self, fields: dict[str, Any]) -> ChatCompletionRequest:
        body = {**self.chat_fields(), **fields}
        try:
            return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
        except ValidationError as exc:
            raise in_messages_terms(APIError(400, *validation_message(exc.errors()[0]))) from None


def _user_message(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """A user message of chat parts: its text (joined by newlines) when it holds no image, else the parts (which
    the chat request joins the same way, each image's mark in its place)."""
    if all(part["type"] == "text" for part in parts):
        return {"role": "user", "content": "\n".join(part["text"] for part in parts)}
    return {"role": "user", "content": parts}


def _assistant_message(content: list[Any]) -> dict[str, Any]:
    texts = [block.text for block in content if isinstance(block, TextBlock)]
    calls = [{"id": block.id, "type": "function",
              "function": {"name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}}
             for block in content if isinstance(block, ToolUseBlock)]
    thinking = [block.thinking for block in content if isinstance(block, ThinkingBlock)]
    message: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    if thinking:
        message["reasoning_content"] = "\n".join(thinking)
    return message


class MessagesRequest(_Conversation):
    """``POST /v1/messages``: one conversation, answered as a message of content blocks, whole or as a stream of
    Anthropic's events."""

    max_tokens: int = Field(ge=1, le=INT64_MAX)
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP_STRINGS)
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, le=INT64_MAX)
    stream: bool | None = False
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    # Inferneo extensions, as on the chat endpoint (vLLM's names; checked there)
    seed: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    priority: int | None = None
    cache_salt: str | None = None
    structured_outputs: StructuredOutputsBody | None = None

    @field_validator("stop_sequences")
    @classmethod
    def _check_stop_sequences(cls, value: list[str] | None) -> list[str] | None:
        for i, stop in enumerate(value or ()):
            if not stop:
                raise ValueError(f"[{i}] is an empty string")
            if len(stop) > MAX_STOP_CHARS:
                raise ValueError(f"[{i}] has {len(stop)} characters; at most {MAX_STOP_CHARS} are allowed")
        return value

    def to_chat(self) -> ChatCompletionRequest:
        """The chat completion request this one asks for (an ``APIError`` 400 when a setting cannot be one)."""
        fields = {"max_tokens": self.max_tokens, "stop": self.stop_sequences, "temperature": self.temperature,
                  "top_p": self.top_p, "top_k": self.top_k, "stream": bool(self.stream), "seed": self.seed,
                  "min_p": self.min_p, "repetition_penalty": self.repetition_penalty, "priority": self.priority,
                  "cache_salt": self.cache_salt}
        if self.structured_outputs is not None:
            fields["structured_outputs"] = self.structured_outputs.model_dump(by_alias=True, exclude_none=True)
        return self._to_chat(fields)


class CountTokensRequest(_Conversation):
    """``POST /v1/messages/count_tokens``: the prompt tokens a Messages request with this conversation, system
    prompt and tools takes, as the model's chat template renders it (nothing is generated)."""

    def to_chat(self) -> ChatCompletionRequest:
        """The chat request whose rendered prompt is the one to count."""
        return self._to_chat({})


_CHAT_FIELDS = (  # a chat request's field (the start of an error's message) -> the Messages request's
    (re.compile(r"stop\b"), "stop_sequences"),
    (re.compile(r"response_format(\.json_schema)?(\.schema)?"), "output_config.format.schema"),
    (re.compile(r"reasoning_effort\b"), "output_config.effort"),
    (re.compile(r"tools(\[\d+\]|\.\d+)\.function\.parameters"), lambda m: f"tools[{m.group(1).strip('[].')}]"
                                                                          ".input_schema"),
    (re.compile(r"tools(\[\d+\]|\.\d+)\.function"), lambda m: f"tools[{m.group(1).strip('[].')}]"),
    (re.compile(r"parallel_tool_calls\b"), "tool_choice.disable_parallel_tool_use"),
)


def in_messages_terms(error: APIError) -> APIError:
    """A chat endpoint's error about :meth:`MessagesRequest.to_chat`'s request, naming the Messages request's field
    instead where its message starts with (or its ``param`` is) a chat field that has another name here. Anthropic's
    error shape has no ``param``, so a message that does not name its field starts with it."""
    param = _messages_field(error.param) if error.param else error.param
    message = _messages_field(error.message)
    if param and param not in message:
        message = f"{param}: {message}"
    if param == error.param and message == error.message:
        return error
    return APIError(error.status, message, param, error.code, error.headers)


def _messages_field(text: str) -> str:
    """``text`` with the chat field it starts with (if any) named as the Messages request names it."""
    for pattern, name in _CHAT_FIELDS:
        match = pattern.match(text)
        if match:
            return (name(match) if callable(name) else name) + text[match.end():]
    return text
