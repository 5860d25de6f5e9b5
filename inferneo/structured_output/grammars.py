"""A request's ``StructuredOutputsParams`` as a grammar, and the up-front check of it.

xgrammar takes every constraint it enforces. A JSON schema with a constraint xgrammar would drop
(``_check_enforceable``) goes to llguidance instead, when llguidance is installed and takes the schema without an
error or a warning (:class:`GuidanceGrammar`); otherwise it is refused, naming the field and the place. A grammar
is GBNF / EBNF for xgrammar, or Lark for llguidance (:func:`is_lark` tells them apart, as vLLM does).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inferneo.sampling_params import MAX_WHITESPACE_RUN, StructuredOutputsParams
from inferneo.structured_output.disjoint import json_type, one_of_overlap, schema_types


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


def llguidance():
    """The llguidance module, or None when it is not installed (schemas only it enforces are then refused)."""
    try:
        import llguidance as llg
    except ImportError:  # pragma: no cover - the structured extra installs it
        return None
    return llg


@dataclass(frozen=True, slots=True)
class GuidanceGrammar:
    """A constraint for llguidance (a JSON schema xgrammar would loosen, ``LLMatcher.grammar_from_json_schema``,
    or a Lark grammar), already checked by llguidance to have no error and no warning."""

    text: str


def build_grammar(params: StructuredOutputsParams):
    """The xgrammar ``Grammar`` of ``params``, or a :class:`GuidanceGrammar` for a JSON schema only llguidance
    enforces, for a Lark grammar (:func:`is_lark`), for a JSON ``whitespace_pattern`` and for any constraint under
    ``backend="guidance"``; raises ``StructuredOutputError`` naming the field when the backend cannot use it."""
    xgr = xgrammar()
    kind = params.kind
    field = f"structured_outputs.{kind}"
    backend = params.backend
    try:
        if kind in ("json", "json_object"):
            if kind == "json_object":
                schema: Any = {"type": "object"}
            else:
                schema = params.json if isinstance(params.json, (dict, bool)) else json.loads(params.json)
                if params.disable_additional_properties:
                    schema = closed_objects(schema)
                schema = calendar_dates(schema)
            if backend == "guidance" or params.whitespace_pattern is not None:
                if params.whitespace_pattern is not None and not _only_json_whitespace(params.whitespace_pattern):
                    raise StructuredOutputError(
                        f"structured_outputs.whitespace_pattern {params.whitespace_pattern[:80]!r} must match only "
                        "JSON whitespace (space, tab, newline, carriage return: e.g. '[ \\t\\n]{0,4}'; \\s and "
                        "'.' take more), or the answer would not be JSON", "structured_outputs.whitespace_pattern")
                if backend == "xgrammar":
                    raise StructuredOutputError("structured_outputs.whitespace_pattern needs llguidance; xgrammar "
                                                "has no whitespace pattern (use disable_any_whitespace, or the "
                                                "backend auto or guidance)", "structured_outputs.whitespace_pattern")
                return _guidance_only(schema, params, field)
            try:
                _check_enforceable(schema)
            except ValueError:
                guidance = guidance_grammar(schema, params) if backend == "auto" else None
                if guidance is None:
                    raise
                return guidance
            spec = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
            return _strict_json_strings(xgr.Grammar.from_json_schema(spec, **_json_options(params)))
        if backend == "guidance":
            return _guidance_constraint(params, field)
        if kind == "regex":
            return xgr.Grammar.from_regex(params.regex)
        if kind == "choice":
            return xgr.Grammar.from_ebnf(choice_ebnf(params.choice))
        if kind == "grammar":
            if is_lark(params.grammar):
                if backend == "xgrammar":
                    raise StructuredOutputError(f"{field} is a Lark grammar (it has no 'name ::= ...' rule, so it is "
                                                "not GBNF), which xgrammar cannot read: use the backend auto or "
                                                "guidance, or write it in GBNF", field)
                return lark_grammar(params.grammar, field)
            return xgr.Grammar.from_ebnf(params.grammar)
        return xgr.Grammar.from_structural_tag(params.spec)
    except StructuredOutputError:
        raise
    except (RuntimeError, ValueError, TypeError) as e:
        raise StructuredOutputError(f"{field} cannot be used: {_xgrammar_message(e)}", field) from None


# RFC 3339 dates as regular expressions that know the calendar: each month's length, and February 29 only in leap
# years (by 4, not by 100 unless by 400), years 0001 to 9999. xgrammar's own format: date took 2023-02-30 and
# llguidance's took 2023-02-29; checked against datetime.date.fromisoformat for every day of 3,500 years.
_YEAR = r"([0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"
_LEAP_YEAR = r"([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
_DATE = (rf"({_YEAR}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
         rf"|02-(0[1-9]|1[0-9]|2[0-8]))|{_LEAP_YEAR}-02-29)")
_HOUR = r"([01][0-9]|2[0-3])"
_DATE_PATTERNS = {
    "date": rf"^{_DATE}$",
    # a time of day without leap seconds, at most nine decimals, "Z" or an offset (the decimals as an alternative
    # with nothing, not an optional group: xgrammar 0.2 dropped the dot of "(\.[0-9]{1,9})?")
    "date-time": rf"^{_DATE}T{_HOUR}:[0-5][0-9]:[0-5][0-9](\.[0-9]{{1,9}}|)(Z|[+-]{_HOUR}:[0-5][0-9])$",
}


def calendar_dates(schema: Any) -> Any:
    """A copy of ``schema`` in which every string schema with ``format`` ``date`` or ``date-time`` (and no
    ``pattern`` or length of its own) has the pattern of valid calendar dates instead (subschemas followed), so
    that neither backend writes 2023-02-30: a narrowing of the format, as every answer is still a valid date."""
    if not isinstance(schema, dict):
        return schema
    out = _with_subschemas(schema, calendar_dates)
    pattern = _DATE_PATTERNS.get(out.get("format")) if isinstance(out.get("format"), str) else None
    if (pattern is not None and out.get("type") == "string"
            and not any(k in out for k in ("pattern", "minLength", "maxLength"))):
        del out["format"]
        out["pattern"] = pattern
    return out


def closed_objects(schema: Any) -> Any:
    """A copy of ``schema`` in which every object schema that does not say what its other properties may be says
    ``additionalProperties: false`` (vLLM's ``disable_additional_properties``); subschemas followed."""
    if not isinstance(schema, dict):
        return schema
    out = _with_subschemas(schema, closed_objects)
    is_object = out.get("type") == "object" or (isinstance(out.get("type"), list) and "object" in out["type"]) or (
        "type" not in out and "properties" in out)
    if is_object and "additionalProperties" not in out and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    return out


def _needs_llguidance(field: str, what: str) -> StructuredOutputError:
    return StructuredOutputError(f"{field}: {what} needs the llguidance package: pip install 'inferneo[structured]'",
                                 field)


def _guidance_only(schema: Any, params: StructuredOutputsParams, field: str) -> GuidanceGrammar:
    """llguidance's grammar of a JSON schema that must go to llguidance (``backend="guidance"`` or a
    ``whitespace_pattern``), or a ``StructuredOutputError`` saying why it cannot."""
    if llguidance() is None:
        raise _needs_llguidance(field, "the backend guidance" if params.backend == "guidance" else
                                "a whitespace_pattern")
    grammar = guidance_grammar(schema, params)
    if grammar is None:
        raise StructuredOutputError(f"{field} cannot be used: llguidance does not enforce all of the schema (it "
                                    "reports an error, a keyword it would drop, or a whitespace_pattern it cannot "
                                    "read)", field)
    return grammar


def _guidance_constraint(params: StructuredOutputsParams, field: str) -> GuidanceGrammar:
    """A regex, a choice or a grammar (GBNF or Lark) as llguidance's grammar (``backend="guidance"``)."""
    llg = llguidance()
    if llg is None:
        raise _needs_llguidance(field, "the backend guidance")
    kind = params.kind
    if kind == "structural_tag":
        raise StructuredOutputError(f"{field} is xgrammar's: use the backend auto or xgrammar for it", field)
    if kind == "grammar" and is_lark(params.grammar):
        return lark_grammar(params.grammar, field)
    value = json.dumps(params.choice) if kind == "choice" else getattr(params, kind)
    try:
        text = llg.grammar_from(kind, value)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(text)
    except (ValueError, TypeError, RuntimeError) as e:
        is_error, messages = True, [str(e)]
    if is_error or messages:
        detail = "; ".join(m.strip().splitlines()[0] for m in messages if m.strip()) or "llguidance refused it"
        raise StructuredOutputError(f"{field} cannot be used: {detail}", field)
    return GuidanceGrammar(text)


# A GBNF / EBNF rule definition (``name ::= ...``) at the start of a line: a grammar without one is Lark.
_EBNF_RULE = re.compile(r"^\s*[A-Za-z_][A-Za-z0-9_.-]*\s*::=", re.MULTILINE)


def is_lark(grammar: str) -> bool:
    """Whether ``grammar`` is a Lark grammar (llguidance's dialect: ``start: ...`` rules, ``%llguidance``,
    ``%json``) rather than GBNF / EBNF (``root ::= ...``), told apart as vLLM does: GBNF defines its rules with
    ``::=``, which Lark never uses."""
    return _EBNF_RULE.search(grammar) is None


def lark_grammar(grammar: str, field: str) -> GuidanceGrammar:
    """A Lark grammar as llguidance's, checked by llguidance (an error or a warning refuses it, naming ``field``);
    without llguidance it is refused with the extra that installs it."""
    llg = llguidance()
    if llg is None:
        raise StructuredOutputError(f"{field} is a Lark grammar (it has no 'name ::= ...' rule, so it is not GBNF), "
                                    "which needs the llguidance package: pip install 'inferneo[structured]'", field)
    try:
        text = llg.LLMatcher.grammar_from_lark(grammar)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(text)
    except (ValueError, TypeError, RuntimeError) as e:
        is_error, messages = True, [str(e)]
    if is_error or messages:
        detail = "; ".join(m.strip().splitlines()[0] for m in messages if m.strip()) or "llguidance refused it"
        raise StructuredOutputError(f"{field} cannot be used: read as a Lark grammar (it has no 'name ::= ...' rule, "
                                    f"so it is not GBNF): {detail}", field)
    return GuidanceGrammar(text)


def check_structured_outputs(params: StructuredOutputsParams | None) -> None:
    """Raise ``StructuredOutputError`` (naming the field) unless the engine can compile ``params``.

    This parses the constraint (about a millisecond, no tokenizer); the core compiles it against the vocabulary
    later. The verdict is kept by constraint (the last ``MAX_CHECKED`` of them), so a batch of requests sharing
    one schema parses it once: on an H200, 128 requests with one ten-field schema spent 9% of a run parsing it.
    """
    if params is not None:
        _check_cached(params.key, lambda: build_grammar(params))


def check_schema_reads(params: StructuredOutputsParams) -> None:
    """Raise ``StructuredOutputError`` (naming the field) unless xgrammar reads the JSON schema of ``params``,
    whether or not it could enforce all of it: the check of a schema no grammar is built from (a tool's parameters
    when ``tool_choice`` is ``auto`` or ``none``: the model writes its calls freely, so a keyword no grammar
    enforces, such as the ``uniqueItems`` of a pydantic ``set``, is no reason to refuse the request)."""
    def read() -> None:
        try:
            xgrammar().Grammar.from_json_schema(params.spec, **_json_options(params))
        except (RuntimeError, ValueError, TypeError) as e:
            field = f"structured_outputs.{params.kind}"
            raise StructuredOutputError(f"{field} cannot be used: {_xgrammar_message(e)}", field) from None

    _check_cached(("reads", *params.key), read)


def _check_cached(key: tuple, check) -> None:
    """Run ``check`` (raising ``StructuredOutputError``) once per ``key`` while its verdict is kept."""
    with _checked_lock:
        known = _checked.get(key, _UNKNOWN)
        if known is not _UNKNOWN:
            _checked.move_to_end(key)
    if known is _UNKNOWN:
        try:
            check()
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
# A schema with one of these is all xgrammar reads of it: every other constraint beside it is dropped.
_COMBINATORS = ("$ref", "anyOf", "oneOf", "allOf")
# The keywords that constrain a value (annotations such as title, description, default, examples are left out).
_CONSTRAINING = frozenset((
    "type", "enum", "const", "multipleOf", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minLength", "maxLength", "pattern", "format", "items", "prefixItems", "additionalItems", "minItems", "maxItems",
    "uniqueItems", "contains", "minContains", "maxContains", "unevaluatedItems", "properties", "patternProperties",
    "additionalProperties", "propertyNames", "required", "minProperties", "maxProperties", "dependentRequired",
    "dependentSchemas", "dependencies", "unevaluatedProperties", "not", "if", "then", "else", "$dynamicRef",
    "$recursiveRef", *_COMBINATORS))
# Without one of these, xgrammar reads a schema as "any JSON value" and drops its type-specific constraints.
_TYPED_BY = ("type", "enum", "const", "properties", "additionalProperties", "items", "prefixItems", *_COMBINATORS)
_TYPE_SPECIFIC = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength",
                  "pattern", "format", "minItems", "maxItems", "required", "minProperties", "maxProperties",
                  "patternProperties", "propertyNames")


def _with_subschemas(schema: dict[str, Any], change: Callable[[Any], Any]) -> dict[str, Any]:
    """A copy of ``schema`` with ``change`` applied to each of its direct subschemas (the schemas under
    ``_SCHEMA_MAPS``, ``_SCHEMA_LISTS`` and ``_SCHEMA_VALUES``): the one walk of the schema rewrites
    (``calendar_dates``, ``closed_objects``, ``_without_formats``), which follow subschemas by calling it again."""
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: change(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [change(sub) for sub in out[key]]
    for key in _SCHEMA_VALUES:
        if isinstance(out.get(key), dict):
            out[key] = change(out[key])
    return out


def _check_enforceable(schema: Any, where: str = "", root: Any = None, rule=None) -> None:
    """Raise ``ValueError`` naming the place of the first keyword in ``schema`` that the grammar cannot enforce
    (``root``: the whole schema, which ``$ref`` points into; ``schema`` itself when None). ``rule(subschema, root)``
    says what the backend cannot enforce in one schema object: xgrammar's (``_unenforceable``) unless given."""
    if not isinstance(schema, dict):
        return
    root = schema if root is None else root
    rule = rule or _unenforceable
    problem = rule(schema, root)
    if problem is not None:
        raise ValueError(f"the schema uses {problem} at '{where or '/'}', which constrained decoding cannot enforce")
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                _check_enforceable(sub, f"{where}/{key}/{name}", root, rule)
    for key in _SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                _check_enforceable(sub, f"{where}/{key}/{i}", root, rule)
    for key in _SCHEMA_VALUES:
        sub = schema.get(key)
        if key == "propertyNames" and isinstance(sub, dict):
            sub = {"type": "string", **sub}  # it describes the names, which are strings
        _check_enforceable(sub, f"{where}/{key}", root, rule)


def _unenforceable(schema: dict[str, Any], root: Any) -> str | None:
    """What in the one schema object ``schema`` (not its subschemas) xgrammar would drop, or None (``root``: the
    whole schema, for ``$ref``)."""
    if schema.get("uniqueItems") is True:
        return "uniqueItems"
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        return "allOf with more than one schema"
    if "pattern" in schema and ("minLength" in schema or "maxLength" in schema):
        return "pattern together with minLength / maxLength (put the length in the pattern)"
    if "format" in schema and ("minLength" in schema or "maxLength" in schema):  # xgrammar drops the length
        return "format together with minLength / maxLength"
    pattern = schema.get("pattern")
    if isinstance(pattern, str) and any(k in pattern for k in _LOOKAROUND):
        return f"pattern {pattern!r} with a lookahead or lookbehind (xgrammar skips it)"
    if isinstance(pattern, str) and _optional_group_with_repeat(pattern):
        return (f"pattern {pattern!r} with an optional group holding a repetition (xgrammar dropped part of it: "
                "'^a(bx+)?d$' took 'axd')")
    if isinstance(pattern, str) and _QUOTE_OR_BACKSLASH.search(pattern):
        return f"pattern {pattern!r}, which matches a quote or a backslash (xgrammar writes it unescaped)"
    tiny = next((k for k in _BOUNDS if _is_number(schema.get(k)) and 0 < abs(schema[k]) < 1e-6), None)
    if tiny is not None:  # xgrammar's range for [1e-7, 2e-7] let an empty value through: {"v": }
        return f"{tiny} {schema[tiny]!r} (xgrammar's number ranges stop at millionths)"
    values = [schema["const"]] if "const" in schema else schema.get("enum")
    if "type" in schema and isinstance(values, list):
        stray = next((v for v in values if json_type(v) not in schema_types(schema)), _UNKNOWN)
        if stray is not _UNKNOWN:
            return f"{'const' if 'const' in schema else 'enum'} value {stray!r}, which its type does not take"
    dropped = next((k for k in ("not", "if", "contains", "dependentRequired", "dependentSchemas", "dependencies",
                                "$dynamicRef", "$recursiveRef") if k in schema), None)
    if dropped is not None:
        return dropped
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref != "#" and not ref.startswith("#/"):
        return f"$ref {ref!r} (only references into the schema itself, '#' or '#/...', can be followed)"
    clash = _pattern_clash(schema)
    if clash is not None:
        return clash
    branches = schema.get("oneOf")
    overlap = one_of_overlap(branches, root) if isinstance(branches, list) else None
    if overlap is not None:
        return (f"oneOf whose schemas {overlap[0]} and {overlap[1]} may both match one value (use anyOf, or make "
                "them exclusive, e.g. by a required property with a different const in each)")
    combinator = next((k for k in _COMBINATORS if k in schema), None)
    if combinator is not None:
        beside = sorted(k for k in schema if k in _CONSTRAINING and k != combinator)
        if beside:
            return (f"{', '.join(beside)} beside {combinator} (the grammar follows only {combinator}: move them into "
                    "the schemas it names)")
    if not any(k in schema for k in _TYPED_BY):
        untyped = next((k for k in _TYPE_SPECIFIC if k in schema), None)
        if untyped is not None:
            return f"{untyped} without a type (give the schema a 'type')"
    if "multipleOf" in schema:
        types = schema.get("type") if isinstance(schema.get("type"), list) else [schema.get("type")]
        value = schema["multipleOf"]
        if "number" in types or not isinstance(value, int) or isinstance(value, bool):
            return "multipleOf other than a whole number on an integer"
    required = schema.get("required")
    if isinstance(required, list):
        listed = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        missing = next((name for name in required if name not in listed), None)
        if missing is not None:
            return f"required {missing!r}, which is not among its properties (list it in properties)"
    return None


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Lookarounds, which xgrammar's regex reader passes over (``^(?=.*[0-9])[a-z]{3}$`` gave "uvy").
_LOOKAROUND = ("(?=", "(?!", "(?<=", "(?<!")
# A pattern that can match '"' or '\': xgrammar writes them into the JSON string as they are (``^a"b$`` gave
# ``"a"b"``, not JSON; ``^a\\b$`` gave ``"a\b"``, a backspace).
_QUOTE_OR_BACKSLASH = re.compile(r'"|\\\\|\\[xX](?:22|5[cC])|\\u00(?:22|5[cC])')


_JSON_WHITESPACE = frozenset(map(ord, " \t\n\r"))


def _only_json_whitespace(pattern: str) -> bool:
    """Whether every string ``pattern`` matches is JSON whitespace: it is built of those four characters only
    (literals, classes and ranges of them, not negated), with groups, alternatives, repetitions and anchors; no
    ``.``, ``\\s`` (which takes more, such as a form feed) or backreference."""
    try:
        import re._parser as sre_parse  # Python 3.11+
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError, ValueError):
        return False

    def ok(node) -> bool:
        for op, av in node:
            if op is sre_parse.LITERAL:
                if av not in _JSON_WHITESPACE:
                    return False
            elif op is sre_parse.IN:
                for item_op, item in av:
                    if item_op is sre_parse.LITERAL and item in _JSON_WHITESPACE:
                        continue
                    if item_op is sre_parse.RANGE and all(c in _JSON_WHITESPACE for c in range(item[0], item[1] + 1)):
                        continue
                    return False
            elif op in (sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT):
                if not ok(av[2]):
                    return False
            elif op is sre_parse.SUBPATTERN:
                if not ok(av[-1]):
                    return False
            elif op is sre_parse.BRANCH:
                if not all(ok(branch) for branch in av[1]):
                    return False
            elif op is not sre_parse.AT:
                return False
        return True

    return ok(parsed)


def _optional_group_with_repeat(pattern: str) -> bool:
    """Whether ``pattern`` has an optional part (``?`` or ``{0,1}``) that holds a repetition of a varying count
    (``+``, ``*``, ``{1,3}``), which xgrammar (0.2) reads wrongly in a JSON schema's pattern: ``^a(bx+)?d$`` took
    ``axd`` and ``^a(b[0-9]*)?d$`` took ``a1d`` (its regex constraint reads them right). False when Python's
    ``re`` cannot read the pattern (xgrammar then says what is wrong with it)."""
    try:
        import re._parser as sre_parse  # Python 3.11+
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError, ValueError):
        return False
    repeats = (sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT)

    def items(node):
        for op, av in node:
            yield op, av
            if op in repeats:
                yield from items(av[2])
            elif op is sre_parse.SUBPATTERN:
                yield from items(av[-1])
            elif op is sre_parse.BRANCH:
                for branch in av[1]:
                    yield from items(branch)

    def varies(node) -> bool:
        return any(op in repeats and av[0] != av[1] for op, av in items(node))

    return any(op in repeats and av[0] == 0 and av[1] == 1 and varies(av[2]) for op, av in items(parsed))


def _pattern_clash(schema: dict[str, Any]) -> str | None:
    """What xgrammar would get wrong in the ``patternProperties`` of ``schema``, or None. xgrammar writes the value
    of a name matching a pattern under that pattern's schema alone, and does not keep the names of ``properties``
    out of the patterns: where a listed name matches a pattern it wrote the name twice, its second value breaking
    the listed schema (``"id": 1, "id": -6`` under ``minimum: 0``); where a name matches two patterns it wrote a
    value of either one's schema (JSON Schema wants both)."""
    patterns = schema.get("patternProperties")
    if not isinstance(patterns, dict) or not patterns:
        return None
    if len(patterns) > 1:
        return "patternProperties with more than one pattern (a name may match several)"
    pattern = next(iter(patterns))
    listed = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    search = _PatternSearch()
    matched = next((name for name in listed if search(pattern, name) is not False), None)
    if matched is not None:
        return f"patternProperties {pattern!r}, which the listed property {matched!r} may match too"
    return None


def _guidance_dead_end(schema: dict[str, Any], root: Any) -> str | None:
    """What llguidance would write itself into a corner with in ``schema`` (not its subschemas), or None.

    llguidance keeps the names of ``properties`` out of a pattern's names, but still allows another member where
    that leaves none: under ``additionalProperties: false`` with ``"a"`` listed and the pattern ``^a$``, it let a
    comma through after ``"a": 4`` and then allowed no token at all (the constraint came off, and free text
    followed). A pattern that one of the listed names matches must be shown to match a name that is not listed."""
    patterns = schema.get("patternProperties")
    if schema.get("additionalProperties", True) is not False or not isinstance(patterns, dict):
        return None
    listed = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    search = _PatternSearch()
    for pattern in patterns:
        found = [name for name in listed if search(pattern, name) is not False]
        if found and not any(search(pattern, c) for c in _other_names(found) if c not in listed):
            return (f"patternProperties {pattern!r}, whose names may all be listed properties ({found[0]!r}) "
                    "under additionalProperties false (list them in properties instead)")
    return None


class _PatternSearch:
    """``regex.search`` of a schema's pattern in a name, within a time budget shared by the calls of one check (a
    pattern such as ``^(a|aa)+$`` takes exponential time on some names, and the check runs on the server's event
    loop): True, False, or None when it could not tell (out of time, a pattern ``regex`` cannot read, or no
    ``regex`` module, which transformers installs)."""

    def __init__(self, budget_s: float = 0.1) -> None:
        self.deadline = time.monotonic() + budget_s

    def __call__(self, pattern: str, name: str) -> bool | None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            import regex
        except ImportError:  # pragma: no cover - a dependency of transformers
            return None
        try:
            return regex.search(pattern, name, timeout=left) is not None
        except (regex.error, TimeoutError, ValueError, TypeError):
            return None


def _other_names(names: list[str]) -> list[str]:
    """Names to try a pattern on: each of ``names`` with a character added at either end or changed at the end,
    and a few short ones."""
    out = ["a", "x", "0", "_", "aa", "ab", "key", "x_a", "a1"]
    for name in names:
        for c in "a0_xZ-":
            out += [name + c, c + name, name[:-1] + c]
    return out


def _json_options(params: StructuredOutputsParams) -> dict[str, Any]:
    """xgrammar's JSON layout: compact (exactly ", " and ": " between items, nothing else) or runs of at most
    ``MAX_WHITESPACE_RUN`` whitespace characters around every separator and bracket (never before or after the
    value)."""
    if params.disable_any_whitespace:
        return {"any_whitespace": False}
    return {"any_whitespace": True, "max_whitespace_cnt": MAX_WHITESPACE_RUN}


def _guidance_json_options(params: StructuredOutputsParams) -> dict[str, Any]:
    """llguidance's JSON options for the layout of ``_json_options`` (given as overrides, so a schema's own
    "x-guidance" cannot change them); never ``lenient`` (which drops unknown keywords) nor ``coerce_one_of``
    (which reads oneOf as anyOf)."""
    strict = {"lenient": False, "coerce_one_of": False}
    if params.whitespace_pattern is not None:
        return {"whitespace_flexible": True, "whitespace_pattern": params.whitespace_pattern, **strict}
    if params.disable_any_whitespace:
        return {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", **strict}
    return {"whitespace_flexible": True, "whitespace_pattern": rf"[\x20\x0A\x0D\x09]{{0,{MAX_WHITESPACE_RUN}}}",
            **strict}


def guidance_grammar(schema: Any, params: StructuredOutputsParams) -> GuidanceGrammar | None:
    """llguidance's grammar of ``schema``, or None when llguidance is missing or reports any error or warning
    for it (a warning is a keyword it would not enforce). No tokenizer is needed: the core checks the grammar
    again against the vocabulary when it compiles it."""
    llg = llguidance()
    if llg is None or not isinstance(schema, dict):
        return None
    try:
        _check_enforceable(schema, rule=_guidance_dead_end)
    except ValueError:
        return None
    for _ in range(_MAX_FORMATS_DROPPED + 1):  # llguidance names one unknown format at a time
        try:
            text = llg.LLMatcher.grammar_from_json_schema(schema, overrides=_guidance_json_options(params))
            is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(text)
        except (ValueError, TypeError, RuntimeError):
            return None
        if not (is_error or messages):
            return GuidanceGrammar(text)
        unknown = {m[len(_UNKNOWN_FORMAT):] for m in messages if m.startswith(_UNKNOWN_FORMAT)}
        if not unknown or len(unknown) < len(messages):
            return None
        schema = _without_formats(schema, unknown)
    return None


# llguidance refuses a format it does not know ("password", "byte", "binary", ... of OpenAPI's), where xgrammar
# reads it as the annotation JSON Schema makes it (any string): such formats are dropped for llguidance too.
_UNKNOWN_FORMAT = "Unknown format: "
_MAX_FORMATS_DROPPED = 8


def _without_formats(schema: Any, names: set[str]) -> Any:
    """A copy of ``schema`` without its ``format`` keywords naming one of ``names`` (subschemas followed; values
    such as ``const``, ``enum`` and ``default`` kept as they are)."""
    if not isinstance(schema, dict):
        return schema
    kept = {k: v for k, v in schema.items() if not (k == "format" and v in names)}
    return _with_subschemas(kept, lambda sub: _without_formats(sub, names))


def _xgrammar_message(error: Exception) -> str:
    """xgrammar's message without its C++ source prefix (``[time] /path/file.cc:123: ``)."""
    text = str(error).strip()
    if text.startswith("[") and ": " in text:
        head, _, rest = text.partition(": ")
        if ".cc:" in head or ".h:" in head:
            text = rest.strip()
    return text.splitlines()[0] if text else type(error).__name__

