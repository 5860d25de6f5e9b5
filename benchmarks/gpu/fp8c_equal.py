#!/usr/bin/env python3
"""Greedy token ids of the Llama-2-7B shape (dummy weights, FP8 weights + FP8 KV cache, CUDA graphs) with
``INFERNEO_PDL_EARLY_EXTRA=none`` and with its default (``norm,store``): two engines, one after the other, the same
prompts alone (batch-1 graphs) and together (batch 4); equal ids expected (the switch only moves launches).

    python benchmarks/gpu/fp8c_equal.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

from h100_suite import free_memory, greedy  # noqa: E402

from inferneo import LLM  # noqa: E402
from inferneo.model_executor.arch_presets import materialize_preset  # noqa: E402


def run(folder: str, value: str | None) -> list[list[int]]:
    if value is None:
        os.environ.pop("INFERNEO_PDL_EARLY_EXTRA", None)
    else:
        os.environ["INFERNEO_PDL_EARLY_EXTRA"] = value
    llm = LLM(folder, load_format="dummy", dtype="bfloat16", device="cuda", quantization="fp8",
              kv_cache_dtype="fp8", max_model_len=2048, max_num_seqs=8, gpu_memory_utilization=0.5)
    prompts = [[(7 * i + 13 * j) % 31000 + 1 for j in range(300 + 50 * i)] for i in range(4)]
    ids = [llm.generate([p], greedy(40), use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    ids += [o.outputs[0].token_ids for o in llm.generate(prompts, greedy(40), use_tqdm=False)]
    llm.shutdown()
    del llm
    free_memory()
    return [list(x) for x in ids]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    folder = str(materialize_preset("llama-2-7b", Path("/tmp/fp8c_equal_model")))
    base, new = run(folder, "none"), run(folder, None)
    equal = base == new
    print(f"early launches (norm,store) against none: greedy ids equal: {equal} "
          f"({sum(a == b for a, b in zip(base, new, strict=True))}/{len(base)} sequences of 40)")
    Path(args.out, "fp8c_equal.json").write_text(json.dumps({"equal": equal, "none": base, "default": new}))
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
