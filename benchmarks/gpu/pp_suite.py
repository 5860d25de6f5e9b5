#!/usr/bin/env python3
"""Pipeline parallelism on a machine of several GPUs: equality and timings in one run (issue 24).

Layouts are ``TPxPP`` (tensor-parallel size x pipeline stages; ``2x1`` is TP=2, ``1x2`` is PP=2). Sections (each
timed and in its own try/except; results written after every one):
  1. equality: a small random Llama (float32) through the whole engine, greedy tokens at 1x1 and at each layout
     with more than one stage, twice (the second run hits the prefix cache), in small chunks (chunked prefill);
  2. for each layout: build ``preset:MODEL`` (bf16, dummy weights), then
     - W3: decode step time at batch 1 and 32 with 1024 tokens of context;
     - W1: 256 prompts x 1024 random tokens -> 128 tokens, ``ignore_eos``;
  3. summary: W1 throughput and W3 step time of each layout over the first layout's.

The engine keeps P steps in flight at P stages (each on its own requests), so W1's 256 requests fill the stages;
a single request still crosses the stages one after the other. These numbers show what PP costs or gains against
TP on the same GPUs (PP runs eagerly, without CUDA graphs, for now).

On a 2-GPU machine (Llama-2-7B):  ``python3 benchmarks/gpu/pp_suite.py --layouts 1x1,2x1,1x2``
on a 4-GPU machine (Llama-2-70B): ``python3 benchmarks/gpu/pp_suite.py --model llama-2-70b --layouts 4x1,2x2``
``--smoke`` runs it on CPU over gloo with a tiny preset (numbers mean nothing; it checks the script).
Writes ``pp_suite.json`` and ``pp_suite.log`` to ``--out`` (default ``$OUT``, else benchmarks/results).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import torch  # noqa: E402
from floors import timed  # noqa: E402
from h100_suite import Suite, free_memory, generate_ids, match_lengths, step_latency  # noqa: E402
from tp_suite import device_names, smoke_preset  # noqa: E402

from inferneo import LLM  # noqa: E402

FULL = dict(device="cuda", deadline=560.0, w1=(256, 1024, 128), w3_batches=(1, 32), w3_ctx=1024, w3_steps=32,
            equality=(16, 24), engine=dict(max_model_len=2048, max_num_seqs=256, max_num_batched_tokens=8192,
                                           gpu_memory_utilization=0.92),
            tiny=dict(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4, vocab_size=4096),
            equality_engine=dict(max_model_len=512, kv_cache_memory=2**28, max_num_seqs=32,
                                 max_num_batched_tokens=64))
SMOKE = dict(FULL, device="cpu", deadline=900.0, w1=(4, 48, 4), w3_batches=(1,), w3_ctx=48, w3_steps=3,
             equality=(4, 4), engine=dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=256,
                                          kv_cache_memory=32 * 2**20, num_threads=1),
             tiny=dict(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, vocab_size=384),
             equality_engine=dict(max_model_len=256, kv_cache_memory=2**24, max_num_seqs=8, max_num_batched_tokens=16,
                                  num_threads=1))


def parse_layout(text: str) -> tuple[int, int]:
    """``"2x2"`` -> (tensor-parallel size, pipeline stages)."""
    tp, _, pp = text.partition("x")
    return int(tp), int(pp or 1)


def label(layout: tuple[int, int]) -> str:
    return f"tp{layout[0]}xpp{layout[1]}"


def sec_equality(s: Suite, layouts: list[tuple[int, int]]) -> dict:
    """Greedy tokens of a small random fp32 Llama at each pipelined layout equal one GPU's, twice over."""
    from inferneo.testing import make_tiny_checkpoint

    t = s.cfg["tiny"]
    path = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "pp-tiny", "llama", vocab_size=t["vocab_size"],
                                hidden_size=t["hidden_size"], num_layers=t["num_layers"], num_heads=t["num_heads"],
                                num_kv_heads=t["num_kv_heads"])
    n, tokens = s.cfg["equality"]
    shared = s.rng.integers(3, t["vocab_size"] - 10, size=20).tolist()  # a common prefix: later prompts hit it
    prompts = [shared + s.rng.integers(3, t["vocab_size"] - 10, size=int(k)).tolist()
               for k in s.rng.integers(4, 80, size=n)]
    result = {}
    reference = None
    for layout in [(1, 1), *[lay for lay in layouts if lay[1] > 1]]:
        llm = LLM(str(path), dtype="float32", device=s.cfg["device"], tensor_parallel_size=layout[0],
                  pipeline_parallel_size=layout[1], **s.cfg["equality_engine"])
        try:
            runs = [generate_ids(llm, prompts, tokens) for _ in range(2)]
        finally:
            llm.shutdown()
        del llm
        free_memory()
        if reference is None:
            reference = runs[0]
            continue
        equal = runs[0] == reference and runs[1] == reference
        result[label(layout)] = {"equal": equal, "match_lengths": match_lengths(reference, runs[1])}
        s.log(f"{label(layout)} vs one GPU greedy (fp32, {n} prompts x {tokens} tokens, run twice): "
              f"{'EQUAL' if equal else 'DIFFERENT'}; second-run match lengths {result[label(layout)]['match_lengths']}")
    return result


def sec_w3(s: Suite, llm: LLM, layout: tuple[int, int]) -> dict:
    step_latency(llm, s, 2, 32, 2)  # warm-up
    rows = []
    for batch in s.cfg["w3_batches"]:
        row = step_latency(llm, s, batch, s.cfg["w3_ctx"], s.cfg["w3_steps"])
        rows.append(row)
        s.log(f"W3 {label(layout)} batch {batch}: {row['step_ms']:.2f} ms/step ({row['running']} running)")
    return {"rows": rows}


def sec_w1(s: Suite, llm: LLM, layout: tuple[int, int]) -> dict:
    n, plen, olen = s.cfg["w1"]
    vocab = llm.engine.vocab_size
    generate_ids(llm, s.prompts(2, plen, vocab), 4)  # warm-up at this prompt length
    prompts = s.prompts(n, plen, vocab)
    outputs, seconds = timed(lambda: generate_ids(llm, prompts, olen))
    produced = sum(len(o) for o in outputs)
    s.log(f"W1 {label(layout)}: {n} prompts x {plen} -> {olen}: {seconds:.1f} s, {produced / seconds:.0f} output tok/s")
    return {"seconds": seconds, "output_tokens": produced, "output_tok_per_s": produced / seconds}


def run_layout(s: Suite, model: str, layout: tuple[int, int]) -> None:
    holder: dict = {}

    def build() -> dict:
        llm, seconds = timed(lambda: LLM(f"preset:{model}", load_format="dummy", dtype="bfloat16",
                                         device=s.cfg["device"], tensor_parallel_size=layout[0],
                                         pipeline_parallel_size=layout[1], **s.cfg["engine"]))
        holder["llm"] = llm
        s.log(f"{label(layout)}: engine ready in {seconds:.1f} s, KV {llm.engine.kv_cache.num_blocks} blocks")
        return {"ready_s": seconds, "kv_blocks": llm.engine.kv_cache.num_blocks}

    s.section(f"engine_{label(layout)}", build, min_left=90)
    if "llm" not in holder:
        return
    llm = holder.pop("llm")
    try:
        s.section(f"w3_{label(layout)}", lambda: sec_w3(s, llm, layout), min_left=40)
        s.section(f"w1_{label(layout)}", lambda: sec_w1(s, llm, layout), min_left=40)
    finally:
        llm.shutdown()
        free_memory()


def summarize(s: Suite, layouts: list[tuple[int, int]]) -> None:
    sec = s.results["sections"]
    base = label(layouts[0])
    s.log("\n== summary")
    for layout in layouts:
        name = label(layout)
        w1 = sec.get(f"w1_{name}", {}).get("output_tok_per_s")
        base_w1 = sec.get(f"w1_{base}", {}).get("output_tok_per_s")
        if w1 and base_w1:
            s.results.setdefault("ratios", {})[f"w1_{name}_over_{base}"] = w1 / base_w1
            s.log(f"  W1 {name}: {w1:.0f} output tok/s ({w1 / base_w1:.2f}x {base})")
        steps = {row["batch"]: row["step_ms"] for row in sec.get(f"w3_{name}", {}).get("rows", [])}
        base_steps = {row["batch"]: row["step_ms"] for row in sec.get(f"w3_{base}", {}).get("rows", [])}
        for batch, ms in steps.items():
            if batch in base_steps:
                s.log(f"  W3 {name} batch {batch}: {ms:.2f} ms/step ({ms / base_steps[batch]:.2f}x {base})")
    for name, entry in sec.items():
        s.log(f"  {name:<22} {entry.get('status', '?')[:70]:<72} {entry.get('elapsed_s', '-')} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-2-7b", help="architecture preset (dummy weights)")
    parser.add_argument("--layouts", default="1x1,2x1,1x2", help="TPxPP layouts, comma-separated; the first is "
                        "the baseline of the summary's ratios")
    parser.add_argument("--no-equality", action="store_true", help="skip the small fp32 equality check")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(HERE.parent / "results"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU over gloo, to check the script")
    parser.add_argument("--deadline", type=float, help="seconds the whole run may take (sections skip past it)")
    args = parser.parse_args()
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.deadline:
        cfg["deadline"] = args.deadline
    layouts = [parse_layout(x) for x in args.layouts.split(",")]
    model = smoke_preset(num_layers=3) if args.smoke else args.model
    s = Suite(Path(args.out), cfg, name="pp_suite")
    devices = device_names()
    s.log(f"inferneo PP suite: model {model}, layouts {args.layouts}, torch {torch.__version__}, {devices}")
    s.results.update(model=model, layouts=args.layouts, devices=devices, torch=torch.__version__,
                     started=time.strftime("%Y-%m-%d %H:%M:%S"))
    if not args.no_equality and any(pp > 1 for _, pp in layouts):
        s.section("equality", lambda: sec_equality(s, layouts), min_left=60)
    for layout in layouts:
        run_layout(s, model, layout)
    summarize(s, layouts)
    s.write()
    failed = [name for name, entry in s.results["sections"].items() if entry.get("status", "ok") != "ok"]
    unequal = [name for name, entry in s.results["sections"].get("equality", {}).items()
               if isinstance(entry, dict) and not entry.get("equal", True)]
    return 1 if failed or unequal else 0


if __name__ == "__main__":
    sys.exit(main())
