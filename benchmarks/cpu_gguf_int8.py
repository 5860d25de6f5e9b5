"""The GGUF int8 dot path against the exact GGUF path and float32 oneDNN, per layer and per decode step on CPU.

Four paths multiply the default model's weights (the bundled SmolLM2-135M GGUF: Q4_1 linears, tied Q8_0 head):
``int8`` (``gguf_linear_int8``: activations quantized per 32-weight block, integer dot products), ``exact``
(``gguf_linear``: blocks de-quantized to float32, float FMAs / de-quantized tiles + GEMM) and ``fp32`` (the same
weights de-quantized and packed as the engine packs an fp32 folder: oneDNN), and ``policy`` (what the engine's
GGUF layers call: ``block_matmul_for`` with ``gguf_int8_dot`` on, i.e. each type's row range). Per layer: layer 0's fused shapes
(qkv 576->960, o 576->576, gate_up 576->3072, down 1536->576) and the head 576->49152, each alone (in cache).
Per step: every linear of the model once (30 layers and the head), streaming the weights as the engine does.
The paths alternate within each repeat on one input; medians of ``--repeats``; the printed ratios are fp32 time
over the path's time (above 1: faster than fp32) and exact time over int8 time.

    python3 benchmarks/cpu_gguf_int8.py [--rows 1,32,64,256] [--threads 1,2] [--repeats 7] [--what qkv,o,gate_up,down,head,step]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from cpu_gguf_step import gguf_layers
from torch import nn

from inferneo.kernel_config import KernelConfig
from inferneo.kernels.cpu_gguf import load_gguf_kernels
from inferneo.model_executor.layers.cpu_linear import pack_linears
from inferneo.quantization.gguf import block_matmul_for
from inferneo.quantization.gguf_blocks import KEPT_FORMATS, dequantize_blocks

LAYER_NAMES = ["qkv", "o", "gate_up", "down"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="1,32,64,256")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--what", default="qkv,o,gate_up,down,head,step", help="which layers / the step to time")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    ops = load_gguf_kernels()
    policy = block_matmul_for(torch.device("cpu"), KernelConfig(gguf_int8_dot=True))
    layers = gguf_layers()  # 30 x (qkv, o, gate_up, down), then the head
    dense = nn.ModuleList()
    for blocks, qtype in layers:
        weight = dequantize_blocks(blocks, qtype)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight.data.copy_(weight)
        dense.append(linear)
    holder = nn.Module()
    holder.layers = dense
    pack_linears(holder, KernelConfig())
    picks = {name: i for i, name in enumerate(LAYER_NAMES)} | {"head": len(layers) - 1}
    sets = {name: [i] for name, i in picks.items()} | {"step": list(range(len(layers)))}
    sets = {name: idx for name, idx in sets.items() if name in args.what.split(",")}

    def run(path: str, idx: list[int], inputs: dict[int, torch.Tensor]) -> None:
        for i in idx:
            blocks, qtype = layers[i]
            x = inputs[blocks.shape[1] // (20 if qtype == 3 else 34) * 32]
            if path == "int8":
                ops.gguf_linear_int8(x, blocks, qtype, x.shape[1])
            elif path == "exact":
                ops.gguf_linear(x, blocks, qtype, x.shape[1])
            elif path == "policy":
                policy(x, blocks, KEPT_FORMATS[qtype])
            else:
                holder.layers[i](x)

    results = []
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for rows in map(int, args.rows.split(",")):
            inputs = {k: torch.randn(rows, k) for k in (576, 1536)}
            for name, idx in sets.items():
                times: dict[str, list[float]] = {"int8": [], "exact": [], "policy": [], "fp32": []}
                inner = 1 if name == "step" else max(1, 20 // rows)
                with torch.inference_mode():
                    for path in times:
                        run(path, idx, inputs)  # warm-up
                    for _ in range(args.repeats):
                        for path in times:
                            start = time.perf_counter()
                            for _ in range(inner):
                                run(path, idx, inputs)
                            times[path].append((time.perf_counter() - start) / inner)
                med = {p: statistics.median(t) for p, t in times.items()}
                row = {"threads": threads, "rows": rows, "what": name,
                       **{f"{p}_ms": round(v * 1e3, 3) for p, v in med.items()},
                       "int8_vs_fp32": round(med["fp32"] / med["int8"], 2),
                       "exact_vs_fp32": round(med["fp32"] / med["exact"], 2),
                       "int8_vs_exact": round(med["exact"] / med["int8"], 2),
                       "policy_vs_exact": round(med["exact"] / med["policy"], 2),
                       "policy_vs_fp32": round(med["fp32"] / med["policy"], 2)}
                results.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
