"""Tool calls in generated text: one module per format, chosen by ``--tool-call-parser``.

- :mod:`.hermes`: Hermes / Qwen ``<tool_call>{...}</tool_call>`` blocks;
- :mod:`.llama3_json`: Llama 3.1's ``{"name": ..., "parameters": {...}}`` objects;
- :mod:`.mistral`: Mistral's ``[TOOL_CALLS]`` calls (a JSON array, or ``name[ARGS]{...}`` from tokenizer v11 on);
- :mod:`.qwen3_coder`: Qwen3-Coder's XML ``<function=...><parameter=...>`` blocks, typed by the tools' schemas;
- :mod:`.pythonic`: Llama 3.2 / 4 pythonic templates' ``[name(key=value), ...]``;
- :mod:`.deepseek`: DeepSeek-V3 / R1 (``deepseek_v3``) and V3.1 (``deepseek_v31``) calls between their markers;
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
from inferneo.entrypoints.openai.tool_parsers.deepseek import DeepSeekV3ToolParser, DeepSeekV31ToolParser
from inferneo.entrypoints.openai.tool_parsers.forced import (
    NamedFunctionParser,
    RequiredCallsParser,
    function_parameters,
    required_calls_schema,
)
from inferneo.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from inferneo.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser
from inferneo.entrypoints.openai.tool_parsers.mistral import MistralToolParser
from inferneo.entrypoints.openai.tool_parsers.openai import OpenAIToolParser
from inferneo.entrypoints.openai.tool_parsers.pythonic import PythonicToolParser
from inferneo.entrypoints.openai.tool_parsers.qwen3_coder import Qwen3CoderToolParser

TOOL_CALL_PARSERS: dict[str, type[ToolCallParser]] = {
    "deepseek_v3": DeepSeekV3ToolParser,
    "deepseek_v31": DeepSeekV31ToolParser,
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
    "openai": OpenAIToolParser,
    "pythonic": PythonicToolParser,
    "qwen3_coder": Qwen3CoderToolParser,
}
"""The formats ``--tool-call-parser`` names (``none`` turns parsing off: tool calls stay in ``content``)."""


def default_parser_name(chat_template: str | None) -> str | None:
    """The parser a chat template implies, the first that fits of: ``openai`` for harmony templates (gpt-oss:
    ``<|channel|>``); ``deepseek_v3`` for DeepSeek's ``<｜tool▁calls▁begin｜>`` with fenced JSON arguments (V3, R1),
    ``deepseek_v31`` for it with bare ones (V3.1); ``mistral`` for one that writes ``[TOOL_CALLS]``;
    ``qwen3_coder`` for ``<tool_call>`` with ``<function=`` (Qwen3-Coder's XML); ``hermes`` for other
    ``<tool_call>`` templates (Hermes, Qwen 2.5 and 3); ``pythonic`` for one that asks for
    ``[func_name1(params_name1=...)]`` (vLLM's pythonic Llama templates); ``llama3_json`` for Llama 3.1-style
    templates (``<|python_tag|>``, the ``ipython`` role, or a call written with ``"parameters"``); None otherwise
    (tool calls, if any, stay in ``content``)."""
    template = chat_template or ""
    if "<|channel|>" in template:
        return "openai"
    if "<｜tool▁calls▁begin｜>" in template:
        return "deepseek_v3" if "```json" in template else "deepseek_v31"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<tool_call>" in template:
        return "qwen3_coder" if "<function=" in template else "hermes"
    if "func_name1(" in template:
        return "pythonic"
    if "<|python_tag|>" in template or "ipython" in template or '"parameters"' in template:
        return "llama3_json"
    return None


__all__ = [
    "TOOL_CALL_PARSERS", "DeepSeekV31ToolParser", "DeepSeekV3ToolParser", "HermesToolParser", "Llama3JsonToolParser",
    "MistralToolParser", "NamedFunctionParser", "OpenAIToolParser", "PythonicToolParser", "Qwen3CoderToolParser",
    "ParsedCall", "ParsedPiece", "RequiredCallsParser", "ToolCallParser", "ToolCallPiece", "calls_of",
    "default_parser_name",
    "function_parameters", "parse_all", "required_calls_schema",
]
