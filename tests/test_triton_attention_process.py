"""``test_triton_attention.py`` in a process of its own when this run imported Triton before collecting it.

That module runs the Triton attention kernels under Triton's interpreter, which must be switched on before
``import triton`` (Triton decorates its own library once, at its first import). In the full test run other modules
import Triton first (peft and transformers' model modules do, when ``test_lora`` and ``test_rope_scaling`` import
them), so the module skips itself there. This test then runs it in a fresh interpreter and fails if any of its
tests fails or if none ran; where the module ran in this process (alone, or first), it skips instead of running
it twice.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

_MODULE = Path(__file__).with_name("test_triton_attention.py")


def test_triton_attention_module_runs_in_its_own_process_when_skipped_here():
    pytest.importorskip("triton")
    if "test_triton_attention" in sys.modules:
        pytest.skip("test_triton_attention.py ran in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(_MODULE)],
                          cwd=_MODULE.parent.parent, env=env, capture_output=True, text=True, timeout=1500)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) > 0, tail
