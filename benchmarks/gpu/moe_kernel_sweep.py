"""Check and tune the Triton fused mixture-of-experts kernels (``inferneo/kernels/triton_moe.py``) on one GPU.

For each layer shape (Qwen3-30B-A3B: E=128, top-8, H=2048, I=768; gpt-oss-20b: E=32, top-4, H=2880, I=2880 with
swigluoai and biases) and token count:

1. **check**: bf16 Triton output against the bf16 PyTorch path and a float32 reference (relative errors), and the
   Triton call captured in a CUDA graph and replayed on new routing (equal to the eager call);
2. **tune**: every tile candidate of each grouped GEMM, timed alone on aligned pairs (``triton.testing.do_bench``,
   L2 flushed), the best kept per ``block_m``; then the best (block_m, up, down) over the whole call;
3. **compare**: the tuned call against the PyTorch path and its floor (bytes of the distinct experts the tokens touch
   over the measured read bandwidth), and the two align variants.

Writes ``moe_kernel_sweep.json`` (everything) and one ``E=...json`` tile-config file per shape (the format of
``inferneo/kernels/moe_configs/``) to ``--out``. ``--deadline`` seconds bounds the tuning (what is left is skipped).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from inferneo.kernels import triton_moe  # noqa: E402
from inferneo.kernels.moe_tile_configs import GemmTiles, MoeTileConfig, config_file_name  # noqa: E402
from inferneo.model_executor.layers.moe import fused_experts  # noqa: E402
from inferneo.model_executor.layers.moe_routing import softmax_topk_renormalized, topk_softmax  # noqa: E402

SHAPES = {
    "qwen3-30b-a3b": dict(experts=128, top_k=8, hidden=2048, inter=768, activation="silu", bias=False,
                          tokens=(1, 8, 32, 64, 256, 1024, 4096)),
    "gpt-oss-20b": dict(experts=32, top_k=4, hidden=2880, inter=2880, activation="swigluoai", bias=True,
                        tokens=(1, 32, 256, 4096)),
}
SMALL_TILES = [GemmTiles(n, k, w, s) for n in (32, 64, 128) for k in (64, 128, 256) for w, s in ((4, 3), (4, 4))]
SMALL_TILES += [GemmTiles(128, 128, 8, 3), GemmTiles(256, 64, 8, 3)]
LARGE_TILES = [GemmTiles(n, k, w, s) for n in (64, 128, 256) for k in (32, 64, 128) for w, s in ((4, 3), (8, 3), (8, 4))
               if not (n == 256 and k == 128)]


def block_ms(pairs_per_expert: float) -> tuple[int, ...]:
    if pairs_per_expert <= 4:
        return (16,)
    if pairs_per_expert <= 32:
        return (16, 32)
    if pairs_per_expert <= 128:
        return (32, 64)
    return (64, 128)


def make_layer(shape: dict, device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    e, h, i = shape["experts"], shape["hidden"], shape["inter"]
    layer = {"w13": torch.randn(e, 2 * i, h, device=device, generator=g, dtype=torch.bfloat16) * 0.02,
             "w2": torch.randn(e, h, i, device=device, generator=g, dtype=torch.bfloat16) * 0.02}
    if shape["bias"]:
        layer["w13_bias"] = torch.randn(e, 2 * i, device=device, generator=g, dtype=torch.bfloat16) * 0.1
        layer["w2_bias"] = torch.randn(e, h, device=device, generator=g, dtype=torch.bfloat16) * 0.1
    return layer


def route(shape: dict, tokens: int, device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(tokens, shape["experts"], device=device, generator=g)
    router = topk_softmax if shape["activation"] == "swigluoai" else softmax_topk_renormalized
    return router(logits, shape["top_k"])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def call(layer, shape, x, routed, config=None, kernel=triton_moe.triton_fused_experts):
    extra = {"config": config} if config is not None else {}
    return kernel(x, layer["w13"], layer["w2"], routed.weights, routed.ids, activation=shape["activation"],
                  w13_bias=layer.get("w13_bias"), w2_bias=layer.get("w2_bias"), **extra)


def check(name: str, shape: dict, layer, device, log) -> list[dict]:
    rows = []
    f32 = {k: v.float() for k, v in layer.items()}
    for tokens in (1, 32, 256, 4096):
        x = torch.randn(tokens, shape["hidden"], device=device, dtype=torch.bfloat16)
        routed = route(shape, tokens, device, seed=tokens)
        got = call(layer, shape, x, routed)
        torch_path = call(layer, shape, x, routed, kernel=fused_experts)
        ref = call(f32, shape, x.float(), routed, kernel=fused_experts)
        row = {"shape": name, "tokens": tokens, "triton_vs_f32": rel(got, ref), "torch_bf16_vs_f32": rel(torch_path, ref),
               "triton_vs_torch_bf16": rel(got, torch_path)}
        row["ok"] = row["triton_vs_f32"] < max(2 * row["torch_bf16_vs_f32"], 1e-2)
        rows.append(row)
        log(f"check {name} T={tokens}: {row}")
    # CUDA graph: capture at 32 tokens, replay with other inputs and routing, compare with the eager call.
    x = torch.randn(32, shape["hidden"], device=device, dtype=torch.bfloat16)
    routed = route(shape, 32, device, seed=1)
    weights, ids = routed.weights.clone(), routed.ids.clone()
    static = type(routed)(weights=weights, ids=ids)
    call(layer, shape, x, static)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(layer, shape, x, static)
    fresh = route(shape, 32, device, seed=2)
    x.copy_(torch.randn_like(x))
    weights.copy_(fresh.weights)
    ids.copy_(fresh.ids)
    graph.replay()
    eager = call(layer, shape, x, fresh)
    row = {"shape": name, "graph_replay_equals_eager": bool(torch.equal(out, eager))}
    log(f"check {name} graph: {row}")
    rows.append(row)
    return rows


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40) * 1e-3  # seconds


def tune(name: str, shape: dict, layer, device, deadline: float, log) -> dict:
    e, k, h = shape["experts"], shape["top_k"], shape["hidden"]
    table = {}
    for tokens in shape["tokens"]:
        if time.monotonic() > deadline:
            log(f"tune {name}: deadline reached before T={tokens}")
            break
        x = torch.randn(tokens, h, device=device, dtype=torch.bfloat16)
        routed = route(shape, tokens, device, seed=tokens)
        best = None
        for block_m in block_ms(tokens * k / e):
            candidates = SMALL_TILES if block_m <= 32 else LARGE_TILES
            best_up = best_down = None
            for tiles in candidates:
                try:
                    up_cfg = MoeTileConfig(block_m, tiles, GemmTiles(64, 64))
                    t_up = bench(functools.partial(call, layer, shape, x, routed, up_cfg))
                    down_cfg = MoeTileConfig(block_m, GemmTiles(64, 64), tiles)
                    t_down = bench(functools.partial(call, layer, shape, x, routed, down_cfg))
                except Exception as exc:  # a tile that does not fit the shared memory
                    log(f"tune {name} T={tokens} bm={block_m} {tiles}: {type(exc).__name__}")
                    continue
                if best_up is None or t_up < best_up[0]:
                    best_up = (t_up, tiles)
                if best_down is None or t_down < best_down[0]:
                    best_down = (t_down, tiles)
            if best_up is None:
                continue
            config = MoeTileConfig(block_m, best_up[1], best_down[1])
            total = bench(functools.partial(call, layer, shape, x, routed, config))
            log(f"tune {name} T={tokens} bm={block_m}: {total * 1e6:.1f} us {config.to_json()}")
            if best is None or total < best[0]:
                best = (total, config)
        if best is not None:
            table[str(tokens)] = best[1].to_json()
    return table


def compare(name: str, shape: dict, layer, device, table: dict, read_bw: float, log) -> list[dict]:
    rows = []
    expert_bytes = 3 * shape["hidden"] * shape["inter"] * 2
    for tokens in (1, 32, 256, 4096):
        x = torch.randn(tokens, shape["hidden"], device=device, dtype=torch.bfloat16)
        routed = route(shape, tokens, device, seed=tokens)
        touched = int(torch.unique(routed.ids).numel())
        config = MoeTileConfig.from_json(table[str(tokens)]) if str(tokens) in table else None
        t_triton = bench(functools.partial(call, layer, shape, x, routed, config))
        t_torch = bench(functools.partial(call, layer, shape, x, routed, kernel=fused_experts))
        pairs = routed.ids.reshape(-1)
        bm = (config.block_m if config else 16)
        blocks = triton_moe.max_blocks(pairs.numel(), shape["experts"], bm)
        t_align_sort = bench(functools.partial(triton_moe._align_by_sort, pairs, shape["experts"], bm, blocks))
        t_align_one = (bench(functools.partial(triton_moe._align_single_program, pairs, shape["experts"], bm, blocks))
                       if pairs.numel() <= 8192 else None)
        row = {"shape": name, "tokens": tokens, "experts_touched": touched, "triton_us": t_triton * 1e6,
               "torch_us": t_torch * 1e6, "floor_us": touched * expert_bytes / read_bw * 1e6,
               "align_sort_us": t_align_sort * 1e6, "align_single_program_us": t_align_one and t_align_one * 1e6}
        rows.append(row)
        log(f"compare {row}")
    return rows


PAIR_CANDIDATES = [triton_moe.PairTiles(un, uk, dn, dk, w) for un, uk in ((2, 1024), (4, 512), (8, 256), (4, 1024))
                   for dn, dk in ((4, 256), (8, 128), (2, 512)) for w in (4,)]


def pair_sweep(name: str, shape: dict, layer, device, read_bw: float, log) -> list[dict]:
    """The few-token path in each tiling against the sorted grouped GEMMs (their tuned config) at 1-8 tokens."""
    rows = []
    expert_bytes = 3 * shape["hidden"] * shape["inter"] * 2
    for tokens in (1, 2, 4, 8):
        x = torch.randn(tokens, shape["hidden"], device=device, dtype=torch.bfloat16)
        routed = route(shape, tokens, device, seed=tokens)
        want = call(layer, shape, x, routed, kernel=fused_experts)
        sorted_config = triton_moe.moe_tile_config(shape["experts"], shape["inter"], shape["hidden"], torch.bfloat16,
                                                   tokens, shape["top_k"])
        t_sorted = bench(functools.partial(call, layer, shape, x, routed, sorted_config))
        best = None
        for tiles in PAIR_CANDIDATES:
            run = functools.partial(triton_moe.triton_fused_experts, x, layer["w13"], layer["w2"], routed.weights,
                                    routed.ids, activation=shape["activation"], w13_bias=layer.get("w13_bias"),
                                    w2_bias=layer.get("w2_bias"), pair_tiles=tiles)
            err = rel(run(), want)
            t = bench(run)
            if best is None or t < best[0]:
                best = (t, tiles, err)
        touched = int(torch.unique(routed.ids).numel())
        row = {"shape": name, "tokens": tokens, "sorted_us": t_sorted * 1e6, "pair_best_us": best[0] * 1e6,
               "pair_best_tiles": str(best[1]), "pair_rel_err_vs_torch": best[2],
               "floor_us": touched * expert_bytes / read_bw * 1e6}
        rows.append(row)
        log(f"pair {row}")
    return rows


def timestamped_log(path: Path):
    """A ``log(message)`` that prints each line with the seconds since this call and appends it to ``path``."""
    start = time.monotonic()
    logfile = path.open("w")

    def log(msg: str) -> None:
        line = f"[{time.monotonic() - start:6.1f}s] {msg}"
        print(line, flush=True)
        logfile.write(line + "\n")
        logfile.flush()

    return log


def read_bandwidth(device) -> float:
    n = 2 << 30
    a = torch.empty(n // 2, dtype=torch.bfloat16, device=device).normal_()
    t = bench(lambda: a.sum())
    return n / t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/moe_sweep")
    parser.add_argument("--deadline", type=float, default=420.0, help="seconds for the tuning, all shapes together")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--pair-only", action="store_true", help="only the few-token path against the grouped GEMMs")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    start = time.monotonic()
    log = timestamped_log(out / "moe_kernel_sweep.log")

    results = {"device": torch.cuda.get_device_name(), "read_bytes_per_s": read_bandwidth(device)}
    log(f"read bandwidth {results['read_bytes_per_s'] / 1e12:.2f} TB/s")
    names = args.shapes.split(",")
    for index, name in enumerate(names):
        shape = SHAPES[name]
        layer = make_layer(shape, device)
        if args.pair_only:
            results[f"{name}_pair"] = pair_sweep(name, shape, layer, device, results["read_bytes_per_s"], log)
            (out / "moe_kernel_sweep.json").write_text(json.dumps(results, indent=1))
            continue
        results[f"{name}_check"] = check(name, shape, layer, device, log)
        share = (args.deadline - (time.monotonic() - start)) / (len(names) - index)
        table = tune(name, shape, layer, device, time.monotonic() + share, log)
        results[f"{name}_tuned"] = table
        file_name = config_file_name(shape["experts"], shape["inter"], shape["hidden"], torch.bfloat16)
        (out / file_name).write_text(json.dumps(table, indent=1) + "\n")
        results[f"{name}_compare"] = compare(name, shape, layer, device, table, results["read_bytes_per_s"], log)
        (out / "moe_kernel_sweep.json").write_text(json.dumps(results, indent=1))
        del layer
        torch.cuda.empty_cache()
    log("done")


if __name__ == "__main__":
    main()
