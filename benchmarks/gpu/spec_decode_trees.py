"""The trained parity model on the GPU, one engine at a time: plain (asynchronous scheduling, the CUDA default),
plain with synchronous scheduling, and with n-gram speculation (4 drafts); output tokens/s of each of 3 rounds at
batch 1 (the 16 pattern prompts one after another) and 16 (all at once). Run from the root of a tree (it imports the
``inferneo`` and ``tests`` of the current directory), so two trees can be compared in one device call::

    git worktree add scratch/old <commit>
    for t in scratch/old .; do (cd $t && PYTHONPATH=/tmp/site:$PWD python3 $R/benchmarks/gpu/spec_decode_trees.py); done

(``R`` the repository root; a 2-layer model's steps are bound by host work and spread widely between rounds, so
read all three rounds.)
"""

import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path.cwd()
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from parity_fixture import copy_parity_model, pattern_prompts  # noqa: E402

import inferneo  # noqa: E402
from inferneo import LLM, SamplingParams  # noqa: E402

print("inferneo from", Path(inferneo.__file__).parent.parent.name, flush=True)
folder = copy_parity_model(Path(tempfile.mkdtemp()) / "parity-llama")
prompts = pattern_prompts(16, seed=1)
greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
for extra in ({}, {"async_scheduling": False}, {"speculative_config": {"method": "ngram", "num_speculative_tokens": 4}}):
    llm = LLM(str(folder), dtype="bfloat16", max_model_len=256, device="cuda", gpu_memory_utilization=0.2,
              kv_cache_memory="64MiB", **extra)
    llm.generate(prompts, greedy, use_tqdm=False)
    for r in range(3):
        for batch in (1, 16):
            torch.cuda.synchronize()
            t = time.perf_counter()
            if batch == 1:
                outs = [llm.generate([p], greedy, use_tqdm=False)[0] for p in prompts]
            else:
                outs = llm.generate(prompts, greedy, use_tqdm=False)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            print(extra, "round", r, "batch", batch, f"{n / dt:.0f} tok/s", f"steps {llm.engine.core.stats.num_steps}",
                  flush=True)
    del llm
