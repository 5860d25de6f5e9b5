"""Request bodies of the OpenAI wire format, with Inferneo's additive extensions, and small response helpers.

Unknown fields are refused (400 naming the field), as the OpenAI API does; fields the API defines that change
nothing here (``user``, ``metadata``, ...) are accepted and ignored. Responses are plain dicts built by the
serving modules: the hot streaming path serializes them directly.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

Conversation = list[dict[str, Any]]

# Roles a chat message may have: OpenAI's, plus "ipython" (the tool role of Llama 3.1 templates).
ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
MAX_STOP_STRINGS = 64
MAX_STOP_TOKEN_IDS = 1024


class _Body(BaseModel):
    # NaN and infinities are valid Python JSON but no valid sampling setting.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool | None = False


class _SamplingBody(_Body):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Inferneo extensions (vLLM names them the same way).
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(value)}")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_token_ids(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            if len(value) > MAX_STOP_TOKEN_IDS:
                raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop token ids, got {len(value)}")
            if any(t < 0 for t in value):
                raise ValueError("token ids cannot be negative")
        return value


class CompletionRequest(_SamplingBody):
    """``POST /v1/completions``."""

    prompt: Any
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value:
                raise ValueError("the prompt is an empty string")
            return value
        if isinstance(value, list) and value:
            if all(isinstance(p, str) for p in value):
                if not all(value):
                    raise ValueError(f"prompt {[bool(p) for p in value].index(False)} is an empty string")
                return value
            if all(_is_token_id(t) for t in value):
                return value
            if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in value):
                return value
        raise ValueError("must be a string, a non-empty list of strings, a list of token ids, "
                         "or a list of non-empty lists of token ids")

    def prompt_list(self) -> list[str | list[int]]:
        """The prompts, one entry each: a string or a list of token ids."""
        value = self.prompt
        if isinstance(value, str):
            return [value]
        if all(_is_token_id(t) for t in value):
            return [list(value)]
        return list(value)


class ChatCompletionRequest(_SamplingBody):
    """``POST /v1/chat/completions``; ``messages`` may also be a list of conversations (an extension)."""

    messages: list[Any]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # Inferneo extensions.
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("messages", mode="before")
    @classmethod
    def _check_messages(cls, value: Any) -> Any:
        if not isinstance(value, list) or not value:
            raise ValueError("must be a non-empty list of messages, or a list of conversations")
        if all(isinstance(c, list) for c in value):
            return [_conversation(c, f"conversation {i}: ") for i, c in enumerate(value)]
        return _conversation(value, "")

    def conversations(self) -> list[Conversation]:
        if self.messages and isinstance(self.messages[0], list):
            return self.messages
        return [self.messages]


class TokenizeRequest(_Body):
    """``POST /tokenize``: a ``prompt`` or a conversation in ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Any] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @field_validator("messages", mode="before")
    @classmethod
    def _check_messages(cls, value: Any) -> Any:
        return None if value is None else _conversation(value, "")


class DetokenizeRequest(_Body):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[int]


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _conversation(messages: Any, where: str) -> Conversation:
    """Check one conversation and flatten OpenAI content parts into text."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}a conversation must be a non-empty list of messages")
    result = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{where}message {i} must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"{where}message {i} needs a 'role' string")
        if role not in ROLES:
            raise ValueError(f"{where}message {i}: role {role[:40]!r} is not one of {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"{where}message {i}: only text content parts are supported")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ValueError(f"{where}message {i}: 'content' must be a string or a list of text parts")
        entry = {"role": role, "content": content}
        if isinstance(message.get("name"), str):
            entry["name"] = message["name"]
        result.append(entry)
    return result


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
