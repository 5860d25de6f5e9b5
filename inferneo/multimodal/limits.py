"""How many images (videos, audio clips) one prompt may hold: vLLM's ``limit_mm_per_prompt`` option, read from a
dict or its JSON text (``--limit-mm-per-prompt '{"image": 4}'``). Importing this module imports no PyTorch."""

from __future__ import annotations

from typing import Any

from inferneo.json_text import json_object_option

# The modalities the option names, as vLLM's does; Inferneo serves images (video and audio inputs are refused, so
# their limits only say that).
MODALITIES = ("image", "video", "audio")
# The most images one prompt may hold when the option leaves it open.
DEFAULT_MAX_IMAGES = 16


def check_mm_limits(value: Any) -> dict[str, int] | None:
    """``value`` (a dict, its JSON text, or None) as ``{modality: most items per prompt}``; ValueError naming what
    is wrong (an unknown modality, a count that is not a non-negative integer)."""
    value = json_object_option(value, "limit_mm_per_prompt", ' such as {"image": 4}')
    if value is None:
        return None
    for key, count in value.items():
        if key not in MODALITIES:
            raise ValueError(f"limit_mm_per_prompt: unknown modality {key!r}; the modalities are "
                             f"{', '.join(MODALITIES)}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"limit_mm_per_prompt.{key} must be a non-negative integer; got {count!r}")
    return value


def max_images(limits: dict[str, int] | None) -> int:
    """The most images one prompt may hold under ``limits``."""
    return (limits or {}).get("image", DEFAULT_MAX_IMAGES)
