"""Qwen2 and Qwen3: the Llama decoder with bias on q/k/v (Qwen2) or per-head q/k RMSNorm (Qwen3)."""

from __future__ import annotations

from collections.abc import Callable

from inferneo.model_executor.models.llama import DecoderConfig, LlamaForCausalLM


def qwen_window(cfg: dict, is_sliding: Callable[[int], bool] | None) -> dict:
    """``DecoderConfig`` overrides for Qwen's sliding window: none unless ``use_sliding_window``; then the
    config's ``layer_types`` when it has them, else the layers ``is_sliding(i)`` picks (Hugging Face's rule for the
    family; None: every layer)."""
    if not cfg.get("use_sliding_window"):
        return dict(sliding_window=None, layer_types=None)
    layer_types = cfg.get("layer_types")
    if layer_types is None and is_sliding is not None:
        layer_types = ["sliding_attention" if is_sliding(i) else "full_attention"
                       for i in range(cfg["num_hidden_layers"])]
    return dict(sliding_window=cfg.get("sliding_window"), layer_types=layer_types)


def dense_window_layers(cfg: dict) -> Callable[[int], bool]:
    """Qwen2 and Qwen3: the layers from ``max_window_layers`` on use the window."""
    first = cfg.get("max_window_layers", 28)
    return lambda i: i >= first


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def config_from_hf(cls, cfg: dict) -> DecoderConfig:
        return DecoderConfig.from_hf(cfg, qkv_bias=True, o_bias=False, **qwen_window(cfg, dense_window_layers(cfg)))


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def config_from_hf(cls, cfg: dict) -> DecoderConfig:
        return DecoderConfig.from_hf(cfg, qk_norm=True, **qwen_window(cfg, dense_window_layers(cfg)))
