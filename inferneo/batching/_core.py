"""What every batching tool shares: the per-prompt result, and one batched call that gives each prompt its own
choices or its own error.

A prompt is a string, a list of token ids, or a conversation (a list of ``{"role", "content"}`` messages).
Strings and token ids go to ``/v1/completions``, conversations to ``/v1/chat/completions`` (as one list of
conversations), one call per kind. With ``response_format`` (a pydantic model, a JSON schema, ...), each
answer is also parsed: :attr:`BatchResult.parsed`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from inferneo.client import AsyncInferneoClient, InferneoClient
from inferneo.client.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    InferneoError,
    StructuredOutputError,
    UnsendableRequestError,
)
from inferneo.client.structured import OutputFormat, parse_choice
from inferneo.client.types import ChatCompletion, ChatCompletionChoice, Completion, CompletionChoice

Conversation = list[dict[str, Any]]
Prompt = str | list[int] | Conversation
Choice = CompletionChoice | ChatCompletionChoice
Outcome = list[Choice] | InferneoError

# A 400 that names one of these (or nothing) may come from a single prompt of the batch: bisect to find it (the
# answer's limit is named as the request gave it: a prompt too long for it is a prompt's fault too).
# A 400 naming another field (temperature, an unknown field, ...) is the whole call's fault: no bisecting.
_PROMPT_PARAMS = frozenset({None, "prompt", "messages", "max_tokens", "max_completion_tokens"})


@dataclass(slots=True)
class BatchResult:
    """The answer to one prompt of a batch: its ``choices`` (``n`` of them, usually one) or its ``error``.

    ``text``, ``choice``, ``finish_reason`` and ``parsed`` raise ``error`` for a failed prompt instead of
    returning ``None``. With a ``response_format``, ``parsed_choices`` holds each choice read into its type; an
    answer that does not validate makes the prompt fail with a
    :class:`~inferneo.client.errors.StructuredOutputError` (its ``choices`` are kept, to see what was written).
    """

    index: int
    prompt: Prompt
    choices: list[Choice] = field(default_factory=list)
    error: InferneoError | None = None
    parsed_choices: list[Any] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the prompt was answered."""
        return self.error is None

    @property
    def choice(self) -> Choice:
        """The first (usually the only) choice: a ``CompletionChoice`` for a text prompt, a
        ``ChatCompletionChoice`` for a conversation."""
        if self.error is not None:
            raise self.error
        return self.choices[0]

    @property
    def text(self) -> str:
        """The text of the first choice (a chat answer's ``message.content``; ``""`` when it only calls tools)."""
        return choice_text(self.choice) or ""

    @property
    def parsed(self) -> Any:
        """The first choice read into the ``response_format`` type (``None`` without a ``response_format``)."""
        if self.error is not None:
            raise self.error
        return self.parsed_choices[0] if self.parsed_choices else None

    @property
    def finish_reason(self) -> str | None:
        """Why the first choice ended: ``"stop"`` or ``"length"``."""
        return self.choice.finish_reason


def is_prompt_error(exc: BaseException) -> bool:
    """Whether a failed batch call may be the fault of some of its prompts only (so bisecting can isolate them)."""
    if isinstance(exc, UnsendableRequestError):  # found before sending: a prompt's value JSON cannot carry
        return exc.param in _PROMPT_PARAMS
    return (isinstance(exc, APIStatusError) and exc.status_code in (400, 422)
            and exc.param in _PROMPT_PARAMS)


def is_capacity_error(exc: BaseException) -> bool:
    """Whether a failure says the server was overloaded or too slow (a reason to send smaller batches), as opposed
    to a request the server refused on its merits."""
    if isinstance(exc, APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return isinstance(exc, APIError)


def is_turned_away(exc: BaseException) -> bool:
    """Whether a failure says the server did no work on the call (its queue was full, it was unavailable, or it
    could not be reached), so that sending the same prompts again, in smaller batches, may succeed."""
    if isinstance(exc, APIStatusError):
        return exc.status_code == 429 or (exc.status_code == 503 and exc.code != "request_timeout")
    return isinstance(exc, APIConnectionError) and not isinstance(exc, APITimeoutError)


def choice_text(choice: Choice) -> str | None:
    """A choice's text: a completion's ``text``, a chat answer's ``message.content``."""
    return choice.message.content if isinstance(choice, ChatCompletionChoice) else choice.text


def prepare_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], OutputFormat | None]:
    """The parameters to send (a ``response_format`` given as a pydantic model, a type or a JSON schema becomes
    its wire form), and the format answers are parsed with (``None`` without a ``response_format``)."""
    wire = dict(params)
    spec = wire.get("response_format")
    if spec is None:
        return wire, None
    fmt = OutputFormat.of(spec)
    wire["response_format"] = fmt.response_format
    return wire, fmt


def prompt_kind(prompt: Prompt) -> str:
    """``"text"``, ``"tokens"`` or ``"chat"``: prompts of one kind may share a call. A ``TypeError`` for anything
    that is none of them (a bare message dict among them: a conversation is a list of messages)."""
    if isinstance(prompt, str):
        return "text"
    if isinstance(prompt, dict):
        raise TypeError("a prompt is a string, a list of token ids or a conversation (a list of messages); got "
                        "one message dict: put the conversation in a list, [{'role': 'user', 'content': ...}]")
    if not isinstance(prompt, (list, tuple)):
        raise TypeError("a prompt is a string, a list of token ids or a conversation (a list of messages); got "
                        f"{type(prompt).__name__}")
    return "chat" if prompt and isinstance(prompt[0], dict) else "tokens"


def prompt_source(prompts: Any) -> Any:
    """``prompts`` if it is an iterable of prompts; a ``TypeError`` for one string (which would otherwise be read
    as one prompt per character) or one message dict."""
    if isinstance(prompts, (str, bytes)):
        raise TypeError("prompts is one string; pass an iterable of prompts, e.g. [prompt]")
    if isinstance(prompts, dict):
        raise TypeError("prompts is one message dict; pass an iterable of prompts, e.g. "
                        "[[{'role': 'user', 'content': ...}]] for one conversation")
    return prompts


def split_choices(out: Completion | ChatCompletion, count: int, n: int, request: Any = None) -> list[Outcome]:
    """Each prompt's choices from a batched answer (``index = prompt_position * n + j``)."""
    per_prompt: list[list[Choice]] = [[] for _ in range(count)]
    for choice in sorted(out.choices, key=lambda c: c.index):
        position = choice.index // n
        if 0 <= position < count:
            per_prompt[position].append(choice)
    return [choices or APIError(f"the server sent no choice for prompt {i} of the batch", request)
            for i, choices in enumerate(per_prompt)]


def _by_kind(prompts: Sequence[Prompt]) -> dict[str, list[int]]:
    positions: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        positions.setdefault(prompt_kind(prompt), []).append(i)
    return positions


def _merge(count: int, parts: list[tuple[list[int], list[Outcome]]]) -> list[Outcome]:
    merged: list[Outcome | None] = [None] * count
    for positions, outcomes in parts:
        for position, outcome in zip(positions, outcomes, strict=True):
            merged[position] = outcome
    return merged  # type: ignore[return-value]  # every position is in exactly one part


def complete_batch(client: InferneoClient, model: str | None, prompts: Sequence[Prompt],
                   params: Mapping[str, Any]) -> list[Outcome]:
    """Complete ``prompts`` (one call per kind of prompt; the client retries transient failures); return, for each
    prompt, its choices or the error it got. When the server refuses a call because of some prompt (a 400
    about the prompt), the call is bisected so that only the offending prompts carry the error. ``params`` are
    sent as they are (see :func:`prepare_params`)."""
    kinds = _by_kind(prompts)
    return _merge(len(prompts), [(positions, _complete_same_kind(client, model, [prompts[i] for i in positions],
                                                                 kind == "chat", params))
                                 for kind, positions in kinds.items()])


def _one_or_all(prompts: list[Prompt]) -> Any:
    """What a call sends: one prompt on its own (so a refusal's message names no position in a list the caller
    never made, e.g. after a bisection), else the list."""
    return prompts[0] if len(prompts) == 1 else prompts


def _complete_same_kind(client: InferneoClient, model: str | None, prompts: list[Prompt], chat: bool,
                        params: Mapping[str, Any]) -> list[Outcome]:
    try:
        if chat:
            out: Completion | ChatCompletion = client.chat.completions.create(model=model,
                                                                              messages=_one_or_all(prompts),
                                                                              **params)
        else:
            out = client.completions.create(model=model, prompt=_one_or_all(prompts), **params)
    except InferneoError as exc:
        if len(prompts) > 1 and is_prompt_error(exc):
            mid = len(prompts) // 2
            return (_complete_same_kind(client, model, prompts[:mid], chat, params)
                    + _complete_same_kind(client, model, prompts[mid:], chat, params))
        return [exc] * len(prompts)
    return split_choices(out, len(prompts), int(params.get("n") or 1))


async def acomplete_batch(client: AsyncInferneoClient, model: str | None, prompts: Sequence[Prompt],
                          params: Mapping[str, Any]) -> list[Outcome]:
    """The async twin of :func:`complete_batch` (the kinds of prompt are sent concurrently)."""
    kinds = _by_kind(prompts)
    results = await asyncio.gather(*(_acomplete_same_kind(client, model, [prompts[i] for i in positions],
                                                          kind == "chat", params)
                                     for kind, positions in kinds.items()))
    return _merge(len(prompts), list(zip(kinds.values(), results, strict=True)))


async def _acomplete_same_kind(client: AsyncInferneoClient, model: str | None, prompts: list[Prompt], chat: bool,
                               params: Mapping[str, Any]) -> list[Outcome]:
    try:
        if chat:
            out: Completion | ChatCompletion = await client.chat.completions.create(
                model=model, messages=_one_or_all(prompts), **params)
        else:
            out = await client.completions.create(model=model, prompt=_one_or_all(prompts), **params)
    except InferneoError as exc:
        if len(prompts) > 1 and is_prompt_error(exc):
            mid = len(prompts) // 2
            return (await _acomplete_same_kind(client, model, prompts[:mid], chat, params)
                    + await _acomplete_same_kind(client, model, prompts[mid:], chat, params))
        return [exc] * len(prompts)
    return split_choices(out, len(prompts), int(params.get("n") or 1))


def to_result(index: int, prompt: Prompt, outcome: Outcome, fmt: OutputFormat | None = None) -> BatchResult:
    """A :class:`BatchResult` from one prompt's outcome, its choices parsed with ``fmt`` when given."""
    if isinstance(outcome, InferneoError):
        return BatchResult(index, prompt, error=outcome)
    if fmt is None:
        return BatchResult(index, prompt, outcome)
    try:
        parsed = [parse_choice(fmt, choice) for choice in outcome]
    except StructuredOutputError as exc:
        return BatchResult(index, prompt, outcome, error=exc)
    return BatchResult(index, prompt, outcome, parsed_choices=parsed)
