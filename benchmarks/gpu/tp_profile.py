#!/usr/bin/env python3
"""Where a batch-1 decode step goes at TP=1 and TP=2 (Llama-2-7B, bf16, dummy weights, CUDA graphs, async
scheduling): the kernels of rank 0's GPU over 20 steps from PyTorch's profiler, grouped by kind, against the
wall time per step. An all-reduce that waits for a late peer shows up as a long all-reduce kernel.

``python3 benchmarks/gpu/tp_profile.py --sizes 1,2``; writes ``$OUT/tp_profile.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from inferneo import LLM, SamplingParams  # noqa: E402

KINDS = (("all_reduce", ("nccl", "all_reduce", "allreduce")), ("gemv", ("gemv",)),
         ("cublas_gemm", ("nvjet", "gemm", "cutlass", "splitk")), ("attention", ("decode",)),
         ("rms_norm", ("rms_norm",)), ("rotary", ("rotary",)), ("kv_store", ("store_kv",)),
         ("silu_mul", ("silu",)), ("sampling", ("argmax", "sort", "topk", "softmax", "max")))


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, keys in KINDS:
        if any(k in lowered for k in keys):
            return kind
    return "other"


def profile_size(tp: int, steps: int, use_profiler: bool = True, use_cprofile: bool = False) -> dict:
    llm = LLM("preset:llama-2-7b", load_format="dummy", dtype="bfloat16", device="cuda", tensor_parallel_size=tp,
              max_model_len=2048, max_num_seqs=256, max_num_batched_tokens=8192, gpu_memory_utilization=0.9)
    eng = llm.engine
    rng = np.random.default_rng(0)
    eng.add_request("p", rng.integers(100, 31000, size=1023).tolist(),
                    SamplingParams(temperature=0, max_tokens=4 * steps + 64, ignore_eos=True))
    while any(r.num_output_tokens == 0 for r in eng.scheduler.running) or len(eng.scheduler.waiting):
        eng.step()
    for _ in range(steps):
        eng.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        eng.step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / steps * 1e3
    if use_cprofile:  # the driver's Python, by function, over the same steps
        import cProfile
        import pstats

        prof_py = cProfile.Profile()
        prof_py.enable()
        host = _time_driver(eng, steps)
        prof_py.disable()
        print(f"\n== TP={tp}: driver Python over {steps} steps, by own time", flush=True)
        pstats.Stats(prof_py).sort_stats("tottime").print_stats(22)
    else:
        host = _time_driver(eng, steps)
    by_kind: dict[str, float] = {}
    kernels = []
    events = []
    timeline: dict = {}
    if use_profiler:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                eng.step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        timeline = _timeline(prof, steps)
    for event in events:
        cuda_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if cuda_us <= 0 or event.key.startswith("aten::") or event.key.startswith("cuda"):
            continue
        per_step = cuda_us / steps
        by_kind[kind_of(event.key)] = by_kind.get(kind_of(event.key), 0.0) + per_step
        kernels.append((per_step, event.count / steps, event.key[:90]))
    kernels.sort(reverse=True)
    device_ms = sum(by_kind.values()) / 1e3
    print(f"\n== TP={tp}: wall {wall_ms:.2f} ms/step, rank-0 GPU busy {device_ms:.2f} ms/step; driver host: "
          f"launch {host['launch_ms']:.3f} ms/step (input-buffer wait {host['staging_ms']:.3f}), "
          f"waiting for tokens {host['resolve_ms']:.3f} ms/step, "
          f"the rest of the step {host['other_ms']:.3f} ms/step", flush=True)
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:12s} {us / 1e3:6.3f} ms/step", flush=True)
    if timeline:
        print(f"  timeline: {timeline['kernels_per_step']:.0f} kernels/step, union busy {timeline['busy_ms']:.3f} ms/step,"
              f" idle {timeline['idle_ms']:.3f} ms/step (gaps >= 20 us: {timeline['long_idle_ms']:.3f} ms/step in "
              f"{timeline['long_gaps_per_step']:.1f} gaps; shorter gaps {timeline['short_idle_ms']:.3f} ms/step)",
              flush=True)
    for per_step, count, name in kernels[:24]:
        print(f"    {per_step:8.1f} us/step  {count:5.1f}/step  {name}", flush=True)
    eng.abort_request("p")
    llm.shutdown()
    return {"tp": tp, "wall_ms": wall_ms, "device_busy_ms": device_ms, "by_kind_us": by_kind, "driver_host": host,
            "timeline": timeline,
            "top_kernels": [{"us_per_step": k[0], "calls_per_step": k[1], "name": k[2]} for k in kernels[:30]]}


def _timeline(prof, steps: int) -> dict:
    """Rank 0's GPU timeline over the profiled steps: the union of kernel intervals and the idle gaps between them
    (kernels overlap under programmatic dependent launch, so busy time is the union, not the sum)."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if not spans:
        return {}
    busy = idle = long_idle = 0.0
    long_gaps = 0
    start, end = spans[0]
    for s, e in spans[1:]:
        if s > end:
            busy += end - start
            gap = s - end
            idle += gap
            if gap >= 20:
                long_idle += gap
                long_gaps += 1
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    return {"kernels_per_step": len(spans) / steps, "busy_ms": busy / steps / 1e3, "idle_ms": idle / steps / 1e3,
            "long_idle_ms": long_idle / steps / 1e3, "short_idle_ms": (idle - long_idle) / steps / 1e3,
            "long_gaps_per_step": long_gaps / steps}


def _time_driver(eng, steps: int) -> dict:
    """Host time per step on the driver: inside ``launch``, waiting in ``resolve``, and the rest of ``step``."""
    from inferneo.worker import model_runner

    driver = getattr(eng.runner, "driver", eng.runner)
    totals = {"launch": 0.0, "resolve": 0.0, "staging": 0.0}
    launch, resolve, host = driver.launch, model_runner.InFlightStep.resolve, driver._inputs.host

    def timed(key: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[key] += time.perf_counter() - start
        return wrapper

    driver.launch = timed("launch", launch)
    driver._inputs.host = timed("staging", host)
    model_runner.InFlightStep.resolve = timed("resolve", resolve)  # a plain function: ``self`` passes through
    try:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
        total = time.perf_counter() - start
    finally:
        del driver.launch
        del driver._inputs.host
        model_runner.InFlightStep.resolve = resolve
    return {"launch_ms": totals["launch"] / steps * 1e3, "resolve_ms": totals["resolve"] / steps * 1e3,
            "staging_ms": totals["staging"] / steps * 1e3,
            "other_ms": (total - totals["launch"] - totals["resolve"]) / steps * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,2")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cprofile", action="store_true", help="also profile the driver's Python (cProfile)")
    parser.add_argument("--no-profiler", action="store_true",
                        help="time the host only (a worker's INFERNEO_TP_TIMING figures then cover no profiled step)")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    results = [profile_size(int(tp), args.steps, not args.no_profiler, args.cprofile) for tp in args.sizes.split(",")]
    out = Path(os.environ.get("OUT", "/tmp")) / "tp_profile.json"
    out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
