"""DeepSeek-V2 and DeepSeek-V3: multi-head latent attention over a compressed KV cache, grouped top-k routing,
shared experts and dense first layers.

The tiny checkpoints (V2 without q LoRA and with group-limited softmax routing, V3 with q LoRA, interleaved rope
and sigmoid routing with a correction bias) are in test_hf_parity.py's ARCHS: greedy token ids equal Hugging Face
transformers' ``generate`` (float32) alone and in a batch of 16, with prefix caching on and off, chunked prefill and
preemption. Here: the model's logits equal HF's through prompt, cached-prefix and decode steps (also with yarn rope
scaling and with V3's rotate-half rope); the latent backend equals attention over expanded keys and values; the
routers equal HF's routers on random inputs; the KV cache really holds only the latent and the rope key.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from test_hf_parity import TP_ENGINE, hf_greedy, mixed_prompts, run_engine, two_rank_engine
from transformers import AutoConfig, AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config

from inferneo import LLM
from inferneo.attention import AttentionMetadata, PrefillSpan, TorchReferenceBackend
from inferneo.attention.kv_spec import allocate_kv_caches
from inferneo.attention.mla import TorchMLABackend
from inferneo.model_executor.layers.moe_routing import sigmoid_grouped_topk, softmax_grouped_topk
from inferneo.model_executor.models.deepseek import (
    DeepseekMoE,
    DeepseekV2ForCausalLM,
    DeepseekV3ForCausalLM,
    _softmax_scale,
)
from inferneo.model_executor.models.registry import get_model_class
from inferneo.model_executor.tensor_parallel import shard_model
from inferneo.model_loader.hf_files import hf_config, iter_hf_weights
from inferneo.testing.tiny_models import MLA_ARCHITECTURES

MODEL_CLASSES = {"deepseek_v2": DeepseekV2ForCausalLM, "deepseek_v3": DeepseekV3ForCausalLM}
BLOCK_SIZE = 16
# The tiny checkpoints: 2 layers, latent 32 + rope key 8 per token; float32.
LATENT_BYTES_PER_BLOCK = 2 * BLOCK_SIZE * (32 + 8) * 4


@functools.cache
def _expected(path: str, prompts: tuple[tuple[int, ...], ...]) -> list[list[int]]:
    return [hf_greedy(path, list(p)) for p in prompts]


@pytest.fixture(scope="module", params=MLA_ARCHITECTURES)
def deepseek_dir(request, tiny_checkpoint_factory):
    return tiny_checkpoint_factory(request.param)


# ---- the checkpoints and the engine against HF ----------------------------------------------------------------


def test_checkpoints_cover_both_query_paths_and_are_registered(tiny_checkpoint_factory):
    names = {arch: {n for n, _ in iter_hf_weights(tiny_checkpoint_factory(arch))} for arch in MLA_ARCHITECTURES}
    assert "model.layers.0.self_attn.q_proj.weight" in names["deepseek_v2"]
    assert not any(".q_a_proj." in n for n in names["deepseek_v2"])
    assert "model.layers.0.self_attn.q_b_proj.weight" in names["deepseek_v3"]
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names["deepseek_v3"]
    for arch, cls in MODEL_CLASSES.items():
        path = tiny_checkpoint_factory(arch)
        assert get_model_class(hf_config(path)) is cls
        assert "model.layers.0.mlp.gate_proj.weight" in names[arch]  # the dense first layer
        assert "model.layers.1.mlp.experts.7.up_proj.weight" in names[arch]


def test_pure_pytorch_paths_also_match_hf(tiny_checkpoint_factory, monkeypatch):
    """With the native CPU kernels and packed linears off, the tokens are the same."""
    monkeypatch.setenv("INFERNEO_CPU_KERNELS", "0")
    monkeypatch.setenv("INFERNEO_CPU_ONEDNN", "0")
    path = tiny_checkpoint_factory("deepseek_v3")
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=32)
    kinds = {type(m).__name__ for m in llm.engine.runner.model.modules()}
    assert {"RMSNorm", "Linear", "LatentAttention", "DeepseekMoE"} <= kinds
    prompts = mixed_prompts(8, 300, seed=6, shared_prefix=20)
    assert run_engine(llm, prompts) == _expected(str(path), tuple(map(tuple, prompts)))


# ---- the compressed KV cache ----------------------------------------------------------------------------------


def test_kv_cache_holds_only_latent_and_rope_key(deepseek_dir):
    llm = LLM(str(deepseek_dir), dtype="float32", block_size=BLOCK_SIZE)
    runner = llm.engine.runner
    cfg = hf_config(deepseek_dir)
    assert runner.kv_bytes_per_block == LATENT_BYTES_PER_BLOCK
    assert [tuple(c.shape) for c in runner.kv_caches] == [(runner.num_blocks + 1, BLOCK_SIZE, 40)] * 2
    assert all(spec.backend.name == "mla-torch" for spec in runner.kv_cache_specs)
    # Per-head keys and values in the standard layout would take 4 heads x (24 + 24) values per token and layer.
    standard = TorchReferenceBackend().kv_cache_shape(1, BLOCK_SIZE, cfg["num_attention_heads"],
                                                      cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"])
    standard_bytes = cfg["num_hidden_layers"] * math.prod(standard) * 4
    assert runner.kv_bytes_per_block * 4 < standard_bytes == 2 * 16 * 2 * 4 * 24 * 4


def test_plain_models_keep_their_kv_layout(tiny_checkpoint_factory):
    """A Llama's cache: 2 x layers x block x kv heads x head size per block, in the engine backend's layout."""
    llm = LLM(str(tiny_checkpoint_factory("llama")), dtype="float32", block_size=BLOCK_SIZE)
    runner = llm.engine.runner
    assert runner.kv_bytes_per_block == 2 * 2 * BLOCK_SIZE * 2 * 16 * 4
    shape = runner.backend.kv_cache_shape(runner.num_blocks + 1, BLOCK_SIZE, 2, 16)
    assert [tuple(c.shape) for c in runner.kv_caches] == [tuple(shape)] * 2
    assert all(spec.backend is runner.backend for spec in runner.kv_cache_specs)


# ---- the model's logits against HF, step by step ----------------------------------------------------------------


def _hf_logits(path, ids: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _our_model(path):
    cls = get_model_class(hf_config(path))
    model = cls(cls.config_from_hf(hf_config(path)), backend=None)
    model.load_weights(iter_hf_weights(path))
    return model.eval()


def _span_metadata(start: int, count: int, context: int, table: torch.Tensor) -> AttentionMetadata:
    slots = torch.arange(context, context + count)
    slots = table[slots // BLOCK_SIZE] * BLOCK_SIZE + slots % BLOCK_SIZE
    return AttentionMetadata(block_size=BLOCK_SIZE, num_decode_tokens=0, slot_mapping=slots,
                             decode_block_tables=None, decode_seq_lens=None,
                             prefills=[PrefillSpan(start, count, context, table)])


@torch.no_grad()
def _logits_in_steps(model, ids: list[int], first_chunk: int, second_chunk: int) -> torch.Tensor:
    """Logits for every position: a first prompt chunk, a second chunk over the cached first, then one decode
    step per remaining token; the blocks in a scrambled order."""
    caches = allocate_kv_caches(model.kv_cache_specs(), 12, BLOCK_SIZE, torch.float32, torch.device("cpu"))
    table = torch.tensor([7, 2, 9, 0, 5, 11, 3, 1])
    out = []
    for start, count in ((0, first_chunk), (first_chunk, second_chunk)):
        meta = _span_metadata(0, count, start, table)
        hidden = model(torch.tensor(ids[start : start + count]), torch.arange(start, start + count), caches, meta)
        out.append(model.compute_logits(hidden))
    for pos in range(first_chunk + second_chunk, len(ids)):
        slot = table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        meta = AttentionMetadata(block_size=BLOCK_SIZE, num_decode_tokens=1, slot_mapping=slot.view(1),
                                 decode_block_tables=table.view(1, -1), decode_seq_lens=torch.tensor([pos + 1]))
        out.append(model.compute_logits(model(torch.tensor([ids[pos]]), torch.tensor([pos]), caches, meta)))
    return torch.cat(out)


def test_logits_match_hf_through_prompt_cached_prefix_and_decode(deepseek_dir):
    ids = mixed_prompts(1, 300, seed=11, shared_prefix=60)[0][:70]
    expected = _hf_logits(deepseek_dir, ids)
    got = _logits_in_steps(_our_model(deepseek_dir), ids, 30, 25)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# DeepSeek-V3's yarn shape (mscale and mscale_all_dim differ here, so both the cos/sin factor and the softmax scale
# move), shrunk to the tiny model's context.
_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 1.0,
         "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}


def test_yarn_rope_matches_hf(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory("deepseek_v3", rope_scaling=_YARN, max_position_embeddings=256)
    model = _our_model(path)
    assert model.layers[0].self_attn.scale == pytest.approx(_softmax_scale(hf_config(path), _YARN))
    assert model.layers[0].self_attn.scale > 1.2 * 24 ** -0.5  # mscale(4, 0.8)**2 really scales the softmax
    ids = mixed_prompts(1, 300, seed=13, shared_prefix=60)[0][:90]  # past the original 64 positions
    torch.testing.assert_close(_logits_in_steps(model, ids, 40, 30), _hf_logits(path, ids), rtol=1e-4, atol=1e-4)
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=32)
    prompts = mixed_prompts(6, 300, seed=14, shared_prefix=50)
    assert run_engine(llm, prompts) == _expected(str(path), tuple(map(tuple, prompts)))


def test_rotate_half_rope_when_v3_does_not_interleave(tiny_checkpoint_factory, tmp_path):
    folder = tmp_path / "v3-rotate-half"
    shutil.copytree(tiny_checkpoint_factory("deepseek_v3"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_interleave"] = False
    (folder / "config.json").write_text(json.dumps(config))
    model = _our_model(folder)
    assert not model.layers[0].self_attn.rope_interleave
    ids = mixed_prompts(1, 300, seed=12)[0][:40]
    expected = _hf_logits(folder, ids)
    torch.testing.assert_close(_logits_in_steps(model, ids, 20, 10), expected, rtol=1e-4, atol=1e-4)
    # The interleaved reading of the same weights gives other logits: the convention is really exercised.
    interleaved = _logits_in_steps(_our_model(tiny_checkpoint_factory("deepseek_v3")), ids, 20, 10)
    assert not torch.allclose(interleaved, expected, atol=1e-2)


@pytest.mark.parametrize("arch", MLA_ARCHITECTURES)
def test_no_shared_experts_matches_hf(arch, tiny_checkpoint_factory, tmp_path):
    """``n_shared_experts: 0``: transformers saves the shared MLP 0 features wide; those empty tensors are skipped at
    load (they were refused as not belonging to the model) and the tokens equal HF's."""
    folder = tmp_path / f"{arch}-no-shared-experts"
    shutil.copytree(tiny_checkpoint_factory(arch), folder)
    config = AutoConfig.from_pretrained(folder)
    config.n_shared_experts = 0
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    empty = [n for n, t in iter_hf_weights(folder) if ".shared_experts." in n and t.numel() == 0]
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in empty
    prompts = mixed_prompts(4, 300, seed=15)
    assert run_engine(LLM(str(folder), dtype="float32"), prompts) == [hf_greedy(folder, p) for p in prompts]


# ---- the latent attention backend ----------------------------------------------------------------------------


@pytest.mark.parametrize("score_bytes", [TorchMLABackend.SCORE_BYTES, 3 * 4 * 18 * 3])
def test_latent_backend_equals_dense_attention_over_expanded_keys(score_bytes, monkeypatch):
    """Absorbed attention over the latent cache equals per-head attention over keys and values expanded from the
    latent, for decode rows and a prompt chunk after cached context in one step; also with the prompt's query rows
    in passes of 3 (a small ``SCORE_BYTES``)."""
    monkeypatch.setattr(TorchMLABackend, "SCORE_BYTES", score_bytes)
    gen = torch.Generator().manual_seed(0)
    heads, latent, rope, nope, vdim = 3, 16, 4, 8, 6
    w_k, w_v = torch.randn(heads, nope, latent, generator=gen), torch.randn(heads, vdim, latent, generator=gen)
    lengths = [5, 21, 18]  # two decode rows (the last token new), then a span of 7 new tokens after 11 cached
    tables = [torch.tensor([3, 0]), torch.tensor([1, 4]), torch.tensor([6, 2])]
    cache = torch.zeros(8, 16, latent + rope)
    lat = [torch.randn(n, latent, generator=gen) for n in lengths]
    krope = [torch.randn(n, rope, generator=gen) for n in lengths]
    new = [lengths[0] - 1, lengths[1] - 1, 11]  # first new position of each request
    for i in range(len(lengths)):  # the context already cached
        for p in range(new[i]):
            cache[tables[i][p // 16], p % 16] = torch.cat([lat[i][p], krope[i][p]])
    q_nope = [torch.randn(n - new[i], heads, nope, generator=gen) for i, n in enumerate(lengths)]
    q_rope = [torch.randn(n - new[i], heads, rope, generator=gen) for i, n in enumerate(lengths)]
    q = torch.cat([torch.cat([torch.einsum("thn,hnl->thl", a, w_k), b], -1) for a, b in zip(q_nope, q_rope, strict=True)])
    k = torch.cat([torch.cat([lat[i][new[i]:], krope[i][new[i]:]], -1) for i in range(3)]).unsqueeze(1)
    slots = torch.cat([tables[i][torch.arange(new[i], n) // 16] * 16 + torch.arange(new[i], n) % 16
                       for i, n in enumerate(lengths)])
    meta = AttentionMetadata(block_size=16, num_decode_tokens=2, slot_mapping=slots,
                             decode_block_tables=torch.stack(tables[:2]), decode_seq_lens=torch.tensor(lengths[:2]),
                             prefills=[PrefillSpan(2, 7, 11, tables[2])])
    out = TorchMLABackend().forward(q, k, k[..., :latent], cache, meta, 0.3)
    expected = []
    for i, n in enumerate(lengths):  # per head: keys [k_nope, k_rope], values v, causal
        keys = torch.cat([torch.einsum("hnl,tl->htn", w_k, lat[i]), krope[i].expand(heads, -1, -1)], -1)
        values = torch.einsum("hvl,tl->htv", w_v, lat[i])
        query = torch.cat([q_nope[i], q_rope[i]], -1).transpose(0, 1)
        mask = torch.arange(n)[None, :] <= torch.arange(new[i], n)[:, None]
        scores = (query @ keys.transpose(1, 2) * 0.3).masked_fill(~mask, float("-inf"))
        expected.append((scores.softmax(-1) @ values).transpose(0, 1))
    got = torch.einsum("thl,hvl->thv", out, w_v)
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_latent_backend_refuses_what_it_does_not_do():
    backend = TorchMLABackend()
    k = torch.zeros(1, 1, 8)
    meta = AttentionMetadata(block_size=4, num_decode_tokens=0, slot_mapping=torch.zeros(1, dtype=torch.long),
                             decode_block_tables=None, decode_seq_lens=None)
    for option in ({"sliding_window": 4}, {"logit_softcap": 30.0}, {"sinks": torch.zeros(2)}):
        with pytest.raises(NotImplementedError, match=next(iter(option))):
            backend.forward(torch.zeros(1, 2, 8), k, k[..., :6], torch.zeros(2, 4, 8), meta, 1.0, **option)
    with pytest.raises(ValueError, match="first channels"):
        backend.forward(torch.zeros(1, 2, 8), k, torch.zeros(1, 1, 6), torch.zeros(2, 4, 8), meta, 1.0)
    with pytest.raises(ValueError, match="one shared KV head"):
        backend.kv_cache_shape(2, 4, 2, 8)


# ---- routing ---------------------------------------------------------------------------------------------------


def _assert_same_routing(routed, hf_weights: torch.Tensor, hf_ids: torch.Tensor) -> None:
    """The same experts for every token (in any order), with the same weights."""
    order, hf_order = routed.ids.argsort(dim=-1), hf_ids.argsort(dim=-1)
    assert torch.equal(routed.ids.gather(1, order), hf_ids.gather(1, hf_order))
    torch.testing.assert_close(routed.weights.gather(1, order), hf_weights.gather(1, hf_order))


@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
def test_v2_router_matches_hf(topk_method):
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    config = DeepseekV2Config(hidden_size=32, num_attention_heads=4, n_routed_experts=16, num_experts_per_tok=5,
                              n_group=4, topk_group=2, topk_method=topk_method, routed_scaling_factor=1.7)
    router = DeepseekV2TopkRouter(config)
    torch.manual_seed(0)
    router.weight.data.normal_()
    x = torch.randn(200, 32)
    _, hf_weights, hf_ids = router(x)
    routed = softmax_grouped_topk(torch.nn.functional.linear(x, router.weight), 5, topk_method=topk_method,
                                  num_groups=4, topk_groups=2, routed_scaling_factor=1.7)
    _assert_same_routing(routed, hf_weights, hf_ids)
    if topk_method == "group_limited_greedy":  # each token's experts lie in at most 2 of the 4 groups
        assert max(len(set((row // 4).tolist())) for row in routed.ids) == 2


@pytest.mark.parametrize("renormalize", [True, False])
def test_v3_router_matches_hf(renormalize):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = DeepseekV3Config(hidden_size=32, num_attention_heads=4, n_routed_experts=16, num_experts_per_tok=4,
                              n_group=4, topk_group=2, norm_topk_prob=renormalize, routed_scaling_factor=2.5)
    router = DeepseekV3TopkRouter(config)
    torch.manual_seed(1)
    router.weight.data.normal_()
    router.e_score_correction_bias.normal_(0.0, 0.3)
    x = torch.randn(200, 32)
    _, hf_weights, hf_ids = router(x)
    routed = sigmoid_grouped_topk(torch.nn.functional.linear(x, router.weight), 4, router.e_score_correction_bias,
                                  num_groups=4, topk_groups=2, renormalize=renormalize, routed_scaling_factor=2.5)
    _assert_same_routing(routed, hf_weights, hf_ids)
    # The bias changes the choice (not only the weights): without it other experts win for some tokens.
    unbiased = sigmoid_grouped_topk(torch.nn.functional.linear(x, router.weight), 4, torch.zeros(16),
                                    num_groups=4, topk_groups=2)
    assert not torch.equal(unbiased.ids.sort(-1).values, routed.ids.sort(-1).values)


# ---- config handling -----------------------------------------------------------------------------------------


def _tiny_cfg(version: int, **overrides) -> dict:
    config = (DeepseekV2Config if version == 2 else DeepseekV3Config)(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=8, num_hidden_layers=6,
        num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1, n_shared_experts=2).to_dict()
    config["architectures"] = [f"DeepseekV{version}ForCausalLM"]
    config.update(overrides)
    return config


def test_dense_layers_from_first_k_dense_replace_and_moe_layer_freq():
    cfg = _tiny_cfg(3, first_k_dense_replace=2, moe_layer_freq=2)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(DeepseekV3ForCausalLM.config_from_hf(cfg), backend=None)
    kinds = [type(layer.mlp).__name__ for layer in model.layers]
    assert kinds == ["MLP", "MLP", "DeepseekMoE", "MLP", "DeepseekMoE", "MLP"]
    moe = model.layers[2].mlp
    assert isinstance(moe, DeepseekMoE) and moe.shared_expert.gate_up_proj.out_features == 2 * 2 * 8  # 2 shared
    assert moe.gate.e_score_correction_bias is not None
    with torch.device("meta"):
        v2 = DeepseekV2ForCausalLM(DeepseekV2ForCausalLM.config_from_hf(_tiny_cfg(2)), backend=None)
    assert v2.layers[1].mlp.gate.e_score_correction_bias is None


def test_yarn_softmax_scale_matches_hf():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    yarn = {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096, "rope_theta": 10000.0}
    cfg = {"qk_nope_head_dim": 128, "qk_rope_head_dim": 64}
    assert _softmax_scale(cfg, yarn) == pytest.approx(yarn_apply_mscale(yarn, 192 ** -0.5), rel=1e-12)
    assert _softmax_scale(cfg, yarn) > 1.3 * 192 ** -0.5
    assert _softmax_scale(cfg, {**yarn, "mscale_all_dim": 0}) == 192 ** -0.5
    assert _softmax_scale(cfg, None) == 192 ** -0.5


@pytest.mark.parametrize("overrides,match", [
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8"),
    ({"num_key_value_heads": 1}, "num_key_value_heads"),
    ({"n_group": 3}, "n_group"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_configs_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        DeepseekV3ForCausalLM.config_from_hf(_tiny_cfg(3, **overrides))


def test_v2_without_shared_experts_but_with_mlp_biases_is_refused():
    """transformers keeps the 0-wide shared MLP's down-projection bias, added to every token: not supported."""
    with pytest.raises(ValueError, match="n_shared_experts 0 and mlp_bias true"):
        DeepseekV2ForCausalLM.config_from_hf(_tiny_cfg(2, n_shared_experts=0, mlp_bias=True))
    assert DeepseekV2ForCausalLM.config_from_hf(_tiny_cfg(2, n_shared_experts=0)).deepseek_moe.num_shared_experts == 0
    assert not DeepseekV3ForCausalLM.config_from_hf(_tiny_cfg(3, mlp_bias=True)).mlp_bias  # V3 ignores it, as HF


def test_v2_unknown_topk_method_is_refused():
    with pytest.raises(ValueError, match="topk_method 'noaux_tc'"):
        DeepseekV2ForCausalLM.config_from_hf(_tiny_cfg(2, topk_method="noaux_tc"))


def test_tensor_parallel_shards_heads_and_keeps_the_latent_whole():
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(DeepseekV3ForCausalLM.config_from_hf(_tiny_cfg(3, q_lora_rank=12)),
                                      backend=None)
    shard_model(model, SimpleNamespace(world_size=2, rank=1, all_reduce=None), torch.device("meta"), torch.float32)
    attn = model.layers[0].self_attn
    assert attn.num_heads == 1 and attn.q_b_proj.out_features == 12  # one of two heads of 8 + 4
    assert attn.kv_b_proj.weight.shape == (8 + 8, 16) and attn.o_proj.in_features == 8
    assert attn.q_a_proj.out_features == 12 and attn.kv_a_proj_with_mqa.out_features == 16 + 4  # replicated
    assert model.kv_cache_specs()[0].head_size == 16 + 4
    with pytest.raises(ValueError, match="3 attention heads"):
        shard_model(DeepseekV3ForCausalLM(DeepseekV3ForCausalLM.config_from_hf(
            _tiny_cfg(3, num_attention_heads=3, num_key_value_heads=3)), backend=None),
            SimpleNamespace(world_size=2, rank=0, all_reduce=None), torch.device("meta"), torch.float32)


@pytest.mark.parametrize("arch", MLA_ARCHITECTURES)
def test_tensor_parallel_2_equals_1(arch, tiny_checkpoint_factory):
    """TP=2 over gloo: query heads, kv_b_proj and o_proj split, the latent replicated, experts and the shared
    experts split; greedy tokens equal TP=1's."""
    path = tiny_checkpoint_factory(arch)
    prompts = mixed_prompts(4, 300, seed=5)
    expected = run_engine(LLM(str(path), **TP_ENGINE), prompts)
    with two_rank_engine(path) as llm:
        model = llm.engine.runner.driver.model
        assert model.layers[0].self_attn.num_heads == 2 and model.layers[1].mlp.all_reduce is not None
        assert run_engine(llm, prompts) == expected


def test_weights_past_the_last_layer_are_skipped(tiny_checkpoint_factory):
    """DeepSeek-V3 checkpoints carry a multi-token-prediction layer after the last one: it is not loaded."""
    path = tiny_checkpoint_factory("deepseek_v3")
    model = DeepseekV3ForCausalLM(DeepseekV3ForCausalLM.config_from_hf(hf_config(path)), backend=None)
    weights = list(iter_hf_weights(path))
    extra = [(n.replace("layers.1.", "layers.2."), t) for n, t in weights if "layers.1." in n]
    loaded = model.load_weights(weights + extra)
    assert "layers.1.self_attn.kv_b_proj.weight" in loaded and not any("layers.2." in n for n in loaded)
    with pytest.raises(ValueError, match="missing weights"):
        model.load_weights([(n, t) for n, t in weights if "kv_b_proj" not in n])
