"""Time every linear layer of one decode step on CPU: oneDNN against the native panel kernel.

The model's whole set of weights is used (SmolLM2-135M's shapes by default: 30 layers of q/k/v, output,
gate/up and down projections, plus the tied LM head), so each step streams them from memory as the engine does;
a single layer timed alone would sit in cache. For each row count M it prints the time per step through each path
and the rate in GFLOP/s. Where oneDNN cannot pack the dtype (bfloat16 on a CPU without AVX-512 or AMX), the
baseline is PyTorch's ``F.linear`` on the plain weight, which is what such layers ran before. The two paths are
timed alternately, ``--rounds`` times each (medians), so a shared machine's load hits both alike.

    python3 benchmarks/cpu_linear_step.py [--rows 1,8,16,32,64,128] [--threads 2] [--dtype bfloat16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from inferneo.model_executor.layers.cpu_linear import (
    PackedLinear,
    PanelLinear,
    onednn_available,
    panel_kernels,
)

SMOLLM2_LAYER = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (in, out): qkv, o, gate_up, down


def step_time(layers: list[nn.Module], rows: int, dtype: torch.dtype, repeats: int = 5) -> float:
    inputs = {m.in_features: torch.randn(rows, m.in_features, dtype=dtype) for m in layers}
    with torch.inference_mode():
        for _ in range(2):
            for m in layers:
                m(inputs[m.in_features])
        start = time.perf_counter()
        for _ in range(repeats):
            for m in layers:
                m(inputs[m.in_features])
    return (time.perf_counter() - start) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,16,32,64,128,512")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    ops = panel_kernels(dtype, avx2_float32_panel=True)
    if ops is None:
        print(f"needs the native panel kernel in {args.dtype}")
        return 1
    torch.manual_seed(0)
    plain = [nn.Linear(k, n, bias=False, dtype=dtype) for _ in range(args.layers) for k, n in SMOLLM2_LAYER]
    plain.append(nn.Linear(576, 49152, bias=False, dtype=dtype))  # the LM head
    base_name = "oneDNN" if onednn_available(dtype) else "F.linear"
    baseline = [PackedLinear(m) for m in plain] if onednn_available(dtype) else plain
    panel = [PanelLinear(m, ops) for m in plain]
    flops_per_row = 2 * sum(m.in_features * m.out_features for m in plain)
    size = dtype.itemsize
    isa = ops.vector_isa() if hasattr(ops, "vector_isa") else "?"
    print(f"{len(plain)} linears, {flops_per_row / 2 * size / 1e6:.0f} MB of {args.dtype} weights, "
          f"{args.threads} threads, panel kernel: {isa}")
    for rows in (int(r) for r in args.rows.split(",")):
        pairs = [(step_time(baseline, rows, dtype), step_time(panel, rows, dtype)) for _ in range(args.rounds)]
        a, b = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        print(f"rows {rows:5d}: {base_name} {a * 1e3:8.2f} ms ({rows * flops_per_row / a / 1e9:4.0f} GFLOP/s)  "
              f"panel {b * 1e3:8.2f} ms ({rows * flops_per_row / b / 1e9:4.0f} GFLOP/s)  x{a / b:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
