"""Mistral's tool-call format (vLLM's ``--tool-call-parser mistral``), in both of its forms:

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": ..., "arguments": ...}]
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}

The first is written by Mistral 7B v0.3, Mixtral, Mistral Nemo and Small before 3.2 (tokenizers before v11), the
second by Mistral Small 3.2, Magistral and Devstral (v11 on; a ``[CALL_ID]id`` between the name and ``[ARGS]`` is
read past). ``[TOOL_CALLS]`` and ``[ARGS]`` are special tokens: the answer is decoded with them
(``keeps_special_tokens``). Text before the first ``[TOOL_CALLS]`` is the answer's ``content``; so is text after the
calls. What follows a ``[TOOL_CALLS]`` that is not a call (not JSON, no name, arguments that are not an object, or
cut short) stays in ``content`` as the model wrote it, marker included. A call goes out whole once it is complete
(in the first form, once the array closes).

Mistral's chat templates accept only tool-call ids of 9 letters and digits (they read them back in the
conversation's history), so this parser's calls get such ids.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Mapping
from typing import Any

from inferneo.entrypoints.openai.streamed_text import split_at_marker
from inferneo.entrypoints.openai.tool_parsers.base import ParsedPiece, ToolCallParser, call_of_value
from inferneo.entrypoints.openai.tool_parsers.json_scan import JsonEndScanner

TOOL_CALLS, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"

_ID_CHARACTERS = string.ascii_letters + string.digits
_NAME = re.compile(r"[\w.\-]+")
_CALL_ID_VALUE = re.compile(r"\w*")


class MistralToolParser(ToolCallParser):
    """``[TOOL_CALLS]`` followed by a JSON array of calls, or by ``name[ARGS]{...}``."""

    keeps_special_tokens = True

    def __init__(self, schemas: Mapping[str, Any] | None = None) -> None:
        super().__init__(schemas)
        self._held = ""  # text not handed out yet
        self._mode = "content"  # "content", then after a [TOOL_CALLS] "head", "json" or "named"
        self._gap = ""  # the whitespace before the open [TOOL_CALLS]: content again if no call follows
        self._scanner = JsonEndScanner()
        self._name = ""  # the named form's function name, once its [ARGS] is read
        self._args_at = 0  # where, in the held text, the named form's arguments start
        self._json_at = 0  # where, in the held text, the first form's JSON starts

    @classmethod
    def call_id(cls) -> str:
        """9 random letters and digits, the only ids Mistral's chat templates accept."""
        return "".join(random.choices(_ID_CHARACTERS, k=9))

    def feed(self, text: str) -> ParsedPiece:
        self._held += text
        out = ParsedPiece()
        while self._step(out):
            pass
        return out

    def _step(self, out: ParsedPiece) -> bool:
        """Reads what the held text decides; False once it needs more text."""
        if self._mode == "content":
            content, gap, self._held = split_at_marker(self._held, TOOL_CALLS)
            out.content += content
            if gap is None:
                return False
            self._gap, self._mode = gap, "head"
            return True
        if self._mode == "head":
            start = len(self._held) - len(self._held.lstrip())
            if start == len(self._held):
                return False
            if self._held[start] in "[{":
                self._mode, self._json_at, self._scanner = "json", start, JsonEndScanner()
            else:
                self._mode = "named"
            return True
        if self._mode == "json":
            value = self._held[self._json_at:]
            end = self._scanner.scan(value)
            if end is None:
                return False
            calls = _json_calls(value[:end])
            if calls is None:
                return self._not_a_call(out)
            out.calls.extend(self.whole_call(*call) for call in calls)
            self._held, self._mode = value[end:], "content"
            return True
        # named: the function's name up to [ARGS], then the arguments object
        if not self._name:
            head = _named_head(self._held)
            if head is None:
                return self._not_a_call(out)
            if not head:
                return False
            self._name, self._args_at = head
            self._scanner = JsonEndScanner()
        arguments = self._held[self._args_at:]
        start = len(arguments) - len(arguments.lstrip())
        if start == len(arguments):
            return False
        if arguments[start] != "{":
            return self._not_a_call(out)
        end = self._scanner.scan(arguments[start:])
        if end is None:
            return False
        value = _json_object(arguments[start:start + end])
        if value is None:
            return self._not_a_call(out)
        out.calls.append(self.whole_call(self._name, value))
        self._held, self._mode, self._name = arguments[start + end:], "content", ""
        return True

    def _not_a_call(self, out: ParsedPiece) -> bool:
        """What followed the open ``[TOOL_CALLS]`` is no call: it, the marker and the blank before it are content,
        as written; reading goes on after them."""
        out.content += self._gap + TOOL_CALLS
        self._gap, self._mode, self._name = "", "content", ""
        return True

    def finish(self) -> ParsedPiece:
        held, self._held = self._held, ""
        if self._mode != "content":  # a [TOOL_CALLS] whose call never ended
            return ParsedPiece(self._gap + TOOL_CALLS + held)
        return ParsedPiece(held if self.num_calls == 0 or held.strip() else "")


def _json_calls(text: str) -> list[tuple[str, Any]] | None:
    """The calls of the first form (an array of ``{"name", "arguments"}`` objects, or one such object), or None."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    calls: list[tuple[str, Any]] = []
    for item in value if isinstance(value, list) else [value]:
        call = call_of_value(item, ("arguments",))
        if call is None:
            return None
        calls.append(call)
    return calls or None


def _json_object(text: str) -> dict[str, Any] | None:
    """``text`` read as a JSON object, or None when it is not one."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _named_head(text: str) -> tuple[str, int] | tuple[()] | None:
    """The second form's ``name[ARGS]`` (optionally ``name[CALL_ID]id[ARGS]``) at the start of ``text``: the name
    and where the arguments start; ``()`` while the text so far may still become one; None when it cannot."""
    blank = len(text) - len(text.lstrip())
    name = _NAME.match(text, blank)
    if name is None:
        return () if blank == len(text) else None
    pos = name.end()
    if text.startswith(CALL_ID, pos):
        pos = _CALL_ID_VALUE.match(text, pos + len(CALL_ID)).end()
    rest = text[pos:]
    if rest.startswith(ARGS):
        return name.group(), pos + len(ARGS)
    if not rest or ARGS.startswith(rest) or (pos == name.end() and CALL_ID.startswith(rest)):
        return ()
    return None
