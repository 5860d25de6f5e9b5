"""Where a JSON object or array ends in text that is still arriving, without parsing it."""

from __future__ import annotations


class JsonStrings:
    """Which characters of JSON text, fed one at a time in order, lie inside strings."""

    def __init__(self) -> None:
        self.in_string = False
        self.escaped = False

    def inside(self, ch: str) -> bool:
        """Whether ``ch``, the text's next character, belongs to a string (its quotes included)."""
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
            return True
        if ch == '"':
            self.in_string = True
            return True
        return False


class JsonEndScanner:
    """Follows brackets and strings through text that starts with ``{`` or ``[``; ``scan`` reports the end of
    that value once it has arrived. Each character is looked at once, however the text is cut into pieces."""

    def __init__(self) -> None:
        self.pos = 0  # the next character of the text to look at
        self.depth = 0
        self.strings = JsonStrings()

    def scan(self, text: str) -> int | None:
        """The index just past the value that ``text`` (everything so far, from the value's first character)
        starts with, or None while it is incomplete."""
        while self.pos < len(text):
            ch = text[self.pos]
            self.pos += 1
            if self.strings.inside(ch):
                continue
            if ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return self.pos
        return None
