"""How a model's weight format is chosen (``resolve_quant_config``) and how bad choices are refused."""

from __future__ import annotations

import pytest

from inferneo.config import EngineConfig
from inferneo.quantization import resolve_quant_config


def test_full_precision_without_a_format():
    assert resolve_quant_config({"architectures": ["LlamaForCausalLM"]}, None) is None


def test_an_unknown_checkpoint_format_names_the_supported_ones():
    with pytest.raises(ValueError, match=r"'bitsandbytes'.*supported: fp8, compressed-tensors, awq, gptq, gguf"):
        resolve_quant_config({"quantization_config": {"quant_method": "bitsandbytes"}}, None)


def test_a_quantization_config_without_a_method_is_refused():
    with pytest.raises(ValueError, match="no quant_method"):
        resolve_quant_config({"quantization_config": {"bits": 4}}, None)


def test_the_flag_must_match_the_checkpoints_format():
    with pytest.raises(ValueError, match="quantized with awq; --quantization fp8 does not match"):
        resolve_quant_config({"quantization_config": {"quant_method": "awq", "bits": 4}}, "fp8")


def test_mxfp4_checkpoints_are_dequantized_by_the_model_and_take_no_flag():
    assert resolve_quant_config({"quantization_config": {"quant_method": "mxfp4"}}, None) is None
    with pytest.raises(ValueError, match="mxfp4 weights are de-quantized at load"):
        resolve_quant_config({"quantization_config": {"quant_method": "mxfp4"}}, "fp8")


@pytest.mark.parametrize("method", ["awq", "gptq", "compressed-tensors"])
def test_checkpoint_only_formats_need_a_checkpoint(method):
    with pytest.raises(ValueError, match=f"--quantization {method} needs a checkpoint quantized with {method}"):
        resolve_quant_config({}, method)


def test_engine_options_are_checked():
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(quantization="int3")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(kv_cache_dtype="int8")


def test_a_shard_off_the_format_groups_is_named_by_what_is_off():
    """Qwen3-like q/k/v of 192 + 64 + 64 rows in 128-row FP8 blocks: q ends (and k starts) at row 192, mid-block."""
    import torch
    from torch import nn

    from inferneo.quantization.base import LinearShape, row_shard_loader

    load = row_shard_loader(LinearShape("layers.0.self_attn.qkv_proj", 256, (192, 64, 64)), 0, (1, 128))
    param = nn.Parameter(torch.zeros(3, 2), requires_grad=False)
    with pytest.raises(ValueError, match=r"shard 0\): its size \(192 output rows\) is not a whole number"):
        load(param, torch.ones(2, 2), 0)
    with pytest.raises(ValueError, match=r"shard 1\): its offset in the fused layer \(192 output rows\)"):
        load(param, torch.ones(1, 2), 1)
