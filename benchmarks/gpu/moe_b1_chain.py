#!/usr/bin/env python3
"""The batch-1 Qwen3-30B-A3B layer chain on one GPU: GEMV tiles and expert tiles under early or late PDL launch.

One decode layer at one token is eight launches (input norm + q/k/v GEMV, q/k norm + rotary + KV store, decode
attention and its reduction, output GEMV, post-attention norm + router GEMV, routing, gate/up experts, down experts);
this script runs 48 of them in one CUDA graph with programmatic dependent launch, each layer on its own weights
(four sets cycled, so nothing of a layer is in L2 from the layer before), 1,041 tokens of context, and reports the
time per layer for each variant: the output projection's GEMV tiles (whole 4,096-wide rows, all read before the
GEMV waits, against the tuned ones), the q/k/v norm + GEMV's rows per program, decode attention's split count, an
``evict_first`` hint on the expert weights. Whether the kernels launch their dependents early
(``INFERNEO_CUDA_PDL_EARLY``, read at import) is the process's: run it once with each setting.

Every variant's output after 48 layers is compared with the first variant's (the GEMV tiles change the summation
order of the output projection, so small differences there are expected; the hint none). ``--write-configs``
writes the fastest output-projection tiles and q/k/v norm + GEMV rows into ``inferneo/kernels/gemv_configs.json``
when they beat the tuned ones by more than 0.3 us a layer. ``--smoke``: on CPU under Triton's interpreter with tiny
shapes (it checks the script).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import torch  # noqa: E402

from inferneo import envs  # noqa: E402
from inferneo.kernels import _triton_elementwise as elementwise  # noqa: E402
from inferneo.kernels import triton_attention, triton_gemv, triton_moe, triton_routing  # noqa: E402
from inferneo.kernels.moe_tile_configs import PairTiles, pair_tiles  # noqa: E402

SHAPE = dict(hidden=2048, experts=128, inter=768, top_k=8, heads=32, kv_heads=4, head_dim=128, layers=48, sets=4,
             context=1041, table_blocks=128, block_size=16)
DEVICE = "cuda"


@dataclass(frozen=True)
class Variant:
    name: str
    o_config: tuple[int, int, int] | None = None  # the output projection's GEMV tiles (None: the tuned ones)
    qkv_config: tuple[int, int] | None = None  # the q/k/v norm + GEMV's (rows a program, warps) (None: the default)
    tiles: PairTiles | None = None  # the expert kernels' tiles (None: the tuned ones)
    attn_splits: int | None = None  # decode attention's context splits (None: its heuristic)


def make_sets(device) -> list[dict]:
    s, dt = SHAPE, torch.bfloat16
    h, n_qkv, q = s["hidden"], (s["heads"] + 2 * s["kv_heads"]) * s["head_dim"], s["heads"] * s["head_dim"]
    sets = []
    for i in range(s["sets"]):
        g = torch.Generator(device=device).manual_seed(i)

        def rand(*shape, scale=1.0, g=g):
            return (torch.randn(*shape, device=device, generator=g) * scale).to(dt)

        cache = rand(2, s["table_blocks"], s["kv_heads"], s["block_size"], s["head_dim"])
        sets.append(dict(norm_w=rand(h, scale=0.1) + 1, qkv_w=rand(n_qkv, h, scale=h ** -0.5),
                         q_w=rand(s["head_dim"], scale=0.1) + 1, k_w=rand(s["head_dim"], scale=0.1) + 1,
                         o_w=rand(h, q, scale=q ** -0.5), post_w=rand(h, scale=0.1) + 1,
                         gate_w=rand(s["experts"], h, scale=h ** -0.5),
                         w13=rand(s["experts"], 2 * s["inter"], h, scale=h ** -0.5),
                         w2=rand(s["experts"], h, s["inter"], scale=s["inter"] ** -0.5), cache=cache,
                         attn_out=torch.empty(1, s["heads"], s["head_dim"], device=device, dtype=dt)))
    return sets


def chain(sets, shared, hidden, residual, v: Variant, tiles: PairTiles, pdl: bool):
    s, eps = SHAPE, 1e-6
    for layer in range(s["layers"]):
        p = sets[layer % len(sets)]
        qkv, residual = triton_gemv.norm_gemv(hidden, residual, p["norm_w"], eps, p["qkv_w"], config=v.qkv_config,
                                              pdl=pdl)
        elementwise.qk_norm_rotary_inplace(qkv, shared["pos"], shared["cos"], shared["sin"], s["heads"],
                                           s["kv_heads"], s["head_dim"], p["q_w"], p["k_w"], eps, pdl=pdl,
                                           kv_cache=p["cache"], slot_mapping=shared["slots"])
        q = qkv[:, : s["heads"] * s["head_dim"]].view(1, s["heads"], s["head_dim"])
        if DEVICE == "cuda":
            triton_attention.paged_decode(q, p["cache"], shared["table"], shared["lens"],
                                          1 / math.sqrt(s["head_dim"]), p["attn_out"], num_splits=v.attn_splits,
                                          pdl=pdl)
        else:  # the smoke run (the decode kernel has its own interpreter tests)
            p["attn_out"].copy_(q)
        o = triton_gemv.gemv(p["attn_out"].view(1, -1), p["o_w"], config=v.o_config, pdl=pdl)
        logits, residual, normed = triton_gemv.norm_gemv(o, residual, p["post_w"], eps, p["gate_w"], pdl=pdl,
                                                         store_normed=True)
        routed = triton_routing.route_topk(logits, s["top_k"], renormalize=True, pdl=pdl)
        hidden = triton_moe.triton_fused_experts(normed, p["w13"], p["w2"], routed.weights, routed.ids,
                                                 pair_tiles=tiles, pdl=pdl)
    return hidden, residual


def time_chain(fn, replays: int = 20) -> tuple[float, torch.Tensor]:
    """Microseconds per layer of ``fn`` captured in one CUDA graph (median of ``replays`` timed replays), and its
    output."""
    out = fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / SHAPE["layers"])
    equal = torch.equal(captured[0], out[0])
    return sorted(times)[len(times) // 2], captured[0].clone(), equal


O_CONFIGS = [(8, 4096, 8), (4, 4096, 8), (4, 4096, 4), (2, 4096, 4), (16, 4096, 8), (8, 4096, 16)]
QKV_CONFIGS = [(4, 8), (16, 8), (4, 4), (16, 16)]
ATTN_SPLITS = [16, 8]


def variants() -> list[Variant]:
    ef = replace(pair_tiles(128, 768, 2048, torch.bfloat16), evict=1)
    return ([Variant("base")] + [Variant(f"o {c}", o_config=c) for c in O_CONFIGS]
            + [Variant(f"qkv {c}", qkv_config=c) for c in QKV_CONFIGS]
            + [Variant(f"attention {n} splits", attn_splits=n) for n in ATTN_SPLITS]
            + [Variant("evict_first", tiles=ef), Variant("base again")])


def run(log) -> dict:
    device = torch.device(DEVICE)
    s = SHAPE
    torch.manual_seed(0)
    sets = make_sets(device)
    half = s["head_dim"] // 2
    inv = 1.0 / (10000 ** (torch.arange(half, device=device).float() / half))
    angles = torch.arange(4096, device=device).float()[:, None] * inv[None, :]
    shared = dict(cos=angles.cos(), sin=angles.sin(), pos=torch.tensor([s["context"] - 1], device=device),
                  slots=torch.tensor([s["context"] - 1], device=device),
                  table=torch.arange(s["table_blocks"], device=device, dtype=torch.int64).view(1, -1),
                  lens=torch.tensor([s["context"]], device=device, dtype=torch.int64))
    x = torch.randn(1, s["hidden"], device=device, dtype=torch.bfloat16)
    r = torch.randn(1, s["hidden"], device=device, dtype=torch.bfloat16)
    pdl = DEVICE == "cuda"
    tuned = pair_tiles(s["experts"], s["inter"], s["hidden"], torch.bfloat16)
    results, first = {}, None
    for v in variants():
        tiles = v.tiles or tuned
        us, y, replay_equal = time_chain(lambda v=v, tiles=tiles: chain(sets, shared, x, r, v, tiles, pdl))
        if first is None:
            first = y
        diff = (y.float() - first.float()).abs().max().item()
        results[v.name] = {"us_per_layer": us, "step_us_48_layers": us * s["layers"], "max_abs_diff_vs_base": diff,
                           "graph_equal_eager": replay_equal, "variant": {**v.__dict__, "tiles": tiles.to_json()}}
        log(f"{v.name:24s} {us:7.2f} us a layer ({us * s['layers']:7.1f} us / 48 layers), max |diff| vs base "
            f"{diff:.3g}, graph == eager {replay_equal}")
    return results, first


def write_configs(results: dict, log) -> None:
    """The fastest output-projection tiles and q/k/v rows into ``gemv_configs.json`` where they beat the tuned ones
    (the first variant) by more than 0.3 us a layer."""
    base = results["base"]["us_per_layer"]
    table = json.loads(triton_gemv.TUNED_CONFIG_FILE.read_text())
    h, q = SHAPE["hidden"], SHAPE["heads"] * SHAPE["head_dim"]
    n_qkv = q + 2 * SHAPE["kv_heads"] * SHAPE["head_dim"]
    for prefix, key, fields in (("o ", f"{h},{q}", ("block_n", "block_k", "num_warps")),
                                ("qkv ", f"{triton_gemv.NORM_KEY}{n_qkv},{h}", ("block_n", "num_warps"))):
        name, row = min(((n, r) for n, r in results.items() if n.startswith(prefix)),
                        key=lambda item: item[1]["us_per_layer"])
        if row["us_per_layer"] < base - 0.3:
            config = row["variant"]["o_config" if prefix == "o " else "qkv_config"]
            table[key] = dict(zip(fields, config, strict=True))
            log(f"wrote {key}: {table[key]} ({row['us_per_layer']:.2f} against {base:.2f} us a layer)")
        else:
            log(f"kept {key}: best {name} {row['us_per_layer']:.2f} against {base:.2f} us a layer")
    triton_gemv.TUNED_CONFIG_FILE.write_text(json.dumps(table, indent=1) + "\n")


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/moe_b1_chain")
    parser.add_argument("--write-configs", action="store_true")
    parser.add_argument("--compare", default="", help="another run's base_output.pt, to check equal")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        DEVICE = "cpu"
        SHAPE.update(hidden=64, experts=16, inter=32, top_k=4, heads=4, kv_heads=2, head_dim=32, layers=2, sets=2,
                     context=20, table_blocks=4)
        O_CONFIGS[:] = [(2, 128, 4)]
        QKV_CONFIGS[:] = [(4, 4)]
        ATTN_SPLITS[:] = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from moe_kernel_sweep import timestamped_log

    log = timestamped_log(out / "moe_b1_chain.log")
    early = envs.cuda_pdl_early()
    log(f"PDL early launch: {early}")
    if args.smoke:
        global time_chain

        def time_chain(fn, replays=1):  # noqa: F811 (CPU: no graph)
            y = fn()
            return 0.0, y[0].clone(), True

    variants_run, base_out = run(log)
    results = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "shape": SHAPE,
               "pdl_early": early, "variants": variants_run}
    # the same inputs give the same output whatever the launch order (a race would show here)
    if args.compare and Path(args.compare).is_file():
        other = torch.load(args.compare).to(base_out.device)
        results["base_equal_to_compare"] = bool(torch.equal(other, base_out))
        log(f"base output equal to {Path(args.compare).name}'s: {results['base_equal_to_compare']}")
    torch.save(base_out.cpu(), out / "base_output.pt")
    (out / "moe_b1_chain.json").write_text(json.dumps(results, indent=1) + "\n")
    if args.write_configs:
        write_configs(results["variants"], log)


if __name__ == "__main__":
    main()
