"""The Hermes / Qwen tool-call format: each call a JSON object in its own block,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Text before the first block is the answer's ``content``. A block whose JSON is not ``{"name", "arguments"}``, a
block the answer leaves unclosed, and a stray ``<tool_call>`` before a block, stay in ``content`` as the model wrote
them, tags included (the block after a stray tag is still read). In a block that starts as JSON (``{`` or ``[``),
tags inside its strings are text: an argument may hold ``</tool_call>`` (a model writing about tool calls, or a
file that contains them) without ending the block. While streaming, text
that may be the start of ``<tool_call>`` is held back until it is decided, and so is trailing whitespace (the
newline a model writes before a block is not content); a call goes out whole when its block closes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from inferneo.entrypoints.openai.streamed_text import split_at_marker
from inferneo.entrypoints.openai.tool_parsers.base import ParsedPiece, ToolCallParser, call_of
from inferneo.entrypoints.openai.tool_parsers.json_scan import JsonStrings

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolCallParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks."""

    def __init__(self, schemas: Mapping[str, Any] | None = None) -> None:
        super().__init__(schemas)
        self._held = ""  # text not handed out yet
        self._in_block = False
        self._gap = ""  # the whitespace before the open block: content again if the block is not a call
        self._close = _CloseFinder()

    def feed(self, text: str) -> ParsedPiece:
        self._held += text
        out = ParsedPiece()
        while True:
            if self._in_block:
                end = self._close.find(self._held)
                if end < 0:
                    return out
                body, self._held = self._held[:end], self._held[end + len(CLOSE):]
                self._in_block = False
                self._close = _CloseFinder()
                call = call_of(body.strip(), ("arguments", "parameters"))
                inner = body.rfind(OPEN) if call is None else -1
                if inner >= 0:  # a stray tag opened earlier: it and the text after it are content, as written
                    stray, gap = _split_trailing_blank(body[:inner])
                    out.content += self._gap + OPEN + stray
                    self._gap, body = gap, body[inner + len(OPEN):]
                    call = call_of(body.strip(), ("arguments", "parameters"))
                if call is None:
                    out.content += self._gap + OPEN + body + CLOSE
                else:
                    out.calls.append(self.whole_call(*call))
                continue
            content, gap, self._held = split_at_marker(self._held, OPEN)
            out.content += content
            if gap is None:
                return out
            self._gap, self._in_block = gap, True

    def finish(self) -> ParsedPiece:
        held, self._held = self._held, ""
        if self._in_block:
            return ParsedPiece(self._gap + OPEN + held)
        return ParsedPiece(held if self.num_calls == 0 or held.strip() else "")


class _CloseFinder:
    """Where a block's ``</tool_call>`` is, in the block's text so far (everything after ``<tool_call>``). In a block
    whose first non-blank character is ``{`` or ``[`` the tag counts only outside JSON strings; in any other block
    its first occurrence counts. Each character is looked at once, however the text is cut into pieces."""

    def __init__(self) -> None:
        self.json: bool | None = None  # decided by the block's first non-blank character
        self.pos = 0  # the next character to look at
        self.strings = JsonStrings()

    def find(self, text: str) -> int:
        """The index of the closing tag in ``text``, or -1 while there is none yet."""
        if self.json is None:
            first = text.lstrip()[:1]
            if not first:
                return -1
            self.json = first in "{["
        if not self.json:
            return text.find(CLOSE)
        while self.pos < len(text):
            if text[self.pos] == "<" and not self.strings.in_string:
                if text.startswith(CLOSE, self.pos):
                    return self.pos
                if CLOSE.startswith(text[self.pos:]):
                    return -1  # maybe the tag, not all here yet: look again from here
            self.strings.inside(text[self.pos])
            self.pos += 1
        return -1


def _split_trailing_blank(text: str) -> tuple[str, str]:
    """``text`` without its trailing whitespace, and that whitespace (the blank before a block)."""
    kept = text.rstrip()
    return kept, text[len(kept):]

