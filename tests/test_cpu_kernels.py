"""The native CPU kernels against the pure-PyTorch reference paths they replace."""

from pathlib import Path

import pytest
import torch

from inferneo.attention import AttentionMetadata, TorchReferenceBackend
from inferneo.attention.check_cases import STANDARD_CASES, AttentionCase, build_step, relative_error
from inferneo.kernels.cpu import load_cpu_kernels
from inferneo.model_executor.layers.rotary import RotaryEmbedding

kernels = load_cpu_kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="native CPU kernels could not be built here")


def _to_native_layout(kv: torch.Tensor) -> torch.Tensor:
    """The reference cache ``[2, Hkv, blocks, bs, D]`` in the native layout (key blocks dimension-major)."""
    two, kv_heads, num_blocks, block_size, head_dim = kv.shape
    keys = kv[0].transpose(2, 3).reshape(kv_heads, num_blocks, block_size * head_dim)
    values = kv[1].reshape(kv_heads, num_blocks, block_size * head_dim)
    return torch.stack([keys, values]).contiguous()


def _decode_case(dtype, batch=7, heads=8, kv_heads=2, head_dim=32, block_size=4, num_blocks=64, max_blocks=9,
                 lens=(1, 5, 36, 17, 4, 33, 8)):
    torch.manual_seed(0)
    kv = torch.randn(2, kv_heads, num_blocks, block_size, head_dim, dtype=dtype)
    tables = torch.stack([torch.randperm(num_blocks)[:max_blocks] for _ in range(batch)])
    lens = torch.tensor(lens[:batch])
    q = torch.randn(batch, heads, head_dim, dtype=dtype)
    meta = AttentionMetadata(block_size=block_size, num_decode_tokens=batch, slot_mapping=torch.empty(0, dtype=torch.long),
                             decode_block_tables=tables, decode_seq_lens=lens)
    return q, kv, meta


# The first shape takes the portable loops (block size 4), the others the vector path (AVX-512 or AVX2): group
# sizes 1 (MHA), 3 (odd: one head of the last pair alone) and 4, head dims 64 and 128, block sizes 16 and 32. The
# last one (head dim 40) is vector on AVX2 (a multiple of 8) and portable on AVX-512; its lengths end chunks of
# 16 tokens after 13, 14, 15, 9, 2, 16 and 8 tokens (both 8-lane halves partly filled).
DECODE_SHAPES = [
    dict(heads=8, kv_heads=2, head_dim=32, block_size=4, num_blocks=64, max_blocks=9),
    dict(heads=9, kv_heads=3, head_dim=64, block_size=16, num_blocks=40, max_blocks=3),
    dict(heads=4, kv_heads=4, head_dim=128, block_size=16, num_blocks=40, max_blocks=3),
    dict(heads=8, kv_heads=2, head_dim=64, block_size=32, num_blocks=40, max_blocks=2),
    dict(heads=6, kv_heads=2, head_dim=40, block_size=16, num_blocks=40, max_blocks=3, lens=(13, 30, 47, 9, 2, 48, 40)),
]


@pytest.mark.parametrize("shape", DECODE_SHAPES)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_paged_decode_attention_matches_reference(shape, dtype, tol):
    q, kv, meta = _decode_case(dtype, **shape)
    ref_backend = TorchReferenceBackend()
    ref_backend.prepare(meta)
    expected = ref_backend.decode_attention(q.float(), kv.float(), meta, 0.3)  # float32 math on the same inputs
    got = torch.full_like(q, float("nan"))
    kernels.paged_decode_attention(q, _to_native_layout(kv), meta.decode_block_tables, meta.decode_seq_lens, 0.3, got)
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


# Contexts longer than the AVX-512 kernel's 256-token spans (the softmax is rescaled between spans; lengths at and
# around span and chunk ends), head dims that leave 32 and 16 lanes after the 64-lane slices of the value pass, and
# a group of 8 query heads (two passes of 4 over each span).
LONG_DECODE_SHAPES = [
    dict(heads=8, kv_heads=1, head_dim=96, block_size=16, num_blocks=200, max_blocks=70,
         lens=(1000, 257, 256, 300, 17, 513, 1100)),
    dict(heads=6, kv_heads=2, head_dim=80, block_size=32, num_blocks=120, max_blocks=40,
         lens=(1000, 1280, 5, 600, 255, 129, 33)),
]


def _naive_paged_attention(q, kv, tables, lens, scale, window=0, softcap=0.0, sinks=None):
    """Per query and head, in float64: scores over the request's visible tokens (the last ``window`` only, when
    set), soft-capped, softmax with an optional sink logit in the denominator."""
    batch, heads, _ = q.shape
    kv_heads, block_size = kv.shape[1], kv.shape[3]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(batch):
        n = int(lens[b])
        blocks = tables[b, : -(-n // block_size)]
        keys = kv[0][:, blocks].reshape(kv_heads, -1, kv.shape[-1])[:, :n].double()
        values = kv[1][:, blocks].reshape(kv_heads, -1, kv.shape[-1])[:, :n].double()
        first = n - window if 0 < window < n else 0
        for h in range(heads):
            kvh = h // (heads // kv_heads)
            scores = keys[kvh, first:] @ q[b, h].double() * scale
            if softcap:
                scores = softcap * torch.tanh(scores / softcap)
            top = scores.max() if sinks is None else torch.maximum(scores.max(), sinks[h].double())
            weights = torch.exp(scores - top)
            denominator = weights.sum() + (0.0 if sinks is None else torch.exp(sinks[h].double() - top))
            out[b, h] = weights @ values[kvh, first:] / denominator
    return out


@pytest.mark.parametrize("shape", LONG_DECODE_SHAPES)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("variant", [{}, dict(sliding_window=300), dict(sliding_window=7, logit_softcap=5.0),
                                     dict(logit_softcap=2.0, sinks=True)], ids=["plain", "window", "window-softcap",
                                                                               "softcap-sinks"])
def test_paged_decode_attention_over_long_contexts(shape, dtype, tol, variant):
    q, kv, meta = _decode_case(dtype, **shape)
    options = dict(variant)
    if options.pop("sinks", False):
        options["sinks"] = torch.linspace(-1.0, 3.0, q.shape[1])
    expected = _naive_paged_attention(q.float(), kv.float(), meta.decode_block_tables, meta.decode_seq_lens, 0.1,
                                      window=options.get("sliding_window", 0),
                                      softcap=options.get("logit_softcap", 0.0), sinks=options.get("sinks"))
    got = torch.full_like(q, float("nan"))
    kernels.paged_decode_attention(q, _to_native_layout(kv), meta.decode_block_tables, meta.decode_seq_lens, 0.1, got,
                                   **options)
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)


def test_paged_decode_attention_reads_strided_queries():
    """Queries may be a view into the fused qkv output (a batch stride wider than heads x dim)."""
    q, kv, meta = _decode_case(torch.float32, **DECODE_SHAPES[1])
    wide = torch.randn(q.shape[0], q.shape[1] * q.shape[2] + 40)
    wide[:, : q.shape[1] * q.shape[2]] = q.reshape(q.shape[0], -1)
    view = wide[:, : q.shape[1] * q.shape[2]].view(q.shape)
    native = _to_native_layout(kv)
    a, b = torch.empty_like(q), torch.empty_like(q)
    kernels.paged_decode_attention(q, native, meta.decode_block_tables, meta.decode_seq_lens, 0.3, a)
    kernels.paged_decode_attention(view, native, meta.decode_block_tables, meta.decode_seq_lens, 0.3, b)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_writes_the_native_layout(dtype):
    torch.manual_seed(0)
    kv_heads, head_dim, block_size, num_blocks, tokens = 3, 64, 16, 8, 11
    qkv = torch.randn(tokens, (3 + 2 * kv_heads) * head_dim, dtype=dtype)  # k/v as strided views, as in the model
    k = qkv[:, 3 * head_dim : (3 + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (3 + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    ref = torch.zeros(2, kv_heads, num_blocks, block_size, head_dim, dtype=dtype)
    flat = ref.view(2, kv_heads, -1, head_dim)
    flat[0].index_copy_(1, slots, k.transpose(0, 1))
    flat[1].index_copy_(1, slots, v.transpose(0, 1))
    native = torch.zeros(2, kv_heads, num_blocks, block_size * head_dim, dtype=dtype)
    kernels.store_kv(k, v, native, slots)
    assert torch.equal(native, _to_native_layout(ref))


@pytest.mark.parametrize("shape", DECODE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_store_kv_and_decode_equals_the_two_calls(shape, dtype):
    """The fused decode step (each row's new key and value stored by the item that then reads its blocks) leaves the
    same cache and gives the same outputs, bit for bit, as store_kv followed by paged_decode_attention: every
    shape of the decode tests (the first and last take the portable kernel, where the entry makes the two calls),
    keys and values as strided views of a fused projection, the new token at each row's last position, one row
    with no slot (-1: nothing stored)."""
    q, kv, meta = _decode_case(dtype, **shape)
    batch, kv_heads, head_dim = q.shape[0], kv.shape[1], kv.shape[-1]
    block_size, num_blocks, max_blocks = kv.shape[3], kv.shape[2], meta.decode_block_tables.shape[1]
    torch.manual_seed(3)
    # rows own disjoint blocks, as requests own their last, partly filled block in the engine
    tables = torch.randperm(num_blocks)[: batch * max_blocks].view(batch, max_blocks)
    lens = meta.decode_seq_lens
    slots = torch.stack([tables[b, (int(lens[b]) - 1) // block_size] * block_size + (int(lens[b]) - 1) % block_size
                         for b in range(batch)])
    slots[2] = -1
    fused_proj = torch.randn(batch, (2 + 2 * kv_heads) * head_dim, dtype=dtype)
    k = fused_proj[:, 2 * head_dim : (2 + kv_heads) * head_dim].view(batch, kv_heads, head_dim)
    v = fused_proj[:, (2 + kv_heads) * head_dim :].view(batch, kv_heads, head_dim)
    separate, fused = _to_native_layout(kv), _to_native_layout(kv)
    expected, got = torch.full_like(q, float("nan")), torch.full_like(q, float("nan"))
    kernels.store_kv(k, v, separate, slots)
    kernels.paged_decode_attention(q, separate, tables, lens, 0.3, expected)
    kernels.store_kv_and_decode(k, v, fused, slots, q, tables, lens, 0.3, got)
    assert not torch.equal(separate, _to_native_layout(kv))  # the new tokens went in
    assert torch.equal(fused, separate)
    assert torch.equal(got, expected)


def test_native_backend_matches_reference_on_a_mixed_step():
    """Decode rows, a prompt with no context and a chunk with cached context, through both backends' forward."""
    from inferneo.attention import PrefillSpan
    from inferneo.attention.cpu_native import CpuNativeBackend

    torch.manual_seed(0)
    heads, kv_heads, head_dim, block_size, num_blocks = 9, 3, 64, 16, 32
    ref_cache = torch.randn(2, kv_heads, num_blocks, block_size, head_dim)
    native_cache = _to_native_layout(ref_cache)
    # two decode rows (contexts of 20 and 33 tokens), a fresh prompt of 7 tokens, a chunk of 5 after 18 cached
    tables = [torch.tensor([3, 9]), torch.tensor([4, 10, 11]), torch.tensor([12]), torch.tensor([5, 6])]
    slots = torch.tensor([9 * 16 + 3, 11 * 16 + 0, *range(12 * 16, 12 * 16 + 7), *(6 * 16 + i for i in range(2, 7))])
    q = torch.randn(14, heads, head_dim)
    k, v = torch.randn(14, kv_heads, head_dim), torch.randn(14, kv_heads, head_dim)

    def metadata():
        width = 3
        decode_tables = torch.stack([torch.nn.functional.pad(t, (0, width - len(t))) for t in tables[:2]])
        return AttentionMetadata(
            block_size=block_size, num_decode_tokens=2, slot_mapping=slots, decode_block_tables=decode_tables,
            decode_seq_lens=torch.tensor([20, 33]),
            prefills=[PrefillSpan(2, 7, 0, tables[2]), PrefillSpan(9, 5, 18, tables[3])],
        )

    ref_backend, native_backend = TorchReferenceBackend(), CpuNativeBackend()
    ref_meta, native_meta = metadata(), metadata()
    ref_backend.prepare(ref_meta)
    native_backend.prepare(native_meta)
    expected = ref_backend.forward(q, k, v, ref_cache, ref_meta, 0.125)
    got = native_backend.forward(q, k, v, native_cache, native_meta, 0.125)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(native_cache, _to_native_layout(ref_cache))  # the same slots were written


# The shared backend cases, plus spans the vector kernel does not take (head size 72, block size 8: SDPA path).
_BACKEND_CASES = (
    *STANDARD_CASES,
    AttentionCase("long-prompts", 9, 3, 64, 16, decode_lens=(3, 100), prefills=((0, 300), (64, 130), (250, 1))),
    AttentionCase("sdpa-d72", 4, 2, 72, 16, decode_lens=(3, 40), prefills=((0, 21), (17, 21))),
    AttentionCase("sdpa-bs8", 4, 2, 64, 8, decode_lens=(9,), prefills=((0, 12), (13, 6))),
    # fresh prompts at, above and below the AMX choice's 128 tokens (two of one length: one SDPA call), between
    # a chunk after cached context and decodes
    AttentionCase("fresh-prompts-around-128", 9, 3, 64, 16, decode_lens=(3, 70),
                  prefills=((0, 128), (10, 20), (0, 150), (0, 128), (0, 127))),
)


@pytest.mark.parametrize("case", _BACKEND_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-6), (torch.bfloat16, 1.5e-2)], ids=str)
@pytest.mark.parametrize("cpu", ["avx512_bf16", "amx_bf16"])
def test_native_backend_matches_reference_on_backend_cases(case, dtype, tol, cpu):
    """Every token of a step (decodes, fresh prompts, chunks after cached context) through the native backend, with
    the prompt-attention choice of a CPU without AMX (every token paged) and of one with AMX-BF16 (bfloat16 fresh
    prompts of 128 tokens and more through SDPA, the rest paged, in runs around them)."""
    from inferneo.attention.cpu_native import CpuNativeBackend
    from inferneo.kernels.cpu_features import CpuFeatures

    step = build_step(case, dtype, "cpu")
    reference, native = TorchReferenceBackend(), CpuNativeBackend()
    native.sdpa_features = CpuFeatures.of("test CPU", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16",
                                          *(["amx_tile", "amx_bf16"] if cpu == "amx_bf16" else []))
    ref_cache, native_cache = step.ref_cache.float(), _to_native_layout(step.ref_cache)  # float32 reference math
    ref_meta, native_meta = step.metadata(), step.metadata()
    reference.prepare(ref_meta)
    native.prepare(native_meta)
    expected = reference.forward(step.q.float(), step.k.float(), step.v.float(), ref_cache, ref_meta, step.scale)
    got = native.forward(step.q, step.k, step.v, native_cache, native_meta, step.scale)
    assert torch.equal(native_cache, _to_native_layout(ref_cache.to(dtype)))
    assert relative_error(got, expected) < tol


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_silu_and_mul_matches_reference(dtype, tol):
    torch.manual_seed(0)
    x = (torch.randn(5, 2 * 76) * 4).to(dtype)  # 76: vector lanes (16 or 8 wide) and a scalar tail
    gate, up = x.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(kernels.silu_and_mul(x), expected, rtol=tol, atol=tol)


def test_rms_norm_with_and_without_residual_matches_reference():
    torch.manual_seed(0)
    x, res, w = torch.randn(5, 48), torch.randn(5, 48), torch.rand(48) + 0.5

    def ref(h):
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))

    torch.testing.assert_close(kernels.rms_norm(x, None, w, 1e-6), ref(x), rtol=1e-5, atol=1e-5)
    residual = res.clone()
    out = kernels.rms_norm(x, residual, w, 1e-6)
    torch.testing.assert_close(residual, x + res)
    torch.testing.assert_close(out, ref(x + res), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_class", ["RMSNorm", "GemmaRMSNorm"])
def test_rms_norm_matches_the_model_norms(dtype, norm_class):
    """The kernel against the model's own norm modules, with and without the residual: the plain RMSNorm and, with
    ``weight_offset``, Gemma's (``x / rms * (1 + weight)`` in float32, rounded once); and the native modules the
    CPU engine swaps in give the same as the kernel, falling back to the module's PyTorch path for strided input."""
    from inferneo.model_executor.device_kernels import NativeGemmaRMSNorm, NativeRMSNorm
    from inferneo.model_executor.layers import basic

    torch.manual_seed(1)
    gemma = norm_class == "GemmaRMSNorm"
    module = getattr(basic, norm_class)(76, eps=1e-6)
    with torch.no_grad():
        module.weight.copy_(torch.randn(76) * 0.3 + (0.0 if gemma else 1.0))
    module.to(dtype)
    x, res = (torch.randn(9, 76) * 3).to(dtype), torch.randn(9, 76).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(kernels.rms_norm(x, None, module.weight, 1e-6, gemma), module(x), rtol=tol, atol=tol)
    residual = res.clone()
    out = kernels.rms_norm(x, residual, module.weight, 1e-6, gemma)
    expected, expected_residual = module(x, res)
    assert torch.equal(residual, expected_residual)
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    native = (NativeGemmaRMSNorm if gemma else NativeRMSNorm)(module, kernels)
    assert torch.equal(native(x), kernels.rms_norm(x, None, module.weight, 1e-6, gemma))
    strided = torch.randn(9, 80).to(dtype)[:, :76]
    torch.testing.assert_close(native(strided), module(strided), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_in_place_matches_reference(dtype):
    torch.manual_seed(0)
    heads, kv_heads, dim = 4, 2, 16
    rope = RotaryEmbedding(dim, 128, 10000.0)
    qkv = torch.randn(6, (heads + 2 * kv_heads) * dim, dtype=dtype)
    positions = torch.tensor([0, 3, 7, 50, 127, 1])
    q_ref, k_ref = rope(positions, qkv[:, : heads * dim].view(6, heads, dim),
                        qkv[:, heads * dim : (heads + kv_heads) * dim].view(6, kv_heads, dim))
    v_before = qkv[:, (heads + kv_heads) * dim :].clone()
    kernels.rotary_inplace(qkv, positions, rope.cos_cache, rope.sin_cache, heads + kv_heads, dim)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(qkv[:, : heads * dim].view(6, heads, dim), q_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(qkv[:, heads * dim : (heads + kv_heads) * dim].view(6, kv_heads, dim), k_ref,
                               rtol=tol, atol=tol)
    assert torch.equal(qkv[:, (heads + kv_heads) * dim :], v_before)  # values untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_class", ["RMSNorm", "GemmaRMSNorm"])
def test_qk_norms_and_rotary_in_place_match_the_modules(dtype, norm_class):
    """``qk_norm_rotary_inplace`` against the model's own modules: each query head through ``q_norm``, each key
    head through ``k_norm`` (plain RMSNorm, or Gemma's offset weight), then ``RotaryEmbedding``; the value heads
    and a padding column past them untouched. float32 within 1e-6 (the norm's float32 sum runs in another order);
    bfloat16 within one rounding of the stored values."""
    from inferneo.model_executor.layers import basic

    torch.manual_seed(0)
    heads, kv_heads, dim, tokens = 6, 2, 32, 7
    rope = RotaryEmbedding(dim, 256, 10000.0)
    q_norm, k_norm = (getattr(basic, norm_class)(dim, eps=1e-6) for _ in range(2))
    with torch.no_grad():
        q_norm.weight.copy_(torch.randn(dim) * 0.3 + (0 if norm_class == "GemmaRMSNorm" else 1))
        k_norm.weight.copy_(torch.randn(dim) * 0.3 + (0 if norm_class == "GemmaRMSNorm" else 1))
    q_norm.to(dtype), k_norm.to(dtype)
    width = (heads + 2 * kv_heads) * dim
    qkv = (torch.randn(tokens, width + 3) * 4).to(dtype)[:, :width]  # rows with a stride past the heads
    positions = torch.tensor([0, 3, 7, 50, 255, 1, 128])
    q = q_norm(qkv[:, : heads * dim].reshape(tokens, heads, dim))
    k = k_norm(qkv[:, heads * dim : (heads + kv_heads) * dim].reshape(tokens, kv_heads, dim))
    q_ref, k_ref = rope(positions, q, k)
    rest_before = qkv[:, (heads + kv_heads) * dim :].clone()
    kernels.qk_norm_rotary_inplace(qkv, positions, rope.cos_cache, rope.sin_cache, heads, kv_heads, dim,
                                   q_norm.weight, k_norm.weight, 1e-6, norm_class == "GemmaRMSNorm")
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(qkv[:, : heads * dim].view(tokens, heads, dim), q_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim), k_ref,
                               rtol=tol, atol=tol)
    assert torch.equal(qkv[:, (heads + kv_heads) * dim :], rest_before)  # values untouched
    with pytest.raises(RuntimeError, match="q_weight and k_weight"):
        kernels.qk_norm_rotary_inplace(qkv, positions, rope.cos_cache, rope.sin_cache, heads, kv_heads, dim,
                                       q_norm.weight[:-1], k_norm.weight, 1e-6, False)


def test_paged_attention_refuses_rows_and_lengths_outside_the_table():
    """A table row or a length past the block table is an error, not a read of foreign memory."""
    q, kv, meta = _decode_case(torch.float32, **DECODE_SHAPES[1])
    native, out = _to_native_layout(kv), torch.empty_like(q)
    tables, lens = meta.decode_block_tables, meta.decode_seq_lens
    with pytest.raises(RuntimeError, match="names table row 7 of 7"):
        kernels.paged_decode_attention(q, native, tables, lens, 0.3, out, torch.full((q.shape[0],), 7))
    too_long = lens.clone()
    too_long[2] = tables.shape[1] * 16 + 1
    with pytest.raises(RuntimeError, match="query 2 has length 49, its table row holds 48 tokens"):
        kernels.paged_decode_attention(q, native, tables, too_long, 0.3, out)
    kernels.paged_decode_attention(q, native, tables, lens, 0.3, out, torch.arange(q.shape[0]))  # in range: fine


def _cpu_flags() -> set[str]:
    """The first processor's flags in /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.partition(":")[2].split()) for line in text.splitlines() if line.startswith("flags")), set())


# The vector paths a build can have, with the CPU flags each needs (-march=native picks the widest the CPU has).
_VECTOR_PATHS = {"avx512": ("avx512f",), "avx2": ("avx2", "fma", "f16c")}


@pytest.mark.parametrize("isa", list(_VECTOR_PATHS))
def test_vector_paths_of_this_cpu_are_built_and_match_reference(isa):
    """The build uses the widest vector path this CPU has: AVX-512 where it has avx512f, else AVX2 + FMA + F16C.
    That path runs decode attention on a vector shape (checked against the reference above as well); a path the
    CPU cannot run is skipped, naming the missing flags."""
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to check the build against")
    missing = [flag for flag in _VECTOR_PATHS[isa] if flag not in flags]
    if missing:
        pytest.skip(f"the {isa} kernels need {' and '.join(missing)}, which this CPU lacks")
    if isa == "avx2" and "avx512f" in flags:
        pytest.skip("this CPU has avx512f: the build takes the AVX-512 paths instead of AVX2")
    assert kernels.vector_isa().startswith(isa)
    q, kv, meta = _decode_case(torch.float32, **DECODE_SHAPES[1])
    ref_backend = TorchReferenceBackend()
    ref_backend.prepare(meta)
    expected = ref_backend.decode_attention(q, kv, meta, 0.3)
    got = torch.empty_like(q)
    kernels.paged_decode_attention(q, _to_native_layout(kv), meta.decode_block_tables, meta.decode_seq_lens, 0.3, got)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab", [1, 7, 16, 63, 64, 65, 1000, 49152])
def test_argmax_rows_picks_what_torch_argmax_picks(vocab):
    """The sampler's native argmax: torch.argmax(dim=-1)'s index for every row, with ties (the lowest index wins),
    a NaN (the first NaN wins, anywhere in the row), rows of -inf only, +inf, and rows taken from a wider tensor
    (a row stride larger than the vocabulary)."""
    gen = torch.Generator().manual_seed(vocab)
    rows = torch.randn(12, vocab + 5, generator=gen)[:, :vocab]  # strided rows
    rows[1] = rows[1].round()  # many exact ties
    rows[2] = 3.0  # every entry tied
    rows[3] = float("-inf")
    if vocab > 1:
        rows[4, vocab // 2] = float("inf")
        rows[5, vocab - 1] = float("nan")
        rows[6, vocab // 3] = float("nan")
        rows[6, vocab - 1] = float("nan")
        rows[7, 0] = float("nan")
        rows[8, vocab - 1] = rows[8].max() + 1  # the maximum in the last lane
        rows[9, [vocab // 4, vocab - 2]] = rows[9].max() + 1  # a tie of two maxima far apart
    assert rows.stride(0) == vocab + 5
    got = kernels.argmax_rows(rows)
    assert got.dtype == torch.int64
    assert torch.equal(got, rows.argmax(dim=-1))
    assert torch.equal(kernels.argmax_rows(rows.contiguous()), rows.argmax(dim=-1))
    assert kernels.argmax_rows(torch.empty(0, vocab)).shape == (0,)


def test_argmax_rows_refuses_what_it_cannot_read():
    with pytest.raises(RuntimeError, match="float32"):
        kernels.argmax_rows(torch.zeros(2, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="unit inner stride"):
        kernels.argmax_rows(torch.zeros(8, 2).t())
    with pytest.raises(RuntimeError, match="zero length"):
        kernels.argmax_rows(torch.zeros(2, 0))


def test_the_cpu_sampler_takes_the_native_argmax_and_agrees_with_torch():
    """The CPU engine's sampler argmax is the native kernel for contiguous float32 rows and torch.argmax for
    anything else (other dtypes, 1-D input); both give torch.argmax's choice."""
    from inferneo.kernels.cpu import argmax_rows_for

    argmax = argmax_rows_for(torch.device("cpu"))
    assert argmax is not None
    assert argmax_rows_for(torch.device("meta")) is None
    x = torch.randn(5, 300)
    x[2, 10] = x[2, 200] = x[2].max() + 1
    for value in (x, x.bfloat16(), x.double(), x[0]):
        assert torch.equal(argmax(value), value.argmax(dim=-1))



def test_kv_stores_refuse_slots_outside_the_cache():
    """A slot past the cache's last one is an error naming it, not a write into foreign memory, in both entries that
    store new tokens (they share one check); a wrong dtype for the fused entry is refused too."""
    q, kv, meta = _decode_case(torch.float32, **DECODE_SHAPES[1])
    native = _to_native_layout(kv)
    batch, kv_heads, head_dim = q.shape[0], kv.shape[1], kv.shape[-1]
    k, v = torch.randn(batch, kv_heads, head_dim), torch.randn(batch, kv_heads, head_dim)
    slots = torch.zeros(batch, dtype=torch.long)
    slots[3] = kv.shape[2] * kv.shape[3]  # one past the last slot
    before = native.clone()
    with pytest.raises(RuntimeError, match="store_kv: slot .* is outside the cache"):
        kernels.store_kv(k, v, native, slots)
    with pytest.raises(RuntimeError, match="store_kv_and_decode: slot .* is outside the cache"):
        kernels.store_kv_and_decode(k, v, native, slots, q, meta.decode_block_tables, meta.decode_seq_lens, 0.3,
                                    torch.empty_like(q))
    with pytest.raises(RuntimeError, match="must be in q's dtype"):
        kernels.store_kv_and_decode(k.double(), v.double(), native, slots.clamp(max=0), q, meta.decode_block_tables,
                                    meta.decode_seq_lens, 0.3, torch.empty_like(q))
    assert torch.equal(native, before)
