#!/usr/bin/env python3
"""The pipelined one-row FP8 GEMV (``triton_fp8_gemv._fp8_gemv_h2p_kernel``) compiled by Triton for sm_90a without a
GPU, then ``ptxas -v`` and ``cuobjdump -sass``: registers, spills, shared memory, programs a multiprocessor can hold
(registers, threads, shared memory), waves over 132 multiprocessors, and SASS counts (LDGSTS: ``cp.async`` copies).

Arguments: ``N,K,BLOCK_N,BLOCK_K,warps,stages,PRE,gated`` per tiling, e.g. ``12288,4096,16,256,4,5,0,0`` (Llama-2-7B's
shapes: 12288,4096 / 4096,4096 / 22016,4096 with gated 1 / 4096,11008). Needs Triton's bundled ``ptxas`` and
``cuobjdump``.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]

from offline_sass import INSTRUCTION, compile_sm90, sass_and_registers  # noqa: E402

from inferneo.kernels import triton_fp8_gemv as fg  # noqa: E402

SIGNATURE = {"x_ptr": "*bf16", "x8_ptr": "*i64", "w_ptr": "*fp8e4nv", "w8_ptr": "*i64", "s_ptr": "*fp32",
             "out_ptr": "*bf16", "N": "i32", "stride_wn": "i32", "stride_wn8": "i32"}


def compile_h2p(n: int, k: int, bn: int, bk: int, warps: int, stages: int, pre: int, gated: bool):
    constexprs = dict(K=k, SCALE=1, GATED=gated, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, PRE=pre,
                      FB_K=max(16, min(bk, 512 * warps // bn)), EVEN_N=True, PDL=True)
    return compile_sm90(fg._fp8_gemv_h2p_kernel, SIGNATURE, constexprs, warps)


def main() -> None:
    for arg in sys.argv[1:]:
        n, k, bn, bk, warps, stages, pre, gated = (int(v) for v in arg.split(","))
        kernel = compile_h2p(n, k, bn, bk, warps, stages, pre, bool(gated))
        sass, regs, spill = sass_and_registers(kernel)
        ops = Counter(m.group(2).split(".")[0] for m in INSTRUCTION.finditer(sass))
        smem = kernel.metadata.shared
        threads = 32 * warps
        per_sm = min(65536 // (regs * threads), 2048 // threads, (228 * 1024) // (smem + 1024), 32)
        programs = -(-(n // 2 if gated else n) // bn)
        print(f"{n}x{k} bn{bn} bk{bk} w{warps} st{stages} pre{pre} g{gated}: regs {regs} spill {spill} smem {smem} "
              f"progs/SM {per_sm} programs {programs} waves {programs / (132 * per_sm):.2f} "
              f"LDG {ops['LDG']} LDGSTS {ops['LDGSTS']} LDS {ops['LDS']} BAR {ops['BAR']} total {sum(ops.values())}")


if __name__ == "__main__":
    main()
