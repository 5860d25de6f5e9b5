"""``client.completions``: ``POST /v1/completions``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, overload

from typing_extensions import Unpack

from inferneo.client.resources._params import CompletionArgs, CompletionParseArgs, Prompt, build_body
from inferneo.client.streaming import AsyncStream, Stream
from inferneo.client.structured import OutputFormat, ResponseFormatInput, parse_completion
from inferneo.client.types import Completion, ParsedCompletion

if TYPE_CHECKING:
    from inferneo.client._base import AsyncAPIClient, SyncAPIClient, Timeout


def _body(model: str | None, prompt: Prompt, stream: bool, args: Mapping[str, Any],
          extra_body: Mapping[str, Any] | None) -> dict[str, Any]:
    return build_body(CompletionArgs, "create", {"model": model, "prompt": prompt, "stream": stream or None},
                      args, extra_body)


class Completions:
    """Text completion for one prompt or a list of prompts (one choice each, in order, times ``n``)."""

    def __init__(self, client: SyncAPIClient) -> None:
        self._client = client

    @overload
    def create(self, *, prompt: Prompt, model: str | None = None, stream: Literal[False] = False,
               extra_headers: Mapping[str, str] | None = None, extra_query: Mapping[str, Any] | None = None,
               extra_body: Mapping[str, Any] | None = None, timeout: Timeout | None = None,
               **args: Unpack[CompletionArgs]) -> Completion: ...

    @overload
    def create(self, *, prompt: Prompt, model: str | None = None, stream: Literal[True],
               extra_headers: Mapping[str, str] | None = None, extra_query: Mapping[str, Any] | None = None,
               extra_body: Mapping[str, Any] | None = None, timeout: Timeout | None = None,
               **args: Unpack[CompletionArgs]) -> Stream[Completion]: ...

    def create(self, *, prompt: Prompt, model: str | None = None, stream: bool = False,
               extra_headers: Mapping[str, str] | None = None, extra_query: Mapping[str, Any] | None = None,
               extra_body: Mapping[str, Any] | None = None, timeout: Timeout | None = None,
               **args: Unpack[CompletionArgs]) -> Completion | Stream[Completion]:
        """Complete ``prompt``: a string, a list of strings, a list of token ids or a list of lists of them.

        Every OpenAI field and Inferneo extension (``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``,
        ``ignore_eos``, ``stop_token_ids``, ``skip_special_tokens``, ``priority``, ...) is a keyword argument;
        ``model`` defaults to the server's main model. With ``stream=True`` the answer is a :class:`Stream` of
        :class:`Completion` chunks.
        """
        return self._client.request("POST", "/completions", Completion,
                                    body=_body(model, prompt, stream, args, extra_body), query=extra_query,
                                    headers=extra_headers, timeout=timeout, stream=stream)

    def parse(self, *, prompt: Prompt, response_format: ResponseFormatInput, model: str | None = None,
              extra_headers: Mapping[str, str] | None = None, extra_query: Mapping[str, Any] | None = None,
              extra_body: Mapping[str, Any] | None = None, timeout: Timeout | None = None,
              **args: Unpack[CompletionParseArgs]) -> ParsedCompletion[Any]:
        """Like ``create``, with each choice's ``parsed``: its text read into ``response_format``'s type (a
        pydantic model class, another type pydantic can describe, or a JSON schema dict), whose JSON schema is
        sent as the request's ``response_format``. Errors as for :meth:`ChatCompletions.parse
        <inferneo.client.resources.chat.ChatCompletions.parse>`."""
        fmt = OutputFormat.of(response_format)
        completion = self.create(prompt=prompt, model=model, response_format=fmt.response_format,
                                 extra_headers=extra_headers, extra_query=extra_query, extra_body=extra_body,
                                 timeout=timeout, **args)
        return parse_completion(completion, fmt)


class AsyncCompletions:
    """The async twin of :class:`Completions`."""

    def __init__(self, client: AsyncAPIClient) -> None:
        self._client = client

    @overload
    async def create(self, *, prompt: Prompt, model: str | None = None, stream: Literal[False] = False,
                     extra_headers: Mapping[str, str] | None = None, extra_query: Mapping[str, Any] | None = None,
                     extra_body: Mapping[str, Any] | None = None, timeout: Timeout | None = None,
                     **args: Unpack[CompletionArgs]) -> Completion: ...

    @overload
    async def create(self, *, prompt: Prompt, model: str | None = None, stream: Literal[True],
                     extra_headers: Mapping[str, str] | None = None, extra_query: Mapping[str, Any] | None = None,
                     extra_body: Mapping[str, Any] | None = None, timeout: Timeout | None = None,
                     **args: Unpack[CompletionArgs]) -> AsyncStream[Completion]: ...

    async def create(self, *, prompt: Prompt, model: str | None = None, stream: bool = False,
                     extra_headers: Mapping[str, str] | None = None, extra_query: Mapping[str, Any] | None = None,
                     extra_body: Mapping[str, Any] | None = None, timeout: Timeout | None = None,
                     **args: Unpack[CompletionArgs]) -> Completion | AsyncStream[Completion]:
        """Complete ``prompt``; see :meth:`Completions.create`. With ``stream=True``, an :class:`AsyncStream`."""
        return await self._client.request("POST", "/completions", Completion,
                                          body=_body(model, prompt, stream, args, extra_body), query=extra_query,
                                          headers=extra_headers, timeout=timeout, stream=stream)

    async def parse(self, *, prompt: Prompt, response_format: ResponseFormatInput, model: str | None = None,
                    extra_headers: Mapping[str, str] | None = None, extra_query: Mapping[str, Any] | None = None,
                    extra_body: Mapping[str, Any] | None = None, timeout: Timeout | None = None,
                    **args: Unpack[CompletionParseArgs]) -> ParsedCompletion[Any]:
        """Each choice's text read into ``response_format``'s type; see :meth:`Completions.parse`."""
        fmt = OutputFormat.of(response_format)
        completion = await self.create(prompt=prompt, model=model, response_format=fmt.response_format,
                                       extra_headers=extra_headers, extra_query=extra_query,
                                       extra_body=extra_body, timeout=timeout, **args)
        return parse_completion(completion, fmt)
