"""Time of the native CPU paged decode-attention kernel over an FP8 KV cache against the float32 and bfloat16 ones.

    python benchmarks/cpu_fp8_kv_decode.py [--batch 16] [--context 512] [--heads 9 3] [--head-dim 64]

The default shape is the default model's attention (SmolLM2-135M: 9 query heads, 3 KV heads of 64). Prints the
mean milliseconds of one call (all requests, one layer) for each cache type; the queries are float32, or
bfloat16 for the bfloat16 cache.
"""

from __future__ import annotations

import argparse
import time

import torch

from inferneo.attention.fp8_kv import FP8_KV_DTYPE, KVCacheScales
from inferneo.kernels.cpu import load_cpu_kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--heads", type=int, nargs=2, default=[9, 3], metavar=("QUERY", "KV"))
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    kernels = load_cpu_kernels()
    if kernels is None:
        raise SystemExit("the native CPU kernels do not build here")
    block_size, (heads, kv_heads), dim = 16, args.heads, args.head_dim
    torch.manual_seed(0)
    num_blocks = args.batch * args.context // block_size + 1
    tables = torch.randperm(num_blocks - 1)[: num_blocks - 1].view(args.batch, -1)
    lens = torch.full((args.batch,), args.context, dtype=torch.long)
    base = torch.randn(2, kv_heads, num_blocks, block_size * dim)
    scales = KVCacheScales.ones(kv_heads, torch.device("cpu"))
    runs = [("float32", base, torch.float32, {}), ("bfloat16", base.bfloat16(), torch.bfloat16, {}),
            ("fp8 e4m3", base.to(FP8_KV_DTYPE), torch.float32, dict(k_scale=scales.k, v_scale=scales.v))]
    for name, cache, dtype, extra in runs:
        q = torch.randn(args.batch, heads, dim, dtype=dtype)
        out = torch.empty_like(q)
        for _ in range(3):
            kernels.paged_decode_attention(q, cache, tables, lens, dim**-0.5, out, **extra)
        start = time.perf_counter()
        for _ in range(args.calls):
            kernels.paged_decode_attention(q, cache, tables, lens, dim**-0.5, out, **extra)
        print(f"{name:9s} cache: {(time.perf_counter() - start) / args.calls * 1e3:.2f} ms a call "
              f"(batch {args.batch}, context {args.context}, heads {heads}/{kv_heads}, d{dim})")


if __name__ == "__main__":
    main()
