"""Request bodies of the OpenAI wire format, with Inferneo's additive extensions, and small response helpers.

Types are strict, as the OpenAI API's are: no coercion between strings, numbers and booleans (``"stream": "yes"``,
``"n": "2"``, ``"max_tokens": 2.0`` and ``"temperature": true`` are refused); an integer is a valid number for a
float field (``"temperature": 1``). Unknown fields are refused (400 naming the field), as the OpenAI API does;
fields the API defines that change nothing here (``user``, ``metadata``, ...) are accepted, checked and ignored.

Every string and list a client can send has a cap (the ``MAX_*`` constants below, documented in
``docs/reliability.md``); a value past it is refused with 400 naming the field. The caps sit far above what a real
request needs: the body-size limit of the guards (``guards.py``, 4 MiB by default) is met first by anything but
the short fields. The number of prompts or conversations in one request, ``n`` and the JSON nesting depth are
limited by the guards, whose limits a server's flags set. Responses are plain dicts built by the serving modules:
the hot streaming path serializes them directly.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from inferneo.sampling_params import MAX_LOGPROBS

Conversation = list[dict[str, Any]]

# Roles a chat message may have: OpenAI's, plus "ipython" (the tool role of Llama 3.1 templates).
ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
# Keys a chat message may carry: OpenAI's (what its client sends back when a previous answer is appended to the
# conversation), plus ``reasoning_content``, which reasoning-model servers return. Others are refused.
MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "function_call", "refusal",
                          "annotations", "audio", "reasoning_content"})

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
TOKEN_ID_MAX = 2**31 - 1
"""The largest token id a list of stop token ids may hold (no vocabulary comes near it)."""

MAX_TEXT_CHARS = 2**24
"""Characters in one prompt string, one message's content (text parts joined), ``suffix`` and a ``/tokenize``
prompt: 16,777,216, about four million tokens, past every context length; a 4 MiB body holds less anyway."""
MAX_TOKEN_IDS = 2**22
"""Token ids in one prompt given as ids, and in ``/detokenize``'s ``tokens``: 4,194,304."""
MAX_MESSAGES = 16384
"""Messages in one conversation."""
MAX_CONTENT_PARTS = 4096
"""Content parts in one message."""
MAX_STOP_STRINGS = 64
"""Strings in ``stop`` (OpenAI takes 4)."""
MAX_STOP_CHARS = 1024
"""Characters in one stop string."""
MAX_STOP_TOKEN_IDS = 1024
"""Ids in ``stop_token_ids``."""
MAX_LOGIT_BIAS = 1024
"""Entries in ``logit_bias``."""
MAX_MODEL_CHARS = 4096
"""Characters in ``model`` (a served name may be a local path: PATH_MAX is 4096)."""
MAX_ID_CHARS = 256
"""Characters in the short identifiers: ``user``, a message's ``name`` and ``tool_call_id``, ``service_tier``,
``tool_choice`` and ``function_call`` given as strings, and the keys of ``chat_template_kwargs``."""
MAX_TOOLS = 128
"""Entries in ``tools`` and in ``functions`` (OpenAI's own bound); tool calling is not supported, so any entry is
refused later, but the list is checked first."""
MAX_METADATA_PAIRS = 16
"""Pairs in ``metadata``, whose keys are strings of at most ``MAX_METADATA_KEY_CHARS`` characters and values
strings of at most ``MAX_METADATA_VALUE_CHARS``: OpenAI's rules."""
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
MAX_TEMPLATE_KWARGS = 64
"""Entries in ``chat_template_kwargs`` (the values are any JSON, bounded by the body size and nesting depth)."""

_TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")  # a logit_bias key: a token id written in decimal digits


class _Body(BaseModel):
    # strict: no coercion between strings, numbers and booleans (an int is still a valid float). NaN and infinities
    # are valid Python JSON but no valid sampling setting.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool | None = False


class _SamplingBody(_Body):
    """Fields shared by completions and chat completions."""

    model: str | None = Field(None, max_length=MAX_MODEL_CHARS)
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=MAX_ID_CHARS)
    # Inferneo extensions (vLLM names them the same way).
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0, le=INT64_MAX)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX)

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> Any:
        if value is None:
            return value
        strings = [value] if isinstance(value, str) else value
        if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
            raise ValueError("must be a string or a list of strings")
        _cap(len(strings), MAX_STOP_STRINGS, "stop strings")
        _cap(max((len(s) for s in strings), default=0), MAX_STOP_CHARS, "characters in a stop string")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_token_ids(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            _cap(len(value), MAX_STOP_TOKEN_IDS, "stop token ids")
            if any(not 0 <= t <= TOKEN_ID_MAX for t in value):
                raise ValueError(f"token ids must be in [0, {TOKEN_ID_MAX}]")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None:
            _cap(len(value), MAX_LOGIT_BIAS, "entries")
            for key in value:
                if not _TOKEN_ID_KEY.fullmatch(key):
                    raise ValueError(f"keys must be token ids written in decimal digits, got {key[:40]!r}")
        return value


class CompletionRequest(_SamplingBody):
    """``POST /v1/completions``."""

    prompt: Any
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=INT64_MAX)
    suffix: str | None = Field(None, max_length=MAX_TEXT_CHARS)

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value:
                raise ValueError("the prompt is an empty string")
            _check_text(value, "the prompt")
            return value
        if isinstance(value, list) and value:
            if all(isinstance(p, str) for p in value):
                if not all(value):
                    raise ValueError(f"prompt {[bool(p) for p in value].index(False)} is an empty string")
                for i, p in enumerate(value):
                    _check_text(p, f"prompt {i}")
                return value
            if all(_is_token_id(t) for t in value):
                _check_ids(value, "the prompt")
                return value
            if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in value):
                for i, p in enumerate(value):
                    _check_ids(p, f"prompt {i}")
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
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS)
    function_call: str | dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = Field(None, max_length=MAX_ID_CHARS)
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

    @field_validator("tool_choice", "function_call", mode="before")
    @classmethod
    def _check_choice(cls, value: Any) -> Any:
        if value is None or isinstance(value, dict):
            return value
        if not isinstance(value, str):
            raise ValueError("must be a string or an object")
        _cap(len(value), MAX_ID_CHARS, "characters")
        return value

    @field_validator("response_format")
    @classmethod
    def _check_response_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            extra = sorted(set(value) - {"type", "json_schema"})
            if extra:
                raise ValueError(f"unrecognized key {extra[0][:40]!r}; the keys are 'type' and 'json_schema'")
            kind = value.get("type")
            if kind not in ("text", "json_object", "json_schema"):
                raise ValueError("'type' must be 'text', 'json_object' or 'json_schema'")
            if not isinstance(value.get("json_schema", {}), dict):
                raise ValueError("'json_schema' must be an object")
        return value

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            _cap(len(value), MAX_METADATA_PAIRS, "key-value pairs")
            for key, text in value.items():
                _cap(len(key), MAX_METADATA_KEY_CHARS, "characters in a key")
                _cap(len(text), MAX_METADATA_VALUE_CHARS, "characters in a value")
        return value

    @field_validator("chat_template_kwargs")
    @classmethod
    def _check_template_kwargs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            _cap(len(value), MAX_TEMPLATE_KWARGS, "entries")
            _cap(max((len(k) for k in value), default=0), MAX_ID_CHARS, "characters in a key")
        return value

    def conversations(self) -> list[Conversation]:
        if self.messages and isinstance(self.messages[0], list):
            return self.messages
        return [self.messages]


class TokenizeRequest(_Body):
    """``POST /tokenize``: a ``prompt`` or a conversation in ``messages``."""

    model: str | None = Field(None, max_length=MAX_MODEL_CHARS)
    prompt: str | None = Field(None, max_length=MAX_TEXT_CHARS)
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

    model: str | None = Field(None, max_length=MAX_MODEL_CHARS)
    tokens: list[int] = Field(max_length=MAX_TOKEN_IDS)


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _cap(count: int, limit: int, what: str, where: str = "") -> None:
    if count > limit:
        raise ValueError(f"{where}at most {limit} {what}, got {count}")


def _check_text(text: str, what: str) -> None:
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"{what} has {len(text)} characters; at most {MAX_TEXT_CHARS} are allowed")


def _check_ids(ids: list[int], what: str) -> None:
    if len(ids) > MAX_TOKEN_IDS:
        raise ValueError(f"{what} has {len(ids)} token ids; at most {MAX_TOKEN_IDS} are allowed")


_KIND_NAMES = {str: "a string", list: "a list", dict: "an object"}


def _optional(message: dict, key: str, kind: type, limit: int | None, at: str) -> None:
    """Check an optional message key the server ignores: null, or a ``kind`` of at most ``limit`` characters."""
    value = message.get(key)
    if value is None:
        return
    if not isinstance(value, kind):
        raise ValueError(f"{at}: '{key}' must be {_KIND_NAMES[kind]}")
    if limit is not None:
        _cap(len(value), limit, f"characters in '{key}'", f"{at}: ")


def _content(content: Any, role: str, at: str) -> str:
    """A message's content as text: a string, or text parts joined by newlines."""
    if content is None:
        raise ValueError(f"{at}: a {role!r} message needs 'content' (a string or a list of text parts); "
                         "null content goes only with tool_calls, which this server does not support")
    if isinstance(content, list):
        if not content:
            raise ValueError(f"{at}: 'content' is an empty list; give a string or at least one text part")
        _cap(len(content), MAX_CONTENT_PARTS, "content parts", f"{at}: ")
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"{at}: only text content parts are supported")
            if len(part) != 2:
                extra = sorted(set(part) - {"type", "text"})[0]
                raise ValueError(f"{at}: unrecognized key {extra[:40]!r} in a text part")
            texts.append(part["text"])
        content = "\n".join(texts)
    elif not isinstance(content, str):
        raise ValueError(f"{at}: 'content' must be a string or a list of text parts")
    _check_text(content, f"{at}: 'content'")
    return content


def _conversation(messages: Any, where: str) -> Conversation:
    """Check one conversation and flatten OpenAI content parts into text."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}a conversation must be a non-empty list of messages")
    _cap(len(messages), MAX_MESSAGES, "messages in a conversation", where)
    result = []
    for i, message in enumerate(messages):
        at = f"{where}message {i}"
        if not isinstance(message, dict):
            raise ValueError(f"{at} must be an object with 'role' and 'content'")
        unknown = sorted(set(message) - MESSAGE_KEYS)
        if unknown:
            raise ValueError(f"{at}: unrecognized key {unknown[0][:40]!r}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"{at} needs a 'role' string")
        if role not in ROLES:
            raise ValueError(f"{at}: role {role[:40]!r} is not one of {', '.join(ROLES)}")
        for key in ("tool_calls", "function_call"):
            if message.get(key):  # null or an empty list mean none
                raise ValueError(f"{at}: '{key}' is not supported (this server does not implement tool calling)")
        _optional(message, "tool_calls", list, None, at)
        _optional(message, "function_call", dict, None, at)
        _optional(message, "name", str, MAX_ID_CHARS, at)
        _optional(message, "tool_call_id", str, MAX_ID_CHARS, at)
        _optional(message, "refusal", str, MAX_TEXT_CHARS, at)
        _optional(message, "reasoning_content", str, MAX_TEXT_CHARS, at)
        _optional(message, "annotations", list, None, at)
        _optional(message, "audio", dict, None, at)
        entry = {"role": role, "content": _content(message.get("content"), role, at)}
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
