#!/usr/bin/env python3
"""Multi-LoRA serving on one GPU against the base model, in one run (issue 22).

The Llama-2-7B architecture (``preset:llama-2-7b``) with dummy weights, bf16, and 8 LoRA adapters of rank 16 on
all seven projections (q/k/v/o/gate/up/down), written as PEFT folders with random weights into ``--out``:

  1. ceilings: device copy bandwidth and bf16 matmul rate;
  2. ``base``: the engine without LoRA: the decode step at batch 1 and 32 (1024 tokens of context, CUDA graphs),
     then W1 (256 x 1024 -> 128) and W2 (256 x 128 -> 1024) output tok/s;
  3. ``lora``: the engine with ``enable_lora`` (8 slots, rank 16): the same, with the requests spread evenly over
     the 8 adapters (a batch-1 step runs one adapter);
  4. checks: W1/W2 throughput ``lora / base >= 0.8``, batch-1 step ``lora / base <= 1.2``;
  5. with ``--compare-batched-rows``, the LoRA engine once more with ``INFERNEO_LORA_FUSED_ROWS=0`` (one-row steps
     through the batched shrink/expand kernels and the plain MLP, as before the fused row path): decode steps only.

Writes ``lora_suite.json`` and ``lora_suite.log`` to ``--out`` (default ``$OUT``). ``--smoke`` runs a tiny model
on CPU (the numbers mean nothing; it checks the script).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

from floors import timed  # noqa: E402
from h100_suite import Suite, free_memory, run_workloads, sec_ceilings, sec_inferneo_workload, step_latency  # noqa: E402
from quant_suite import SMOKE_CONFIG  # noqa: E402  (the same tiny smoke model)

from inferneo import LLM, LoRARequest  # noqa: E402
from inferneo.model_executor import arch_presets  # noqa: E402
from inferneo.model_executor.arch_presets import preset_config  # noqa: E402
from inferneo.testing.lora_adapters import write_lora_adapter  # noqa: E402

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FULL = dict(
    preset="llama-2-7b", device="cuda", deadline=560.0, num_adapters=8, rank=16,
    w1=(256, 1024, 128), w2=(256, 128, 1024), decode_batches=(1, 32), decode_ctx=1024, decode_steps=32,
    engine=dict(max_model_len=2048, max_num_seqs=256, max_num_batched_tokens=8192, gpu_memory_utilization=0.9),
)
SMOKE = dict(
    FULL, preset="smoke-llama", device="cpu", deadline=400.0,
    w1=(8, 32, 4), w2=(8, 8, 16), decode_batches=(1, 4), decode_ctx=32, decode_steps=3,
    engine=dict(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=256, kv_cache_memory=32 * 2**20),
)


def write_adapters(s: Suite) -> list[LoRARequest]:
    """``num_adapters`` PEFT folders of rank ``rank`` on all projections, random weights (seeded)."""
    config = preset_config(s.cfg["preset"])
    root = Path(s.out_dir) / "adapters"
    adapters = []
    for i in range(s.cfg["num_adapters"]):
        path, seconds = timed(lambda i=i: write_lora_adapter(config, root / f"lora{i}", r=s.cfg["rank"],
                                                             target_modules=ALL_PROJECTIONS, seed=i))
        adapters.append(LoRARequest(f"lora{i}", i + 1, str(path)))
    s.log(f"wrote {len(adapters)} adapters of rank {s.cfg['rank']} on {', '.join(ALL_PROJECTIONS)} in {root}")
    return adapters


def sec_engine(s: Suite, label: str, adapters: list[LoRARequest] | None, workloads: tuple[str, ...]) -> dict:
    """The decode steps and ``workloads`` (of W1/W2) of one engine: without LoRA (``adapters`` None) or with the
    requests spread over ``adapters``."""
    kw = dict(s.cfg["engine"])
    if adapters:
        kw.update(enable_lora=True, max_loras=len(adapters), max_lora_rank=s.cfg["rank"])
    llm, seconds = timed(lambda: LLM(f"preset:{s.cfg['preset']}", load_format="dummy", dtype="bfloat16",
                                     device=s.cfg["device"], **kw))
    eng = llm.engine
    s.log(f"{label}: engine ready in {seconds:.1f} s, KV {eng.kv_capacity_tokens} tokens, graph buckets "
          f"{eng.runner.decode_buckets[-1:] or 'none'}")
    refs = [a.to_ref() for a in adapters] if adapters else None
    out: dict = {"engine": {"build_s": seconds, "kv_tokens": eng.kv_capacity_tokens, **kw}, "decode": []}
    try:
        step_latency(llm, s, 2, 32, 2, refs)  # warm-up (and pages the adapters in)
        for batch in s.cfg["decode_batches"]:
            row = step_latency(llm, s, batch, s.cfg["decode_ctx"], s.cfg["decode_steps"], refs)
            out["decode"].append(row)
            s.log(f"{label} decode batch {batch:3d} ({row['running']} running) ctx {row['context']:.0f}: "
                  f"{row['step_ms']:.2f} ms/step")
        s.write()
        if not workloads:
            return out

        def workload(s_: Suite, llm_: LLM, name: str) -> dict:
            return sec_inferneo_workload(s_, llm_, name, loras=adapters)

        run_workloads(s, llm, out, workloads, workload, min_left=45)
    finally:
        llm.shutdown()
        del llm
        free_memory()
    return out


def summarize(s: Suite) -> None:
    r = s.results["sections"]

    def step(label: str, batch: int) -> float | None:
        rows = (r.get(label) or {}).get("decode") or []
        return next((row["step_ms"] for row in rows if row["batch"] == batch), None)

    def tps(label: str, name: str) -> float | None:
        return ((r.get(label) or {}).get(name) or {}).get("output_tok_per_s")

    checks = {}
    for name in ("w1", "w2"):
        base, lora = tps("base", name), tps("lora", name)
        if base and lora:
            checks[f"{name}_throughput"] = {"ratio": lora / base, "need": ">= 0.8", "pass": lora / base >= 0.8}
    for batch in s.cfg["decode_batches"]:
        base, lora = step("base", batch), step("lora", batch)
        if base and lora:
            need = 1.2 if batch == 1 else None
            checks[f"b{batch}_step"] = {"ratio": lora / base, "need": f"<= {need}" if need else "recorded",
                                        "pass": lora / base <= need if need else None}
        batched = step("lora_batched_rows", batch)
        if base and batched:
            checks[f"b{batch}_step_batched_rows"] = {"ratio": batched / base, "need": "recorded", "pass": None}
    s.results["checks"] = checks
    s.log("=" * 100)
    for key, c in checks.items():
        verdict = "" if c["pass"] is None else (": PASS" if c["pass"] else ": FAIL")
        s.log(f"  {key}: lora/base {c['ratio']:.2f} (need {c['need']}){verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(HERE.parent / "results"))
    parser.add_argument("--smoke", action="store_true", help="a tiny model on CPU, to check the script")
    parser.add_argument("--deadline", type=float, default=None)
    parser.add_argument("--workloads", default="w1,w2", help="of w1,w2, comma-separated ('' for none)")
    parser.add_argument("--compare-batched-rows", action="store_true",
                        help="also the LoRA engine's decode steps with INFERNEO_LORA_FUSED_ROWS=0")
    args = parser.parse_args()
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.deadline:
        cfg["deadline"] = args.deadline
    s = Suite(Path(args.out), cfg, name="lora_suite")
    if args.smoke:
        arch_presets.PRESETS["smoke-llama"] = preset_config("llama-2-7b", **SMOKE_CONFIG)
    s.section("ceilings", lambda: sec_ceilings(s))
    adapters = write_adapters(s)
    workloads = tuple(name for name in args.workloads.split(",") if name)
    need = 30 + 45 * len(workloads)  # an engine's build and decode steps, and each workload (120 s for both)
    s.section("base", lambda: sec_engine(s, "base", None, workloads), min_left=need)
    s.section("lora", lambda: sec_engine(s, "lora", adapters, workloads), min_left=need)
    if args.compare_batched_rows:
        os.environ["INFERNEO_LORA_FUSED_ROWS"] = "0"
        s.section("lora_batched_rows", lambda: sec_engine(s, "lora_batched_rows", adapters, ()), min_left=25)
        del os.environ["INFERNEO_LORA_FUSED_ROWS"]
    summarize(s)
    print(f"results: {s.write()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
