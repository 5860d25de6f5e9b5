#!/usr/bin/env python3
"""GGUF on CUDA under ``--dtype auto``: a tiny Llama's Q4_1 and Q8_0 files (embedding included) start with CUDA
graphs, run in bfloat16 (a file kept in quantized blocks counts as a 16-bit checkpoint), and generate; their greedy
tokens are set beside the same files in float32 (tokens before each prompt's first difference; random tiny
weights leave many near-ties, so this is a record, not a pass mark).

    python3 benchmarks/gpu/gguf_auto_dtype_check.py --out DIR      # writes DIR/gguf_auto_dtype.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from inferneo import LLM, SamplingParams
from inferneo.testing.tiny_models import make_tiny_checkpoint, make_tiny_gguf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gguf_auto_dtype_check.py checks the CUDA path: no CUDA device here")
    tmp = Path(tempfile.mkdtemp())
    source = make_tiny_checkpoint(tmp / "hf", "llama", hidden_size=256)
    prompts = [[5 + i, 17, 33 + 2 * i, 90, 7 * i + 3] for i in range(16)]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    results = {}
    for file_type in ("Q4_1", "Q8_0"):
        path = make_tiny_gguf(source, tmp / f"tiny-{file_type}.gguf", dtype=file_type)
        auto = LLM(str(path), device="cuda")
        dtypes = {str(p.dtype) for p in auto.engine.runner.model.parameters() if p.is_floating_point()}
        tokens = [o.outputs[0].token_ids for o in auto.generate(prompts, greedy, use_tqdm=False)]
        del auto
        torch.cuda.empty_cache()
        full = [o.outputs[0].token_ids for o in
                LLM(str(path), device="cuda", dtype="float32").generate(prompts, greedy, use_tqdm=False)]
        agree = sum(next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(x))
                    for x, y in zip(tokens, full, strict=True))
        results[file_type] = {"auto_dtypes": sorted(dtypes), "tokens": sum(map(len, full)), "prefix_agree": agree}
        print(file_type, results[file_type], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gguf_auto_dtype.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
