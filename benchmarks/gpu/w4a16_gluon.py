"""A W4A16 kernel for 16-64 rows in Gluon (Triton 3.6's explicit-layout language), a prototype not yet run on a
GPU: ``python benchmarks/gpu/w4a16_gluon.py --out DIR`` checks it against ``F.linear`` on Llama-2-7B's shapes and
times it beside the shipped tensor-core kernel (``triton_int4._tc_kernel``); ``--pack-check`` (CPU) checks the
weight repacking alone.

Why (docs/benchmarks.md, "W4A16 at 16 and 32 rows"): the shipped kernel de-quantizes its words straight into the
``mma.sync`` operand layout, but Triton then gives both operands ``kWidth = 8``, so the activations are read by
``LDS.128`` and ``ptxas`` spends about 1.7 instructions a code pairing their registers before each ``HMMA``. Here
the layouts are explicit:

- The weights are repacked in Marlin's order: word ``(c, t)`` of row ``n`` and group ``g`` (at ``16 g + 4 t + c``)
  holds, in nibble ``4 a + 2 b + e``, the code of column ``128 g + 32 c + 16 a + 8 b + 2 t + e``: exactly what
  lane ``t`` of an ``mma.sync.m16n8k16`` needs of output row ``n`` (its B fragment) for the two k16 steps of chunk
  ``c``. Each thread loads its words in that layout (:data:`w_l`), de-quantizes them two codes an instruction (the
  PTX of ``triton_int4``'s tensor-core kernel), and the join/permute/reshape that puts the 8 codes at their
  columns is a register renaming: ``convert_layout(..., assert_trivial=True)`` to the B operand layout
  (``kWidth = 2``) compiles, so no data moves.
- The activations (A operand, ``kWidth = 2``) go through shared memory and come back by ``ldmatrix``.
- The next group's words, scales, zero points and activations are read while the current one computes.

Compiled offline for sm_90a (``--sass``, no GPU needed): 2.9-3.2 SASS instructions a code at 16 rows and 3.5-3.9
at 32 (the shipped kernel: 3.7 and 5.2), none of them operand moves.
"""
import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.experimental.gluon as gluon
import triton.experimental.gluon.language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]

from offline_sass import compile_sm90, first_loop_ops, sass_and_registers  # noqa: E402

from inferneo.kernels import triton_int4  # noqa: E402
from inferneo.kernels.triton_int4 import choose_config, w4a16_linear  # noqa: E402
from inferneo.quantization.int4_layouts import (  # noqa: E402
    Int4Codes,
    dequantize_rows,
    pack_canonical,
    pack_rows,
    row_codes,
)

# Two codes an instruction into bf16 pairs, q - z exact: the shipped tensor-core kernel's PTX ($8 the word, $9
# -(128 + z) in both halves; outputs $0..$7 the codes 0..7 of the word)
DEQ = gl.constexpr(triton_int4._ASM["bf16", False])


@gluon.jit
def _weights(words, z, b_l: gl.constexpr, BN: gl.constexpr):
    """[4 chunks, 4 lanes, BN] words of one group and its [BN] zero points -> the [128, BN] bf16 B operand (q - z),
    element (32 c + 16 a + 8 b + 2 t + e, n) from nibble 4 a + 2 b + e of word (c, t, n)."""
    zp = z + 0x4300
    zneg = (zp | (zp << 16)) | -2147450880  # -(128 + z) in both bf16 halves
    zb = gl.broadcast(gl.expand_dims(gl.expand_dims(zneg, 0), 1), words)[0]
    v0, v1, v2, v3, v4, v5, v6, v7 = gl.inline_asm_elementwise(
        DEQ, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [words, zb], (gl.bfloat16,) * 8, True, 1)
    w6 = gl.join(gl.join(gl.join(v0, v1), gl.join(v2, v3)), gl.join(gl.join(v4, v5), gl.join(v6, v7)))
    w6 = gl.permute(w6, (0, 5, 4, 1, 3, 2))  # [C, T, N, e, b, a] -> [C, a, b, T, e, N]
    return gl.convert_layout(gl.reshape(w6, (128, BN)), b_l, assert_trivial=True)


@gluon.jit
def w4_gluon_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_ym, G_SPLIT,
                    BM: gl.constexpr, BN: gl.constexpr, NUM_WARPS: gl.constexpr, ATOMIC: gl.constexpr):
    # Output columns [pid0 * BN, +BN) of all BM rows over groups [pid1 * G_SPLIT, +G_SPLIT); one group (128 K)
    # a step, the next group's words, scales, zeros and activations read while this one computes.
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NUM_WARPS], instr_shape=[16, 8])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    w_l: gl.constexpr = gl.BlockedLayout(size_per_thread=[4, 1, 1], threads_per_warp=[1, 4, 8],
                                         warps_per_cta=[1, 1, NUM_WARPS], order=[0, 1, 2])
    x_l: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[2, 16],
                                         warps_per_cta=[NUM_WARPS, 1], order=[1, 0])
    x_sl: gl.constexpr = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0])
    KG = K // 128
    g_start = gl.program_id(1) * G_SPLIT
    g_last = gl.minimum(KG, g_start + G_SPLIT) - 1
    # a row's group is 16 words: word (c, t) at 4 t + c
    c = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, w_l)))
    t = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, w_l)))
    n_w = gl.program_id(0) * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, gl.SliceLayout(1, w_l)))
    wptr = qw_ptr + (t[None, :, None] * 4 + c[:, None, None]) + n_w[None, None, :] * (K // 8)
    zptr = z_ptr + n_w * KG
    n_s = gl.program_id(0) * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
    sptr = s_ptr + n_s * KG
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [BM, 128], x_sl)
    m = gl.arange(0, BM, layout=gl.SliceLayout(1, x_l))
    kk = gl.arange(0, 128, layout=gl.SliceLayout(0, x_l))
    xptr = x_ptr + gl.minimum(m, M - 1)[:, None] * stride_xm + kk[None, :]
    words = gl.load(wptr + g_start * 16)
    z = gl.load(zptr + g_start).to(gl.int32)
    s = gl.load(sptr + g_start)
    x = gl.load(xptr + g_start * 128)
    acc = gl.zeros([BM, BN], gl.float32, layout=mma)
    for g in range(g_start, g_last + 1):
        nxt = gl.minimum(g + 1, g_last)  # (the last step reads its own group again: in bounds, unused)
        words_n = gl.load(wptr + nxt * 16)
        z_n = gl.load(zptr + nxt).to(gl.int32)
        s_n = gl.load(sptr + nxt)
        x_n = gl.load(xptr + nxt * 128)
        gl.thread_barrier()  # the previous step's ldmatrix reads are done
        x_smem.store(x)
        gl.thread_barrier()
        part = mma_v2(x_smem.load(a_l), _weights(words, z, b_l, BN), gl.zeros([BM, BN], gl.float32, layout=mma))
        acc = acc + part * s[None, :]
        words, z, s, x = words_n, z_n, s_n, x_n
    ym = gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
    yptr = y_ptr + ym[:, None] * stride_ym + n_s[None, :]
    ymask = (ym < M)[:, None] & (n_s < N)[None, :]
    if ATOMIC:
        gl.atomic_add(yptr, acc, mask=ymask)
    else:
        gl.store(yptr, acc.to(y_ptr.dtype.element_ty), mask=ymask)


def pack_marlin(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[N, K]`` (K a multiple of 128) -> int32 words ``[N, K / 8]`` in the kernel's order (module
    docstring)."""
    n, k = codes.shape
    if k % 128:
        raise ValueError(f"pack_marlin: {k} columns are not whole groups of 128")
    q = codes.to(torch.int32).view(n, k // 128, 4, 2, 2, 4, 2)  # [n, g, c, a, b, t, e]
    q = q.permute(0, 1, 5, 2, 3, 4, 6).reshape(n, k // 128, 4, 4, 8)  # [n, g, t, c, nibble = 4a + 2b + e]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=codes.device)
    return (q << shifts).sum(dim=-1, dtype=torch.int32).reshape(n, k // 8).contiguous()


def unpack_marlin(words: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_marlin` (what the kernel reads), for the check."""
    n, kw = words.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    q = (words.view(n, kw // 16, 4, 4, 1) >> shifts) & 0xF  # [n, g, t, c, nibble]
    q = q.view(n, kw // 16, 4, 4, 2, 2, 2).permute(0, 1, 3, 4, 5, 2, 6)  # [n, g, c, a, b, t, e]
    return q.reshape(n, kw * 8).to(torch.uint8)


def w4a16_gluon(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bm: int, bn: int,
                warps: int = 4, split: int = 1) -> torch.Tensor:
    """``x [M, K] @ W.T`` with ``W`` as :func:`pack_marlin`'s words and the row layout's scales / zero points
    (``[N, K / 128]``); ``split`` programs along K add float32 parts atomically."""
    m, k = x.shape
    n = words.shape[0]
    if m > bm or n % bn or k % 128 or words.shape[1] * 8 != k:
        raise ValueError(f"w4a16_gluon: {m} rows (at most bm = {bm}), {n} outputs (a multiple of bn = {bn}) and "
                         f"{k} inputs (whole groups of 128, as the words hold) are needed; words {tuple(words.shape)}")
    groups = k // 128
    per = triton.cdiv(groups, split)
    y = torch.zeros((m, n), dtype=torch.float32, device=x.device) if split > 1 else x.new_empty((m, n))
    w4_gluon_kernel[(triton.cdiv(n, bn), triton.cdiv(groups, per))](
        x, words, scales, zeros, y, m, n, k, x.stride(0), y.stride(0), per, BM=bm, BN=bn, NUM_WARPS=warps,
        ATOMIC=split > 1, num_warps=warps)
    return y.to(x.dtype) if split > 1 else y


LAYERS = (("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008))
LAUNCHES = [(bn, warps, split) for bn in (64, 128) for warps in (4,) for split in (1, 2, 4, 8)]


def pack_check() -> bool:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (48, 384), generator=gen, dtype=torch.uint8)
    ok = torch.equal(unpack_marlin(pack_marlin(codes)), codes)
    # one word by hand: row 0, group 0, lane t = 1, chunk c = 2 holds columns 64 + 16a + 8b + 2 + e
    word = int(pack_marlin(codes)[0, 4 * 1 + 2])
    cols = [64 + 16 * (i >> 2) + 8 * ((i >> 1) & 1) + 2 + (i & 1) for i in range(8)]
    ok &= all(((word >> (4 * i)) & 0xF) == int(codes[0, col]) for i, col in enumerate(cols))
    print("pack check", "passed" if ok else "FAILED")
    return ok


def gpu_check(out: Path) -> bool:
    def timed(fn) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=100) * 1000

    ok, rows = True, []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, n, k in LAYERS:
        codes = torch.randint(0, 16, (n, k), generator=gen, device="cuda", dtype=torch.uint8)
        scales = torch.rand(n, k // 128, generator=gen, device="cuda") * 0.02 + 0.001
        zeros = torch.randint(0, 16, (n, k // 128), generator=gen, device="cuda", dtype=torch.uint8)
        row = pack_rows(pack_canonical(Int4Codes(codes, zeros.t(), scales.t(), 128)))  # the engine's layout
        assert torch.equal(row_codes(row), codes) and row.perm is None
        words = pack_marlin(codes)
        w = dequantize_rows(row)
        for m in (16, 32, 64):
            x = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), w)
            shipped = choose_config("linear", m, n, k, 128, torch.bfloat16, torch.cuda.get_device_properties(0)
                                    .multi_processor_count)
            line = dict(layer=name, m=m, n=n, k=k, shipped=shipped.as_dict(),
                        shipped_us=timed(functools.partial(w4a16_linear, x, row)),
                        shipped_err=((w4a16_linear(x, row).float() - ref).norm() / ref.norm()).item())
            for bn, warps, split in LAUNCHES:
                key = f"gluon_{bn}_{warps}_{split}"
                try:
                    y = w4a16_gluon(x, words, row.scales, row.zeros, m, bn, warps, split)
                    err = ((y.float() - ref).norm() / ref.norm()).item()
                    line[key] = dict(err=err, us=timed(functools.partial(w4a16_gluon, x, words, row.scales, row.zeros, m,
                                                                         bn, warps, split)))
                    ok &= err < 1.5e-2
                except Exception as exc:  # noqa: BLE001 (recorded: the probe goes on)
                    line[key] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
                    ok = False
            rows.append(line)
            best = min((v["us"], kk) for kk, v in line.items() if kk.startswith("gluon") and "us" in v)
            print(f"{name} {m} rows: shipped {line['shipped_us']:.1f} us, best gluon {best[0]:.1f} us ({best[1]})",
                  flush=True)
    (out / "w4a16_gluon.json").write_text(json.dumps(rows, indent=1))
    print("checks", "passed" if ok else "FAILED")
    return ok


SASS_SIGNATURE = {"x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*u8", "y_ptr": "*bf16",
                  "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32", "G_SPLIT": "i32"}


def compile_offline(m: int, bn: int, warps: int):
    """The kernel at ``m`` rows and ``bn`` columns a program, compiled for sm_90a without a GPU."""
    return compile_sm90(w4_gluon_kernel, SASS_SIGNATURE, dict(BM=m, BN=bn, NUM_WARPS=warps, ATOMIC=False), warps,
                        source=GluonASTSource)


def sass_counts() -> None:
    """Each launch of :data:`LAUNCHES` at 16 and 32 rows compiled for sm_90a without a GPU: registers, spills and
    the K loop's SASS instructions a code (``offline_sass.py``'s tools)."""
    for m in (16, 32):
        for bn, warps in sorted({(bn, warps) for bn, warps, _ in LAUNCHES}):
            sass, regs, spill = sass_and_registers(compile_offline(m, bn, warps))
            body = first_loop_ops(sass)
            per_code = sum(body.values()) * 32 * warps / (bn * 128)
            print(f"{m} rows, {bn} columns, {warps} warps: {regs} registers, spills {spill}; K loop "
                  f"{sum(body.values())} instructions, {per_code:.2f} a code: "
                  + " ".join(f"{op} {c}" for op, c in body.most_common(10)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--pack-check", action="store_true", help="the repacking alone, on CPU")
    parser.add_argument("--sass", action="store_true", help="compile for sm_90a offline and count SASS")
    args = parser.parse_args()
    if args.pack_check:
        return 0 if pack_check() else 1
    if args.sass:
        sass_counts()
        return 0
    started = time.perf_counter()
    ok = pack_check() and gpu_check(Path(args.out))
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
