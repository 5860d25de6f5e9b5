"""Mixture-of-experts models (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE): the batched expert computation
equals a plain per-token, per-expert reference; config parsing, layer selection and refusals. Their Hugging Face
parity runs in test_hf_parity.py with every other architecture."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from inferneo.model_executor.layers.moe import (
    FusedMoE,
    fused_experts,
    softmax_topk,
    softmax_topk_renormalized,
)
from inferneo.model_executor.models.moe import Qwen2MoeForCausalLM
from inferneo.model_executor.tensor_parallel import shard_model

# ---- the layer against a per-token, per-expert reference ----------------------------------------------------------


def _reference(x, w13, w2, weights, ids):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate, up = (w13[e] @ x[t]).chunk(2)
            out[t] += weights[t, k] * (w2[e] @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
@pytest.mark.parametrize("renormalize", [False, True])
def test_fused_experts_match_per_token_reference(top_k, renormalize):
    torch.manual_seed(top_k)
    num_experts, hidden, inter, tokens = 6, 16, 12, 37
    x = torch.randn(tokens, hidden, dtype=torch.float64)
    w13 = torch.randn(num_experts, 2 * inter, hidden, dtype=torch.float64) * 0.3
    w2 = torch.randn(num_experts, hidden, inter, dtype=torch.float64) * 0.3
    logits = torch.randn(tokens, num_experts, dtype=torch.float64)
    logits[:, 0] += 10.0  # uneven: expert 0 takes every token
    logits[:, num_experts - 1] = -1e4  # the last expert gets none
    weights, ids = (softmax_topk_renormalized if renormalize else softmax_topk)(logits, top_k)
    assert (ids == num_experts - 1).sum() == 0
    counts = torch.bincount(ids.reshape(-1), minlength=num_experts)
    assert counts[0] == tokens and counts[0] > counts[1:].max()
    if renormalize:
        torch.testing.assert_close(weights.sum(-1), torch.ones(tokens, dtype=weights.dtype))
    got = fused_experts(x, w13, w2, weights, ids)
    torch.testing.assert_close(got, _reference(x, w13, w2, weights.to(x.dtype), ids), rtol=1e-10, atol=1e-10)


def test_fused_moe_module_with_shared_expert_and_empty_batch():
    torch.manual_seed(0)
    shared = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))
    moe = FusedMoE(8, 4, num_experts=4, top_k=2, renormalize=False, shared_expert=shared, shared_expert_gate=True)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(5, 8)
    weights, ids = softmax_topk(moe.gate(x), 2)
    routed = _reference(x, moe.experts.gate_up_proj, moe.experts.down_proj, weights, ids)
    expected = routed + torch.sigmoid(moe.shared_expert_gate(x)) * shared(x)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), expected)
        assert moe(x[:0]).shape == (0, 8)
    with pytest.raises(ValueError, match="top_k"):
        FusedMoE(8, 4, num_experts=4, top_k=5, renormalize=False)


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


def test_tensor_parallel_refuses_moe():
    config = Qwen2MoeForCausalLM.config_from_hf(_qwen2_moe_config())
    with torch.device("meta"):
        model = Qwen2MoeForCausalLM(config, backend=None)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        shard_model(model, SimpleNamespace(world_size=2, rank=0), torch.device("cpu"), torch.float32)


def test_missing_expert_weight_is_reported(tiny_checkpoint_factory):
    from inferneo.model_executor.models.moe import MixtralForCausalLM
    from inferneo.model_loader.hf_files import hf_config, iter_hf_weights

    path = tiny_checkpoint_factory("mixtral")
    model = MixtralForCausalLM(MixtralForCausalLM.config_from_hf(hf_config(path)), backend=None)
    weights = list(iter_hf_weights(path))
    assert "layers.0.mlp.experts.gate_up_proj#3.1" in model.load_weights(weights)
    with pytest.raises(ValueError, match="missing weights"):
        model.load_weights([(n, t) for n, t in weights if "experts.3.w3" not in n])
