#!/usr/bin/env python3
"""A persistent form of the one-row packed-half W4A16 kernel (a prototype, not in the package): each program turns
the activation row into its float16 pairs once and keeps them in registers while it walks several tiles of output
rows, instead of every program of the shipped kernel (``triton_int4._gemv_h2_kernel``) loading and converting the
row again for its few rows.

Why: compiled for sm_90a, the shipped tiling of the q/k/v and gate/up layers (4 rows a program, 256 words a step,
2 warps) spends about 25 instructions a weight word in its K loop, of which the activations' conversion, their
exchange through shared memory (8 barriers a step) and part of the addressing are per program, not per weight;
at 4 rows a program the row is also read from L2 as many bytes as the weights (2026-12-06 note).

The kernel here covers layers whose whole row fits one step (K / 16 int64 columns, a power of two: Llama-2-7B's
K = 4096 layers: q/k/v, o, gate/up), one row, no split along K, no fused SiLU; the down projection (K = 11,008) is
out of its reach.

Modes:
- ``--interpret`` (CPU, sets ``TRITON_INTERPRET=1``): small shapes against ``F.linear`` on the de-quantized
  weight, both even and masked row tiles (the logic, not the PTX: the interpreter runs the kernels' float32 twin).
- ``--sass`` (CPU): registers and the tile loop's instructions per weight word, beside the shipped kernel's K loop.
- default (CUDA): Llama-2-7B's K = 4096 layers, each checked against float32 ``F.linear`` (tolerance of
  ``int4_check.py``) and timed beside the shipped launch in CUDA graphs over weight copies larger than L2
  (``int4_check.graph_time_us``), for several programs-per-multiprocessor counts and row tiles.

Usage: ``python benchmarks/gpu/w4a16_h2_persistent.py [--interpret | --sass] [--out FILE.jsonl]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

if "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from int4_check import GROUP, TOLERANCE, _random_rows, clone_weights, copies_for, graph_time_us, rel_err  # noqa: E402

from inferneo.kernels._pdl import launch_options, pdl_for, wait_for_previous_kernel  # noqa: E402
from inferneo.kernels.triton_int4 import (  # noqa: E402
    _h2_finish,
    _h2_scaled_dot,
    _h2_x_pairs,
    _prefetch_l2,
)
from inferneo.quantization.int4_layouts import Int4RowWeights, dequantize_rows  # noqa: E402

LAYERS = (("qkv_proj", 12288, 4096), ("o_proj", 4096, 4096), ("gate_up_proj", 22016, 4096))


@triton.jit
def _h2_persistent_kernel(x_ptr, x8_ptr, qw_ptr, qw8_ptr, s_ptr, z_ptr, y_ptr, D, tiles, programs,
                          K: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K2: tl.constexpr,
                          ITERS: tl.constexpr, EVEN: tl.constexpr, PDL: tl.constexpr):
    # Programs walk the tiles program_id, program_id + programs, ... (below ``tiles``; ITERS: cdiv(tiles, programs),
    # a constant trip count, which the interpreter needs) of BLOCK_N output rows; the row's float16 pairs are made
    # once, before the walk. BLOCK_K2 == K // 16: the whole row in one step. EVEN: D % BLOCK_N == 0.
    GW2: tl.constexpr = GROUP // 16
    KW: tl.constexpr = K // 8
    KW2: tl.constexpr = K // 16
    KG: tl.constexpr = K // GROUP
    F16: tl.constexpr = x_ptr.dtype.element_ty == tl.float16
    k2 = tl.arange(0, BLOCK_K2)
    kmask = k2 < KW2
    first = tl.program_id(0)
    n = first * BLOCK_N + tl.arange(0, BLOCK_N)
    if PDL:  # the first tile's rows, 128-byte lines, asked of L2 before the wait (weights only)
        LINES: tl.constexpr = KW2 * 8 // 128
        line = tl.arange(0, LINES)
        _prefetch_l2(qw8_ptr + n[:, None] * KW2 + line[None, :] * 16, (n < D)[:, None] & (line[None, :] >= 0))
    wait_for_previous_kernel(PDL, EARLY=True)  # what follows reads only weights before its own wait
    ab0, cd0 = _h2_x_pairs(x8_ptr, 2 * k2, kmask, True, F16)
    ab1, cd1 = _h2_x_pairs(x8_ptr, 2 * k2 + 1, kmask, True, F16)
    for i in range(ITERS):
        tile = first + i * programs
        if tile < tiles:
            n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = n < D
            mask = kmask[:, None] & nmask[None, :]
            wptr = qw8_ptr + n[None, :] * KW2 + k2[:, None]
            words = tl.load(wptr) if EVEN else tl.load(wptr, mask=mask, other=0)
            acc = _h2_scaled_dot(s_ptr, z_ptr, k2, n, mask, words, ab0, cd0, ab1, cd1, GW2, KG, EVEN)
            y = _h2_finish(acc, x_ptr, qw_ptr, s_ptr, z_ptr, n, nmask, 0, KG, KW, KG, GROUP, BLOCK_N)
            tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=nmask)


def persistent_h2(x: torch.Tensor, weights: Int4RowWeights, block_n: int, programs: int, warps: int,
                  pdl: bool | None = None) -> torch.Tensor:
    """``x [1, K] @ W.T`` through :func:`_h2_persistent_kernel` on ``programs`` programs (at most one a tile)."""
    d, k = weights.out_features, weights.in_features
    if x.shape != (1, k) or (k // 16) & (k // 16 - 1) or weights.group_size != GROUP or weights.perm is not None:
        raise ValueError("persistent_h2: one row, K / 16 a power of two, group 128, no act order")
    x = x.contiguous()
    y = torch.empty((1, d), dtype=x.dtype, device=x.device)
    pdl = pdl_for(x, pdl)
    tiles = triton.cdiv(d, block_n)
    programs = max(1, min(programs, tiles))
    _h2_persistent_kernel[(programs,)](x, x.view(torch.int64), weights.packed, weights.packed.view(torch.int64),
                                       weights.scales, weights.zeros, y, d, tiles, programs, K=k, GROUP=GROUP,
                                       BLOCK_N=block_n, BLOCK_K2=k // 16, ITERS=triton.cdiv(tiles, programs),
                                       EVEN=d % block_n == 0, PDL=pdl, num_warps=warps, **launch_options(pdl))
    return y


def interpret_check() -> int:
    """CPU, under the interpreter: against F.linear on the de-quantized weight, even and masked row tiles, bf16
    and fp16 rows, fewer programs than tiles (so that programs walk several)."""
    torch.manual_seed(0)
    failed = 0
    for d, k, block_n, programs, dtype in ((64, 256, 8, 3, torch.bfloat16), (60, 256, 8, 2, torch.bfloat16),
                                           (40, 512, 4, 4, torch.float16), (16, 256, 16, 1, torch.bfloat16)):
        w = _random_rows(d, k, "cpu")
        x = torch.randn(1, k).to(dtype)
        y = persistent_h2(x, w, block_n, programs, 1, pdl=False)
        err = rel_err(y, x.float() @ dequantize_rows(w).T)
        ok = err < 1e-2
        failed += not ok
        print(json.dumps({"d": d, "k": k, "block_n": block_n, "programs": programs, "dtype": str(dtype),
                          "rel_err": err, "ok": ok}), flush=True)
    print("interpreter check " + ("passed" if not failed else "FAILED"), flush=True)
    return 1 if failed else 0


def sass_counts() -> int:
    """CPU: the persistent kernel compiled for sm_90a, its tile loop's instructions per int32 weight word."""
    from offline_sass import INSTRUCTION, compile_sm90, sass_and_registers

    def outer_loop_ops(sass: str):
        """Opcode counts of the widest loop (the tile loop), less the code it branches over to skip an inner loop
        (the float32 fallback, which runs only when a float16 lane overflowed): what a tile executes."""
        ops = [(int(m.group(1), 16), m.group(2).split(".")[0]) for m in INSTRUCTION.finditer(sass)]
        branches = [(int(m.group(1), 16), int(m.group(2), 16))
                    for m in re.finditer(r"/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?BRA 0x([0-9a-f]+)", sass)]
        loops = [(target, at) for at, target in branches if target < at]
        if not loops:
            return None
        start, end = max(loops, key=lambda ab: ab[1] - ab[0])
        skipped = []
        for s2, e2 in loops:  # each inner loop: the nearest forward branch before it that jumps past it
            around = [(at, target) for at, target in branches if start <= at < s2 and e2 < target <= end]
            if (s2, e2) != (start, end) and around:
                skipped.append(max(around))
        return Counter(op for addr, op in ops
                       if start <= addr <= end and not any(at < addr < target for at, target in skipped))

    def without_fallback(sass: str) -> int:
        """Instructions of a whole shipped h2 program less its float32 fallback (the region that the nearest
        forward branch before the last loop jumps over)."""
        ops = [int(m.group(1), 16) for m in INSTRUCTION.finditer(sass)]
        branches = [(int(m.group(1), 16), int(m.group(2), 16))
                    for m in re.finditer(r"/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?BRA 0x([0-9a-f]+)", sass)]
        loops = sorted((target, at) for at, target in branches if target < at)
        s2, e2 = loops[-1]
        at, target = max((a, t) for a, t in branches if a < s2 and t > e2)
        return sum(1 for addr in ops if not at < addr < target)

    from int4_h2_ptxas import compile_h2

    # the shipped q/k/v and gate/up tiling: two steps at K = 4096, so its K loop runs once and each instruction
    # of the program (less the fallback) runs once
    for block_n, words, warps in ((4, 256, 2),):
        sass, regs, _ = sass_and_registers(compile_h2(4096, block_n, words, warps, False, 1))
        per_thread = block_n * 512 / (32 * warps)  # the program's whole row, K = 4096
        print(f"shipped h2, K 4096, {block_n} rows, {words} words a step, {warps} warps: regs {regs}; a program "
              f"executes {without_fallback(sass)} instructions for {per_thread:g} words a thread "
              f"({without_fallback(sass) / per_thread:.1f} a word, its fallback left out)", flush=True)
    signature = {"x_ptr": "*bf16", "x8_ptr": "*i64", "qw_ptr": "*i32", "qw8_ptr": "*i64", "s_ptr": "*fp32",
                 "z_ptr": "*u8", "y_ptr": "*bf16", "D": "i32", "tiles": "i32", "programs": "i32"}
    for block_n, warps in ((4, 2), (4, 4), (8, 4)):
        kernel = compile_sm90(_h2_persistent_kernel, signature,
                              dict(K=4096, GROUP=GROUP, BLOCK_N=block_n, BLOCK_K2=256, ITERS=4, EVEN=True,
                                   PDL=True), warps)
        sass, regs, spill = sass_and_registers(kernel)
        body = outer_loop_ops(sass)
        per_thread = block_n * 512 / (32 * warps)
        line = f"K 4096, {block_n} rows a tile, {warps} warps: regs {regs} spill {spill} total " \
               f"{len(INSTRUCTION.findall(sass))}"
        if body:
            line += (f"; tile loop (the fallback left out) {sum(body.values())} instructions for {per_thread:g} "
                     f"words a thread ({sum(body.values()) / per_thread:.1f} a word): "
                     + " ".join(f"{op} {c}" for op, c in body.most_common(12)))
        print(line, flush=True)
    return 0


def gpu_run(out_path: str) -> int:
    from inferneo.kernels.triton_attention import device_sm_count
    from inferneo.kernels.triton_int4 import w4a16_linear

    torch.manual_seed(0)
    sms = device_sm_count(torch.device("cuda"))
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, f"{sms} SMs", flush=True)
    failed, lines = 0, []
    for name, n, k in LAYERS:
        w = _random_rows(n, k, "cuda")
        copies = [w] + [clone_weights(w) for _ in range(copies_for(w.packed.numel() * 4) - 1)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ dequantize_rows(w).T
        shipped_us = graph_time_us([lambda w=c, x=x: w4a16_linear(x, w) for c in copies])
        best = None
        for block_n in (2, 4, 8):
            for warps in (2, 4):
                for per_sm in (2, 4, 8, 16):
                    programs = per_sm * sms
                    try:
                        err = rel_err(persistent_h2(x, w, block_n, programs, warps), ref)
                        us = graph_time_us([lambda w=c, x=x, b=block_n, p=programs, wp=warps:
                                            persistent_h2(x, w, b, p, wp) for c in copies])
                    except Exception as exc:  # noqa: BLE001 (a launch that does not compile: the others run)
                        print(f"{name} {block_n} rows {warps} warps {per_sm}/SM: {type(exc).__name__}: "
                              f"{str(exc)[:200]}", flush=True)
                        continue
                    ok = err < TOLERANCE
                    failed += not ok
                    line = {"layer": name, "n": n, "k": k, "block_n": block_n, "warps": warps,
                            "programs_per_sm": per_sm, "us": us, "shipped_us": shipped_us, "rel_err": err, "ok": ok}
                    lines.append(line)
                    if ok and (best is None or us < best["us"]):
                        best = line
        print(f"{name}: shipped {shipped_us:.2f} us; best persistent "
              + (f"{best['us']:.2f} us ({best['block_n']} rows, {best['warps']} warps, "
                 f"{best['programs_per_sm']}/SM)" if best else "none"), flush=True)
    Path(out_path).write_text("".join(json.dumps(x) + "\n" for x in lines))
    print("all launches within tolerance" if not failed else f"{failed} launches FAILED", flush=True)
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret", action="store_true", help="CPU: the logic under Triton's interpreter")
    parser.add_argument("--sass", action="store_true", help="CPU: compiled for sm_90a, instructions a word")
    parser.add_argument("--out", default="w4a16_h2_persistent.jsonl")
    args = parser.parse_args()
    if args.interpret:
        return interpret_check()
    if args.sass:
        return sass_counts()
    return gpu_run(args.out)


if __name__ == "__main__":
    raise SystemExit(main())
