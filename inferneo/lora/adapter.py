"""PEFT LoRA folders: read ``adapter_config.json`` and ``adapter_model.safetensors``, and check them against the
model they are to run on.

PEFT's ``base_model_name_or_path`` is advisory (a folder moves, a hub id names a copy), so it is not compared:
an adapter fits a model when each of its tensors names a projection the model has (q/k/v/o/gate/up/down of a
layer that exists, or Phi-3's fused qkv/gate_up) with the widths the model's config gives, and its rank (each
module's: ``rank_pattern`` may give some their own) is at most ``max_lora_rank``. Tensors of a multimodal
checkpoint's vision tower and projector are skipped (the language model alone is served). The scale
(``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; per module where ``rank_pattern`` /
``alpha_pattern`` say so) is folded into ``lora_B`` at load.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from inferneo.engine.protocol import InvalidRequestError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_LORA_RANK_LIMIT = 64

# A decoder layer's projection; a multimodal checkpoint (Gemma 3) nests the layers under ``language_model`` (today's
# ``model.language_model.``, older Transformers' ``language_model.model.``).
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)\."
                  r"(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")
# The vision tower and projector of a multimodal checkpoint: Inferneo serves its language model alone, so deltas to
# them never run (PEFT's target_modules=["q_proj", ...] catches the tower's q_proj too) and are skipped.
_VISION = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?(?:vision_tower|vision_model|multi_modal_projector)\.")


# PEFT LoraConfig options that change what an adapter computes beyond x @ A.T @ B.T on the seven projections (set:
# refused, naming the option): variants of the product (DoRA, QALoRA, KaSA, BD-LoRA, MonteCLoRA, Arrow routing,
# aLoRA's activation after invocation tokens), weights on other modules (an embedding's trainable tokens,
# modules_to_save, target_parameters: parameters such as MoE experts), a bias on lora_B, layers replicated into a
# deeper model, and weights stored transposed.
_UNSUPPORTED = ("use_dora", "fan_in_fan_out", "modules_to_save", "lora_bias", "layer_replication",
                "trainable_token_indices", "target_parameters", "use_qalora", "alora_invocation_tokens",
                "arrow_config", "kasa_config", "use_bdlora", "monteclora_config")


class LoRAAdapterError(InvalidRequestError):
    """An adapter that cannot run on this model (a 400 naming ``lora_path`` on the server)."""

    def __init__(self, message: str, param: str = "lora_path") -> None:
        super().__init__(message, param)


@dataclass(frozen=True, slots=True)
class LoRATarget:
    """A projection of every layer that adapters may change: its input width and the checkpoint projections (PEFT
    names) whose outputs it holds side by side, with their widths (one for unfused projections)."""

    module: str  # the model's module under a decoder layer, e.g. "self_attn.qkv_proj"
    in_features: int
    shards: tuple[tuple[str, int], ...]

    @property
    def out_features(self) -> int:
        return sum(width for _, width in self.shards)

    def shard_offset(self, index: int) -> int:
        return sum(width for _, width in self.shards[:index])


def lora_targets(config) -> dict[str, LoRATarget]:
    """The adapter targets of a Llama-like decoder (``DecoderConfig``), keyed by module. A mixture-of-experts
    model's feed-forward experts are not targets."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    targets = [
        LoRATarget("self_attn.qkv_proj", config.hidden_size, (("q_proj", q), ("k_proj", kv), ("v_proj", kv))),
        LoRATarget("self_attn.o_proj", q, (("o_proj", config.hidden_size),)),
    ]
    if getattr(config, "moe", None) is None:
        inter = config.intermediate_size
        targets += [
            LoRATarget("mlp.gate_up_proj", config.hidden_size, (("gate_proj", inter), ("up_proj", inter))),
            LoRATarget("mlp.down_proj", inter, (("down_proj", config.hidden_size),)),
        ]
    return {t.module: t for t in targets}


def _peft_names(targets: dict[str, LoRATarget]) -> dict[str, tuple[LoRATarget, int | None]]:
    """PEFT module name (``q_proj``) -> (the target holding it, its shard index). A fused target's own name
    (``qkv_proj``, ``gate_up_proj``: Phi-3's modules) maps to None: one ``lora_A`` for all its shards, ``lora_B``'s
    rows theirs side by side."""
    names: dict[str, tuple[LoRATarget, int | None]] = {}
    for t in targets.values():
        names.update({name: (t, i) for i, (name, _) in enumerate(t.shards)})
        if len(t.shards) > 1:
            names[t.module.rpartition(".")[2]] = (t, None)
    return names


def _describe(peft_names: dict[str, tuple[LoRATarget, int | None]]) -> str:
    """The PEFT module names an adapter may change, for messages: ``q_proj, k_proj, v_proj (or the fused
    qkv_proj), ...``."""
    fused = {t.module: name for name, (t, shard) in peft_names.items() if shard is None}
    parts = []
    for name, (t, shard) in peft_names.items():
        if shard is None:
            continue
        last = shard == len(t.shards) - 1
        parts.append(f"{name} (or the fused {fused[t.module]})" if last and t.module in fused else name)
    return ", ".join(parts)


@dataclass(slots=True)
class LoRAAdapter:
    """An adapter's weights on the host, ready for a slot: per (layer, target module), one ``(A, B)`` pair per
    shard (None where the adapter leaves that projection alone); ``A`` is ``[r, in]``, ``B`` ``[out, r]``, already
    scaled."""

    name: str
    lora_id: int
    path: str
    rank: int
    scaling: float
    weights: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor] | None]] = field(default_factory=dict)


def read_adapter_config(path: str, max_lora_rank: int) -> tuple[int, float, dict]:
    """The rank and scale of the adapter in folder ``path`` (and its config); raises LoRAAdapterError for a
    folder that is not a PEFT LoRA adapter Inferneo can run."""
    config_path = os.path.join(path, CONFIG_FILE)
    if os.path.isfile(path):
        raise LoRAAdapterError(f"{path!r} is a file: a LoRA adapter is named by its folder (the one holding "
                               f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    if not os.path.isdir(path):
        raise LoRAAdapterError(f"LoRA adapter folder {path!r} does not exist")
    try:
        with open(config_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise LoRAAdapterError(f"{path!r} has no {CONFIG_FILE} (a PEFT LoRA adapter folder holds one)") from None
    except (OSError, ValueError) as exc:
        raise LoRAAdapterError(f"{config_path!r} cannot be read: {exc}") from None
    if not isinstance(cfg, dict):
        raise LoRAAdapterError(f"{config_path!r} must hold a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoRAAdapterError(f"{path!r} is a {peft_type} adapter; only LoRA adapters are supported")
    rank = cfg.get("r")
    if type(rank) is not int or rank < 1:
        raise LoRAAdapterError(f"{CONFIG_FILE} of {path!r}: r must be a positive integer, got {rank!r}")
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise LoRAAdapterError(f"{CONFIG_FILE} of {path!r}: lora_alpha must be a number, got {alpha!r}")
    for key, positive_int in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = cfg.get(key) or {}
        bad = not isinstance(pattern, dict) or any(
            not isinstance(value, (int, float)) or isinstance(value, bool) or (positive_int and (
                type(value) is not int or value < 1)) for value in pattern.values())
        if bad:
            raise LoRAAdapterError(f"{CONFIG_FILE} of {path!r}: {key} must map module patterns to "
                                   f"{'positive integers' if positive_int else 'numbers'}, got {pattern!r}")
        for module_pattern in pattern:
            try:
                re.compile(module_pattern)
            except re.error as exc:
                raise LoRAAdapterError(f"{CONFIG_FILE} of {path!r}: {key} has {module_pattern!r}, not a regular "
                                       f"expression ({exc})") from None
    largest = max([rank, *(cfg.get("rank_pattern") or {}).values()])
    if largest > max_lora_rank:
        where = f"r={rank}" if largest == rank else f"rank_pattern rank {largest}"
        raise LoRAAdapterError(f"the adapter at {path!r} has {where}, above max_lora_rank "
                               f"{max_lora_rank} (raise --max-lora-rank, at most {MAX_LORA_RANK_LIMIT})")
    unsupported = [(key, cfg[key]) for key in _UNSUPPORTED if cfg.get(key)]
    if cfg.get("bias", "none") != "none":
        unsupported.append(("bias", cfg["bias"]))
    if unsupported:
        what = ", ".join(f"{key}={value!r}" for key, value in unsupported)
        raise LoRAAdapterError(f"{CONFIG_FILE} of {path!r} asks for what Inferneo's LoRA does not support: {what}")
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    return largest, float(scaling), cfg


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's per-module setting: the value of the first pattern of ``rank_pattern`` / ``alpha_pattern`` that
    matches the end of ``module``'s name (``model.layers.0.self_attn.q_proj``) at a dot, else ``default``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _module_rank_and_scale(cfg: dict, module: str) -> tuple[int, float]:
    """The rank and scale of the adapted ``module`` (its name in the model), ``rank_pattern`` and ``alpha_pattern``
    applied as PEFT applies them."""
    rank = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
    return rank, float(alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank)


def load_adapter(name: str, lora_id: int, path: str, targets: dict[str, LoRATarget], num_layers: int,
                 max_lora_rank: int, dtype: torch.dtype = torch.float32) -> LoRAAdapter:
    """Read the PEFT adapter in folder ``path`` and check it against the model's ``targets`` and ``num_layers``;
    raises LoRAAdapterError (naming what does not fit) when it cannot run on this model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    rank, scaling, cfg = read_adapter_config(path, max_lora_rank)
    weights_path = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        raise LoRAAdapterError(f"{path!r} has no {WEIGHTS_FILE} (only PEFT's safetensors format is read)")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoRAAdapterError(f"{weights_path!r} cannot be read: {exc}") from None
    peft_names = _peft_names(targets)
    halves: dict[tuple[int, str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None and _VISION.match(key):
            continue
        if match is None or match.group(3) not in peft_names or \
                not peft_names[match.group(3)][0].module.startswith(match.group(2) + "."):
            raise LoRAAdapterError(f"the adapter at {path!r} changes {key!r}, which is not a projection this model's "
                                   f"LoRA supports ({_describe(peft_names)} of the decoder layers)")
        layer = int(match.group(1))
        if layer >= num_layers:
            raise LoRAAdapterError(f"the adapter at {path!r} changes layer {layer}; the model has {num_layers} "
                                   "layers (an adapter of another base model?)")
        halves.setdefault((layer, match.group(3), key.rsplit(".lora_", 1)[0]), {})[match.group(4)] = tensor
    adapter = LoRAAdapter(name, lora_id, path, rank, scaling)
    for (layer, peft_name, prefix), pair in sorted(halves.items()):
        target, shard = peft_names[peft_name]
        if set(pair) != {"A", "B"}:
            raise LoRAAdapterError(f"the adapter at {path!r} has only lora_{''.join(pair)} of {prefix!r}: both "
                                   "lora_A and lora_B are needed")
        a, b = pair["A"], pair["B"]
        module_rank, module_scaling = _module_rank_and_scale(cfg, prefix.removeprefix("base_model.model."))
        out = target.out_features if shard is None else target.shards[shard][1]
        want_a, want_b = (module_rank, target.in_features), (out, module_rank)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise LoRAAdapterError(
                f"the adapter at {path!r} does not fit this model: {prefix} has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}, the model's {peft_name} needs {want_a} and {want_b} (rank {module_rank}): an "
                "adapter of another base model?")
        pairs = adapter.weights.setdefault((layer, target.module), [None] * len(target.shards))
        a = a.to(dtype).contiguous()
        b = b.float() * module_scaling
        # a fused module's lora_B splits into its shards' rows, each shard with the same lora_A
        for index in range(len(target.shards)) if shard is None else (shard,):
            if pairs[index] is not None:
                raise LoRAAdapterError(f"the adapter at {path!r} changes {target.shards[index][0]} of layer {layer} "
                                       f"twice (as {peft_name} and as part of another module)")
            rows = b if shard is not None else b[target.shard_offset(index) : target.shard_offset(index + 1)]
            pairs[index] = (a, rows.to(dtype).contiguous())
    if not adapter.weights:
        raise LoRAAdapterError(f"the adapter at {path!r} holds no LoRA weights")
    return adapter
