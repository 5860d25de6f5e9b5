"""A request's ``StructuredOutputsParams`` as an xgrammar ``Grammar``, and the up-front check of it."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

from inferneo.sampling_params import MAX_WHITESPACE_RUN, StructuredOutputsParams


class StructuredOutputError(ValueError):
    """A constraint the engine cannot use; ``param`` names the request field (e.g. ``structured_outputs.json``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def xgrammar():
    """The xgrammar module, or a clear error naming the extra that installs it."""
    try:
        import xgrammar as xgr
    except ImportError as e:  # pragma: no cover - the engine extra installs it
        raise StructuredOutputError(
            "structured output needs the xgrammar package: pip install 'inferneo[engine]'", "structured_outputs"
        ) from e
    return xgr


def build_grammar(params: StructuredOutputsParams):
    """The xgrammar ``Grammar`` of ``params``; raises ``StructuredOutputError`` naming the field when it is bad."""
    xgr = xgrammar()
    kind = params.kind
    field = f"structured_outputs.{kind}"
    try:
        if kind == "json":
            _check_enforceable(params.json if isinstance(params.json, (dict, bool)) else json.loads(params.json))
            return _strict_json_strings(xgr.Grammar.from_json_schema(params.spec, **_json_options(params)))
        if kind == "json_object":
            return _strict_json_strings(xgr.Grammar.from_json_schema('{"type": "object"}', **_json_options(params)))
        if kind == "regex":
            return xgr.Grammar.from_regex(params.regex)
        if kind == "choice":
            return xgr.Grammar.from_ebnf(choice_ebnf(params.choice))
        if kind == "grammar":
            return xgr.Grammar.from_ebnf(params.grammar)
        return xgr.Grammar.from_structural_tag(params.spec)
    except (RuntimeError, ValueError, TypeError) as e:
        raise StructuredOutputError(f"{field} cannot be used: {_xgrammar_message(e)}", field) from None


def check_structured_outputs(params: StructuredOutputsParams | None) -> None:
    """Raise ``StructuredOutputError`` (naming the field) unless the engine can compile ``params``.

    This parses the constraint (about a millisecond, no tokenizer); the core compiles it against the vocabulary
    later. The verdict is kept by constraint (the last ``MAX_CHECKED`` of them), so a batch of requests sharing
    one schema parses it once: on an H200, 128 requests with one ten-field schema spent 9% of a run parsing it.
    """
    if params is None:
        return
    key = params.key
    with _checked_lock:
        known = _checked.get(key, _UNKNOWN)
        if known is not _UNKNOWN:
            _checked.move_to_end(key)
    if known is _UNKNOWN:
        try:
            build_grammar(params)
            known = None
        except StructuredOutputError as e:
            known = (str(e), e.param)
        with _checked_lock:
            _checked[key] = known
            while len(_checked) > MAX_CHECKED:
                _checked.popitem(last=False)
    if known is not None:
        raise StructuredOutputError(*known)


MAX_CHECKED = 1024
_UNKNOWN = object()
_checked: OrderedDict[tuple, tuple[str, str] | None] = OrderedDict()
_checked_lock = threading.Lock()


def choice_ebnf(choices: list[str]) -> str:
    """An EBNF grammar whose sentences are exactly ``choices``."""
    return "root ::= " + " | ".join(_ebnf_literal(c) for c in choices)


def _ebnf_literal(text: str) -> str:
    out = []
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


# xgrammar (0.2.x) writes the characters of a JSON string as character classes that let through what JSON
# text may not hold: a length-bounded string (minLength / maxLength) takes "anything but a quote, a backslash, CR
# or LF", so raw control characters, which JSON forbids and strict parsers refuse; and every string takes the
# UTF-8 encodings of UTF-16 surrogates (U+D800-U+DFFF, not characters: they decode to three U+FFFD each, so a
# string can come out longer than its maxLength). Both classes are rewritten to refuse them.
_LOOSE_STRING_CHARACTERS = (r"[^\"\\\r\n]", r"[^\0-\x1f\"\\\r\n]")
_JSON_STRING_CHARACTER = r"[^\0-\x1f\"\\\uD800-\uDFFF]"


def _strict_json_strings(grammar):
    """``grammar`` with every JSON string character class refusing raw control characters and surrogates."""
    text = str(grammar)
    if not any(loose in text for loose in _LOOSE_STRING_CHARACTERS):
        return grammar
    for loose in _LOOSE_STRING_CHARACTERS:
        text = text.replace(loose, _JSON_STRING_CHARACTER)
    return xgrammar().Grammar.from_ebnf(text)


# Keywords xgrammar (0.2.x) accepts but does not enforce (it drops them, at most logging a warning), so an output
# could break the schema; such a schema is refused rather than silently loosened.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SCHEMA_VALUES = ("items", "additionalProperties", "propertyNames", "unevaluatedProperties", "unevaluatedItems",
                  "additionalItems")


def _check_enforceable(schema: Any, where: str = "") -> None:
    """Raise ``ValueError`` naming the place of the first keyword in ``schema`` that the grammar cannot enforce."""
    if not isinstance(schema, dict):
        return
    if schema.get("uniqueItems") is True:
        problem = "uniqueItems"
    elif isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        problem = "allOf with more than one schema"
    elif "pattern" in schema and ("minLength" in schema or "maxLength" in schema):
        problem = "pattern together with minLength / maxLength (put the length in the pattern)"
    else:
        problem = next((k for k in ("not", "if", "contains") if k in schema), None)
    if problem is not None:
        raise ValueError(f"the schema uses {problem} at '{where or '/'}', which constrained decoding cannot enforce")
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                _check_enforceable(sub, f"{where}/{key}/{name}")
    for key in _SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                _check_enforceable(sub, f"{where}/{key}/{i}")
    for key in _SCHEMA_VALUES:
        _check_enforceable(schema.get(key), f"{where}/{key}")


def _json_options(params: StructuredOutputsParams) -> dict[str, Any]:
    if params.disable_any_whitespace:
        return {"any_whitespace": False}
    return {"any_whitespace": True, "max_whitespace_cnt": MAX_WHITESPACE_RUN}


def _xgrammar_message(error: Exception) -> str:
    """xgrammar's message without its C++ source prefix (``[time] /path/file.cc:123: ``)."""
    text = str(error).strip()
    if text.startswith("[") and ": " in text:
        head, _, rest = text.partition(": ")
        if ".cc:" in head or ".h:" in head:
            text = rest.strip()
    return text.splitlines()[0] if text else type(error).__name__

