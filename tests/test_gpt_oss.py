"""gpt-oss (``GptOssForCausalLM``): MXFP4 de-quantization bit-exact against transformers' own, the checkpoint's
expert layout (interleaved gate/up, transposed, MXFP4) converted so that a layer's experts give what Hugging Face's
``GptOssMLP`` gives, unsupported configs refused with a message naming the option; greedy tokens equal Hugging
Face's for an MXFP4 checkpoint, with yarn rope, and past the sliding window (HF parity over every engine mechanism
is in test_hf_parity.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_hf_parity import hf_greedy, mixed_prompts, run_engine, two_rank_engine

from inferneo import LLM
from inferneo.model_executor.models.gpt_oss import GptOssForCausalLM
from inferneo.model_executor.models.registry import get_model_class
from inferneo.model_executor.mxfp4 import Mxfp4Weight, dequantize_mxfp4, pair_mxfp4_weights, quantize_mxfp4
from inferneo.model_loader.hf_files import hf_config, iter_hf_weights


def _random_mxfp4(shape: tuple[int, ...], seed: int, scale_range: tuple[int, int] = (0, 255)):
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(*scale_range, shape, dtype=torch.uint8, generator=gen)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_is_bit_exact_with_transformers(dtype):
    """Every nibble, every e8m0 exponent but the NaN code: the same bits as transformers' de-quantizer, which
    returns ``[E, cols, rows]`` (the transpose of the stored ``[E, rows, cols]``)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = _random_mxfp4((4, 48, 3), seed=0)
    expected = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    got = dequantize_mxfp4(blocks, scales, dtype)
    assert got.shape == (4, 48, 96) and got.dtype == dtype
    int_type = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got.transpose(1, 2).contiguous().view(int_type), expected.view(int_type))
    weight = Mxfp4Weight(blocks=blocks, scales=scales)
    assert weight.shape == (4, 48, 96)
    assert torch.equal(weight.dequantize(dtype), got)


def test_nibble_order_and_scale_bias():
    """Low nibble first; e8m0 127 is 2**0."""
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x72  # low nibble 2 (1.0), high nibble 7 (6.0)
    blocks[0, 0, 1] = 0x9F  # low nibble 15 (-6.0), high nibble 9 (-0.5)
    values = dequantize_mxfp4(blocks, torch.tensor([[128]], dtype=torch.uint8))
    assert values[0, :4].tolist() == [2.0, 12.0, -12.0, -1.0]
    assert not values[0, 4:].any()


def test_quantize_inverts_dequantize():
    blocks, scales = _random_mxfp4((2, 8, 2), seed=1, scale_range=(100, 140))
    values = dequantize_mxfp4(blocks, scales)
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(values)), values)
    weight = torch.randn(3, 5, 64)
    error = (dequantize_mxfp4(*quantize_mxfp4(weight)) - weight).abs()
    # Half the widest e2m1 step (4 to 6) at a scale of at most twice amax / 6: a third of the group's largest value.
    group_max = weight.abs().unflatten(-1, (2, 32)).amax(dim=-1, keepdim=True)
    assert (error.unflatten(-1, (2, 32)) <= group_max / 3 + 1e-6).all()


def test_pairing_joins_blocks_and_scales_and_reports_orphans():
    blocks, scales = _random_mxfp4((2, 4, 1), seed=2)
    other = torch.ones(3)
    stream = [("a.w_scales", scales), ("b", other), ("a.w_blocks", blocks)]
    paired = list(pair_mxfp4_weights(stream))
    assert [name for name, _ in paired] == ["b", "a.w"]
    assert paired[0][1] is other and isinstance(paired[1][1], Mxfp4Weight)
    assert paired[1][1].blocks is blocks and paired[1][1].scales is scales
    with pytest.raises(ValueError, match="a.w_blocks"):
        list(pair_mxfp4_weights([("a.w_blocks", blocks)]))
    with pytest.raises(ValueError, match="do not match"):
        dequantize_mxfp4(blocks, scales[..., :0])


@pytest.fixture(scope="module")
def gpt_oss_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("gpt_oss", top_k=4)


@pytest.fixture(scope="module")
def gpt_oss_mxfp4_dir(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("gpt_oss", top_k=4, mxfp4=True)


def _hf_model(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs).eval()


def _engine_model(path) -> GptOssForCausalLM:
    config = hf_config(path)
    assert get_model_class(config) is GptOssForCausalLM
    model = GptOssForCausalLM(GptOssForCausalLM.config_from_hf(config), backend=None)
    model.load_weights(iter_hf_weights(path))
    return model.eval()


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16-layout", "mxfp4"])
def test_experts_equal_hf_mlp(gpt_oss_dir, gpt_oss_mxfp4_dir, quantized):
    """Each layer's router + experts, loaded from the checkpoint, give Hugging Face's ``GptOssMLP`` output."""
    from transformers import Mxfp4Config

    path = gpt_oss_mxfp4_dir if quantized else gpt_oss_dir
    hf = _hf_model(path, **({"quantization_config": Mxfp4Config(dequantize=True)} if quantized else {}))
    ours = _engine_model(path)
    x = torch.randn(37, ours.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for hf_layer, layer in zip(hf.model.layers, ours.layers, strict=True):
            expected, _ = hf_layer.mlp(x.unsqueeze(0))
            torch.testing.assert_close(layer.mlp(x), expected[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer.self_attn.sinks, hf_layer.self_attn.sinks, rtol=0, atol=0)


def test_mxfp4_checkpoint_stores_blocks_and_scales(gpt_oss_mxfp4_dir):
    config = hf_config(gpt_oss_mxfp4_dir)
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    shapes = {name: tuple(t.shape) for name, t in iter_hf_weights(gpt_oss_mxfp4_dir)}
    hidden, inter, experts = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    prefix = "model.layers.0.mlp.experts."
    assert shapes[prefix + "gate_up_proj_blocks"] == (experts, 2 * inter, hidden // 32, 16)
    assert shapes[prefix + "gate_up_proj_scales"] == (experts, 2 * inter, hidden // 32)
    assert shapes[prefix + "down_proj_blocks"] == (experts, hidden, inter // 32, 16)
    assert prefix + "gate_up_proj" not in shapes


_TINY = {"architectures": ["GptOssForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 32,
         "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
         "num_local_experts": 4, "num_experts_per_tok": 2, "rope_parameters": {"rope_type": "default",
                                                                               "rope_theta": 150000.0}}


def test_config_defaults_follow_hf():
    """Without layer_types / sliding_window / rope values, Hugging Face's defaults: a 128-token window on even
    layers, yarn (factor 32 over 4096 positions) with theta 150000."""
    config = GptOssForCausalLM.config_from_hf(dict(_TINY))
    assert config.rope_scaling is None and config.rope_theta == 150000.0  # the plain rope _TINY asks for
    bare = {k: v for k, v in _TINY.items() if k != "rope_parameters"}
    for cfg in (bare, {**bare, "rope_scaling": None}):  # GptOssConfig reads both as its default yarn
        config_bare = GptOssForCausalLM.config_from_hf(cfg)
        assert config_bare.rope_theta == 150000.0
        assert config_bare.rope_scaling["rope_type"] == "yarn" and config_bare.rope_scaling["factor"] == 32.0
    assert config.layer_types == ("sliding_attention", "full_attention")
    assert [config.sliding_window_for(i) for i in range(2)] == [128, None]
    assert config.qkv_bias and config.o_bias
    assert config.moe.routing == "topk_softmax" and config.moe.activation == "swigluoai"
    assert config.moe.expert_bias and config.moe.router_bias


@pytest.mark.parametrize("override,message", [
    ({"quantization_config": {"quant_method": "gptq"}}, "quant_method 'gptq'.*mxfp4"),
    ({"swiglu_limit": 5.0}, "swiglu_limit=5.0"),
    ({"swiglu_alpha": 1.5}, "swiglu_alpha=1.5"),
])
def test_unsupported_config_is_refused(override, message):
    with pytest.raises(ValueError, match=message):
        GptOssForCausalLM.config_from_hf({**_TINY, **override})


def test_wrong_expert_shape_is_reported(gpt_oss_dir):
    model = GptOssForCausalLM(GptOssForCausalLM.config_from_hf(hf_config(gpt_oss_dir)), backend=None)
    weights = [(n, t[:, :-1] if n.endswith("experts.down_proj") else t) for n, t in iter_hf_weights(gpt_oss_dir)]
    with pytest.raises(ValueError, match="down_proj"):
        model.load_weights(weights)


# ---- the engine against Hugging Face's generate (float32, eager attention so the sinks apply) ----------------------
# One prompt, 16 mixed prompts and the engine's mechanisms for the plain checkpoint run in test_hf_parity.py.

_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
         "original_max_position_embeddings": 4096}


def test_mxfp4_checkpoint_matches_hf(gpt_oss_mxfp4_dir):
    """The MXFP4 checkpoint, de-quantized at load, against Hugging Face on the same checkpoint (which de-quantizes
    it with its own code), with chunked prefill so prompts also arrive in pieces."""
    prompts = mixed_prompts(8, 300, seed=11, shared_prefix=20)
    expected = [hf_greedy(gpt_oss_mxfp4_dir, p) for p in prompts]
    llm = LLM(str(gpt_oss_mxfp4_dir), dtype="float32", max_num_batched_tokens=32)
    assert run_engine(llm, prompts) == expected


def test_yarn_rope_matches_hf(tiny_checkpoint_factory):
    """gpt-oss's real rope: yarn, factor 32 over 4096 original positions, untruncated correction range."""
    path = tiny_checkpoint_factory("gpt_oss", top_k=4, rope_scaling=_YARN)
    assert hf_config(path)["rope_scaling"]["rope_type"] == "yarn"
    prompts = mixed_prompts(8, 300, seed=12)
    expected = [hf_greedy(path, p) for p in prompts]
    assert run_engine(LLM(str(path), dtype="float32"), prompts) == expected


def test_generating_past_the_window_matches_hf_and_the_window_matters(gpt_oss_dir, tmp_path):
    """A 90-token prompt and 12 new tokens against a 16-token window: Hugging Face's tokens, which differ from what
    the same weights give without a window (so the window is enforced, not ignored)."""
    prompt = mixed_prompts(1, 300, seed=13, shared_prefix=90)[0]
    expected = hf_greedy(gpt_oss_dir, prompt)
    assert run_engine(LLM(str(gpt_oss_dir), dtype="float32", max_num_batched_tokens=32), [prompt]) == [expected]
    unwindowed = tmp_path / "no-window"
    shutil.copytree(gpt_oss_dir, unwindowed)
    config = json.loads((unwindowed / "config.json").read_text())
    config["layer_types"] = ["full_attention"] * config["num_hidden_layers"]
    (unwindowed / "config.json").write_text(json.dumps(config))
    assert hf_greedy(unwindowed, prompt) != expected


@pytest.mark.parametrize("mxfp4", [False, True], ids=["bf16-layout", "mxfp4"])
def test_tensor_parallel_2_matches_hf(tiny_checkpoint_factory, mxfp4):
    """TP=2 over gloo: two query heads and their sinks per rank, half of every expert's features; greedy tokens
    past the window equal Hugging Face's (as TP=1's do)."""
    path = tiny_checkpoint_factory("gpt_oss", top_k=4, mxfp4=mxfp4)
    prompts = mixed_prompts(4, 300, seed=14, shared_prefix=20)
    expected = [hf_greedy(path, p) for p in prompts]
    with two_rank_engine(path) as llm:
        layer = llm.engine.runner.driver.model.layers[0]
        assert layer.self_attn.sinks.shape == (2,) and layer.self_attn.num_heads == 2
        assert layer.mlp.experts.gate_up_proj.shape[1] == 128  # 2 * (128 / 2)
        assert run_engine(llm, prompts) == expected
