"""FP8 linear layers on the GPU: correctness against F.linear on the de-quantized operands, CUDA-graph capture,
and a rough timing against bf16, on Llama-2-7B's layer shapes.

Each layer is the engine's own :class:`QuantizedLinear` with :class:`Fp8LinearMethod` (dummy weights, finalized
as after loading), so this checks the production path: ``torch._scaled_mm`` with row-wise scales (per-token
activations x per-row weights, a fused q/k/v with one per-tensor scale per shard), per-tensor scales, static
activation scales, and the Triton block-scaled GEMM (128 x 128). The reference is float32 ``F.linear`` of the
de-quantized activations (quantized by the method's PyTorch reference) and the de-quantized weight.

Usage: ``python benchmarks/gpu/fp8_check.py [--out results.jsonl]``
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from inferneo.kernel_config import KernelConfig
from inferneo.quantization.base import LinearShape, QuantizedLinear
from inferneo.quantization.fp8 import Fp8LinearMethod, Fp8Scheme

# Llama-2-7B: (name, output shards, in_features)
LAYERS = (("qkv_proj", (4096, 4096, 4096), 4096), ("o_proj", (4096,), 4096),
          ("gate_up_proj", (11008, 11008), 4096), ("down_proj", (4096,), 11008))
SCHEMES = {
    "channel-token (online)": Fp8Scheme("channel", None, "dynamic_token", checkpoint=False),
    "tensor-token": Fp8Scheme("tensor", None, "dynamic_token"),
    "tensor-static": Fp8Scheme("tensor", None, "static_tensor"),
    "block128-token": Fp8Scheme("block", (128, 128), "dynamic_token"),
}
ROWS = (1, 16, 256, 2048)


def bench(fn, iters: int = 50) -> float:
    """Median milliseconds of ``fn`` over ``iters`` timed runs (CUDA events), after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def graph_replay(fn) -> torch.Tensor:
    """``fn()`` captured in a CUDA graph and replayed (fails if it synchronises with the host)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    device = torch.device("cuda")
    cap = torch.cuda.get_device_capability()
    header = dict(device=torch.cuda.get_device_name(), capability=f"{cap[0]}.{cap[1]}", torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d"))
    print(json.dumps(header))
    records = [header]
    gen = torch.Generator(device=device).manual_seed(0)
    for name, shards, in_f in LAYERS:
        out_f = sum(shards)
        dense = torch.empty(out_f, in_f, dtype=torch.bfloat16, device=device).uniform_(-0.02, 0.02, generator=gen)
        for label, scheme in SCHEMES.items():
            method = Fp8LinearMethod(scheme, "weight_scale_inv" if scheme.weight == "block" else "weight_scale")
            layer = QuantizedLinear(method, LinearShape(name, in_f, shards), False, torch.bfloat16, device)
            method.init_dummy(layer, gen)
            method.finalize(layer, KernelConfig())
            w_ref = method.dequantized_weight(layer)
            for rows in ROWS:
                x = torch.randn(rows, in_f, dtype=torch.bfloat16, device=device, generator=gen)
                y = layer(x)
                ref = method.reference(layer, x)
                rel = ((y.float() - ref).norm() / ref.norm()).item()
                # the same layer without activation quantization error: how far FP8 is from bf16 math on W
                quant_err = ((ref - F.linear(x.float(), w_ref)).norm() / ref.norm()).item()
                graphed = graph_replay(lambda layer=layer, x=x: layer(x))
                rec = dict(layer=name, scheme=label, kernel=layer.fp8_kernel, rows=rows, out=out_f, inp=in_f,
                           rel_err_vs_reference=round(rel, 6), act_quant_rel_err=round(quant_err, 5),
                           graph_equal=bool(torch.equal(graphed, y)),
                           fp8_ms=round(bench(lambda layer=layer, x=x: layer(x), args.iters), 4),
                           bf16_ms=round(bench(lambda x=x, w=dense: F.linear(x, w), args.iters), 4))
                rec["speedup_vs_bf16"] = round(rec["bf16_ms"] / rec["fp8_ms"], 3)
                print(json.dumps(rec), flush=True)
                records.append(rec)
            del layer
    if args.out:
        with open(args.out, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    main()
