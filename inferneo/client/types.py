"""Typed responses of the OpenAI wire format as Inferneo serves it.

Every model accepts fields it does not declare (``extra="allow"``), so a newer server never breaks an older
client; declared fields are typed and documented.
"""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict

__all__ = [
    "ChatCompletion",
    "ChatCompletionChoice",
    "ChatCompletionChunk",
    "ChatCompletionChunkChoice",
    "ChatCompletionMessage",
    "ChatCompletionTokenLogprob",
    "ChoiceDelta",
    "ChoiceLogprobs",
    "Completion",
    "CompletionChoice",
    "CompletionLogprobs",
    "CompletionUsage",
    "Model",
    "ModelList",
    "TopLogprob",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class PromptTokensDetails(_Model):
    cached_tokens: int | None = None


class CompletionUsage(_Model):
    """Token counts of one call (all its choices together)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


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


class ChatCompletionMessage(_Model):
    """The assistant's answer."""

    role: str = "assistant"
    content: str | None = None


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


class ChoiceDelta(_Model):
    """What one chunk adds to a streamed answer: the role first, then pieces of ``content``."""

    role: str | None = None
    content: str | None = None


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

