"""Prints the ``--ab`` arguments of ``quant_suite.py`` for an in-engine sweep of the W4A16 one-row launches
(Llama-2-7B's four shapes, W4A16 + FP8 KV at batch 1): one field of one shape's launch changed at a time through
``INFERNEO_W4A16_CONFIGS``, the shipped launches measured between them (the tuned table came from standalone
timings of each launch, not from the step's chain of launches under programmatic dependent launch).
Usage: ``python benchmarks/gpu/w4a16_b1_launch_sweep.py`` (see ``w4a16_b1_launch_sweep_run.sh``)."""

from __future__ import annotations

import json
import shlex

STAGES = [{"num_stages": 1}, {"num_stages": 3}]
# the shapes tuned to 4 rows, 256 words and 2 warps a program: more and fewer rows, warps, words with warps
NARROW = [{"block_n": 8}, {"block_n": 2}, {"num_warps": 4}, {"num_warps": 1}, {"block_kw": 512, "num_warps": 4},
          {"block_kw": 128, "num_warps": 1}, *STAGES]
# the shapes tuned to 8 rows, 512 words and 4 warps; the sixth change differs by shape
WIDE = [{"block_n": 4}, {"block_n": 16}, {"num_warps": 8}, {"num_warps": 2}, {"block_kw": 256, "num_warps": 2}]
SHAPES = {  # label -> (table key, changes from the tuned launch)
    "qkv": ("linear,1,12288,4096,128", NARROW),
    "gateup": ("linear,1,22016,4096,128", NARROW),
    "down": ("linear,1,4096,11008,128", [*WIDE, {"block_kw": 32, "num_warps": 1}, *STAGES]),
    "o": ("linear,1,4096,4096,128", [*WIDE, {"block_n": 4, "num_warps": 2}, *STAGES]),
}
BASE = "w4a16+fp8kv"


def ab_args() -> list[str]:
    args = []
    for i, (label, (key, changes)) in enumerate(SHAPES.items()):
        for change in changes:
            name = label + "-" + "-".join(f"{k.replace('num_', '').replace('block_', '')}{v}" for k, v in change.items())
            args += ["--ab", f"{name}@{BASE}@INFERNEO_W4A16_CONFIGS={json.dumps({key: change}, separators=(',', ':'))}"]
        args += ["--ab", f"shipped-{i + 1}@{BASE}"]
    return args


if __name__ == "__main__":
    print(" ".join(shlex.quote(a) for a in ab_args()))
