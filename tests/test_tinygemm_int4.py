"""PyTorch's int4 kernel (tinygemm) as a W4A16 launch: the conversion of AWQ/GPTQ integer zero points to its float
zeros, its packing, a layer holding its layout once, and which layers choose it.

On CPU the same conversion feeds ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (tinygemm's CPU twin: the same
``(q - 8) * scale + zero`` with ``scales_and_zeros`` ``[groups, N, 2]``; only the packing's input differs, int32
codes instead of CUDA's two codes a byte), so the product is checked here against ``F.linear`` on the AWQ
de-quantized weight; the CUDA packing is checked on the GPU (``benchmarks/gpu/int4_check.py``) and probed once per
device by the module itself.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from inferneo.kernel_config import KernelConfig
from inferneo.kernels import tinygemm_int4 as tg
from inferneo.quantization import int4
from inferneo.quantization.base import LinearShape, QuantizedLinear
from inferneo.quantization.int4_layouts import Int4Codes, pack_canonical, pack_rows
from inferneo.testing.int4_checkpoints import quantize_weight

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
                                reason="this torch has no CPU int4pack kernel")

# bf16 activations and output: the output's rounding (2^-8), the scales and zeros rounded to bf16 (2^-8 each, at
# most a sixteenth of a code step on a weight), float32 sums: the W4A16 kernels' documented 1.5e-2
TOLERANCE = 1.5e-2


def _awq_weights(n: int, k: int, group: int, act_order: bool = False, seed: int = 0):
    from tests.test_quant_int4 import layout_codes

    torch.manual_seed(seed)
    g_idx = torch.arange(k) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k)]
    q = quantize_weight(torch.randn(n, k), group, False, torch.float16, g_idx)
    return q, pack_canonical(layout_codes(q, "gptq" if act_order else "awq", group))


def test_scales_and_zeros_convert_integer_zero_points():
    scales = torch.rand(3, 16) * 0.01 + 1e-3
    zeros = torch.randint(0, 17, (3, 16), dtype=torch.uint8)  # (GPTQ v1 stores z - 1: z may be 16)
    sz = tg.tinygemm_scales_and_zeros(scales, zeros)
    assert sz.shape == (3, 16, 2) and sz.dtype == torch.bfloat16
    assert torch.equal(sz[..., 0], scales.bfloat16())
    assert torch.equal(sz[..., 1], ((8 - zeros.float()) * scales).bfloat16())
    # (q - 8) * scale + zero against (q - z) * s: within a sixteenth of a code step (the two bf16 roundings)
    q = torch.arange(16).float()[:, None, None]
    err = ((q - 8) * sz[..., 0].float() + sz[..., 1].float() - (q - zeros.float()) * scales).abs()
    assert (err <= scales * 16 * 2**-8).all()


def test_packing_input_two_codes_a_byte():
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    u8 = tg.pack_codes_u8(codes)
    assert u8.shape == (8, 32) and u8.dtype == torch.uint8
    assert torch.equal(u8 >> 4, codes[:, 0::2]) and torch.equal(u8 & 0xF, codes[:, 1::2])


@pytest.mark.parametrize("inner", [2, 4, 8])
def test_cpu_op_on_the_repacked_awq_weight_matches_linear(inner):
    q, canonical = _awq_weights(64, 256, 128)
    w = q.dequantized()  # (q - z) * s in float32
    for source in (canonical, pack_rows(canonical)):  # from either layout: the same packed weight
        weights = tg.tinygemm_from(source, inner)
        assert weights.out_features == 64 and weights.in_features == 256 and weights.inner_k_tiles == inner
        w_tg = tg.dequantize_tinygemm(weights, chunk=96)
        step = q.scales.float().repeat_interleave(128, 0).t()  # each weight's scale
        # bf16 scale and zero (s / 16), the de-quantized value in bf16 (|w| <= 16 s: s / 16 more)
        assert ((w_tg - w).abs() <= step / 8).all()
        for m in (1, 5, 32):
            x = torch.randn(m, 256).bfloat16()
            ref = F.linear(x.float(), w)
            y = tg.tinygemm_linear(x, weights)
            assert y.shape == (m, 64) and y.dtype == torch.bfloat16
            assert ((y.float() - ref).norm() / ref.norm()).item() < TOLERANCE
        y32 = tg.tinygemm_linear(torch.randn(3, 256), weights)  # other dtypes: computed in bf16, returned as given
        assert y32.dtype == torch.float32


def test_act_order_permutation_is_kept():
    q, canonical = _awq_weights(32, 256, 64, act_order=True)
    assert canonical.perm is not None
    weights = tg.tinygemm_from(canonical, 4)
    assert torch.equal(weights.perm, canonical.perm)
    w = q.dequantized()
    assert (tg.dequantize_tinygemm(weights) - w).abs().max() <= q.scales.float().max() / 8
    x = torch.randn(2, 256).bfloat16()
    y = tg.tinygemm_linear(x.index_select(1, weights.perm), weights)
    ref = F.linear(x.float(), w)
    assert ((y.float() - ref).norm() / ref.norm()).item() < TOLERANCE


def test_shapes_it_cannot_pack_are_refused():
    codes = torch.zeros(16, 96, dtype=torch.uint8)
    with pytest.raises(ValueError, match="cannot pack"):
        tg.pack_tinygemm(codes, torch.ones(3, 16), torch.zeros(3, 16, dtype=torch.uint8), 32, 8)  # 96 % 128
    assert tg.tinygemm_shape_ok(16, 96, 32, 2) and not tg.tinygemm_shape_ok(12, 96, 32, 2)
    assert not tg.tinygemm_shape_ok(16, 96, 24, 2) and not tg.tinygemm_shape_ok(16, 128, 128, 3)


@pytest.fixture
def fake_h200(monkeypatch):
    """``tinygemm_available`` as on a CUDA device of capability 9.0 whose packing check passed."""
    monkeypatch.setattr(tg, "cuda_packing_ok", lambda index: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv("INFERNEO_INT4_LAYOUT", raising=False)
    monkeypatch.delenv("INFERNEO_INT4_TINYGEMM", raising=False)
    tg._layout_table.cache_clear()
    yield torch.device("cuda")
    tg._layout_table.cache_clear()


def test_where_tinygemm_can_run(fake_h200, monkeypatch):
    cuda = fake_h200
    assert tg.tinygemm_available(cuda, torch.bfloat16, 4096, 11008, 128)
    assert not tg.tinygemm_available(cuda, torch.float16, 4096, 4096, 128)  # the CUDA kernel takes bf16 only
    assert not tg.tinygemm_available(cuda, torch.float32, 4096, 4096, 128)
    assert not tg.tinygemm_available(torch.device("cpu"), torch.bfloat16, 4096, 4096, 128)
    assert not tg.tinygemm_available(cuda, torch.bfloat16, 4096, 4096, 16)  # groups of 32..256
    assert not tg.tinygemm_available(cuda, torch.bfloat16, 4096, 4000, 32, 8)  # K a multiple of 16 * inner
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    assert not tg.tinygemm_available(cuda, torch.bfloat16, 4096, 4096, 128)  # sm < 80
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setenv("INFERNEO_INT4_TINYGEMM", "0")
    assert not tg.tinygemm_available(cuda, torch.bfloat16, 4096, 4096, 128)
    monkeypatch.delenv("INFERNEO_INT4_TINYGEMM")
    monkeypatch.setattr(tg, "cuda_packing_ok", lambda index: False)  # a torch whose packing reads otherwise
    assert not tg.tinygemm_available(cuda, torch.bfloat16, 4096, 4096, 128)


def test_layout_chosen_per_shape_from_the_table(fake_h200, monkeypatch, tmp_path):
    cuda = fake_h200
    from inferneo.kernels import triton_int4

    table = {tg.layout_key(4096, 11008, 128): {"kind": "tinygemm", "inner_k_tiles": 4},
             tg.layout_key(4096, 4096, 128): {"kind": "rows"},
             "linear,1,4096,11008,128": {"kind": "tinygemm", "block_n": 0, "inner_k_tiles": 8}}
    path = tmp_path / "int4_configs.json"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(tg, "LAYOUT_FILE", path)
    monkeypatch.setattr(triton_int4, "TUNED_CONFIG_FILE", path)
    triton_int4._tuned_configs.cache_clear()
    tg._layout_table.cache_clear()
    try:
        assert tg.tinygemm_layout(cuda, torch.bfloat16, 4096, 11008, 128) == 4
        assert tg.tinygemm_layout(cuda, torch.bfloat16, 4096, 4096, 128) is None  # measured: the Triton kernels
        assert tg.tinygemm_layout(cuda, torch.bfloat16, 12288, 4096, 128) is None  # not measured: rows
        assert tg.tinygemm_layout(cuda, torch.float16, 4096, 11008, 128) is None  # not where it cannot run
        monkeypatch.setenv("INFERNEO_INT4_LAYOUT", "rows")
        assert tg.tinygemm_layout(cuda, torch.bfloat16, 4096, 11008, 128) is None
        monkeypatch.setenv("INFERNEO_INT4_LAYOUT", "tinygemm")
        assert tg.tinygemm_layout(cuda, torch.bfloat16, 12288, 4096, 128) == 8
        assert tg.tinygemm_layout(cuda, torch.bfloat16, 4096, 11008, 128) == 4  # the table's K tiles
        # a tinygemm entry under a Triton launch key is never taken as a Triton launch
        assert triton_int4.choose_config("linear", 1, 4096, 11008, 128).kind == "h2"  # the default one-row kernel
    finally:
        triton_int4._tuned_configs.cache_clear()


def test_layer_holds_the_tinygemm_layout_once(monkeypatch):
    # (on CPU the layer is packed by the CPU twin: the engine takes this path on CUDA when the table says so)
    monkeypatch.setattr(int4, "_tinygemm_inner_k_tiles", lambda layer, blocks: 8)
    layer = QuantizedLinear(int4.Int4LinearMethod(int4.Int4Scheme("awq", 128, True)),
                            LinearShape("layers.0.mlp.gate_up_proj", 256, (64, 64)), False, torch.bfloat16,
                            torch.device("cpu"))
    layer.method.init_dummy(layer, torch.Generator().manual_seed(0))
    before = layer.method.dequantized_weight(layer)
    layer.method.finalize(layer, KernelConfig())
    [block] = layer.int4_blocks
    assert isinstance(block, tg.Int4TinyGemmWeights) and layer.int4_kernel is tg.tinygemm_linear
    assert sorted(name for name, _ in layer.named_buffers()) == ["int4_packed", "int4_scales_and_zeros"]
    assert not hasattr(layer, "qweight") and not hasattr(layer, "int4_scales")
    held = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert held == 128 * 256 // 2 + 2 * 128 * 2 * 2  # 4-bit codes + bf16 scale and zero per group: once
    assert (layer.method.dequantized_weight(layer) - before).abs().max() <= before.abs().max() / 64
    assert not layer.method.silu_mul_applies(layer, torch.randn(1, 256).bfloat16())  # no fused SiLU: apart
    x = torch.randn(3, 256).bfloat16()
    ref = F.linear(x.float(), before)
    assert ((layer(x).float() - ref).norm() / ref.norm()).item() < TOLERANCE


def test_layer_keeps_the_triton_layout_without_a_tinygemm_choice():
    layer = QuantizedLinear(int4.Int4LinearMethod(int4.Int4Scheme("awq", 128, True)),
                            LinearShape("layers.0.o_proj", 256, (64,)), False, torch.bfloat16, torch.device("cpu"))
    layer.method.init_dummy(layer, torch.Generator().manual_seed(0))
    before = layer.method.dequantized_weight(layer)
    assert int4._tinygemm_inner_k_tiles(layer, [pack_canonical(Int4Codes(
        torch.zeros(64, 256, dtype=torch.uint8), torch.zeros(2, 64, dtype=torch.uint8), torch.ones(2, 64),
        128))]) is None  # CPU: never
    layer.method.finalize(layer, KernelConfig())
    assert not isinstance(layer.int4_blocks[0], tg.Int4TinyGemmWeights)
    assert torch.equal(layer.method.dequantized_weight(layer), before)  # exact: the canonical layout


def _int4_check_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "int4_check.py"
    spec = importlib.util.spec_from_file_location("int4_check_for_tests", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_sweep_chooses_tinygemm_per_shape_on_the_two_decode_steps():
    pytest.importorskip("triton")
    check = _int4_check_module()

    def line(layer, m, best, tiny, silu=None):
        row = {"layer": layer, "m": m, "best_us": best, "tinygemm_us": tiny}
        if silu is not None:  # gate/up: the fused launch or the projection + SiLU-and-mul
            row.update(silu_and_mul_us=silu, unfused_us=best + silu, fused_best_us=best + silu / 2)
        return row

    summary = [line("o", 1, 10.0, {2: 7.0, 8: 6.0}), line("o", 16, 10.0, {2: 30.0, 8: 40.0}),
               line("o", 32, 12.0, {2: 14.0, 8: 14.5}),  # 1 + 32 rows: 20.5 < 22: tinygemm, 8 K tiles
               line("down", 1, 19.0, {8: 15.0}), line("down", 32, 24.0, {8: 30.0}),  # 45 > 43: rows
               line("gate_up", 1, 40.0, {8: 38.5}, silu=1.0), line("gate_up", 32, 40.0, {8: 40.0}, silu=1.4)]
    layouts = check.choose_layouts(summary, {"o": (4096, 4096), "down": (4096, 11008), "gate_up": (22016, 4096)})
    assert layouts["o"]["kind"] == "tinygemm" and layouts["o"]["inner_k_tiles"] == 8
    assert layouts["o"]["key"] == "layout,4096,4096,128" and layouts["o"]["rows"] == [1, 32]
    assert layouts["down"]["kind"] == "rows" and layouts["down"]["best_tinygemm_inner"] == 8
    # gate/up: tinygemm pays the SiLU-and-mul kernel (39.5 + 41.4 = 80.9) against the fused Triton launch
    # (40.5 + 40.7 = 81.2): tinygemm, by 0.3 us
    assert layouts["gate_up"]["kind"] == "tinygemm"
    assert layouts["gate_up"]["tinygemm_sum_us"] == pytest.approx(80.9)
    assert layouts["gate_up"]["triton_sum_us"] == pytest.approx(81.2)
