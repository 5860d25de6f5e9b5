#!/usr/bin/env python3
"""The one-row packed-half W4A16 kernel (``triton_int4._gemv_h2_kernel``) compiled by Triton for sm_90a without a
GPU, then ``ptxas -v`` and ``cuobjdump -sass``: registers, spills, SASS counts of the whole kernel and of its K
loop (the backward branch's body), and the loop's instructions per int32 weight word.

Arguments: ``N,K,BLOCK_N,WORDS,warps,silu,split`` per tiling (WORDS: int32 words of K a step), e.g.
``12288,4096,8,512,4,0,1`` (Llama-2-7B's shapes: 12288,4096 / 4096,4096 / 11008,4096 with silu 1 / 4096,11008).
Group 128. Needs Triton's bundled ``ptxas`` and ``cuobjdump``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]

from offline_sass import INSTRUCTION, compile_sm90, first_loop_ops, sass_and_registers  # noqa: E402

from inferneo.kernels import triton_int4  # noqa: E402

SIGNATURE = {"x_ptr": "*bf16", "x8_ptr": "*i64", "qw_ptr": "*i32", "qw8_ptr": "*i64", "s_ptr": "*fp32",
             "z_ptr": "*u8", "y_ptr": "*bf16", "ws_ptr": "*fp32", "count_ptr": "*i32", "D": "i32", "G_SPLIT": "i32"}


def compile_h2(k: int, block_n: int, words: int, warps: int, silu: bool, split: int):
    constexprs = dict(K=k, GROUP=128, BLOCK_N=block_n, BLOCK_K2=words // 2, SILU=silu, SPLIT_K=split,
                      LAST_SUMS=split > 1, EVEN=True, PDL=True)
    return compile_sm90(triton_int4._gemv_h2_kernel, SIGNATURE, constexprs, warps)


def main() -> None:
    for arg in sys.argv[1:]:
        n, k, block_n, words, warps, silu, split = (int(v) for v in arg.split(","))
        sass, regs, spill = sass_and_registers(compile_h2(k, block_n, words, warps, bool(silu), split))
        body = first_loop_ops(sass)
        line = f"{arg}: regs {regs} spill {spill} total {len(INSTRUCTION.findall(sass))}"
        if body:
            per_thread = block_n * words * (2 if silu else 1) / (32 * warps)
            line += (f"; K loop {sum(body.values())} instructions for {per_thread:g} words a thread "
                     f"({sum(body.values()) / per_thread:.1f} a word): "
                     + " ".join(f"{op} {c}" for op, c in body.most_common(12)))
        print(line)


if __name__ == "__main__":
    main()
