"""compressed-tensors checkpoints (``quant_method: compressed-tensors``, as llm-compressor writes them).

``quantization_config`` holds ``config_groups``: each names its ``targets`` (``Linear``: every linear layer; a
``re:`` regular expression or a module name, matched against the checkpoint's module names) and the
``weights`` / ``input_activations`` quantization arguments; ``ignore`` lists modules that stay in full precision
(names or ``re:`` patterns); ``format`` says how the weights are stored (a group may override it). Supported:

- ``float-quantized`` (also ``naive-quantized`` with float weights): 8-bit float (e4m3) weights with one scale
  per tensor, per output channel (``weight_scale [out, 1]``) or per block, and 8-bit float activations quantized
  dynamically per token or per tensor, or statically per tensor (``input_scale``) -> :class:`Fp8LinearMethod`;
- ``pack-quantized``: 4-bit integer weights (per group of input columns or per channel) with activations in
  full precision (W4A16) -> ``Int4LinearMethod(Int4Scheme("compressed-tensors", ...))`` from
  :mod:`inferneo.quantization.int4`.

A group's first matching target wins (groups in the order the checkpoint lists them).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from inferneo.quantization.base import LinearMethod, LinearShape, QuantConfig
from inferneo.quantization.fp8 import Fp8LinearMethod, Fp8Scheme, dequantize_fp8_weights, fp8_dequantized_on
from inferneo.quantization.layer_names import checkpoint_module_names, layer_listed, name_matches

SUPPORTED = ("float-quantized: FP8 (e4m3) weights per tensor, channel or block with FP8 activations dynamic per "
             "token or tensor or static per tensor (W8A8); pack-quantized: 4-bit integer weights per group or channel "
             "with full-precision activations (W4A16)")
_FLOAT_FORMATS = ("float-quantized", "naive-quantized")


@dataclass(frozen=True, slots=True)
class QuantGroup:
    """One of the checkpoint's ``config_groups``: the layers it covers and the method that runs them."""

    name: str
    targets: tuple[str, ...]
    method: LinearMethod

    @property
    def is_fp8(self) -> bool:
        return isinstance(self.method, Fp8LinearMethod)


def _unsupported(group: str, why: str) -> ValueError:
    return ValueError(f"compressed-tensors group {group!r}: {why}; supported: {SUPPORTED}")


def _fp8_scheme(group: str, weights: dict[str, Any], acts: dict[str, Any] | None) -> Fp8Scheme:
    if not weights.get("symmetric", True) or weights.get("dynamic", False):
        raise _unsupported(group, "FP8 weights must be symmetric with static scales")
    strategy = weights.get("strategy")
    block = None
    if strategy == "block":
        structure = weights.get("block_structure")
        if not isinstance(structure, list | tuple) or len(structure) != 2:
            raise _unsupported(group, f"block weights need a block_structure of two numbers; got {structure!r}")
        block = (int(structure[0]), int(structure[1]))
    elif strategy not in ("tensor", "channel"):
        raise _unsupported(group, f"FP8 weights with strategy {strategy!r}")
    if acts is None:
        raise _unsupported(group, "FP8 weights without FP8 activations (W8A16)")
    if acts.get("type") != "float" or acts.get("num_bits") != 8 or not acts.get("symmetric", True):
        raise _unsupported(group, f"activations {acts.get('type')}{acts.get('num_bits')} "
                                  f"(symmetric={acts.get('symmetric', True)}) with FP8 weights")
    act_strategy, dynamic = acts.get("strategy"), bool(acts.get("dynamic"))
    if block is not None:
        if not dynamic or act_strategy not in ("token", "group"):
            raise _unsupported(group, "block-wise FP8 weights need dynamic per-token (or per-group) activations")
        if act_strategy == "group" and acts.get("group_size") != block[1]:
            raise _unsupported(group, f"block-wise FP8 weights ({block[0]}x{block[1]}) with activation groups of "
                                      f"{acts.get('group_size')} (they must match the block's columns)")
        return Fp8Scheme("block", block, "dynamic_token")
    if dynamic and act_strategy == "token":
        activation = "dynamic_token"
    elif dynamic and act_strategy == "tensor":
        activation = "dynamic_tensor"
    elif not dynamic and act_strategy == "tensor":
        activation = "static_tensor"
    else:
        raise _unsupported(group, f"FP8 activations with strategy {act_strategy!r} (dynamic={dynamic})")
    return Fp8Scheme(strategy, None, activation)


def _int4_method(group: str, weights: dict[str, Any]) -> LinearMethod:
    strategy = weights.get("strategy")
    if strategy == "group":
        group_size = int(weights.get("group_size") or 0)
        if group_size <= 0:
            raise _unsupported(group, "4-bit group weights without a positive group_size")
    elif strategy == "channel":
        group_size = -1  # one scale per output row over all input columns (GPTQ's spelling)
    else:
        raise _unsupported(group, f"4-bit weights with strategy {strategy!r}")
    try:
        from inferneo.quantization.int4 import Int4LinearMethod, Int4Scheme
    except ImportError as exc:
        raise ValueError(f"compressed-tensors pack-quantized (4-bit) weights need inferneo.quantization.int4, "
                         f"which is not available in this install ({exc})") from None
    return Int4LinearMethod(Int4Scheme("compressed-tensors", group_size, zero_point=not weights.get("symmetric", True),
                                       desc_act=weights.get("actorder") == "group"))


def _group_method(group: str, spec: dict[str, Any], default_format: str | None) -> LinearMethod:
    fmt = spec.get("format") or default_format
    weights = spec.get("weights")
    acts = spec.get("input_activations")
    if not isinstance(weights, dict):
        raise _unsupported(group, "no weight quantization (activation-only schemes)")
    if spec.get("output_activations") is not None:
        raise _unsupported(group, "output activation quantization")
    kind, bits = weights.get("type"), weights.get("num_bits")
    if kind == "float" and bits == 8 and fmt in _FLOAT_FORMATS:
        return Fp8LinearMethod(_fp8_scheme(group, weights, acts))
    if kind == "int" and bits == 4 and fmt == "pack-quantized":
        if acts is not None:
            raise _unsupported(group, "4-bit weights with quantized activations (W4A8)")
        return _int4_method(group, weights)
    raise _unsupported(group, f"format {fmt!r} with {kind}{bits} weights")


def _refuse_weight_transforms(quantization_config: dict[str, Any]) -> None:
    """Raise ValueError for what changes the weights beyond the quantization groups: a sparse storage format
    (``sparsity_config`` other than ``dense``: 2:4 bitmask or packed tensors) and ``transform_config`` rotations
    (QuIP, SpinQuant: Hadamard matrices applied to the activations at run time)."""
    sparsity = quantization_config.get("sparsity_config") or {}
    if isinstance(sparsity, dict) and sparsity.get("format", "dense") not in ("dense", None):
        raise ValueError(f"compressed-tensors checkpoint: sparse weights (sparsity_config format "
                         f"{sparsity.get('format')!r}) are not supported; supported: dense weights with "
                         f"{SUPPORTED}")
    transform = quantization_config.get("transform_config") or {}
    if isinstance(transform, dict) and transform.get("config_groups"):
        raise ValueError(f"compressed-tensors checkpoint: transform_config (rotations applied at run time, as QuIP "
                         f"and SpinQuant write them: groups {', '.join(transform['config_groups'])}) is not supported; "
                         f"supported: {SUPPORTED}")


class CompressedTensorsConfig(QuantConfig):
    """A compressed-tensors checkpoint's quantization: its groups (:class:`QuantGroup`) and ``ignore`` list."""

    name = "compressed-tensors"

    def __init__(self, groups: Iterable[QuantGroup], ignore: Iterable[str] = (), fmt: str | None = None) -> None:
        self.groups = tuple(groups)
        self.ignore = tuple(ignore)
        self.format = fmt
        # Set by check_supported: the FP8 groups of a checkpoint on CPU are de-quantized while loading.
        self.dequantize_fp8_at_load = False
        # Checkpoint modules that load into quantized layers (method_for records them); other FP8 weights (MoE
        # experts, or every FP8 layer when de-quantizing at load) are de-quantized while loading.
        self.quantized_modules: set[str] = set()

    @classmethod
    def from_hf(cls, quantization_config: dict[str, Any]) -> CompressedTensorsConfig:
        """Parse ``config_groups`` (``targets``, ``weights``, ``input_activations``, optional per-group
        ``format``), ``ignore`` and ``format``; raises ValueError naming what is supported for other schemes."""
        fmt = quantization_config.get("format")
        _refuse_weight_transforms(quantization_config)
        groups_spec = quantization_config.get("config_groups")
        if not isinstance(groups_spec, dict) or not groups_spec:
            raise ValueError("compressed-tensors checkpoint: quantization_config has no config_groups")
        groups = []
        for name, spec in groups_spec.items():
            targets = spec.get("targets")
            if isinstance(targets, str):
                targets = [targets]
            if not targets:
                raise ValueError(f"compressed-tensors group {name!r} has no targets")
            groups.append(QuantGroup(name, tuple(targets), _group_method(name, spec, fmt)))
        return cls(groups, quantization_config.get("ignore") or (), fmt)

    def _group_for(self, shape: LinearShape) -> QuantGroup | None:
        for group in self.groups:
            if "Linear" in group.targets:
                return group
            if layer_listed(self, shape, [t for t in group.targets if t != "Linear"], f"{group.name} targets"):
                return group
        return None

    def method_for(self, shape: LinearShape) -> LinearMethod | None:
        if layer_listed(self, shape, self.ignore, "ignore"):
            return None
        group = self._group_for(shape)
        if group is None or (group.is_fp8 and self.dequantize_fp8_at_load):
            return None
        self.quantized_modules.update(checkpoint_module_names(self, shape))
        return group.method

    def check_supported(self, device: torch.device, dtype: torch.dtype) -> None:
        if any(group.is_fp8 for group in self.groups):
            self.dequantize_fp8_at_load = fp8_dequantized_on(device, f"{self.name} ({self.format})", online=False)

    def _int4_scheme_of(self, module: str):
        """The 4-bit scheme of checkpoint module ``module`` (by the groups' targets and ``ignore``), or None."""
        if any(name_matches(module, pattern) for pattern in self.ignore):
            return None
        for group in self.groups:
            if "Linear" in group.targets or any(name_matches(module, t) for t in group.targets if t != "Linear"):
                return None if group.is_fp8 else group.method.scheme
        return None

    def prepare_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """FP8 and 4-bit weights of modules that are not quantized layers (MoE experts; every FP8 weight when
        de-quantizing at load) become float32 (see :func:`dequantize_fp8_weights` and
        ``int4.dequantize_int4_weights``); the tensors of quantized layers pass unchanged."""
        if not all(group.is_fp8 for group in self.groups):
            from inferneo.quantization.int4 import dequantize_int4_weights

            weights = dequantize_int4_weights(weights, self._int4_scheme_of, self.quantized_modules)
        if not any(group.is_fp8 for group in self.groups):
            yield from weights
            return
        blocks = [g.method.scheme.block for g in self.groups if g.is_fp8 and g.method.scheme.block is not None]
        yield from dequantize_fp8_weights(weights, "weight_scale", blocks[0] if blocks else None,
                                          self.quantized_modules)

    def describe(self) -> str:
        parts = []
        for group in self.groups:
            scheme = getattr(group.method, "scheme", None)
            parts.append(f"{group.name}: {group.method.name} {scheme}")
        extra = ", FP8 de-quantized at load" if self.dequantize_fp8_at_load else ""
        return f"compressed-tensors ({self.format}; {'; '.join(parts)}{extra})"
