"""Whether the branches of a JSON schema's ``oneOf`` can share a value, as far as xgrammar's output goes.

xgrammar reads ``oneOf`` as ``anyOf``: it writes a value of one branch, never checking that the value fails the
others. That is right only when no value can match two branches; ``{"oneOf": [{"type": "integer"}, {"type":
"number"}]}`` let ``6`` through, which both match. :func:`one_of_overlap` proves the branches pairwise exclusive
with a few sound rules (different JSON types, different constants, a required property whose schemas exclude each
other, a required name the other branch's object cannot hold) and names the first pair it cannot prove; such a
schema is not left to xgrammar (``grammars._unenforceable``).

"Exclusive" is read for xgrammar's output: a branch's object holds only the properties it lists unless it says
otherwise (xgrammar writes no others), while the other branch is read as JSON Schema reads it.
"""

from __future__ import annotations

from typing import Any

_MAX_DEPTH = 24  # $ref hops and nesting followed before a pair counts as not proven exclusive
_MAX_STEPS = 256  # comparisons made for one way of one pair before it counts as not proven exclusive
_ALL_TYPES = frozenset(("null", "boolean", "object", "array", "string", "integer", "number"))


def one_of_overlap(branches: list[Any], root: Any) -> tuple[int, int] | None:
    """The first pair of ``branches`` (indexes) that may both match one value xgrammar writes, or None when every
    pair is proven exclusive; ``root`` is the whole schema, for ``$ref``."""
    for i, first in enumerate(branches):
        for j in range(i + 1, len(branches)):
            second = branches[j]
            if not (_excludes(first, second, _Walk(root), 0) and _excludes(second, first, _Walk(root), 0)):
                return i, j
    return None


class _Walk:
    """The whole schema (for ``$ref``) and the steps left to one way of one pair's proof: a schema that refers to
    itself could otherwise take exponentially many (three required properties, each the schema again, took
    minutes)."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.steps = _MAX_STEPS

    def step(self) -> bool:
        """Spend one step; False once none are left (the pair then counts as not proven exclusive)."""
        self.steps -= 1
        return self.steps >= 0


def _resolve(schema: Any, walk: _Walk, depth: int) -> Any:
    """``schema`` with a document-local ``$ref`` followed (None when it cannot be followed)."""
    while isinstance(schema, dict) and isinstance(schema.get("$ref"), str):
        ref = schema["$ref"]
        if depth > _MAX_DEPTH or not (ref == "#" or ref.startswith("#/")):
            return None
        target = walk.root
        for part in ref[2:].split("/") if ref != "#" else ():
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                return None
        schema = target
        depth += 1
    return schema


def _alternatives(schema: dict[str, Any]) -> list[Any] | None:
    """The branches of a schema that is only a combinator of alternatives (or a one-schema allOf), else None."""
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return schema[key]
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) == 1:
        return schema["allOf"]
    return None


def _excludes(written: Any, other: Any, walk: _Walk, depth: int) -> bool:
    """Whether no value xgrammar writes for ``written`` validates against ``other`` (False: not proven)."""
    if depth > _MAX_DEPTH or not walk.step():
        return False
    written, other = _resolve(written, walk, depth), _resolve(other, walk, depth)
    if written is False or other is False:
        return True
    if not isinstance(written, dict) or not isinstance(other, dict):
        return False
    inner = _alternatives(written)
    if inner is not None:
        return all(_excludes(w, other, walk, depth + 1) for w in inner)
    inner = _alternatives(other)
    if inner is not None:
        return all(_excludes(written, o, walk, depth + 1) for o in inner)
    values = _values(written)
    if values is not None:
        return all(_rejects(other, v, walk, depth + 1) for v in values)
    shared = schema_types(written) & schema_types(other)
    if not shared:
        return True
    return shared == {"object"} and _objects_exclude(written, other, walk, depth)


def _objects_exclude(written: dict[str, Any], other: dict[str, Any], walk: _Walk, depth: int) -> bool:
    """Whether no object xgrammar writes for ``written`` validates against ``other``."""
    listed = written.get("properties") if isinstance(written.get("properties"), dict) else {}
    other_listed = other.get("properties") if isinstance(other.get("properties"), dict) else {}
    closed = written.get("additionalProperties", False) is False and not written.get("patternProperties")
    other_closed = other.get("additionalProperties", True) is False and not other.get("patternProperties")
    needed = other.get("required") if isinstance(other.get("required"), list) else []
    if closed and any(name not in listed for name in needed):
        return True  # other needs a property that written's objects never hold
    for name in written.get("required") if isinstance(written.get("required"), list) else ():
        if name in other_listed:
            if name in listed and _excludes(listed[name], other_listed[name], walk, depth + 1):
                return True
        elif other_closed:
            return True  # written's objects always hold a property that other's cannot
    return False


def _values(schema: dict[str, Any]) -> list[Any] | None:
    """The only values ``schema`` allows (its ``const`` or ``enum``), or None when they are not listed."""
    if "const" in schema:
        return [schema["const"]]
    if isinstance(schema.get("enum"), list):
        return schema["enum"]
    return None


def schema_types(schema: dict[str, Any]) -> frozenset[str]:
    """The JSON types a value of ``schema`` may have, by its ``type`` ("number" includes the whole numbers,
    "integer") and its ``const`` / ``enum`` values."""
    named = schema.get("type")
    if isinstance(named, str):
        named = [named]
    types = set(_ALL_TYPES) if not isinstance(named, list) else {t for t in named if t in _ALL_TYPES}
    if "number" in types:
        types.add("integer")
    values = _values(schema)
    if values is not None:
        types &= {json_type(v) for v in values}
    return frozenset(types)


def json_type(value: Any) -> str:
    """The JSON Schema type of a JSON value (a whole float is an "integer", as JSON Schema reads it)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _same(a: Any, b: Any) -> bool:
    """JSON equality (``1 == 1.0``, ``true != 1``)."""
    kind = json_type(a)
    if kind in ("integer", "number") and json_type(b) in ("integer", "number"):
        return a == b
    if kind != json_type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _rejects(schema: Any, value: Any, walk: _Walk, depth: int) -> bool:
    """Whether ``value`` fails ``schema`` (False: not proven)."""
    if not walk.step():
        return False
    schema = _resolve(schema, walk, depth)
    if isinstance(schema, bool):
        return not schema
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return False
    inner = _alternatives(schema)
    if inner is not None:
        return all(_rejects(s, value, walk, depth + 1) for s in inner)
    allowed = _values(schema)
    if allowed is not None and not any(_same(value, a) for a in allowed):
        return True
    return json_type(value) not in schema_types(schema)
