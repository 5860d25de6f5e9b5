#!/usr/bin/env python3
"""The one-row FP8 GEMV in packed half precision (tiling option ``h2``, ``triton_fp8_gemv._fp8_gemv_h2_kernel``) on
one GPU: checked against float32 and against the shipped kernel, then timed per Llama-2-7B layer (issue 20).

1. ``check``: on the four Llama-2-7B layer shapes with per-row and per-tensor scales, the h2 kernel's relative error
   against ``F.linear(x.float(), W)`` on the de-quantized weight beside the shipped kernel's (both must stay below
   6e-3 in bf16, the GEMV's documented bound); the fused gate/up + SiLU in h2 equal bit for bit to the h2 GEMV
   followed by the SiLU-and-mul kernel; activations with outlier columns (|x| up to 30,000: float16 sums overflow,
   the kernel's float32 fallback must give the same error as the shipped kernel); a CUDA-graph replay equal to the
   eager call; and the engine's FP8 layer with a tiling file naming h2 equal bit for bit to the kernel called
   directly (the engine takes the h2 path).
2. ``sweep``: at one row, the shipped tiling and the h2 tilings (:data:`H2_TILES`), each timed as 32 calls over
   weight copies that together exceed L2 in one CUDA graph (``fp8_gemv_sweep.sweep``). Writes the winners into a
   tiling file ``fp8_gemv_configs-h2.json`` (the shipped file with the one-row entries replaced where an h2 tiling
   won) and ``fp8_h2_tiles.json`` (the replaced entries, for ``quant_suite.py --fp8-tiles``).

Writes ``fp8_h2_check.json`` to ``--out``. ``--smoke``: the checks on CPU with small shapes under
``TRITON_INTERPRET=1`` (the interpreter runs no PTX: the kernel's emulation there computes float32 products, so it
checks the plumbing, not the rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fp8_gemv_sweep import LAYERS, fp8_layer, rel, sweep  # noqa: E402

from inferneo.kernels import triton_fp8_gemv as fg  # noqa: E402
from inferneo.kernels._triton_elementwise import silu_and_mul  # noqa: E402
from inferneo.quantization.fp8_math import dequantize, quantize_groups, quantize_per_tensor  # noqa: E402

# (sm_90 SASS compiled off the GPU, instructions per weight byte in the K loop: (16, 512, 4) 2.55, (16, 512, 2) 2.0,
# (8, 512, 2) 2.3, (16, 1024, 4) 2.0; gated (16, 512, 2) 1.8; the shipped CUDA-core tiling: 4.9)
H2_PLAIN = [(16, 512, 4, "h2"), (16, 512, 2, "h2"), (8, 512, 2, "h2"), (16, 1024, 4, "h2"), (32, 512, 8, "h2")]
H2_GATED = [(16, 512, 2, "h2"), (8, 512, 2, "h2"), (8, 512, 4, "h2"), (16, 512, 4, "h2")]
# --wide (second call): the h2 kernel in the shipped tilings' geometry (as many bytes per program and K step as the
# tilings that won for the plain kernel: the first call's narrow h2 tiles lost on every layer, most where they left
# the fewest bytes in flight, the 4096-row down projection)
H2_WIDE = {"qkv": [(4, 1024, 4, "h2"), (8, 1024, 8, "h2"), (8, 2048, 8, "h2"), (16, 1024, 8, "h2")],
           "o": [(4, 2048, 8, "h2"), (8, 2048, 8, "h2"), (4, 1024, 4, "h2"), (8, 1024, 8, "h2")],
           "gate_up": [(4, 1024, 4, "h2"), (8, 1024, 8, "h2"), (4, 2048, 8, "h2")],
           "down": [(8, 2048, 8, "h2"), (4, 2048, 8, "h2"), (8, 1024, 8, "h2"), (16, 2048, 16, "h2")]}
# --whole (2026-12-04, branch h-fp8d): each program's whole weight rows in one tile (BLOCK_K = K for the 4096-wide
# layers; 4096 or 8192 codes a tile for the down projection), so that all of a program's weight loads are issued
# before its PDL wait, as bf16's GEMV (1, 1024, 4) issues all of its tiles' loads at once (sm_90a SASS compiled
# here: its four 16-byte weight loads a thread come back to back; the shipped h2 tilings issue the second tile's
# loads only after the activations' shared-memory exchange, its barriers and part of the first tile's products)
H2_WHOLE = {"qkv": [(2, 4096, 4, "h2"), (4, 4096, 4, "h2"), (4, 4096, 8, "h2"), (8, 4096, 8, "h2"),
                    (8, 4096, 16, "h2")],
            "o": [(2, 4096, 4, "h2"), (4, 4096, 4, "h2"), (4, 4096, 8, "h2"), (8, 4096, 8, "h2"),
                  (8, 4096, 16, "h2")],
            "gate_up": [(2, 4096, 4, "h2"), (2, 4096, 8, "h2"), (4, 4096, 8, "h2"), (1, 4096, 4, "h2")],
            "down": [(4, 4096, 8, "h2"), (8, 4096, 16, "h2"), (16, 4096, 16, "h2"), (8, 8192, 16, "h2"),
                     (4, 8192, 16, "h2")]}
CHECK_TILE = (16, 512, 4, "h2")


def check(device: torch.device, small: bool) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    results = []

    def record(what: str, ok: bool, **info) -> None:
        results.append(dict(check=what, ok=bool(ok), **info))
        print(f"check {what}: {'ok' if ok else 'FAIL'} {info}", flush=True)

    shapes = {"small": (64, 256), "odd": (40, 264)} if small else {
        name: (sum(shards), in_f) for name, (shards, in_f) in LAYERS.items()}
    for name, (n, k) in shapes.items():
        w = torch.empty(n, k, device=device).uniform_(-0.02, 0.02, generator=gen)
        for kind in ("row", "tensor"):
            if kind == "tensor":
                q, s = quantize_per_tensor(w)
                w_deq = dequantize(q, s)
            else:
                q, s = quantize_groups(w)
                w_deq, s = dequantize(q, s), s.reshape(-1)
            for what, scale_x in (("normal", None), ("outliers", 30000.0)):
                x = torch.randn(1, k, device=device, generator=gen)
                if scale_x:  # a few huge columns (massive activations): float16 sums overflow -> float32 fallback
                    x[0, :: max(1, k // 8)] *= scale_x
                x = x.bfloat16()
                ref = F.linear(x.float(), w_deq)
                got = fg.fp8_gemv(x, q, s, config=CHECK_TILE)
                base = fg.fp8_gemv(x, q, s, config=(4, 1024, 4))
                err, err_base = rel(got, ref), rel(base, ref)
                record("h2_vs_f_linear", err < 6e-3 and torch.isfinite(got).all().item(), layer=name, n=n, k=k,
                       scale=kind, x=what, rel_err=err, shipped_rel_err=err_base,
                       max_abs_vs_shipped=(got.float() - base.float()).abs().max().item())
            if n % 2 == 0 and (n // 2) % 8 == 0:
                x = torch.randn(1, k, device=device, generator=gen).bfloat16()
                fused = fg.fp8_gemv_silu_mul(x, q, s, config=CHECK_TILE)
                unfused = silu_and_mul(fg.fp8_gemv(x, q, s, config=CHECK_TILE))
                record("h2_silu_fused_equals_unfused", torch.equal(fused, unfused), layer=name, scale=kind,
                       max_diff=(fused.float() - unfused.float()).abs().max().item())
                ref = silu_and_mul(F.linear(x.float(), w_deq).bfloat16())
                record("h2_silu_vs_reference", rel(fused, ref) < 1e-2, layer=name, scale=kind,
                       rel_err=rel(fused, ref),
                       shipped_rel_err=rel(fg.fp8_gemv_silu_mul(x, q, s, config=(4, 1024, 4)), ref))
    if device.type == "cuda":
        q, s = quantize_groups(w)
        x = torch.randn(1, w.shape[1], device=device, generator=gen).bfloat16()
        eager = fg.fp8_gemv(x, q, s.reshape(-1), config=CHECK_TILE)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graphed = fg.fp8_gemv(x, q, s.reshape(-1), config=CHECK_TILE)
        graph.replay()
        torch.cuda.synchronize()
        record("h2_graph_replay_equal", torch.equal(eager, graphed))
    if device.type == "cuda":  # (off CUDA the engine's layer runs its PyTorch reference)
        _engine_check(device, small, gen, record)
    return results


def _engine_check(device, small, gen, record, tile: tuple = CHECK_TILE, label: str = "engine_layer_takes_h2") -> None:
    # the engine's layer through a tiling file naming ``tile``: the same bits as the kernel called with that tiling
    shards, in_f = ((32, 32), 256) if small else LAYERS["qkv"]
    layer = fp8_layer("qkv_proj", shards, in_f, device, gen)
    n = sum(shards)
    table = json.loads(fg.CONFIG_FILE.read_text())
    table["shapes"][f"{n},{in_f},1"] = fg.tile_to_json(tile)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / "fp8_h2_check_tiles.json"
    path.write_text(json.dumps(table))
    os.environ["INFERNEO_FP8_GEMV_CONFIGS"] = str(path)
    fg._tuned.cache_clear()
    try:
        x = torch.randn(1, in_f, device=device, generator=gen).bfloat16()
        got = layer(x)
        direct = fg.fp8_gemv(x, layer.weight, layer.weight_scale.reshape(-1), config=tile)
        record(label, fg.fp8_gemv_config(n, in_f, 1) == tile and torch.equal(got, direct), rows=1,
               max_diff=(got.float() - direct.float()).abs().max().item())
    finally:
        os.environ.pop("INFERNEO_FP8_GEMV_CONFIGS")
        fg._tuned.cache_clear()


def _layer_of(n: int, k: int) -> str:
    return next(name for name, (shards, in_f) in LAYERS.items() if (sum(shards), in_f) == (n, k))


def h2_plan(n: int, k: int, m: int) -> list[tuple]:
    """The shipped one-row tiling, then the h2 tilings (gate/up: :data:`H2_GATED`)."""
    shipped = fg.fp8_gemv_config(n, k, 1)
    return [shipped, *(H2_GATED if n == sum(LAYERS["gate_up"][0]) else H2_PLAIN)]


def wide_plan(n: int, k: int, m: int, table: dict | None = None) -> list[tuple]:
    """The shipped one-row tiling, then :data:`H2_WIDE` (or ``table``'s tilings of the layer)."""
    return [fg.fp8_gemv_config(n, k, 1), *(table or H2_WIDE)[_layer_of(n, k)]]


def whole_plan(n: int, k: int, m: int) -> list[tuple]:
    """The shipped one-row tiling, then :data:`H2_WHOLE`."""
    return wide_plan(n, k, m, H2_WHOLE)


def check_wide(device: torch.device, table: dict | None = None) -> list[dict]:
    """Each :data:`H2_WIDE` (or ``table``) tiling on its layer against ``F.linear`` (per-row scales; gate/up with
    SiLU)."""
    gen = torch.Generator(device=device).manual_seed(2)
    results = []
    for name, tiles in (table or H2_WIDE).items():
        shards, k = LAYERS[name]
        n = sum(shards)
        q, s = quantize_groups(torch.empty(n, k, device=device).uniform_(-0.02, 0.02, generator=gen))
        w_deq, s = dequantize(q, s), s.reshape(-1)
        x = torch.randn(1, k, device=device, generator=gen).bfloat16()
        ref = F.linear(x.float(), w_deq)
        if name == "gate_up":
            ref = silu_and_mul(ref.bfloat16())
        fn = fg.fp8_gemv_silu_mul if name == "gate_up" else fg.fp8_gemv
        xo = x.clone()  # outlier columns (float16 sums overflow: the float32 fallback)
        xo[0, :: max(1, k // 8)] *= 30000.0
        ref_o = F.linear(xo.float(), w_deq)
        if name == "gate_up":
            ref_o = silu_and_mul(ref_o.bfloat16())
        for tile in tiles:
            for what, xx, rr in (("normal", x, ref), ("outliers", xo, ref_o)):
                got = fn(xx, q, s, config=tile)
                err = rel(got, rr)
                ok = err < (1e-2 if name == "gate_up" else 6e-3) and torch.isfinite(got).all().item()
                results.append(dict(check="h2_wide_vs_f_linear", ok=ok, layer=name, tile=list(tile), x=what,
                                    rel_err=err))
                print(f"check h2_wide_vs_f_linear {name} {tile} {what}: {'ok' if ok else 'FAIL'} rel_err {err:.2e}",
                      flush=True)
        if device.type == "cuda":  # a CUDA-graph replay equals the eager call (the layer's first tiling)
            eager = fn(x, q, s, config=tiles[0])
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                graphed = fn(x, q, s, config=tiles[0])
            graph.replay()
            torch.cuda.synchronize()
            ok = torch.equal(eager, graphed)
            results.append(dict(check="h2_wide_graph_replay_equal", ok=ok, layer=name, tile=list(tiles[0])))
            print(f"check h2_wide_graph_replay_equal {name} {tiles[0]}: {'ok' if ok else 'FAIL'}", flush=True)
    return results


def write_winning_tiles(out: Path, result: dict, option: str, script: str, failed: list) -> None:
    """The sweep's winning tilings that use ``option`` (none when a check failed): ``$OUT/fp8_<option>_tiles.json``,
    and the shipped tiling file with them merged in, ``$OUT/fp8_gemv_configs-<option>.json`` (copied into the tree
    by hand after a look)."""
    table = json.loads(fg.CONFIG_FILE.read_text())
    tiles = {}
    for key, entry in result["sweep"]["configs"].items():
        if option in entry.get("options", ()) and not failed:
            tiles[key] = entry
            table["shapes"][key] = entry
    table["measured"] = table.get("measured", "") + f"; one-row {option} entries: {result['device']}, " \
        f"{result['date']}, benchmarks/gpu/{script}"
    (out / f"fp8_gemv_configs-{option}.json").write_text(json.dumps(table, indent=1) + "\n")
    (out / f"fp8_{option}_tiles.json").write_text(json.dumps(tiles) + "\n")
    print(f"{option} tiles that won: {json.dumps(tiles)}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or ".")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument("--wide", action="store_true", help="only the H2_WIDE tilings: checked, then timed")
    parser.add_argument("--whole", action="store_true", help="only the H2_WHOLE tilings: checked, then timed")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
                  device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    result["check"] = check_wide(device, H2_WHOLE if args.whole else None) if args.wide or args.whole else \
        check(device, small=args.smoke)
    failed = [c for c in result["check"] if not c["ok"]]
    if not args.smoke:
        plan = whole_plan if args.whole else wide_plan if args.wide else h2_plan
        result["sweep"] = sweep(device, args.deadline, plan, (1,), (), bf16=args.whole)
        write_winning_tiles(out, result, "h2", "fp8_h2_check.py", failed)
    (out / "fp8_h2_check.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"checks: {len(result['check']) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
