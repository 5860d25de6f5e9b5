"""Tool calls in generated text: one module per format, chosen by ``--tool-call-parser``.

- :mod:`.hermes`: Hermes / Qwen ``<tool_call>{...}</tool_call>`` blocks;
- :mod:`.llama3_json`: Llama 3.1's ``{"name": ..., "parameters": {...}}`` objects;
- :mod:`.openai`: gpt-oss's harmony calls, read by the ``openai_gptoss`` reasoning parser (this name goes with it);
- :mod:`.forced`: the answers a grammar forces for ``tool_choice`` ``required`` or a named function.

With ``tool_choice: "auto"`` the server reads the model's own format with the parser the flag names; without the
flag, ``default_parser_name`` picks one from the chat template.
"""

from __future__ import annotations

from inferneo.entrypoints.openai.tool_parsers.base import (
    ParsedCall,
    ParsedPiece,
    ToolCallParser,
    ToolCallPiece,
    calls_of,
    parse_all,
)
from inferneo.entrypoints.openai.tool_parsers.forced import (
    NamedFunctionParser,
    RequiredCallsParser,
    function_parameters,
    required_calls_schema,
)
from inferneo.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from inferneo.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser
from inferneo.entrypoints.openai.tool_parsers.openai import OpenAIToolParser

TOOL_CALL_PARSERS: dict[str, type[ToolCallParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "openai": OpenAIToolParser,
}
"""The formats ``--tool-call-parser`` names (``none`` turns parsing off: tool calls stay in ``content``)."""


def default_parser_name(chat_template: str | None) -> str | None:
    """The parser a chat template implies: ``hermes`` for one that writes ``<tool_call>`` (Hermes, Qwen 2.5 and
    3); ``llama3_json`` for Llama 3.1-style templates (``<|python_tag|>``, the ``ipython`` role, or a call
    written with ``"parameters"``); ``openai`` for harmony templates (gpt-oss: ``<|channel|>``); None otherwise (tool
    calls, if any, stay in ``content``)."""
    template = chat_template or ""
    if "<|channel|>" in template:
        return "openai"
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "ipython" in template or '"parameters"' in template:
        return "llama3_json"
    return None


__all__ = [
    "TOOL_CALL_PARSERS", "HermesToolParser", "Llama3JsonToolParser", "NamedFunctionParser", "OpenAIToolParser",
    "ParsedCall", "ParsedPiece", "RequiredCallsParser", "ToolCallParser", "ToolCallPiece", "calls_of",
    "default_parser_name",
    "function_parameters", "parse_all", "required_calls_schema",
]
