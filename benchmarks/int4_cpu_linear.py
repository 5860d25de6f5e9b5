"""The native int4 CPU kernel against F.linear in float32 and bfloat16, on a default-model-sized layer (576 inputs,
1536 outputs, group 64) and a 4096 x 4096 one (group 128), at 1, 8 and 64 rows.

Usage: ``python benchmarks/int4_cpu_linear.py [--threads N] [--out results.jsonl]``; prints one JSON line per
measurement (median microseconds of timed repeats).
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F
from cpu_moe_step import median_us  # this folder is on the path when the script runs

from inferneo.kernels.cpu_int4 import cpu_int4_linear, load_int4_cpu_kernels
from inferneo.quantization.int4_layouts import Int4Codes, dequantize, pack_canonical

SHAPES = ((1536, 576, 64), (4096, 4096, 128))  # (out, in, group)
ROWS = (1, 8, 64)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    module = load_int4_cpu_kernels()
    if module is None:
        raise SystemExit("the native int4 kernel did not build")
    records = []
    for n, k, group in SHAPES:
        gen = torch.Generator().manual_seed(0)
        weights = pack_canonical(Int4Codes(
            torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen),
            torch.randint(0, 16, (k // group, n), dtype=torch.uint8, generator=gen),
            torch.rand(k // group, n, generator=gen) * 0.01, group))
        w32 = dequantize(weights)
        w16 = w32.to(torch.bfloat16)
        for m in ROWS:
            x = torch.randn(m, k)
            xb = x.bfloat16()
            record = dict(out=n, inp=k, group=group, rows=m, threads=torch.get_num_threads(), isa=module.best_isa(),
                          cpu=platform.processor() or platform.machine(),
                          int4_f32_us=median_us(lambda x=x, w=weights: cpu_int4_linear(x, w), args.repeats),
                          linear_f32_us=median_us(lambda x=x, w=w32: F.linear(x, w), args.repeats),
                          int4_bf16_us=median_us(lambda x=xb, w=weights: cpu_int4_linear(x, w), args.repeats),
                          linear_bf16_us=median_us(lambda x=xb, w=w16: F.linear(x, w), args.repeats))
            record = {key: round(v, 1) if isinstance(v, float) else v for key, v in record.items()}
            print(json.dumps(record), flush=True)
            records.append(record)
    if args.out:
        with open(args.out, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
