"""Time the native CPU paged decode attention kernel alone, on one decode step's shape.

``--requests`` queries, each over a random context of ``--min-len`` to ``--max-len`` tokens in a paged cache of
16-token blocks (random block tables), ``--heads`` query heads over ``--kv-heads`` KV heads of ``--head-dim``
(defaults: the default model's 9 / 3 / 64). ``--layers N`` cycles through N separate caches, so that with a large
N the cache no longer fits in the CPU's last-level cache (as a model's 30 layers do in the engine); with 1 it stays
there. Prints microseconds a call and the KV bytes read a second.

    python3 benchmarks/cpu_decode_attention.py [--requests 64] [--layers 1] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from inferneo.kernels.cpu import load_cpu_kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=80)
    parser.add_argument("--max-len", type=int, default=250)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=1, help="separate caches cycled through (1: stays in cache)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200, help="timed calls")
    args = parser.parse_args()
    if not 1 <= args.min_len <= args.max_len:
        parser.error("--min-len and --max-len: need 1 <= min-len <= max-len")
    for name in ("requests", "heads", "kv_heads", "head_dim", "layers", "threads", "calls"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.heads % args.kv_heads:
        parser.error("--heads must be a multiple of --kv-heads")
    ops = load_cpu_kernels()
    if ops is None:
        raise SystemExit("the native CPU kernels do not build here")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype, block = getattr(torch, args.dtype), 16
    lens = torch.randint(args.min_len, args.max_len + 1, (args.requests,))
    max_blocks = -(-args.max_len // block)
    num_blocks = args.requests * max_blocks + 8
    caches = [torch.randn(2, args.kv_heads, num_blocks, block * args.head_dim).to(dtype) for _ in range(args.layers)]
    tables = torch.randperm(num_blocks)[: args.requests * max_blocks].view(args.requests, max_blocks)
    q = torch.randn(args.requests, args.heads, args.head_dim).to(dtype)
    out = torch.empty_like(q)
    scale = args.head_dim ** -0.5
    for cache in caches:  # warm-up
        ops.paged_decode_attention(q, cache, tables, lens, scale, out)
    rounds = max(1, args.calls // args.layers)
    start = time.perf_counter()
    for _ in range(rounds):
        for cache in caches:
            ops.paged_decode_attention(q, cache, tables, lens, scale, out)
    per_call = (time.perf_counter() - start) / (rounds * args.layers)
    kv_bytes = int(lens.sum()) * args.kv_heads * args.head_dim * 2 * q.element_size()
    print(json.dumps({"requests": args.requests, "mean_len": round(float(lens.float().mean()), 1),
                      "layers": args.layers, "dtype": args.dtype, "threads": args.threads,
                      "us_per_call": round(per_call * 1e6, 1), "kv_gb_per_s": round(kv_bytes / per_call / 1e9, 2)}))


if __name__ == "__main__":
    main()
