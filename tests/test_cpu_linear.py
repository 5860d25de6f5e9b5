"""The oneDNN packed linear (the CPU fast path) against the reference ``nn.Linear``."""

import pytest
import torch
from torch import nn

from inferneo.model_executor.layers.cpu_linear import PackedLinear, onednn_available, pack_linears

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN linear")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_packed_linear_matches_reference(dtype, bias, rows):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias).to(dtype)
    x = torch.randn(rows, 96, dtype=dtype)
    expected = linear(x)
    got = PackedLinear(linear)(x)
    assert got.shape == expected.shape and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_pack_linears_swaps_every_linear_and_keeps_tied_weights():
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 50, bias=False))
    model[3].weight = nn.Parameter(torch.randn(50, 32))
    x = torch.randn(3, 16)
    expected = model[3](torch.relu(model[1](x)))
    assert pack_linears(model) == 2
    assert isinstance(model[1], PackedLinear) and isinstance(model[3], PackedLinear)
    torch.testing.assert_close(model[3](torch.relu(model[1](x))), expected, rtol=1e-5, atol=1e-5)
    assert model[0].weight.shape == (50, 16)
