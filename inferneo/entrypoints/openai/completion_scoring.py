"""Log-probabilities in ``/v1/completions`` answers: the legacy ``logprobs`` object, with the prompt's tokens
first when ``echo`` is set (how evaluation harnesses score text), and vLLM's ``prompt_logprobs`` field.

The rules for scoring requests (:func:`scoring_depth`), as OpenAI's legacy API and vLLM's server have them:
``echo`` with ``logprobs: k`` returns every prompt token's log-probability (the first token's is null: nothing
predicts it) with its top-``k`` alternatives, followed by the generated tokens'; ``max_tokens: 0`` with ``echo``
scores the prompt and generates nothing; ``prompt_logprobs: k`` (vLLM's extension) adds each prompt position as
``{token id: {logprob, rank, decoded_token}}`` to the choice. In a stream the prompt part comes in each choice's
first chunk; ``prompt_logprobs`` is not streamed (vLLM refuses it too).
"""

from __future__ import annotations

import math
from typing import Any

from inferneo.entrypoints.openai.errors import bad_request
from inferneo.entrypoints.openai.protocol import CompletionRequest
from inferneo.outputs import Logprob, PromptLogprobs


def finite(value: float) -> float:
    """JSON has no infinities: a token the sampler ruled out gets a very low, finite log-probability."""
    return value if math.isfinite(value) else -9999.0


def scoring_depth(req: CompletionRequest) -> int | None:
    """How many alternatives the engine computes at each prompt position (None: prompt log-probabilities are not
    computed); 400 for a combination this server refuses, naming the field."""
    if req.max_tokens == 0 and not (req.echo or req.prompt_logprobs is not None):
        raise bad_request("max_tokens 0 only scores the prompt: give echo (with logprobs) or prompt_logprobs, or "
                          "ask for at least one token", "max_tokens")
    if req.prompt_logprobs is not None and req.stream:
        raise bad_request("prompt_logprobs is not available with stream: use echo with logprobs to stream the "
                          "prompt's log-probabilities", "prompt_logprobs")
    if req.stream and req.echo and req.logprobs is not None and req.n > 1:
        raise bad_request("a stream with echo and logprobs takes n = 1 (the prompt is scored once, for the first "
                          "choice)", "n")
    depths = [d for d in (req.prompt_logprobs, req.logprobs if req.echo else None) if d is not None]
    if depths:
        return max(depths)
    return 0 if req.max_tokens == 0 else None


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], offset: int,
                        as_ids: bool = False) -> tuple[dict[str, Any], int]:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs (sampled + top-k), text_offset; and the
    offset in the text after the last token. ``as_ids``: tokens are named ``token_id:N`` (the offsets still count
    the text's characters)."""
    out = _LegacyLogprobs(offset, as_ids)
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        out.add(token_id, entry, None)
    return out.body, out.offset


def echo_logprobs(prompt_ids: list[int], prompt_logprobs: PromptLogprobs, first_token: str, top_n: int,
                  token_ids: list[int], logprobs: list[dict[int, Logprob]],
                  as_ids: bool = False) -> tuple[dict[str, Any], int]:
    """The legacy shape for an echoed prompt followed by generated tokens, offsets from 0: the first prompt token
    (``first_token``, its text) has null log-probabilities; the others keep their top ``top_n`` alternatives. Also
    the offset after the last token; ``as_ids`` as for ``completion_logprobs``."""
    out = _LegacyLogprobs(0, as_ids)
    out.add_first(prompt_ids[0], first_token)
    for token_id, entry in zip(prompt_ids[1:], prompt_logprobs[1:], strict=True):
        out.add(token_id, entry, top_n)
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        out.add(token_id, entry, None)
    return out.body, out.offset


def prompt_logprobs_json(prompt_logprobs: PromptLogprobs | None) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's ``prompt_logprobs`` choice field: null first, then ``{token id: {logprob, rank, decoded_token}}``."""
    if prompt_logprobs is None:
        return None
    return [None if entry is None else {
        str(tid): {"logprob": finite(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
        for tid, lp in entry.items()} for entry in prompt_logprobs]


def token_name(token_id: int, text: str | None, as_ids: bool) -> str:
    """How log-probabilities name a token: its text, or ``token_id:N`` with ``as_ids``
    (``--return-tokens-as-token-ids``, vLLM's form for tokens that are no whole characters)."""
    return f"token_id:{token_id}" if as_ids else text or ""


class _LegacyLogprobs:
    """Builds the four parallel lists of the legacy ``logprobs`` object; ``as_ids``: tokens named by id."""

    def __init__(self, offset: int, as_ids: bool = False) -> None:
        self.offset = offset
        self.as_ids = as_ids
        self.body: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def _token(self, token_id: int, text: str) -> None:
        self.body["tokens"].append(token_name(token_id, text, self.as_ids))
        self.body["text_offset"].append(self.offset)
        self.offset += len(text)

    def add_first(self, token_id: int, text: str) -> None:
        self._token(token_id, text)
        self.body["token_logprobs"].append(None)
        self.body["top_logprobs"].append(None)

    def add(self, token_id: int, entry: dict[int, Logprob], top_n: int | None) -> None:
        """One scored token; ``top_n`` keeps only alternatives of rank <= top_n (None: all of the entry)."""
        own = entry.get(token_id)
        self._token(token_id, (own.decoded_token if own else None) or "")
        self.body["token_logprobs"].append(finite(own.logprob) if own else -9999.0)
        self.body["top_logprobs"].append({
            token_name(tid, lp.decoded_token, self.as_ids): finite(lp.logprob) for tid, lp in entry.items()
            if top_n is None or tid == token_id or (lp.rank is not None and lp.rank <= top_n)})
