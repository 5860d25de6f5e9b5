"""The packed CPU linears (oneDNN, and the native float32 panel kernel) against the reference ``nn.Linear``."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inferneo.kernel_config import KernelConfig
from inferneo.model_executor.layers.cpu_linear import (
    PackedLinear,
    PanelEmbedding,
    PanelLinear,
    onednn_available,
    pack_linears,
    panel_kernels,
    panel_width,
)

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN linear")
# the kernel itself, float32 on AVX2 included (pack_linears prefers oneDNN there: see panel_kernels)
kernel_ops = functools.partial(panel_kernels, avx2_float32_panel=True)
needs_panel = pytest.mark.skipif(kernel_ops() is None, reason="the native panel kernel needs AVX-512 or AVX2 + FMA + F16C")


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_packed_linear_matches_reference(dtype, bias, rows):
    if not onednn_available(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} weights on this CPU (pack_linears leaves such layers alone)")
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias).to(dtype)
    x = torch.randn(rows, 96, dtype=dtype)
    expected = linear(x)
    got = PackedLinear(linear)(x)
    assert got.shape == expected.shape and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@needs_panel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [0, 1, 5, 8, 9, 64, 130])
@pytest.mark.parametrize("in_features,out_features", [(96, 200), (33, 5), (64, 48), (576, 960), (41, 97)])
def test_panel_linear_matches_reference(dtype, bias, rows, in_features, out_features):
    """Every row count (full and partial blocks of eight), panel remainders, an odd K (bfloat16 pairs along K),
    and narrow layers split by rows. Bfloat16 against float32 math on the same values, rounded once."""
    ops = kernel_ops(dtype)
    if ops is None:
        pytest.skip(f"no {dtype} panel kernel on this CPU")
    torch.manual_seed(rows)
    linear = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    x = torch.randn(rows, in_features, dtype=dtype)
    got = PanelLinear(linear, ops)(x)
    assert got.shape == (rows, out_features) and got.dtype == dtype
    expected = F.linear(x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float())
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # bfloat16: one rounding of the float32 sum (2^-8 relative)
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)


@needs_panel
def test_panel_width_follows_the_build():
    """The AVX2 build packs 16-column panels (each 16-column block reads consecutive lines), AVX-512 48."""
    ops = kernel_ops(torch.float32)
    assert panel_width(ops) == {"avx2": 16}.get(ops.vector_isa(), 48)
    assert panel_width(None) == 48


@needs_panel
def test_panel_linear_takes_strided_rows_and_batched_shapes():
    linear = nn.Linear(64, 100)
    panel = PanelLinear(linear, kernel_ops())
    wide = torch.randn(10, 128)
    rows = wide[:, :64]  # a view whose rows are 128 apart
    torch.testing.assert_close(panel(rows), linear(rows), rtol=1e-5, atol=1e-5)
    batched = torch.randn(3, 4, 64)
    torch.testing.assert_close(panel(batched), linear(batched), rtol=1e-5, atol=1e-5)


def test_pack_linears_picks_the_panel_kernel_where_it_runs():
    """With the panel kernel asked for (``INFERNEO_CPU_LINEAR_KERNEL=panel``; the default choice is per CPU and
    measured: on AMX CPUs oneDNN comes first for bfloat16, test_cpu_linear_choice.py), every layer whose dtype it
    runs takes it, the others oneDNN or PyTorch's own."""
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8).to(torch.bfloat16))
    pack_linears(model, KernelConfig(cpu_linear_kernel="panel"))
    for layer, dtype in ((model[0], torch.float32), (model[1], torch.bfloat16)):
        expected = (PanelLinear if panel_kernels(dtype) is not None
                    else PackedLinear if onednn_available(dtype) else nn.Linear)
        assert type(layer) is expected, dtype
    other = nn.Sequential(nn.Linear(16, 32))
    pack_linears(other, KernelConfig(cpu_native_linear=False))
    assert type(other[0]) is (PackedLinear if onednn_available() else nn.Linear)


@needs_onednn
def test_pack_linears_swaps_every_linear_and_keeps_tied_weights():
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 50, bias=False))
    model[3].weight = nn.Parameter(torch.randn(50, 32))
    x = torch.randn(3, 16)
    expected = model[3](torch.relu(model[1](x)))
    assert pack_linears(model) == 2
    assert all(isinstance(model[i], (PackedLinear, PanelLinear)) for i in (1, 3))
    torch.testing.assert_close(model[3](torch.relu(model[1](x))), expected, rtol=1e-5, atol=1e-5)
    assert model[0].weight.shape == (50, 16)


@pytest.mark.parametrize("kind", [
    pytest.param(PackedLinear, marks=needs_onednn), pytest.param(PanelLinear, marks=needs_panel)])
@pytest.mark.parametrize("shape", [(6, 96), (2, 3, 96)])
def test_packed_linears_write_into_out(kind, shape):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200)
    layer = kind(linear) if kind is PackedLinear else kind(linear, kernel_ops())
    x = torch.randn(*shape)
    expected = layer(x)
    out = torch.full((x.numel() // 96, 200), float("nan"))
    got = layer(x, out=out)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(out, expected.reshape(-1, 200), rtol=0, atol=0)
    assert got.data_ptr() == out.data_ptr()  # the result lives in ``out``, not in a copy


def _tied_model(dtype: torch.dtype, vocab: int, hidden: int) -> nn.Module:
    """An embedding and an output head sharing one weight, as a tied-embedding LM holds them."""
    torch.manual_seed(vocab + hidden)
    model = nn.Module()
    model.embed_tokens = nn.Embedding(vocab, hidden).to(dtype)
    model.lm_head = nn.Linear(hidden, vocab, bias=False).to(dtype)
    model.lm_head.weight = model.embed_tokens.weight
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,hidden", [(200, 96), (97, 41), (48, 64), (5, 33)])
@pytest.mark.parametrize("layout", ["pytorch", "native"])
def test_panel_embedding_reads_the_tied_rows_from_the_head_panels(dtype, vocab, hidden, layout):
    """Every token's row, read back from the packed panels (partial last panel, odd K in bfloat16 pairs), equals
    the embedding's row bit for bit, in the PyTorch path's 48-column panels and in this CPU's native panel width
    (16 with AVX2). The packing is plain PyTorch (the head's kernel is not called)."""
    ops = None if layout == "pytorch" else kernel_ops(dtype)
    if layout == "native" and ops is None:
        pytest.skip(f"no {dtype} panel kernel on this CPU")
    model = _tied_model(dtype, vocab, hidden)
    ids = torch.cat([torch.arange(vocab), torch.randint(0, vocab, (37,))]).reshape(-1, 1)
    expected = model.embed_tokens(ids)
    head = PanelLinear(model.lm_head, ops=ops)
    assert head.packed_weight.shape[2] == panel_width(ops)
    embedding = PanelEmbedding(head)
    got = embedding(ids)
    assert got.shape == expected.shape == (ids.shape[0], 1, hidden) and got.dtype == dtype
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_linears_keeps_a_tied_head_single(dtype):
    """A head tied to the embedding is packed into panels once and the embedding reads its rows from them (float32
    everywhere: through the panel kernel or ``torch.matmul``; bfloat16 with the kernel); a tied bfloat16 head
    without the kernel runs oneDNN on the shared weight itself. No plain copy stays beside the packed one. (The
    panel kernel asked for: where it is not the CPU's choice, as bfloat16 on AMX, the default takes oneDNN.)"""
    model = _tied_model(dtype, 300, 64)
    ids = torch.randint(0, 300, (9,))
    hidden = torch.randn(5, 64, dtype=dtype)
    expected_rows, expected_logits = model.embed_tokens(ids), model.lm_head(hidden)
    weight = model.embed_tokens.weight
    packs = pack_linears(model, KernelConfig(cpu_linear_kernel="panel"))
    if dtype == torch.float32 or panel_kernels(dtype) is not None:
        assert packs == 1 and type(model.lm_head) is PanelLinear and type(model.embed_tokens) is PanelEmbedding
        assert model.embed_tokens.table is model.lm_head.packed_weight
    elif onednn_available(dtype):
        assert packs == 1 and type(model.lm_head) is PackedLinear and not model.lm_head.prepacked
        assert model.lm_head.packed_weight.data_ptr() == weight.data_ptr()  # the embedding's tensor, not a copy
        assert model.embed_tokens.weight is weight
    else:
        assert packs == 0 and model.lm_head.weight is model.embed_tokens.weight
    assert torch.equal(model.embed_tokens(ids), expected_rows)
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(model.lm_head(hidden).float(), expected_logits.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [0, 1, 7, 64])
@pytest.mark.parametrize(("in_features", "out_features"), [(96, 200), (33, 5), (64, 48)])
def test_panel_linear_without_the_kernel_matches_reference(bias, rows, in_features, out_features):
    """Float32 panels through ``torch.matmul`` (the tied head's path on CPUs without the panel kernel), with
    ``out`` and batched shapes."""
    torch.manual_seed(rows)
    linear = nn.Linear(in_features, out_features, bias=bias)
    layer = PanelLinear(linear, ops=None)
    x = torch.randn(rows, in_features)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)
    out = torch.full((rows, out_features), float("nan"))
    assert layer(x, out=out).data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, linear(x), rtol=1e-5, atol=1e-5)
    batched = torch.randn(2, 3, in_features)
    torch.testing.assert_close(layer(batched), linear(batched), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_packed_linear_on_the_plain_weight_matches_reference(rows):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 200)
    x = torch.randn(rows, 96)
    torch.testing.assert_close(PackedLinear(linear, prepack=False)(x), linear(x), rtol=1e-5, atol=1e-5)


def test_bfloat16_engine_runs_the_panel_kernel_and_tracks_hf(tiny_checkpoint_factory, monkeypatch):
    """A bfloat16 engine on a CPU with the bfloat16 panel kernel (AVX512_BF16, or AVX2 widening the weights) runs
    every linear through it, the tied head included, and its greedy tokens follow Hugging Face's bfloat16 model:
    every first token equal, and at least five of six 12-token continuations equal throughout (bfloat16 rounds
    each layer's output, so two correct implementations may part at a near tie; on this project's AVX2 test
    machine five of six agree to the last token and the sixth from its sixth). The kernel is asked for by name:
    on AMX CPUs the engine's own choice for bfloat16 is oneDNN."""
    monkeypatch.setenv("INFERNEO_CPU_LINEAR_KERNEL", "panel")
    if panel_kernels(torch.bfloat16) is None:
        pytest.skip("no bfloat16 panel kernel on this CPU (needs avx512_bf16, or avx2 + fma + f16c)")
    from test_hf_parity import mixed_prompts
    from transformers import AutoModelForCausalLM

    from inferneo import LLM, SamplingParams

    path = tiny_checkpoint_factory("llama", tie_word_embeddings=True, hidden_size=128, num_heads=4, num_kv_heads=2)
    llm = LLM(str(path), dtype="bfloat16", kv_cache_memory="32MiB")
    kinds = {type(m).__name__ for m in llm.engine.runner.model.modules()}
    assert "PanelLinear" in kinds and not kinds & {"Linear", "PackedLinear"}
    prompts = mixed_prompts(6, 384)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    got = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy, use_tqdm=False)]
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    hf.generation_config.eos_token_id = None
    expected = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=12, do_sample=False, pad_token_id=0)
            expected.append(out[0, len(p):].tolist())
    assert [g[0] for g in got] == [e[0] for e in expected]
    assert sum(g == e for g, e in zip(got, expected, strict=True)) >= 5
