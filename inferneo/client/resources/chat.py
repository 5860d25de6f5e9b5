"""``client.chat.completions``: ``POST /v1/chat/completions``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, overload

from typing_extensions import Unpack

from inferneo.client.resources._params import ChatCompletionArgs, Messages, build_body
from inferneo.client.streaming import AsyncStream, Stream
from inferneo.client.types import ChatCompletion, ChatCompletionChunk

if TYPE_CHECKING:
    from inferneo.client._base import AsyncAPIClient, SyncAPIClient, Timeout


def _body(model: str | None, messages: Messages, stream: bool, args: Mapping[str, Any],
          extra_body: Mapping[str, Any] | None) -> dict[str, Any]:
    return build_body(ChatCompletionArgs, "create",
                      {"model": model, "messages": messages, "stream": stream or None}, args, extra_body)


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


class Chat:
    """``client.chat``: holds ``completions``."""

    def __init__(self, client: SyncAPIClient) -> None:
        self.completions = ChatCompletions(client)


class AsyncChat:
    """``client.chat`` of the async client."""

    def __init__(self, client: AsyncAPIClient) -> None:
        self.completions = AsyncChatCompletions(client)
