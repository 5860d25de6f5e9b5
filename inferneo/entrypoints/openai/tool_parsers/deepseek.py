"""DeepSeek's tool-call formats: the calls sit between ``<｜tool▁calls▁begin｜>`` and ``<｜tool▁calls▁end｜>``,
each between ``<｜tool▁call▁begin｜>`` and ``<｜tool▁call▁end｜>``. Inside a call,

- ``deepseek_v3`` (DeepSeek-V3, R1 and its 0528 update): ``function<｜tool▁sep｜>NAME`` and the arguments in a
  fenced JSON block, ``\\n```json\\n{...}\\n```\\n``;
- ``deepseek_v31`` (DeepSeek-V3.1 and its Terminus update): ``NAME<｜tool▁sep｜>{...}``, the arguments' JSON bare.

Text before the calls is the answer's ``content``, and so is text after ``<｜tool▁calls▁end｜>``. A call that does
not read as its format's (no name, arguments that are not a JSON object), something other than a call between the
calls, or calls the answer leaves unfinished, end the calls: the rest of the answer is ``content`` as written (with
the opening marker when no call came before). A call goes out whole once its ``<｜tool▁call▁end｜>`` arrives.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from inferneo.entrypoints.openai.streamed_text import split_at_marker
from inferneo.entrypoints.openai.tool_parsers.base import ParsedPiece, ToolCallParser

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"

# DeepSeek-V3's call: its type (always "function"), the name, and the arguments in a fenced JSON block
_V3_CALL = re.compile(r"\s*function\s*" + SEP + r"\s*(?P<name>[^\n]+?)\s*\n```(?:json)?\s*\n(?P<arguments>.*)\n```\s*",
                      re.DOTALL)
# DeepSeek-V3.1's call: the name, then the arguments' JSON
_V31_CALL = re.compile(r"\s*(?P<name>[^\n" + SEP[0] + r"]+?)\s*" + SEP + r"(?P<arguments>.*)", re.DOTALL)


class DeepSeekV3ToolParser(ToolCallParser):
    """DeepSeek-V3's calls: ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```<｜tool▁call▁end｜>``."""

    _call_pattern = _V3_CALL

    def __init__(self, schemas: Mapping[str, Any] | None = None) -> None:
        super().__init__(schemas)
        self._held = ""  # text not handed out yet
        self._mode = "content"  # then "calls" (after <｜tool▁calls▁begin｜>), or "failed" (all content from here)
        self._opening = ""  # the blank before <｜tool▁calls▁begin｜> and the marker: content if no call follows
        self._calls_here = 0  # calls read since the last <｜tool▁calls▁begin｜>

    def feed(self, text: str) -> ParsedPiece:
        if self._mode == "failed":
            return ParsedPiece(text)
        self._held += text
        out = ParsedPiece()
        while True:
            if self._mode == "content":
                content, gap, self._held = split_at_marker(self._held, CALLS_BEGIN)
                out.content += content
                if gap is None:
                    return out
                self._opening, self._mode, self._calls_here = gap + CALLS_BEGIN, "calls", 0
                continue
            rest = self._held.lstrip()
            if rest.startswith(CALLS_END):
                self._held, self._mode = rest[len(CALLS_END):], "content"
                continue
            if rest.startswith(CALL_BEGIN):
                end = rest.find(CALL_END)
                if end < 0:
                    return out
                call = self._call(rest[len(CALL_BEGIN):end])
                if call is None:
                    return self._fail(out)
                out.calls.append(self.whole_call(*call))
                self._calls_here += 1
                self._held = rest[end + len(CALL_END):]
                continue
            if not rest or CALL_BEGIN.startswith(rest) or CALLS_END.startswith(rest):
                return out
            return self._fail(out)

    def finish(self) -> ParsedPiece:
        held, self._held = self._held, ""
        if self._mode == "calls":  # the calls never ended
            return ParsedPiece(("" if self._calls_here else self._opening) + held)
        return ParsedPiece(held if self.num_calls == 0 or held.strip() else "")

    def _fail(self, out: ParsedPiece) -> ParsedPiece:
        """What follows in the calls is not a call: it and the rest of the answer are content, as written."""
        out.content += ("" if self._calls_here else self._opening) + self._held
        self._held, self._mode = "", "failed"
        return out

    def _call(self, body: str) -> tuple[str, dict[str, Any]] | None:
        """The call written between ``<｜tool▁call▁begin｜>`` and ``<｜tool▁call▁end｜>``, or None."""
        match = self._call_pattern.fullmatch(body)
        if match is None:
            return None
        try:
            arguments = json.loads(match["arguments"])
        except (ValueError, RecursionError):
            return None
        name = match["name"].strip()
        return (name, arguments) if name and isinstance(arguments, dict) else None


class DeepSeekV31ToolParser(DeepSeekV3ToolParser):
    """DeepSeek-V3.1's calls: ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>``."""

    _call_pattern = _V31_CALL
