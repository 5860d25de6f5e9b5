#!/usr/bin/env python3
"""Tensor parallelism on a 2-GPU machine: greedy equality TP=2 vs TP=1, and the batch-1 decode step at both sizes.

1. A random Llama checkpoint (float32, 4 layers, hidden 512) through the whole engine at TP=1 and TP=2: greedy
   tokens of 16 prompts x 32 tokens must be equal.
2. Llama-2-7B architecture, bf16, dummy weights: mean decode step at batch 1 with 1024 tokens of context, CUDA
   graphs on, at TP=1 and TP=2 (target: TP=2 below 0.65x TP=1).

Usage on the device: ``python3 benchmarks/gpu/tp_check.py`` (writes ``$OUT/tp_check.json`` when OUT is set).
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from inferneo import LLM, SamplingParams  # noqa: E402

RESULTS: dict = {}
rng = np.random.default_rng(0)


def log(*parts) -> None:
    print(*parts, flush=True)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def equality() -> dict:
    from inferneo.testing import make_tiny_checkpoint

    path = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tp", "llama", vocab_size=4096, hidden_size=512,
                                num_layers=4, num_heads=8, num_kv_heads=4)
    prompts = [rng.integers(3, 4000, size=int(n)).tolist() for n in rng.integers(8, 100, size=16)]
    out = {}
    for tp in (1, 2):
        llm = LLM(str(path), dtype="float32", device="cuda", tensor_parallel_size=tp, max_model_len=512,
                  kv_cache_memory=2**30, max_num_seqs=32)
        log(f"  TP={tp}: engine built")
        out[tp] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy(32), use_tqdm=False)]
        log(f"  TP={tp}: generated; shutting down")
        llm.shutdown()
        log(f"  TP={tp}: shut down")
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    equal = out[1] == out[2]
    matches = [next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), 32)
               for x, y in zip(out[1], out[2], strict=True)]
    log(f"TP=2 vs TP=1 greedy (fp32, 16 prompts x 32 tokens): {'EQUAL' if equal else 'DIFFERENT'}; match {matches}")
    return {"equal": equal, "match_lengths": matches}


def decode_step(tp: int) -> dict:
    llm = LLM("preset:llama-2-7b", load_format="dummy", dtype="bfloat16", device="cuda", tensor_parallel_size=tp,
              max_model_len=2048, max_num_seqs=64, gpu_memory_utilization=0.9)
    eng = llm.engine
    eng.add_request("w3", rng.integers(3, 31000, size=1023).tolist(), greedy(80))
    while any(r.num_output_tokens == 0 for r in eng.scheduler.running) or len(eng.scheduler.waiting):
        eng.step()
    for _ in range(4):
        eng.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(32):
        eng.step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / 32 * 1e3
    log(f"decode step batch 1, context ~1040, TP={tp}: {ms:.2f} ms")
    eng.abort_request("w3")
    llm.shutdown()
    del llm, eng
    gc.collect()
    torch.cuda.empty_cache()
    return {"tp": tp, "step_ms": ms}


def main() -> int:
    # The first 2-GPU run stalled without a word: print every thread's stack if this one stalls too.
    faulthandler.dump_traceback_later(int(os.environ.get("TP_CHECK_STALL_S", "240")), exit=True)
    log(torch.cuda.get_device_name(), "x", torch.cuda.device_count(), torch.__version__,
        "NCCL_NVLS_ENABLE=", os.environ.get("NCCL_NVLS_ENABLE"))
    for name, fn in (("equality", equality), ("tp1", lambda: decode_step(1)), ("tp2", lambda: decode_step(2))):
        t = time.perf_counter()
        try:
            RESULTS[name] = fn()
        except Exception as exc:
            RESULTS[name] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        log(f"-- {name}: {time.perf_counter() - t:.1f} s")
    if "step_ms" in RESULTS.get("tp1", {}) and "step_ms" in RESULTS.get("tp2", {}):
        ratio = RESULTS["tp2"]["step_ms"] / RESULTS["tp1"]["step_ms"]
        RESULTS["ratio"] = ratio
        log(f"batch-1 decode step TP=2 / TP=1 = {ratio:.2f} (target < 0.65)")
    out = os.environ.get("OUT")
    if out:
        Path(out, "tp_check.json").write_text(json.dumps(RESULTS, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
