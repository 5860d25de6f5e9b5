"""Time every linear layer of one decode step on CPU: oneDNN against the native panel kernel.

The model's whole set of weights is used (SmolLM2-135M's shapes by default: 30 layers of q/k/v, output,
gate/up and down projections, plus the tied LM head), so each step streams them from memory as the engine does;
a single layer timed alone would sit in cache. For each row count M it prints the time per step through each path
and the rate in GFLOP/s.

    python3 benchmarks/cpu_linear_step.py [--rows 1,8,16,32,64,128] [--threads 2] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    ops = panel_kernels(dtype)
    if ops is None or not onednn_available():
        print(f"needs both the native panel kernel in {args.dtype} and oneDNN")
        return 1
    torch.manual_seed(0)
    plain = [nn.Linear(k, n, bias=False, dtype=dtype) for _ in range(args.layers) for k, n in SMOLLM2_LAYER]
    plain.append(nn.Linear(576, 49152, bias=False, dtype=dtype))  # the LM head
    onednn = [PackedLinear(m) for m in plain]
    panel = [PanelLinear(m, ops) for m in plain]
    flops_per_row = 2 * sum(m.in_features * m.out_features for m in plain)
    size = dtype.itemsize
    print(f"{len(plain)} linears, {flops_per_row / 2 * size / 1e6:.0f} MB of {args.dtype} weights, {args.threads} threads")
    for rows in (int(r) for r in args.rows.split(",")):
        a, b = step_time(onednn, rows, dtype), step_time(panel, rows, dtype)
        print(f"rows {rows:5d}: oneDNN {a * 1e3:8.2f} ms ({rows * flops_per_row / a / 1e9:4.0f} GFLOP/s)  "
              f"panel {b * 1e3:8.2f} ms ({rows * flops_per_row / b / 1e9:4.0f} GFLOP/s)  x{a / b:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
