"""gpt-oss's answers in OpenAI's harmony format (``--reasoning-parser openai_gptoss``), read from their text.

After the generation prompt ``<|start|>assistant`` gpt-oss writes one or more messages, each a header, then
``<|message|>``, its body and an end marker::

    <|channel|>analysis<|message|>We need to answer.<|end|><|start|>assistant<|channel|>final<|message|>Paris.<|return|>
    <|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Oslo"}<|call|>

(the recipient may also come first: ``<|start|>assistant to=functions.get_weather<|channel|>commentary json``).
The markers are special tokens, so these answers are decoded with them kept. A message's body goes, by its header:

- to ``to=functions.NAME`` (any recipient; ``functions.`` is dropped): a tool call ``NAME`` with the body as its
  arguments;
- on channel ``analysis``: the thinking (``reasoning``);
- on ``final``, ``commentary`` without a recipient (a preamble), or any other channel: the answer's ``content``.

Two messages of one kind are joined with a newline. Text with no harmony marker at its start (an answer a grammar
forced from the first token) is all content. A header cut short is dropped; a body cut short is kept. The package
``openai_harmony`` is not used: it downloads its vocabulary at first use.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from inferneo.entrypoints.openai.reasoning import HarmonyFormat, ReasoningPiece, special_kept_decoder
from inferneo.entrypoints.openai.streamed_text import marker_tail
from inferneo.entrypoints.openai.tool_parsers.base import ToolCallPiece

START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL = (
    "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>")
MARKERS = (START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL)
_BODY_ENDS = (END, RETURN, CALL, START, CHANNEL)  # a body ends at these (the last two: a new message, unclosed)
_HEADER_OPENERS = (START, CHANNEL, MESSAGE, CONSTRAIN, " to=", "to=")  # what a harmony answer may start with
_RECIPIENT = re.compile(r"to=([^\s<]+)")
_CHANNEL_NAME = re.compile(re.escape(CHANNEL) + r"\s*([^\s<]+)")
_SEPARATOR = "\n"  # between two messages of one kind


class MessageKind(enum.Enum):
    """Where a message's body goes."""

    REASONING = "reasoning"
    CONTENT = "content"
    CALL = "call"


class _State(enum.Enum):
    START = "start"  # the answer's first characters: harmony, or plain text
    PLAIN = "plain"  # no harmony: all content
    HEADER = "header"  # a message's header, up to <|message|>
    BODY = "body"


@dataclass(frozen=True, slots=True)
class MessageRoute:
    """Where a message's body goes: its kind, and for a call the function's name."""

    kind: MessageKind
    name: str | None = None


def route_of(header: str) -> MessageRoute:
    """The route of a message whose header (the text before ``<|message|>``, ``<|start|>`` and role included) is
    ``header``."""
    recipient = _RECIPIENT.search(header)
    if recipient:
        name = recipient.group(1)
        return MessageRoute(MessageKind.CALL, name.removeprefix("functions."))
    channel = _CHANNEL_NAME.search(header)
    if channel and channel.group(1) == "analysis":
        return MessageRoute(MessageKind.REASONING)
    return MessageRoute(MessageKind.CONTENT)


class HarmonySplitter:
    """Splits one harmony answer's text, piece by piece, into thinking, content and tool calls (the splitter a
    reasoning parser hands out: ``feed``, ``finish``, ``thinking``). Feeding a whole answer at once gives what
    feeding it in any pieces gives: a header is held until its ``<|message|>``, and text that may start a marker
    until it is decided."""

    def __init__(self) -> None:
        self.state = _State.START
        self.held = ""
        self.route = MessageRoute(MessageKind.CONTENT)
        self.num_calls = 0
        self._started = False  # the current message's body has given text
        self._given: set[MessageKind] = set()  # kinds that have text already (a later message is joined by a newline)

    def feed(self, text: str) -> ReasoningPiece:
        """The thinking, content and call pieces that ``text`` (the next piece) completes."""
        self.held += text
        out = ReasoningPiece()
        while self.held:
            if self.state is _State.START:
                if self.held.startswith(_HEADER_OPENERS):
                    self.state = _State.HEADER
                elif any(opener.startswith(self.held) for opener in _HEADER_OPENERS):
                    return out
                else:
                    self.state = _State.PLAIN
            elif self.state is _State.PLAIN:
                out.content += self.held
                self.held = ""
            elif self.state is _State.HEADER:
                at = self.held.find(MESSAGE)
                if at < 0:
                    return out
                self._open(self.held[:at], out)
                self.held = self.held[at + len(MESSAGE):]
            else:
                ends = [(at, marker) for marker in _BODY_ENDS if (at := self.held.find(marker)) >= 0]
                if ends:
                    at, marker = min(ends)
                    self._body(self.held[:at], out)
                    keep = marker in (START, CHANNEL)  # the next message's header begins with it
                    self.held = self.held[at if keep else at + len(marker):]
                    self.state = _State.HEADER
                    continue
                keep = marker_tail(self.held, MARKERS)
                self._body(self.held[:len(self.held) - keep], out)
                self.held = self.held[len(self.held) - keep:]
                return out
        return out

    @property
    def thinking(self) -> bool:
        """Whether the text so far ends inside an ``analysis`` message's body (a cut here leaves it unfinished)."""
        return self.state is _State.BODY and self.route.kind is MessageKind.REASONING

    def finish(self) -> ReasoningPiece:
        """Whatever is still held once the answer has ended: plain text, or the rest of a body cut short (a header
        cut short is dropped)."""
        held, self.held = self.held, ""
        out = ReasoningPiece()
        if self.state in (_State.START, _State.PLAIN):
            out.content = held
        elif self.state is _State.BODY:
            self._body(held, out)
        return out

    def _open(self, header: str, out: ReasoningPiece) -> None:
        """A message begins: route its body; a call's first piece (its name) goes out now."""
        self.route = route_of(header)
        self.state = _State.BODY
        self._started = False
        if self.route.kind is MessageKind.CALL:
            out.calls.append(ToolCallPiece(self.num_calls, self.route.name))
            self.num_calls += 1

    def _body(self, text: str, out: ReasoningPiece) -> None:
        """The next text of the current message's body."""
        if not text:
            return
        kind = self.route.kind
        if kind is MessageKind.CALL:
            out.calls.append(ToolCallPiece(self.num_calls - 1, arguments=text))
            return
        if not self._started and kind in self._given:
            text = _SEPARATOR + text
        self._started = True
        self._given.add(kind)
        if kind is MessageKind.REASONING:
            out.reasoning += text
        else:
            out.content += text


class HarmonyTokenCounter:
    """How many of an answer's tokens, fed as they come, are its thinking: the tokens of its ``analysis``
    messages, header (from ``<|start|>``, or the answer's start) and end marker included (OpenAI's
    ``reasoning_tokens``)."""

    def __init__(self, markers: HarmonyMarkers) -> None:
        self.markers = markers
        self.count = 0
        self._plain: bool | None = None  # decided by the first token: harmony answers start with a marker
        self._header: list[int] = []
        self._in_body = False
        self._thinking = False

    def add(self, token_ids: list[int]) -> list[bool]:
        """Count the answer's next tokens; for each, whether it is the answer's: a body token of a message that is
        not thinking (content, or a call's arguments), or any token of a plain answer; never a header or marker."""
        ids = self.markers.ids
        answer = []
        for token_id in token_ids:
            if self._plain is None:
                self._plain = token_id not in ids.values()
            answer.append(self._take(token_id))
        return answer

    def _take(self, token_id: int) -> bool:
        """Count one token; whether it is the answer's."""
        ids = self.markers.ids
        if self._plain:
            return True
        if not self._in_body:
            self._header.append(token_id)
            if token_id == ids[MESSAGE]:
                header = self.markers.decode(self._header)
                self._thinking = route_of(header).kind is MessageKind.REASONING
                self.count += len(self._header) if self._thinking else 0
                self._header, self._in_body = [], True
            return False
        if token_id in (ids[START], ids[CHANNEL]):  # a new message without an end marker
            self._header, self._in_body = [token_id], False
            return False
        if self._thinking:
            self.count += 1
        if token_id in (ids[END], ids[RETURN], ids[CALL]):
            self._in_body = False
            return False
        return not self._thinking


@dataclass(frozen=True, slots=True)
class HarmonyMarkers:
    """The harmony format in one model's vocabulary: its markers' token ids (each one token), and the tokenizer's
    decoding (with special tokens kept) for the counter's headers. The reasoning parser ``openai_gptoss``."""

    name: str
    format: HarmonyFormat
    ids: dict[str, int]
    decode: Callable[[list[int]], str] = field(compare=False, repr=False)
    keeps_special_tokens = True  # the markers are special tokens: the answer's text must keep them
    carries_calls = True  # tool calls are messages of the format: no tool-call parser reads them

    @classmethod
    def for_tokenizer(cls, name: str, fmt: HarmonyFormat, tokenizer) -> HarmonyMarkers:
        """``ValueError`` when a marker is not one token of ``tokenizer``'s vocabulary."""
        vocab = tokenizer.get_vocab() if callable(getattr(tokenizer, "get_vocab", None)) else {}
        missing = [marker for marker in fmt.markers if marker not in vocab]
        if missing:
            raise ValueError(f"reasoning parser {name!r} (harmony) needs {', '.join(missing)} as one token each of "
                             "the model's vocabulary, and this tokenizer has no such token")

        return cls(name, fmt, {marker: vocab[marker] for marker in fmt.markers}, special_kept_decoder(tokenizer))

    def describe(self) -> str:
        """The format, for the server's start-up log."""
        return "harmony channels (analysis: reasoning; final, commentary: content; to=functions.*: tool calls)"

    def opens(self, prompt_ids: list[int]) -> bool:
        """Harmony answers start with a message header after ``<|start|>assistant``: never inside a body."""
        return False

    def span(self, open_at_start: bool) -> None:
        """No thinking span for a constraint: structured output applies from the answer's first token."""
        return None

    def splitter(self, open_at_start: bool) -> HarmonySplitter:
        """A fresh splitter of one answer's text."""
        return HarmonySplitter()

    def token_counter(self, open_at_start: bool) -> HarmonyTokenCounter:
        """A fresh count of one answer's thinking tokens."""
        return HarmonyTokenCounter(self)
