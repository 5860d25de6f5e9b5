#!/usr/bin/env python3
"""The one-row h2 kernels with and without float16 copies of their rows, compiled by Triton for sm_90a without a
GPU (``ptxas -v``, ``cuobjdump -sass``): registers and the whole kernel's SASS instruction count, for Llama-2-7B's
tuned one-row tilings.

- W4A16 (``triton_int4._gemv_h2_kernel``): as shipped before the copies (the row converted and paired in every
  program), reading the paired copy (``X_HALF``), and reading one while writing its output's (``Y_HALF``);
- FP8 (``triton_fp8_gemv._fp8_gemv_h2_kernel``): the same three forms with the scaled copy.

The figures docs/benchmarks.md quotes ("Float16 copies of the rows between the W4A16 GEMVs", "Scaled float16
copies for the FP8 one-row GEMVs"). Usage: ``python benchmarks/gpu/half_copies_ptxas.py``. Needs Triton's
bundled ``ptxas`` and ``cuobjdump``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]

from fp8_h2p_ptxas import SIGNATURE as FP8_SIGNATURE  # noqa: E402
from int4_h2_ptxas import SIGNATURE as INT4_SIGNATURE  # noqa: E402
from offline_sass import INSTRUCTION, compile_sm90, sass_and_registers  # noqa: E402

from inferneo.kernels import triton_fp8_gemv, triton_int4  # noqa: E402

FORMS = (("no copies", False, False), ("reads a copy", True, False), ("reads and writes copies", True, True))
# label -> (K, rows a program, int32 words a step (W4A16) or codes a step (FP8), warps, gated/SiLU)
INT4 = {"q/k/v 12288 x 4096": (4096, 4, 512, 2, False)}
FP8 = {"q/k/v 12288 x 4096": (4096, 8, 2048, 8, False), "gate/up + SiLU 22016 x 4096": (4096, 2, 4096, 4, True),
       "down 4096 x 11008": (11008, 16, 2048, 16, False)}


def count(kernel) -> tuple[int, int]:
    sass, regs, _ = sass_and_registers(kernel)
    return regs, len(INSTRUCTION.findall(sass))


def main() -> None:
    for label, (k, rows, words, warps, silu) in INT4.items():
        for form, x_half, y_half in FORMS:
            signature = dict(INT4_SIGNATURE, **({"xh_ptr": "*i64"} if x_half else {}),
                             **({"yh_ptr": "*fp16"} if y_half else {}))
            constexprs = dict(K=k, GROUP=128, BLOCK_N=rows, BLOCK_K2=words // 2, SILU=silu, SPLIT_K=1,
                              LAST_SUMS=False, EVEN=True, PDL=True, X_HALF=x_half, Y_HALF=y_half)
            regs, total = count(compile_sm90(triton_int4._gemv_h2_kernel, signature, constexprs, warps))
            print(f"W4A16 {label}, {form}: {regs} registers, {total} instructions")
    for label, (k, rows, codes, warps, gated) in FP8.items():
        for form, x_half, y_half in FORMS:
            signature = dict(FP8_SIGNATURE, **({"yh_ptr": "*fp16"} if y_half else {}))
            constexprs = dict(K=k, SCALE=1, GATED=gated, BLOCK_N=rows, BLOCK_K=codes, EVEN_N=True, PDL=True,
                              FB_K=max(16, min(codes, 512 * warps // rows)), X_HALF=x_half, Y_HALF=y_half)
            regs, total = count(compile_sm90(triton_fp8_gemv._fp8_gemv_h2_kernel, signature, constexprs, warps))
            print(f"FP8 {label}, {form}: {regs} registers, {total} instructions")


if __name__ == "__main__":
    main()
