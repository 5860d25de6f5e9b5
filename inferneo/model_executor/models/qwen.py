"""Qwen2 and Qwen3: the Llama decoder with bias on q/k/v (Qwen2) or per-head q/k RMSNorm (Qwen3)."""

from __future__ import annotations

from inferneo.model_executor.models.llama import DecoderConfig, LlamaForCausalLM


def _window(cfg: dict) -> int | None:
    return cfg.get("sliding_window") if cfg.get("use_sliding_window") else None


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def config_from_hf(cls, cfg: dict) -> DecoderConfig:
        return DecoderConfig.from_hf(cfg, qkv_bias=True, o_bias=False, sliding_window=_window(cfg))


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def config_from_hf(cls, cfg: dict) -> DecoderConfig:
        return DecoderConfig.from_hf(cfg, qk_norm=True, sliding_window=_window(cfg))
