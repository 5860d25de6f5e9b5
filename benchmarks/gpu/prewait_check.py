#!/usr/bin/env python3
"""CUDA check of the reads moved before the programmatic-dependent-launch wait (issue 19, batch-1 decode).

Each kernel with its switch on against the same kernel with it off, on the same inputs, eager and replayed from a
CUDA graph; outputs must be equal bit for bit:

- decode attention and its split reduction (``INFERNEO_PREWAIT_LOADS=decode,reduce`` against ``none``): bf16
  and FP8 caches, 1, 3
  and 32 requests, 4 and 8 KV heads, plain and window + soft-cap + sinks, with the new token's cache row written
  by a kernel launched right before (the q/k norm + rotary kernel, so the decode kernel's early reads race with it
  if they touch that row); the row is poisoned (NaN) before each graph replay;
- the q/k norm + rotary + K/V store kernel (``rotary``, and 4 or 8 warps, ``INFERNEO_ROTARY_WARPS``): the rotated
  q/k/v rows and the cache;
- the few-token experts (Qwen3-30B-A3B's shape, 1, 2 and 4 tokens) with the gate/up tiles of 4 x 2,048 against
  8 x 1,024: not the same sums, so their errors against a float32 reference are reported side by side.

Writes ``prewait_check.json`` to ``--out``; exits 1 when any comparison differs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1])]

from inferneo.attention.fp8_kv import FP8_KV_DTYPE, KVCacheScales  # noqa: E402
from inferneo.kernels import _triton_elementwise as elementwise  # noqa: E402
from inferneo.kernels import triton_attention, triton_moe  # noqa: E402
from inferneo.kernels.moe_tile_configs import pair_tiles  # noqa: E402


@contextlib.contextmanager
def prewait(value: str):
    old = os.environ.get("INFERNEO_PREWAIT_LOADS")
    os.environ["INFERNEO_PREWAIT_LOADS"] = value
    try:
        yield
    finally:
        os.environ.pop("INFERNEO_PREWAIT_LOADS")
        if old is not None:
            os.environ["INFERNEO_PREWAIT_LOADS"] = old


def eager_and_graph(fn, poison=None):
    """``fn()``'s output eagerly, and from a captured graph replayed three times (``poison()`` before each)."""
    eager = fn().clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    for _ in range(3):
        if poison is not None:
            poison()
        graph.replay()
    torch.cuda.synchronize()
    return eager, out.clone()


def rotary_tables(d: int, dev: str):
    half = d // 2
    inv = 1.0 / (10000 ** (torch.arange(half, device=dev).float() / half))
    angles = torch.arange(4096, device=dev).float()[:, None] * inv[None, :]
    return angles.cos(), angles.sin()


def decode_case(batch: int, kv_heads: int, group: int, variant: str, fp8: bool,
                settings: tuple[str, ...] = ("none", "decode,reduce")) -> tuple:
    """One decode case under each ``INFERNEO_PREWAIT_LOADS`` setting: (eager, graph) outputs for each."""
    dev, dt, d, bs = "cuda", torch.bfloat16, 128, 16
    g = torch.Generator(device=dev).manual_seed(batch * 100 + kv_heads)
    heads, blocks = kv_heads * group, 128
    base_cache = torch.randn(2, batch * blocks, kv_heads, bs, d, device=dev, generator=g).to(dt)
    table = torch.arange(batch * blocks, device=dev, dtype=torch.int64).view(batch, blocks)
    lens = torch.randint(2, blocks * bs, (batch,), device=dev, generator=g)
    lens[0] = 1041
    slots = table.gather(1, ((lens - 1) // bs).view(-1, 1)).view(-1) * bs + (lens - 1) % bs
    raw = torch.randn(batch, (heads + 2 * kv_heads) * d, device=dev, generator=g).to(dt)
    cos, sin = rotary_tables(d, dev)
    qw = torch.rand(d, device=dev, generator=g).to(dt) + 0.5
    kw = torch.rand(d, device=dev, generator=g).to(dt) + 0.5
    options = {}
    if variant != "plain":
        options = dict(sliding_window=700, logit_softcap=30.0, sinks=torch.linspace(-1, 3, heads, device=dev))
    scales = None
    if fp8:
        base_cache = (base_cache.float() / 4).to(FP8_KV_DTYPE)
        scales = KVCacheScales(torch.full((kv_heads,), 0.9, device=dev), torch.full((kv_heads,), 1.1, device=dev))
        options["kv_scales"] = scales
    qkv = raw.clone()
    out = torch.empty(batch, heads, d, device=dev, dtype=dt)
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(batch, kv_heads, d)
    v = qkv[:, (heads + kv_heads) * d :].view(batch, kv_heads, d)
    q = qkv[:, : heads * d].view(batch, heads, d)
    outs = []
    for setting in settings:
        cache = base_cache.clone()

        def step(cache=cache):
            qkv.copy_(raw)
            if fp8:  # the FP8 store (the rotary kernel writes only model-dtype caches)
                elementwise.qk_norm_rotary_inplace(qkv, lens - 1, cos, sin, heads, kv_heads, d, qw, kw, 1e-6)
                triton_attention.store_kv(k, v, cache, slots, kv_scales=scales)
            else:
                elementwise.qk_norm_rotary_inplace(qkv, lens - 1, cos, sin, heads, kv_heads, d, qw, kw, 1e-6,
                                                   kv_cache=cache, slot_mapping=slots)
            triton_attention.paged_decode(q, cache, table, lens, d ** -0.5, out, **options)
            return out

        def poison(cache=cache):  # the new tokens' rows: NaN until the kernel before decode writes them
            for b in range(batch):
                s = int(slots[b])
                row = cache[:, s // bs, :, s % bs, :]
                cache[:, s // bs, :, s % bs, :] = torch.full(row.shape, float("nan"), device=dev).to(cache.dtype)

        with prewait(setting):
            outs.append(eager_and_graph(step, poison))
    return tuple(outs)


def check_decode(log) -> dict:
    results = {}
    for case in ((1, 4, 8, "plain", False), (1, 4, 8, "window+sinks", False), (3, 8, 4, "plain", False),
                 (32, 4, 8, "plain", False), (1, 8, 4, "plain", True), (3, 4, 8, "window+sinks", True)):
        a, b = decode_case(*case)
        batch, kv_heads, group, variant, fp8 = case
        name = f"b{batch} kv{kv_heads} g{group} {variant}{' fp8' if fp8 else ''}"
        equal = all(torch.equal(x, y) for x in a for y in b)
        finite = bool(torch.isfinite(b[1].float()).all())
        diff = (a[0].float() - b[1].float()).abs().max().item()
        results[name] = {"equal": equal, "finite": finite, "max_abs_diff": diff,
                         "off_eager_equals_graph": bool(torch.equal(*a))}
        log(f"decode {name:32s}: decode,reduce == none, eager and graph: {equal} (max |diff| {diff:.3g}), finite "
            f"{finite}; off: eager == graph {torch.equal(*a)}")
    return results


def rotary_case(tokens: int, heads: int, kv_heads: int) -> bool:
    dev, dt, d = "cuda", torch.bfloat16, 128
    g = torch.Generator(device=dev).manual_seed(tokens)
    raw = torch.randn(tokens, (heads + 2 * kv_heads) * d, device=dev, generator=g).to(dt)
    pos = torch.randint(0, 4000, (tokens,), device=dev, generator=g)
    slots = torch.randperm(tokens * 16, device=dev)[:tokens]
    cos, sin = rotary_tables(d, dev)
    qw = torch.rand(d, device=dev, generator=g).to(dt) + 0.5
    kw = torch.rand(d, device=dev, generator=g).to(dt) + 0.5
    qkv, cache = raw.clone(), torch.zeros(2, tokens, kv_heads, 16, d, device=dev, dtype=dt)

    def run():
        qkv.copy_(raw)
        elementwise.qk_norm_rotary_inplace(qkv, pos, cos, sin, heads, kv_heads, d, qw, kw, 1e-6, kv_cache=cache,
                                           slot_mapping=slots)
        return torch.cat([qkv.view(-1), cache.view(-1)])

    got = []
    for setting, warps in (("none", "4"), ("rotary", "4"), ("none", "8"), ("rotary", "8")):
        os.environ["INFERNEO_ROTARY_WARPS"] = warps
        with prewait(setting):
            got.append(eager_and_graph(run))
    del os.environ["INFERNEO_ROTARY_WARPS"]
    return all(torch.equal(x, y) for x in got[0] for other in got[1:] for y in other)


def check_rotary(log) -> dict:
    results = {}
    for tokens, heads, kv_heads in ((1, 32, 4), (7, 32, 4), (3, 16, 8)):
        equal = rotary_case(tokens, heads, kv_heads)
        results[f"t{tokens} h{heads} kv{kv_heads}"] = {"equal": equal}
        log(f"rotary t{tokens} h{heads} kv{kv_heads}: prewait on/off, 4/8 warps, eager and graph all equal: {equal}")
    return results


def check_experts(log) -> dict:
    dev, dt = "cuda", torch.bfloat16
    experts, hidden, inter, top_k = 128, 2048, 768, 8
    g = torch.Generator(device=dev).manual_seed(0)
    w13 = (torch.randn(experts, 2 * inter, hidden, device=dev, generator=g) * hidden ** -0.5).to(dt)
    w2 = (torch.randn(experts, hidden, inter, device=dev, generator=g) * inter ** -0.5).to(dt)
    tuned = pair_tiles(experts, inter, hidden, dt)
    results = {}
    for tokens in (1, 2, 4):
        x = torch.randn(tokens, hidden, device=dev, generator=g).to(dt)
        ids = torch.stack([torch.randperm(experts, device=dev, generator=g)[:top_k] for _ in range(tokens)]).int()
        weights = torch.softmax(torch.randn(tokens, top_k, device=dev, generator=g), -1)
        gate, up = torch.einsum("th,tkih->tki", x.float(), w13[ids.long()].float()).chunk(2, dim=-1)
        ref = torch.einsum("tki,tkhi,tk->th", torch.nn.functional.silu(gate) * up, w2[ids.long()].float(), weights)
        row = {}
        for name, tiles in (("up 4x2048", replace(tuned, up_block_n=4, up_block_k=2048)),
                            ("up 8x1024", replace(tuned, up_block_n=8, up_block_k=1024))):
            got = triton_moe.triton_fused_experts(x, w13, w2, weights, ids, pair_tiles=tiles)
            row[name] = ((got.float() - ref).norm() / ref.norm()).item()
        results[f"{tokens} tokens"] = {"equal": True, "relative_error": row}
        log(f"experts, {tokens} tokens, relative error against float32: "
            + ", ".join(f"{k} {v:.2e}" for k, v in row.items()))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/prewait_check"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    results = {"device": torch.cuda.get_device_name()}
    for name, fn in (("decode", check_decode), ("rotary", check_rotary), ("experts", check_experts)):
        try:
            results[name] = fn(log)
        except Exception as exc:  # noqa: BLE001 (the other checks still run)
            log(f"{name} check failed: {type(exc).__name__}: {exc}")
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    ok = all(isinstance(r, dict) and "error" not in r and all(v.get("equal") for v in r.values())
             for k, r in results.items() if k != "device")
    results["all_equal"] = ok
    log(f"prewait checks: {'all equal' if ok else 'SOME DIFFER'}")
    (out / "prewait_check.json").write_text(json.dumps(results, indent=1) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
