"""Beam search (vLLM's ``LLM.beam_search`` and its server's ``use_beam_search``), driven from the front end.

A search keeps ``beam_width`` sequences per prompt. Each step scores every kept sequence's next token with the
engine (one single-token request per beam, asking for the top ``2 * beam_width`` log-probabilities, so the prefix
cache serves what the previous step computed), extends each beam by each of those candidates, moves the ones that
end in an end-of-sequence token to the finished list, and keeps the ``beam_width`` best of the rest. After
``max_tokens`` steps (or when no beam is left) the finished and the kept beams are ranked together and the best
``beam_width`` returned, best first.

Ranking follows vLLM (and, through it, Hugging Face's): a beam's score is its cumulative log-probability divided by
``length ** length_penalty``, where ``length`` counts the prompt and generated tokens, a final end-of-sequence
token not included. Within one step every kept beam has the same length, so the length penalty only decides
between beams of different lengths at the end.

:class:`BeamSearch` is the search of one prompt as a state machine (what to score next, then the scores); the
offline API and the server drive it with their engines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from inferneo.outputs import CompletionOutput, Logprob, RequestOutput
from inferneo.sampling_params import MAX_LOGPROBS, SamplingParams

MAX_BEAM_WIDTH = MAX_LOGPROBS // 2
"""The widest search: each step asks the engine for ``2 * beam_width`` candidates per beam, and the engine returns at
most ``max_logprobs`` log-probabilities (20 by default, vLLM's default limit, which gives the same width); an engine
with a lower ``max_logprobs`` allows half of it (``InputProcessor.check_beam_width``)."""


@dataclass(slots=True)
class BeamSearchParams:
    """How to run a beam search (vLLM's ``BeamSearchParams``).

    ``beam_width`` sequences are kept per prompt (1 to ``MAX_BEAM_WIDTH``) and ``max_tokens`` tokens generated at
    most. ``ignore_eos`` keeps a beam going past an end-of-sequence token. ``length_penalty`` is the exponent of the
    length that a finished beam's cumulative log-probability is divided by (above 1 favours longer sequences, below
    1 shorter ones). The search is deterministic: ``temperature`` is accepted for vLLM's signature and must be 0.
    ``include_stop_str_in_output`` is accepted for the same reason; a beam stops only at an end-of-sequence token,
    whose text (a special token) is never part of the output.
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.beam_width) or not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise ValueError(f"beam_width must be an integer from 1 to {MAX_BEAM_WIDTH}, got {self.beam_width!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean, got {getattr(self, name)!r}")
        if not _is_number(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if not _is_number(self.temperature) or self.temperature != 0:
            raise ValueError("beam search ranks sequences by the model's log-probabilities and samples nothing: "
                             f"temperature must be 0, got {self.temperature!r}")


@dataclass(slots=True)
class BeamSearchSequence:
    """One sequence a beam search returns (vLLM's shape).

    ``tokens`` holds the prompt's token ids followed by the generated ones, and ``text`` (in ``LLM.beam_search``'s
    output) decodes them all, as vLLM's does; ``output_token_ids`` and ``output_text`` are the generated part alone
    (the text without a final end-of-sequence token). ``logprobs`` has, for each generated position, the candidates
    the engine returned there (token id to ``Logprob``). ``finish_reason`` is ``"stop"`` for a sequence ended by an
    end-of-sequence token and ``"length"`` for one that reached ``max_tokens``; ``stop_reason`` stays None (as
    ``generate``'s for an end-of-sequence token: beam search has no stop strings).
    """

    tokens: list[int]
    num_prompt_tokens: int
    cum_logprob: float = 0.0
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    text: str | None = None
    output_text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | None = None

    @property
    def output_token_ids(self) -> list[int]:
        """The generated token ids (an end-of-sequence token that ended the sequence included)."""
        return self.tokens[self.num_prompt_tokens:]

    def text_token_ids(self) -> list[int]:
        """The generated token ids that make its text: without the end-of-sequence token that ended it."""
        ids = self.output_token_ids
        return ids[:-1] if self.finish_reason == "stop" else ids


@dataclass(slots=True)
class BeamSearchOutput:
    """What ``LLM.beam_search`` returns for one prompt: up to ``beam_width`` sequences, best first."""

    sequences: list[BeamSearchSequence]


def step_sampling_params(params: BeamSearchParams) -> SamplingParams:
    """What each beam's scoring request asks the engine for: one token, greedy, with the top ``2 * beam_width``
    log-probabilities (twice the width, as Hugging Face's search takes, so that ``beam_width`` beams that do not end
    remain even if half the candidates end); no text, which the search decodes once at the end."""
    return SamplingParams(max_tokens=1, temperature=0.0, logprobs=2 * params.beam_width, detokenize=False,
                          ignore_eos=True, skip_special_tokens=True)


class BeamSearch:
    """The beam search of one prompt, one step at a time.

    ``pending()`` gives the token sequences to score next (one per live beam); the caller scores each with the
    engine (``step_sampling_params``) and hands the candidates back, in the same order, to ``advance``. When
    ``done``, ``best()`` ranks the result. ``eos_token_ids`` are the model's end-of-sequence ids.
    """

    def __init__(self, prompt_token_ids: Sequence[int], params: BeamSearchParams,
                 eos_token_ids: frozenset[int]) -> None:
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.prompt_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.beams = [BeamSearchSequence(list(self.prompt_token_ids), self.num_prompt_tokens)]
        self.finished: list[BeamSearchSequence] = []
        self.steps = 0

    @property
    def done(self) -> bool:
        return not self.beams or self.steps >= self.params.max_tokens

    def pending(self) -> list[list[int]]:
        """The token ids of every live beam (prompt and generated), to score next."""
        return [] if self.done else [beam.tokens for beam in self.beams]

    def advance(self, candidates: Sequence[Mapping[int, Logprob]]) -> None:
        """Extend the live beams by their scored candidates (one mapping per beam of ``pending()``, in order)."""
        if len(candidates) != len(self.beams):
            raise ValueError(f"got candidates for {len(candidates)} beams, {len(self.beams)} are live")
        self.steps += 1
        last_step = self.steps >= self.params.max_tokens
        grown = []
        for beam, scored in zip(self.beams, candidates, strict=True):
            position = dict(scored)
            for token_id, logprob in scored.items():
                child = BeamSearchSequence(beam.tokens + [token_id], self.num_prompt_tokens,
                                           beam.cum_logprob + logprob.logprob, beam.logprobs + [position])
                if token_id in self.eos_token_ids and not self.params.ignore_eos:
                    child.finish_reason = "stop"
                    self.finished.append(child)
                else:
                    if last_step:
                        child.finish_reason = "length"
                    grown.append(child)
        grown.sort(key=self.score, reverse=True)  # stable: ties keep the engine's candidate order
        self.beams = grown[:self.params.beam_width]

    def best(self) -> list[BeamSearchSequence]:
        """The ``beam_width`` best sequences, finished and live together, best first."""
        ranked = sorted(self.finished + self.beams, key=self.score, reverse=True)
        return ranked[:self.params.beam_width]

    def score(self, beam: BeamSearchSequence) -> float:
        """``cum_logprob / length ** length_penalty``, the length counting the prompt and the generated tokens but
        not a final end-of-sequence token (vLLM's rule)."""
        length = len(beam.tokens) - (beam.finish_reason == "stop")
        return beam.cum_logprob / (max(length, 1) ** self.params.length_penalty)

    def request_output(self, request_id: str, prompt: str | None, decode) -> RequestOutput:
        """The ranked result as one finished ``RequestOutput`` whose choices are the beams, best first (what the
        server answers): each choice's ``token_ids`` are the generated ids, its ``text`` their decoding by
        ``decode`` (token ids -> text) without a final end-of-sequence token."""
        outputs = []
        for index, beam in enumerate(self.best()):
            outputs.append(CompletionOutput(index, decode(beam.text_token_ids()), beam.output_token_ids,
                                            beam.cum_logprob, None, beam.finish_reason, None))
        return RequestOutput(request_id, prompt, list(self.prompt_token_ids), outputs, finished=True)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
