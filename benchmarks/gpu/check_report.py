"""The common frame of the GPU check scripts that test kernels first and a tiny engine after: one JSON line per case
(each with its ``ok``), ``--out FILE.jsonl`` to keep them, and a last line ``<TITLE> ok`` or ``<TITLE> FAILED``."""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path


def run_checks(title: str, kernels: Callable[[], list[dict]], engine: Callable[[str], dict]) -> int:
    """Run ``kernels()`` then ``engine(tmp)`` (a temporary folder), printing each line as it comes; returns the exit
    status (0 when every line is ok)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lines = kernels()
    for line in lines:
        print(json.dumps(line), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        lines.append(engine(tmp))
        print(json.dumps(lines[-1]), flush=True)
    ok = all(line["ok"] for line in lines)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(x) + "\n" for x in lines))
    print(f"{title} ok" if ok else f"{title} FAILED", flush=True)
    return 0 if ok else 1
