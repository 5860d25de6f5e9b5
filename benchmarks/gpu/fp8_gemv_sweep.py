#!/usr/bin/env python3
"""The FP8 weight-only GEMV (``inferneo/kernels/triton_fp8_gemv.py``) on one GPU: checked, tiled, and timed against
the W8A8 path and bf16, on Llama-2-7B's layer shapes (issue 20).

1. ``check``: the kernel against ``F.linear`` of the unquantized activations and the de-quantized weight
   (per-tensor, per-row and 128 x 128 block scales; 1 and 5 rows; relative error below 6e-3 in bf16), the
   fused gate/up + SiLU equal bit for bit to the GEMV followed by the SiLU-and-mul kernel, a CUDA-graph replay equal
   to the eager call, and the engine's FP8 layer (``Fp8LinearMethod``) against its reference at rows that take the
   GEMV and rows that take ``torch._scaled_mm``.
2. ``sweep``: per layer (q/k/v, output projection, gate/up with SiLU fused, down) and per row count (1, 2, 4, 8),
   a few tilings, each timed as 32 calls over weight copies that together exceed L2, in one CUDA graph (what a
   decode step pays per layer); beside them the W8A8 path (per-token activation quantization + ``_scaled_mm``, and
   SiLU-and-mul after gate/up) at 1-16 rows and the bf16 Triton GEMV at one row. ``max_rows`` is the largest row
   count up to which the GEMV's sum over the four layers beats the W8A8 path's at every count.
   ``--write-configs`` writes the winners and ``max_rows`` to ``inferneo/kernels/fp8_gemv_configs.json`` (where the
   engine reads them) and to ``--out``.

Writes ``fp8_gemv_sweep.json`` to ``--out`` (default ``$OUT``). ``--smoke`` runs the check on CPU with small shapes
under ``TRITON_INTERPRET=1`` (it checks the script).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1])]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from inferneo.kernel_config import KernelConfig  # noqa: E402
from inferneo.kernels import triton_fp8_gemv as fg  # noqa: E402
from inferneo.kernels._triton_elementwise import silu_and_mul  # noqa: E402
from inferneo.quantization.base import LinearShape, QuantizedLinear  # noqa: E402
from inferneo.quantization.fp8 import Fp8LinearMethod, Fp8Scheme  # noqa: E402
from inferneo.quantization.fp8_math import dequantize, quantize_blocks, quantize_groups, quantize_per_tensor  # noqa: E402

# name: (output shards, in_features); gate_up runs fused with SiLU
LAYERS = {"qkv": ((4096, 4096, 4096), 4096), "o": ((4096,), 4096), "gate_up": ((11008, 11008), 4096),
          "down": ((4096,), 11008)}
ROWS = (1, 2, 4, 8)
W8A8_ROWS = (1, 2, 4, 8, 16)
# Tilings per row count: several output rows per program share each activation tile read (at one output row a
# program would read two bytes of activations per byte of weight); the float32 products of a tile stay at about
# 32 registers a thread.
CONFIGS = {1: [(2, 2048, 4), (1, 2048, 4), (4, 1024, 4), (4, 2048, 8), (8, 1024, 8), (8, 2048, 8)],
           2: [(4, 512, 4), (2, 1024, 4), (8, 512, 8), (4, 1024, 8)],
           4: [(4, 256, 4), (4, 512, 8), (8, 256, 8)],
           8: [(8, 256, 8), (4, 256, 8), (8, 128, 8)]}
# The tensor-core kernel (a fourth number, num_stages): 16 rows per tile whatever the row count up to 16, so one
# compile serves every row count; timed at 1, 4 and 16 rows with ``--dot``.
DOT_CONFIGS = [(16, 256, 4, 4), (32, 256, 4, 4), (16, 512, 4, 3)]
DOT_CHECK = (16, 128, 4, 3)  # BLOCK_K 128: fits 128-wide scale blocks
DOT_ROWS = (1, 4, 16)
# --options: at one row, CUDA-core tilings where each thread holds 2-8 weight rows of the same columns (BLOCK_K
# 512: one warp spans the tile's width), so that each activation it converts to float32 serves several rows: on
# sm_90 SASS (compiled here) these take 3.2-3.5 instructions per weight against 4.9 for the shipped (4, 1024, 4);
# at 16 to 64 rows the tensor-core tilings plain and with "bits" (no float32 -> bfloat16 conversion per weight).
OPTION_ROW1 = [(8, 512, 2), (16, 512, 4), (32, 512, 8), (16, 512, 2), (8, 512, 1), (4, 1024, 4), (8, 2048, 8)]
OPTION_DOT = [(32, 256, 4, 4), (64, 256, 4, 3), (32, 128, 4, 4)]
OPTION_ROWS = (1, 16, 32, 64)
OPTION_CHECK = ((16, 512, 4), (16, 128, 4, 3, "bits"))
L2_BYTES = 256 * 2**20  # weight copies per timing: together more than this (the H200's L2 is 50 MB)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def graph_us(calls) -> float:
    """Mean microseconds of one of ``calls`` when all run in one CUDA graph (``decode_sweep.graph_time_us``;
    eager wall time off CUDA)."""
    if torch.cuda.is_available():
        from decode_sweep import graph_time_us  # beside this script

        return graph_time_us(calls)
    start = time.perf_counter()
    for call in calls:
        call()
    return (time.perf_counter() - start) * 1e6 / len(calls)


def fp8_layer(name: str, shards: tuple[int, ...], in_f: int, device: torch.device, gen: torch.Generator):
    """The engine's FP8 layer (online per-channel scheme, dummy weights), finalized as after loading."""
    method = Fp8LinearMethod(Fp8Scheme("channel", None, "dynamic_token", checkpoint=False))
    layer = QuantizedLinear(method, LinearShape(f"layers.0.mlp.{name}", in_f, shards), False, torch.bfloat16, device)
    method.init_dummy(layer, gen)
    method.finalize(layer, KernelConfig())
    return layer


# ---- 1. correctness ---------------------------------------------------------------------------------------------


def check(device: torch.device, small: bool, tiles: tuple = (None, DOT_CHECK), quick: bool = False) -> list[dict]:
    """The correctness checks, for each of ``tiles`` (None: the shipped or default tiling); ``quick``: one shape,
    per-row and block scales, and not the engine's layer."""
    gen = torch.Generator(device=device).manual_seed(0)
    results = []

    def record(what: str, ok: bool, **info) -> None:
        results.append(dict(check=what, ok=bool(ok), **info))
        print(f"check {what}: {'ok' if ok else 'FAIL'} {info}", flush=True)

    shapes = ((40, 300), (64, 256)) if small else ((4096, 4096), (4096, 11008))
    for n, k in shapes[:1] if quick else shapes:
        w = torch.empty(n, k, device=device).uniform_(-0.02, 0.02, generator=gen)
        for kind in ("row", "block") if quick else ("tensor", "row", "block"):
            if kind == "tensor":
                q, s = quantize_per_tensor(w)
                block, w_deq = None, dequantize(q, s)
            elif kind == "row":
                q, s = quantize_groups(w)
                block, w_deq, s = None, dequantize(q, s), s.reshape(-1)
            else:
                block = (16, 128) if small else (128, 128)
                q, s = quantize_blocks(w, block)
                w_deq = dequantize(q, s, block)
            for tile in tiles:
                dot = tile is not None and len(fg.split_tile(tile)[0]) == 4
                for m in (1, 16) if dot else (1, 5):
                    x = torch.randn(m, k, device=device, generator=gen).bfloat16()
                    got = fg.fp8_gemv(x, q, s, block, config=tile)
                    err = rel(got, F.linear(x.float(), w_deq))
                    record("gemv_vs_f_linear", err < 6e-3, n=n, k=k, scale=kind, rows=m, tile=tile, rel_err=err)
                    if tile is not None and "bits" in tile:  # the integer widening changes no bit
                        plain = fg.fp8_gemv(x, q, s, block, config=tuple(v for v in tile if v != "bits"))
                        record("bits_equal_conversion", torch.equal(got, plain), scale=kind, rows=m, tile=tile,
                               max_diff=(got.float() - plain.float()).abs().max().item())
                if n != shapes[0][0] or (block is not None and (n // 2) % block[0]):
                    continue
                for m in (1, 4):  # gate/up + SiLU fused against the GEMV then the SiLU-and-mul kernel
                    x = torch.randn(m, k, device=device, generator=gen).bfloat16()
                    fused = fg.fp8_gemv_silu_mul(x, q, s, block, config=tile)
                    unfused = silu_and_mul(fg.fp8_gemv(x, q, s, block, config=tile or fg.fp8_gemv_config(n, k, m)))
                    record("silu_fused_equals_unfused", torch.equal(fused, unfused), scale=kind, rows=m, tile=tile,
                           max_diff=(fused.float() - unfused.float()).abs().max().item())
    if device.type == "cuda":
        q, s = quantize_groups(w)
        x = torch.randn(1, w.shape[1], device=device, generator=gen).bfloat16()
        eager = fg.fp8_gemv(x, q, s.reshape(-1))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graphed = fg.fp8_gemv(x, q, s.reshape(-1))
        graph.replay()
        torch.cuda.synchronize()
        record("graph_replay_equal", torch.equal(eager, graphed))
    if quick:
        return results
    # The engine's layer: rows up to max_rows take the GEMV (reference: unquantized activations), more rows the
    # W8A8 path (reference: per-token e4m3 activations).
    shards, in_f = ((32, 32), 64) if small else LAYERS["gate_up"]
    layer = fp8_layer("gate_up_proj", shards, in_f, device, gen)
    for m in sorted({1, fg.max_rows(), fg.max_rows() + 1, 16}):
        x = torch.randn(m, in_f, device=device, generator=gen).bfloat16()
        err = rel(layer(x), layer.method.reference(layer, x))
        gemv = layer.method.takes_gemv(layer, m)
        record("layer_vs_reference", err < 6e-3, rows=m, kernel="gemv" if gemv else layer.fp8_kernel, rel_err=err)
    return results


# ---- 2. tiling and timing ---------------------------------------------------------------------------------------


def _w8a8(layer: QuantizedLinear, x: torch.Tensor, silu: bool) -> torch.Tensor:
    """The engine's layer with the GEMV off (quantize the activations, ``_scaled_mm``), then SiLU-and-mul after
    gate/up."""
    y = layer(x)
    return silu_and_mul(y) if silu else y


def full_plan(n: int, k: int, m: int) -> list[tuple]:
    """The CUDA-core tilings of :data:`CONFIGS`, then the tensor-core ones."""
    return [*CONFIGS.get(m, []), *DOT_CONFIGS]


def option_plan(n: int, k: int, m: int) -> list[tuple]:
    """``--options``: at one row the shipped tiling, then :data:`OPTION_ROW1` and two tensor-core tilings with
    ``bits``; at more rows the tensor-core tilings :data:`OPTION_DOT` plain and with ``bits``."""
    if m == 1:
        shipped = fg.fp8_gemv_config(n, k, 1)
        return [shipped, *[t for t in OPTION_ROW1 if t != shipped], *[t + ("bits",) for t in OPTION_DOT[:2]]]
    return [t + o for t in OPTION_DOT for o in ((), ("bits",))]


def dot_plan(n: int, k: int, m: int) -> list[tuple]:
    """The tensor-core tilings (and at one row the shipped tiling beside them)."""
    return [fg.fp8_gemv_config(n, k, 1), *DOT_CONFIGS] if m == 1 else list(DOT_CONFIGS)


def fill_dot_rows(best: dict[str, dict], row_blocks: tuple[int, ...]) -> None:
    """Row blocks up to 16 that were not timed take the entry of the next larger timed one when that is a
    tensor-core tiling (it computes a 16-row tile at every row count up to 16: the same work)."""
    for key in list(best):
        n, k, bm = (int(v) for v in key.split(","))
        for smaller in (2, 4, 8, 16):
            if smaller < bm and smaller not in row_blocks and f"{n},{k},{smaller}" not in best \
                    and "num_stages" in best[key] and not any(smaller < b < bm for b in row_blocks):
                best[f"{n},{k},{smaller}"] = dict(best[key])


def sweep(device: torch.device, deadline: float, plan=full_plan, gemv_rows: tuple[int, ...] = ROWS + (16,),
          w8a8_rows: tuple[int, ...] = W8A8_ROWS, bf16: bool = True) -> dict:
    from inferneo.kernels.triton_gemv import gemv, gemv_silu_mul

    gen = torch.Generator(device=device).manual_seed(1)
    rows_out, best = [], {}
    totals = {"gemv": {m: 0.0 for m in gemv_rows}, "w8a8": {m: 0.0 for m in w8a8_rows}, "bf16": {1: 0.0}}
    start = time.monotonic()
    for name, (shards, in_f) in LAYERS.items():
        n = sum(shards)
        copies = max(2, min(12, math.ceil(L2_BYTES / (n * in_f))))
        layers = [fp8_layer(f"{name}_proj", shards, in_f, device, gen) for _ in range(copies)]
        dense = [torch.empty(n, in_f, dtype=torch.bfloat16, device=device).uniform_(-0.02, 0.02, generator=gen)
                 for _ in range(copies if bf16 else 0)]
        silu = name == "gate_up"
        for m in sorted(set(w8a8_rows) | set(gemv_rows)):
            x = torch.randn(m, in_f, device=device, generator=gen).bfloat16()
            if m in w8a8_rows:
                for layer in layers:
                    layer.fp8_gemv = False
                us = graph_us([functools.partial(_w8a8, layers[i % copies], x, silu) for i in range(32)])
                for layer in layers:
                    layer.fp8_gemv = True
                totals["w8a8"][m] += us
                rows_out.append(dict(layer=name, rows=m, impl="w8a8", us=round(us, 2)))
                print(f"{name:8s} rows {m:2d} W8A8 (quant + _scaled_mm{' + silu' if silu else ''}): {us:7.2f} us",
                      flush=True)
            if m == 1 and bf16:
                fn = gemv_silu_mul if silu else gemv
                us = graph_us([functools.partial(fn, x, dense[i % copies]) for i in range(32)])
                totals["bf16"][1] += us
                rows_out.append(dict(layer=name, rows=1, impl="bf16_gemv", us=round(us, 2)))
                print(f"{name:8s} rows  1 bf16 Triton GEMV: {us:7.2f} us", flush=True)
            if m not in gemv_rows:
                continue
            fn = fg.fp8_gemv_silu_mul if silu else fg.fp8_gemv
            timed = []
            for cfg in plan(n, in_f, m):
                if time.monotonic() - start > deadline and timed:
                    break
                try:
                    us = graph_us([functools.partial(fn, x, layers[i % copies].weight, layers[i % copies].weight_scale,
                                                     config=cfg) for i in range(32)])
                except Exception as exc:  # noqa: BLE001 - report the tiling and go on
                    print(f"{name} rows {m} {cfg}: {type(exc).__name__}: {exc}", flush=True)
                    continue
                timed.append((us, cfg))
                rows_out.append(dict(layer=name, rows=m, impl="fp8_gemv", config=list(cfg), us=round(us, 2),
                                     gb_per_s=round(n * in_f / us / 1e3, 1)))
                print(f"{name:8s} rows {m:2d} FP8 GEMV {cfg}: {us:7.2f} us", flush=True)
            us, cfg = min(timed)
            totals["gemv"][m] += us
            best[f"{n},{in_f},{fg.block_rows(m)}"] = fg.tile_to_json(cfg)
        layers.clear()
        dense.clear()
        torch.cuda.empty_cache()
    fill_dot_rows(best, tuple(fg.block_rows(m) for m in gemv_rows))
    max_rows = 0
    for m in sorted(gemv_rows):
        if m not in w8a8_rows or totals["gemv"][m] >= totals["w8a8"][m]:
            break
        max_rows = m
    print(f"per-layer-set totals (us): {json.dumps(totals)}; GEMV up to {max_rows} rows", flush=True)
    return dict(rows=rows_out, totals=totals, max_rows=max_rows, configs=best,
                sweep_s=round(time.monotonic() - start, 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or ".")
    parser.add_argument("--smoke", action="store_true", help="the check on CPU with small shapes (interpreter)")
    parser.add_argument("--write-configs", action="store_true", help="write the winners where the engine reads them")
    parser.add_argument("--deadline", type=float, default=100.0, help="seconds for the sweep (then the first tiling)")
    parser.add_argument("--dot", action="store_true", help="only the tensor-core tilings (checked, timed at 1, 4 and "
                        "16 rows beside the shipped tiling at one row and W8A8), merged into the shipped file")
    parser.add_argument("--options", action="store_true", help="more CUDA-core tilings at 1 row and the tensor-core "
                        "ones plain and with 'bits' at 16-64 rows, beside W8A8, merged into the shipped file")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:  # the interpreter's gaps (tl.dot on bfloat16), patched as the tests patch them
        sys.path.insert(0, str(HERE.parents[1] / "tests"))
        from triton_interpreter_shims import patch_interpreter

        patch_interpreter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
                  device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    tiles = (DOT_CHECK,) if args.dot else OPTION_CHECK if args.options else (None, DOT_CHECK)
    result["check"] = check(device, small=args.smoke, tiles=tiles, quick=args.dot)
    failed = [c for c in result["check"] if not c["ok"]]
    (out / "fp8_gemv_sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    if not args.smoke:
        if args.dot:
            result["sweep"] = sweep(device, args.deadline, dot_plan, DOT_ROWS, DOT_ROWS, bf16=False)
        elif args.options:
            result["sweep"] = sweep(device, args.deadline, option_plan, OPTION_ROWS, OPTION_ROWS)
        else:
            result["sweep"] = sweep(device, args.deadline)
        merge = args.dot or args.options
        shipped = json.loads(fg.CONFIG_FILE.read_text()).get("shapes", {}) if merge else {}
        flag = " --dot" if args.dot else " --options" if args.options else ""
        table = {"max_rows": result["sweep"]["max_rows"], "measured": f"{result['device']}, {result['date']}, "
                 f"benchmarks/gpu/fp8_gemv_sweep.py{flag}",
                 "shapes": {**shipped, **result["sweep"]["configs"]}}
        (out / "fp8_gemv_configs.json").write_text(json.dumps(table, indent=1) + "\n")
        if args.write_configs and result["sweep"]["max_rows"] >= 1 and not failed:
            fg.CONFIG_FILE.write_text(json.dumps(table, indent=1) + "\n")
            print(f"wrote {fg.CONFIG_FILE.relative_to(HERE.parents[1])}", flush=True)
    (out / "fp8_gemv_sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"checks: {len(result['check']) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
