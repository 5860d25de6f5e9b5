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

PyTorch's int4 kernel (tinygemm, ``inferneo/kernels/tinygemm_int4.py``) is measured beside them per shape and row
count (``inner_k_tiles`` 2, 4, 8; the same check, on the same AWQ weight repacked into its layout; the SiLU-and-mul
kernel added on the gate/up shape, it has no fused activation); before the sweep, its packing is checked on a small
weight, and with ``INFERNEO_INT4_LAYOUT=tinygemm`` each layer is finalized into its layout through the engine's own
path and checked. A layer holds one layout, so tinygemm is chosen per shape, not per row bucket: where its time at
1 and 32 rows (the two decode steps of the issue's targets) adds up to less than the Triton kernels' best
(``"layout,N,K,G"`` entries of kind ``"tinygemm"``).

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
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from inferneo.kernel_config import KernelConfig  # noqa: E402
from inferneo.kernels import tinygemm_int4, triton_int4  # noqa: E402
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


def h2_grid(quick: bool) -> list[W4A16Config]:
    """One-row launches of the packed-half kernel: (rows, words a step, warps), each with the step at least 128
    words a warp (so that each thread's rows sit in its registers), and a few with K split."""
    if quick:
        return [W4A16Config("h2", 8, block_kw=256, num_warps=2),
                W4A16Config("h2", 8, block_kw=256, num_warps=2, split_k=2, last_sums=True)]
    base = [W4A16Config("h2", r, block_kw=kw, num_warps=w)
            for r, kw, w in ((4, 512, 4), (8, 512, 4), (16, 512, 4), (4, 256, 2), (8, 256, 2), (16, 256, 2),
                             (8, 1024, 8), (4, 1024, 8), (2, 512, 4), (8, 128, 1), (16, 128, 1))]
    return base + [replace(c, split_k=sk, last_sums=True) for c in base[:6] for sk in (2, 4)]


def gemv_grid(quick: bool) -> list[W4A16Config]:
    """One-row GEMV launches, without and with K split over more programs (both ways of adding up the parts),
    and the packed-half kernel's (:func:`h2_grid`)."""
    if quick:
        return [W4A16Config("gemv", 16, 8, num_warps=8), W4A16Config("gemv", 32, 4, split_k=2, last_sums=True),
                *h2_grid(True)]
    base = [W4A16Config("gemv", 16, 8, num_warps=8), W4A16Config("gemv", 32, 4), W4A16Config("gemv", 16, 8)]
    return base + [W4A16Config("gemv", 16, 8, num_warps=8, split_k=2, last_sums=True),
                   W4A16Config("gemv", 16, 8, num_warps=8, split_k=4, last_sums=True),
                   W4A16Config("gemv", 16, 8, num_warps=8, split_k=4),
                   W4A16Config("gemv", 32, 4, split_k=2, last_sums=True),
                   W4A16Config("gemv", 32, 4, split_k=4, last_sums=True),
                   W4A16Config("gemv", 16, 4, num_warps=4, split_k=4, last_sums=True), *h2_grid(False)]


def dot_grid(m: int, quick: bool) -> list[W4A16Config]:
    bm = 16 if m <= 16 else 32
    configs = [W4A16Config("dot", 32, block_m=bm, block_kw=16), W4A16Config("dot", 64, block_m=bm, block_kw=8)]
    return configs[:1] if quick else configs


def tc_grid(m: int, n: int, quick: bool) -> list[W4A16Config]:
    """Tensor-core launches: (block_n, groups per step, stages, warps, swap, scale after), each without a split of
    K and (all but ``--quick``) with K split over 2, 4 and 8 programs, the parts added by the last program. Wide
    output tiles (128, 256 rows) read each ``x`` tile for more weight bytes; swapped operands put the de-quantized
    tile on the left of a Hopper ``wgmma`` (its row tile 64 per warp group). Compiled offline for sm_90a, these
    tilings spill no registers at 16 and 32 rows; at 32 rows the 256-row tile with two groups a step needs more
    shared memory than an H100 has (the sweep records it as not compiling). On an H100 (2026-12-05) none beat the
    64-row tile with two groups a step."""
    bm = max(16, min(64, triton_int4.rows_bucket(m)))
    if quick:
        base = [(64, 2, 3, 4, False, True), (32, 2, 3, 4, False, False), (64, 2, 3, 4, True, True)]
        configs = [W4A16Config("tc", bn, bg, bm, num_warps=w, num_stages=st, swap=sw, scale_after=sa)
                   for bn, bg, st, w, sw, sa in base]
        return configs + [replace(c, split_k=2, last_sums=last) for last in (False, True) for c in configs]
    base = [(64, 2, 3, 4, False, True), (64, 2, 3, 4, True, True), (128, 1, 3, 4, False, True),
            (128, 1, 3, 4, True, True), (128, 1, 4, 4, True, True), (128, 1, 4, 8, True, True),
            (128, 2, 3, 8, True, True), (128, 2, 3, 4, True, True), (128, 1, 3, 4, True, False),
            (256, 1, 3, 8, True, True), (256, 1, 4, 8, True, True), (256, 2, 3, 8, True, True)]
    configs = [W4A16Config("tc", bn, bg, bm, num_warps=w, num_stages=st, swap=sw, scale_after=sa)
               for bn, bg, st, w, sw, sa in base if bn <= max(64, triton.next_power_of_2(n))]
    return configs + [replace(c, split_k=sk, last_sums=True) for sk in (2, 4, 8) for c in configs]


def candidates(m: int, n: int, k: int, quick: bool) -> list[W4A16Config]:
    first = default_config("linear", m, n, k, GROUP)
    rest = (gemv_grid(quick) if m == 1 else dot_grid(m, quick)) + tc_grid(m, n, quick)
    return [first, *[c for c in rest if c != first]]


def silu_candidates(m: int, n: int, k: int, quick: bool) -> list[W4A16Config]:
    tcs = [c for c in tc_grid(m, n, quick) if c.split_k == 1]
    gemvs = [c if c.kind == "h2" else replace(c, kind="silu") for c in gemv_grid(quick) if c.split_k == 1] \
        if m == 1 else []
    return gemvs + tcs


# ---- compiling in a pool ----------------------------------------------------------------------------------------


def _random_rows(n: int, k: int, device: str) -> Int4RowWeights:
    groups = k // GROUP
    packed = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device=device)
    scales = (torch.rand(n, groups, device=device) * 0.0025 + 0.00125).half()  # as pack_rows holds them
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


# ---- tinygemm ---------------------------------------------------------------------------------------------------


def tinygemm_probe(log) -> dict:
    """Where PyTorch's int4 kernel runs here: the packing check, and whether fp16 activations are taken."""
    device = torch.device("cuda")
    out = {"torch": torch.__version__, "ops": tinygemm_int4._has_ops()}
    out["packing_ok"] = out["ops"] and tinygemm_int4.cuda_packing_ok(torch.cuda.current_device())
    out["available_bf16"] = tinygemm_int4.tinygemm_available(device, torch.bfloat16, 4096, 4096, GROUP)
    if out["packing_ok"]:
        tg = tinygemm_int4.pack_tinygemm(torch.randint(0, 16, (64, 256), device=device), torch.rand(2, 64,
                                         device=device) * 0.01, torch.randint(0, 16, (2, 64), device=device,
                                         dtype=torch.uint8), GROUP, 8)
        try:
            torch.ops.aten._weight_int4pack_mm(torch.randn(2, 256, device=device).half(), tg.packed, GROUP,
                                               tg.scales_and_zeros.half())
            out["fp16"] = "runs"
        except Exception as exc:  # noqa: BLE001 (recorded)
            out["fp16"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    log("TINYGEMM " + json.dumps(out))
    return out


def tinygemm_layer_check(name, shards, k, gen, log) -> dict:
    """A layer finalized with ``INFERNEO_INT4_LAYOUT=tinygemm`` through the engine's own path: it holds tinygemm's
    layout once, its weight (the product with the identity) against the AWQ de-quantization, and its output at
    1 and 32 rows against float32 ``F.linear`` on that de-quantization."""
    shape = LinearShape(f"layers.0.{name}", k, shards)
    layer = QuantizedLinear(Int4LinearMethod(Int4Scheme("awq", GROUP, True)), shape, False, torch.bfloat16,
                            torch.device("cuda"))
    layer.method.init_dummy(layer, gen)
    before = layer.method.dequantized_weight(layer)  # from the checkpoint tensors: (q - z) * s in float32
    os.environ["INFERNEO_INT4_LAYOUT"] = "tinygemm"
    try:
        layer.method.finalize(layer, KernelConfig())
    finally:
        os.environ["INFERNEO_INT4_LAYOUT"] = "rows"
    blocks = layer.int4_blocks
    out = {"layer": name, "layout": type(blocks[0]).__name__,
           "buffers": sorted(n for n, _ in layer.named_buffers()),
           "buffer_bytes": sum(b.numel() * b.element_size() for b in layer.buffers())}
    if isinstance(blocks[0], tinygemm_int4.Int4TinyGemmWeights):
        w = layer.method.dequantized_weight(layer)
        group = torch.arange(k, device=w.device) // GROUP
        scales = layer.int4_scales_and_zeros[..., 0].float().t()[:, group]  # (bf16 scales: within 2^-9 of s)
        out["weight_max_err_code_steps"] = ((w - before).abs() / scales).max().item()
        out["weight_rel_err"] = ((w - before).norm() / before.norm()).item()
        for m in (1, 32):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out[f"rel_err_{m}"] = rel_err(layer(x), F.linear(x.float(), before))
    log("TINYGEMM_LAYER " + json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in out.items()}))
    return out


# ---- main -------------------------------------------------------------------------------------------------------


def triton_time(line: dict) -> float:
    """The Triton kernels' best for a summary line (the gate/up shape: fused SiLU or the projection + SiLU)."""
    fused = line.get("fused_best_us")
    return min(fused, line.get("unfused_us", math.inf)) if fused else line.get("best_us", math.inf)


def tinygemm_time(line: dict, inner: int | None) -> float | None:
    """tinygemm's time for a summary line with ``inner_k_tiles`` (plus the SiLU-and-mul kernel on gate/up)."""
    us = line.get("tinygemm_us", {}).get(inner)
    return None if us is None else us + line.get("silu_and_mul_us", 0.0)


def choose_layouts(summary: list[dict], shapes: dict) -> dict:
    """Per layer shape: tinygemm's layout (its best ``inner_k_tiles``) where its time at 1 and 32 rows adds up to
    less than the Triton kernels' best at the same rows, else the row layout; keyed by the table's layout key
    keyed by layer name, each entry naming its table key (``"layout,N,K,G"``) and what was compared."""
    out = {}
    for name, (n, k) in shapes.items():
        lines = {line["m"]: line for line in summary if line["layer"] == name}
        rows = [m for m in (1, 32) if m in lines] or sorted(lines)
        triton_sum = sum(triton_time(lines[m]) for m in rows)
        inners = set.intersection(*[set(lines[m].get("tinygemm_us", {})) for m in rows]) if rows else set()
        tg_sums = {i: sum(tinygemm_time(lines[m], i) for m in rows) for i in inners}
        entry = {"key": tinygemm_int4.layout_key(n, k, GROUP), "rows": rows, "triton_us": {m: triton_time(lines[m]) for m in rows},
                 "triton_sum_us": triton_sum, "kind": "rows"}
        if tg_sums:
            inner = min(tg_sums, key=tg_sums.get)
            entry.update(best_tinygemm_inner=inner, tinygemm_sum_us=tg_sums[inner],
                         tinygemm_us={m: tinygemm_time(lines[m], inner) for m in sorted(lines)})
            if tg_sums[inner] < triton_sum:
                entry.update(kind="tinygemm", inner_k_tiles=inner)
        out[name] = entry
    return out


def _row_counts(text: str) -> tuple[int, ...]:
    """``--rows``: comma-separated positive row counts."""
    try:
        rows = tuple(int(r) for r in text.split(","))
    except ValueError:
        rows = ()
    if not rows or min(rows) < 1:
        raise argparse.ArgumentTypeError(f"want comma-separated row counts of 1 or more (e.g. 1,16); got {text!r}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--write-configs", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a few tiles per shape")
    parser.add_argument("--jobs", type=int, default=12, help="processes compiling the candidates first (0: none)")
    parser.add_argument("--rows", default=None, type=_row_counts,
                        help="row counts to sweep (default 1,16,32); with --write-configs the table's other "
                             "entries are kept")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU under TRITON_INTERPRET=1, to check the script")
    args = parser.parse_args()
    os.environ["INFERNEO_INT4_LAYOUT"] = "rows"  # the layers measured hold the Triton layout (tinygemm's made here)
    device = torch.device("cpu" if args.smoke else "cuda")
    timer = host_time_us if args.smoke else graph_time_us
    layers = SMOKE_LAYERS if args.smoke else LAYERS
    rows_list = (1, 20) if args.smoke else ROWS
    if args.rows:
        rows_list = args.rows
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

    try:
        tg_info = {"probe": tinygemm_probe(log) if not args.smoke else {}, "layers": []}
    except Exception as exc:  # noqa: BLE001 (recorded; the Triton sweep goes on)
        tg_info = {"probe": {"error": f"{type(exc).__name__}: {exc}"[:300]}, "layers": []}
        log(f"TINYGEMM probe failed: {exc}")
    use_tinygemm = args.smoke or bool(tg_info["probe"].get("available_bf16"))  # (smoke: its CPU twin)
    summary = []
    for name, shards, k in layers:
        if use_tinygemm and not args.smoke:
            try:
                entry = tinygemm_layer_check(name, shards, k, gen, log)
                tg_info["layers"].append(entry)
                if any(v >= TOLERANCE for key, v in entry.items() if key.startswith("rel_err")):
                    failures.append(entry)
            except Exception as exc:  # noqa: BLE001 (recorded; the Triton sweep goes on)
                tg_info["layers"].append({"layer": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
                failures.append(tg_info["layers"][-1])
                log(f"TINYGEMM_LAYER {name} failed: {exc}")
            torch.cuda.empty_cache()
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
        nbytes = weights.packed.numel() * 4 + weights.scales.numel() * (weights.scales.element_size() + 1)
        copies = [weights] + [clone_weights(weights) for _ in range((1 if args.smoke else copies_for(nbytes)) - 1)]
        try:
            tg_copies = {inner: [tinygemm_int4.tinygemm_from(c, inner) for c in copies]
                         for inner in tinygemm_int4.INNER_K_TILES
                         if use_tinygemm and tinygemm_int4.tinygemm_shape_ok(n, k, GROUP, inner)}
        except Exception as exc:  # noqa: BLE001 (recorded; no tinygemm candidates for this shape)
            log(f"TINYGEMM packing {name} failed: {exc}")
            tg_copies = {}
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
            if m == 1:  # float16 activations through the launch the engine picks for them (checked, timed)
                x16 = x.half()
                xc16 = torch.randn_like(x16)
                err16 = rel_err(w4a16_linear(xc16, copies[0]), F.linear(xc16.float(), w_f32))
                us16 = timer([lambda w=w, x16=x16: w4a16_linear(x16, w) for w in copies])
                chosen16 = triton_int4.choose_config("linear", 1, n, k, GROUP, torch.float16,
                                                     triton_int4.device_sm_count(x.device))
                record(kind="fp16", layer=name, m=1, n=n, k=k, config=chosen16.as_dict(), rel_err=err16, us=us16,
                       gbps=nbytes / us16 / 1e3)

            def run_tg(config, i, x=x, w_f32=w_f32, tg_copies=tg_copies):
                tgs = tg_copies[config.inner_k_tiles]
                if i is None:
                    xc = torch.randn_like(x)
                    return rel_err(tinygemm_int4.tinygemm_linear(xc, tgs[0]), F.linear(xc.float(), w_f32))
                return tinygemm_int4.tinygemm_linear(x, tgs[i])

            tg_configs = [W4A16Config("tinygemm", 0, inner_k_tiles=inner) for inner in tg_copies]
            tg = sweep("tinygemm", m, n, k, tg_configs, run_tg, nbytes, copies) if tg_configs else {}
            line = {"layer": name, "m": m, "bf16_cublas_us": bf16_us, "layer_rel_err": layer_err,
                    "tinygemm_us": {c.inner_k_tiles: us for c, us in tg.items()}}
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
        tg_copies.clear()
        if not args.smoke:
            torch.cuda.empty_cache()
        log(f"-- {name} done at {time.perf_counter() - started:.0f} s")

    for key, (config, us) in sorted(best.items()):
        log(f"best {key}: {us:.2f} us {config}")
    table = {key: config.as_dict() for key, (config, _) in sorted(best.items()) if not key.startswith("tinygemm,")}
    layouts = choose_layouts(summary, shapes={name: (sum(shards), k) for name, shards, k in layers})
    for name, entry in layouts.items():
        log(f"LAYOUT {name}: {json.dumps(entry)}")
        if entry["kind"] == "tinygemm" and not args.rows:  # (a layout is chosen on 1 and 32 rows together)
            table[entry["key"]] = {"kind": "tinygemm", "inner_k_tiles": entry["inner_k_tiles"]}
    sums = {}
    for line in summary:
        sums.setdefault(line["m"], {"bf16": 0.0, "w4a16": 0.0, "tinygemm": 0.0, "chosen": 0.0})
        sums[line["m"]]["bf16"] += line["bf16_cublas_us"]
        triton_us = triton_time(line)
        sums[line["m"]]["w4a16"] += triton_us
        entry = layouts[line["layer"]]
        tg = tinygemm_time(line, entry.get("inner_k_tiles"))
        sums[line["m"]]["tinygemm"] += tinygemm_time(line, entry.get("best_tinygemm_inner")) or math.inf
        sums[line["m"]]["chosen"] += tg if entry["kind"] == "tinygemm" and tg else triton_us
    for m, s in sorted(sums.items()):
        log(f"layer set at {m} rows: W4A16 Triton {s['w4a16']:.1f} us, tinygemm {s['tinygemm']:.1f} us, "
            f"chosen layouts {s['chosen']:.1f} us, bf16 cuBLAS {s['bf16']:.1f} us")
    if args.rows and triton_int4.TUNED_CONFIG_FILE.is_file():  # keep what this run did not sweep
        kept = json.loads(triton_int4.TUNED_CONFIG_FILE.read_text())
        table = dict(sorted({**kept, **table}.items()))
    if args.write_configs and not args.smoke:
        triton_int4.TUNED_CONFIG_FILE.write_text(json.dumps(table, indent=1) + "\n")
        log(f"wrote {triton_int4.TUNED_CONFIG_FILE.name}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "int4_check.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / "int4_tinygemm.json").write_text(json.dumps({**tg_info, "layouts": layouts,
                                                            "layer_sets": sums}, indent=1) + "\n")
        (out / "int4_configs.json").write_text(json.dumps(table, indent=1) + "\n")
    if failures:
        log(f"FAILED: {len(failures)} launches over the tolerance {TOLERANCE} (or broken)")
        return 1
    log(f"all launches within {TOLERANCE} of float32 F.linear")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
