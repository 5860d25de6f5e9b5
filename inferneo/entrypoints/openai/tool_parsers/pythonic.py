"""The pythonic tool-call format (vLLM's ``--tool-call-parser pythonic``) of Llama 3.2 and Llama 4 with pythonic
chat templates, and other models prompted that way: the answer is a Python list of calls with keyword arguments,

    [get_weather(city="Paris", days=3), get_time(zone=None)]

read with Python's ``ast``: literals only (strings, numbers, ``True``/``False``/``None``, lists, dicts, tuples as
lists), nothing is evaluated. An answer whose first non-blank character is not ``[`` is plain content, passed
through as it streams. One that starts with ``[`` is held back until its list closes; a list that is not all
calls (a positional argument, a value that is not a literal, or no list of calls at all: ``[1] is a list``), or an
answer that ends before the list does, is handed out as content, as written, and so is text after the calls. The
list ends at the ``]`` that closes its ``[`` outside string literals (``[link](url)`` is content at once); it is
parsed then, once.
"""

from __future__ import annotations

import ast
import warnings
from collections.abc import Mapping
from typing import Any

from inferneo.entrypoints.openai.tool_parsers.base import ParsedPiece, ToolCallParser


class PythonicToolParser(ToolCallParser):
    """``[name(key=value, ...), ...]``."""

    def __init__(self, schemas: Mapping[str, Any] | None = None) -> None:
        super().__init__(schemas)
        self._held = ""  # the answer while it may be a list of calls
        self._mode = "undecided"  # then "calls" (the list is open), "content" or "after" (the calls went out)
        self._scanner = _BracketScanner()

    def feed(self, text: str) -> ParsedPiece:
        if self._mode == "content":
            return ParsedPiece(text)
        self._held += text
        if self._mode == "after":
            return self._after()
        if self._mode == "undecided":
            head = self._held.lstrip()
            if not head:
                return ParsedPiece()
            if head[0] != "[":
                self._mode = "content"
                held, self._held = self._held, ""
                return ParsedPiece(held)
            self._mode = "calls"
        end = self._scanner.scan(self._held)
        if end is None:
            return ParsedPiece()
        calls = _calls(self._held[:end])
        if calls is None:
            self._mode = "content"
            held, self._held = self._held, ""
            return ParsedPiece(held)
        self._mode = "after"
        self._held = self._held[end:]
        out = self._after()
        out.calls[:0] = [self.whole_call(*call) for call in calls]
        return out

    def _after(self) -> ParsedPiece:
        """Text after the calls: content once it is more than blanks (blanks alone are dropped at the end)."""
        if not self._held.strip():
            return ParsedPiece()
        self._mode = "content"
        held, self._held = self._held, ""
        return ParsedPiece(held)

    def finish(self) -> ParsedPiece:
        held, self._held = self._held, ""
        return ParsedPiece(held if self._mode != "after" else "")


class _BracketScanner:
    """Follows brackets and string literals through Python text that starts with ``[`` (blanks before it allowed);
    ``scan`` reports the end of that list once it has arrived. Each character is looked at once, however the text
    is cut into pieces."""

    def __init__(self) -> None:
        self.pos = 0  # the next character of the text to look at
        self.depth = 0
        self.quote = ""  # the quote of the string literal the scan is in, if any
        self.escaped = False

    def scan(self, text: str) -> int | None:
        """The index just past the list that ``text`` (everything so far) starts with, or None while it is open."""
        while self.pos < len(text):
            ch = text[self.pos]
            self.pos += 1
            if self.quote:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == self.quote:
                    self.quote = ""
            elif ch in "'\"":
                self.quote = ch
            elif ch in "[({":
                self.depth += 1
            elif ch in "])}":
                self.depth -= 1
                if self.depth <= 0:
                    return self.pos
        return None


def _calls(text: str) -> list[tuple[str, dict[str, Any]]] | None:
    """The calls that ``text``, a Python list of calls with literal keyword arguments, writes, or None when it is
    not one."""
    try:
        with warnings.catch_warnings():  # the model's text: an odd escape in a string is no reason to warn
            warnings.simplefilter("ignore")
            node = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    if not isinstance(node, ast.List) or not node.elts:
        return None
    calls = []
    for element in node.elts:
        if not isinstance(element, ast.Call) or element.args or not isinstance(element.func, ast.Name):
            return None
        arguments: dict[str, Any] = {}
        for keyword in element.keywords:
            if keyword.arg is None:  # **mapping
                return None
            try:
                arguments[keyword.arg] = _json_ready(ast.literal_eval(keyword.value))
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                return None
        calls.append((element.func.id, arguments))
    return calls


def _json_ready(value: Any) -> Any:
    """A literal as JSON can write it (tuples as lists); ``ValueError`` for what it cannot (sets, bytes, complex
    numbers, non-string keys, infinities)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("not a JSON number")
        return value
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _json_ready(v) for k, v in value.items()}
    raise ValueError("not a JSON value")
