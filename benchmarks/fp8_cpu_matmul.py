"""Is FP8 faster than float32 / bfloat16 on this CPU? ``torch._scaled_mm`` (PyTorch's FP8 GEMM, row-wise scales,
the operation an FP8 linear layer would run) against ``F.linear`` in float32 and bfloat16, on the default model's
layer shapes (SmolLM2-135M: hidden 576, MLP 1536) and a 2048-wide layer, at 1, 16 and 128 rows.

The answer decides Inferneo's CPU policy for FP8 (docs/quantization.md): FP8 checkpoints are de-quantized at
load and ``--quantization fp8`` is refused on CPU unless FP8 measures faster.

Usage: ``python benchmarks/fp8_cpu_matmul.py [--threads N]``; prints one JSON line per shape.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

SHAPES = ((576, 576), (1536, 576), (576, 1536), (2048, 2048))  # (out, in)
ROWS = (1, 16, 128)


def median_ms(fn, min_seconds: float = 0.3) -> float:
    fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(times) < 5:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(dict(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                          torch=torch.__version__)))
    gen = torch.Generator().manual_seed(0)
    for out_f, in_f in SHAPES:
        w = torch.randn(out_f, in_f, generator=gen) * 0.02
        w_scale = (w.abs().amax(1) / 448).reshape(1, -1).contiguous()
        wq = (w / w_scale.reshape(-1, 1)).to(torch.float8_e4m3fn)
        w_bf16 = w.bfloat16()
        for rows in ROWS:
            x = torch.randn(rows, in_f, generator=gen)
            x_scale = x.abs().amax(1, keepdim=True) / 448
            xq = (x / x_scale).to(torch.float8_e4m3fn)
            x_bf16 = x.bfloat16()
            rec = dict(out=out_f, inp=in_f, rows=rows,
                       fp8_scaled_mm_ms=median_ms(lambda xq=xq, xs=x_scale, wq=wq, ws=w_scale: torch._scaled_mm(
                           xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16)),
                       fp32_ms=median_ms(lambda x=x, w=w: F.linear(x, w)),
                       bf16_ms=median_ms(lambda x=x_bf16, w=w_bf16: F.linear(x, w)))
            rec = {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}
            rec["fp8_vs_fastest"] = round(rec["fp8_scaled_mm_ms"] / min(rec["fp32_ms"], rec["bf16_ms"]), 2)
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
