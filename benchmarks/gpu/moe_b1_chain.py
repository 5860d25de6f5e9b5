#!/usr/bin/env python3
"""The batch-1 Qwen3-30B-A3B layer chain on one GPU: GEMV tiles and expert tiles under early or late PDL launch.

One decode layer at one token is eight launches (input norm + q/k/v GEMV, q/k norm + rotary + KV store, decode
attention and its reduction, output GEMV, post-attention norm + router GEMV, routing, gate/up experts, down experts);
this script runs 48 of them in one CUDA graph with programmatic dependent launch, each layer on its own weights
(four sets cycled, so nothing of a layer is in L2 from the layer before), 1,041 tokens of context, and reports the
time per layer for each variant of ``--set``: ``tiles``, the output projection's GEMV tiles (whole 4,096-wide
rows, all read before the GEMV waits, against the tuned ones), the q/k/v norm + GEMV's rows per program, decode
attention's split count, an ``evict_first`` hint on the expert weights; ``ab`` (default), the hint, 16 attention
splits and the split merge inside the decode kernel alone and together (after a CUDA check of that merge); ``rotary``,
the q/k norms + rotary + K/V store inside decode attention (after a CUDA check against the separate kernels);
``heads``, the q/k norm + rotary + K/V store kernel's 36 heads over 4, 5, 9 and 18 programs (``INFERNEO_ROTARY_HEAD_GROUPS``).
``pre``, reads moved before the programmatic-dependent-launch wait (``INFERNEO_PREWAIT_LOADS``: the q/k norm +
rotary kernel's positions and rotary rows, decode attention's lengths and an L2 prefetch of its first KV tile, the
reduction's partials beside their log-sum-exps), the rotary kernel's warps and gate/up tiles, each against all of
them off, then a race check (the new token's cache rows poisoned before each replay). ``ab``, ``rotary`` and ``pre`` then profile CUDA-graph replays of the base and
the fastest variant: per kernel of a layer its
duration, the time it adds to the stream's end (``kernel_timeline.py``) and its bytes at the copy bandwidth.
Whether the kernels launch their dependents early (``INFERNEO_CUDA_PDL_EARLY``, read at import) is the process's:
run it once with each setting.

Every variant's output after 48 layers is compared with the first variant's (the GEMV tiles change the summation
order of the output projection, so small differences there are expected; the hint none). ``--write-configs``
writes the fastest output-projection tiles and q/k/v norm + GEMV rows into ``inferneo/kernels/gemv_configs.json``
when they beat the tuned ones by more than 0.3 us a layer. ``--smoke``: on CPU under Triton's interpreter with tiny
shapes (it checks the script).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
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
    fused_reduce: bool = False  # decode attention merges its splits in the decode kernel (no reduction launch)
    rotary_in_decode: bool = False  # the q/k norms, rotary and K/V store inside decode attention (no rotary launch)
    prewait: str = ""  # INFERNEO_PREWAIT_LOADS while the graph is captured (what the kernels read before waiting;
    # "": the default, "none": nothing)
    rotary_warps: int = 0  # INFERNEO_ROTARY_WARPS while the graph is captured (0: the launcher's choice)
    rotary_groups: int = 0  # INFERNEO_ROTARY_HEAD_GROUPS while the graph is captured (0: the rule, one program)


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
        rotary = None
        if v.rotary_in_decode:
            rotary = qk_rotary(qkv, p, shared, eps)
        else:
            elementwise.qk_norm_rotary_inplace(qkv, shared["pos"], shared["cos"], shared["sin"], s["heads"],
                                               s["kv_heads"], s["head_dim"], p["q_w"], p["k_w"], eps, pdl=pdl,
                                               kv_cache=p["cache"], slot_mapping=shared["slots"])
        q = qkv[:, : s["heads"] * s["head_dim"]].view(1, s["heads"], s["head_dim"])
        if DEVICE == "cuda":
            triton_attention.paged_decode(q, p["cache"], shared["table"], shared["lens"],
                                          1 / math.sqrt(s["head_dim"]), p["attn_out"], num_splits=v.attn_splits,
                                          pdl=pdl, fused_reduce=v.fused_reduce, qk_rotary=rotary)
        else:  # the smoke run (the decode kernel has its own interpreter tests)
            p["attn_out"].copy_(q)
        o = triton_gemv.gemv(p["attn_out"].view(1, -1), p["o_w"], config=v.o_config, pdl=pdl)
        logits, residual, normed = triton_gemv.norm_gemv(o, residual, p["post_w"], eps, p["gate_w"], pdl=pdl,
                                                         store_normed=True)
        routed = triton_routing.route_topk(logits, s["top_k"], renormalize=True, pdl=pdl)
        hidden = triton_moe.triton_fused_experts(normed, p["w13"], p["w2"], routed.weights, routed.ids,
                                                 pair_tiles=tiles, pdl=pdl)
    return hidden, residual


def qk_rotary(qkv, p, shared, eps) -> triton_attention.QKRotary:
    """The raw key and value heads of ``qkv`` and the layer's norm weights, for ``paged_decode(qk_rotary=)``."""
    s = SHAPE
    q_size, kv_size = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    k = qkv[:, q_size : q_size + kv_size].view(-1, s["kv_heads"], s["head_dim"])
    v = qkv[:, q_size + kv_size :].view(-1, s["kv_heads"], s["head_dim"])
    return triton_attention.QKRotary(k, v, shared["pos"], shared["slots"], shared["cos"], shared["sin"], p["q_w"],
                                     p["k_w"], eps)


def check_rotary_in_decode(log) -> dict:
    """One layer's q/k norms + rotary + K/V store + decode attention: the separate rotary kernel against the decode
    kernel doing it (bf16, the chain's shapes, 1,041 tokens), eager and replayed from a CUDA graph: the attention
    outputs, the new cache row and the whole cache compared."""
    s, eps = SHAPE, 1e-6
    sets = make_sets(torch.device(DEVICE))[:1]
    p = sets[0]
    shared = chain_shared(torch.device(DEVICE))
    n_qkv = (s["heads"] + 2 * s["kv_heads"]) * s["head_dim"]
    raw = torch.randn(1, n_qkv, device=DEVICE).to(torch.bfloat16)
    scale = 1 / math.sqrt(s["head_dim"])
    results = {}
    qkv_a, cache_a = raw.clone(), p["cache"].clone()
    out_a = torch.empty_like(p["attn_out"])
    elementwise.qk_norm_rotary_inplace(qkv_a, shared["pos"], shared["cos"], shared["sin"], s["heads"], s["kv_heads"],
                                       s["head_dim"], p["q_w"], p["k_w"], eps, kv_cache=cache_a,
                                       slot_mapping=shared["slots"])
    triton_attention.paged_decode(qkv_a[:, : s["heads"] * s["head_dim"]].view(1, s["heads"], s["head_dim"]), cache_a,
                                  shared["table"], shared["lens"], scale, out_a)
    for mode in ("eager", "graph"):
        qkv_b, cache_b = raw.clone(), p["cache"].clone()
        out_b = torch.full_like(out_a, float("nan"))
        q_b = qkv_b[:, : s["heads"] * s["head_dim"]].view(1, s["heads"], s["head_dim"])

        def run(qkv_b=qkv_b, cache_b=cache_b, out_b=out_b, q_b=q_b):
            triton_attention.paged_decode(q_b, cache_b, shared["table"], shared["lens"], scale, out_b,
                                          qk_rotary=qk_rotary(qkv_b, dict(p, cache=cache_b), shared, eps))

        if mode == "eager":
            run()
        else:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            cache_b.copy_(p["cache"])
            out_b.fill_(float("nan"))
            graph.replay()
        torch.cuda.synchronize()
        diff = (out_a.float() - out_b.float()).abs().max().item()
        row = {"out_equal": bool(torch.equal(out_a, out_b)), "out_max_abs_diff": diff,
               "cache_equal": bool(torch.equal(cache_a, cache_b)), "qkv_unchanged": bool(torch.equal(qkv_b, raw))}
        results[mode] = row
        log(f"rotary in decode check ({mode}): output equal {row['out_equal']} (max |diff| {diff:.3g}), cache equal "
            f"{row['cache_equal']}, q/k/v unchanged {row['qkv_unchanged']}")
    return results


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


VARIANT_SET = "ab"


def variants() -> list[Variant]:
    tuned = pair_tiles(SHAPE["experts"], SHAPE["inter"], SHAPE["hidden"], torch.bfloat16)
    ef, plain = replace(tuned, evict=1), replace(tuned, evict=0)
    if VARIANT_SET == "pre":  # reads moved before the PDL wait, the rotary kernel's warps, gate/up tiles
        up = {"up 4x2048 4 warps": replace(tuned, up_block_n=4, up_block_k=2048, up_num_warps=4),
              "up 8x1024 4 warps": replace(tuned, up_block_n=8, up_block_k=1024, up_num_warps=4),
              "up 4x1024 4 warps": replace(tuned, up_block_n=4, up_block_k=1024, up_num_warps=4)}
        off = dict(prewait="none", rotary_warps=4)
        return ([Variant("base", **off), Variant("rotary", prewait="rotary", rotary_warps=4),
                 Variant("rotary 8 warps", prewait="none", rotary_warps=8),
                 Variant("rotary + 8 warps", prewait="rotary", rotary_warps=8),
                 Variant("decode", prewait="decode", rotary_warps=4), Variant("reduce", prewait="reduce", rotary_warps=4),
                 Variant("rotary, decode, reduce", prewait="all", rotary_warps=4),
                 Variant("rotary, decode, reduce + 8 warps", prewait="all", rotary_warps=8)]
                + [Variant(name, tiles=t, **off) for name, t in up.items()]
                + [Variant("shipped defaults"), Variant("base again", **off)])
    if VARIANT_SET == "heads":  # the q/k norm + rotary + K/V store kernel's heads over several programs
        return ([Variant("base")] + [Variant(f"{g} programs", rotary_groups=g) for g in (4, 5, 9, 18)]
                + [Variant("base again")] + [Variant(f"{g} programs again", rotary_groups=g) for g in (5, 9)])
    if VARIANT_SET == "rotary":  # the q/k norms + rotary + K/V store inside decode attention (tuned tiles)
        return [Variant("base"), Variant("rotary in decode", rotary_in_decode=True), Variant("base again"),
                Variant("rotary in decode again", rotary_in_decode=True)]
    if VARIANT_SET == "tiles":  # the 2026-12-03 call's GEMV tiles, split counts and hint
        return ([Variant("base")] + [Variant(f"o {c}", o_config=c) for c in O_CONFIGS]
                + [Variant(f"qkv {c}", qkv_config=c) for c in QKV_CONFIGS]
                + [Variant(f"attention {n} splits", attn_splits=n) for n in ATTN_SPLITS]
                + [Variant("evict_first", tiles=ef), Variant("base again")])
    # "ab": the hint, the split count and the fused split merge, alone and together (base: no hint, the heuristic's
    # splits, the reduction kernel)
    few = ATTN_SPLITS[0] if ATTN_SPLITS else None
    return [Variant("base", tiles=plain), Variant("evict_first", tiles=ef),
            Variant(f"attention {few} splits", tiles=plain, attn_splits=few),
            Variant("fused merge", tiles=plain, fused_reduce=True),
            Variant(f"fused merge, {few} splits", tiles=plain, attn_splits=few, fused_reduce=True),
            Variant(f"evict_first + {few} splits", tiles=ef, attn_splits=few),
            Variant("evict_first + fused merge", tiles=ef, fused_reduce=True),
            Variant(f"evict_first + fused merge + {few} splits", tiles=ef, attn_splits=few, fused_reduce=True),
            Variant("base again", tiles=plain)]


def chain_shared(device) -> dict:
    """Rotary tables, the token's position and slot, the block table and context length shared by every layer."""
    s = SHAPE
    half = s["head_dim"] // 2
    inv = 1.0 / (10000 ** (torch.arange(half, device=device).float() / half))
    angles = torch.arange(4096, device=device).float()[:, None] * inv[None, :]
    return dict(cos=angles.cos(), sin=angles.sin(), pos=torch.tensor([s["context"] - 1], device=device),
                slots=torch.tensor([s["context"] - 1], device=device),
                table=torch.arange(s["table_blocks"], device=device, dtype=torch.int64).view(1, -1),
                lens=torch.tensor([s["context"]], device=device, dtype=torch.int64))


def run(log) -> dict:
    device = torch.device(DEVICE)
    s = SHAPE
    torch.manual_seed(0)
    sets = make_sets(device)
    shared = chain_shared(device)
    x = torch.randn(1, s["hidden"], device=device, dtype=torch.bfloat16)
    r = torch.randn(1, s["hidden"], device=device, dtype=torch.bfloat16)
    pdl = DEVICE == "cuda"
    tuned = pair_tiles(s["experts"], s["inter"], s["hidden"], torch.bfloat16)
    results, first = {}, None
    for v in variants():
        tiles = v.tiles or tuned
        try:
            with prewait_env(v.prewait, v.rotary_warps, v.rotary_groups):
                us, y, replay_equal = time_chain(lambda v=v, tiles=tiles: chain(sets, shared, x, r, v, tiles, pdl))
        except Exception as exc:  # noqa: BLE001 (the other variants still run)
            log(f"{v.name}: failed: {type(exc).__name__}: {str(exc)[:300]}")
            results[v.name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        if first is None:
            first = y
        diff = (y.float() - first.float()).abs().max().item()
        results[v.name] = {"us_per_layer": us, "step_us_48_layers": us * s["layers"], "max_abs_diff_vs_base": diff,
                           "graph_equal_eager": replay_equal, "variant": {**v.__dict__, "tiles": tiles.to_json()}}
        log(f"{v.name:24s} {us:7.2f} us a layer ({us * s['layers']:7.1f} us / 48 layers), max |diff| vs base "
            f"{diff:.3g}, graph == eager {replay_equal}")
    if PROFILE and DEVICE == "cuda":
        by_name = {v.name: v for v in variants()}
        best = min((n for n in results if n in by_name and "us_per_layer" in results[n]),
                   key=lambda n: results[n]["us_per_layer"])
        bandwidth = copy_bandwidth()
        log(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
        for name in dict.fromkeys(["base", best]):
            v = by_name[name]
            tiles = v.tiles or tuned
            with prewait_env(v.prewait, v.rotary_warps, v.rotary_groups):
                results[name]["profile"] = profile_chain(
                    lambda v=v, tiles=tiles: chain(sets, shared, x, r, v, tiles, pdl), name, bandwidth, log)
    if VARIANT_SET == "pre" and DEVICE == "cuda":
        for prewait in ("all",):
            v = Variant("race check", prewait=prewait, rotary_warps=8, tiles=tuned)
            try:
                results[f"race_check {prewait}"] = race_check(sets, shared, x, r, v, pdl, first, log)
            except Exception as exc:  # noqa: BLE001 (the results so far are still written)
                log(f"race check {prewait} failed: {type(exc).__name__}: {str(exc)[:300]}")
                results[f"race_check {prewait}"] = {"error": f"{type(exc).__name__}: {exc}"}
    return results, first


@contextlib.contextmanager
def prewait_env(value: str, rotary_warps: int = 0, rotary_groups: int = 0):
    """``INFERNEO_PREWAIT_LOADS=value``, ``INFERNEO_ROTARY_WARPS=rotary_warps`` and
    ``INFERNEO_ROTARY_HEAD_GROUPS=rotary_groups`` for the launches inside (what a captured graph keeps)."""
    names = {"INFERNEO_PREWAIT_LOADS": value, "INFERNEO_ROTARY_WARPS": str(rotary_warps),
             "INFERNEO_ROTARY_HEAD_GROUPS": str(rotary_groups)}
    old = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, was in old.items():
            if was is None:
                del os.environ[name]
            else:
                os.environ[name] = was


def race_check(sets, shared, x, r, v: Variant, pdl: bool, base_out, log, replays: int = 8) -> dict:
    """The chain with every read moved before its wait, captured once and replayed with the new token's cache row
    of every layer poisoned (NaN) before each replay: decode attention must read that row only after the q/k norm
    + rotary kernel wrote it, so each replay's output must equal the same chain's unpoisoned eager output bit for
    bit (and the base's, up to the rotary kernel's warps)."""
    s = SHAPE
    slot = s["context"] - 1
    block, offset = slot // s["block_size"], slot % s["block_size"]
    with prewait_env(v.prewait, v.rotary_warps):
        fn = functools.partial(chain, sets, shared, x, r, v, v.tiles, pdl)
        reference = fn()[0].clone()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fn()
    equal = []
    for _ in range(replays):
        for p in sets:
            p["cache"][:, block, :, offset, :] = float("nan")
        graph.replay()
        torch.cuda.synchronize()
        equal.append(bool(torch.equal(captured[0], reference)))
    diff = (reference.float() - base_out.float()).abs().max().item()
    row = {"replays": replays, "all_equal": all(equal), "equal": equal, "max_abs_diff_vs_base": diff}
    log(f"race check (new cache rows poisoned before each of {replays} replays, {v.prewait}, rotary "
        f"{v.rotary_warps} warps): every output equal to the eager one: {all(equal)}; eager against the base: "
        f"max |diff| {diff:.3g}")
    return row


def check_fused_merge(log) -> dict:
    """The decode attention with its splits merged in the decode kernel against the reduction kernel, on random
    bf16 caches: 1, 3 and 32 requests, 4 and 8 KV heads (groups of 8 and 4), plain and with a window, soft-capping
    and sinks, eager and replayed from a CUDA graph; outputs must be equal and the tickets back at zero."""
    device = torch.device(DEVICE)
    dt, d, bs = torch.bfloat16, 128, 16
    results = {}
    for batch, kv_heads, group, variant in ((1, 4, 8, "plain"), (1, 8, 4, "plain"), (3, 4, 8, "window+sinks"),
                                            (32, 4, 8, "plain"), (1, 4, 8, "window+sinks")):
        g = torch.Generator(device=device).manual_seed(batch * 100 + kv_heads)
        heads, blocks = kv_heads * group, 128
        cache = torch.randn(2, batch * blocks, kv_heads, bs, d, device=device, generator=g).to(dt)
        table = torch.arange(batch * blocks, device=device, dtype=torch.int64).view(batch, blocks)
        lens = torch.randint(1, blocks * bs, (batch,), device=device, generator=g)
        lens[0] = 1041
        q = torch.randn(batch, heads, d, device=device, generator=g).to(dt)
        options = {}
        if variant != "plain":
            options = dict(sliding_window=700, logit_softcap=30.0,
                           sinks=torch.linspace(-1, 3, heads, device=device))
        outs = {}
        for fused in (False, True):
            out = torch.full((batch, heads, d), float("nan"), device=device, dtype=dt)
            triton_attention.paged_decode(q, cache, table, lens, d ** -0.5, out, fused_reduce=fused, **options)
            graph = torch.cuda.CUDAGraph()
            replayed = torch.full_like(out, float("nan"))
            with torch.cuda.graph(graph):
                triton_attention.paged_decode(q, cache, table, lens, d ** -0.5, replayed, fused_reduce=fused,
                                              **options)
            for _ in range(3):
                replayed.fill_(float("nan"))
                graph.replay()
            torch.cuda.synchronize()
            outs[fused] = (out, replayed)
        name = f"b{batch} kv{kv_heads} g{group} {variant}"
        equal = torch.equal(outs[False][0], outs[True][0]) and torch.equal(outs[True][0], outs[True][1])
        tickets = int(triton_attention._decode_tickets(device).abs().sum())
        diff = (outs[False][0].float() - outs[True][0].float()).abs().max().item()
        results[name] = {"equal": equal, "max_abs_diff": diff, "tickets_nonzero": tickets}
        log(f"fused merge check {name:28s}: equal {equal} (max |diff| {diff:.3g}), graph replay equal, "
            f"tickets {'zero' if tickets == 0 else 'NOT zero'}")
    return results


PROFILE = True
MB = 1e6


def kernel_bytes() -> dict[str, float]:
    """Bytes each kernel of a layer must read at one token (weights, KV cache, the split partials), by the label
    ``kernel_timeline.by_slot`` gives it."""
    s = SHAPE
    h, d = s["hidden"], s["head_dim"]
    q, n_qkv = s["heads"] * d, (s["heads"] + 2 * s["kv_heads"]) * d
    splits = math.ceil(s["context"] / 64)  # the non-empty splits of 64-token tiles (the merge reads only those)
    return {"_norm_gemv_kernel#0": 2 * n_qkv * h, "_norm_gemv_kernel#1": 2 * s["experts"] * h,
            "_rotary_kernel": 2 * n_qkv + 2 * 2 * s["kv_heads"] * d,
            "_decode_kernel": 2 * 2 * s["context"] * s["kv_heads"] * d,
            "_decode_reduce_kernel": 4 * s["heads"] * splits * (d + 1),
            "_gemv_kernel": 2 * h * q, "_route_topk_kernel": 2 * s["experts"],
            "_pair_gate_up_kernel": 2 * s["top_k"] * 2 * s["inter"] * h,
            "_pair_down_sum_kernel": 2 * s["top_k"] * h * s["inter"]}


def copy_bandwidth() -> float:
    """Bytes moved per second (read + write) by a 512 MB device copy, the best of 10."""
    src = torch.empty(256 * 2**20, dtype=torch.int16, device=DEVICE)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3)
    return 2 * src.numel() * src.element_size() / best


def profile_chain(fn, name: str, bandwidth: float, log, replays: int = 10) -> dict:
    """``fn`` captured in one CUDA graph, ``replays`` replays under ``torch.profiler``: per kernel of a layer its
    duration, the time it adds to the stream's end (kernel_timeline), its bytes and their time at ``bandwidth``."""
    from kernel_timeline import by_slot, critical_path, kernel_events
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
            torch.cuda.synchronize()  # replays apart: each one's first kernel starts on an idle stream
    events = kernel_events(prof)
    if not events or len(events) % (replays * SHAPE["layers"]):
        log(f"profile {name}: {len(events)} kernel events for {replays} replays of {SHAPE['layers']} layers; "
            f"no per-layer table")
        return {"events": len(events)}
    per_layer = len(events) // (replays * SHAPE["layers"])
    timeline = critical_path(events)
    # each replay's first kernel follows an idle gap (the synchronize): leave the first layer of every replay out
    steady = [e for i, e in enumerate(timeline) if (i // per_layer) % SHAPE["layers"] != 0]
    rows = by_slot(steady, per_layer)
    sizes = kernel_bytes()
    total_added = sum(r["added_us"] for r in rows)
    log(f"profile {name}: {per_layer} kernels a layer, {total_added:.2f} us a layer added (layers 2-48 of "
        f"{replays} replays)")
    log(f"  {'kernel':28s} {'dur us':>7s} {'added':>7s} {'gap':>6s} {'MB':>7s} {'floor us':>8s} {'added/floor':>11s}")
    for r in rows:
        nbytes = sizes.get(r["kernel"], 0.0)
        floor = nbytes / bandwidth * 1e6
        r.update(bytes=nbytes, floor_us=floor, added_over_floor=r["added_us"] / floor if floor else None)
        log(f"  {r['kernel']:28s} {r['dur_us']:7.2f} {r['added_us']:7.2f} {r['gap_us']:6.2f} {nbytes / MB:7.2f} "
            f"{floor:8.2f} {(r['added_us'] / floor if floor else float('nan')):11.2f}")
    floor_total = sum(r["floor_us"] for r in rows)
    log(f"  {'layer':28s} {sum(r['dur_us'] for r in rows):7.2f} {total_added:7.2f} "
        f"{sum(r['gap_us'] for r in rows):6.2f} {sum(r['bytes'] for r in rows) / MB:7.2f} {floor_total:8.2f} "
        f"{total_added / floor_total:11.2f}")
    return {"kernels_per_layer": per_layer, "added_us_per_layer": total_added, "floor_us_per_layer": floor_total,
            "bandwidth_bytes_per_s": bandwidth, "rows": rows}


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


def ab_settings(chain_json: Path, margin_us: float = 0.2) -> str:
    """``moe_suite.py --ab`` settings from a ``--set pre`` run: the base (every switch cleared), the fastest
    setting of the latency-bound kernels' switches (``INFERNEO_PREWAIT_LOADS``, ``INFERNEO_ROTARY_WARPS``) with
    the tuned expert tiles, the fastest expert tiles alone (``INFERNEO_MOE_PAIR_TILES``: the fields that differ
    from the tuned ones) and both, each kept only where it beats the base by ``margin_us`` a layer."""
    variants = json.loads(chain_json.read_text())["variants"]
    base = variants["base"]
    tuned = base["variant"]["tiles"]
    timed = [row for name, row in variants.items() if "us_per_layer" in row and not name.startswith("base")]

    def best(rows):
        rows = [r for r in rows if r["us_per_layer"] < base["us_per_layer"] - margin_us]
        return min(rows, key=lambda r: r["us_per_layer"]) if rows else None

    switches = best(r for r in timed if r["variant"]["tiles"] == tuned)
    tiles = best(r for r in timed if r["variant"]["tiles"] != tuned and r["variant"]["prewait"] == "none"
                 and r["variant"]["rotary_warps"] == 4)
    clear = {"INFERNEO_PREWAIT_LOADS": "none", "INFERNEO_ROTARY_WARPS": "4", "INFERNEO_MOE_PAIR_TILES": ""}
    env_s = env_t = {}
    if switches:
        v = switches["variant"]
        env_s = {"INFERNEO_PREWAIT_LOADS": v["prewait"].replace(",", "+") or "none",
                 "INFERNEO_ROTARY_WARPS": str(v["rotary_warps"] or 4)}
    if tiles:
        changed = {k: val for k, val in tiles["variant"]["tiles"].items() if tuned.get(k) != val}
        env_t = {"INFERNEO_MOE_PAIR_TILES": "+".join(f"{k}={val}" for k, val in changed.items())}
    settings = [("base", clear)]
    if env_s:
        settings.append(("switches", {**clear, **env_s}))
    if env_t:
        settings.append(("expert tiles", {**clear, **env_t}))
    if env_s and env_t:
        settings.append(("switches + expert tiles", {**clear, **env_s, **env_t}))
    return ";".join(f"{name}:" + ",".join(f"{k}={val}" for k, val in env.items()) for name, env in settings)


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/moe_b1_chain")
    parser.add_argument("--write-configs", action="store_true")
    parser.add_argument("--compare", default="", help="another run's base_output.pt, to check equal")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--set", default="ab", choices=("ab", "tiles", "rotary", "pre", "heads"),
                        help="ab: the expert hint, the split count and the fused split merge, alone and together, "
                             "then per-kernel profiles of the base and the fastest; tiles: the GEMV tiles (writable); "
                             "rotary: the q/k norms + rotary inside decode attention, against the base; pre: reads "
                             "moved before the PDL wait (INFERNEO_PREWAIT_LOADS, the down kernel's prefetched "
                             "chunks), then a race check; heads: the q/k norm + rotary kernel over several programs")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--ab-from", default="", help="print moe_suite.py --ab settings from a --set pre run's JSON")
    args = parser.parse_args()
    if args.ab_from:
        print(ab_settings(Path(args.ab_from)))
        return
    global VARIANT_SET, PROFILE
    VARIANT_SET, PROFILE = args.set, not args.no_profile
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

    checks = {}
    if DEVICE == "cuda" and VARIANT_SET not in ("pre", "heads"):
        try:
            checks = check_rotary_in_decode(log) if VARIANT_SET == "rotary" else check_fused_merge(log)
        except Exception as exc:  # noqa: BLE001 (the timings still run)
            log(f"check failed: {type(exc).__name__}: {exc}")
            checks = {"error": f"{type(exc).__name__}: {exc}"}
    variants_run, base_out = run(log)
    results = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "shape": SHAPE,
               "pdl_early": early, "variants": variants_run, "fused_merge_checks": checks}
    # the same inputs give the same output whatever the launch order (a race would show here)
    if args.compare and Path(args.compare).is_file():
        other = torch.load(args.compare).to(base_out.device)
        results["base_equal_to_compare"] = bool(torch.equal(other, base_out))
        log(f"base output equal to {Path(args.compare).name}'s: {results['base_equal_to_compare']}")
    torch.save(base_out.cpu(), out / "base_output.pt")
    (out / "moe_b1_chain.json").write_text(json.dumps(results, indent=1) + "\n")
    if args.write_configs and VARIANT_SET == "tiles":
        write_configs(results["variants"], log)


if __name__ == "__main__":
    main()
