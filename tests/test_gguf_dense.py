"""The dense path of wide16 GGUF layers (``quantization/gguf_dense.py``): a call from some row count up
de-quantizes the weight into ``[K, N]`` and runs one ``torch.mm`` (oneDNN; AMX tiles on CPUs that have them).

- ``gguf_packed_dequantize_kn`` gives the file's de-quantized weight, transposed, bit for bit in float32 and
  rounded to nearest even in bfloat16 (the values the bfloat16 panels hold), a last partial group included.
- The candidates follow the CPU's features (feature sets passed in): bfloat16 activations on AMX-BF16 only.
- ``dense_from_rows`` honours the forced kernel and the tune switch, picks the smallest measured row count from
  which the dense path wins at every larger one (timings passed in), and reads a stored answer back from the tune
  cache instead of measuring again; its measurement runs both paths on this CPU.
- The wide16 matmul sends calls from ``dense_from`` rows up through the dense path and the rest through the panels.
Kernel tests skip on CPUs without AVX-512 (AVX512_BF16 for bfloat16), naming the missing feature.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_gguf_wide16 import _blocks, _qtype

from inferneo.kernel_config import KernelConfig
from inferneo.kernels.cpu_features import CpuFeatures
from inferneo.kernels.cpu_tune_cache import TuneCache
from inferneo.quantization import gguf as gguf_module
from inferneo.quantization import gguf_dense
from inferneo.quantization.gguf_blocks import KEPT_FORMATS, dequantize_blocks
from inferneo.quantization.gguf_wide import pack_wide16

AMX = CpuFeatures.of("Intel Xeon", "amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx512bw", "avx512vl",
                     "avx512dq", "avx2", "fma", "f16c")
ZEN5 = CpuFeatures.of("AMD EPYC", "avx512_bf16", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c")


@pytest.fixture(autouse=True)
def fresh_memo(monkeypatch):
    monkeypatch.setattr(gguf_dense, "_memo", {})


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1"])
def test_dequantize_kn_is_the_transposed_weight(name, wide16_ops):
    for rows, k in ((37, 64), (48, 544)):
        blocks = _blocks(name, rows, k, seed=rows)
        weight = dequantize_blocks(blocks, _qtype(name))
        tiles = pack_wide16(blocks, _qtype(name))
        wt = wide16_ops.gguf_packed_dequantize_kn(tiles, _qtype(name), rows, torch.float32)
        assert wt.shape == (k, rows) and torch.equal(wt.t(), weight)
        if wide16_ops.gguf_isa() == "avx512_bf16":
            assert torch.equal(wide16_ops.gguf_packed_dequantize_kn(tiles, _qtype(name), rows, torch.bfloat16).t(),
                               weight.bfloat16())
    with pytest.raises(RuntimeError, match="float32 or bfloat16 out"):
        wide16_ops.gguf_packed_dequantize_kn(tiles, _qtype(name), rows, torch.float16)
    with pytest.raises(RuntimeError, match="do not hold 80 output features"):
        wide16_ops.gguf_packed_dequantize_kn(tiles, _qtype(name), 80, torch.float32)


def test_candidates_follow_the_cpu():
    assert gguf_dense.dense_candidate(AMX, torch.bfloat16)
    assert not gguf_dense.dense_candidate(AMX, torch.float32)  # AMX has no float32 tiles
    assert not gguf_dense.dense_candidate(ZEN5, torch.bfloat16)  # the same vdpbf16ps as the panels
    tiles = torch.zeros(2, 2, 320, dtype=torch.uint8)
    assert gguf_dense.dense_from_rows(None, tiles, 3, 32, torch.bfloat16, KernelConfig(), features=ZEN5) is None


def test_forced_kernels_and_the_tune_switch():
    tiles = torch.zeros(2, 2, 320, dtype=torch.uint8)

    def start(**config):
        gguf_dense._memo.clear()
        config = {"cpu_linear_tune": True, "cpu_linear_kernel": "auto", **config}
        return gguf_dense.dense_from_rows(None, tiles, 3, 32, torch.bfloat16, KernelConfig(**config), features=AMX)

    assert start(cpu_linear_kernel="onednn") == gguf_dense.ROWS[0]
    assert start(cpu_linear_kernel="panel") is None
    assert start(cpu_linear_tune=False) == gguf_dense.ROWS[0]


@pytest.mark.parametrize(("panel", "dense", "expected"), [
    ([2.0, 8.0], [1.0, 4.0], 256),    # dense wins at both
    ([1.0, 8.0], [1.0, 4.0], 1024),   # only at the larger
    ([2.0, 4.0], [1.0, 4.0], None),   # at the smaller only: not a range
    ([1.0, 4.0], [0.98, 3.9], None),  # within the margin
])
def test_the_measured_choice(panel, dense, expected, tmp_path, monkeypatch):
    tiles = torch.zeros(2, 2, 320, dtype=torch.uint8)
    measured = []
    monkeypatch.setattr(gguf_dense, "measure", lambda calls, k, dtype: measured.append(k) or
                        {gguf_dense.PANEL: panel, gguf_dense.DENSE: dense})
    cache = TuneCache(tmp_path / "tune.json")
    tuned = KernelConfig(cpu_linear_tune=True, cpu_linear_kernel="auto")
    got = gguf_dense.dense_from_rows(None, tiles, 3, 32, torch.bfloat16, tuned, features=AMX, cache=cache)
    assert got == expected and measured == [64]
    gguf_dense._memo.clear()  # a new process: the answer comes from the cache, nothing is measured again
    again = gguf_dense.dense_from_rows(None, tiles, 3, 32, torch.bfloat16, tuned, features=AMX,
                                       cache=TuneCache(tmp_path / "tune.json"))
    assert again == expected and measured == [64]


def test_the_measurement_runs_both_paths_here(wide16_ops):
    dtype = torch.bfloat16 if wide16_ops.gguf_isa() == "avx512_bf16" else torch.float32
    tiles = pack_wide16(_blocks("Q4_1", 64, 128), _qtype("Q4_1"))
    seconds = gguf_dense.measure({
        gguf_dense.PANEL: lambda x: wide16_ops.gguf_packed_linear(x, tiles, _qtype("Q4_1"), 64),
        gguf_dense.DENSE: lambda x: torch.mm(x, wide16_ops.gguf_packed_dequantize_kn(tiles, _qtype("Q4_1"), 64, x.dtype)),
    }, 128, dtype)
    assert set(seconds) == {gguf_dense.PANEL, gguf_dense.DENSE}
    assert all(len(times) == len(gguf_dense.ROWS) and all(0 < t < 10 for t in times) for times in seconds.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_wide16_matmul_switches_to_the_dense_path_at_its_rows(dtype, wide16_ops):
    if dtype == torch.bfloat16 and wide16_ops.gguf_isa() != "avx512_bf16":
        pytest.skip("bfloat16 de-quantization needs AVX512_BF16, which this CPU lacks")
    qtype = _qtype("Q4_1")
    fmt = KEPT_FORMATS[qtype]
    blocks = _blocks("Q4_1", 40, 256)
    tiles = pack_wide16(blocks, qtype)
    # (the 16-bit integer path off: it takes float32 rows before the dense hand-over where the CPU has it)
    matmul = gguf_module.wide16_matmul_for(torch.device("cpu"), KernelConfig(gguf_int8_dot=False, gguf_int16=False))
    exact = F.linear(torch.randn(8, 256).double(), dequantize_blocks(blocks, qtype).double())  # scale reference
    for rows in (3, 4, 9):
        x = torch.randn(rows, 256).to(dtype)
        got = matmul(x, tiles, fmt, 40, 4)
        if rows >= 4:
            assert torch.equal(got, torch.mm(x, wide16_ops.gguf_packed_dequantize_kn(tiles, qtype, 40, dtype)))
        else:
            assert torch.equal(got, wide16_ops.gguf_packed_linear(x, tiles, qtype, 40).to(dtype))
        panels = wide16_ops.gguf_packed_linear(x, tiles, qtype, 40).to(dtype)
        tolerance = (2e-2 if dtype == torch.bfloat16 else 1e-5) * exact.abs().max().item()
        torch.testing.assert_close(got.float(), panels.float(), rtol=0, atol=tolerance)
    assert torch.equal(matmul(x, tiles, fmt, 40), wide16_ops.gguf_packed_linear(x, tiles, qtype, 40).to(dtype))
