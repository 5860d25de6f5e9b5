#!/usr/bin/env python3
"""The decode attention kernel's launch at many requests, swept (issue 20's batch-32 step and W2): tokens a tile,
warps, pipeline stages and splits of the context, for the bf16 cache and the FP8 (e4m3) cache (``--caches``:
which, and the FP8 widenings), at Llama-2-7B's attention shape (32 query and 32 KV heads of 128, block size 16, tables 2,048 tokens
wide as the suites' ``max_model_len`` gives them).

Why: at 32 requests of 1,040 tokens the FP8 kernel reads its bytes at 1.36x the copy bandwidth's time on an H100
(bf16: 1.05x; docs/benchmarks.md, 2026-12-05). Compiled offline for sm_90a, the default launch (64-token tiles,
4 warps) holds 96 registers and 39 KB of shared memory a program: 5 programs a multiprocessor, so the 1,024
programs of 32 requests x 32 heads run in 1.55 waves. Smaller tiles and fewer warps fit 8 a multiprocessor (one
wave); splits give more, shorter programs.

Each launch is checked against the default launch's output on the same inputs (relative error < 1e-2), then
timed by ``triton.testing.do_bench`` (median, L2 flushed). Writes ``$OUT/decode_launch_sweep.jsonl``, and to
``$OUT/best_launch.txt`` a line ``SHAPE CACHE WIDEN KNOB SPEEDUP`` for each case a launch beat the default in
(``KNOB``: the ``INFERNEO_DECODE_LAUNCH`` value of that launch, for a same-call ``quant_suite.py --ab``).

    python benchmarks/gpu/decode_launch_sweep.py [--out DIR] [--shapes 32x1040,200x640] [--caches bf16:0,fp8:0]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

import torch  # noqa: E402
import triton  # noqa: E402
from fp8kv_decode_bench import _cache  # noqa: E402

from inferneo import envs  # noqa: E402
from inferneo.attention.fp8_kv import FP8_KV_DTYPE, KVCacheScales  # noqa: E402
from inferneo.kernels import triton_attention as ops  # noqa: E402

HEADS, DIM = 32, 128
LAUNCHES = [dict(block_n=bn, num_warps=w, num_stages=st, num_splits=sp)
            for bn, w, st, sp in [*itertools.product((32, 64), (2, 4), (2,), (1, 2)),
                                  (64, 4, 3, 1), (32, 4, 3, 1), (32, 2, 3, 1)]]


def sweep(batch: int, context: int, caches_wanted: list[tuple[str, int]], out) -> None:
    device = torch.device("cuda")
    tables, base = _cache(batch, context, 2048, HEADS, DIM, device=device)
    lens = torch.full((batch,), context, dtype=torch.int64, device=device)
    q = torch.randn(batch, HEADS, DIM, device=device, dtype=torch.bfloat16)
    scales = KVCacheScales.ones(HEADS, device)
    caches = {"bf16": base.to(torch.bfloat16), "fp8": base.to(FP8_KV_DTYPE)}
    del base
    for name, widen in caches_wanted:
        cache = caches[name]
        kv = scales if name == "fp8" else None
        extra = {"fp8_widen": widen} if name == "fp8" else {}
        nbytes = batch * context * 2 * HEADS * DIM * cache.element_size()

        def run(y, launch, cache=cache, kv=kv, extra=extra):
            ops.paged_decode(q, cache, tables, lens, DIM**-0.5, y, kv_scales=kv, **extra, **launch)

        ref, y_default = torch.empty_like(q), torch.empty_like(q)
        run(ref, {})
        default_us = triton.testing.do_bench(lambda y=y_default: run(y, {}), warmup=25, rep=100) * 1000
        rows = []
        for launch in LAUNCHES:
            y = torch.empty_like(q)
            try:
                run(y, launch)
                err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                us = triton.testing.do_bench(lambda y=y, launch=launch: run(y, launch), warmup=25, rep=100) * 1000
            except Exception as exc:  # noqa: BLE001 (a launch that does not fit: recorded, the sweep goes on)
                rows.append(dict(launch, error=f"{type(exc).__name__}: {exc}"[:200]))
                continue
            rows.append(dict(launch, us=round(us, 2), rel_err=round(err, 6), tbps=round(nbytes / us / 1e6, 3)))
        good = [r for r in rows if "us" in r and r["rel_err"] < 1e-2]
        best = min(good, key=lambda r: r["us"]) if good else None
        record = dict(batch=batch, context=context, cache=name, widen=widen, default_us=round(default_us, 2),
                      default_tbps=round(nbytes / default_us / 1e6, 3), best=best, launches=rows,
                      bad=[r for r in rows if "us" in r and r["rel_err"] >= 1e-2])
        out.write(json.dumps(record) + "\n")
        if best and best["us"] < default_us:  # the knob's value, for a same-call A/B (INFERNEO_DECODE_LAUNCH)
            knob = ",".join(f"{key}={best[key]}" for key in envs.DECODE_LAUNCH_KEYS)
            with open(Path(out.name).with_name("best_launch.txt"), "a") as best_file:
                best_file.write(f"{batch}x{context} {name} {widen} {knob} {default_us / best['us']:.3f}\n")
        out.flush()
        print(f"{batch:3d} x {context} {name} w{widen}: default {default_us:.1f} us "
              f"({record['default_tbps']:.2f} TB/s); best {best and best['us']} us {best}; "
              f"{len(record['bad'])} launches off the default's output", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--shapes", default="32x1040,200x640,256x640")
    parser.add_argument("--caches", default="bf16:0,fp8:0,fp8:2", help="CACHE:WIDEN pairs (WIDEN: fp8_widen)")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    caches = [(name, int(widen)) for name, _, widen in (pair.partition(":") for pair in args.caches.split(","))]
    Path(args.out, "best_launch.txt").unlink(missing_ok=True)
    with open(Path(args.out, "decode_launch_sweep.jsonl"), "w") as out:
        for shape in args.shapes.split(","):
            batch, context = (int(v) for v in shape.split("x"))
            sweep(batch, context, caches, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
