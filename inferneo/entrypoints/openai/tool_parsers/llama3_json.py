"""Llama 3.1's JSON tool-call format: the answer is one or more JSON objects, separated by ``;``,

    {"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}

optionally after ``<|python_tag|>`` (a special token, usually skipped in the text). An answer whose first
non-blank character is not ``{`` is plain content, passed through as it streams. One that starts like a call is
held back until each object is complete; an object that is not ``{"name", "parameters"}`` (``arguments`` is
taken too), or text after the calls that is not another one, is handed out as content, as written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from inferneo.entrypoints.openai.tool_parsers.base import ParsedPiece, ToolCallParser
from inferneo.entrypoints.openai.tool_parsers.json_sequence import JsonObjectSequence

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolCallParser):
    """``{"name": ..., "parameters": {...}}`` objects separated by ``;``."""

    def __init__(self, schemas: Mapping[str, Any] | None = None) -> None:
        super().__init__(schemas)
        self._start = ""  # the answer until its first non-blank character decides what it is
        self._mode = "undecided"  # then "content" or "calls"
        self._calls = JsonObjectSequence(self, opener=None, separator=";", closer=None,
                                         arguments_keys=("parameters", "arguments"))

    def feed(self, text: str) -> ParsedPiece:
        if self._mode == "content":
            return ParsedPiece(text)
        if self._mode == "calls":
            return self._calls.feed(text)
        self._start += text
        head = self._start.lstrip()
        if head.startswith(PYTHON_TAG):
            head = head[len(PYTHON_TAG):].lstrip()
        elif PYTHON_TAG.startswith(head):
            return ParsedPiece()  # blank so far, or a part of the tag
        if not head:
            return ParsedPiece()
        if head[0] == "{":
            self._mode = "calls"
            return self._calls.feed(head)
        self._mode = "content"
        return ParsedPiece(self._start)

    def finish(self) -> ParsedPiece:
        if self._mode == "calls":
            return self._calls.finish()
        if self._mode == "undecided":
            return ParsedPiece(self._start)
        return ParsedPiece()
