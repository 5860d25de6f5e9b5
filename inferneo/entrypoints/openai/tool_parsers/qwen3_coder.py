"""Qwen3-Coder's XML tool-call format (vLLM's ``--tool-call-parser qwen3_coder``): each call a block

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

Parameter values are written untyped, so each is read by the type the request's tool gives that parameter (its
``parameters`` schema): a ``string`` (or an unknown parameter, or a tool the request does not have) stays the text
as written; ``integer`` and ``number`` are read as numbers (a whole number as an integer), ``boolean`` as ``true``/``false``, ``object`` and
``array`` as JSON (or a Python literal); ``null`` reads as null for any type but a string, and for a string that
may be null. A value that does not read as its type stays text. One newline after ``<parameter=...>`` and one
before ``</parameter>`` are the format's, not the value's.

A block ends at a ``</tool_call>`` that follows ``</function>`` (blanks between), so code in a value may hold
either tag alone; a value ends at the first ``</parameter>`` followed by the next parameter or ``</function>``. An answer
that stops right after ``</function>`` without ``</tool_call>`` still made its call. Text before the first block is
``content``, as is text after the calls; a block that is not a call (no ``<function=...>``, text outside its
parameters) or that the answer leaves unfinished stays in ``content`` as written, and so does a stray
``<tool_call>`` before a block (the block after it is still read). A call goes out whole when its
block closes.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from inferneo.entrypoints.openai.streamed_text import split_at_marker
from inferneo.entrypoints.openai.tool_parsers.base import ParsedPiece, ToolCallParser

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FUNCTION_END, PARAMETER, PARAMETER_END = "</function>", "<parameter=", "</parameter>"

_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>")
_STRING_TYPES = frozenset({"string", "str", "text", "varchar", "char", "enum"})


class Qwen3CoderToolParser(ToolCallParser):
    """``<tool_call><function=NAME><parameter=P>value</parameter>...</function></tool_call>`` blocks."""

    def __init__(self, schemas: Mapping[str, Any] | None = None) -> None:
        super().__init__(schemas)
        self._held = ""  # text not handed out yet (in a block: the block's text after <tool_call>)
        self._in_block = False
        self._gap = ""  # the whitespace before the open block: content again if the block is not a call

    def feed(self, text: str) -> ParsedPiece:
        self._held += text
        out = ParsedPiece()
        while True:
            if self._in_block:
                end = _block_end(self._held)
                if end is None:
                    return out
                body, close = end
                self._close_block(out, self._held[:body], self._held[:close])
                self._held = self._held[close:]
                continue
            content, gap, self._held = split_at_marker(self._held, OPEN)
            out.content += content
            if gap is None:
                return out
            self._gap, self._in_block = gap, True

    def finish(self) -> ParsedPiece:
        held, self._held = self._held, ""
        out = ParsedPiece()
        if self._in_block:  # no </tool_call>: a call still if the answer stopped right after </function>
            stripped = held.rstrip()
            if stripped.endswith(FUNCTION_END):
                self._close_block(out, stripped, held)
            else:
                out.content += self._gap + OPEN + held
            return out
        out.content += held if self.num_calls == 0 or held.strip() else ""
        return out

    def _close_block(self, out: ParsedPiece, body: str, written: str) -> None:
        """The block whose text (after ``<tool_call>``) up to its end is ``body`` (``written``: with its closing
        tag): a call, or content as written."""
        self._in_block = False
        call = self._call(body)
        inner = body.rfind(OPEN) if call is None else -1
        if inner >= 0:  # a stray tag opened earlier: it and the text after it are content, as written
            stray = body[:inner]
            kept = stray.rstrip()
            out.content += self._gap + OPEN + kept
            self._gap, body, written = stray[len(kept):], body[inner + len(OPEN):], written[inner + len(OPEN):]
            call = self._call(body)
        if call is None:
            out.content += self._gap + OPEN + written
        else:
            out.calls.append(self.whole_call(*call))

    def _call(self, body: str) -> tuple[str, dict[str, Any]] | None:
        """The call that a block's text (up to and with its ``</function>``) writes, or None."""
        function = _FUNCTION.match(body)
        if function is None or not body.rstrip().endswith(FUNCTION_END):
            return None
        name = function.group(1).strip()
        inner = body.rstrip()[function.end():-len(FUNCTION_END)]
        raw = _parameters(inner)
        if not name or raw is None:
            return None
        schema = self.schemas.get(name)
        properties = schema.get("properties") if isinstance(schema, dict) else None
        properties = properties if isinstance(properties, dict) else {}
        return name, {key: _typed(value, properties.get(key)) for key, value in raw.items()}


def _block_end(text: str) -> tuple[int, int] | None:
    """Where a block ends in its text so far: the index just past its ``</function>`` and just past the
    ``</tool_call>`` after it; None until both have arrived."""
    at = 0
    while (found := text.find(FUNCTION_END, at)) >= 0:
        past = found + len(FUNCTION_END)
        rest = text[past:]
        blank = len(rest) - len(rest.lstrip())
        if rest.startswith(CLOSE, blank):
            return past, past + blank + len(CLOSE)
        if CLOSE.startswith(rest[blank:]):  # the tag may still come
            return None
        at = past
    return None


def _parameters(inner: str) -> dict[str, str] | None:
    """The parameters (name -> value as written) between ``<function=...>`` and ``</function>``, or None when
    that text is not a run of ``<parameter=...>...</parameter>`` blocks."""
    values: dict[str, str] = {}
    pos = 0
    while True:
        pos = len(inner) - len(inner[pos:].lstrip())
        if pos == len(inner):
            return values
        if not inner.startswith(PARAMETER, pos):
            return None
        close = inner.find(">", pos)
        if close < 0:
            return None
        name = inner[pos + len(PARAMETER):close].strip()
        start = close + 1
        end = _parameter_end(inner, start)
        if not name or end < 0:
            return None
        value = inner[start:end]
        value = value[1:] if value.startswith("\n") else value
        values[name] = value[:-1] if value.endswith("\n") else value
        pos = end + len(PARAMETER_END)


def _parameter_end(inner: str, start: int) -> int:
    """The index of the ``</parameter>`` that ends a value starting at ``start``: the first one followed (blanks
    between) by another parameter or by the end of the function; -1 when there is none."""
    at = start
    while (found := inner.find(PARAMETER_END, at)) >= 0:
        rest = inner[found + len(PARAMETER_END):].lstrip()
        if not rest or rest.startswith(PARAMETER):
            return found
        at = found + 1
    return -1


def _typed(value: str, schema: Any) -> Any:
    """A parameter's text read by the type its ``schema`` gives (see the module's description)."""
    kind, nullable = _kind(schema)
    if nullable and value.strip().lower() in ("null", "none"):
        return None
    if kind is None or kind in _STRING_TYPES:
        return value
    text = value.strip()
    if text.lower() in ("null", "none"):
        return None
    try:
        if kind.startswith(("int", "uint", "long", "short", "unsigned")):
            return int(text)
        if kind.startswith(("num", "float", "double")):
            number = float(text)
            if not math.isfinite(number):
                return value
            return int(number) if number.is_integer() else number  # 3.0 reads as 3, as vLLM reads it
        if kind in ("boolean", "bool", "binary"):
            return {"true": True, "false": False}[text.lower()]
    except (ValueError, KeyError, OverflowError):
        return value
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    try:
        literal = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value
    return literal if _is_json_value(literal) else value


def _kind(schema: Any) -> tuple[str | None, bool]:
    """The type a parameter's schema gives (its first other than null, lower case; None when it gives none), and
    whether it admits null."""
    if not isinstance(schema, dict):
        return None, False
    options: list[Any] = []
    if "type" in schema:
        options = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    else:
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list):
                options = [o.get("type") for o in schema[key] if isinstance(o, dict) and "type" in o]
                break
    kinds = [str(o).strip().lower() for o in options if o is not None]
    nullable = "null" in kinds
    kinds = [k for k in kinds if k != "null"]
    if not kinds:
        return ("string" if options or "anyOf" in schema or "oneOf" in schema else None), nullable
    return kinds[0], nullable


def _is_json_value(value: Any) -> bool:
    """Whether a Python literal is one JSON can write (no tuples, sets, bytes, complex numbers)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return not isinstance(value, float) or value == value and abs(value) != float("inf")
    if isinstance(value, list):
        return all(map(_is_json_value, value))
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json_value(v) for k, v in value.items())
    return False
