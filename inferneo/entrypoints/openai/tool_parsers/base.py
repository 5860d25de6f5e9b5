"""What every tool-call parser shares: the pieces it hands out, and the parser interface.

A parser reads a choice's generated text as it streams in and splits it into plain ``content`` and tool calls.
It is incremental (``feed`` each new piece, ``finish`` at the end); a whole answer is parsed by feeding it in one
piece (``parse_all``), so streamed and non-streamed answers are split the same way.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(slots=True)
class ToolCallPiece:
    """A piece of tool call number ``index`` (0, 1, ... within one choice): its first piece has the ``name``;
    the ``arguments`` pieces, joined in order, are the call's arguments as a JSON string."""

    index: int
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class ParsedPiece:
    """What a piece of generated text turned into: text for ``content``, and pieces of tool calls."""

    content: str = ""
    calls: list[ToolCallPiece] = field(default_factory=list)

    def add(self, other: ParsedPiece) -> None:
        self.content += other.content
        self.calls.extend(other.calls)


@dataclass(slots=True)
class ParsedCall:
    """One whole tool call: the function's name and its arguments as a JSON string."""

    name: str
    arguments: str


class ToolCallParser(ABC):
    """Splits one choice's text into content and tool calls, piece by piece.

    ``schemas`` are the request's functions' ``parameters`` schemas by function name: a format whose arguments are
    written untyped (Qwen3-Coder's XML) reads each value's type there; the others ignore them."""

    keeps_special_tokens: ClassVar[bool] = False
    """Whether the format's markers are special tokens of the model's tokenizer (Mistral's ``[TOOL_CALLS]``): the
    answer is then decoded with them, so that the parser sees them."""

    def __init__(self, schemas: Mapping[str, Any] | None = None) -> None:
        self.num_calls = 0  # calls started so far
        self.schemas: Mapping[str, Any] = schemas or {}

    @abstractmethod
    def feed(self, text: str) -> ParsedPiece:
        """The content and tool-call pieces that ``text`` (the next piece of the answer) completes."""

    @abstractmethod
    def finish(self) -> ParsedPiece:
        """Whatever is still held back once the answer has ended."""

    @classmethod
    def call_id(cls) -> str | None:
        """A fresh id for a tool call of this format's model when its chat template needs ids of a shape of its
        own (Mistral's), whichever parser read the call (one forced by ``tool_choice`` too); None when any id does:
        each API then makes its own (OpenAI's ``call_...``, Anthropic's ``toolu_...``)."""
        return None

    def whole_call(self, name: str, arguments: Any) -> ToolCallPiece:
        """A call given whole (name and arguments at once), numbered next."""
        piece = ToolCallPiece(self.num_calls, name, arguments_json(arguments))
        self.num_calls += 1
        return piece


def arguments_json(arguments: Any) -> str:
    """A call's arguments as the JSON string OpenAI sends (compact, non-ASCII kept)."""
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def call_of(text: str, arguments_keys: tuple[str, ...]) -> tuple[str, Any] | None:
    """``(name, arguments)`` when ``text`` is a JSON object ``{"name": str, <key>: object}`` for one of
    ``arguments_keys`` (a missing arguments key means no arguments), else None."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # the model's text: not JSON, or nested past Python's recursion limit
        return None
    return call_of_value(value, arguments_keys)


def call_of_value(value: Any, arguments_keys: tuple[str, ...]) -> tuple[str, Any] | None:
    """``call_of`` for a value already read from JSON."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    for key in arguments_keys:
        if key in value:
            return (value["name"], value[key]) if isinstance(value[key], dict) else None
    return value["name"], {}


def parse_all(parser: ToolCallParser, text: str) -> tuple[str, list[ParsedCall]]:
    """A whole answer split into its content and its tool calls."""
    result = parser.feed(text)
    result.add(parser.finish())
    return result.content, calls_of(result.calls)


def calls_of(pieces: list[ToolCallPiece]) -> list[ParsedCall]:
    """Whole calls from their pieces (numbered from 0, each call's first piece first)."""
    calls: list[ParsedCall] = []
    for piece in pieces:
        if piece.index == len(calls):
            calls.append(ParsedCall(piece.name or "", piece.arguments))
        else:
            calls[piece.index].arguments += piece.arguments
    return calls
