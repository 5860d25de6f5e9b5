"""Structured output: decoding constrained to a JSON schema, regex, choice list or grammar.

The field's libraries do the work: xgrammar parses and compiles each constraint against the model's tokenizer
and fills one token bitmask per constrained sequence per step; a JSON schema with a constraint xgrammar would drop
goes to llguidance instead, when it takes the schema cleanly (as vLLM's "auto" backend does). This package wraps
them for the engine:

- :mod:`.grammars`: a ``StructuredOutputsParams`` as an xgrammar grammar, and the check the front end runs on
  every request (no tokenizer needed), so an unusable schema is refused before it reaches the core (and the
  lighter check of a schema no grammar is built from, ``check_schema_reads``);
- :mod:`.compiler`: the core's compile pool (grammars compile on worker threads, cached by constraint) and the
  per-sequence matcher that follows the sequence's tokens and fills its bitmask row.

The sampler only ever sees a bitmask tensor (``inferneo.sampling.ops.apply_token_bitmask``); nothing outside this
package imports xgrammar or llguidance, so they stay optional dependencies (the ``structured`` extra).
"""

from inferneo.structured_output.grammars import (
    StructuredOutputError,
    check_schema_reads,
    check_structured_outputs,
)

__all__ = ["StructuredOutputError", "check_schema_reads", "check_structured_outputs"]
