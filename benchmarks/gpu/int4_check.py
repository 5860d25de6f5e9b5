"""W4A16 (4-bit weights, AWQ layout, group 128) on the GPU: the Triton kernel's correctness against F.linear on the
de-quantized weight, and its time against bf16 cuBLAS on Llama-2-7B's layer shapes at 1 and 32 rows.

Each layer is the engine's own :class:`QuantizedLinear` with :class:`Int4LinearMethod` (dummy weights from
``init_dummy``, finalized as after loading), so the production path is measured: the AWQ tensors repacked into the
canonical layout and :func:`w4a16_linear` with its default launch configuration (plus a few alternatives at one
row). Times are CUDA-graph replays (20 calls per graph), median of 5 replays, per call.

Usage: ``python benchmarks/gpu/int4_check.py [--out results.jsonl]``
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from inferneo.kernel_config import KernelConfig
from inferneo.kernels.triton_int4 import W4A16Config, choose_config, w4a16_linear
from inferneo.quantization.base import LinearShape, QuantizedLinear
from inferneo.quantization.int4 import Int4LinearMethod, Int4Scheme

# Llama-2-7B: (name, output shards, in_features)
LAYERS = (("qkv_proj", (4096, 4096, 4096), 4096), ("o_proj", (4096,), 4096),
          ("gate_up_proj", (11008, 11008), 4096), ("down_proj", (4096,), 11008))
ROWS = (1, 32)
CALLS = 20


def graph_time_us(fn) -> float:
    """Microseconds per call of ``fn``: CUDA graph of ``CALLS`` calls, median of 5 replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / CALLS)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    records = []
    for name, shards, k in LAYERS:
        shape = LinearShape(f"layers.0.{name}", k, shards)
        layer = QuantizedLinear(Int4LinearMethod(Int4Scheme("awq", 128, True)), shape, False, torch.bfloat16, device)
        layer.method.init_dummy(layer, gen)
        layer.method.finalize(layer, KernelConfig())
        weights = layer.int4_blocks[0]
        w_f32 = layer.method.dequantized_weight(layer)
        w_bf16 = w_f32.to(torch.bfloat16)
        n = shape.out_features
        for m in ROWS:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            ref = F.linear(x.float(), w_f32)
            got = layer(x)
            err = ((got.float() - ref).norm() / ref.norm()).item()
            bf16_us = graph_time_us(lambda x=x, w=w_bf16: F.linear(x, w))
            default = choose_config(m, n, k, 128, torch.cuda.get_device_properties(device).multi_processor_count)
            alternatives = ([W4A16Config(1, bn, 128, s) for bn, s in ((32, 4), (128, 2), (64, 1), (64, 8))]
                            if m == 1 else [W4A16Config(m, 128, 128, s) for s in (1, 2, 4)])
            configs = [default] + [c for c in alternatives if c != default and k % (c.block_k * c.split_k) == 0]
            for config in configs:
                y = w4a16_linear(x, weights, config)
                cerr = ((y.float() - ref).norm() / ref.norm()).item()
                us = graph_time_us(lambda x=x, c=config, w=weights: w4a16_linear(x, w, c))
                record = dict(layer=name, n=n, k=k, m=m, config=str(config), default=config == default,
                              rel_err=cerr, layer_rel_err=err, w4a16_us=round(us, 2), bf16_us=round(bf16_us, 2),
                              ratio=round(us / bf16_us, 3))
                print(json.dumps(record), flush=True)
                records.append(record)
                assert cerr < 1.5e-2, record
    if args.out:
        with open(args.out, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
