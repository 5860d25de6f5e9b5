#!/usr/bin/env python3
"""The batch-1 Qwen3-30B-A3B layer chain on one GPU with and without L2 prefetches, and new expert-kernel tiles.

One decode layer at one token is eight launches (input norm + q/k/v GEMV, q/k norm + rotary + KV store, decode
attention and its reduction, output GEMV, post-attention norm + router GEMV, routing, gate/up experts, down experts);
this script runs 48 of them in one CUDA graph with programmatic dependent launch, each layer on its own weights
(four sets cycled, so nothing of a layer is in L2 from the layer before), 1,041 tokens of context, and reports the
time per layer for each variant:

- where the attention output projection's weight is asked into L2 (by the q/k/v GEMV's programs, when done) and
  which kernel asks for the next layer's q/k/v weight (the output GEMV, the router GEMV or the down experts kernel),
  each prefetch mode of ``kernels/_l2_prefetch.py``; the expert weights read with an ``evict_first`` hint or not;
- the expert kernels' tiles (``PairTiles``), e.g. the best of ``moe_decode_sweep.py``.

Every variant's output after 48 layers is compared with the first variant's (prefetch-only variants: equal).
``--smoke``: on CPU under Triton's interpreter with tiny shapes (no prefetch there; it checks the script).
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

from inferneo.kernels import _l2_prefetch, triton_attention, triton_gemv, triton_moe, triton_routing  # noqa: E402
from inferneo.kernels import _triton_elementwise as elementwise  # noqa: E402
from inferneo.kernels.moe_tile_configs import PairTiles, pair_tiles  # noqa: E402

SHAPE = dict(hidden=2048, experts=128, inter=768, top_k=8, heads=32, kv_heads=4, head_dim=128, layers=48, sets=4,
             context=1041, table_blocks=128, block_size=16)
DEVICE = "cuda"


@dataclass(frozen=True)
class Variant:
    name: str
    o_mode: int = 0  # prefetch mode for the output projection's weight (from the q/k/v GEMV); 0: none
    next_from: str = ""  # "", "gemv", "router", "down": which kernel asks for the next layer's q/k/v weight
    next_mode: int = 1
    tiles: PairTiles | None = None  # None: the tuned tiles


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
    mode = _l2_prefetch.PREFETCH_MODE
    for layer in range(s["layers"]):
        p, nxt = sets[layer % len(sets)], sets[(layer + 1) % len(sets)]
        _l2_prefetch.PREFETCH_MODE = v.o_mode
        qkv, total = triton_gemv.norm_gemv(hidden, residual, p["norm_w"], eps, p["qkv_w"], pdl=pdl,
                                           prefetch=p["o_w"] if v.o_mode else None)
        residual = total
        elementwise.qk_norm_rotary_inplace(qkv, shared["pos"], shared["cos"], shared["sin"], s["heads"],
                                           s["kv_heads"], s["head_dim"], p["q_w"], p["k_w"], eps, pdl=pdl,
                                           kv_cache=p["cache"], slot_mapping=shared["slots"])
        q = qkv[:, : s["heads"] * s["head_dim"]].view(1, s["heads"], s["head_dim"])
        if DEVICE == "cuda":
            triton_attention.paged_decode(q, p["cache"], shared["table"], shared["lens"],
                                          1 / math.sqrt(s["head_dim"]), p["attn_out"], pdl=pdl)
        else:  # the smoke run (the decode kernel has its own interpreter tests)
            p["attn_out"].copy_(q)
        _l2_prefetch.PREFETCH_MODE = v.next_mode
        nq = nxt["qkv_w"]
        o = triton_gemv.gemv(p["attn_out"].view(1, -1), p["o_w"], pdl=pdl,
                             prefetch=nq if v.next_from == "gemv" else None)
        logits, residual, normed = triton_gemv.norm_gemv(o, residual, p["post_w"], eps, p["gate_w"], pdl=pdl,
                                                         store_normed=True,
                                                         prefetch=nq if v.next_from == "router" else None)
        routed = triton_routing.route_topk(logits, s["top_k"], renormalize=True, pdl=pdl)
        hidden = triton_moe.triton_fused_experts(normed, p["w13"], p["w2"], routed.weights, routed.ids,
                                                 pair_tiles=tiles, pdl=pdl,
                                                 prefetch=nq if v.next_from == "down" else None)
    _l2_prefetch.PREFETCH_MODE = mode
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


def variants(best: PairTiles | None) -> list[Variant]:
    ef = replace(pair_tiles(128, 768, 2048, torch.bfloat16), evict=1)
    out = [Variant("base"), Variant("o1", o_mode=1), Variant("o2", o_mode=2), Variant("evict_first", tiles=ef),
           Variant("o1+down1", o_mode=1, next_from="down", tiles=ef),
           Variant("o1+down2", o_mode=1, next_from="down", next_mode=2, tiles=ef),
           Variant("o1+router1", o_mode=1, next_from="router", tiles=ef),
           Variant("o1+gemv1", o_mode=1, next_from="gemv", tiles=ef)]
    if best is not None:
        out += [Variant("best_tiles", tiles=best), Variant("best_tiles+o1", o_mode=1, tiles=best),
                Variant("best_tiles+o1+down1", o_mode=1, next_from="down", tiles=replace(best, evict=1))]
    return out + [Variant("base again")]


def run(out_dir: Path, best: PairTiles | None, log) -> dict:
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
    for v in variants(best):
        tiles = v.tiles or tuned
        us, y, replay_equal = time_chain(lambda v=v, tiles=tiles: chain(sets, shared, x, r, v, tiles, pdl))
        if first is None:
            first = y
        diff = (y.float() - first.float()).abs().max().item()
        results[v.name] = {"us_per_layer": us, "step_us_48_layers": us * s["layers"], "max_abs_diff_vs_base": diff,
                           "graph_equal_eager": replay_equal, "variant": {**v.__dict__, "tiles": tiles.to_json()}}
        log(f"{v.name:24s} {us:7.2f} us a layer ({us * s['layers']:7.1f} us / 48 layers), max |diff| vs base "
            f"{diff:.3g}, graph == eager {replay_equal}")
    return results


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/moe_l2_prefetch")
    parser.add_argument("--best-tiles", default="", help="a PairTiles JSON (e.g. moe_decode_sweep.json's best)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        DEVICE = "cpu"
        SHAPE.update(hidden=64, experts=16, inter=32, top_k=4, heads=4, kv_heads=2, head_dim=32, layers=2, sets=2,
                     context=20, table_blocks=4)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from moe_kernel_sweep import timestamped_log

    log = timestamped_log(out / "moe_l2_prefetch.log")
    best = None
    if args.best_tiles:
        path = Path(args.best_tiles)
        if path.is_file():
            best = PairTiles.from_json(json.loads(path.read_text())["experts"]["best"])
            log(f"best tiles from the sweep: {best}")
    if args.smoke:
        global time_chain

        def time_chain(fn, replays=1):  # noqa: F811 (CPU: no graph)
            y = fn()
            return 0.0, y[0].clone(), True

    results = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "shape": SHAPE,
               "variants": run(out, best, log)}
    (out / "moe_l2_prefetch.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
