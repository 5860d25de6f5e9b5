"""Sliding window, logit soft-capping and attention sinks: the PyTorch reference backend against a naive dense
attention written as per-token loops, and the runner's fallback when a fast backend lacks a feature."""

from __future__ import annotations

import math

import pytest
import torch

from inferneo.attention import (
    AttentionFeature,
    TorchReferenceBackend,
    backend_for_model,
    model_attention_features,
)
from inferneo.attention.check_cases import VARIANT_OPTIONS, AttentionCase, Step, build_step, variant_options
from inferneo.model_executor.models.llama import DecoderConfig, LlamaForCausalLM

VARIANT_CASES = (
    AttentionCase("decode", 4, 2, 16, 16, decode_lens=(1, 5, 12, 13, 40, 64)),
    AttentionCase("prefill-fresh", 4, 4, 16, 16, prefills=((0, 37), (0, 5))),
    AttentionCase("prefill-chunked", 6, 2, 16, 16, prefills=((16, 20), (7, 40), (45, 3))),
    AttentionCase("mixed", 4, 1, 16, 16, decode_lens=(1, 17, 40), prefills=((0, 19), (23, 9))),
)

def naive_attention(step: Step, scale: float, sliding_window=None, logit_softcap=None, sinks=None) -> torch.Tensor:
    """Attention of every new token of ``step``, one query token and one head at a time, in float64."""
    meta = step.metadata()
    cache = step.ref_cache.double().clone()
    bs = meta.block_size
    for t, slot in enumerate(meta.slot_mapping.tolist()):
        cache[0, :, slot // bs, slot % bs] = step.k[t].double()
        cache[1, :, slot // bs, slot % bs] = step.v[t].double()
    queries = []  # (token index, position, block table)
    for i in range(meta.num_decode_tokens):
        queries.append((i, int(meta.decode_seq_lens[i]) - 1, meta.decode_block_tables[i].tolist()))
    for span in meta.prefills:
        for j in range(span.num_tokens):
            queries.append((span.start + j, span.context_len + j, span.block_table.tolist()))
    num_heads, num_kv_heads = step.q.shape[1], step.k.shape[1]
    out = torch.zeros(step.q.shape, dtype=torch.float64)
    for t, pos, table in queries:
        first = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
        for h in range(num_heads):
            kv = h // (num_heads // num_kv_heads)
            logits, values = [], []
            for j in range(first, pos + 1):
                key = cache[0, kv, table[j // bs], j % bs]
                score = float(step.q[t, h].double() @ key) * scale
                if logit_softcap is not None:
                    score = logit_softcap * math.tanh(score / logit_softcap)
                logits.append(score)
                values.append(cache[1, kv, table[j // bs], j % bs])
            top = max(logits + ([float(sinks[h])] if sinks is not None else []))
            weights = [math.exp(s - top) for s in logits]
            denominator = sum(weights) + (math.exp(float(sinks[h]) - top) if sinks is not None else 0.0)
            out[t, h] = sum(w * val for w, val in zip(weights, values, strict=True)) / denominator
    return out


@pytest.mark.parametrize("case", VARIANT_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("option_name", list(VARIANT_OPTIONS))
def test_reference_backend_matches_naive_attention(case, option_name):
    step = build_step(case, torch.float32, "cpu", seed=3)
    options = variant_options(option_name, case.num_heads)
    backend = TorchReferenceBackend()
    meta = step.metadata()
    backend.prepare(meta)
    out = backend.forward(step.q, step.k, step.v, step.ref_cache.clone(), meta, step.scale, **options)
    expected = naive_attention(step, step.scale, **options)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # The option changes the result: a test of it could fail.
    plain = naive_attention(step, step.scale)
    assert not torch.allclose(expected, plain, atol=1e-4)


def test_reference_backend_in_half_precision():
    case = VARIANT_CASES[3]
    step = build_step(case, torch.bfloat16, "cpu", seed=5)
    options = variant_options("window-softcap-sinks", case.num_heads)
    backend = TorchReferenceBackend()
    meta = step.metadata()
    backend.prepare(meta)
    out = backend.forward(step.q, step.k, step.v, step.ref_cache.clone(), meta, step.scale, **options)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), naive_attention(step, step.scale, **options), rtol=2e-2, atol=2e-2)


def _tiny_config(**overrides) -> DecoderConfig:
    values = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=128,
                  tie_word_embeddings=False)
    values.update(overrides)
    return DecoderConfig(**values)


def test_layer_windows_follow_layer_types():
    config = _tiny_config(sliding_window=16,
                          layer_types=("full_attention", "sliding_attention", "full_attention", "sliding_attention"))
    assert [config.sliding_window_for(i) for i in range(4)] == [None, 16, None, 16]
    assert [_tiny_config(sliding_window=16).sliding_window_for(i) for i in range(4)] == [16] * 4
    assert _tiny_config(sliding_window=0).sliding_window_for(0) is None
    with pytest.raises(ValueError, match="layer_types"):
        _tiny_config(layer_types=("full_attention",) * 3)
    with pytest.raises(ValueError, match="chunked_attention"):
        _tiny_config(layer_types=("chunked_attention",) * 4)
    model = LlamaForCausalLM(config, TorchReferenceBackend())
    assert [layer.self_attn.sliding_window for layer in model.layers] == [None, 16, None, 16]
    assert model_attention_features(model) == {AttentionFeature.SLIDING_WINDOW}


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM",
                                  "Qwen3MoeForCausalLM"])
def test_qwen_windows_match_transformers(arch):
    """With or without ``layer_types`` in config.json, the layers that slide are the ones transformers slides."""
    import transformers

    from inferneo.model_executor.models.registry import get_model_class

    config_cls = {"Qwen2ForCausalLM": transformers.Qwen2Config, "Qwen3ForCausalLM": transformers.Qwen3Config,
                  "Qwen2MoeForCausalLM": transformers.Qwen2MoeConfig,
                  "Qwen3MoeForCausalLM": transformers.Qwen3MoeConfig}[arch]
    hf = config_cls(num_hidden_layers=6, use_sliding_window=True, sliding_window=16, max_window_layers=3,
                    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    layer_types = getattr(hf, "layer_types", None)  # Qwen3-MoE has none: every layer slides
    expected = [16 if layer_types is None or layer_types[i] == "sliding_attention" else None
                for i in range(6)] if hf.sliding_window else [None] * 6
    cfg = hf.to_dict()
    cfg["architectures"] = [arch]
    model_cls = get_model_class(cfg)
    for with_types in (True, False):
        if not with_types:
            cfg.pop("layer_types", None)
        config = model_cls.config_from_hf(cfg)
        assert [config.sliding_window_for(i) for i in range(6)] == expected, with_types
    assert any(w is not None for w in expected)
    cfg["use_sliding_window"] = False
    assert model_cls.config_from_hf(cfg).sliding_window_for(5) is None


class _PlainBackend(TorchReferenceBackend):
    """A backend that declares no features (the reference's computation, for the fallback test)."""

    name = "plain"
    supported_features = frozenset()


def test_runner_falls_back_to_reference_for_missing_features(caplog):
    plain = _PlainBackend()
    model = LlamaForCausalLM(_tiny_config(sliding_window=8), plain)
    with caplog.at_level("WARNING"):
        chosen = backend_for_model(model, plain, chosen_by_user=False)
    assert type(chosen) is TorchReferenceBackend
    assert all(layer.self_attn.backend is chosen for layer in model.layers)
    assert "sliding_window" in caplog.text
    with pytest.raises(ValueError, match="sliding_window"):
        backend_for_model(LlamaForCausalLM(_tiny_config(sliding_window=8), plain), plain, chosen_by_user=True)
    unwindowed = LlamaForCausalLM(_tiny_config(), plain)
    assert backend_for_model(unwindowed, plain, chosen_by_user=True) is plain


def test_backend_refuses_unsupported_options():
    with pytest.raises(NotImplementedError, match="logit_softcap"):
        _PlainBackend().check_features(None, 30.0, None)
    TorchReferenceBackend().check_features(4, 30.0, torch.zeros(2))


NATIVE_CASES = VARIANT_CASES + (
    # Shapes the vector kernel does not take (head_dim or block_size not multiples of 16): the scalar kernel.
    AttentionCase("odd-shapes", 4, 2, 8, 8, decode_lens=(3, 30), prefills=((0, 21), (13, 11))),
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", NATIVE_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("option_name", list(VARIANT_OPTIONS))
def test_native_cpu_backend_matches_reference(case, option_name, dtype):
    from inferneo.attention.check_cases import compare_backends, relative_error
    from inferneo.kernel_config import KernelConfig

    try:
        from inferneo.attention.cpu_native import CpuNativeBackend

        backend = CpuNativeBackend(KernelConfig(cpu_native_kernels=True))
    except RuntimeError as exc:
        pytest.skip(str(exc))
    step = build_step(case, dtype, "cpu", seed=7)
    options = variant_options(option_name, case.num_heads)
    out, ref_out, cache, ref_cache = compare_backends(backend, step, **options)
    assert torch.equal(cache, ref_cache)
    assert relative_error(out, ref_out) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_tensor_parallel_ranks_keep_their_heads_sinks():
    """Sharding gives each rank the sink logits of its own query heads."""
    from torch import nn

    from inferneo.distributed.parallel_state import TensorParallelGroup
    from inferneo.model_executor.tensor_parallel import shard_model

    config = _tiny_config()
    with torch.device("meta"):
        model = LlamaForCausalLM(config, TorchReferenceBackend())
        for layer in model.layers:
            layer.self_attn.sinks = nn.Parameter(torch.zeros(config.num_heads))
    shard_model(model, TensorParallelGroup(1, 2), torch.device("cpu"), torch.float32)
    attn = model.layers[0].self_attn
    assert attn.sinks.shape == (config.num_heads // 2,) and attn.num_heads == config.num_heads // 2
    full = torch.arange(config.num_heads, dtype=torch.float32)
    attn.sinks.weight_loader(attn.sinks, full, None)
    assert torch.equal(attn.sinks.data, full[2:])
