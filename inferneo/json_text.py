"""JSON that arrives as text inside a value: a schema sent as a string, a tool call's ``arguments``, a model's answer.

``json.loads`` recurses once per nesting level: text nested a few thousand levels deep raises ``RecursionError``
(not a ``ValueError``, so a caller that catches only bad JSON lets it escape), and a schema nested a few hundred
levels deep parses but then takes seconds to compile into a grammar. ``loads_bounded`` refuses both with
``TooDeep``, a ``ValueError`` naming the limit. The server refuses request bodies nested deeper than the same
``MAX_DEPTH`` (``ServerGuards.max_json_depth``), so a schema is held to one limit whether it is sent as an object
or as a string.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 32
"""Nesting levels allowed in JSON text inside a request (and, by default, in the request body itself)."""


class TooDeep(ValueError):
    """JSON text nested deeper than its limit."""


def depth(value: Any, limit: int) -> int:
    """How deep ``value`` nests (a scalar is 1, ``[]`` and ``{}`` are 1, ``[[1]]`` is 2), counting no further than a
    level past ``limit``; without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if level > deepest:
            deepest = level
            if deepest > limit:
                break
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item if isinstance(v, (dict, list)))
    return deepest


def loads_bounded(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads(text)``, refusing text nested more than ``max_depth`` levels with ``TooDeep``; bad JSON raises
    ``json.JSONDecodeError`` as usual (both are ``ValueError``)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise TooDeep(f"nested too deeply: JSON may nest at most {max_depth} levels") from None
    if depth(value, max_depth) > max_depth:
        raise TooDeep(f"nested too deeply: JSON may nest at most {max_depth} levels")
    return value


def object_or_text(text: str) -> Any:
    """The JSON object ``text`` holds (a tool call's ``arguments``, decoded for a chat template, which reads them as
    an object), else ``text`` itself: a string that is not a JSON object, or nests too deeply, stays as written."""
    try:
        decoded = loads_bounded(text)
    except ValueError:
        return text
    return decoded if isinstance(decoded, dict) else text


def json_object_option(value: Any, name: str, what: str = "") -> dict[str, Any] | None:
    """An option given as a JSON object (text, or already a dict) as a dict; None stays None. ``ValueError`` naming
    ``name`` (``what`` says what the object holds) for text that is not JSON or JSON that is not an object."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"{name} must be a JSON object{what}; {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object{what}, got {type(value).__name__}")
    return dict(value)
