"""The Marlin-order repacking of the Gluon W4A16 prototype (``benchmarks/gpu/w4a16_gluon.py``): every code lands in
the word and nibble the kernel reads it from, and the kernel compiles for sm_90a with its de-quantized words taken
as the tensor-core operand without moving data (checked at compile time by ``assert_trivial``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "w4a16_gluon.py"


@pytest.fixture(scope="module")
def probe():
    pytest.importorskip("triton.experimental.gluon")
    spec = importlib.util.spec_from_file_location("w4a16_gluon", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_repacked_words_hold_each_code_where_the_kernel_reads_it(probe):
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (40, 256), generator=gen, dtype=torch.uint8)
    words = probe.pack_marlin(codes)
    assert words.shape == (40, 32) and torch.equal(probe.unpack_marlin(words), codes)
    # word 16 g + 4 t + c of row n, nibble 4 a + 2 b + e: column 128 g + 32 c + 16 a + 8 b + 2 t + e
    for n, g, t, c in ((0, 0, 0, 0), (3, 1, 2, 3), (39, 1, 3, 1)):
        word = int(words[n, 16 * g + 4 * t + c])
        for a in range(2):
            for b in range(2):
                for e in range(2):
                    column = 128 * g + 32 * c + 16 * a + 8 * b + 2 * t + e
                    assert (word >> (4 * (4 * a + 2 * b + e))) & 0xF == int(codes[n, column])


def test_the_kernel_compiles_with_the_operand_taken_in_place(probe):
    pytest.importorskip("triton.backends.nvidia")
    kernel = probe.compile_offline(16, 64, 4)  # (assert_trivial: a conversion that moved data would not compile)
    assert "mma.sync.aligned.m16n8k16" in kernel.asm["ptx"]
