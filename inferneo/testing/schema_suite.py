"""Constraints for structured-output tests and benchmarks: data only.

Every free string is bounded (``maxLength``, ``pattern``, ``enum``, a ``format``) and every array has
``maxItems``, so that even a random-weight model, whose unconstrained output is gibberish, completes each JSON
value within a few hundred tokens. ``SCHEMAS`` maps a name to a JSON schema (the suite of issue 18: nested
objects, bounded arrays, enums, const, ranges, booleans, null, anyOf / oneOf, $ref / $defs, patterns, formats,
optional fields, additionalProperties false); ``REGEXES`` maps a name to a regular expression; ``CHOICES`` and
``EBNF_GRAMMAR`` serve the choice and grammar constraints; ``RECORD_SCHEMA`` is the ten-field record the benchmark
asks for.
"""

from __future__ import annotations

_NAME = {"type": "string", "minLength": 1, "maxLength": 12}
_SHORT = {"type": "string", "maxLength": 6}

SCHEMAS: dict[str, dict] = {
    "flat_required": {
        "type": "object",
        "properties": {"name": _NAME, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
        "required": ["name", "age"], "additionalProperties": False,
    },
    "optional_fields": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999}, "note": _SHORT,
                       "flag": {"type": "boolean"}},
        "required": ["id"], "additionalProperties": False,
    },
    "all_optional": {
        "type": "object",
        "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}},
        "additionalProperties": False,
    },
    "nested_object": {
        "type": "object",
        "properties": {
            "user": {"type": "object", "properties": {"name": _NAME, "admin": {"type": "boolean"}},
                     "required": ["name", "admin"], "additionalProperties": False},
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"], "additionalProperties": False,
    },
    "deeply_nested": {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
            "c": {"type": "object", "properties": {"d": {"type": "integer", "minimum": -5, "maximum": 5}},
                  "required": ["d"], "additionalProperties": False}},
            "required": ["c"], "additionalProperties": False}}, "required": ["b"], "additionalProperties": False}},
        "required": ["a"], "additionalProperties": False,
    },
    "integer_range": {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 99}},
        "required": ["n"], "additionalProperties": False,
    },
    "negative_integer_range": {
        "type": "object",
        "properties": {"t": {"type": "integer", "minimum": -40, "maximum": -1}},
        "required": ["t"], "additionalProperties": False,
    },
    "exclusive_integer_range": {
        "type": "object",
        "properties": {"k": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 8}},
        "required": ["k"], "additionalProperties": False,
    },
    "number_range": {
        "type": "object",
        "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["score"], "additionalProperties": False,
    },
    "booleans_and_null": {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "nothing": {"type": "null"}},
        "required": ["ok", "nothing"], "additionalProperties": False,
    },
    "string_enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"], "additionalProperties": False,
    },
    "mixed_enum": {
        "type": "object",
        "properties": {"v": {"enum": ["on", 1, None, True]}},
        "required": ["v"], "additionalProperties": False,
    },
    "const_fields": {
        "type": "object",
        "properties": {"version": {"const": 2}, "kind": {"const": "event"}, "payload": _SHORT},
        "required": ["version", "kind", "payload"], "additionalProperties": False,
    },
    "bounded_string_array": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": _SHORT, "minItems": 1, "maxItems": 3}},
        "required": ["tags"], "additionalProperties": False,
    },
    "exact_length_array": {
        "type": "object",
        "properties": {"xyz": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                               "minItems": 3, "maxItems": 3}},
        "required": ["xyz"], "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "object",
        "properties": {"items": {"type": "array", "maxItems": 2, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
                           "qty": {"type": "integer", "minimum": 1, "maximum": 20}},
            "required": ["sku", "qty"], "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False,
    },
    "top_level_array": {
        "type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 4,
    },
    "prefix_items_tuple": {
        "type": "array",
        "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 100}, {"enum": ["x", "y"]},
                        {"type": "boolean"}],
        "items": False,
    },
    "nested_arrays": {
        "type": "object",
        "properties": {"grid": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "array", "minItems": 1, "maxItems": 2, "items": {"type": "integer", "minimum": 0,
                                                                    "maximum": 9}}}},
        "required": ["grid"], "additionalProperties": False,
    },
    "any_of": {
        "type": "object",
        "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 1000},
                                        {"type": "string", "pattern": "^id-[0-9]{2}$"}]}},
        "required": ["id"], "additionalProperties": False,
    },
    "one_of_objects": {
        "type": "object",
        "properties": {"shape": {"oneOf": [
            {"type": "object", "properties": {"kind": {"const": "circle"},
                                              "r": {"type": "integer", "minimum": 1, "maximum": 9}},
             "required": ["kind", "r"], "additionalProperties": False},
            {"type": "object", "properties": {"kind": {"const": "square"},
                                              "side": {"type": "integer", "minimum": 1, "maximum": 9}},
             "required": ["kind", "side"], "additionalProperties": False},
        ]}},
        "required": ["shape"], "additionalProperties": False,
    },
    "nullable_any_of": {
        "type": "object",
        "properties": {"middle_name": {"anyOf": [_SHORT, {"type": "null"}]}},
        "required": ["middle_name"], "additionalProperties": False,
    },
    "type_list": {
        "type": "object",
        "properties": {"v": {"type": ["integer", "null"], "minimum": 0, "maximum": 50}},
        "required": ["v"], "additionalProperties": False,
    },
    "ref_defs": {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                              "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"], "additionalProperties": False,
    },
    "ref_in_array": {
        "$defs": {"tag": {"type": "string", "enum": ["a", "b", "c"]}},
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 3}},
        "required": ["tags"], "additionalProperties": False,
    },
    "string_patterns": {
        "type": "object",
        "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                       "code": {"type": "string", "pattern": "^[a-f0-9]{4}-[a-f0-9]{4}$"},
                       "word": {"type": "string", "pattern": "^[a-z]{1,8}$"}},
        "required": ["zip", "code", "word"], "additionalProperties": False,
    },
    "string_lengths": {
        "type": "object",
        "properties": {"s": {"type": "string", "minLength": 3, "maxLength": 5}},
        "required": ["s"], "additionalProperties": False,
    },
    "formats_date_uuid": {
        "type": "object",
        "properties": {"date": {"type": "string", "format": "date"}, "id": {"type": "string", "format": "uuid"}},
        "required": ["date", "id"], "additionalProperties": False,
    },
    "formats_network": {
        "type": "object",
        "properties": {"ip": {"type": "string", "format": "ipv4"},
                       "when": {"type": "string", "format": "date-time"}},
        "required": ["ip", "when"], "additionalProperties": False,
    },
    "pattern_properties_free_keys": {
        "type": "object",
        "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9},
        "propertyNames": {"pattern": "^[a-z]{1,3}$"},
        "maxProperties": 3,
    },
    "map_of_booleans": {
        "type": "object",
        "properties": {"flags": {"type": "object", "additionalProperties": {"type": "boolean"},
                                 "propertyNames": {"pattern": "^[a-z]{1,4}$"}, "maxProperties": 2}},
        "required": ["flags"], "additionalProperties": False,
    },
    "recursive_tree": {
        "$defs": {"node": {"type": "object", "properties": {
            "v": {"type": "integer", "minimum": 0, "maximum": 9},
            "kids": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/node"}}},
            "required": ["v"], "additionalProperties": False}},
        "$ref": "#/$defs/node",
    },
    "top_level_enum": {"enum": ["yes", "no", "maybe"]},
    "top_level_integer": {"type": "integer", "minimum": 100, "maximum": 999},
    "function_call": {
        "type": "object",
        "properties": {"name": {"const": "get_weather"},
                       "arguments": {"type": "object", "properties": {
                           "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,9}$"},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
                           "required": ["city", "unit"], "additionalProperties": False}},
        "required": ["name", "arguments"], "additionalProperties": False,
    },
}

# A ten-field record (the benchmark's schema): strings bounded, numbers ranged, an enum, a bounded array.
RECORD_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "name": {"type": "string", "maxLength": 16},
        "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "country": {"type": "string", "pattern": "^[A-Z]{2}$"},
        "note": {"type": ["string", "null"], "maxLength": 24},
    },
    "required": ["id", "name", "email", "age", "score", "active", "role", "tags", "country", "note"],
    "additionalProperties": False,
}

REGEXES: dict[str, str] = {
    "digits": r"[0-9]{1,6}",
    "us_phone": r"\(\d{3}\) \d{3}-\d{4}",
    "iso_date": r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
    "hex_color": r"#[0-9a-fA-F]{6}",
    "email": r"[a-z]{1,8}@[a-z]{1,8}\.(com|org|net)",
    "ipv4": r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)",
    "yes_no": r"(yes|no)",
    "word_list": r"[a-z]{1,5}(, [a-z]{1,5}){0,3}",
    "signed_decimal": r"-?(0|[1-9]\d{0,3})\.\d{1,2}",
    "semver": r"v?\d{1,2}\.\d{1,2}\.\d{1,2}",
    "key_value": r"[a-z]{1,6}=[0-9]{1,3}(;[a-z]{1,6}=[0-9]{1,3}){0,2}",
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
}

CHOICES: list[list[str]] = [
    ["positive", "negative", "neutral"],
    ["A", "B", "C", "D"],
    ["yes", "no"],
    ["Paris", "Rome", "Madrid", "Paris, France"],  # one choice is a prefix of another
    ["\"quoted\"", "back\\slash", "new\nline"],  # characters the EBNF literal must escape
]

# Arithmetic over one-digit numbers: an EBNF (GBNF) grammar, and a regex of the same language to check outputs.
EBNF_GRAMMAR = r"""
root ::= expr
expr ::= term (("+" | "-") term){0,3}
term ::= factor (("*" | "/") factor){0,2}
factor ::= [0-9] | "(" [0-9] ("+" | "-") [0-9] ")"
"""
EBNF_GRAMMAR_REGEX = r"(?:[0-9]|\([0-9][+-][0-9]\))(?:[*/](?:[0-9]|\([0-9][+-][0-9]\))){0,2}" \
                     r"(?:[+-](?:[0-9]|\([0-9][+-][0-9]\))(?:[*/](?:[0-9]|\([0-9][+-][0-9]\))){0,2}){0,3}"
