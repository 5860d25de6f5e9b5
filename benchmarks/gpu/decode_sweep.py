#!/usr/bin/env python3
"""Batch-1 decode kernels on one GPU, swept: attention (split count, tile size, warps) and the linear layers
(cuBLAS against the Triton GEMV of ``inferneo.kernels.triton_gemv`` in several tilings).

Llama-2-7B heads (32 query, 32 KV, dim 128), bf16, block size 16, a block table as wide as ``max_model_len``
2048 (as the CUDA graphs see it) and 1040 tokens of context: the W3 batch-1 shape. Each configuration runs as 32
calls on 32 different caches (one per layer, more than L2 holds) inside one CUDA graph, so the time per call is
what a decode step pays per layer, launch gaps included. The floor is the KV bytes read over the copy bandwidth.
The linear layers: Llama-2-7B's four projections and its LM head at one input row, 32 calls over 8 weight copies
(more than L2 holds) in one graph, against their weight bytes over the copy bandwidth.
Writes ``$OUT/decode_sweep.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from inferneo.kernels.triton_attention import choose_num_splits, device_sm_count, paged_decode  # noqa: E402
from inferneo.kernels.triton_gemv import gemv  # noqa: E402

LAYERS, DIM, BLOCK, WIDTH, CONTEXT = 32, 128, 16, 128, 1040
HEADS = int(os.environ.get("SWEEP_HEADS", "32"))  # 16: one rank's heads at tensor-parallel size 2
KV_HEADS = int(os.environ.get("SWEEP_KV_HEADS", str(HEADS)))  # fewer: grouped-query attention (8: Llama-3-8B)


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * (1 << 30) * 10 / (start.elapsed_time(end) / 1e3)


def graph_time_us(calls) -> float:
    """Mean time of one of ``calls`` (callables) when all run in one CUDA graph."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / 20 / len(calls)


GEMV_SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
               "lm_head": (32000, 4096)}
_TP = int(os.environ.get("SWEEP_GEMV_TP", "1"))  # one rank's shapes at this tensor-parallel size
if _TP > 1:
    GEMV_SHAPES = {"qkv": (12288 // _TP, 4096), "o": (4096, 4096 // _TP), "gate_up": (22016 // _TP, 4096),
                   "down": (4096, 11008 // _TP), "lm_head": (32000 // _TP, 4096)}
GEMV_CONFIGS = [(4, 512, 4), (8, 256, 4), (8, 512, 4), (16, 256, 4), (16, 512, 8), (32, 128, 4), (32, 256, 8)]
if os.environ.get("SWEEP_GEMV_FINE"):  # the second pass, around the best of the first (2026-11-27)
    GEMV_CONFIGS = [(1, 1024, 4), (2, 512, 4), (2, 1024, 4), (2, 1024, 8), (4, 256, 4), (4, 512, 2), (4, 512, 8),
                    (4, 1024, 4), (4, 1024, 8), (8, 1024, 8)]
    if _TP > 1:  # narrower layers: also fewer warps per row, and two rows per program with short rows
        GEMV_CONFIGS += [(1, 512, 2), (1, 1024, 2), (1, 2048, 4), (1, 2048, 8), (2, 256, 2), (2, 2048, 8)]


def sweep_gemv(bw: float) -> list[dict]:
    rows = []
    for name, (n, k) in GEMV_SHAPES.items():
        weights = [torch.randn((n, k), dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(8)]
        x = torch.randn((1, k), dtype=torch.bfloat16, device="cuda")
        floor_us = n * k * 2 / bw * 1e6
        ref = F.linear(x, weights[0]).float()
        cublas = graph_time_us([lambda w=weights[i % 8], x=x: F.linear(x, w) for i in range(32)])
        rows.append(dict(shape=name, impl="cublas", us=cublas, x_floor=cublas / floor_us, rel_err=0.0))
        print(f"{name:8s} {n}x{k}: cuBLAS {cublas:6.2f} us ({cublas / floor_us:.2f}x floor {floor_us:.2f})", flush=True)
        for cfg in GEMV_CONFIGS:
            try:
                err = ((gemv(x, weights[0], config=cfg).float() - ref).norm() / ref.norm()).item()
                us = graph_time_us([lambda w=weights[i % 8], c=cfg, x=x: gemv(x, w, config=c) for i in range(32)])
                rows.append(dict(shape=name, impl="triton", config=cfg, us=us, x_floor=us / floor_us, rel_err=err))
                print(f"{name:8s} triton {cfg}: {us:6.2f} us ({us / floor_us:.2f}x), rel err {err:.1e}", flush=True)
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"{name} triton {cfg}: {type(exc).__name__}: {exc}")
        del weights
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    torch.manual_seed(0)
    if os.environ.get("SWEEP_GEMV_FINE"):
        rows = sweep_gemv(copy_bandwidth())
        (Path(os.environ.get("OUT", "/tmp")) / "decode_sweep_gemv.json").write_text(json.dumps(rows, indent=2))
        return 0
    batch = int(os.environ.get("SWEEP_BATCH", "1"))
    caches = [torch.randn((2, WIDTH * batch, KV_HEADS, BLOCK, DIM), dtype=torch.bfloat16, device="cuda")
              for _ in range(LAYERS)]
    tables = torch.arange(WIDTH * batch, device="cuda", dtype=torch.int64).view(batch, WIDTH)
    lens = torch.full((batch,), CONTEXT, dtype=torch.int64, device="cuda")
    q = torch.randn((batch, HEADS, DIM), dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    bw = copy_bandwidth()
    floor_us = 2 * batch * CONTEXT * KV_HEADS * DIM * 2 / bw * 1e6
    default = choose_num_splits(batch, KV_HEADS, WIDTH * BLOCK, 64, device_sm_count(q.device))
    print(f"{torch.cuda.get_device_name()}, copy {bw / 1e12:.2f} TB/s, batch {batch}, heads {HEADS} (kv {KV_HEADS}), "
          f"floor {floor_us:.2f} us/layer, default splits {default}", flush=True)
    rows = []
    ref = None
    # The library's own choice first (splits, tile and warps all left to paged_decode), then the grid.
    grid = [{}] + [dict(num_splits=splits, block_n=block_n, num_warps=warps)
                   for splits in (8, 16, 24, 32, 48, 64) for block_n in (32, 64) for warps in (2, 4, 8)]
    for kw in grid:
        label = " ".join(f"{k} {kw[k]}" for k in ("num_splits", "block_n", "num_warps") if k in kw) or "library default"
        try:
            paged_decode(q, caches[0], tables, lens, 0.088, out, **kw)
            torch.cuda.synchronize()
            if ref is None:
                ref = out.clone()
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            us = graph_time_us([lambda c=cache, kw=kw: paged_decode(q, c, tables, lens, 0.088, out, **kw)
                                for cache in caches])
            rows.append(dict(kw, us_per_layer=us, x_floor=us / floor_us, rel_err_vs_first=err))
            print(f"{label:40s}: {us:6.2f} us/layer ({us / floor_us:.2f}x floor), rel err {err:.1e}", flush=True)
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"{label}: {type(exc).__name__}: {exc}")
    best = min(rows, key=lambda r: r["us_per_layer"])
    print(f"best: {best}")
    del caches
    torch.cuda.empty_cache()
    gemv_rows = [] if os.environ.get("SWEEP_NO_GEMV") else sweep_gemv(bw)
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    (out_dir / "decode_sweep.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "copy_Bps": bw, "floor_us": floor_us, "batch": batch,
         "default_splits": default, "rows": rows, "gemv": gemv_rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
