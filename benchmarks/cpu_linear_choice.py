"""The CPU linear kernel choice against the whole decode step: does the start-up tune pick the fastest kernel?

Builds SmolLM2-135M's linears (30 layers of q/k/v, output, gate/up and down projections, plus the LM head; random
weights) and, for every linear kernel this CPU runs in the dtype (``cpu_select.candidate_kernels``, less what did
not build here), times a whole step of all of them at each row count: the kernels interleaved, repeat by repeat,
so a shared machine's load falls on all of them alike; the median step counts. Then it runs the start-up choice
(``pack_linears`` with the tune on and a fresh cache file) on the same layers, reports its time and its pick per
shape, and runs it again to time a start that reads the cache.

    python3 benchmarks/cpu_linear_choice.py [--dtype bfloat16] [--rows 1,8,32,64,256] [--threads 2] [--json out]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from inferneo.kernel_config import KernelConfig
from inferneo.kernels.cpu_features import cpu_features
from inferneo.kernels.cpu_select import LinearShape, candidate_kernels
from inferneo.kernels.cpu_tune_cache import TuneCache
from inferneo.model_executor.layers.cpu_linear import kernel_built, linear_module, pack_linears, panel_kernels
from inferneo.model_executor.layers.cpu_linear_tune import LinearChooser

SMOLLM2_LAYER = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (in, out): qkv, o, gate_up, down


def model_linears(layers: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList(nn.ModuleList(nn.Linear(k, n, bias=False, dtype=dtype) for k, n in SMOLLM2_LAYER)
                                 for _ in range(layers))
    model.lm_head = nn.Linear(576, 49152, bias=False, dtype=dtype)
    return model


def linears(model: nn.Module) -> list[nn.Module]:
    return [*(layer for block in model.layers for layer in block), model.lm_head]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,32,64,256")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", type=Path, help="append one JSON line per result here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    features = cpu_features()
    kernels = KernelConfig(cpu_linear_tune=True, cpu_linear_kernel="auto")
    ops = {d: panel_kernels(d, kernels) for d in (torch.float32, torch.bfloat16)}
    here = [k for k in candidate_kernels(features, dtype, LinearShape(960, 576))
            if kernel_built(ops, k, dtype)]
    print(f"CPU: {features.model}; features {features.summary()}; torch {torch.__version__}; "
          f"{args.threads} threads; {args.dtype}; kernels here: {', '.join(k.value for k in here)}")
    results = []

    model = model_linears(args.layers, dtype)
    plain = linears(model)
    paths = {k: [linear_module(k, m, ops=ops[dtype], tied=False) for m in plain] for k in here}
    flops_per_row = 2 * sum(m.in_features * m.out_features for m in plain)
    for rows in (int(r) for r in args.rows.split(",")):
        inputs = {m.in_features: torch.randn(rows, m.in_features, dtype=dtype) for m in plain}
        steps: dict[str, list[float]] = {k.value: [] for k in here}
        with torch.no_grad():
            for repeat in range(args.repeats + 1):
                for kernel in here[repeat % len(here):] + here[: repeat % len(here)]:
                    start = time.perf_counter()
                    for m in paths[kernel]:
                        m(inputs[m.in_features])
                    if repeat:  # the first round warms up
                        steps[kernel.value].append(time.perf_counter() - start)
        medians = {name: statistics.median(times) for name, times in steps.items()}
        best = min(medians.values())
        line = "  ".join(f"{name} {t * 1e3:8.2f} ms (x{t / best:.2f}, {rows * flops_per_row / t / 1e9:4.0f} GFLOP/s)"
                         for name, t in medians.items())
        print(f"step, rows {rows:4d}: {line}")
        results.append({"what": "step", "rows": rows, "median_ms": {k: v * 1e3 for k, v in medians.items()},
                        "fastest": min(medians, key=medians.get)})
    del paths

    with tempfile.TemporaryDirectory() as folder:
        for attempt in ("measured", "cached"):
            target = model_linears(args.layers, dtype)
            chooser = LinearChooser(kernels, lambda k, d: kernel_built(ops, k, d),
                                    cache=TuneCache(Path(folder) / "tune.json"))
            start = time.perf_counter()
            pack_linears(target, kernels, chooser=chooser)
            elapsed = time.perf_counter() - start
            picks = {str(c.shape): c.kernel.value for c in chooser.choices.get(dtype, [])}
            print(f"start-up choice ({attempt}): {elapsed:.2f} s, picks {picks}")
            results.append({"what": f"choice-{attempt}", "seconds": elapsed, "picks": picks,
                            "times_ms": {str(c.shape): {k: [t * 1e3 for t in ts] for k, ts in c.seconds.items()}
                                         for c in chooser.choices.get(dtype, [])}})
    if args.json:
        meta = {"cpu": features.model, "flags": features.summary(), "torch": torch.__version__,
                "threads": args.threads, "dtype": args.dtype, "layers": args.layers, "repeats": args.repeats}
        with args.json.open("a") as fh:
            for result in results:
                fh.write(json.dumps({**meta, **result}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
