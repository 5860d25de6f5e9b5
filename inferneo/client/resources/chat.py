"""``client.chat.completions``: ``POST /v1/chat/completions``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

from pydantic import BaseModel
from typing_extensions import Unpack

from inferneo.client.resources._params import ChatCompletionArgs, ChatParseArgs, Messages, build_body
from inferneo.client.streaming import AsyncStream, Stream
from inferneo.client.structured import OutputFormat, ResponseFormatInput, parse_chat_completion, split_tools
from inferneo.client.types import ChatCompletion, ChatCompletionChunk, ParsedChatCompletion

if TYPE_CHECKING:
    from inferneo.client._base import AsyncAPIClient, SyncAPIClient, Timeout


def _body(model: str | None, messages: Messages, stream: bool, args: Mapping[str, Any],
          extra_body: Mapping[str, Any] | None) -> dict[str, Any]:
    return build_body(ChatCompletionArgs, "create",
                      {"model": model, "messages": messages, "stream": stream or None}, args, extra_body)


Tools = Sequence[dict[str, Any] | type[BaseModel]]


def _parse_setup(response_format: ResponseFormatInput | None, tools: Tools | None
                 ) -> tuple[OutputFormat | None, dict[str, Any], dict[str, OutputFormat]]:
    """The output format, the fields ``parse`` adds to the request, and the tools' argument formats."""
    fmt = None if response_format is None else OutputFormat.of(response_format)
    wire_tools, tool_formats = split_tools(tools)
    fields = {"response_format": fmt.response_format if fmt else None, "tools": wire_tools}
    return fmt, {k: v for k, v in fields.items() if v is not None}, tool_formats


class ChatCompletions:
    """Chat over one conversation, or (an Inferneo extension) a list of conversations answered in one call."""

    def __init__(self, client: SyncAPIClient) -> None:
        self._client = client

    @overload
    def create(self, *, messages: Messages, model: str | None = None, stream: Literal[False] = False,
               extra_headers: Mapping[str, str] | None = None, extra_query: Mapping[str, Any] | None = None,
               extra_body: Mapping[str, Any] | None = None, timeout: Timeout | None = None,
               **args: Unpack[ChatCompletionArgs]) -> ChatCompletion: ...

    @overload
    def create(self, *, messages: Messages, model: str | None = None, stream: Literal[True],
               extra_headers: Mapping[str, str] | None = None, extra_query: Mapping[str, Any] | None = None,
               extra_body: Mapping[str, Any] | None = None, timeout: Timeout | None = None,
               **args: Unpack[ChatCompletionArgs]) -> Stream[ChatCompletionChunk]: ...

    def create(self, *, messages: Messages, model: str | None = None, stream: bool = False,
               extra_headers: Mapping[str, str] | None = None, extra_query: Mapping[str, Any] | None = None,
               extra_body: Mapping[str, Any] | None = None, timeout: Timeout | None = None,
               **args: Unpack[ChatCompletionArgs]) -> ChatCompletion | Stream[ChatCompletionChunk]:
        """Answer ``messages`` (``[{"role", "content"}, ...]``, or a list of such conversations: one choice per
        conversation, in order). Keyword arguments as in :meth:`Completions.create
        <inferneo.client.resources.completions.Completions.create>`; with ``stream=True`` the answer is a
        :class:`Stream` of :class:`ChatCompletionChunk`."""
        return self._client.request("POST", "/chat/completions", ChatCompletionChunk if stream else ChatCompletion,
                                    body=_body(model, messages, stream, args, extra_body), query=extra_query,
                                    headers=extra_headers, timeout=timeout, stream=stream)

    def parse(self, *, messages: Messages, response_format: ResponseFormatInput | None = None,
              tools: Tools | None = None, model: str | None = None, extra_headers: Mapping[str, str] | None = None,
              extra_query: Mapping[str, Any] | None = None, extra_body: Mapping[str, Any] | None = None,
              timeout: Timeout | None = None, **args: Unpack[ChatParseArgs]) -> ParsedChatCompletion[Any]:
        """Like ``create``, with the answer read into a type, as the OpenAI SDK's ``chat.completions.parse``.

        ``response_format`` is a pydantic model class (or another type pydantic can describe, or a JSON schema
        dict): its JSON schema is sent as ``{"type": "json_schema", ...}`` and each choice's
        ``message.parsed`` is the answer as a validated instance (plain JSON values for a schema dict).
        ``tools`` may hold pydantic model classes next to plain tool dicts: each becomes a function named after
        the class, and its calls' ``function.parsed_arguments`` are instances of it. Raises
        :class:`~inferneo.client.errors.LengthFinishReasonError` when an answer was cut off by ``max_tokens``,
        and :class:`~inferneo.client.errors.StructuredOutputError` when one does not validate.
        """
        fmt, fields, tool_formats = _parse_setup(response_format, tools)
        completion = self.create(messages=messages, model=model, extra_headers=extra_headers,
                                 extra_query=extra_query, extra_body=extra_body, timeout=timeout,
                                 **fields, **args)
        return parse_chat_completion(completion, fmt, tool_formats)


class AsyncChatCompletions:
    """The async twin of :class:`ChatCompletions`."""

    def __init__(self, client: AsyncAPIClient) -> None:
        self._client = client

    @overload
    async def create(self, *, messages: Messages, model: str | None = None, stream: Literal[False] = False,
                     extra_headers: Mapping[str, str] | None = None, extra_query: Mapping[str, Any] | None = None,
                     extra_body: Mapping[str, Any] | None = None, timeout: Timeout | None = None,
                     **args: Unpack[ChatCompletionArgs]) -> ChatCompletion: ...

    @overload
    async def create(self, *, messages: Messages, model: str | None = None, stream: Literal[True],
                     extra_headers: Mapping[str, str] | None = None, extra_query: Mapping[str, Any] | None = None,
                     extra_body: Mapping[str, Any] | None = None, timeout: Timeout | None = None,
                     **args: Unpack[ChatCompletionArgs]) -> AsyncStream[ChatCompletionChunk]: ...

    async def create(self, *, messages: Messages, model: str | None = None, stream: bool = False,
                     extra_headers: Mapping[str, str] | None = None, extra_query: Mapping[str, Any] | None = None,
                     extra_body: Mapping[str, Any] | None = None, timeout: Timeout | None = None,
                     **args: Unpack[ChatCompletionArgs]) -> ChatCompletion | AsyncStream[ChatCompletionChunk]:
        """Answer ``messages``; see :meth:`ChatCompletions.create`. With ``stream=True``, an :class:`AsyncStream`."""
        return await self._client.request("POST", "/chat/completions",
                                          ChatCompletionChunk if stream else ChatCompletion,
                                          body=_body(model, messages, stream, args, extra_body), query=extra_query,
                                          headers=extra_headers, timeout=timeout, stream=stream)

    async def parse(self, *, messages: Messages, response_format: ResponseFormatInput | None = None,
                    tools: Tools | None = None, model: str | None = None,
                    extra_headers: Mapping[str, str] | None = None, extra_query: Mapping[str, Any] | None = None,
                    extra_body: Mapping[str, Any] | None = None, timeout: Timeout | None = None,
                    **args: Unpack[ChatParseArgs]) -> ParsedChatCompletion[Any]:
        """The answer read into ``response_format``'s type; see :meth:`ChatCompletions.parse`."""
        fmt, fields, tool_formats = _parse_setup(response_format, tools)
        completion = await self.create(messages=messages, model=model, extra_headers=extra_headers,
                                       extra_query=extra_query, extra_body=extra_body, timeout=timeout,
                                       **fields, **args)
        return parse_chat_completion(completion, fmt, tool_formats)


class Chat:
    """``client.chat``: holds ``completions``."""

    def __init__(self, client: SyncAPIClient) -> None:
        self.completions = ChatCompletions(client)


class AsyncChat:
    """``client.chat`` of the async client."""

    def __init__(self, client: AsyncAPIClient) -> None:
        self.completions = AsyncChatCompletions(client)
