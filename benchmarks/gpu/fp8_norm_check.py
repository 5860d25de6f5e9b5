#!/usr/bin/env python3
"""The FP8 GEMV with its RMSNorm inside (``triton_fp8_gemv.fp8_norm_gemv``) on the GPU: checked, then timed beside
the RMSNorm kernel followed by the GEMV, on Llama-2-7B's q/k/v and gate/up shapes, in several tilings; with
``--o-tiles`` the output projection's one-row tilings with whole rows per K tile (every weight byte read before the
kernel's wait).

Checks (bf16, per-channel weights as ``--quantization fp8`` makes them, residual and none): the residual sum equal
bit for bit to the RMSNorm kernel's, the inputs not written, the product within the GEMV's documented tolerance
(relative Frobenius error below 6e-3; 2e-2 after SiLU-and-mul) of float32 ``F.linear`` on the exactly normed row
(float32, not rounded) and the de-quantized weight, beside the unfused path's error (which rounds the normed row to
bf16 first); a CUDA-graph replay equal to the eager call.

Timing: microseconds per layer, calls over weight copies that together exceed L2, in one CUDA graph
(``fp8_gemv_sweep.graph_us``).

Usage: ``python benchmarks/gpu/fp8_norm_check.py [--out DIR] [--o-tiles]`` (writes ``fp8_norm_check.json``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fp8_gemv_sweep import L2_BYTES, fp8_layer, graph_us, rel  # noqa: E402

from inferneo.kernels import triton_fp8_gemv as fg  # noqa: E402
from inferneo.kernels._triton_elementwise import rms_norm  # noqa: E402

EPS = 1e-5
SHAPES = (("qkv_proj", (4096, 4096, 4096), 4096, False), ("gate_up_proj", (11008, 11008), 4096, True))
NORM_TILES = ((4, 1024, 4), (8, 512, 4), (16, 512, 4), (16, 256, 4), (8, 1024, 8), (16, 1024, 8))
O_TILES = ((4, 2048, 8), (4, 4096, 8), (2, 4096, 8), (8, 4096, 8), (4, 4096, 16))


def unfused(x, res, nw, layer, gated):
    """The RMSNorm kernel, then the layer's GEMV (gated: gate/up + SiLU), as the engine runs them unfused."""
    method = layer.method
    if res is None:
        normed = rms_norm(x, None, nw, EPS)
    else:
        normed, res = rms_norm(x, res, nw, EPS)
    out = method.silu_mul(layer, normed) if gated else method.apply(layer, normed)
    return out, res, normed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--o-tiles", action="store_true", help="also time the output projection's whole-row tiles")
    args = parser.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator(device).manual_seed(0)
    results: dict = {"checks": [], "timing_us": {}}
    ok_all = True

    def record(what: str, ok: bool, **info) -> None:
        nonlocal ok_all
        ok_all &= bool(ok)
        results["checks"].append({"check": what, "ok": bool(ok), **info})
        print(f"check {what}: {'ok' if ok else 'FAILED'} {info}", flush=True)

    for name, shards, in_f, gated in SHAPES:
        layer = fp8_layer(name, shards, in_f, device, gen)
        w_deq = layer.method.dequantized_weight(layer)
        nw = (1 + 0.1 * torch.randn(in_f, device=device, generator=gen)).bfloat16()
        for with_res in (False, True):
            x = torch.randn(1, in_f, device=device, generator=gen).bfloat16()
            res = torch.randn(1, in_f, device=device, generator=gen).bfloat16() if with_res else None
            x0, res0 = x.clone(), None if res is None else res.clone()
            got, total = layer.method.norm_apply(layer, x, res, nw, EPS, silu_mul=gated)
            inputs_kept = torch.equal(x, x0) and (res is None or torch.equal(res, res0))
            want, want_total, _ = unfused(x.clone(), None if res is None else res.clone(), nw, layer, gated)
            summed = (x.float() + (0 if res is None else res.float())).bfloat16().float()
            ref = F.linear(summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + EPS) * nw.float(), w_deq)
            if gated:
                g, u = ref.chunk(2, dim=-1)
                ref = F.silu(g) * u
            err = rel(got, ref)
            same = (got == want).float().mean().item()
            sum_ok = total is None if res is None else torch.equal(total, want_total)
            record(f"{name} residual={with_res}", inputs_kept and sum_ok and err < (2e-2 if gated else 6e-3),
                   rel_err=err, unfused_rel_err=rel(want, ref), rel_to_unfused=rel(got, want), bits_equal_unfused=same,
                   max_abs_diff=(got.float() - want.float()).abs().max().item(), residual_sum_equal=sum_ok)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                graphed, _ = layer.method.norm_apply(layer, x, res, nw, EPS, silu_mul=gated)
            graph.replay()
            torch.cuda.synchronize()
            record(f"{name} residual={with_res} graph_replay_equal", torch.equal(graphed, got))

        # timing, with a residual (every layer but the first has one)
        copies = max(1, -(-L2_BYTES // layer.weight.numel()))
        layers = [layer] + [fp8_layer(name, shards, in_f, device, gen) for _ in range(copies - 1)]
        x = torch.randn(1, in_f, device=device, generator=gen).bfloat16()
        res = torch.randn(1, in_f, device=device, generator=gen).bfloat16()
        calls = [functools.partial(unfused, x, res, nw, layers[i % copies], gated) for i in range(32)]
        times = {"rmsnorm + gemv (engine's tiling)": graph_us(calls)}
        for tile in NORM_TILES:
            calls = [functools.partial(fg.fp8_norm_gemv, x, res, nw, EPS, layers[i % copies].weight,
                                       layers[i % copies].weight_scale, None, gated, tile) for i in range(32)]
            times[f"fused {tile}"] = graph_us(calls)
        results["timing_us"][name] = times
        for what, us in times.items():
            print(f"{name:14s} {what:34s} {us:7.2f} us", flush=True)
        del layers, layer
        torch.cuda.empty_cache()

    if not args.o_tiles:
        return finish(results, ok_all, args.out)
    # the output projection at one row: whole-row K tiles (the MoE output projection's choice)
    copies = max(1, -(-L2_BYTES // (4096 * 4096)))
    layers = [fp8_layer("o_proj", (4096,), 4096, device, gen) for _ in range(copies)]
    x = torch.randn(1, 4096, device=device, generator=gen).bfloat16()
    want = fg.fp8_gemv(x, layers[0].weight, layers[0].weight_scale, config=O_TILES[0])
    times = {}
    for tile in O_TILES:
        got = fg.fp8_gemv(x, layers[0].weight, layers[0].weight_scale, config=tile)
        record(f"o_proj {tile}", rel(got, want) < 6e-3, rel_to_shipped=rel(got, want))
        calls = [functools.partial(fg.fp8_gemv, x, layers[i % copies].weight, layers[i % copies].weight_scale,
                                   None, tile) for i in range(32)]
        times[str(tile)] = graph_us(calls)
        print(f"o_proj         {tile!s:34s} {times[str(tile)]:7.2f} us", flush=True)
    results["timing_us"]["o_proj"] = times
    return finish(results, ok_all, args.out)


def finish(results: dict, ok_all: bool, out: str) -> int:
    results["all_ok"] = ok_all
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "fp8_norm_check.json").write_text(json.dumps(results, indent=2))
    print(f"all checks {'passed' if ok_all else 'FAILED'}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
