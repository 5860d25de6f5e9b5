"""Triton kernels compiled for sm_90a without a GPU, and what ``ptxas -v`` and ``cuobjdump -sass`` say of them:
the shared part of the ``*_ptxas.py`` scripts. Needs Triton's bundled ``ptxas`` and ``cuobjdump``."""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TOOLS = Path(triton.__file__).parent / "backends/nvidia/bin"
#: One SASS instruction line of ``cuobjdump -sass``: its address and opcode (after a predicate, if any).
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9._]*)")


def compile_sm90(fn, signature: dict[str, str], constexprs: dict, warps: int, source=ASTSource):
    """``fn`` compiled for sm_90a as a launch at these shapes specializes it: every pointer and integer argument
    of ``signature`` (name -> Triton type) a multiple of 16, the other arguments ``constexprs``. ``source``: the
    front end's source class (Gluon kernels: ``triton.experimental.gluon._runtime.GluonASTSource``)."""
    sig = {arg: signature.get(arg, "constexpr") for arg in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names) if arg in signature}
    return triton.compile(source(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def first_loop_ops(sass: str) -> Counter | None:
    """Opcode counts of the first loop's body (from the target of the first backward branch to that branch; in
    these kernels the K loop), or None when the SASS has no loop."""
    ops = [(int(m.group(1), 16), m.group(2).split(".")[0]) for m in INSTRUCTION.finditer(sass)]
    for m in re.finditer(r"/\*([0-9a-f]{4})\*/\s+@!?P\d BRA 0x([0-9a-f]+)", sass):
        end, start = int(m.group(1), 16), int(m.group(2), 16)
        if start < end:
            return Counter(op for addr, op in ops if start <= addr <= end)
    return None


def sass_and_registers(kernel) -> tuple[str, int, list[str]]:
    """The kernel's SASS, and its registers and spill-store bytes as ``ptxas -v`` reports them."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([str(TOOLS / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
        (Path(tmp) / "k.ptx").write_text(kernel.asm["ptx"])
        run = subprocess.run([str(TOOLS / "ptxas"), "-arch=sm_90a", "-v", str(Path(tmp) / "k.ptx"), "-o",
                              str(Path(tmp) / "o.cubin")], capture_output=True, text=True)
    regs = int(re.findall(r"Used (\d+) registers", run.stderr)[0])
    return sass, regs, re.findall(r"(\d+) bytes spill stores", run.stderr)
