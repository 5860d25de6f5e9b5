#!/usr/bin/env python3
"""The launches the batch-1 Qwen3-30B-A3B decode step saves, checked and timed on one GPU (bf16).

1. **norm + router + top-k** (``triton_routing.norm_route_topk``) against the three launches it replaces (the
   Triton RMSNorm with the residual add, the router GEMV ``128 x 2048``, ``route_topk``): the residual sum and the
   normed rows equal, the experts equal and the weights to rounding, at 1, 2 and 4 tokens; a captured CUDA graph
   replayed three times gives the eager result and leaves the tickets at zero. Then both, 48 calls (one per layer,
   each on its own weights) in one CUDA graph with programmatic dependent launch, per call, for each router-rows
   setting of the fused kernel.
2. **input norm + q/k/v GEMV** (``triton_gemv.norm_gemv``) against the RMSNorm kernel and the tuned GEMV, the
   same way, for several (rows a program, warps).
3. **q/k norm + rotary + KV store** (``qk_norm_rotary_inplace(kv_cache=...)``) against the same kernel followed
   by ``store_kv``: the cache equal, and the time per layer the same way.

Writes ``moe_fused_launches.json`` and ``.log`` to ``--out``. ``--smoke`` runs it on CPU under Triton's interpreter
with tiny shapes and wall-clock timing (the numbers mean nothing; it checks the script).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import torch  # noqa: E402

from inferneo.kernels import _triton_elementwise as elementwise  # noqa: E402
from inferneo.kernels import triton_attention, triton_gemv, triton_routing  # noqa: E402

SHAPE = dict(hidden=2048, experts=128, top_k=8, heads=32, kv_heads=4, head_dim=128, layers=48, renormalize=True)
ROWS = (1, 2, 4, 8, 16)
NORM_GEMV_CONFIGS = ((2, 4), (4, 4), (4, 8), (8, 8), (16, 8))
DEVICE = "cuda"


def time_us(calls) -> float:
    """Mean microseconds of one of ``calls`` (``moe_decode_sweep.time_us``: a CUDA graph, or the wall clock)."""
    import moe_decode_sweep

    moe_decode_sweep.DEVICE = DEVICE
    return moe_decode_sweep.time_us(calls)


def unfused_route(x, res, norm_w, gate_w, pdl):
    """The three launches: RMSNorm (residual add in place), router linear, routing kernel."""
    normed, total = elementwise.rms_norm(x, res, norm_w, 1e-6, pdl=pdl)
    logits = triton_gemv.gemv(normed, gate_w, pdl=pdl) if normed.shape[0] == 1 else normed @ gate_w.T
    return normed, total, triton_routing.route_topk(logits, SHAPE["top_k"], renormalize=SHAPE["renormalize"],
                                                    pdl=pdl)


def check_norm_route(log) -> dict:
    h, e, k = SHAPE["hidden"], SHAPE["experts"], SHAPE["top_k"]
    dtype, out = torch.bfloat16, {}
    tickets = torch.zeros(triton_routing.NORM_ROUTE_MAX_TOKENS, dtype=torch.int32, device=DEVICE)
    norm_w = (torch.rand(h, device=DEVICE) + 0.5).to(dtype)
    gate_w = (torch.randn(e, h, device=DEVICE) / h**0.5).to(dtype)
    for tokens in (1, 2, 4):
        x, res = torch.randn(tokens, h, device=DEVICE, dtype=dtype), torch.randn(tokens, h, device=DEVICE, dtype=dtype)
        fused = triton_routing.norm_route_topk(x, res, norm_w, 1e-6, gate_w, None, tickets, k,
                                               renormalize=SHAPE["renormalize"])
        normed, total, routed = unfused_route(x.clone(), res.clone(), norm_w, gate_w, pdl=False)
        row = {"residual_equal": torch.equal(fused[1], total), "normed_equal": torch.equal(fused[0], normed),
               "ids_equal": torch.equal(fused[2].ids, routed.ids),
               "weights_max_abs_diff": (fused[2].weights - routed.weights).abs().max().item(),
               "tickets_zero": not tickets.any().item()}
        # The same call captured in a CUDA graph, replayed three times.
        graph = torch.cuda.CUDAGraph() if DEVICE == "cuda" else None
        if graph is not None:
            with torch.cuda.graph(graph):
                captured = triton_routing.norm_route_topk(x, res, norm_w, 1e-6, gate_w, None, tickets, k,
                                                          renormalize=SHAPE["renormalize"])
            replays_equal = True
            for _ in range(3):
                graph.replay()
                torch.cuda.synchronize()
                replays_equal &= (torch.equal(captured[0], fused[0]) and torch.equal(captured[1], fused[1])
                                  and torch.equal(captured[2].ids, fused[2].ids)
                                  and torch.equal(captured[2].weights, fused[2].weights))
            row["graph_replays_equal"] = replays_equal
            row["tickets_zero_after_replays"] = not tickets.any().item()
        out[f"tokens_{tokens}"] = row
        log(f"norm+router+top-k, {tokens} token(s): {row}")
    return out


def time_norm_route(log, pdl: bool) -> dict:
    h, e, k, layers = SHAPE["hidden"], SHAPE["experts"], SHAPE["top_k"], SHAPE["layers"]
    dtype = torch.bfloat16
    per_layer = [dict(x=torch.randn(1, h, device=DEVICE, dtype=dtype), res=torch.randn(1, h, device=DEVICE, dtype=dtype),
                      norm_w=(torch.rand(h, device=DEVICE) + 0.5).to(dtype),
                      gate_w=(torch.randn(e, h, device=DEVICE) / h**0.5).to(dtype),
                      tickets=torch.zeros(4, dtype=torch.int32, device=DEVICE)) for _ in range(layers)]
    out = {"unfused_us": time_us([functools.partial(unfused_route, p["x"], p["res"], p["norm_w"], p["gate_w"], pdl)
                                  for p in per_layer])}
    log(f"norm + router GEMV + routing, 3 launches (PDL {pdl}): {out['unfused_us']:.2f} us a layer")
    for rows in ROWS:
        us = time_us([functools.partial(triton_routing.norm_route_topk, p["x"], p["res"], p["norm_w"], 1e-6,
                                        p["gate_w"], None, p["tickets"], k, renormalize=True, rows=rows, pdl=pdl)
                      for p in per_layer])
        out[f"fused_rows_{rows}_us"] = us
        log(f"norm_route_topk, {rows} router rows a program ({triton_routing.triton.cdiv(e, rows)} programs): "
            f"{us:.2f} us a layer")
    out["default_rows"] = triton_routing.norm_route_rows(e)
    return out


def check_norm_gemv(log, pdl: bool) -> dict:
    """The input RMSNorm inside the q/k/v GEMV (``triton_gemv.norm_gemv``) against the RMSNorm kernel and the
    GEMV with its tuned tiles: equal residual, the product's largest difference, and the time per layer (48 layers'
    weights: nothing from L2)."""
    h, layers = SHAPE["hidden"], SHAPE["layers"]
    n, dtype = (SHAPE["heads"] + 2 * SHAPE["kv_heads"]) * SHAPE["head_dim"], torch.bfloat16
    per_layer = [dict(x=torch.randn(1, h, device=DEVICE, dtype=dtype), res=torch.randn(1, h, device=DEVICE, dtype=dtype),
                      norm_w=(torch.rand(h, device=DEVICE) + 0.5).to(dtype),
                      w=(torch.randn(n, h, device=DEVICE) / h**0.5).to(dtype)) for _ in range(layers)]
    p = per_layer[0]
    got, total = triton_gemv.norm_gemv(p["x"], p["res"], p["norm_w"], 1e-6, p["w"])
    normed, want_total = elementwise.rms_norm(p["x"].clone(), p["res"].clone(), p["norm_w"], 1e-6)
    want = triton_gemv.gemv(normed, p["w"])
    out = {"residual_equal": torch.equal(total, want_total),
           "max_abs_diff": (got.float() - want.float()).abs().max().item(), "equal": torch.equal(got, want)}

    def unfused(q):
        normed, _ = elementwise.rms_norm(q["x"], q["res"], q["norm_w"], 1e-6, pdl=pdl)
        triton_gemv.gemv(normed, q["w"], pdl=pdl)

    out["unfused_us"] = time_us([functools.partial(unfused, dict(q, x=q["x"].clone(), res=q["res"].clone()))
                                 for q in per_layer])
    for config in NORM_GEMV_CONFIGS:
        out[f"fused_{config[0]}x{config[1]}_us"] = time_us(
            [functools.partial(triton_gemv.norm_gemv, q["x"], q["res"], q["norm_w"], 1e-6, q["w"], config=config,
                               pdl=pdl) for q in per_layer])
    log(f"input norm + q/k/v GEMV ({n} x {h}; fused configs are (rows a program, warps)): {out}")
    return out


def check_kv_store(log, pdl: bool) -> dict:
    hq, hkv, d, layers = SHAPE["heads"], SHAPE["kv_heads"], SHAPE["head_dim"], SHAPE["layers"]
    dtype, width = torch.bfloat16, (SHAPE["heads"] + 2 * SHAPE["kv_heads"]) * SHAPE["head_dim"]
    cos = torch.rand(4096, d // 2, device=DEVICE)
    sin = torch.rand(4096, d // 2, device=DEVICE)
    qw, kw = torch.rand(d, device=DEVICE).to(dtype), torch.rand(d, device=DEVICE).to(dtype)
    pos = torch.tensor([1040], device=DEVICE)
    slots = torch.tensor([1040], device=DEVICE)
    qkvs = [torch.randn(1, width, device=DEVICE, dtype=dtype) for _ in range(layers)]
    caches = [torch.zeros(2, 128, hkv, 16, d, device=DEVICE, dtype=dtype) for _ in range(layers)]

    def separate(qkv, cache):
        elementwise.qk_norm_rotary_inplace(qkv, pos, cos, sin, hq, hkv, d, qw, kw, 1e-6, pdl=pdl)
        kv = qkv[:, hq * d:].view(1, 2 * hkv, d)
        triton_attention.store_kv(kv[:, :hkv], kv[:, hkv:], cache, slots, pdl=pdl)

    def fused(qkv, cache):
        elementwise.qk_norm_rotary_inplace(qkv, pos, cos, sin, hq, hkv, d, qw, kw, 1e-6, pdl=pdl, kv_cache=cache,
                                           slot_mapping=slots)

    want, got = qkvs[0].clone(), qkvs[0].clone()
    want_cache, got_cache = torch.zeros_like(caches[0]), torch.zeros_like(caches[0])
    separate(want, want_cache)
    fused(got, got_cache)
    out = {"qkv_equal": torch.equal(want, got), "cache_equal": torch.equal(want_cache, got_cache)}
    out["separate_us"] = time_us([functools.partial(separate, q.clone(), c) for q, c in zip(qkvs, caches, strict=True)])
    out["fused_us"] = time_us([functools.partial(fused, q.clone(), c) for q, c in zip(qkvs, caches, strict=True)])
    log(f"q/k norm + rotary + KV store: {out}")
    return out


def _smoke() -> None:
    global DEVICE, ROWS, NORM_GEMV_CONFIGS
    DEVICE, ROWS, NORM_GEMV_CONFIGS = "cpu", (4,), ((8, 8),)
    SHAPE.update(hidden=64, experts=16, top_k=4, heads=4, kv_heads=2, head_dim=32, layers=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/moe_fused_launches")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (TRITON_INTERPRET=1), to check it")
    args = parser.parse_args()
    if args.smoke:
        _smoke()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    from moe_kernel_sweep import timestamped_log

    log = timestamped_log(out / "moe_fused_launches.log")
    pdl = DEVICE == "cuda"
    results = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "shape": SHAPE,
               "torch": torch.__version__, "triton": triton_routing.triton.__version__}
    results["norm_route_check"] = check_norm_route(log)
    results["norm_route_time"] = time_norm_route(log, pdl)
    results["norm_gemv"] = check_norm_gemv(log, pdl)
    results["kv_store"] = check_kv_store(log, pdl)
    (out / "moe_fused_launches.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
