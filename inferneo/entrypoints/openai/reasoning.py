"""A reasoning model's thinking, split from its answer (``--reasoning-parser``).

Qwen3, DeepSeek-R1 and DeepSeek-V3.1 think in a ``<think> ... </think>`` block before they answer (GLM-4.5 and
MiMo too; Seed-OSS in ``<seed:think> ... </seed:think>``, Magistral in ``[THINK] ... [/THINK]``). With a
reasoning parser the server returns that text apart, as vLLM does: the chat message's (and stream delta's)
``reasoning`` field, also sent as ``reasoning_content`` (its earlier name, which DeepSeek's API and many clients
read), and a ``reasoning`` item in the Responses API. Tool calls and structured output apply to the answer alone.

Whether an answer starts inside the block is read from the prompt: a chat template that opens it in the generation
prompt (DeepSeek-R1's ``<think>\\n``, Qwen3 thinking models) leaves the output inside it; otherwise the output may
open it with its first token (Qwen3's hybrid models) or answer at once (``enable_thinking: false`` renders a closed,
empty block into the prompt). An unclosed block at the end is all thinking. Whitespace around the thinking, and
between it and the answer, is dropped. Where the markers are special tokens (Magistral's, in Mistral's tokenizers
v13 on) the answers are decoded with special tokens kept, so that the markers are in their text.

gpt-oss (``openai_gptoss``) writes OpenAI's harmony format instead: channels of messages between special tokens,
its tool calls among them (:mod:`.harmony`). :func:`reasoning_for_tokenizer` gives either kind of parser; both have
the :class:`ReasoningParser` interface the chat and Responses paths use.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from inferneo.entrypoints.openai.streamed_text import undecided_tail
from inferneo.entrypoints.openai.tool_parsers.base import ToolCallPiece
from inferneo.sampling_params import ReasoningSpan


@dataclass(frozen=True, slots=True)
class ThinkingFormat:
    """The markers around a model's thinking."""

    start: str
    end: str


@dataclass(frozen=True, slots=True)
class HarmonyFormat:
    """OpenAI's harmony format (gpt-oss): the special tokens its messages are made of."""

    markers: tuple[str, ...] = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>",
                                "<|return|>", "<|call|>")


_THINK_TAGS = ThinkingFormat("<think>", "</think>")
REASONING_PARSERS: dict[str, ThinkingFormat | HarmonyFormat] = {
    "qwen3": _THINK_TAGS,
    "deepseek_r1": _THINK_TAGS,
    "deepseek_v3": _THINK_TAGS,
    "glm45": _THINK_TAGS,
    "mimo": _THINK_TAGS,
    "seed_oss": ThinkingFormat("<seed:think>", "</seed:think>"),
    "mistral": ThinkingFormat("[THINK]", "[/THINK]"),
    "openai_gptoss": HarmonyFormat(),
}
"""The names ``--reasoning-parser`` takes (vLLM's), and the format each reads."""


class AnswerSplitter(Protocol):
    """Splits one answer's text, piece by piece, into thinking, content (and, for harmony, tool calls); ``thinking``
    tells whether the text so far ends inside the thinking."""

    def feed(self, text: str) -> ReasoningPiece: ...

    def finish(self) -> ReasoningPiece: ...

    @property
    def thinking(self) -> bool: ...


class TokenCounter(Protocol):
    """Counts an answer's thinking tokens as they come, and tells which of them are the answer's own: text that the
    splitter hands out as content or a tool call's arguments (not thinking, not a marker or a message header)."""

    count: int

    def add(self, token_ids: list[int]) -> list[bool]: ...


class ReasoningParser(Protocol):
    """What ``--reasoning-parser`` gives the serving paths: ``ReasoningMarkers`` (think tags) or
    ``harmony.HarmonyMarkers`` (gpt-oss)."""

    name: str
    keeps_special_tokens: bool  # the answers' text must keep special tokens (the format's markers are ones)
    carries_calls: bool  # the splitter hands out the tool calls (no tool-call parser reads them)

    def describe(self) -> str: ...

    def opens(self, prompt_ids: list[int]) -> bool: ...

    def span(self, open_at_start: bool) -> ReasoningSpan | None: ...

    def splitter(self, open_at_start: bool) -> AnswerSplitter: ...

    def token_counter(self, open_at_start: bool) -> TokenCounter: ...


def reasoning_for_tokenizer(name: str, tokenizer) -> ReasoningParser:
    """The parser ``--reasoning-parser name`` names, in ``tokenizer``'s vocabulary; ``ValueError`` when the name is
    unknown or the vocabulary lacks the format's markers."""
    fmt = REASONING_PARSERS.get(name)
    if isinstance(fmt, HarmonyFormat):
        from inferneo.entrypoints.openai.harmony import HarmonyMarkers

        return HarmonyMarkers.for_tokenizer(name, fmt, tokenizer)
    return ReasoningMarkers.for_tokenizer(name, tokenizer)


def special_kept_decoder(tokenizer) -> Callable[[list[int]], str]:
    """``tokenizer``'s decoding of token ids with special tokens kept (a format's markers, where they are ones)."""
    return functools.partial(tokenizer.decode, skip_special_tokens=False)


_PROMPT_TAIL_TOKENS = 8  # the prompt's last tokens read for an open block (the start marker and whitespace after it)


@dataclass(frozen=True, slots=True)
class ReasoningMarkers:
    """A thinking format in one model's vocabulary: its markers' texts and their (single) token ids, the
    tokenizer's decoding with special tokens kept (the prompt's tail; whether a token before the start marker is
    blank), and whether the answers' text must keep special tokens (a marker is one)."""

    name: str
    format: ThinkingFormat
    start_id: int
    end_id: int
    decode: Callable[[list[int]], str] = field(compare=False, repr=False)
    keeps_special_tokens: bool = False
    carries_calls = False

    @classmethod
    def for_tokenizer(cls, name: str, tokenizer) -> ReasoningMarkers:
        """The markers of parser ``name`` in ``tokenizer``; ``ValueError`` when the name is unknown or a marker is
        not one token of the vocabulary (a constraint after the thinking waits for that token). A marker that is a
        special token (decoded text leaves it out) makes the answers decoded with special tokens kept."""
        if name not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}; got {name!r}")
        fmt = REASONING_PARSERS[name]
        if not isinstance(fmt, ThinkingFormat):
            raise ValueError(f"reasoning parser {name!r} does not read think tags (see reasoning_for_tokenizer)")
        vocab = tokenizer.get_vocab() if callable(getattr(tokenizer, "get_vocab", None)) else {}
        missing = [marker for marker in (fmt.start, fmt.end) if marker not in vocab]
        if missing:
            raise ValueError(f"reasoning parser {name!r} needs {' and '.join(repr(m) for m in missing)} as one token "
                             "of the model's vocabulary, and this tokenizer has no such token")
        special = any(not tokenizer.decode([vocab[marker]], skip_special_tokens=True).strip()
                      for marker in (fmt.start, fmt.end))
        return cls(name, fmt, vocab[fmt.start], vocab[fmt.end], special_kept_decoder(tokenizer), special)

    def describe(self) -> str:
        """The format, for the server's start-up log."""
        return f"{self.format.start} ... {self.format.end}"

    def opens(self, prompt_ids: list[int]) -> bool:
        """Whether the prompt ends inside an open block (the template opened it for the answer)."""
        tail = self.decode(prompt_ids[-_PROMPT_TAIL_TOKENS:])
        return tail.rstrip().endswith(self.format.start)

    def span(self, open_at_start: bool) -> ReasoningSpan:
        """Where the thinking lies, for a constraint that applies after it."""
        return ReasoningSpan(self.end_id, self.start_id, open_at_start)

    def splitter(self, open_at_start: bool) -> ReasoningSplitter:
        """A fresh splitter of one answer's text."""
        return ReasoningSplitter(self.format, open_at_start)

    def token_counter(self, open_at_start: bool) -> ThinkingTokenCounter:
        """A fresh count of one answer's thinking tokens."""
        return ThinkingTokenCounter(self, open_at_start)


class ThinkingTokenCounter:
    """How many of an answer's tokens, fed as they come, are its thinking, markers included (OpenAI's
    ``reasoning_tokens``)."""

    def __init__(self, markers: ReasoningMarkers, open_at_start: bool) -> None:
        self.markers = markers
        self.thinking: bool | None = True if open_at_start else None  # None: the first token decides
        self.count = 0

    def add(self, token_ids: list[int]) -> list[bool]:
        """Count the answer's next tokens; for each, whether it is the answer's (after the thinking and its end
        marker). Blank tokens before the start marker leave it undecided, as the splitter does (they are no
        thinking, and text of the answer's if no block follows)."""
        answer = []
        for token_id in token_ids:
            if self.thinking is None:
                if token_id != self.markers.start_id and not self.markers.decode([token_id]).strip():
                    answer.append(True)
                    continue
                self.thinking = token_id == self.markers.start_id
            answer.append(not self.thinking)
            if self.thinking:
                self.count += 1
                if token_id == self.markers.end_id:
                    self.thinking = False
        return answer


@dataclass(slots=True)
class ReasoningPiece:
    """What a piece of an answer's text turned into: thinking, answer text, and (harmony) pieces of tool calls."""

    reasoning: str = ""
    content: str = ""
    calls: list[ToolCallPiece] = field(default_factory=list)

    def add(self, other: ReasoningPiece) -> None:
        self.reasoning += other.reasoning
        self.content += other.content
        self.calls.extend(other.calls)


class _State(enum.Enum):
    START = "start"  # the answer's first characters: maybe the start marker
    THINKING_LEAD = "thinking_lead"  # inside the block, before its first non-blank character
    THINKING = "thinking"
    ANSWER_LEAD = "answer_lead"  # after the block, before the answer's first non-blank character
    ANSWER = "answer"


class ReasoningSplitter:
    """Splits one answer's text, piece by piece, into thinking and answer text. Feeding a whole answer at once
    gives what feeding it in any pieces gives (text that may be part of a marker, and trailing whitespace of the
    thinking, are held back until decided)."""

    def __init__(self, fmt: ThinkingFormat, open_at_start: bool) -> None:
        self.format = fmt
        self.state = _State.THINKING_LEAD if open_at_start else _State.START
        self.held = ""

    def feed(self, text: str) -> ReasoningPiece:
        """The thinking and answer text that ``text`` (the next piece) completes."""
        self.held += text
        out = ReasoningPiece()
        start, end = self.format.start, self.format.end
        while self.held:
            if self.state is _State.START:
                stripped = self.held.lstrip()
                if stripped.startswith(start):
                    self.held, self.state = stripped[len(start):], _State.THINKING_LEAD
                elif not stripped or start.startswith(stripped):
                    return out  # blank so far, or maybe the marker
                else:
                    self.state = _State.ANSWER
            elif self.state in (_State.THINKING_LEAD, _State.ANSWER_LEAD):
                self.held = self.held.lstrip()
                if self.held:
                    self.state = _State.THINKING if self.state is _State.THINKING_LEAD else _State.ANSWER
            elif self.state is _State.THINKING:
                at = self.held.find(end)
                if at >= 0:
                    out.reasoning += self.held[:at].rstrip()
                    self.held, self.state = self.held[at + len(end):], _State.ANSWER_LEAD
                    continue
                keep = undecided_tail(self.held, end)
                out.reasoning += self.held[:len(self.held) - keep]
                self.held = self.held[len(self.held) - keep:]
                return out
            else:
                out.content += self.held
                self.held = ""
        return out

    @property
    def thinking(self) -> bool:
        """Whether the text so far ends inside the thinking (a cut here leaves the thinking unfinished)."""
        return self.state in (_State.THINKING_LEAD, _State.THINKING)

    def finish(self) -> ReasoningPiece:
        """Whatever is still held once the answer has ended: a block left open is thinking to its end."""
        held, self.held = self.held, ""
        if self.state is _State.START:
            return ReasoningPiece(content=held)
        if self.state in (_State.THINKING, _State.THINKING_LEAD):
            return ReasoningPiece(reasoning=held.rstrip())
        return ReasoningPiece(content=held)

