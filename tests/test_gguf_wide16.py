"""The wide16 layout of Q4_0 / Q4_1 / Q8_0 GGUF layers (repacked at load for the AVX-512 CPU kernels).

- ``pack_wide16`` / ``unpack_wide16`` give back the file's blocks bit for bit (any row count: a last partial group
  of 16 is padded and dropped again), and a packed tile holds each weight's code where the layout says.
- ``gguf_packed_linear`` matches ``F.linear`` on the de-quantized weight to 1e-5 relative to the output's scale on
  its in-register path (float32 products, bfloat16 rows widened exactly), and its panel path gives the same bits as
  ``gguf_linear``'s panels from the file's blocks (the same panels, built without transposes); the AVX512_BF16
  panels equal ``F.linear`` on the bfloat16-rounded weight within float32 summation order, on the AVX512_BF16 dot
  products and on the AMX tiles (the default where the CPU has AMX-BF16; skipped elsewhere, naming it).
- ``gguf_packed_linear_int8`` (AVX512_VNNI: the activations quantized to int8 per 32-weight block) gives
  ``gguf_linear_int8``'s results on the file's blocks bit for bit (the same integer sums, the same float order),
  at row counts across its 8-row blocks and K across its 16-block chunks; the int8 switch routes a wide16 layer
  through it only in its row range (4 rows up; bfloat16 rows up to 256).
- An engine on an AVX-512 CPU holds Q4_0 / Q4_1 / Q8_0 layers in wide16 (not with the switch off; with the int8
  path on, Q4 layers only where AVX512_VNNI gives it a wide16 kernel and Q8_0 never), de-quantizes them to the
  file's weights, and gives the de-quantized engine's greedy tokens (float32). A Q8_0 embedding tied to the LM head
  is held as wide16 tiles too: its lookups gather the file's blocks from them, and the engine's tokens stay those
  of the de-quantized engine.
Kernel tests skip on CPUs without AVX-512 (or AVX512_VNNI), naming the missing feature.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from test_gguf_quantized import _random_blocks
from test_hf_parity import mixed_prompts, run_engine

from inferneo import LLM
from inferneo.kernel_config import KernelConfig
from inferneo.quantization import quantized_linears
from inferneo.quantization.gguf_blocks import KEPT_FORMATS, dequantize_blocks
from inferneo.quantization.gguf_wide import pack_wide16, unpack_wide16, wide16_rows
from inferneo.testing import make_tiny_gguf

WIDE16_FORMATS = ["Q4_0", "Q4_1", "Q8_0"]
INT8_FORMATS = ["Q4_0", "Q4_1"]  # the wide16 int8 kernel's formats
TILE_BYTES = {"Q4_0": 288, "Q4_1": 320, "Q8_0": 544}


def _qtype(name: str) -> int:
    return int(GGMLQuantizationType[name])


def _blocks(name: str, rows: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """Random codes with random finite scales (and minimums), so that every field matters."""
    fmt = KEPT_FORMATS[_qtype(name)]
    gen = torch.Generator().manual_seed(seed)
    blocks = _random_blocks(name, rows, in_features, seed)
    view = blocks.view(rows, -1, fmt.type_size)
    view[..., 0:2] = (torch.rand(view.shape[:2], generator=gen) * 0.01 + 1e-3).half().view(torch.uint8).view(rows, -1, 2)
    if name == "Q4_1":
        view[..., 2:4] = (torch.randn(view.shape[:2], generator=gen) * 0.01).half().view(torch.uint8).view(rows, -1, 2)
    return blocks


# ---- the layout ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", WIDE16_FORMATS)
@pytest.mark.parametrize("rows", [1, 16, 44, 96])
def test_pack_and_unpack_give_back_the_blocks(name, rows):
    blocks = _blocks(name, rows, 96, seed=rows)
    packed = pack_wide16(blocks, _qtype(name))
    assert packed.shape == (-(-rows // 16), 3, TILE_BYTES[name])
    assert torch.equal(unpack_wide16(packed, _qtype(name), rows), blocks)


@pytest.mark.parametrize("name", WIDE16_FORMATS)
def test_a_tile_holds_each_code_where_the_layout_says(name):
    rows, in_features = 20, 64
    blocks = _blocks(name, rows, in_features)
    fmt = KEPT_FORMATS[_qtype(name)]
    scale_bytes = 4 if name == "Q4_1" else 2
    qs = blocks.view(rows, -1, fmt.type_size)[..., scale_bytes:]
    packed = pack_wide16(blocks, _qtype(name))
    for row, block, k in [(0, 0, 0), (3, 1, 17), (15, 0, 31), (17, 1, 6), (19, 0, 25)]:
        group, c, p = row // 16, row % 16, k // 2
        if name == "Q8_0":  # byte 32 p + 16 (k odd) + c after the scales: the code of k itself
            assert int(packed[group, block, 32 + 32 * p + 16 * (k % 2) + c]) == int(qs[row, block, k])
        else:  # the nibble of k in byte 16 p + c; the file holds k in byte k % 16, high nibble from 16 on
            byte = int(packed[group, block, 2 * scale_bytes * 16 // 2 + 16 * p + c])
            code = int(qs[row, block, k % 16]) >> (4 if k >= 16 else 0) & 15
            assert (byte >> 4 if k % 2 else byte & 15) == code
        scale = packed[group, block, 2 * c : 2 * c + 2]
        assert torch.equal(scale, blocks.view(rows, -1, fmt.type_size)[row, block, 0:2])
    assert not packed[1, :, 2 * 4 : 2 * 16].any()  # scales of the padding rows 20-31 are zero


def test_layout_refuses_other_types():
    with pytest.raises(ValueError, match="ggml type 6 has no wide16 layout"):
        pack_wide16(torch.zeros(16, 22, dtype=torch.uint8), 6)
    with pytest.raises(ValueError, match="reads Q8_0 tiles"):
        wide16_rows(pack_wide16(_blocks("Q4_0", 16, 64), _qtype("Q4_0")), _qtype("Q4_0"), torch.tensor([1]))


@pytest.mark.parametrize("rows", [1, 16, 37])
def test_q8_0_rows_gathered_from_tiles_are_the_files_blocks(rows):
    blocks = _blocks("Q8_0", rows, 96, seed=rows)
    packed = pack_wide16(blocks, _qtype("Q8_0"))
    ids = torch.tensor([rows - 1, 0, rows // 2, rows - 1])
    assert torch.equal(wide16_rows(packed, _qtype("Q8_0"), ids), blocks[ids])
    assert torch.equal(wide16_rows(packed, _qtype("Q8_0"), torch.arange(rows)), blocks)


@pytest.mark.parametrize("rows", [1, 16, 37, 300])
def test_q8_0_rows_looked_up_natively_are_the_files_values(rows, wide16_ops):
    """``gguf_packed_rows_q8_0`` (the tied embedding's lookup) gives, bit for bit, the float32 values that
    ``dequantize_blocks`` computes from the file's blocks, for any ids (repeated, first and last row, the padded
    last group), and refuses an id outside the table."""
    blocks = _blocks("Q8_0", rows, 96, seed=rows)
    view = blocks.view(rows, -1, 34)
    view[0, 1, 0:2] = torch.tensor([-2.5e-3], dtype=torch.float16).view(torch.uint8)  # a negative scale
    view[-1, 2, 2:] = torch.tensor([-128, 127] * 16, dtype=torch.int8).view(torch.uint8)  # the extreme codes
    packed = pack_wide16(blocks, _qtype("Q8_0"))
    ids = torch.cat([torch.tensor([rows - 1, 0, rows // 2, rows - 1]), torch.randint(0, rows, (50,))])
    got = wide16_ops.gguf_packed_rows_q8_0(packed, ids, rows)
    assert got.dtype == torch.float32 and got.shape == (len(ids), 96)
    assert torch.equal(got, dequantize_blocks(blocks[ids], _qtype("Q8_0")))
    assert wide16_ops.gguf_packed_rows_q8_0(packed, torch.empty(0, dtype=torch.long), rows).shape == (0, 96)
    for bad in (rows, -1):
        with pytest.raises(RuntimeError, match=f"id {bad} is out of range for {rows} rows"):
            wide16_ops.gguf_packed_rows_q8_0(packed, torch.tensor([0, bad]), rows)


# ---- the kernels -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", WIDE16_FORMATS)
@pytest.mark.parametrize("rows", [1, 5, 8, 9, 12, 13, 28, 29, 33, 70])
def test_packed_linear_matches_f_linear(name, rows, wide16_ops):
    qtype = _qtype(name)
    blocks = _blocks(name, 100, 192, seed=rows)  # 100 rows: 7 groups of 16, the last partial; 3 groups of 48
    packed = pack_wide16(blocks, qtype)
    weight = dequantize_blocks(blocks, qtype)
    x = torch.randn(rows, 192, generator=torch.Generator().manual_seed(rows))
    expected = F.linear(x, weight)
    tol = 1e-5 * expected.abs().max().item()
    never = 1 << 30
    for inreg_max_rows in (-1, never, 0):  # the default hand-over, the in-register path, the float32 panels
        out = wide16_ops.gguf_packed_linear(x, packed, qtype, 100, inreg_max_rows, "avx512")
        torch.testing.assert_close(out, expected, rtol=0, atol=tol)
    # the panels are those gguf_linear builds from the file's blocks: the same bits
    panels = wide16_ops.gguf_packed_linear(x, packed, qtype, 100, 0, "avx512")
    assert torch.equal(panels, wide16_ops.gguf_linear(x, blocks, qtype, 192, 48, 0, 0, 0, "avx512"))
    # bfloat16 rows on the in-register path: the exact float32 product of the bfloat16 values
    xb = x.bfloat16()
    expected_b = F.linear(xb.float(), weight)
    out = wide16_ops.gguf_packed_linear(xb, packed, qtype, 100, never, "")
    torch.testing.assert_close(out, expected_b, rtol=0, atol=1e-5 * expected_b.abs().max().item())
    if wide16_ops.gguf_isa() == "avx512_bf16":
        # bfloat16 pair panels: F.linear on the bfloat16-rounded weight, within float32 summation order (the
        # CPU's default: AMX tiles where it has them), and on the AVX512_BF16 dot products the same bits as
        # gguf_linear's bfloat16 panels
        expected_bb = F.linear(xb.float(), weight.bfloat16().float())
        out = wide16_ops.gguf_packed_linear(xb, packed, qtype, 100, 0, "")
        torch.testing.assert_close(out, expected_bb, rtol=0, atol=1e-5 * expected_bb.abs().max().item())
        out = wide16_ops.gguf_packed_linear(xb, packed, qtype, 100, 0, "avx512_bf16")
        torch.testing.assert_close(out, expected_bb, rtol=0, atol=1e-5 * expected_bb.abs().max().item())
        assert torch.equal(out, wide16_ops.gguf_linear(xb, blocks, qtype, 192, 48, 0, 0, 0, "avx512_bf16"))


@pytest.mark.parametrize("name", WIDE16_FORMATS)
@pytest.mark.parametrize("rows", [1, 7, 15, 16, 17, 31, 32, 48, 64, 65, 128, 129, 301])
@pytest.mark.parametrize("in_features", [32, 192, 224, 1536])
def test_amx_panels_match_f_linear(name, rows, in_features, wide16_ops):
    """The bfloat16 panels multiplied on the AMX tiles equal F.linear on the bfloat16-rounded weight within float32
    summation order, with float32 and with bfloat16 outputs (rounded where stored), and are the CPU's default for
    bfloat16 panels where it has the tiles: in both forms, panels over all of K (16 rows a tile, the last block with
    the rows left; 'amx_bf16_whole', and 'amx_bf16' above 64 rows) and panels built 6 blocks of K at a time with
    the sums kept between them (rows padded to 16; 'amx_bf16' up to 64 rows); 48 columns a panel, the last
    partial; K of 1, 6, 7 and 48 blocks."""
    if not wide16_ops.gguf_packed_amx_available():
        pytest.skip("the AMX panels need AMX-BF16 (amx_tile, amx_bf16), which this CPU lacks")
    qtype = _qtype(name)
    packed = pack_wide16(_blocks(name, 100, in_features, seed=rows), qtype)
    weight = dequantize_blocks(unpack_wide16(packed, qtype, 100), qtype).bfloat16().float()
    x = (torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)) * 2).bfloat16()
    expected = F.linear(x.float(), weight)
    tol = 1e-5 * expected.abs().max().item()
    out = wide16_ops.gguf_packed_linear(x, packed, qtype, 100, 0, "amx_bf16")
    torch.testing.assert_close(out, expected, rtol=0, atol=tol)
    assert torch.equal(out, wide16_ops.gguf_packed_linear(x, packed, qtype, 100, 0, ""))
    whole = wide16_ops.gguf_packed_linear(x, packed, qtype, 100, 0, "amx_bf16_whole")
    torch.testing.assert_close(whole, expected, rtol=0, atol=tol)
    out_b = wide16_ops.gguf_packed_linear(x, packed, qtype, 100, 0, "amx_bf16", bf16_out=True)
    assert out_b.dtype == torch.bfloat16 and torch.equal(out_b, out.bfloat16())
    # a strided row view: the kernel reads its own contiguous copy
    wide = torch.cat([x, x], dim=1)[:, :in_features]
    assert torch.equal(wide16_ops.gguf_packed_linear(wide, packed, qtype, 100, 0, "amx_bf16"), out)


@pytest.mark.parametrize("name", WIDE16_FORMATS)
@pytest.mark.parametrize("rows", [10, 16, 17, 33, 64])
def test_gate_up_silu_is_the_projection_then_silu_and_mul(name, rows, wide16_ops):
    """``gguf_packed_linear_silu``: a [gate | up] projection and SiLU-and-mul in one pass give the bits of the
    projection (bfloat16 out) followed by the native SiLU-and-mul kernel, at the row counts it takes (10-64 on
    AMX CPUs); other row counts, shapes and dtypes are refused."""
    if not wide16_ops.gguf_packed_amx_available():
        pytest.skip("the fused gate/up pass runs on the AMX tiles: it needs AMX-BF16, which this CPU lacks")
    from inferneo.kernels.cpu import load_cpu_kernels

    cpu = load_cpu_kernels()
    if cpu is None:
        pytest.skip("the native CPU kernels do not build here")
    qtype = _qtype(name)
    packed = pack_wide16(_blocks(name, 192, 224, seed=rows), qtype)  # gate and up: 96 columns each; K 7 blocks
    x = (torch.randn(rows, 224, generator=torch.Generator().manual_seed(rows)) * 2).bfloat16()
    expected = cpu.silu_and_mul(wide16_ops.gguf_packed_linear(x, packed, qtype, 192, -1, "", bf16_out=True))
    got = wide16_ops.gguf_packed_linear_silu(x, packed, qtype, 192)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 96)
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
    assert list(wide16_ops.gguf_packed_silu_rows()) == [10, 64]
    with pytest.raises(RuntimeError, match="takes 10 to 64 rows; got 9"):
        wide16_ops.gguf_packed_linear_silu(x[:9].contiguous() if rows >= 9 else x, packed, qtype, 192)
    with pytest.raises(RuntimeError, match="multiples of 48 columns"):
        wide16_ops.gguf_packed_linear_silu(x, pack_wide16(_blocks(name, 100, 224), qtype), qtype, 100)
    with pytest.raises(RuntimeError, match="x must be bfloat16"):
        wide16_ops.gguf_packed_linear_silu(x.float(), packed, qtype, 192)


def test_amx_isa_is_refused_without_the_tiles_or_bfloat16_rows(wide16_ops):
    packed = pack_wide16(_blocks("Q4_1", 20, 64), _qtype("Q4_1"))
    if not wide16_ops.gguf_packed_amx_available():
        with pytest.raises(RuntimeError, match="isa='amx_bf16' needs AMX-BF16"):
            wide16_ops.gguf_packed_linear(torch.randn(3, 64).bfloat16(), packed, _qtype("Q4_1"), 20, 0, "amx_bf16")
        return
    with pytest.raises(RuntimeError, match="isa='amx_bf16' multiplies bfloat16 activations; x is not bfloat16"):
        wide16_ops.gguf_packed_linear(torch.randn(3, 64), packed, _qtype("Q4_1"), 20, 0, "amx_bf16")


@pytest.mark.parametrize("name", WIDE16_FORMATS)
@pytest.mark.parametrize("rows", [0, 1, 12, 13, 64, 301])
def test_bfloat16_output_is_the_float32_output_rounded(name, rows, wide16_ops):
    """``bf16_out``: the kernel rounds each output where it stores it (panel path) or once at the end (in-register
    path); either way the bits of ``.to(torch.bfloat16)`` on the float32 output, NaN where that is NaN; and
    ``rounded_float_out`` the same values as float32."""
    qtype = _qtype(name)
    packed = pack_wide16(_blocks(name, 100, 192, seed=rows), qtype)
    x = (torch.randn(rows, 192, generator=torch.Generator().manual_seed(rows)) * 3).bfloat16()
    if rows > 5:
        x[3, 7] = float("nan")
    for inreg_max_rows in (-1, 1 << 30, 0):  # the default hand-over, the in-register path, the panels
        expected = wide16_ops.gguf_packed_linear(x, packed, qtype, 100, inreg_max_rows).to(torch.bfloat16)
        out = wide16_ops.gguf_packed_linear(x, packed, qtype, 100, inreg_max_rows, bf16_out=True)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, 100)
        assert torch.equal(out.isnan(), expected.isnan())
        finite = ~expected.isnan()
        assert torch.equal(out[finite].view(torch.int16), expected[finite].view(torch.int16))
        # rounded_float_out: the same rounded values as float32 (an LM head's logits), NaN where they are NaN
        widened = wide16_ops.gguf_packed_linear(x, packed, qtype, 100, inreg_max_rows, rounded_float_out=True)
        assert widened.dtype == torch.float32 and torch.equal(widened.isnan(), expected.isnan())
        assert torch.equal(widened[finite], expected[finite].float())
    with pytest.raises(RuntimeError, match="bf16_out=True takes bfloat16 activations"):
        wide16_ops.gguf_packed_linear(x.float(), packed, qtype, 100, bf16_out=True)
    with pytest.raises(RuntimeError, match="rounded_float_out=True takes bfloat16 activations"):
        wide16_ops.gguf_packed_linear(x.float(), packed, qtype, 100, rounded_float_out=True)
    # float16 rows (a float16 model on CPU) are widened too: the float32 product of their values, on both paths
    xh = torch.nan_to_num(x.float()).half()
    expected_h = F.linear(xh.float(), dequantize_blocks(unpack_wide16(packed, qtype, 100), qtype))
    for inreg_max_rows in (1 << 30, 0):
        out = wide16_ops.gguf_packed_linear(xh, packed, qtype, 100, inreg_max_rows, "avx512")
        torch.testing.assert_close(out, expected_h, rtol=0, atol=1e-5 * max(expected_h.abs().amax().item() if rows else 0.0, 1.0))


@pytest.mark.parametrize("kernel", ["gguf_packed_linear", "gguf_packed_linear_int8", "gguf_packed_linear_i16"])
def test_packed_linear_refuses_bad_arguments(kernel, wide16_ops):
    if kernel != "gguf_packed_linear" and not wide16_ops.gguf_packed_int8_available():
        pytest.skip(f"{kernel} needs AVX512_VNNI, which this CPU lacks")
    linear = getattr(wide16_ops, kernel)
    packed = pack_wide16(_blocks("Q4_1", 20, 64), _qtype("Q4_1"))
    x = torch.randn(3, 64)
    with pytest.raises(RuntimeError, match="ggml type 6 has no wide16 layout"):
        linear(x, packed, 6, 20)
    if kernel.endswith("int8"):
        q8 = pack_wide16(_blocks("Q8_0", 20, 64), _qtype("Q8_0"))
        with pytest.raises(RuntimeError, match="Q4_0 and Q4_1 only"):
            linear(x, q8, _qtype("Q8_0"), 20)
    with pytest.raises(RuntimeError, match=r"uint8 \[groups, K / 32, 288\]"):
        linear(x, packed, _qtype("Q4_0"), 20)
    with pytest.raises(RuntimeError, match="2 groups of 16 columns do not hold 40 output features"):
        linear(x, packed, _qtype("Q4_1"), 40)
    with pytest.raises(RuntimeError, match=r"x must be a CPU \[rows, 64\] tensor"):
        linear(torch.randn(3, 32), packed, _qtype("Q4_1"), 20)
    assert linear(torch.randn(0, 64), packed, _qtype("Q4_1"), 20).shape == (0, 20)
    if kernel != "gguf_packed_linear":
        return
    with pytest.raises(RuntimeError, match="unknown isa 'avx2'"):
        linear(x, packed, _qtype("Q4_1"), 20, -1, "avx2")
    if wide16_ops.gguf_isa() == "avx512_bf16":
        with pytest.raises(RuntimeError, match="x is not bfloat16"):
            linear(x, packed, _qtype("Q4_1"), 20, -1, "avx512_bf16")


# ---- int8 dot products (AVX512_VNNI) -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vnni_ops(wide16_ops):
    if not wide16_ops.gguf_packed_int8_available():
        pytest.skip("the wide16 int8 kernel needs AVX512_VNNI, which this CPU lacks")
    return wide16_ops


@pytest.mark.parametrize("name", INT8_FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 64, 300])
def test_packed_int8_linear_equals_the_int8_kernel_on_the_files_blocks(name, rows, vnni_ops):
    qtype = _qtype(name)
    for n, k in ((100, 544), (16, 1056), (37, 32)):  # 544: one 16-block chunk and a partial; 1056: 33 blocks
        blocks = _blocks(name, n, k, seed=rows + k)
        packed = pack_wide16(blocks, qtype)
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 3
        x[0, : min(k, 64)] = 0.0  # all-zero activation blocks: scale 0
        expected = vnni_ops.gguf_linear_int8(x, blocks, qtype, k)
        assert torch.equal(vnni_ops.gguf_packed_linear_int8(x, packed, qtype, n), expected)
        xb = x.bfloat16()  # bfloat16 rows are quantized from their float32 values
        assert torch.equal(vnni_ops.gguf_packed_linear_int8(xb, packed, qtype, n),
                           vnni_ops.gguf_linear_int8(xb.float(), blocks, qtype, k))
    # and within the activations' rounding of F.linear on the de-quantized weight
    weight = dequantize_blocks(blocks, qtype)
    exact = F.linear(x, weight)
    out = vnni_ops.gguf_packed_linear_int8(x, packed, qtype, n)
    assert (out - exact).abs().max() <= 2e-2 * exact.abs().max()


def test_int8_switch_routes_wide16_layers_by_rows(vnni_ops):
    from inferneo.quantization import gguf as gguf_module

    qtype = _qtype("Q4_1")
    fmt = KEPT_FORMATS[qtype]
    blocks = _blocks("Q4_1", 48, 256)
    packed = pack_wide16(blocks, qtype)
    # (the int16 path off: it would take the float32 rows that the int8 path leaves)
    on = gguf_module.wide16_matmul_for(torch.device("cpu"), KernelConfig(gguf_int8_dot=True, gguf_int16=False))
    off = gguf_module.wide16_matmul_for(torch.device("cpu"), KernelConfig(gguf_int8_dot=False, gguf_int16=False))
    low, high = gguf_module._VNNI_MIN_ROWS, gguf_module._VNNI_BF16_MAX_ROWS
    for rows, dtype, int8 in ((low - 1, torch.float32, False), (low, torch.float32, True),
                              (high + 1, torch.float32, True), (high, torch.bfloat16, True),
                              (high + 1, torch.bfloat16, False)):
        x = torch.randn(rows, 256).to(dtype)
        expected = (vnni_ops.gguf_packed_linear_int8(x, packed, qtype, 48) if int8
                    else vnni_ops.gguf_packed_linear(x, packed, qtype, 48)).to(dtype)
        assert torch.equal(on(x, packed, fmt, 48), expected), (rows, dtype)
        assert torch.equal(off(x, packed, fmt, 48), vnni_ops.gguf_packed_linear(x, packed, qtype, 48).to(dtype))


# ---- float32 activations as 16-bit integers (AVX512_VNNI) ----------------------------------------------------


def _int16_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's activation blocks in PyTorch: per 32 values s = max|x| / 32767 and a = x / s rounded to
    nearest even, as float64 values ``s * a`` and the scales ``s`` [rows, K / 32]."""
    blocks = x.double().view(x.shape[0], -1, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    # the float32 quotients correctly rounded, as the kernel's divisions are (PyTorch's float32 division by a
    # tensor multiplies by a reciprocal, one unit in the last place off at times)
    inv = torch.where(amax > 0, 32767.0 / amax, torch.zeros_like(amax)).float()
    a = torch.round(x.view_as(blocks).float() * inv).clamp(-32767, 32767)
    s = (amax / 32767.0).float().double()
    return (a.double() * s).view_as(x), s.squeeze(-1)


def _block_minimums(blocks: torch.Tensor, name: str) -> torch.Tensor:
    """Each block's m in w = d * q + m, float64 [rows, K / 32]: Q4_1's stored minimum, Q4_0's -8 d, Q8_0's 0."""
    fmt = KEPT_FORMATS[_qtype(name)]
    view = blocks.view(blocks.shape[0], -1, fmt.type_size)
    d = view[..., 0:2].contiguous().view(torch.float16).squeeze(-1).double()
    if name == "Q4_1":
        return view[..., 2:4].contiguous().view(torch.float16).squeeze(-1).double()
    return -8 * d if name == "Q4_0" else torch.zeros_like(d)


@pytest.mark.parametrize("name", WIDE16_FORMATS)
@pytest.mark.parametrize("rows", [1, 5, 8, 9, 64, 300])
def test_packed_int16_linear_is_f_linear_on_the_int16_activations(name, rows, vnni_ops):
    """``gguf_packed_linear_i16``: a weight block d * q + m times the activations as the kernel holds them (16-bit
    integers times a per-block scale s) in its d * q part and times x itself in its m part (the block's sum of x in
    float32), within float32 summation; and within the rounding's bound of plain float32 F.linear: each output off
    by at most the sum over blocks of s / 2 * sum |d q| (s = the block's max|x| / 32767). 300 rows at K = 544 run
    in two row chunks; 100 outputs leave the last group of 16 partial."""
    qtype = _qtype(name)
    for n, k in ((100, 544), (16, 1056), (37, 32)):
        blocks = _blocks(name, n, k, seed=rows + k)
        packed = pack_wide16(blocks, qtype)
        weight = dequantize_blocks(blocks, qtype).double()
        mins = _block_minimums(blocks, name).repeat_interleave(32, dim=1)  # [n, k]: each weight's m
        gen = torch.Generator().manual_seed(rows)
        x = torch.randn(rows, k, generator=gen) * torch.rand(rows, k, generator=gen) ** 3 * 4  # heavy-tailed rows
        x[0, : min(k, 64)] = 0.0  # all-zero activation blocks: scale 0
        out = vnni_ops.gguf_packed_linear_i16(x, packed, qtype, n)
        assert out.dtype == torch.float32 and out.shape == (rows, n)
        held, scales = _int16_activations(x)
        expected = held @ (weight - mins).t() + x.double() @ mins.t()
        # float32 summation, relative to the terms' magnitudes (Q4_0's -8 d and its codes' part nearly cancel)
        magnitude = held.abs() @ (weight - mins).abs().t() + x.double().abs() @ mins.abs().t()
        assert ((out.double() - expected).abs() <= 1e-5 * magnitude + 1e-12).all()
        exact = x.double() @ weight.t()
        bound = (scales / 2) @ (weight - mins).abs().view(n, -1, 32).sum(-1).t()  # [rows, n]
        assert ((out.double() - exact).abs() <= bound + 1e-5 * exact.abs().max()).all()
    # bfloat16 rows are taken as their float32 values
    xb = x.bfloat16()
    assert torch.equal(vnni_ops.gguf_packed_linear_i16(xb, packed, qtype, n),
                       vnni_ops.gguf_packed_linear_i16(xb.float(), packed, qtype, n))


def test_packed_int16_linear_keeps_non_finite_rows_to_themselves(vnni_ops):
    qtype = _qtype("Q4_1")
    packed = pack_wide16(_blocks("Q4_1", 48, 128), qtype)
    x = torch.randn(20, 128)
    x[3, 5], x[7, 100] = float("nan"), float("inf")
    out = vnni_ops.gguf_packed_linear_i16(x, packed, qtype, 48)
    assert out[3].isnan().all() and out[7].isnan().all()
    finite = [r for r in range(20) if r not in (3, 7)]
    assert out[finite].isfinite().all()
    assert torch.equal(out[finite], vnni_ops.gguf_packed_linear_i16(x[finite], packed, qtype, 48))


# ---- the same integer products on the AMX-INT8 tiles --------------------------------------------------------


@pytest.fixture(scope="module")
def amx_int8_ops(vnni_ops):
    if not vnni_ops.gguf_packed_amx_int8_available():
        pytest.skip("the tile form of the integer kernels needs AMX-INT8 (and the kernel's permission to use the "
                    "tiles), which this CPU lacks")
    return vnni_ops


@pytest.mark.parametrize("name", WIDE16_FORMATS)
@pytest.mark.parametrize("rows", [1, 7, 16, 17, 40, 300])
def test_integer_kernels_on_the_tiles_equal_the_vnni_ones(name, rows, amx_int8_ops):
    """``isa='amx_int8'`` gives ``isa='vnni'``'s outputs bit for bit: the same integer sums per block (16-bit rows as
    two byte planes, 256 hi + lo), then the same float32 order. Rows that are not a whole block of 16, a last group
    of 16 columns left partial, K of one block, of one 16-block chunk and a partial one (the int8 path's chunk
    stores), 300 rows over two row chunks at K = 544, extreme activations and codes."""
    qtype = _qtype(name)
    for n, k in ((100, 544), (16, 1056), (37, 32)):
        blocks = _blocks(name, n, k, seed=rows + k)
        view = blocks.view(n, -1, KEPT_FORMATS[qtype].type_size)
        if name == "Q8_0":  # the extreme signed codes in one block
            view[0, 0, 2:] = torch.tensor([-128, 127] * 16, dtype=torch.int8).view(torch.uint8)
        packed = pack_wide16(blocks, qtype)
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 3
        x[0, : min(k, 64)] = 0.0  # all-zero activation blocks: scale 0
        x[-1, :32] = torch.tensor([-1.0, 1.0] * 16) * 7.5  # |a| = 32767 both ways: the planes' extremes
        for kernel in ("gguf_packed_linear_i16", "gguf_packed_linear_int8"):
            if kernel.endswith("int8") and name == "Q8_0":
                continue
            run = getattr(amx_int8_ops, kernel)
            tiles, vnni = run(x, packed, qtype, n, isa="amx_int8"), run(x, packed, qtype, n, isa="vnni")
            assert torch.equal(tiles, vnni), (kernel, n, k)
            assert torch.equal(run(x, packed, qtype, n), tiles)  # the default: tiles from 9 rows, VNNI below


def test_integer_kernels_keep_non_finite_rows_to_themselves_on_the_tiles(amx_int8_ops):
    qtype = _qtype("Q4_1")
    packed = pack_wide16(_blocks("Q4_1", 48, 128), qtype)
    x = torch.randn(20, 128)
    x[3, 5], x[7, 100] = float("nan"), float("inf")
    out = amx_int8_ops.gguf_packed_linear_i16(x, packed, qtype, 48, isa="amx_int8")
    assert out[3].isnan().all() and out[7].isnan().all()
    vnni = amx_int8_ops.gguf_packed_linear_i16(x, packed, qtype, 48, isa="vnni")
    assert torch.allclose(out, vnni, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kernel", ["gguf_packed_linear_int8", "gguf_packed_linear_i16"])
def test_integer_kernels_refuse_an_unknown_or_missing_isa(kernel, vnni_ops):
    qtype = _qtype("Q4_0")
    packed = pack_wide16(_blocks("Q4_0", 16, 64), qtype)
    run = getattr(vnni_ops, kernel)
    with pytest.raises(RuntimeError, match="unknown isa 'avx2'"):
        run(torch.randn(2, 64), packed, qtype, 16, isa="avx2")
    if not vnni_ops.gguf_packed_amx_int8_available():
        with pytest.raises(RuntimeError, match="needs AMX-INT8"):
            run(torch.randn(2, 64), packed, qtype, 16, isa="amx_int8")


def test_int16_switch_routes_float32_rows_by_count(vnni_ops):
    from inferneo.quantization import gguf as gguf_module

    on = gguf_module.wide16_matmul_for(torch.device("cpu"), KernelConfig(gguf_int16=True))
    off = gguf_module.wide16_matmul_for(torch.device("cpu"), KernelConfig(gguf_int16=False))
    # the tiles move the crossover down where the CPU has them
    low = gguf_module._INT16_MIN_ROWS_AMX if vnni_ops.gguf_packed_amx_int8_available() else gguf_module._INT16_MIN_ROWS
    for name in WIDE16_FORMATS:
        qtype = _qtype(name)
        fmt = KEPT_FORMATS[qtype]
        packed = pack_wide16(_blocks(name, 48, 256), qtype)
        for rows, dtype, int16 in ((low - 1, torch.float32, False), (low, torch.float32, True),
                                   (300, torch.float32, True), (300, torch.bfloat16, False)):
            x = torch.randn(rows, 256).to(dtype)
            exact = vnni_ops.gguf_packed_linear(x, packed, qtype, 48, bf16_out=dtype == torch.bfloat16).to(dtype)
            expected = vnni_ops.gguf_packed_linear_i16(x, packed, qtype, 48) if int16 else exact
            assert torch.equal(on(x, packed, fmt, 48), expected), (name, rows, dtype)
            assert torch.equal(off(x, packed, fmt, 48), exact), (name, rows, dtype)


# ---- the engine ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide16_files(tiny_checkpoint_factory, tmp_path_factory):
    source = tiny_checkpoint_factory("llama", hidden_size=256, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("gguf-wide16")
    return {t: make_tiny_gguf(source, folder / f"tiny-{t}.gguf", dtype=t) for t in WIDE16_FORMATS}


def _layouts(llm: LLM) -> set[str]:
    return {seg.layout for layer in quantized_linears(llm.engine.runner.model)
            for seg in getattr(layer, "gguf_segments", ())}


@pytest.mark.parametrize("name", WIDE16_FORMATS)
def test_engine_holds_q4_layers_in_wide16_and_gives_the_dequantized_tokens(name, wide16_files, wide16_ops,
                                                                           monkeypatch):
    path = wide16_files[name]
    llm = LLM(str(path), dtype="float32")
    assert _layouts(llm) == {"wide16"}
    for layer in quantized_linears(llm.engine.runner.model):
        if getattr(layer, "gguf_segments", ()):
            seg = layer.gguf_segments[0]
            assert getattr(layer, seg.buffer).dim() == 3  # tiles, not the file's rows of blocks
            assert layer.single_matmul is not None  # one wide16 segment: the direct call (the tokens below use it)
    off = LLM(str(path), dtype="float32", kernels=KernelConfig(gguf_wide16=False))
    assert _layouts(off) == {"ggml"}
    assert all(getattr(layer, "single_matmul", None) is None for layer in quantized_linears(off.engine.runner.model))
    int8_layout = "wide16" if wide16_ops.gguf_packed_int8_available() and name != "Q8_0" else "ggml"
    assert _layouts(LLM(str(path), dtype="float32", kernels=KernelConfig(gguf_int8_dot=True))) == {int8_layout}
    for a, b in zip(quantized_linears(llm.engine.runner.model), quantized_linears(off.engine.runner.model),
                    strict=True):
        assert torch.equal(a.method.dequantized_weight(a), b.method.dequantized_weight(b))
    prompts = mixed_prompts(8, 300, seed=4, shared_prefix=24)
    with monkeypatch.context() as patch:
        patch.setenv("INFERNEO_GGUF_DEQUANTIZE", "1")
        dequantized = LLM(str(path), dtype="float32")
    assert run_engine(llm, prompts) == run_engine(dequantized, prompts)


def test_tied_q8_0_head_reads_wide16_tiles_and_gives_the_dequantized_tokens(tiny_checkpoint_factory, tmp_path,
                                                                            wide16_ops, monkeypatch):
    from inferneo.quantization.gguf import GGUFEmbedding, TiedEmbeddingMethod

    source = tiny_checkpoint_factory("llama", hidden_size=256, tie_word_embeddings=True)
    path = make_tiny_gguf(source, tmp_path / "tiny-tied-q8_0.gguf", dtype="Q8_0")

    def embedding_and_head(llm: LLM):
        model = llm.engine.runner.model
        emb = next(m for m in model.modules() if isinstance(m, GGUFEmbedding))
        head = next(m for m in quantized_linears(model) if isinstance(m.method, TiedEmbeddingMethod))
        return emb, head

    llm = LLM(str(path), dtype="float32")
    emb, head = embedding_and_head(llm)
    assert emb.layout == "wide16" and emb.qweight.dim() == 3 and emb.fmt.name == "Q8_0"
    off = LLM(str(path), dtype="float32", kernels=KernelConfig(gguf_wide16=False))
    emb_off, head_off = embedding_and_head(off)
    assert emb_off.layout == "ggml"
    assert embedding_and_head(LLM(str(path), dtype="float32", kernels=KernelConfig(gguf_int8_dot=True)))[0].layout == "ggml"
    assert torch.equal(emb.ggml_blocks(), emb_off.qweight)  # held once, the same blocks
    ids = torch.tensor([[0, 5, 17], [emb.num_embeddings - 1, 3, 3]])
    assert emb.native_rows is not None  # the lookup through the native kernel
    assert torch.equal(emb(ids), emb_off(ids))
    with monkeypatch.context() as patch:  # the same rows gathered from the tiles by PyTorch
        patch.setattr(emb, "native_rows", None)
        assert torch.equal(emb(ids), emb_off(ids))
    assert torch.equal(head.method.dequantized_weight(head), head_off.method.dequantized_weight(head_off))
    x = torch.randn(7, emb.embedding_dim, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(head(x), head_off(x), rtol=0, atol=1e-5 * head_off(x).abs().max().item())
    prompts = mixed_prompts(8, 300, seed=5, shared_prefix=24)
    with monkeypatch.context() as patch:
        patch.setenv("INFERNEO_GGUF_DEQUANTIZE", "1")
        dequantized = LLM(str(path), dtype="float32")
    assert run_engine(llm, prompts) == run_engine(dequantized, prompts)


@pytest.mark.parametrize("name", WIDE16_FORMATS)
def test_int16_engine_scores_prompts_as_the_exact_path_does(name, wide16_files, vnni_ops, monkeypatch):
    """The float32 engine with 16-bit activations at every row count against the exact path on the same file:
    with the exact run's greedy tokens fed to both (prompt scoring, so prefill rows and the head), each position's
    top choice and its log-probability. The random tiny weights leave near-ties, so a few choices may differ;
    measured on a Zen 5: all 503 positions agreed for each format, the top log-probabilities within 6.2e-3, 1.05e-2
    and 4.0e-3 nats (Q4_0, Q4_1, Q8_0); the test asks 98% and 2e-2."""
    from inferneo import SamplingParams
    from inferneo.quantization import gguf as gguf_module

    path = wide16_files[name]
    prompts = mixed_prompts(12, 300, seed=17)
    exact_llm = LLM(str(path), dtype="float32", kernels=KernelConfig(gguf_int16=False))
    sequences = [list(p) + out for p, out in zip(prompts, run_engine(exact_llm, prompts), strict=True)]
    monkeypatch.setattr(gguf_module, "_INT16_MIN_ROWS", 1)
    int16_llm = LLM(str(path), dtype="float32", kernels=KernelConfig(gguf_int16=True))

    def scores(llm: LLM) -> list[tuple[int, float]]:
        outs = llm.generate(sequences, SamplingParams(max_tokens=0, prompt_logprobs=1), use_tqdm=False)
        return [next((t, lp.logprob) for t, lp in pos.items() if lp.rank == 1)
                for o in outs for pos in o.prompt_logprobs[1:]]

    exact, int16 = scores(exact_llm), scores(int16_llm)
    agreeing = [(a, b) for a, b in zip(exact, int16, strict=True) if a[0] == b[0]]
    worst = max(abs(a[1] - b[1]) for a, b in agreeing)
    print(f"{name}: the int16 path's top choice is the exact path's at {len(agreeing)}/{len(exact)} positions; "
          f"log-probabilities within {worst:.2e}")
    assert len(agreeing) >= 0.98 * len(exact), (len(agreeing), len(exact))
    assert worst <= 2e-2


def test_the_wide16_paths_are_logged_by_what_the_cpu_has(caplog):
    from inferneo.quantization import gguf as gguf_module

    note = gguf_module._note_wide16_paths.__wrapped__  # the cached one logs once a process
    with caplog.at_level("INFO", logger="inferneo.quantization.gguf"):
        note("avx512_bf16", False, True)
        note("avx512", False, False)
        note("avx512_bf16", True, False)
        note("amx_bf16", False, True, True)
        note("amx_bf16", True, False, True)
    first, second, third, fourth, fifth = (r.getMessage() for r in caplog.records)
    assert "16-bit integer activations (AVX512_VNNI) from 16 rows" in first and "AVX512_BF16 pair panels" in first
    assert "exact AVX-512 float32 kernels" in second and "AVX-512 float32 panels (widened rows)" in second
    assert "int8 dot products (AVX512_VNNI) from 4 rows" in third and "int8 dot products up to 256 rows" in third
    assert "16-bit integer activations (the AMX-INT8 tiles) from 9 rows" in fourth and "AMX tiles" in fourth
    assert "int8 dot products (AVX512_VNNI; the AMX-INT8 tiles from 9 rows) from 4 rows" in fifth
