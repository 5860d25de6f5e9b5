"""A run of JSON call objects in text that is still arriving: ``[opener] {...} (separator {...})* [closer]``,
blanks allowed between them. Each object ``{"name": ..., <arguments key>: {...}}`` becomes a tool call as soon as
it is complete; anything else ends the run, and the rest of the text is content, as written."""

from __future__ import annotations

from inferneo.entrypoints.openai.tool_parsers.base import ParsedPiece, ToolCallParser, call_of
from inferneo.entrypoints.openai.tool_parsers.json_scan import JsonEndScanner


class JsonObjectSequence:
    """Calls read from a sequence of JSON objects, numbered by the ``parser`` that owns the sequence."""

    def __init__(self, parser: ToolCallParser, opener: str | None, separator: str, closer: str | None,
                 arguments_keys: tuple[str, ...]) -> None:
        self._parser = parser
        self._opener, self._separator, self._closer = opener, separator, closer
        self._keys = arguments_keys
        self._text = ""  # what has arrived and is not decided yet
        self._state = "open" if opener else "object"  # then "in_object", "after", "done" or "failed"
        self._scanner = JsonEndScanner()

    def feed(self, text: str) -> ParsedPiece:
        if self._state == "failed":
            return ParsedPiece(text)
        self._text += text
        out = ParsedPiece()
        while True:
            if self._state == "in_object":
                end = self._scanner.scan(self._text)
                if end is None:
                    return out
                call = call_of(self._text[:end], self._keys)
                if call is None:
                    return self._fail(out)
                out.calls.append(self._parser.whole_call(*call))
                self._text = self._text[end:]
                self._state = "after"
                continue
            rest = self._text.lstrip()
            if not rest:
                return out
            ch = rest[0]
            if self._state == "open" and ch == self._opener:
                self._state, self._text = "object", rest[1:]
            elif self._state == "object" and ch == "{":
                self._state, self._text, self._scanner = "in_object", rest, JsonEndScanner()
            elif self._state == "after" and ch == self._separator:
                self._state, self._text = "object", rest[1:]
            elif self._state == "after" and ch == self._closer:
                self._state, self._text = "done", rest[1:]
            else:
                return self._fail(out)

    def finish(self) -> ParsedPiece:
        """What is left: an unfinished object, or text after the calls, as content."""
        text, self._text = self._text, ""
        if self._state == "in_object" or text.strip():
            return ParsedPiece(text)
        return ParsedPiece()

    def _fail(self, out: ParsedPiece) -> ParsedPiece:
        self._state = "failed"
        out.content += self._text
        self._text = ""
        return out
