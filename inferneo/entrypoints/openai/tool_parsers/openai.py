"""gpt-oss's tool calls (vLLM's ``--tool-call-parser openai``): harmony messages addressed ``to=functions.NAME``.

They are part of the answer's channel structure, so the ``openai_gptoss`` reasoning parser reads them (see
``entrypoints.openai.harmony``) and this parser has nothing left to read: the content it is given stays content.
It goes only with that reasoning parser.
"""

from __future__ import annotations

from inferneo.entrypoints.openai.tool_parsers.base import ParsedPiece, ToolCallParser


class OpenAIToolParser(ToolCallParser):
    """Content passed on as it is: the harmony splitter hands out the calls."""

    def feed(self, text: str) -> ParsedPiece:
        return ParsedPiece(text)

    def finish(self) -> ParsedPiece:
        return ParsedPiece()
