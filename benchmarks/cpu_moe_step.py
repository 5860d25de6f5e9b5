"""CPU cost of one mixture-of-experts block (``fused_experts``) and of a tiny MoE model's decode step.

``python benchmarks/cpu_moe_step.py`` times, on this machine's CPU threads:

1. the routed-experts computation alone for a few layer shapes (the tiny test checkpoint's, and a Qwen3-MoE layer
   shrunk to about 150M parameters for the whole model) at 1, 4, 32 and 256 tokens, float32 and bfloat16;
2. a whole engine decode step of the tiny ``qwen3_moe`` checkpoint at batch 1 and 8.

Prints one JSON line per figure (median of repeated runs, microseconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inferneo.model_executor.layers.moe import fused_experts  # noqa: E402
from inferneo.model_executor.layers.moe_routing import softmax_topk_renormalized  # noqa: E402

SHAPES = {  # name: (experts, top_k, hidden, expert width)
    "tiny-test": (8, 2, 64, 32),
    "qwen3-moe-150m": (32, 4, 512, 256),
}


def median_us(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def layer_figures(repeats: int) -> None:
    torch.manual_seed(0)
    for name, (experts, top_k, hidden, inter) in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            w13 = (torch.randn(experts, 2 * inter, hidden) * 0.05).to(dtype)
            w2 = (torch.randn(experts, hidden, inter) * 0.05).to(dtype)
            for tokens in (1, 4, 32, 256):
                x = torch.randn(tokens, hidden).to(dtype)
                routed = softmax_topk_renormalized(torch.randn(tokens, experts), top_k)
                us = median_us(lambda: fused_experts(x, w13, w2, routed.weights, routed.ids), repeats)  # noqa: B023
                print(json.dumps({"what": "fused_experts", "shape": name, "dtype": str(dtype)[6:], "tokens": tokens,
                                  "us": round(us, 1)}), flush=True)


def model_figures(steps: int) -> None:
    from inferneo import LLM, SamplingParams
    from inferneo.testing.tiny_models import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(Path(tmp) / "qwen3_moe", "qwen3_moe")
        llm = LLM(str(path), dtype="float32", max_model_len=512, kv_cache_memory="32MiB", num_threads=1)
        for batch in (1, 8):
            prompts = [[5 + i, 17, 33, 2, 9, 100] for i in range(batch)]
            params = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True)
            llm.generate(prompts, params, use_tqdm=False)  # warm-up
            start = time.perf_counter()
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
            base = time.perf_counter() - start
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            total = time.perf_counter() - start
            print(json.dumps({"what": "engine decode step", "model": "tiny qwen3_moe", "batch": batch,
                              "us": round((total - base) / steps * 1e6, 1)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layer_figures(args.repeats)
    model_figures(args.steps)


if __name__ == "__main__":
    main()
