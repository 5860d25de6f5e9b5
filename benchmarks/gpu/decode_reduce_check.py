#!/usr/bin/env python3
"""Split decode attention with its splits merged in the attention kernel (``INFERNEO_DECODE_FUSED_REDUCE``,
``triton_attention.paged_decode(fused_reduce=True)``; written on branch h-fp8b beside the same design merged from
h-moe2, whose kernel the tree now keeps) against the two-kernel path, on one GPU (issue 20, batch 1).

Llama-2-7B heads (32 query, 32 KV, dim 128), bf16, block size 16, a block table 2,048 tokens wide, contexts of
1,040 tokens (the suite's decode steps) and a few others at batch 1 and 4: outputs compared (equal, or the largest
difference), a CUDA graph replayed three times equal to the eager call (the counters return to zero), then each path
timed as 32 calls in one CUDA graph over 32 layer caches (what a decode step pays per layer). Writes
``decode_reduce_check.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import torch  # noqa: E402
from decode_sweep import graph_time_us  # noqa: E402

from inferneo.kernels import triton_attention as ta  # noqa: E402

HEADS, KV_HEADS, DIM, BLOCK, WIDTH = 32, 32, 128, 16, 2048


def setup(batch: int, ctx: int, layers: int, gen: torch.Generator):
    blocks = WIDTH // BLOCK
    caches = [torch.randn(2, batch * blocks + 1, KV_HEADS, BLOCK, DIM, device="cuda", generator=gen,
                          dtype=torch.bfloat16) for _ in range(layers)]
    tables = torch.arange(batch * blocks, device="cuda", dtype=torch.int64).reshape(batch, blocks)
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int64)
    q = torch.randn(batch, HEADS, DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
    return q, caches, tables, lens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.environ.get("OUT") or ".")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), device=torch.cuda.get_device_name(),
                  checks=[], timing_us=[])
    ok_all = True
    for batch, ctx in ((1, 1040), (1, 17), (1, 2000), (4, 1040)):
        q, caches, tables, lens = setup(batch, ctx, 1, gen)
        outs = {}
        for fused in (False, True):
            out = torch.empty_like(q)
            ta.paged_decode(q, caches[0], tables, lens, DIM ** -0.5, out, fused_reduce=fused)
            outs[fused] = out
        graph_out = torch.empty_like(q)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ta.paged_decode(q, caches[0], tables, lens, DIM ** -0.5, graph_out, fused_reduce=True)
        replays = []
        for _ in range(3):
            graph_out.zero_()
            graph.replay()
            torch.cuda.synchronize()
            replays.append(torch.equal(graph_out, outs[True]))
        diff = (outs[True].float() - outs[False].float()).abs().max().item()
        counters_zero = not ta._decode_tickets(q.device).any().item()
        ok = diff <= 2 ** -7 * outs[False].float().abs().max().item() and all(replays) and counters_zero
        ok_all &= ok
        row = dict(batch=batch, context=ctx, equal=torch.equal(outs[True], outs[False]), max_diff=diff,
                   graph_replays_equal=replays, counters_zero=counters_zero, ok=ok)
        result["checks"].append(row)
        print(f"check {row}", flush=True)
    for batch in (1, 4):
        q, caches, tables, lens = setup(batch, 1040, 32, gen)
        out = torch.empty_like(q)
        for fused in (False, True):
            us = graph_time_us([functools.partial(ta.paged_decode, q, c, tables, lens, DIM ** -0.5, out,
                                                  fused_reduce=fused) for c in caches])
            result["timing_us"].append(dict(batch=batch, context=1040, fused_reduce=fused, us_per_layer=round(us, 2)))
            print(f"batch {batch} ctx 1040 {'fused' if fused else 'two kernels'}: {us:.2f} us a layer", flush=True)
        del caches
        torch.cuda.empty_cache()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "decode_reduce_check.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0 if ok_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
