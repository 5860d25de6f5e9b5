"""``json_text``: JSON text inside values is parsed without ``RecursionError`` and held to a nesting limit."""

from __future__ import annotations

import pytest

from inferneo.entrypoints.openai.tool_parsers.base import call_of
from inferneo.json_text import MAX_DEPTH, TooDeep, depth, loads_bounded
from inferneo.sampling_params import SamplingParams, StructuredOutputsParams


def nested_text(levels: int) -> str:
    return '{"a": ' * (levels - 1) + "{}" + "}" * (levels - 1)


def test_depth_counts_levels_and_stops_past_the_limit():
    assert depth(1, 5) == 1 and depth([], 5) == 1 and depth([[1]], 5) == 2 and depth({"a": {"b": [3]}}, 5) == 3
    assert depth([[[[[[[[1]]]]]]]], 3) == 4  # counted no further than a level past the limit


def test_loads_bounded_refuses_deep_text_and_keeps_bad_json_a_value_error():
    assert loads_bounded(nested_text(MAX_DEPTH)) is not None
    with pytest.raises(TooDeep, match=f"at most {MAX_DEPTH} levels"):
        loads_bounded(nested_text(MAX_DEPTH + 1))
    with pytest.raises(TooDeep):
        loads_bounded("[" * 100_000)  # deep enough to break json.loads' recursion
    with pytest.raises(ValueError) as bad:
        loads_bounded("{not json")
    assert not isinstance(bad.value, TooDeep)


def test_schemas_as_text_share_the_limit_and_model_text_any_depth():
    StructuredOutputsParams(json=nested_text(MAX_DEPTH))
    with pytest.raises(ValueError, match="structured_outputs.json is nested too deeply"):
        StructuredOutputsParams(json=nested_text(MAX_DEPTH + 1))
    with pytest.raises(ValueError, match="structural_tag is nested too deeply"):
        SamplingParams(structured_outputs={"structural_tag": "[" * 5000})
    # a model's answer: no limit but Python's recursion, and no RecursionError escapes the tool-call parser
    deep_args = '{"name": "f", "arguments": ' + nested_text(200) + "}"
    assert call_of(deep_args, ("arguments",))[0] == "f"
    assert call_of('{"name": "f", "arguments": ' + "[" * 100_000, ("arguments",)) is None
