"""``SpeculativeConfig``: how the engine drafts tokens for speculative decoding, read from a dict or JSON.

It takes vLLM's ``--speculative-config`` keys for its n-gram method (``method``, ``num_speculative_tokens``,
``prompt_lookup_max``, ``prompt_lookup_min``, ``disable_by_batch_size``), so a vLLM command line moves over as it
is. No PyTorch here: the
command line builds it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

SPECULATIVE_METHODS = ("ngram",)
# The most draft tokens one step verifies: past this, rejected drafts waste more compute than accepted ones save.
MAX_SPECULATIVE_TOKENS = 16
DEFAULT_LOOKUP_MAX = 4
DEFAULT_LOOKUP_MIN = 1


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """Speculative decoding by prompt lookup (``method="ngram"``).

    Each step, a decoding request looks for the latest earlier occurrence of its last ``n`` tokens (``n`` from
    ``prompt_lookup_max`` down to ``prompt_lookup_min``) in its prompt and output, and proposes the up to
    ``num_speculative_tokens`` tokens that followed it there. The model runs the request's last token and the
    drafts in one step; the drafts it would have produced itself are kept, and the first token where it
    disagrees is replaced by its own. Outputs are those of decoding without speculation: the same tokens under
    greedy sampling, the same distribution under random sampling.
    """

    num_speculative_tokens: int
    method: str = "ngram"
    prompt_lookup_max: int = DEFAULT_LOOKUP_MAX
    prompt_lookup_min: int = DEFAULT_LOOKUP_MIN
    # No drafts in a step while more than this many requests run (None: any number). At large batches a step's
    # extra positions cost real compute, and drafts that are seldom right then lower throughput.
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config.method must be one of {', '.join(SPECULATIVE_METHODS)} (drafts "
                             f"from the request's own tokens); got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculative_config.{name} must be a positive integer; got {value!r}")
        size = self.disable_by_batch_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ValueError(f"speculative_config.disable_by_batch_size must be a positive integer; got {size!r}")
        if self.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config.num_speculative_tokens must be at most {MAX_SPECULATIVE_TOKENS}; "
                             f"got {self.num_speculative_tokens}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) must not exceed "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")


def parse_speculative_config(value: SpeculativeConfig | dict[str, Any] | str | None) -> SpeculativeConfig | None:
    """A ``SpeculativeConfig`` from itself, a dict of its fields, or that dict as JSON text (the flag's form).

    When only one of ``prompt_lookup_max`` / ``prompt_lookup_min`` is given and the other's default would
    contradict it (``{"prompt_lookup_min": 6}``), the other takes the same value.
    """
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"speculative_config is not valid JSON ({exc.msg}): {value!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"speculative_config must be a JSON object such as "
                         f'{{"method": "ngram", "num_speculative_tokens": 4}}; got {value!r}')
    known = {f.name for f in fields(SpeculativeConfig)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"speculative_config has unknown key(s) {', '.join(unknown)}; the keys are "
                         f"{', '.join(sorted(known))}")
    if "num_speculative_tokens" not in value:
        raise ValueError("speculative_config.num_speculative_tokens is required (the drafts verified per step)")
    kwargs = dict(value)
    low, high = kwargs.get("prompt_lookup_min"), kwargs.get("prompt_lookup_max")
    if high is None and isinstance(low, int) and low > DEFAULT_LOOKUP_MAX:
        kwargs["prompt_lookup_max"] = low
    if low is None and isinstance(high, int) and high < DEFAULT_LOOKUP_MIN:
        kwargs["prompt_lookup_min"] = high
    return SpeculativeConfig(**kwargs)
