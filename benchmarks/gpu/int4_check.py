"""W4A16 (4-bit weights, AWQ layout, group 128) on the GPU: the Triton kernels against F.linear on the de-quantized
weight, their tiles tuned on Llama-2-7B's layer shapes, and their time beside bf16 (cuBLAS and the Triton GEMV).

Each layer is the engine's own :class:`QuantizedLinear` with :class:`Int4LinearMethod` (dummy weights from
``init_dummy``, finalized as after loading: repacked into the row layout), so the production layout is measured.
Per shape and row count (1, 16, 32): every candidate launch of the kernels of ``inferneo/kernels/triton_int4.py``
(the one-row GEMV, the float32-de-quantizing ``dot`` kernel, the half-precision tensor-core ``tc`` kernel in its
variants: swapped operands, scales after each group's dot or on the tile, split K), and on the gate/up shape the
fused gate/up + SiLU launches; each is checked against float32 ``F.linear`` on the de-quantized weight (relative
error, bf16 activations, fresh random inputs for each check, a non-finite output failing it). Times are
CUDA-graph replays of ``CALLS`` calls cycling over enough copies of the weights that they do not stay in L2 (as in
a real step, where each layer reads its own), median of 5 replays, per call. Before the sweep, a pool of processes
compiles every candidate into Triton's cache (``--jobs``), so the sweep itself mostly times.

``--write-configs`` writes the fastest launch per shape and row bucket to ``inferneo/kernels/int4_configs.json``
(where the kernels read them: keys ``linear,BUCKET,N,K,G`` and ``silu,BUCKET,D,K,G``; a fused SiLU entry of kind
``"none"`` where the best projection plus the SiLU-and-mul kernel beat every fused launch) and a copy to ``--out``.

Usage: ``python benchmarks/gpu/int4_check.py [--out DIR] [--write-configs] [--quick] [--jobs N]``; ``--smoke``
(with ``TRITON_INTERPRET=1``) runs tiny shapes on CPU to check the script.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from inferneo.kernel_config import KernelConfig  # noqa: E402
from inferneo.kernels import triton_int4  # noqa: E402
from inferneo.kernels.triton_int4 import W4A16Config, config_key, default_config, w4a16_linear, w4a16_silu_mul  # noqa: E402
from inferneo.quantization.base import LinearShape, QuantizedLinear  # noqa: E402
from inferneo.quantization.int4 import Int4LinearMethod, Int4Scheme  # noqa: E402
from inferneo.quantization.int4_layouts import Int4RowWeights, pack_rows  # noqa: E402

# Llama-2-7B: (name, output shards, in_features)
LAYERS = (("qkv_proj", (4096, 4096, 4096), 4096), ("o_proj", (4096,), 4096),
          ("gate_up_proj", (11008, 11008), 4096), ("down_proj", (4096,), 11008))
SMOKE_LAYERS = (("qkv_proj", (64, 64, 64), 256), ("gate_up_proj", (128, 128), 256))
ROWS = (1, 16, 32)
GROUP = 128
CALLS = 24
L2_SPAN = 256 * 2**20  # bytes of weights cycled through per graph: several times the H200's L2
TOLERANCE = 1.5e-2  # bf16 activations and output: the output's rounding (2^-9) and, for tl.dot, the weights'


def graph_time_us(fns) -> float:
    """Microseconds per call: a CUDA graph of ``CALLS`` calls cycling over ``fns``, median of 5 replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fns[i % len(fns)]()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / CALLS)
    return sorted(times)[len(times) // 2]


def host_time_us(fns) -> float:
    """``--smoke`` on CPU: microseconds per call of a plain loop (the numbers mean nothing)."""
    start = time.perf_counter()
    for fn in fns:
        fn()
    return (time.perf_counter() - start) * 1e6 / len(fns)


def copies_for(nbytes: int) -> int:
    return max(1, min(CALLS, math.ceil(L2_SPAN / nbytes)))


def clone_weights(w: Int4RowWeights) -> Int4RowWeights:
    return Int4RowWeights(w.packed.clone(), w.scales.clone(), w.zeros.clone(), w.group_size, w.perm)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("inf")  # an unwritten (poisoned) or broken output
    return ((y.float() - ref).norm() / ref.norm()).item()


# ---- candidates -------------------------------------------------------------------------------------------------


def gemv_grid(quick: bool) -> list[W4A16Config]:
    """One-row GEMV launches, without and with K split over more programs (both ways of adding up the parts)."""
    if quick:
        return [W4A16Config("gemv", 16, 8, num_warps=8), W4A16Config("gemv", 32, 4, split_k=2, last_sums=True)]
    base = [W4A16Config("gemv", 16, 8, num_warps=8), W4A16Config("gemv", 32, 4), W4A16Config("gemv", 16, 8)]
    return base + [W4A16Config("gemv", 16, 8, num_warps=8, split_k=2, last_sums=True),
                   W4A16Config("gemv", 16, 8, num_warps=8, split_k=4, last_sums=True),
                   W4A16Config("gemv", 16, 8, num_warps=8, split_k=4),
                   W4A16Config("gemv", 32, 4, split_k=2, last_sums=True),
                   W4A16Config("gemv", 32, 4, split_k=4, last_sums=True),
                   W4A16Config("gemv", 16, 4, num_warps=4, split_k=4, last_sums=True)]


def dot_grid(m: int, quick: bool) -> list[W4A16Config]:
    bm = 16 if m <= 16 else 32
    configs = [W4A16Config("dot", 32, block_m=bm, block_kw=16), W4A16Config("dot", 64, block_m=bm, block_kw=8)]
    return configs[:1] if quick else configs


def tc_grid(m: int, n: int, quick: bool) -> list[W4A16Config]:
    """Tensor-core launches: (block_n, groups per step, stages, warps, swap, scale after), each without a split of
    K, and the first three with K split over 2, 4 and 8 programs, both ways of adding up the parts."""
    bm = 16 if m <= 16 else 32
    if quick:
        base = [(64, 2, 3, 4, False, True), (32, 2, 3, 4, False, False), (64, 2, 3, 4, True, True)]
        splits = (2,)
    else:
        base = [(64, 2, 3, 4, False, True), (32, 2, 3, 4, False, False), (64, 2, 3, 4, True, True),
                (64, 2, 3, 8, False, True), (32, 2, 3, 4, False, True)]
        splits = (2, 4, 8)
    configs = [W4A16Config("tc", bn, bg, bm, num_warps=w, num_stages=st, swap=sw, scale_after=sa)
               for bn, bg, st, w, sw, sa in base]
    for sk in splits:
        for last in (False, True):
            configs += [replace(c, split_k=sk, last_sums=last) for c in configs[:3]]
    return configs


def candidates(m: int, n: int, k: int, quick: bool) -> list[W4A16Config]:
    first = default_config("linear", m, n, k, GROUP)
    rest = (gemv_grid(quick) if m == 1 else dot_grid(m, quick)) + tc_grid(m, n, quick)
    return [first, *[c for c in rest if c != first]]


def silu_candidates(m: int, n: int, k: int, quick: bool) -> list[W4A16Config]:
    tcs = [c for c in tc_grid(m, n, quick) if c.split_k == 1]
    gemvs = [replace(c, kind="silu") for c in gemv_grid(quick) if c.split_k == 1] if m == 1 else []
    return gemvs + tcs


# ---- compiling in a pool ----------------------------------------------------------------------------------------


def _random_rows(n: int, k: int, device: str) -> Int4RowWeights:
    groups = k // GROUP
    packed = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device=device)
    scales = torch.rand(n, groups, device=device) * 0.0025 + 0.00125
    zeros = torch.randint(0, 16, (n, groups), dtype=torch.uint8, device=device)
    return Int4RowWeights(packed, scales, zeros, GROUP)


def _compile_job(job) -> str | None:
    """Run one launch once on random data of the shape (compiling it into Triton's cache); the error, if any."""
    op, m, n, k, config = job
    try:
        weights = _random_rows(2 * n if op == "silu" else n, k, "cuda")
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        (w4a16_silu_mul if op == "silu" else w4a16_linear)(x, weights, config)
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # reported by the sweep when it runs the same launch
        return f"{type(exc).__name__}: {exc}"[:200]


def precompile(jobs: list, processes: int, log) -> None:
    started = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        errors = [e for e in pool.map(_compile_job, jobs, chunksize=1) if e]
    log(f"-- compiled {len(jobs)} launches in {time.perf_counter() - started:.0f} s with {processes} processes "
        f"({len(errors)} errors{': ' + errors[0] if errors else ''})")


# ---- main -------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--write-configs", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a few tiles per shape")
    parser.add_argument("--jobs", type=int, default=12, help="processes compiling the candidates first (0: none)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU under TRITON_INTERPRET=1, to check the script")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    timer = host_time_us if args.smoke else graph_time_us
    layers = SMOKE_LAYERS if args.smoke else LAYERS
    rows_list = (1, 20) if args.smoke else ROWS
    quick = args.quick or args.smoke
    global TOLERANCE
    if args.smoke:  # bfloat16 tl.dot under the interpreter
        from tests.triton_interpreter_shims import patch_interpreter

        patch_interpreter()
        TOLERANCE = 3e-2  # the interpreter truncates float32 -> bfloat16 (the GPU rounds): up to 2x the error
    gen = torch.Generator(device=device).manual_seed(0)
    records, failures = [], []
    best: dict[str, tuple[W4A16Config, float]] = {}
    started = time.perf_counter()

    def log(line: str) -> None:
        print(line, flush=True)

    def record(**r) -> None:
        r = {k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()}
        print(json.dumps(r), flush=True)
        records.append(r)
        if r.get("rel_err", 0) >= TOLERANCE or "error" in r and r.get("kind") != "compile":
            failures.append(r)

    if args.jobs and not args.smoke:
        jobs = []
        for _, shards, k in layers:
            n = sum(shards)
            for m in rows_list:
                jobs += [("linear", m, n, k, c) for c in candidates(m, n, k, quick)]
                if len(shards) == 2:
                    jobs += [("silu", m, n // 2, k, c) for c in silu_candidates(m, n // 2, k, quick)]
        precompile(jobs, args.jobs, log)

    def sweep(op: str, m: int, n: int, k: int, configs, run, nbytes: int, copies: list) -> dict:
        """Check and time ``run(config, copy)`` for each config; keep the fastest for the shape; {config: us}."""
        key = config_key(op, m, n, k, GROUP)
        times = {}
        for config in configs:
            try:
                err = run(config, None)
                us = timer([lambda c=config, i=i: run(c, i) for i in range(len(copies))])
            except Exception as exc:  # a tile that does not compile or fit: say so, go on
                if args.smoke:
                    import traceback
                    traceback.print_exc()
                record(op=op, key=key, config=config.as_dict(), error=f"{type(exc).__name__}: {exc}"[:300],
                       kind="compile")
                continue
            record(op=op, key=key, m=m, n=n, k=k, config=config.as_dict(), rel_err=err, us=us,
                   gbps=nbytes / us / 1e3)
            if err >= TOLERANCE:
                continue  # never chosen
            times[config] = us
            if key not in best or us < best[key][1]:
                best[key] = (config, us)
        return times

    summary = []
    for name, shards, k in layers:
        shape = LinearShape(f"layers.0.{name}", k, shards)
        layer = QuantizedLinear(Int4LinearMethod(Int4Scheme("awq", GROUP, True)), shape, False, torch.bfloat16,
                                device)
        layer.method.init_dummy(layer, gen)
        layer.method.finalize(layer, KernelConfig())
        weights = layer.int4_blocks[0]
        if args.smoke:  # on CPU the layer keeps the canonical layout of the CPU kernel
            weights = pack_rows(weights)
        assert isinstance(weights, Int4RowWeights), type(weights)
        n = shape.out_features
        nbytes = weights.packed.numel() * 4 + weights.scales.numel() * 5
        copies = [weights] + [clone_weights(weights) for _ in range((1 if args.smoke else copies_for(nbytes)) - 1)]
        w_f32 = layer.method.dequantized_weight(layer)
        w_bf16 = [w_f32.to(torch.bfloat16) for _ in range(1 if args.smoke else copies_for(n * k * 2))]
        for m in rows_list:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            ref = F.linear(x.float(), w_f32)
            layer_err = rel_err(layer(x), ref)  # the layer's own path (on CUDA: these kernels, default tiles)
            bf16_us = timer([lambda w=w, x=x: F.linear(x, w) for w in w_bf16])
            row = dict(kind="bf16", layer=name, m=m, n=n, k=k, cublas_us=bf16_us, layer_rel_err=layer_err)
            if m == 1 and not args.smoke:
                from inferneo.kernels.triton_gemv import gemv

                row["triton_gemv_us"] = graph_time_us([lambda w=w, x=x: gemv(x, w) for w in w_bf16])
            record(**row)

            def run(config, i, x=x, copies=copies, w_f32=w_f32):
                if i is None:  # the check: fresh inputs each time
                    xc = torch.randn_like(x)
                    refc = F.linear(xc.float(), w_f32)
                    return rel_err(w4a16_linear(xc, copies[0], config), refc)
                return w4a16_linear(x, copies[i], config)

            lin = sweep("linear", m, n, k, candidates(m, n, k, quick), run, nbytes, copies)
            line = {"layer": name, "m": m, "bf16_cublas_us": bf16_us, "layer_rel_err": layer_err}
            if lin:
                cfg, us = min(lin.items(), key=lambda kv: kv[1])
                line.update(best_us=us, best=cfg.as_dict())
                old = [t for c, t in lin.items() if c.kind != "tc"]
                line["old_kernels_us"] = min(old) if old else None
            if len(shards) == 2:
                d = n // 2
                gate_up = ref  # (checked with fresh inputs below)

                def run_silu(config, i, x=x, copies=copies, w_f32=w_f32):
                    if i is None:
                        xc = torch.randn_like(x)
                        gate, up = F.linear(xc.float(), w_f32).to(torch.bfloat16).float().chunk(2, dim=1)
                        silu_ref = F.silu(gate).to(torch.bfloat16).float() * up
                        return rel_err(w4a16_silu_mul(xc, copies[0], config), silu_ref)
                    return w4a16_silu_mul(x, copies[i], config)

                from inferneo.kernels._triton_elementwise import silu_and_mul

                act_in = gate_up.to(torch.bfloat16)
                act_us = 0.0 if args.smoke else graph_time_us([lambda a=act_in: silu_and_mul(a)])
                fused = sweep("silu", m, d, k, silu_candidates(m, d, k, quick), run_silu, nbytes, copies)
                key = config_key("silu", m, d, k, GROUP)
                unfused = (line.get("best_us") or math.inf) + act_us
                if key not in best or best[key][1] > unfused:  # apart is faster: the table says so
                    best[key] = (W4A16Config("none", 0), unfused)
                line.update(silu_and_mul_us=act_us, unfused_us=unfused,
                            fused_best_us=min(fused.values()) if fused else None)
            summary.append(line)
            log("SUMMARY " + json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in line.items()}))
        del layer, weights, w_bf16
        copies.clear()
        if not args.smoke:
            torch.cuda.empty_cache()
        log(f"-- {name} done at {time.perf_counter() - started:.0f} s")

    table = {key: config.as_dict() for key, (config, _) in sorted(best.items())}
    for key, (config, us) in sorted(best.items()):
        log(f"best {key}: {us:.2f} us {config}")
    sums = {}
    for line in summary:
        sums.setdefault(line["m"], {"bf16": 0.0, "w4a16": 0.0})
        sums[line["m"]]["bf16"] += line["bf16_cublas_us"]
        fused = line.get("fused_best_us")
        use = min(fused, line.get("unfused_us", math.inf)) if fused else line.get("best_us", math.inf)
        sums[line["m"]]["w4a16"] += use
    for m, s in sorted(sums.items()):
        log(f"layer set at {m} rows: W4A16 {s['w4a16']:.1f} us, bf16 cuBLAS {s['bf16']:.1f} us")
    if args.write_configs and not args.smoke:
        triton_int4.TUNED_CONFIG_FILE.write_text(json.dumps(table, indent=1) + "\n")
        log(f"wrote {triton_int4.TUNED_CONFIG_FILE.name}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "int4_check.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / "int4_configs.json").write_text(json.dumps(table, indent=1) + "\n")
    if failures:
        log(f"FAILED: {len(failures)} launches over the tolerance {TOLERANCE} (or broken)")
        return 1
    log(f"all launches within {TOLERANCE} of float32 F.linear")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
