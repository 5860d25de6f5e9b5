"""Mixture-of-experts models (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE): the batched expert computation
equals a plain per-token, per-expert reference; routers, config parsing, layer selection, expert sharding and
refusals. Their Hugging Face parity runs in test_hf_parity.py with every other architecture."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from moe_reference import reference_experts
from test_hf_parity import TP_ENGINE, hf_greedy, mixed_prompts, run_engine, two_rank_engine

from inferneo import LLM
from inferneo.model_executor.layers.moe import FusedMoE, fused_experts
from inferneo.model_executor.layers.moe_routing import (
    ROUTING_FUNCTIONS,
    make_router,
    softmax_topk,
    softmax_topk_renormalized,
    topk_softmax,
)
from inferneo.model_executor.models.llama import MLP
from inferneo.model_executor.models.moe import Qwen2MoeForCausalLM
from inferneo.model_executor.tensor_parallel import shard_experts, shard_model
from inferneo.testing.tiny_models import make_tiny_checkpoint

# ---- the layer against a per-token, per-expert reference ----------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
@pytest.mark.parametrize("renormalize", [False, True])
def test_fused_experts_match_per_tokenreference_experts(top_k, renormalize):
    torch.manual_seed(top_k)
    num_experts, hidden, inter, tokens = 6, 16, 12, 37
    x = torch.randn(tokens, hidden, dtype=torch.float64)
    w13 = torch.randn(num_experts, 2 * inter, hidden, dtype=torch.float64) * 0.3
    w2 = torch.randn(num_experts, hidden, inter, dtype=torch.float64) * 0.3
    logits = torch.randn(tokens, num_experts, dtype=torch.float64)
    logits[:, 0] += 10.0  # uneven: expert 0 takes every token
    logits[:, num_experts - 1] = -1e4  # the last expert gets none
    routed = (softmax_topk_renormalized if renormalize else softmax_topk)(logits, top_k)
    weights, ids = routed.weights, routed.ids
    assert (ids == num_experts - 1).sum() == 0
    counts = torch.bincount(ids.reshape(-1), minlength=num_experts)
    assert counts[0] == tokens and counts[0] > counts[1:].max()
    if renormalize:
        torch.testing.assert_close(weights.sum(-1), torch.ones(tokens, dtype=weights.dtype))
    got = fused_experts(x, w13, w2, weights, ids)
    torch.testing.assert_close(got, reference_experts(x, w13, w2, weights.to(x.dtype), ids), rtol=1e-10, atol=1e-10)


def test_fused_moe_module_with_shared_expert_and_empty_batch():
    torch.manual_seed(0)
    shared = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))
    moe = FusedMoE(8, 4, num_experts=4, top_k=2, router=make_router("softmax_topk", 2), shared_expert=shared,
                   shared_expert_gate=True)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(5, 8)
    chosen = softmax_topk(moe.gate(x), 2)
    routed = reference_experts(x, moe.experts.gate_up_proj, moe.experts.down_proj, chosen.weights, chosen.ids)
    expected = routed + torch.sigmoid(moe.shared_expert_gate(x)) * shared(x)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), expected)
        assert moe(x[:0]).shape == (0, 8)
    with pytest.raises(ValueError, match="top_k"):
        FusedMoE(8, 4, num_experts=4, top_k=5, router=make_router("softmax_topk", 5))


def test_routers_pick_and_weigh_as_documented():
    torch.manual_seed(0)
    logits = torch.randn(9, 6)
    for name, fn in ROUTING_FUNCTIONS.items():
        routed = make_router(name, 3)(logits)
        assert routed.weights.dtype == torch.float32 and routed.ids.dtype == torch.int64, name
        assert routed.weights.shape == routed.ids.shape == (9, 3), name
        torch.testing.assert_close(routed.ids, torch.topk(logits, 3).indices, msg=name)  # same experts for all three
        torch.testing.assert_close(routed.weights, fn(logits, 3).weights)
    full = torch.softmax(logits, -1)
    top = torch.topk(logits, 3)
    torch.testing.assert_close(softmax_topk(logits, 3).weights, full.gather(1, top.indices))
    chosen = full.gather(1, top.indices)
    torch.testing.assert_close(softmax_topk_renormalized(logits, 3).weights, chosen / chosen.sum(-1, keepdim=True))
    torch.testing.assert_close(topk_softmax(logits, 3).weights, torch.softmax(top.values, -1))
    with pytest.raises(ValueError, match="routing"):
        make_router("sigmoid", 2)


@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [1, 11])  # one token takes its own path (a batch-1 decode step)
def test_fused_experts_activations_and_biases(activation, bias, tokens):
    torch.manual_seed(1)
    num_experts, hidden, inter, top_k = 5, 12, 8, 3
    x = torch.randn(tokens, hidden, dtype=torch.float64) * 3  # large enough that swigluoai's clamps bite
    w13 = torch.randn(num_experts, 2 * inter, hidden, dtype=torch.float64)
    w2 = torch.randn(num_experts, hidden, inter, dtype=torch.float64) * 0.3
    w13_bias = torch.randn(num_experts, 2 * inter, dtype=torch.float64) if bias else None
    w2_bias = torch.randn(num_experts, hidden, dtype=torch.float64) if bias else None
    routed = topk_softmax(torch.randn(tokens, num_experts, dtype=torch.float64), top_k)
    got = fused_experts(x, w13, w2, routed.weights, routed.ids, activation=activation, w13_bias=w13_bias,
                        w2_bias=w2_bias)
    want = reference_experts(x, w13, w2, routed.weights, routed.ids, activation, w13_bias, w2_bias)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if activation == "swigluoai":
        assert (w13[routed.ids[:, 0]] @ x[:, :, None]).abs().max() > 7  # the clamp was exercised


def test_fused_moe_biases_and_bad_activation():
    moe = FusedMoE(8, 4, num_experts=3, top_k=2, router=make_router("topk_softmax", 2), activation="swigluoai",
                   bias=True, router_bias=True)
    assert moe.experts.gate_up_proj_bias.shape == (3, 8) and moe.experts.down_proj_bias.shape == (3, 8)
    assert moe.gate.bias is not None
    with pytest.raises(ValueError, match="activation"):
        FusedMoE(8, 4, num_experts=3, top_k=2, router=make_router("topk_softmax", 2), activation="gelu")


# ---- config, layer selection and what is refused ------------------------------------------------------------------


def _qwen2_moe_config(**extra):
    return {"architectures": ["Qwen2MoeForCausalLM"], "vocab_size": 64, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1, "num_experts": 4,
            "num_experts_per_tok": 2, "moe_intermediate_size": 8, "shared_expert_intermediate_size": 12, **extra}


def test_dense_layers_from_sparse_step_and_mlp_only_layers():
    config = Qwen2MoeForCausalLM.config_from_hf(_qwen2_moe_config(decoder_sparse_step=2, mlp_only_layers=[3]))
    with torch.device("meta"):
        model = Qwen2MoeForCausalLM(config, backend=None)
    kinds = [type(layer.mlp).__name__ for layer in model.layers]
    assert kinds == ["MLP", "FusedMoE", "MLP", "MLP"]
    assert model.layers[1].mlp.shared_expert.gate_up_proj.out_features == 24
    assert model.layers[0].mlp.gate_up_proj.out_features == 48


def _rank(rank: int, world: int = 2):
    return SimpleNamespace(world_size=world, rank=rank, all_reduce=lambda t: t)  # sums checked by the test


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("variant", ["shared-expert", "biases"])
def test_sharded_experts_sum_to_the_whole_block(stacked, variant):
    """Each rank's slice of every expert (and of the shared expert), loaded from the full checkpoint tensors,
    gives a partial output; the partial outputs sum to the unsharded block's."""
    torch.manual_seed(3)
    hidden, inter, experts, top_k = 8, 6, 4, 2
    biases = variant == "biases"

    def build():
        shared = None if biases else MLP(SimpleNamespace(hidden_size=hidden, intermediate_size=inter,
                                                         mlp_bias=False), 4)
        return FusedMoE(hidden, inter, experts, top_k, make_router("topk_softmax" if biases else "softmax_topk",
                                                                  top_k),
                        activation="swigluoai" if biases else "silu", bias=biases, router_bias=biases,
                        shared_expert=shared, shared_expert_gate=not biases)

    full = build()
    for p in full.parameters():
        torch.nn.init.normal_(p, std=0.5)
    state = {k: v.detach().clone() for k, v in full.state_dict().items()}
    x = torch.randn(7, hidden)
    parts = []
    for rank in (0, 1):
        moe = build()
        shard_experts(moe, _rank(rank), torch.device("cpu"), torch.float32)
        params = dict(moe.named_parameters())
        assert params["experts.gate_up_proj"].shape == (experts, inter, hidden)  # 2 * inter / 2
        for name, param in params.items():
            tensor = state[name]
            if name == "experts.gate_up_proj" and not stacked:
                for e in range(experts):
                    for block in (0, 1):
                        param.expert_loader(param, tensor[e, block * inter : (block + 1) * inter], e, block)
            elif name == "experts.down_proj" and not stacked:
                for e in range(experts):
                    param.expert_loader(param, tensor[e], e, None)
            elif hasattr(param, "expert_loader"):
                param.expert_loader(param, tensor, None, None)
            elif name.startswith("shared_expert.gate_up_proj"):
                half = tensor.shape[0] // 2
                param.weight_loader(param, tensor[:half], 0)
                param.weight_loader(param, tensor[half:], 1)
            elif hasattr(param, "weight_loader"):
                param.weight_loader(param, tensor, None)
            else:
                param.data.copy_(tensor)  # the router and the shared expert's gate: replicated
        with torch.no_grad():
            parts.append(moe(x))
    with torch.no_grad():
        torch.testing.assert_close(parts[0] + parts[1], full(x), rtol=1e-5, atol=1e-5)


def test_tensor_parallel_refuses_an_unsplittable_expert_width():
    config = Qwen2MoeForCausalLM.config_from_hf(_qwen2_moe_config(moe_intermediate_size=9))
    with torch.device("meta"):
        model = Qwen2MoeForCausalLM(config, backend=None)
    with pytest.raises(ValueError, match="expert intermediate size 9"):
        shard_model(model, SimpleNamespace(world_size=2, rank=0, all_reduce=None), torch.device("meta"),
                    torch.float32)


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe"])
def test_tensor_parallel_2_equals_1(arch, tmp_path):
    """TP=2 over gloo: the experts' intermediate features split, the router replicated, Qwen2-MoE's shared expert
    split like the dense MLP; greedy tokens equal TP=1's."""
    path = make_tiny_checkpoint(tmp_path / arch, arch)
    prompts = mixed_prompts(4, 300, seed=5)
    expected = run_engine(LLM(str(path), **TP_ENGINE), prompts)
    with two_rank_engine(path) as llm:
        moe = llm.engine.runner.driver.model.layers[0].mlp
        assert moe.experts.gate_up_proj.shape[1] == 32 and moe.all_reduce is not None  # 2 * (32 / 2)
        assert run_engine(llm, prompts) == expected


def test_missing_expert_weight_is_reported(tiny_checkpoint_factory):
    from inferneo.model_executor.models.moe import MixtralForCausalLM
    from inferneo.model_loader.hf_files import hf_config, iter_hf_weights

    path = tiny_checkpoint_factory("mixtral")
    model = MixtralForCausalLM(MixtralForCausalLM.config_from_hf(hf_config(path)), backend=None)
    weights = list(iter_hf_weights(path))
    assert "layers.0.mlp.experts.gate_up_proj#3.1" in model.load_weights(weights)
    with pytest.raises(ValueError, match="missing weights"):
        model.load_weights([(n, t) for n, t in weights if "experts.3.w3" not in n])


def test_qwen2_moe_without_qkv_bias_matches_hf(tiny_checkpoint_factory, tmp_path):
    """transformers 5's ``qkv_bias: false`` leaves the q/k/v biases out; the engine reads it (it used to expect the
    biases always and refused the checkpoint as missing weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path / "qwen2-moe-no-qkv-bias"
    shutil.copytree(tiny_checkpoint_factory("qwen2_moe"), folder)
    config = AutoConfig.from_pretrained(folder)
    config.qkv_bias = False
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    assert not Qwen2MoeForCausalLM.config_from_hf(json.loads((folder / "config.json").read_text())).qkv_bias
    prompts = mixed_prompts(4, 300, seed=6)
    assert run_engine(LLM(str(folder), dtype="float32"), prompts) == [hf_greedy(folder, p) for p in prompts]
