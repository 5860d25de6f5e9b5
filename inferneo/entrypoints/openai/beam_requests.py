"""vLLM's ``use_beam_search`` on ``/v1/completions`` and ``/v1/chat/completions``: the request's settings as
``BeamSearchParams``, and the beam searches submitted.

``n`` is the beam width and the number of choices, which come back best first; ``length_penalty`` and
``ignore_eos`` are the search's. A beam search samples nothing and stops only at the model's end-of-sequence
tokens, so the fields that would change what it returns otherwise (sampling, penalties, stop conditions,
log-probabilities, a constraint on the answer) are refused with 400 rather than ignored; ``seed`` and the
streaming fields are accepted (a stream sends each choice whole when its search ends).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from inferneo.beam_search import MAX_BEAM_WIDTH, BeamSearchParams
from inferneo.engine.async_engine import ENTRY_NAMES
from inferneo.engine.beam_search_group import BeamSearchGroup, BeamSearchPrompt
from inferneo.engine.protocol import InvalidRequestError, LoraRef
from inferneo.entrypoints.openai.errors import bad_request, to_api_error
from inferneo.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest, _SamplingBody
from inferneo.sampling_params import SamplingParams

# field -> the values that leave a beam search unchanged (None: the field left out)
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "temperature": (None, 0), "top_p": (None, 1), "top_k": (None, 0, -1), "min_p": (None, 0),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "repetition_penalty": (None, 1),
    "min_tokens": (0,), "stop": (None, [], ""), "stop_token_ids": (None, []), "logit_bias": (None, {}),
    "allowed_token_ids": (None,), "bad_words": (None, []), "response_format": (None,), "structured_outputs": (None,),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "structural_tag": (None,), "prompt_logprobs": (None,),
}


def beam_search_of(req: _SamplingBody) -> BeamSearchParams | None:
    """The search ``req`` asks for (its ``max_tokens`` a placeholder, set per prompt by ``submit_beam_search``), or
    None without ``use_beam_search``; an ``APIError`` (400 naming the field) for a setting a beam search cannot
    honour."""
    if not req.use_beam_search:
        if req.length_penalty != 1.0:
            raise bad_request("length_penalty applies to beam search only: set use_beam_search", "length_penalty")
        return None
    for name, neutral in _NEUTRAL.items():
        value = getattr(req, name, None)
        if name == "response_format" and value is not None and value.type == "text":
            continue  # the default: plain text
        if value not in neutral:
            raise bad_request(f"{name} cannot be used with use_beam_search: a beam search keeps the most likely "
                              "sequences, samples nothing and stops only at the model's end-of-sequence tokens", name)
    if isinstance(req, CompletionRequest):
        if req.logprobs is not None:
            raise bad_request("logprobs cannot be used with use_beam_search", "logprobs")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of cannot differ from n with use_beam_search (n is the beam width)", "best_of")
    if isinstance(req, ChatCompletionRequest):
        if req.logprobs:
            raise bad_request("logprobs cannot be used with use_beam_search", "logprobs")
        if req.tool_mode() in ("required", "named"):
            raise bad_request("tool_choice 'required' or a named function constrains the answer, which beam search "
                              "cannot do; use tool_choice 'auto'", "tool_choice")
    if req.n > MAX_BEAM_WIDTH:
        raise bad_request(f"n is the beam width with use_beam_search, at most {MAX_BEAM_WIDTH}; got {req.n}", "n")
    try:
        return BeamSearchParams(beam_width=req.n, max_tokens=1, ignore_eos=req.ignore_eos,
                                length_penalty=req.length_penalty,
                                include_stop_str_in_output=req.include_stop_str_in_output)
    except ValueError as exc:
        raise bad_request(str(exc), "length_penalty") from None


def submit_beam_search(engine, request_id: str, prompt_ids: list[list[int]], params: BeamSearchParams,
                       max_tokens: list[int], priority: int, lora: LoraRef | None, tokenizer,
                       skip_special_tokens: bool = True, param: str = "prompt",
                       cache_salt: str | None = None) -> BeamSearchGroup:
    """Start the searches of ``prompt_ids`` (``max_tokens``: each prompt's) on ``engine``; an ``APIError`` (400
    naming ``param`` and the prompt's place) for a prompt that cannot run, checked before any starts."""
    try:
        engine.input.check_beam_width(params.beam_width, "n")
    except InvalidRequestError as exc:
        raise to_api_error(exc) from None
    prompts = []
    for i, (ids, limit) in enumerate(zip(prompt_ids, max_tokens, strict=True)):
        try:
            engine.input.check(ids, SamplingParams(max_tokens=limit, temperature=0.0), param, priority)
        except InvalidRequestError as exc:
            if len(prompt_ids) > 1 and exc.param in (param, "max_tokens"):
                exc = InvalidRequestError(f"{ENTRY_NAMES.get(param, param)} {i}: {exc}", exc.param)
            raise to_api_error(exc) from None
        prompts.append(BeamSearchPrompt(ids, replace(params, max_tokens=limit)))

    def decode(token_ids: list[int]) -> str:
        return tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    return BeamSearchGroup(engine, request_id, prompts, priority, lora, decode, cache_salt)
