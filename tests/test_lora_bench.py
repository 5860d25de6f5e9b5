"""``benchmarks/gpu/lora_suite.py --smoke`` runs end to end on CPU (a tiny model; the numbers mean nothing): both
engines, the adapters it writes, its checks and its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_lora_suite_smoke_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "lora_suite.py"), "--smoke", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "lora_suite.json").read_text())
    assert result["sections"]["base"]["status"] == "ok" and result["sections"]["lora"]["status"] == "ok"
    assert {"w1_throughput", "w2_throughput", "b1_step"} <= set(result["checks"])
    assert len(list((tmp_path / "adapters").iterdir())) == 8
