#!/usr/bin/env python3
"""Why the FP8 cache's float16 dots (``fp8_widen=2``) are slow in split decode launches (one request): the decode
attention at Llama-2-7B's shape (32 query and 32 KV heads of 128, 1,040 tokens in a 2,048-token table, e4m3 cache)
timed for widenings 0 and 2, with the split merge inside the kernel and with the reduction launch, with and without
the reads before the PDL wait, alone (``triton.testing.do_bench``) and as 32 launches in one CUDA graph; each output
checked against widening 0's.

    python benchmarks/gpu/split_widen_probe.py [--requests 1,4]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402
import triton  # noqa: E402
from decode_sweep import graph_time_us  # noqa: E402

from inferneo.attention.fp8_kv import FP8_KV_DTYPE, KVCacheScales  # noqa: E402
from inferneo.kernels import triton_attention as ops  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", default="1,4")
    args = parser.parse_args()
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), flush=True)
    heads, dim, ctx, width, bs = 32, 128, 1040, 2048, 16
    for batch in (int(b) for b in args.requests.split(",")):
        used = -(-ctx // bs)
        blocks = batch * used + 1
        tables = torch.zeros(batch, width // bs, dtype=torch.int64, device=dev)
        tables[:, :used] = torch.randperm(blocks - 1, device=dev)[: batch * used].view(batch, used)
        cache = (torch.randn(2, blocks, heads, bs, dim, device=dev) * 0.5).to(FP8_KV_DTYPE)
        scales = KVCacheScales(torch.full((heads,), 0.05, device=dev), torch.full((heads,), 0.05, device=dev))
        lens = torch.full((batch,), ctx, dtype=torch.int64, device=dev)
        q = torch.randn(batch, heads, dim, device=dev, dtype=torch.bfloat16)
        ref = torch.empty_like(q)
        ops.paged_decode(q, cache, tables, lens, dim ** -0.5, ref, kv_scales=scales, fp8_widen=0, fused_reduce=False)
        for prewait in ("rotary,decode", "rotary"):
            os.environ["INFERNEO_PREWAIT_LOADS"] = prewait
            for fused in (False, True):
                for widen in (0, 2):
                    out = torch.empty_like(q)
                    call = functools.partial(ops.paged_decode, q, cache, tables, lens, dim ** -0.5, out,
                                             kv_scales=scales, fp8_widen=widen, fused_reduce=fused)

                    call()
                    torch.cuda.synchronize()
                    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                    alone = triton.testing.do_bench(call, warmup=20, rep=100)
                    per = graph_time_us([call] * 32)
                    print(f"requests {batch} prewait {prewait:13s} fused_reduce {fused!s:5s} widen {widen}: "
                          f"alone {alone * 1000:7.1f} us, in a graph of 32 {per:6.1f} us a launch, rel err {err:.2e}",
                          flush=True)
        os.environ.pop("INFERNEO_PREWAIT_LOADS", None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
