"""The KV cache's element type (``--kv-cache-dtype``) and the FP8 scales of each attention layer.

``auto`` keeps the model dtype. ``fp8`` (alias ``fp8_e4m3``) stores keys and values as float8 e4m3 with one
float32 scale per KV head for keys and one for values (``inferneo.attention.fp8_kv``): a block takes a quarter of
float32's bytes and half of bfloat16's, so the same ``kv_cache_memory`` holds 4x / 2x the tokens.

Scales come from the checkpoint when it has them, under the names vLLM and compressed-tensors write (per tensor:
one value; per head: one value per KV head):

* ``<layer>.self_attn.k_scale`` and ``<layer>.self_attn.v_scale``;
* ``<layer>.self_attn.kv_scale`` (older checkpoints: one scale for both);
* ``<layer>.self_attn.k_proj.k_scale`` / ``<layer>.self_attn.v_proj.v_scale`` (NVIDIA ModelOpt), and
  ``<layer>.self_attn.qkv_proj.k_scale`` / ``.v_scale`` for models that store q/k/v fused (Phi-3; vLLM reads them);
* ``<layer>.self_attn.k_proj.output_scale`` / ``<layer>.self_attn.v_proj.output_scale`` (older
  compressed-tensors).

A checkpoint without them gets scale 1.0 for every head (what vLLM does), with a warning: values are stored as
they are, saturating at +-448; e4m3 keeps about two significant decimal digits over 2^-9 .. 448, which covers the
keys and values of the models tested here (docs/quantization.md has the measured agreement). With ``auto`` any
such tensors are dropped.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from inferneo.attention.backend import AttentionFeature
from inferneo.attention.fp8_kv import FP8_KV_DTYPE, KVCacheScales
from inferneo.attention.kv_spec import KVCacheSpec

logger = logging.getLogger(__name__)

FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3")

# checkpoint name -> (attention module name, which scales it sets: "k", "v" or "kv")
_SCALE_NAME = re.compile(r"^(?:model\.)?(?P<module>.+\.self_attn)\.(?:"
                         r"(?P<k>k_scale|k_proj\.k_scale|qkv_proj\.k_scale|k_proj\.output_scale)|"
                         r"(?P<v>v_scale|v_proj\.v_scale|qkv_proj\.v_scale|v_proj\.output_scale)|"
                         r"(?P<kv>kv_scale))$")


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The element type of the KV cache for the ``kv_cache_dtype`` option: the model dtype for ``auto``,
    float8 e4m3 for ``fp8`` / ``fp8_e4m3``."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype in FP8_KV_CACHE_DTYPES:
        return FP8_KV_DTYPE
    raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not supported; supported: auto, "
                     f"{', '.join(FP8_KV_CACHE_DTYPES)}")


def check_fp8_kv_cache_supported(device: torch.device, specs: list[KVCacheSpec], model_name: str) -> None:
    """Raise ValueError when an FP8 KV cache cannot run here: a CUDA GPU older than Ada/Hopper (no e4m3
    conversions), or a layer whose attention backend does not store FP8 (latent attention)."""
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise ValueError(f"kv_cache_dtype fp8 needs a GPU with FP8 support (compute capability 8.9+: Ada, "
                             f"Hopper or newer); {torch.cuda.get_device_name(device)} has "
                             f"{capability[0]}.{capability[1]}; use kv_cache_dtype auto")
    for spec in specs:
        if AttentionFeature.FP8_KV_CACHE not in spec.backend.supported_features:
            raise ValueError(f"kv_cache_dtype fp8 is not supported by the {spec.backend.name!r} attention backend "
                             f"that {model_name} uses; FP8 KV caches are stored by the 'torch', 'cpu' and 'triton' "
                             "backends of standard attention layers; use kv_cache_dtype auto")


def install_kv_scales(model: nn.Module, device: torch.device) -> int:
    """Give every attention layer of ``model`` (each module with a ``kv_scales`` attribute) unit FP8 scales for
    its KV heads; returns how many layers took them."""
    count = 0
    for module in model.modules():
        if hasattr(module, "kv_scales"):
            module.kv_scales = KVCacheScales.ones(module.num_kv_heads, device)
            count += 1
    return count


@dataclass
class CheckpointKVScales:
    """The KV cache scales met in a checkpoint, by attention module name (``layers.0.self_attn``) and kind
    (``k``, ``v``, or ``kv`` for an older single scale)."""

    scales: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def split(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """``weights`` without the KV cache scales, which are kept here as the iteration passes them."""
        for name, tensor in weights:
            match = _SCALE_NAME.match(name)
            if match is None:
                yield name, tensor
                continue
            which = next(key for key in ("k", "v", "kv") if match.group(key))
            self.scales.setdefault(match.group("module"), {})[which] = tensor

    def layer_scales(self, module: str) -> dict[str, torch.Tensor]:
        """The ``k`` and ``v`` scales found for attention module ``module``: its own k_scale / v_scale, else its
        older kv_scale for both."""
        found = self.scales.get(module, {})
        return {part: found[part] if part in found else found["kv"] for part in ("k", "v")
                if part in found or "kv" in found}

    def apply(self, model: nn.Module, fp8: bool) -> None:
        """Load the scales into the layers' ``kv_scales`` (an FP8 cache), or drop them (log lines say which)."""
        if not fp8:
            if self.scales:
                logger.info("the checkpoint's KV cache scales (%d layers) are unused: the KV cache is in the model "
                            "dtype (kv_cache_dtype auto)", len(self.scales))
            return
        layers = {name: module for name, module in model.named_modules() if getattr(module, "kv_scales", None)}
        unknown = sorted(set(self.scales) - set(layers))
        if unknown:
            raise ValueError(f"checkpoint KV cache scales for {', '.join(unknown[:4])} do not belong to an attention "
                             "layer of this model")
        for name in self.scales:
            layer = layers[name]
            for which, tensor in self.layer_scales(name).items():
                # under tensor parallelism the layer holds some of the KV heads: their scales of a per-head tensor
                heads = getattr(layer, "kv_heads_held", None)
                if heads is not None and tensor.numel() == heads.total:
                    tensor = tensor.reshape(-1)[heads.start : heads.start + layer.num_kv_heads]
                layer.kv_scales.set(which, tensor)
        missing = [name for name in layers if set(self.layer_scales(name)) != {"k", "v"}]
        if missing:
            logger.warning("FP8 KV cache: %d of %d attention layers have no k_scale/v_scale in the checkpoint; they "
                           "use scale 1.0 (values saturate at +-448)", len(missing), len(layers))
        else:
            logger.info("FP8 KV cache: k/v scales loaded from the checkpoint for all %d attention layers", len(layers))
