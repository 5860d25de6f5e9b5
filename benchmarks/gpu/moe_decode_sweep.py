#!/usr/bin/env python3
"""The batch-1 decode kernels of Qwen3-30B-A3B on one GPU, checked and tuned: the few-token mixture-of-experts
kernels (``triton_moe.pair_gate_up`` and ``pair_down_sum``) and the Triton GEMV on the step's dense shapes.

Timing: each configuration runs as many calls inside one CUDA graph (launch gaps included, as in a decode step),
each call on weights no other call of the graph reads, so nothing comes from L2: the expert kernels on 16 disjoint
sets of 8 of the layer's 128 experts (at 1 token), the GEMV over enough weight copies to exceed L2. Floors are the
bytes read over the copy bandwidth (read + write, as ``moe_suite.py``'s step floor counts them).

1. **experts**: every gate/up tiling, then every down tiling (each kernel alone, without PDL), the best of each
   kept; then the whole few-token call with the best tiles, with and without programmatic dependent launch, at 1,
   2 and 4 tokens, against the bf16 PyTorch path and a float32 reference (relative errors) and run twice (equal).
2. **gemv**: the q/k/v (5120 x 2048), output (2048 x 4096), router (128 x 2048) and LM head (151936 x 2048)
   shapes in every tiling, beside cuBLAS.

``SWEEP_PAIR_CHUNKS=1`` sweeps the shipped few-token tiles beside the down kernel's chunk-by-chunk sums
(``down_reduce_each``; the register caps measured with them on 2026-12-07 were dropped: no gain in the engine);
``--experts-only`` skips the dense GEMVs. ``--write-configs`` writes the winners where the engine reads them (the
``"pair"`` entry of
``inferneo/kernels/moe_configs/E=128,N=768,K=2048,dtype=bfloat16.json`` and ``inferneo/kernels/gemv_configs.json``)
and copies both files to ``--out``, beside ``moe_decode_sweep.json`` / ``.log``. ``--smoke`` runs it all on CPU
under Triton's interpreter with tiny shapes and wall-clock timing (the numbers mean nothing; it checks the script).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from decode_sweep import copy_bandwidth, graph_time_us  # noqa: E402
from moe_kernel_sweep import SHAPES, call, make_layer, rel, route, timestamped_log  # noqa: E402

from inferneo.kernels import moe_tile_configs, triton_gemv, triton_moe  # noqa: E402
from inferneo.kernels.moe_tile_configs import PairTiles  # noqa: E402
from inferneo.model_executor.layers.moe import fused_experts  # noqa: E402

SHAPE = SHAPES["qwen3-30b-a3b"]
# (block_n, block_k, num_warps[, other PairTiles fields]); the plain ones are the winners of 2026-12-03 and their
# neighbours, the rest the K loop unrolled (K is a constant), chunk-by-chunk sums, an evict_first hint
_UR = {"up_unroll": 1, "up_reduce_each": 1}
UP_TILES = [(4, 1024, 4), (8, 1024, 4), (16, 512, 4), (8, 1024, 4, {"up_unroll": 1}),
            (8, 1024, 4, {"up_reduce_each": 1}), (8, 1024, 4, _UR), (8, 2048, 4, _UR), (16, 1024, 8, _UR),
            (4, 2048, 4, _UR), (16, 512, 4, _UR), (8, 512, 4, _UR), (8, 1024, 8, _UR), (8, 1024, 4, {"evict": 1})]
DOWN_TILES = [(2, 512, 4), (8, 256, 8), (16, 256, 8), (2, 256, 2), (8, 256, 8, {"down_unroll": 1}),
              (16, 256, 8, {"down_unroll": 1}), (4, 256, 4, {"down_unroll": 1}), (8, 256, 4, {"down_unroll": 1}),
              (16, 128, 8, {"down_unroll": 1}), (4, 256, 8, {"down_unroll": 1}), (8, 256, 8, {"evict": 1})]
if os.environ.get("SWEEP_PAIR_CHUNKS"):  # 2026-12-07: the shipped tiles beside the down kernel's chunk sums
    _SHIP_UP = {"up_unroll": 1, "evict": 1}
    UP_TILES = [(4, 2048, 4, _SHIP_UP), (4, 2048, 4, dict(_SHIP_UP, up_reduce_each=1)), (4, 2048, 8, _SHIP_UP),
                (2, 2048, 4, _SHIP_UP), (8, 2048, 8, dict(_SHIP_UP, up_reduce_each=1))]
    _SHIP_DOWN = {"down_unroll": 1, "evict": 1}
    _RD = dict(_SHIP_DOWN, down_reduce_each=1)
    DOWN_TILES = [(8, 256, 4, _SHIP_DOWN), (8, 256, 4, _RD), (4, 256, 4, _RD), (2, 256, 4, _RD), (2, 512, 4, _RD),
                  (2, 256, 4, _SHIP_DOWN), (2, 256, 2, _RD), (16, 256, 8, _RD), (4, 256, 8, _RD), (8, 256, 8, _RD),
                  (8, 128, 4, _RD)]
GEMV_SHAPES = {"qkv": (5120, 2048), "o": (2048, 4096), "router": (128, 2048), "lm_head": (151936, 2048)}
GEMV_TILES = [triton_gemv.DEFAULT_CONFIG, (1, 2048, 4), (1, 2048, 8), (2, 1024, 4), (2, 2048, 4), (4, 1024, 4),
              (4, 2048, 8), (8, 1024, 8), (8, 2048, 8), (2, 512, 2)]
L2_BYTES = 256 << 20  # what the calls of one graph read together, at least (H200 L2: 50 MiB)
DEVICE = "cuda"


def time_us(calls) -> float:
    """Mean microseconds of one of ``calls``: in one CUDA graph on the GPU, by the wall clock on CPU (smoke)."""
    if DEVICE == "cuda":
        return graph_time_us(calls)
    begin = time.perf_counter()
    for fn in calls:
        fn()
    return (time.perf_counter() - begin) * 1e6 / len(calls)


def expert_sets(routed, sets: int) -> list:
    """``sets`` one-token routings with the weights of ``routed`` and disjoint expert ids."""
    experts, top_k = SHAPE["experts"], SHAPE["top_k"]
    perm = torch.randperm(experts, device=routed.ids.device).to(routed.ids.dtype)
    return [type(routed)(weights=routed.weights.contiguous(), ids=perm[i * top_k:(i + 1) * top_k].view(1, top_k))
            for i in range(min(sets, experts // top_k))]


def sweep_experts(layer, bw: float, log) -> dict:
    device = layer["w13"].device
    hidden, inter, top_k = SHAPE["hidden"], SHAPE["inter"], SHAPE["top_k"]
    x = torch.randn(1, hidden, device=device, dtype=torch.bfloat16)
    sets = expert_sets(route(SHAPE, 1, device, seed=1), 16)
    up_floor = top_k * 2 * inter * hidden * 2 / bw * 1e6
    down_floor = top_k * hidden * inter * 2 / bw * 1e6
    out: dict = {"up": [], "down": [], "up_floor_us": up_floor, "down_floor_us": down_floor}
    best_up = best_down = None
    for n, k, warps, *extra in UP_TILES:
        tiles = PairTiles(up_block_n=n, up_block_k=k, up_num_warps=warps, **(extra[0] if extra else {}))
        us = time_us([functools.partial(triton_moe.pair_gate_up, x, layer["w13"], r.ids, "silu", None, tiles,
                                              False) for r in sets])
        out["up"].append({"block_n": n, "block_k": k, "num_warps": warps, **(extra[0] if extra else {}), "us": us,
                          "x_floor": us / up_floor})
        log(f"gate/up {n:2d} x {k:4d}, {warps} warps {extra}: {us:6.2f} us ({us / up_floor:.2f}x floor "
            f"{up_floor:.2f})")
        if best_up is None or us < best_up[0]:
            best_up = (us, tiles)
    rows = [triton_moe.pair_gate_up(x, layer["w13"], r.ids, "silu", None, best_up[1], False) for r in sets]
    for n, k, warps, *extra in DOWN_TILES:
        tiles = PairTiles(down_block_n=n, down_block_k=k, down_num_warps=warps, **(extra[0] if extra else {}))
        us = time_us([functools.partial(triton_moe.pair_down_sum, h, layer["w2"], r.weights, r.ids, None, tiles,
                                              False) for h, r in zip(rows, sets, strict=True)])
        out["down"].append({"block_n": n, "block_k": k, "num_warps": warps, **(extra[0] if extra else {}), "us": us,
                            "x_floor": us / down_floor})
        log(f"down    {n:2d} x {k:4d}, {warps} warps {extra}: {us:6.2f} us ({us / down_floor:.2f}x floor "
            f"{down_floor:.2f})")
        if best_down is None or us < best_down[0]:
            best_down = (us, tiles)
    d = best_down[1]
    best = replace(best_up[1], down_block_n=d.down_block_n, down_block_k=d.down_block_k,
                   down_num_warps=d.down_num_warps, down_unroll=d.down_unroll,
                   down_reduce_each=d.down_reduce_each)  # the evict hint: gate/up's
    out["best"] = best.to_json()
    log(f"best pair tiles {best}")
    # The whole call at 1, 2, 4 tokens: errors, repeatability, time with and without PDL, against the floor.
    out["calls"] = []
    f32 = {name: t.float() for name, t in layer.items()}
    expert_bytes = 3 * hidden * inter * 2
    for tokens in (1, 2, 4):
        x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
        routings = (sets if tokens == 1 else
                    [route(SHAPE, tokens, device, seed=100 * tokens + i) for i in range(16)])
        first = routings[0]
        got = triton_moe.triton_fused_experts(x, layer["w13"], layer["w2"], first.weights, first.ids,
                                              pair_tiles=best)
        again = triton_moe.triton_fused_experts(x, layer["w13"], layer["w2"], first.weights, first.ids,
                                                pair_tiles=best, pdl=DEVICE == "cuda")
        ref = call(f32, SHAPE, x.float(), first, kernel=fused_experts)
        torch_bf16 = call(layer, SHAPE, x, first, kernel=fused_experts)
        touched = sum(int(torch.unique(r.ids).numel()) for r in routings) / len(routings)
        row = {"tokens": tokens, "rel_err_vs_f32": rel(got, ref), "torch_bf16_rel_err_vs_f32": rel(torch_bf16, ref),
               "repeat_equal_pdl": bool(torch.equal(got, again)), "experts_touched": touched,
               "floor_us": touched * expert_bytes / bw * 1e6}
        for pdl in (False, DEVICE == "cuda"):  # no PDL under the interpreter
            row[f"us_pdl_{pdl}"] = time_us([functools.partial(
                triton_moe.triton_fused_experts, x, layer["w13"], layer["w2"], r.weights, r.ids, pair_tiles=best,
                pdl=pdl) for r in routings])
        row["x_floor"] = min(row[f"us_pdl_{pdl}"] for pdl in (False, True) if f"us_pdl_{pdl}" in row) / row["floor_us"]
        out["calls"].append(row)
        log(f"call T={tokens}: {row}")
    return out


def sweep_gemv(bw: float, log) -> dict:
    out: dict = {}
    for name, (n, k) in GEMV_SHAPES.items():
        nbytes = n * k * 2
        copies = max(2, min(512, -(-L2_BYTES // nbytes)))
        weights = [torch.randn((n, k), dtype=torch.bfloat16, device=DEVICE) * 0.02 for _ in range(copies)]
        x = torch.randn((1, k), dtype=torch.bfloat16, device=DEVICE)
        calls = max(copies, 16)
        floor_us = nbytes / bw * 1e6
        ref = F.linear(x.float(), weights[0].float())
        cublas = time_us([functools.partial(F.linear, x, weights[i % copies]) for i in range(calls)])
        rows = [{"impl": "cublas", "us": cublas, "x_floor": cublas / floor_us}]
        log(f"gemv {name} {n}x{k}: floor {floor_us:.2f} us, cuBLAS {cublas:.2f} us ({cublas / floor_us:.2f}x)")
        best = None
        for cfg in GEMV_TILES:
            err = rel(triton_gemv.gemv(x, weights[0], config=cfg, pdl=False), ref)
            us = time_us([functools.partial(triton_gemv.gemv, x, weights[i % copies], config=cfg, pdl=False)
                                for i in range(calls)])
            rows.append({"impl": "triton", "config": list(cfg), "us": us, "x_floor": us / floor_us, "rel_err": err})
            log(f"gemv {name} triton {cfg}: {us:.2f} us ({us / floor_us:.2f}x), rel err {err:.1e}")
            if best is None or us < best[0]:
                best = (us, cfg)
        out[name] = {"n": n, "k": k, "floor_us": floor_us, "rows": rows, "best": list(best[1]), "best_us": best[0],
                     "default_us": rows[1]["us"]}
        del weights
        torch.cuda.empty_cache()
    return out


def write_configs(results: dict, out: Path, log) -> None:
    moe_file = moe_tile_configs.CONFIG_DIR / moe_tile_configs.config_file_name(
        SHAPE["experts"], SHAPE["inter"], SHAPE["hidden"], torch.bfloat16)
    table = json.loads(moe_file.read_text())
    table[moe_tile_configs.PAIR_KEY] = results["experts"]["best"]
    moe_file.write_text(json.dumps(table, indent=1) + "\n")
    gemv = {f"{g['n']},{g['k']}": dict(zip(("block_n", "block_k", "num_warps"), g["best"], strict=True))
            for g in results["gemv"].values()}
    triton_gemv.TUNED_CONFIG_FILE.write_text(json.dumps(gemv, indent=1) + "\n")
    for path in (moe_file, triton_gemv.TUNED_CONFIG_FILE):
        shutil.copy(path, out / path.name.replace("=", "").replace(",", "_"))  # names the device tool brings back
        log(f"wrote {path}")


def _smoke() -> None:
    global DEVICE, SHAPE, UP_TILES, DOWN_TILES, GEMV_SHAPES, GEMV_TILES, L2_BYTES
    DEVICE, L2_BYTES = "cpu", 1
    SHAPE = dict(SHAPE, experts=16, hidden=64, inter=48)
    UP_TILES, DOWN_TILES = [UP_TILES[0], UP_TILES[min(5, len(UP_TILES) - 1)]], [DOWN_TILES[1], DOWN_TILES[4]]
    GEMV_SHAPES = {"qkv": (80, 64), "o": (64, 128)}
    GEMV_TILES = GEMV_TILES[:2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/moe_decode_sweep")
    parser.add_argument("--write-configs", action="store_true", help="write the winners where the engine reads them")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (TRITON_INTERPRET=1), to check it")
    parser.add_argument("--experts-only", action="store_true", help="the expert kernels only, not the dense GEMVs")
    args = parser.parse_args()
    if args.smoke:
        _smoke()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    log = timestamped_log(out / "moe_decode_sweep.log")
    bw = copy_bandwidth() if DEVICE == "cuda" else 1e11
    results: dict = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "copy_bytes_per_s": bw}
    log(f"{results['device']}: copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    layer = make_layer(SHAPE, torch.device(DEVICE))
    results["experts"] = sweep_experts(layer, bw, log)
    del layer
    torch.cuda.empty_cache()
    (out / "moe_decode_sweep.json").write_text(json.dumps(results, indent=1))
    if args.experts_only:
        log("done (experts only)")
        return
    results["gemv"] = sweep_gemv(bw, log)
    (out / "moe_decode_sweep.json").write_text(json.dumps(results, indent=1))
    if args.write_configs:
        write_configs(results, out, log)
    log("done")


if __name__ == "__main__":
    main()
