"""The keyword arguments of ``create`` on each endpoint, and the request bodies built from them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

Message = dict[str, Any]
Prompt = str | list[str] | list[int] | list[list[int]]
Messages = list[Message] | list[list[Message]]


class SamplingArgs(TypedDict, total=False):
    """Fields both endpoints take: OpenAI's, then Inferneo's extensions (named as vLLM names them)."""

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    n: int
    stop: str | list[str] | None
    seed: int | None
    presence_penalty: float | None
    frequency_penalty: float | None
    logit_bias: dict[str, float] | None
    stream_options: dict[str, Any] | None
    user: str | None
    # vLLM's constraint on the output: {"json" | "regex" | "choice" | "grammar" | "json_object" |
    # "structural_tag": ...}
    structured_outputs: dict[str, Any] | None
    # Inferneo extensions
    top_k: int | None
    min_p: float | None
    repetition_penalty: float | None
    min_tokens: int
    ignore_eos: bool
    stop_token_ids: list[int] | None
    allowed_token_ids: list[int] | None
    bad_words: list[str] | None
    skip_special_tokens: bool
    spaces_between_special_tokens: bool
    include_stop_str_in_output: bool
    priority: int
    cache_salt: str | None  # vLLM's: prefix-cache blocks shared only with requests of the same salt
    truncate_prompt_tokens: int | None
    prompt_logprobs: int | None  # vLLM's: each prompt token's log-probability and this many alternatives
    return_token_ids: bool | None  # vLLM's: each choice's token_ids and prompt_token_ids
    return_tokens_as_token_ids: bool | None  # vLLM's: logprobs name tokens "token_id:N"
    # vLLM's beam search: n is the beam width, length_penalty the ranking's exponent (docs/online-serving.md)
    use_beam_search: bool
    length_penalty: float


class CompletionParseArgs(SamplingArgs, total=False):
    """``/v1/completions`` fields that ``parse`` takes as keyword arguments (all but ``response_format``)."""

    echo: bool | None
    logprobs: int | None
    best_of: int | None
    suffix: str | None


class CompletionArgs(CompletionParseArgs, total=False):
    """``/v1/completions`` fields besides ``model``, ``prompt`` and ``stream``."""

    # OpenAI's output format ({"type": "json_schema", "json_schema": {"name", "schema", "strict"}} or
    # {"type": "json_object"}), which Inferneo takes on completions too
    response_format: dict[str, Any] | None


class ChatParseArgs(SamplingArgs, total=False):
    """``/v1/chat/completions`` fields that ``parse`` takes as keyword arguments (all but ``response_format``
    and ``tools``, which it takes in richer forms)."""

    max_completion_tokens: int | None
    logprobs: bool | None
    top_logprobs: int | None
    tool_choice: str | dict[str, Any] | None  # "none" | "auto" | "required" | {"type": "function", ...}
    parallel_tool_calls: bool | None
    metadata: dict[str, Any] | None
    store: bool | None
    service_tier: str | None
    reasoning_effort: str | None
    # Inferneo extensions
    add_generation_prompt: bool
    continue_final_message: bool
    chat_template_kwargs: dict[str, Any] | None
    include_reasoning: bool


class ChatCompletionArgs(ChatParseArgs, total=False):
    """``/v1/chat/completions`` fields besides ``model``, ``messages`` and ``stream``."""

    response_format: dict[str, Any] | None
    tools: list[dict[str, Any]] | None


def build_body(kind: type, where: str, fixed: Mapping[str, Any], args: Mapping[str, Any],
               extra_body: Mapping[str, Any] | None) -> dict[str, Any]:
    """The JSON body: ``fixed`` fields, the keyword ``args`` that ``kind`` declares (``None`` values left out, so
    the server's defaults apply), then ``extra_body`` on top. An undeclared argument is a ``TypeError``, as for
    any Python function; fields this client does not know go in ``extra_body``."""
    known = kind.__required_keys__ | kind.__optional_keys__
    unknown = sorted(set(args) - known)
    if unknown:
        raise TypeError(f"{where}() got an unexpected keyword argument {unknown[0]!r} "
                        f"(send fields this client does not know with extra_body={{...}})")
    body = {k: v for k, v in fixed.items() if v is not None}
    body.update((k, v) for k, v in args.items() if v is not None)
    body.update(extra_body or {})
    return body
