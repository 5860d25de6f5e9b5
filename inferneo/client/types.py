"""Typed responses of the OpenAI wire format as Inferneo serves it.

Every model accepts fields it does not declare (``extra="allow"``), so a newer server never breaks an older
client; declared fields are typed and documented.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, PrivateAttr

__all__ = [
    "Batch",
    "BatchError",
    "BatchErrors",
    "BatchList",
    "BatchRequestCounts",
    "ChatCompletion",
    "ChatCompletionChoice",
    "ChatCompletionChunk",
    "ChatCompletionChunkChoice",
    "ChatCompletionMessage",
    "ChatCompletionMessageToolCall",
    "ChatCompletionTokenLogprob",
    "ChoiceDelta",
    "ChoiceDeltaToolCall",
    "ChoiceDeltaToolCallFunction",
    "ChoiceLogprobs",
    "Completion",
    "CompletionChoice",
    "CompletionLogprobs",
    "CompletionUsage",
    "CursorPage",
    "FileContent",
    "FileDeleted",
    "FileList",
    "FileObject",
    "Function",
    "Model",
    "ModelList",
    "ParsedChatCompletion",
    "ParsedChatCompletionMessage",
    "ParsedChoice",
    "ParsedCompletion",
    "ParsedCompletionChoice",
    "ParsedFunction",
    "ParsedFunctionToolCall",
    "TopLogprob",
]

ContentT = TypeVar("ContentT")


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class PromptTokensDetails(_Model):
    cached_tokens: int | None = None


class CompletionTokensDetails(_Model):
    """``reasoning_tokens``: how many completion tokens a reasoning model spent thinking (with a server's
    ``--reasoning-parser``)."""

    reasoning_tokens: int | None = None


class CompletionUsage(_Model):
    """Token counts of one call (all its choices together)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


# ---- completions -------------------------------------------------------------------------------------------------


class CompletionLogprobs(_Model):
    """The legacy completions log-probability shape."""

    tokens: list[str] | None = None
    token_logprobs: list[float | None] | None = None
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] | None = None


class CompletionChoice(_Model):
    """One completion; ``index`` is ``prompt_position * n + j`` for a list of prompts."""

    index: int
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(_Model):
    """The answer of ``/v1/completions``; also each chunk of a streamed completion."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None


# ---- chat completions --------------------------------------------------------------------------------------------


class TopLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionTokenLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(_Model):
    content: list[ChatCompletionTokenLogprob] | None = None


class Function(_Model):
    """The function a tool call invokes: its ``name`` and its ``arguments`` as a JSON string (parse them with
    ``json.loads``; the model wrote them, so check them before acting on them)."""

    name: str
    arguments: str


class ChatCompletionMessageToolCall(_Model):
    """One call of a tool the request offered (``type`` is ``"function"``)."""

    id: str
    type: str = "function"
    function: Function


class ChatCompletionMessage(_Model):
    """The assistant's answer: its ``content``, or the ``tool_calls`` it makes (then ``finish_reason`` is
    ``"tool_calls"`` and ``content`` is usually ``None``). ``refusal`` is OpenAI's field for a declined
    structured answer; Inferneo never sets it. ``reasoning`` (also sent as ``reasoning_content``) is a reasoning
    model's thinking, returned apart by a server started with ``--reasoning-parser``."""

    role: str = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ChatCompletionMessageToolCall] | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None


class ChatCompletionChoice(_Model):
    """One answer; with a list of conversations, ``index`` is ``conversation_position * n + j``."""

    index: int
    message: ChatCompletionMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(_Model):
    """The answer of ``/v1/chat/completions``."""

    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None


class ChoiceDeltaToolCallFunction(_Model):
    """A piece of a streamed tool call's function: the ``name`` comes whole in the call's first delta, the
    ``arguments`` string in pieces to be joined."""

    name: str | None = None
    arguments: str | None = None


class ChoiceDeltaToolCall(_Model):
    """A piece of one streamed tool call; pieces with the same ``index`` belong to the same call (``id`` and
    ``type`` come in its first piece)."""

    index: int
    id: str | None = None
    type: str | None = None
    function: ChoiceDeltaToolCallFunction | None = None


class ChoiceDelta(_Model):
    """What one chunk adds to a streamed answer: the role first, then pieces of ``reasoning`` (a reasoning model's
    thinking, also sent as ``reasoning_content``), ``content`` or ``tool_calls``."""

    role: str | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ChoiceDeltaToolCall] | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None


class ChatCompletionChunkChoice(_Model):
    index: int
    delta: ChoiceDelta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Model):
    """One event of a streamed chat completion (``choices`` is empty in the final usage chunk)."""

    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None


# ---- parsed answers (``parse``) ---------------------------------------------------------------------------------


class ParsedFunction(Function):
    """A tool call's function whose arguments were parsed: ``parsed_arguments`` is an instance of the pydantic
    model the tool was given as (``None`` for tools given as plain dicts)."""

    parsed_arguments: Any = None


class ParsedFunctionToolCall(ChatCompletionMessageToolCall):
    """A tool call of a parsed answer."""

    function: ParsedFunction


class ParsedChatCompletionMessage(ChatCompletionMessage, Generic[ContentT]):
    """The assistant's answer with ``parsed``, its content as the requested type (``None`` when it called a
    tool instead)."""

    parsed: ContentT | None = None
    tool_calls: list[ParsedFunctionToolCall] | None = None  # type: ignore[assignment]


class ParsedChoice(ChatCompletionChoice, Generic[ContentT]):
    """One parsed answer."""

    message: ParsedChatCompletionMessage[ContentT]


class ParsedChatCompletion(ChatCompletion, Generic[ContentT]):
    """What ``client.chat.completions.parse`` returns: a chat completion whose choices' messages carry
    ``parsed``."""

    choices: list[ParsedChoice[ContentT]]  # type: ignore[assignment]


class ParsedCompletionChoice(CompletionChoice, Generic[ContentT]):
    """One completion with ``parsed``, its text as the requested type."""

    parsed: ContentT | None = None


class ParsedCompletion(Completion, Generic[ContentT]):
    """What ``client.completions.parse`` returns: a completion whose choices carry ``parsed``."""

    choices: list[ParsedCompletionChoice[ContentT]]  # type: ignore[assignment]


# ---- models ------------------------------------------------------------------------------------------------------


class Model(_Model):
    """A served model name (``max_model_len`` is an Inferneo extra, kept as an extra field)."""

    id: str
    object: str = "model"
    created: int | None = None
    owned_by: str | None = None


class ModelList(_Model):
    """``GET /v1/models``; iterating it yields the models."""

    object: str = "list"
    data: list[Model]

    def __iter__(self) -> Iterator[Model]:  # type: ignore[override]
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Model:
        return self.data[index]



# ---- files and batches -------------------------------------------------------------------------------------------

ItemT = TypeVar("ItemT", bound=BaseModel)


class CursorPage(_Model, Generic[ItemT]):
    """One page of a list paged by cursor (``GET /v1/files``, ``GET /v1/batches``): ``data`` holds its items, and
    ``has_more`` says whether more follow it (``after=last_id`` asks for them). Iterating the page, as the openai
    client's pages do, yields its items and those of every later page, each fetched when it is reached: ``for`` on a
    page from :class:`~inferneo.client.InferneoClient`, ``async for`` on one from the async client."""

    object: str = "list"
    data: list[ItemT]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
    _fetch: Callable[[str], CursorPage[ItemT]] | None = PrivateAttr(None)
    _afetch: Callable[[str], Awaitable[CursorPage[ItemT]]] | None = PrivateAttr(None)

    def _cursor(self) -> str | None:
        """The ``after`` of the next page, or None on the last one."""
        return self.last_id if self.has_more and self.data else None

    def __iter__(self) -> Iterator[ItemT]:  # type: ignore[override]
        if self._afetch is not None:
            raise TypeError("a page from the async client is iterated with 'async for'")
        page: CursorPage[ItemT] = self
        while True:
            yield from page.data
            after = page._cursor()
            if after is None or page._fetch is None:
                return
            page = page._fetch(after)

    async def __aiter__(self) -> AsyncIterator[ItemT]:
        if self._fetch is not None:
            raise TypeError("a page from the sync client is iterated with 'for'")
        page: CursorPage[ItemT] = self
        while True:
            for item in page.data:
                yield item
            after = page._cursor()
            if after is None or page._afetch is None:
                return
            page = await page._afetch(after)

    def __len__(self) -> int:
        """The items on this page."""
        return len(self.data)

    def __getitem__(self, index: int) -> ItemT:
        return self.data[index]


class FileObject(_Model):
    """A stored file (``client.files``): an uploaded batch input (``purpose`` ``batch``) or a batch's output or
    error file (``batch_output``)."""

    id: str
    object: str = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str | None = None
    status_details: str | None = None
    expires_at: int | None = None


class FileList(CursorPage[FileObject]):
    """``GET /v1/files``: the stored files, newest first (unless ``order="asc"``)."""


class FileDeleted(_Model):
    """``DELETE /v1/files/{id}``."""

    id: str
    object: str = "file"
    deleted: bool


class FileContent(_Model):
    """A stored file's bytes (``client.files.content``), as the openai client gives them: ``content``, ``text``
    (UTF-8), ``read()`` and ``write_to_file(path)``."""

    content: bytes

    @property
    def text(self) -> str:
        """The content as UTF-8 text (a batch file is JSON lines)."""
        return self.content.decode()

    def read(self) -> bytes:
        """The content."""
        return self.content

    def write_to_file(self, file: str | os.PathLike[str]) -> None:
        """Write the content to ``file``."""
        Path(file).write_bytes(self.content)


class BatchRequestCounts(_Model):
    """A batch's lines (``total``) and those with a record so far: ``completed`` (answered with a 2xx: the output
    file's lines) and ``failed`` (the error file's)."""

    total: int
    completed: int
    failed: int


class BatchError(_Model):
    """Why a batch failed as a whole (not one line: those are records in the error file)."""

    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(_Model):
    object: str = "list"
    data: list[BatchError] = []


class Batch(_Model):
    """A batch (``client.batches``): its input file, ``status`` (``validating``, ``in_progress``, ``finalizing``,
    ``completed``, ``failed``, ``cancelling``, ``cancelled``, ``expired``), its ``request_counts``, the output and
    error files once it ends, and when each step happened (Unix seconds)."""

    id: str
    object: str = "batch"
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    created_at: int
    errors: BatchErrors | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts | None = None
    metadata: dict[str, str] | None = None


class BatchList(CursorPage[Batch]):
    """``GET /v1/batches``: the batches, newest first."""
