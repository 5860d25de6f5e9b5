"""The answers a grammar forces when ``tool_choice`` is ``required`` or names a function.

- a named function: the answer is the function's arguments, a JSON object (the grammar is the function's
  ``parameters`` schema); every piece of text is a piece of one call's arguments, streamed as it comes;
- ``required``: the answer is a JSON array of ``{"name": ..., "parameters": {...}}`` objects (the grammar is
  ``required_calls_schema``); each call goes out whole once its object is complete.
"""

from __future__ import annotations

import json
import re
from typing import Any

from inferneo.entrypoints.openai.tool_parsers.base import ParsedPiece, ToolCallParser, ToolCallPiece
from inferneo.entrypoints.openai.tool_parsers.json_sequence import JsonObjectSequence


class NamedFunctionParser(ToolCallParser):
    """The whole answer is the arguments of a call to ``name``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    def feed(self, text: str) -> ParsedPiece:
        if not text:
            return ParsedPiece()
        if self.num_calls == 0:
            self.num_calls = 1
            return ParsedPiece(calls=[ToolCallPiece(0, self._name, text)])
        return ParsedPiece(calls=[ToolCallPiece(0, None, text)])

    def finish(self) -> ParsedPiece:
        if self.num_calls:
            return ParsedPiece()
        self.num_calls = 1  # an empty answer is still the one call, with empty arguments
        return ParsedPiece(calls=[ToolCallPiece(0, self._name, "")])


class RequiredCallsParser(ToolCallParser):
    """The answer is ``[{"name": ..., "parameters": {...}}, ...]``."""

    def __init__(self) -> None:
        super().__init__()
        self._calls = JsonObjectSequence(self, opener="[", separator=",", closer="]",
                                         arguments_keys=("parameters",))

    def feed(self, text: str) -> ParsedPiece:
        return self._calls.feed(text)

    def finish(self) -> ParsedPiece:
        """The calls' array cut short (the length limit): a call whose name is complete comes out with the
        arguments written so far, as a named function's call does; what precedes a name is dropped. The grammar's
        JSON is never content."""
        piece = self._calls.finish()
        partial = _PARTIAL_CALL.match(piece.content.strip())
        piece.content = ""
        if partial is not None:
            name = json.loads(f'"{partial["name"]}"')
            piece.calls.append(ToolCallPiece(self.num_calls, name, partial["arguments"]))
            self.num_calls += 1
        return piece


# The start of one call object of the required array, as the grammar writes it (name first), up to where it stops.
_PARTIAL_CALL = re.compile(r'\{\s*"name"\s*:\s*"(?P<name>(?:[^"\\]|\\.)*)"\s*,\s*"parameters"\s*:\s*(?P<arguments>.*)',
                           re.DOTALL)


def required_calls_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON schema of an answer to ``tool_choice: "required"``: an array of at least one call (at most one
    unless ``parallel``), each ``{"name": <a tool's name>, "parameters": <that tool's parameters>}``.

    ``tools`` are the request's function definitions (``{"name", "parameters"}``); a function without
    ``parameters`` takes an empty object. A tool's schema that refers to parts of itself (``$ref`` to ``#`` or
    ``#/$defs/...``, as pydantic writes nested models) is kept whole under the root's ``$defs`` with its
    references re-rooted there, so that they resolve inside the larger schema."""
    definitions: dict[str, Any] = {}
    calls = []
    for i, tool in enumerate(tools):
        parameters = function_parameters(tool.get("parameters"))
        if _has_local_refs(parameters):
            key = f"inferneo_tool_{i}"
            definitions[key] = _rebase_refs(parameters, f"#/$defs/{key}")
            parameters = {"$ref": f"#/$defs/{key}"}
        calls.append({
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [tool["name"]]}, "parameters": parameters},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        })
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    if definitions:
        schema["$defs"] = definitions
    return schema


def function_parameters(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """A function's ``parameters`` schema; none means it takes no arguments: an empty object. A schema that does not
    say what it is (``{}``, or properties without ``"type"``) describes an object: a call's arguments are always
    one."""
    if parameters is None:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    if isinstance(parameters, dict) and not _SCHEMA_KIND_KEYS & parameters.keys():
        return {"type": "object", **parameters}
    return parameters


# Keywords that say what a schema accepts; a parameters schema with none of them is taken to be an object's.
_SCHEMA_KIND_KEYS = frozenset({"type", "$ref", "anyOf", "oneOf", "allOf", "enum", "const", "not"})


def _is_local_ref(ref: Any) -> bool:
    """Whether a ``$ref`` value points into its own document (``#`` or ``#/...``)."""
    return isinstance(ref, str) and (ref == "#" or ref.startswith("#/"))


def _has_local_refs(schema: Any) -> bool:
    """Whether ``schema`` holds a ``$ref`` into its own document."""
    if isinstance(schema, dict):
        return _is_local_ref(schema.get("$ref")) or any(_has_local_refs(v) for v in schema.values())
    if isinstance(schema, list):
        return any(_has_local_refs(v) for v in schema)
    return False


def _rebase_refs(schema: Any, root: str) -> Any:
    """A copy of ``schema`` whose document-local references (``#``, ``#/...``) point below ``root`` instead."""
    if isinstance(schema, dict):
        out = {k: _rebase_refs(v, root) for k, v in schema.items()}
        if _is_local_ref(schema.get("$ref")):
            out["$ref"] = root + schema["$ref"][1:]
        return out
    if isinstance(schema, list):
        return [_rebase_refs(v, root) for v in schema]
    return schema
