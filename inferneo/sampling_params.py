"""Sampling parameters for one generation request."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from inferneo.json_text import TooDeep, loads_bounded

_SAMPLING_EPS = 1e-5
_FLOAT_BOUND = 1e30  # temperature at most this, repetition_penalty within [1 / this, this]
# the most top log-probabilities a request may ask for by default (OpenAI's limit, vLLM's default); the engine checks
# its own, EngineConfig.max_logprobs (--max-logprobs), which defaults to this
MAX_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class ReasoningSpan:
    """Where a reasoning model's thinking lies in its output, for a constraint that applies to the answer after it
    (a server's ``--reasoning-parser`` sets it; see ``structured_output.reasoning_gate``).

    ``end_token_id`` closes the thinking (``</think>``). With ``open_at_start`` the prompt left a thinking block
    open, so the output begins inside it; otherwise the output may open one with ``start_token_id`` as its first
    token (or begins with the answer). Nothing is constrained until the thinking is closed.
    """

    end_token_id: int
    start_token_id: int | None = None
    open_at_start: bool = False

    def __post_init__(self) -> None:
        for name, value in (("end_token_id", self.end_token_id), ("start_token_id", self.start_token_id)):
            if (value is not None or name == "end_token_id") and not (_is_int(value) and value >= 0):
                raise ValueError(f"structured_outputs.reasoning.{name} must be a token id, got {value!r}")
        if not isinstance(self.open_at_start, bool):
            raise ValueError("structured_outputs.reasoning.open_at_start must be a boolean")


@dataclass(slots=True)
class StructuredOutputsParams:
    """A shape the output must take, enforced token by token while decoding (vLLM's ``structured_outputs``).

    Exactly one of ``json`` (a JSON schema, as a dict or a JSON string), ``regex``, ``choice`` (the output is one
    of these strings), ``grammar`` (GBNF / EBNF, or Lark), ``json_object`` (any JSON object) or ``structural_tag``
    (xgrammar's structural tag, as a dict or a JSON string) must be set. ``disable_any_whitespace`` keeps JSON
    compact (no whitespace beyond the separators); by default whitespace is allowed between JSON tokens, in runs
    of at most ``MAX_WHITESPACE_RUN`` characters so that a model cannot stall in whitespace. ``reasoning`` (a
    :class:`ReasoningSpan`) lets a reasoning model think freely first: the constraint applies after its thinking.

    vLLM's other options: ``whitespace_pattern`` (a regex every run of JSON whitespace matches; llguidance
    enforces it), ``disable_additional_properties`` (objects whose schema does not say otherwise take no property
    beyond those listed), ``disable_fallback`` (accepted; Inferneo never falls back to a looser constraint) and
    ``backend`` (``auto``: xgrammar for what it enforces, llguidance for the rest; ``xgrammar`` or ``guidance``
    (``llguidance``) to use that one alone, refusing what it cannot enforce).

    Values are checked for shape here (a ``ValueError`` names the field); whether a schema, regex or grammar
    compiles is checked by the engine, which refuses a request it cannot compile (a 400 on the server).
    """

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None
    disable_any_whitespace: bool = False
    reasoning: ReasoningSpan | None = None
    whitespace_pattern: str | None = None
    disable_additional_properties: bool = False
    disable_fallback: bool = False
    backend: str = "auto"

    KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
    BACKENDS = ("auto", "xgrammar", "guidance")

    def __post_init__(self) -> None:
        if self.json_object is False:
            self.json_object = None
        if self.choice is not None and isinstance(self.choice, (list, tuple)):
            self.choice = list(self.choice)
        given = [k for k in self.KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("structured_outputs must set exactly one of json, regex, choice, grammar, "
                             f"json_object, structural_tag; got {given or 'none'}")
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("json", "structural_tag"):
            if isinstance(value, str):
                try:
                    parsed = loads_bounded(value)
                except TooDeep as e:
                    raise ValueError(f"structured_outputs.{kind} is {e}") from None
                except ValueError as e:
                    raise ValueError(f"structured_outputs.{kind} is not valid JSON: {e}") from None
            else:
                parsed = value
            if not isinstance(parsed, (dict, bool)) or (kind == "structural_tag" and not isinstance(parsed, dict)):
                raise ValueError(f"structured_outputs.{kind} must be a JSON object, got {type(parsed).__name__}")
        elif kind in ("regex", "grammar"):
            if not isinstance(value, str) or not value:
                raise ValueError(f"structured_outputs.{kind} must be a non-empty string")
        elif kind == "choice":
            if (not isinstance(value, list) or not value
                    or not all(isinstance(c, str) and c for c in value)):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
        elif value is not True:
            raise ValueError("structured_outputs.json_object must be true")
        for flag in ("disable_any_whitespace", "disable_additional_properties", "disable_fallback"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"structured_outputs.{flag} must be a boolean")
        if self.whitespace_pattern is not None:
            if not isinstance(self.whitespace_pattern, str):
                raise ValueError("structured_outputs.whitespace_pattern must be a string (a regular expression)")
            if kind not in ("json", "json_object"):
                raise ValueError("structured_outputs.whitespace_pattern is the whitespace of a JSON answer: it goes "
                                 f"with json or json_object, not {kind}")
            if self.disable_any_whitespace:
                raise ValueError("structured_outputs.whitespace_pattern and disable_any_whitespace both set the "
                                 "JSON whitespace: give one")
        if self.backend == "llguidance":
            self.backend = "guidance"
        if self.backend not in self.BACKENDS:
            raise ValueError(f"structured_outputs.backend must be one of {', '.join(self.BACKENDS)} (or llguidance), "
                             f"got {self.backend!r}")
        if isinstance(self.reasoning, dict):
            self.reasoning = ReasoningSpan(**self.reasoning)
        elif self.reasoning is not None and not isinstance(self.reasoning, ReasoningSpan):
            raise ValueError("structured_outputs.reasoning must be a ReasoningSpan or a dict, "
                             f"got {type(self.reasoning).__name__}")

    @property
    def kind(self) -> str:
        """Which constraint is set: one of ``KINDS``."""
        return next(k for k in self.KINDS if getattr(self, k) is not None)

    @property
    def spec(self) -> str:
        """The constraint as one string: the JSON schema as compact JSON (its properties in the order given, which
        is the order the output takes), the regex, the grammar, the choices as a JSON list..."""
        value = getattr(self, self.kind)
        if isinstance(value, str):
            return value
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

    @property
    def key(self) -> tuple:
        """What identifies the compiled grammar (kind, spec, whitespace rule, and the options that change it): the
        compile cache's key."""
        return (self.kind, self.spec, self.disable_any_whitespace, self.whitespace_pattern,
                self.disable_additional_properties, self.backend)


MAX_WHITESPACE_RUN = 16  # the longest run of whitespace a JSON constraint allows between tokens (by default)


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens for one request.

    The field names and meanings follow the OpenAI API and vLLM. ``temperature=0`` means greedy decoding.
    Every value is checked when the object is built; an invalid value raises ``ValueError`` naming the field.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # 0 (with prompt_logprobs set): score the prompt, generate nothing
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    # The log-probabilities of every prompt token with the top ``prompt_logprobs`` alternatives (vLLM's field);
    # 0 returns the prompt tokens' own log-probabilities only. None: not computed.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # False: no text (``text`` stays "", logprobs' ``decoded_token`` None), only token ids; no stop strings then.
    detokenize: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Added to the logits of these token ids before sampling (OpenAI's logit_bias): -100 bans a token in practice,
    # +100 all but forces it. Keys are token ids; values in [-100, 100].
    logit_bias: dict[int, float] | None = None
    # Only these token ids may be sampled (vLLM's field: classification over a fixed set of labels); every other
    # token's logit is -inf. None: every token. Not empty.
    allowed_token_ids: list[int] | None = None
    # Words the answer must not contain (vLLM's field): the last token of each word's tokenization (with and without
    # a leading space) is banned wherever the output so far ends with the tokens before it. The front end fills
    # ``bad_words_token_ids`` from these with the model's tokenizer; the core reads only the token ids.
    bad_words: list[str] | None = None
    bad_words_token_ids: list[list[int]] | None = None
    # Constrain the output to a JSON schema, regex, choice or grammar (see ``StructuredOutputsParams``); a dict
    # with the same keys is accepted.
    structured_outputs: StructuredOutputsParams | None = None
    # Keep only the prompt's last this many tokens (vLLM's field; -1: as many as leave room for max_tokens), instead
    # of refusing a prompt longer than the context. None: the prompt as given.
    truncate_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = _as_list(self.stop, "stop", "a string or a list of strings")
        self.stop_token_ids = _as_list(self.stop_token_ids, "stop_token_ids", "a list of token ids")
        if self.top_k is None or self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise ValueError(f"logit_bias must be a mapping of token id to bias, got {self.logit_bias!r}")
            self.logit_bias = dict(self.logit_bias) or None
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _as_list(self.allowed_token_ids, "allowed_token_ids", "a list of token ids")
        if self.bad_words is not None:
            self.bad_words = [self.bad_words] if isinstance(self.bad_words, str) else _as_list(
                self.bad_words, "bad_words", "a string or a list of strings")
        if self.bad_words_token_ids is not None:
            self.bad_words_token_ids = [_as_list(w, "bad_words_token_ids", "a list of token-id lists")
                                        for w in _as_list(self.bad_words_token_ids, "bad_words_token_ids",
                                                          "a list of token-id lists")]
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        elif self.structured_outputs is not None and not isinstance(self.structured_outputs,
                                                                    StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams or a dict, "
                             f"got {type(self.structured_outputs).__name__}")
        self._validate()

    def _validate(self) -> None:
        def check(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"{name} {msg}, got {getattr(self, name)!r}")

        check(_is_int(self.n) and self.n >= 1, "n", "must be an integer >= 1")
        # the bounds keep the sampler's float32 arithmetic finite (a temperature or penalty past them overflows or
        # rounds to zero there, and the division gives inf or NaN logits)
        check(_is_num(self.temperature) and 0 <= self.temperature <= _FLOAT_BOUND, "temperature",
              f"must be in [0, {_FLOAT_BOUND:g}]")
        check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(_is_int(self.top_k) and self.top_k >= 0, "top_k", "must be 0 or -1 (disabled) or a positive integer")
        check(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        check(_is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty",
              "must be in [-2, 2]")
        check(_is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty",
              "must be in [-2, 2]")
        check(_is_num(self.repetition_penalty) and 1 / _FLOAT_BOUND <= self.repetition_penalty <= _FLOAT_BOUND,
              "repetition_penalty", f"must be in [{1 / _FLOAT_BOUND:g}, {_FLOAT_BOUND:g}]")
        check(self.seed is None or (_is_int(self.seed) and -(2**63) <= self.seed < 2**63), "seed",
              "must be a 64-bit integer or None")
        # max_tokens=0 only scores the prompt (with prompt_logprobs; vLLM's server allows it with echo).
        least = 0 if self.prompt_logprobs is not None else 1
        check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= least), "max_tokens",
              "must be an integer >= 1 (or 0 with prompt_logprobs, to score the prompt only) or None")
        check(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "must be an integer >= 0")
        check(self.truncate_prompt_tokens is None or (_is_int(self.truncate_prompt_tokens) and (
            self.truncate_prompt_tokens == -1 or self.truncate_prompt_tokens >= 1)), "truncate_prompt_tokens",
              "must be -1 (as many as leave room for max_tokens), an integer >= 1 or None")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens, got {self.min_tokens} > {self.max_tokens}")
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        check(isinstance(self.detokenize, bool), "detokenize", "must be a boolean")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need detokenize=True (the text they are found in); use stop_token_ids")
        check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
              "must be non-negative integers")
        check(self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0), "logprobs",
              "must be an integer >= 0 or None")
        check(self.prompt_logprobs is None or (_is_int(self.prompt_logprobs) and self.prompt_logprobs >= 0),
              "prompt_logprobs", "must be an integer >= 0 or None")
        check(self.logit_bias is None or all(_is_int(t) and t >= 0 and _is_num(b) and -100 <= b <= 100
                                             for t, b in self.logit_bias.items()), "logit_bias",
              "must map non-negative token ids to biases in [-100, 100]")
        check(self.allowed_token_ids is None or (self.allowed_token_ids and all(
            _is_int(t) and t >= 0 for t in self.allowed_token_ids)), "allowed_token_ids",
              "must be a non-empty list of non-negative token ids (or None: every token)")
        check(self.bad_words is None or all(isinstance(w, str) and w.strip() for w in self.bad_words), "bad_words",
              "must be non-blank strings")
        check(self.bad_words_token_ids is None or all(w and all(_is_int(t) and t >= 0 for t in w)
                                                      for w in self.bad_words_token_ids), "bad_words_token_ids",
              "must be non-empty lists of non-negative token ids")

    def token_id_error(self, vocab_size: int) -> tuple[str, str] | None:
        """Why a field of token ids (``logit_bias``, ``allowed_token_ids``, ``bad_words_token_ids``) cannot apply to a
        model of ``vocab_size`` tokens, as (message, field), or None."""
        fields = (("logit_bias", self.logit_bias or ()), ("allowed_token_ids", self.allowed_token_ids or ()),
                  ("bad_words", [t for w in self.bad_words_token_ids or () for t in w]))
        for name, ids in fields:
            if bad := sorted({t for t in ids if t >= vocab_size}):
                return f"{name} token ids must be below the vocabulary size {vocab_size}; got {bad[:5]}", name
        return None

    @property
    def greedy(self) -> bool:
        """True when the request picks the most likely token at every step."""
        return self.temperature < _SAMPLING_EPS

    def clone(self) -> SamplingParams:
        """A deep copy, so per-request changes never leak between requests."""
        return copy.deepcopy(self)


def _as_list(value: object, name: str, expected: str) -> list:
    """``value`` (None or any iterable but a mapping) as a new list; else ``ValueError`` naming the field."""
    if value is None:
        return []
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping)):
        return list(value)
    raise ValueError(f"{name} must be {expected}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
