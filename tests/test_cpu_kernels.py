"""The native CPU kernels against the pure-PyTorch reference paths they replace."""

import pytest
import torch

from inferneo.attention import AttentionMetadata, TorchReferenceBackend
from inferneo.kernels.cpu import load_cpu_kernels
from inferneo.model_executor.layers.rotary import RotaryEmbedding

kernels = load_cpu_kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="native CPU kernels could not be built here")


def _decode_case(dtype, batch=7, heads=8, kv_heads=2, head_dim=32, block_size=4, num_blocks=64, max_blocks=9):
    torch.manual_seed(0)
    kv = torch.randn(2, kv_heads, num_blocks, block_size, head_dim, dtype=dtype)
    tables = torch.stack([torch.randperm(num_blocks)[:max_blocks] for _ in range(batch)])
    lens = torch.tensor([1, 5, 36, 17, 4, 33, 8][:batch])
    q = torch.randn(batch, heads, head_dim, dtype=dtype)
    meta = AttentionMetadata(block_size=block_size, num_decode_tokens=batch, slot_mapping=torch.empty(0, dtype=torch.long),
                             decode_block_tables=tables, decode_seq_lens=lens)
    return q, kv, meta


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_paged_decode_attention_matches_reference(dtype, tol):
    q, kv, meta = _decode_case(dtype)
    ref_backend = TorchReferenceBackend()
    ref_backend.prepare(meta)
    expected = ref_backend.decode_attention(q, kv, meta, 0.3)
    got = kernels.paged_decode_attention(q, kv[0], kv[1], meta.decode_block_tables, meta.decode_seq_lens, 0.3)
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


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
