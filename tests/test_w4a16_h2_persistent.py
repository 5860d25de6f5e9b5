"""The persistent one-row W4A16 prototype (``benchmarks/gpu/w4a16_h2_persistent.py``) under Triton's interpreter:
programs that walk several row tiles with the activation row converted once give ``F.linear`` on the de-quantized
weight (even and masked tiles, bf16 and fp16 rows), so that its GPU timing run starts from a kernel known to be
right."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "w4a16_h2_persistent.py"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_persistent_h2_matches_linear_under_the_interpreter():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--interpret"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 4 and all(line["ok"] and line["rel_err"] < 1e-2 for line in lines)
    assert any(line["programs"] * line["block_n"] < line["d"] for line in lines)  # programs walked several tiles
    assert proc.stdout.strip().endswith("interpreter check passed")
