"""What every batching tool shares: the per-prompt result, and one batched call that gives each prompt its own
choices or its own error."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from inferneo.client import AsyncInferneoClient, InferneoClient
from inferneo.client.errors import APIError, APIStatusError, InferneoError
from inferneo.client.types import Completion, CompletionChoice

Prompt = str | list[int]
Outcome = list[CompletionChoice] | InferneoError

# A 400 that names one of these (or nothing) may come from a single prompt of the batch: bisect to find it.
# A 400 naming another field (temperature, an unknown field, ...) is the whole call's fault: no bisecting.
_PROMPT_PARAMS = frozenset({None, "prompt", "max_tokens"})


@dataclass(slots=True)
class BatchResult:
    """The answer to one prompt of a batch: its ``choices`` (``n`` of them, usually one) or its ``error``.

    ``text``, ``choice`` and ``finish_reason`` raise ``error`` for a failed prompt instead of returning ``None``.
    """

    index: int
    prompt: Prompt
    choices: list[CompletionChoice] = field(default_factory=list)
    error: InferneoError | None = None

    @property
    def ok(self) -> bool:
        """Whether the prompt was answered."""
        return self.error is None

    @property
    def choice(self) -> CompletionChoice:
        """The first (usually the only) choice."""
        if self.error is not None:
            raise self.error
        return self.choices[0]

    @property
    def text(self) -> str:
        """The completion text of the first choice."""
        return self.choice.text

    @property
    def finish_reason(self) -> str | None:
        """Why the first choice ended: ``"stop"`` or ``"length"``."""
        return self.choice.finish_reason


def is_prompt_error(exc: BaseException) -> bool:
    """Whether a failed batch call may be the fault of some of its prompts only (so bisecting can isolate them)."""
    return (isinstance(exc, APIStatusError) and exc.status_code in (400, 422)
            and exc.param in _PROMPT_PARAMS)


def is_capacity_error(exc: BaseException) -> bool:
    """Whether a failure says the server was overloaded or too slow (a reason to send smaller batches), as opposed
    to a request the server refused on its merits."""
    if isinstance(exc, APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return isinstance(exc, APIError)


def split_choices(out: Completion, count: int, n: int, request: Any = None) -> list[Outcome]:
    """Each prompt's choices from a batched answer (``index = prompt_position * n + j``)."""
    per_prompt: list[list[CompletionChoice]] = [[] for _ in range(count)]
    for choice in sorted(out.choices, key=lambda c: c.index):
        position = choice.index // n
        if 0 <= position < count:
            per_prompt[position].append(choice)
    return [choices or APIError(f"the server sent no choice for prompt {i} of the batch", request)
            for i, choices in enumerate(per_prompt)]


def complete_batch(client: InferneoClient, model: str | None, prompts: Sequence[Prompt],
                   params: Mapping[str, Any]) -> list[Outcome]:
    """Complete ``prompts`` in one call (the client retries transient failures); return, for each prompt, its
    choices or the error it got. When the server refuses the batch because of some prompt (a 400 about the
    prompt), the batch is bisected so that only the offending prompts carry the error."""
    try:
        out = client.completions.create(model=model, prompt=list(prompts), **params)
    except InferneoError as exc:
        if len(prompts) > 1 and is_prompt_error(exc):
            mid = len(prompts) // 2
            return (complete_batch(client, model, prompts[:mid], params)
                    + complete_batch(client, model, prompts[mid:], params))
        return [exc] * len(prompts)
    return split_choices(out, len(prompts), int(params.get("n") or 1))


async def acomplete_batch(client: AsyncInferneoClient, model: str | None, prompts: Sequence[Prompt],
                          params: Mapping[str, Any]) -> list[Outcome]:
    """The async twin of :func:`complete_batch`."""
    try:
        out = await client.completions.create(model=model, prompt=list(prompts), **params)
    except InferneoError as exc:
        if len(prompts) > 1 and is_prompt_error(exc):
            mid = len(prompts) // 2
            return (await acomplete_batch(client, model, prompts[:mid], params)
                    + await acomplete_batch(client, model, prompts[mid:], params))
        return [exc] * len(prompts)
    return split_choices(out, len(prompts), int(params.get("n") or 1))


def to_result(index: int, prompt: Prompt, outcome: Outcome) -> BatchResult:
    """A :class:`BatchResult` from one prompt's outcome."""
    if isinstance(outcome, InferneoError):
        return BatchResult(index, prompt, error=outcome)
    return BatchResult(index, prompt, outcome)
