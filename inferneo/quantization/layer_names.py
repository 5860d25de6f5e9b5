"""Matching an engine linear layer against a checkpoint's lists of module names (``ignored_layers``,
``modules_to_not_convert``, compressed-tensors ``ignore`` and ``targets``).

Checkpoints name the modules Hugging Face's model has: ``model.layers.0.self_attn.q_proj``. The engine fuses some
of them (``qkv_proj`` holds ``q_proj``, ``k_proj``, ``v_proj``), so a fused layer matches a list when each of its
parts does; a list naming only some parts of one fused layer is refused (the parts must share one format).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from inferneo.quantization.base import LinearShape, QuantConfig

# Engine fused layer -> the checkpoint modules it holds, in shard order (the model files' ``stacked_params``).
FUSED_PARTS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def checkpoint_module_names(config: QuantConfig, shape: LinearShape) -> tuple[str, ...]:
    """The checkpoint module names of engine layer ``shape.prefix``: one per logical shard of a fused layer the
    checkpoint stores in parts, else the layer's own name."""
    parent, _, leaf = shape.prefix.rpartition(".")
    parts = FUSED_PARTS.get(leaf)
    if parts is None or len(parts) != len(shape.output_sizes):
        return (config.checkpoint_name(shape.prefix),)
    return tuple(config.checkpoint_name(f"{parent}.{part}" if parent else part) for part in parts)


def name_matches(name: str, pattern: str) -> bool:
    """Whether module ``name`` is named by ``pattern``: a regular expression after ``re:`` (matched from the
    start, as compressed-tensors does), else the name itself, a module containing it (``model.layers.0.mlp``) or a
    trailing part of it (``lm_head``, ``mlp.down_proj``)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.startswith(pattern + ".") or name.endswith("." + pattern)


def contains_pattern(name: str, pattern: str) -> bool:
    """Whether ``pattern`` occurs in module ``name``: how AutoAWQ and transformers read ``modules_to_not_convert``
    (``"gate"`` names ``model.layers.0.mlp.gate``, ``"visual"`` every module under ``visual``)."""
    return bool(pattern) and pattern in name


def layer_listed(config: QuantConfig, shape: LinearShape, patterns: Sequence[str], what: str,
                 match: Callable[[str, str], bool] = name_matches) -> bool:
    """Whether every checkpoint module of layer ``shape`` is named in ``patterns`` (False when none is); raises
    ValueError when only some parts of a fused layer are (``what`` names the list in the message). ``match(name,
    pattern)`` says whether a pattern names a module (default :func:`name_matches`)."""
    names = checkpoint_module_names(config, shape)
    hits = [any(match(name, p) for p in patterns) for name in names]
    if all(hits):
        return True
    if any(hits):
        listed = [n for n, hit in zip(names, hits, strict=True) if hit]
        raise ValueError(f"{config.name}: the checkpoint's {what} names {', '.join(listed)} but not the other parts "
                         f"of the fused layer {shape.prefix} ({', '.join(names)}); Inferneo runs a fused layer in "
                         f"one format")
    return False
