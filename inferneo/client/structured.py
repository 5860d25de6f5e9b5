"""Structured answers: the ``response_format`` sent for a pydantic model (or any type pydantic can describe, or a
JSON schema), and the parsing of each answer back into that type.

::

    class Person(BaseModel):
        name: str
        age: int

    fmt = OutputFormat.of(Person)
    fmt.response_format   # {"type": "json_schema", "json_schema": {"name": "Person", "schema": {...}, "strict": True}}
    fmt.parse('{"name": "Ada", "age": 36}', "stop")   # Person(name='Ada', age=36)

A model or other type parses into validated instances of it; a JSON schema (a ``dict``) parses into plain JSON
values, validated against the schema when the ``jsonschema`` package is installed. An answer that does not
parse or validate raises :class:`~inferneo.client.errors.StructuredOutputError` (a
:class:`~inferneo.client.errors.LengthFinishReasonError` when ``max_tokens`` cut it off).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from inferneo.client.errors import LengthFinishReasonError, StructuredOutputError
from inferneo.client.types import (
    ChatCompletion,
    ChatCompletionChoice,
    Completion,
    CompletionChoice,
    ParsedChatCompletion,
    ParsedCompletion,
)

__all__ = ["OutputFormat", "ResponseFormatInput", "function_tool", "parse_chat_completion", "parse_choice",
           "parse_completion", "split_tools"]

# What ``response_format=`` takes: a pydantic model class (or another type pydantic can describe: a dataclass,
# a TypedDict, ``list[Model]``, ...), a JSON schema, or a wire ``response_format`` dict.
ResponseFormatInput = Any

_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_-]")


def _wire_name(name: str) -> str:
    """A schema name as OpenAI's API accepts it: letters, digits, ``_`` and ``-``, at most 64 characters."""
    return _NAME_CHARS.sub("_", name)[:64] or "response"


def _is_response_format(spec: Mapping[str, Any]) -> bool:
    kind = spec.get("type")
    return (kind == "json_schema" and isinstance(spec.get("json_schema"), Mapping)) or (
        kind == "json_object" and set(spec) == {"type"}) or (kind == "text" and set(spec) == {"type"})


def _schema_checker(schema: Mapping[str, Any] | None) -> Callable[[Any], None]:
    """A function that raises when a JSON value does not match ``schema``; a no-op without ``jsonschema``."""
    if schema is None:
        return lambda value: None
    try:
        import jsonschema
    except ImportError:  # the client's own dependencies do not include it
        return lambda value: None
    validator_cls = jsonschema.validators.validator_for(schema)
    validator = validator_cls(schema)

    def check(value: Any) -> None:
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "the value"
            raise ValueError(f"{where}: {error.message}")

    return check


class OutputFormat:
    """What a structured answer must be (``response_format``, the wire value to send) and how to read one
    (:meth:`parse`). Build it with :meth:`of`."""

    def __init__(self, response_format: dict[str, Any], load: Callable[[str], Any], description: str) -> None:
        self.response_format = response_format
        self._load = load
        self.description = description

    @classmethod
    def of(cls, spec: ResponseFormatInput, *, name: str | None = None, strict: bool = True) -> OutputFormat:
        """The format for ``spec``: a pydantic model class or another type (answers parse into it), a JSON
        schema ``dict`` (answers are plain JSON values), or a ready ``response_format`` dict
        (``{"type": "json_schema", ...}`` or ``{"type": "json_object"}``). ``name`` defaults to the type's name
        or the schema's ``title``; ``strict`` is sent as ``json_schema.strict``."""
        if isinstance(spec, OutputFormat):
            return spec
        if isinstance(spec, Mapping):
            spec = dict(spec)
            if _is_response_format(spec):
                return cls._of_wire(spec)
            title = spec.get("title")
            return cls._of_schema(spec, name or (title if isinstance(title, str) else "response"), strict)
        if isinstance(spec, type) and issubclass(spec, BaseModel):
            model = spec
            return cls(cls._wire(model.model_json_schema(), name or model.__name__, strict),
                       model.model_validate_json, model.__name__)
        try:
            adapter: TypeAdapter[Any] = TypeAdapter(spec)
            schema = adapter.json_schema()
        except Exception as exc:  # pydantic's errors for a type it cannot describe vary
            raise TypeError(f"response_format must be a pydantic model, a type pydantic can describe, or a JSON "
                            f"schema dict; got {spec!r}") from exc
        label = getattr(spec, "__name__", None) or "response"
        return cls(cls._wire(schema, name or label, strict), adapter.validate_json, str(label))

    @staticmethod
    def _wire(schema: dict[str, Any], name: str, strict: bool) -> dict[str, Any]:
        return {"type": "json_schema", "json_schema": {"name": _wire_name(name), "schema": schema, "strict": strict}}

    @classmethod
    def _of_schema(cls, schema: dict[str, Any], name: str, strict: bool) -> OutputFormat:
        check = _schema_checker(schema)

        def load(text: str) -> Any:
            value = json.loads(text)
            check(value)
            return value

        return cls(cls._wire(schema, name, strict), load, "the JSON schema")

    @classmethod
    def _of_wire(cls, response_format: dict[str, Any]) -> OutputFormat:
        kind = response_format["type"]
        if kind == "text":
            return cls(response_format, lambda text: text, "text")
        schema = response_format["json_schema"].get("schema") if kind == "json_schema" else None
        check = _schema_checker(schema)

        def load(text: str) -> Any:
            value = json.loads(text)
            if kind == "json_object" and not isinstance(value, dict):
                raise ValueError(f"a JSON {type(value).__name__}, not an object")
            check(value)
            return value

        return cls(response_format, load, "a JSON object" if kind == "json_object" else "the JSON schema")

    def parse(self, content: str | None, finish_reason: str | None = None, index: int = 0) -> Any:
        """The answer ``content`` as this format's type. Raises :class:`LengthFinishReasonError` when
        ``finish_reason`` is ``"length"``, and :class:`StructuredOutputError` when it is ``"error"`` (the
        constraint reached a dead end: the content is only its start), when there is no content (the model called a
        tool instead) or when it does not parse or validate."""
        if finish_reason == "length":
            raise LengthFinishReasonError(
                f"choice {index} was cut off by max_tokens before its answer was complete; raise max_tokens or "
                "bound the schema's strings and arrays", content=content, finish_reason=finish_reason, index=index)
        if finish_reason == "error":
            raise StructuredOutputError(
                f"choice {index} ended at a dead end of its constraint (no token could follow {content!r}: the "
                "grammar, or the request's allowed_token_ids / bad_words, left none)", content=content,
                finish_reason=finish_reason, index=index)
        if content is None:
            raise StructuredOutputError(f"choice {index} has no content to parse (finish_reason "
                                        f"{finish_reason!r})", content=None, finish_reason=finish_reason,
                                        index=index)
        try:
            return self._load(content)
        except (ValueError, ValidationError) as exc:  # JSON, pydantic and schema errors
            raise StructuredOutputError(f"choice {index} is not valid for {self.description}: {exc}",
                                        content=content, finish_reason=finish_reason, index=index) from exc


def function_tool(model: type[BaseModel], *, name: str | None = None,
                  description: str | None = None) -> dict[str, Any]:
    """A ``tools`` entry for a function whose arguments are ``model``'s fields: ``{"type": "function",
    "function": {"name", "description", "parameters", "strict"}}`` (name: the class name; description: its
    docstring)."""
    doc = description if description is not None else (model.__doc__ or "").strip()
    function: dict[str, Any] = {"name": _wire_name(name or model.__name__), "parameters": model.model_json_schema(),
                                "strict": True}
    if doc:
        function["description"] = doc
    return {"type": "function", "function": function}


def split_tools(tools: Sequence[dict[str, Any] | type[BaseModel]] | None
                ) -> tuple[list[dict[str, Any]] | None, dict[str, OutputFormat]]:
    """``tools`` for the wire (pydantic model classes become :func:`function_tool` entries), and the format of
    each function's arguments by function name, for those given as models."""
    if tools is None:
        return None, {}
    wire: list[dict[str, Any]] = []
    formats: dict[str, OutputFormat] = {}
    for tool in tools:
        if isinstance(tool, type) and issubclass(tool, BaseModel):
            entry = function_tool(tool)
            formats[entry["function"]["name"]] = OutputFormat.of(tool)
            wire.append(entry)
        else:
            wire.append(tool)
    return wire, formats


def parse_chat_completion(completion: ChatCompletion, fmt: OutputFormat | None,
                          tool_formats: Mapping[str, OutputFormat] | None = None) -> ParsedChatCompletion[Any]:
    """``completion`` with each message's ``parsed`` (its content read with ``fmt``; ``None`` when the message
    calls tools instead, or without ``fmt``) and each tool call's ``parsed_arguments`` (for the functions in
    ``tool_formats``). Raises :class:`StructuredOutputError` for the first answer that does not parse."""
    parsed = ParsedChatCompletion[Any].model_validate(completion.model_dump())
    for choice in parsed.choices:
        message = choice.message
        for call in message.tool_calls or ():
            call_format = (tool_formats or {}).get(call.function.name)
            if call_format is not None:
                call.function.parsed_arguments = call_format.parse(call.function.arguments, None, choice.index)
        if fmt is not None:
            message.parsed = parse_choice(fmt, choice)
    return parsed


def parse_completion(completion: Completion, fmt: OutputFormat) -> ParsedCompletion[Any]:
    """``completion`` with each choice's ``parsed``, its text read with ``fmt``; raises
    :class:`StructuredOutputError` for the first choice that does not parse."""
    parsed = ParsedCompletion[Any].model_validate(completion.model_dump())
    for choice in parsed.choices:
        choice.parsed = parse_choice(fmt, choice)
    return parsed


def parse_choice(fmt: OutputFormat, choice: CompletionChoice | ChatCompletionChoice) -> Any:
    """One choice's answer (a completion's ``text``, a chat message's ``content``) read with ``fmt``; ``None``
    for a chat message that calls tools instead of answering."""
    if isinstance(choice, ChatCompletionChoice):
        if choice.message.tool_calls and choice.message.content is None:
            return None
        return fmt.parse(choice.message.content, choice.finish_reason, choice.index)
    return fmt.parse(choice.text, choice.finish_reason, choice.index)
