"""Check and time the Triton attention backend on one CUDA GPU (written for an H100; about a minute).

1. Correctness: every standard case (decode, GQA, block sizes 16/32, prefill with and without context, mixed
   steps) in float32 and bfloat16 against the PyTorch reference, output buffers poisoned with NaNs first;
   prints ``||out - ref|| / ||ref||``. Also a CUDA-graph capture of a decode-only step, replayed and compared.
2. Decode timing (attention only, and the backend's whole forward incl. the KV store) for batch 1/32/128 at
   context 1024, Llama-2-7B heads (32/32/128) and a GQA config (32/8/128), against the memory floor: KV bytes
   read / copy bandwidth measured here.
3. Prefill timing: 8 spans x 1024 tokens (causal, no context) against the FLOP floor from a measured bf16 matmul
   rate, a few kernel configs, and PyTorch SDPA on dense tensors for comparison.

4. Sliding window, soft-capping and sinks on gpt-oss- and Gemma-2-shaped heads: correctness, a captured decode
   step, and its time against plain attention.

Usage: ``python benchmarks/gpu/check_attention.py [variants]``; writes ``$OUT/attention.json`` when ``OUT`` is set. Each
section catches its own errors, so one failure never hides the others.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

RESULTS: dict = {"correctness": [], "decode": [], "prefill": [], "errors": [], "skipped": []}
CONTEXT = 1024
BLOCK_SIZE = 16
# Seconds each section may start new work for (kernel compiles dominate on a cold cache); the total stays < 2 min.
BUDGET_S = {"correctness": 45, "decode": 25, "prefill": 35}


class Budget:
    """A section's time allowance: ``over()`` once it is spent (and the skipped item is recorded)."""

    def __init__(self, name: str) -> None:
        self.name, self.end = name, time.perf_counter() + BUDGET_S[name]

    def over(self, item: str) -> bool:
        if time.perf_counter() < self.end:
            return False
        RESULTS["skipped"].append(f"{self.name}: {item}")
        print(f"   (time budget spent: skipping {item})")
        return True


def section(name):
    """Run ``fn`` as a named section: print and record any exception instead of raising."""

    def wrap(fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            print(f"\n== {name}", flush=True)
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - report and go on
                traceback.print_exc()
                RESULTS["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
            finally:
                print(f"   ({time.perf_counter() - start:.1f} s)", flush=True)

        return run

    return wrap


def bench(fn) -> float:
    """Median milliseconds of ``fn`` (triton.testing.do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


@section("correctness vs the PyTorch reference (CUDA)")
def check_correctness(dev):
    from inferneo.attention.check_cases import STANDARD_CASES, AttentionCase, build_step, compare_backends
    from inferneo.attention.check_cases import relative_error as rel
    from inferneo.attention.triton_backend import TritonBackend

    limits = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
    extra = (AttentionCase("decode-long-splits", 32, 8, 128, 16, decode_lens=(1, 700, 1024, 2000)),
             AttentionCase("prefill-long-gqa", 32, 8, 128, 16, prefills=((0, 300), (500, 260))))
    budget = Budget("correctness")
    for dtype in limits:
        for case in STANDARD_CASES + extra:
            for backend in (TritonBackend(), TritonBackend(prefill_block_m=64, decode_splits=3)):
                if budget.over(f"{case.name}/{dtype}"):
                    continue
                step = build_step(case, dtype, dev, seed=1)
                out, ref, cache, ref_cache = compare_backends(backend, step, poison=True)
                err = rel(out, ref)
                cache_ok = bool(torch.equal(cache, ref_cache))
                ok = err < limits[dtype] and cache_ok
                tag = f"{case.name}/{str(dtype)[6:]}/m{backend.prefill_block_m}s{backend.decode_splits}"
                RESULTS["correctness"].append({"case": tag, "rel_err": err, "cache_ok": cache_ok, "ok": ok})
                print(f"   {'ok  ' if ok else 'FAIL'} {tag:48s} rel_err {err:.2e}  cache {cache_ok}")


@section("CUDA-graph capture of a decode-only step")
def check_graph(dev):
    from inferneo.attention.check_cases import AttentionCase, build_step, relative_error, to_backend_layout
    from inferneo.attention.triton_backend import TritonBackend

    for case in (AttentionCase("graph-mha", 32, 32, 128, 16, decode_lens=(1, 17, 300, 1000)),
                 AttentionCase("graph-gqa-1req", 32, 8, 128, 16, decode_lens=(900,))):
        backend = TritonBackend()
        step = build_step(case, torch.bfloat16, dev, seed=2)
        cache = to_backend_layout(step.ref_cache, backend)
        meta = step.metadata()
        backend.prepare(meta)
        eager = backend.forward(step.q, step.k, step.v, cache, meta, step.scale).clone()  # warm-up compiles
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            backend.prepare(meta)
            captured = backend.forward(step.q, step.k, step.v, cache, meta, step.scale)
        captured.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        err = relative_error(captured, eager)
        ms = bench(graph.replay)
        print(f"   {case.name}: replay rel_err vs eager {err:.1e}, replay {ms * 1e3:.1f} us")
        RESULTS.setdefault("graph", []).append({"case": case.name, "rel_err": err, "replay_us": ms * 1e3})


# Per-layer options of the models that need them, on heads shaped like theirs.
VARIANT_MODELS = {
    "gpt-oss (window 128, sinks)": (dict(sliding_window=128, sinks=True), (64, 8, 64)),
    "gemma2 (window 4096, softcap 50)": (dict(sliding_window=4096, logit_softcap=50.0), (16, 8, 256)),
    "gemma2 global (softcap 50)": (dict(logit_softcap=50.0), (16, 8, 256)),
}


@section("sliding window, soft-capping and sinks vs the PyTorch reference (CUDA), with a captured decode")
def check_variants(dev):
    from inferneo.attention.check_cases import AttentionCase, build_step, compare_backends
    from inferneo.attention.check_cases import relative_error as rel
    from inferneo.attention.triton_backend import TritonBackend

    limits = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
    for label, (options, (heads, kv_heads, dim)) in VARIANT_MODELS.items():
        opts = dict(options)
        if opts.pop("sinks", False):
            opts["sinks"] = torch.linspace(-2.0, 4.0, heads, device=dev)
        case = AttentionCase(label, heads, kv_heads, dim, 16, decode_lens=(1, 100, 129, 700, 5000),
                             prefills=((0, 300), (200, 150), (4000, 200)))
        for dtype in limits:
            for backend in (TritonBackend(), TritonBackend(prefill_block_m=64, decode_splits=3)):
                step = build_step(case, dtype, dev, seed=4)
                out, ref, cache, ref_cache = compare_backends(backend, step, poison=True, **opts)
                err, cache_ok = rel(out, ref), bool(torch.equal(cache, ref_cache))
                ok = err < limits[dtype] and cache_ok and bool(torch.isfinite(out).all())
                tag = f"{label}/{str(dtype)[6:]}/m{backend.prefill_block_m}s{backend.decode_splits}"
                RESULTS["correctness"].append({"case": tag, "rel_err": err, "cache_ok": cache_ok, "ok": ok})
                print(f"   {'ok  ' if ok else 'FAIL'} {tag:60s} rel_err {err:.2e}  cache {cache_ok}")
        _time_variant_decode(dev, label, heads, kv_heads, dim, opts)


def _time_variant_decode(dev, label: str, heads: int, kv_heads: int, dim: int, opts: dict) -> None:
    """A decode-only step with the options, captured in a CUDA graph and replayed; then its time against the same
    step without the options (a window scans only its last tokens)."""
    import functools

    from inferneo.attention.check_cases import AttentionCase, build_step, relative_error, to_backend_layout
    from inferneo.attention.triton_backend import TritonBackend

    case = AttentionCase(label, heads, kv_heads, dim, 16, decode_lens=(8192,) * 32)
    step = build_step(case, torch.bfloat16, dev, seed=5)
    backend = TritonBackend()
    cache = to_backend_layout(step.ref_cache, backend)
    meta = step.metadata()
    forward = functools.partial(backend.forward, step.q, step.k, step.v, cache, meta, step.scale)
    eager = forward(**opts).clone()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        captured = forward(**opts)
    captured.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    err = relative_error(captured, eager)
    with_us = 1e3 * bench(functools.partial(forward, **opts))
    plain_us = 1e3 * bench(forward)
    print(f"   {label}: graph replay rel_err {err:.1e}; decode 32 x 8192 forward {with_us:.1f} us "
          f"(plain attention {plain_us:.1f} us)")
    RESULTS.setdefault("variants", []).append({"case": label, "graph_rel_err": err, "forward_us": with_us,
                                               "plain_forward_us": plain_us})


def copy_bandwidth(dev) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


@section("decode timing vs the memory floor")
def time_decode(dev):
    bw = copy_bandwidth(dev)
    RESULTS["copy_bandwidth_gbs"] = bw / 1e9
    print(f"   device copy bandwidth {bw / 1e9:.0f} GB/s")
    budget = Budget("decode")
    for heads, kv_heads, dim in ((32, 32, 128), (32, 8, 128)):
        for batch in (1, 32, 128):
            if budget.over(f"H{heads}/KV{kv_heads} B{batch}"):
                continue
            row = decode_row(dev, bw, heads, kv_heads, dim, batch)
            RESULTS["decode"].append(row)
            dot = f" dot {row['attn_dot_us']:7.1f}" if "attn_dot_us" in row else ""
            print(f"   H{heads}/KV{kv_heads} B{batch:4d}: attn {row['attn_us']:7.1f} us{dot}  forward "
                  f"{row['forward_us']:7.1f} us  floor {row['floor_us']:7.1f} us  ratio {row['ratio']:.2f}  "
                  f"splits {row['splits']}")


def decode_row(dev, bw: float, heads: int, kv_heads: int, dim: int, batch: int) -> dict:
    """Times one decode configuration (bf16, every request at ``CONTEXT`` tokens, shuffled blocks)."""
    from inferneo.attention.backend import AttentionMetadata
    from inferneo.attention.triton_backend import TritonBackend
    from inferneo.kernels import triton_attention as ops

    dtype, gen = torch.bfloat16, torch.Generator(device=dev).manual_seed(0)
    per_seq = CONTEXT // BLOCK_SIZE
    num_blocks = batch * per_seq + 1
    cache = torch.randn((2, num_blocks, kv_heads, BLOCK_SIZE, dim), dtype=dtype, device=dev, generator=gen)
    tables = torch.randperm(num_blocks - 1, device=dev, generator=gen)[: batch * per_seq].view(batch, -1)
    lens = torch.full((batch,), CONTEXT, dtype=torch.int64, device=dev)
    q = torch.randn((batch, heads, dim), dtype=dtype, device=dev, generator=gen)
    k = torch.randn((batch, kv_heads, dim), dtype=dtype, device=dev, generator=gen)
    out = torch.empty_like(q)
    slots = tables[:, -1] * BLOCK_SIZE + BLOCK_SIZE - 1
    meta = AttentionMetadata(BLOCK_SIZE, batch, slots, tables, lens)
    backend = TritonBackend()
    kv_bytes = 2 * batch * CONTEXT * kv_heads * dim * cache.element_size()
    floor_us = kv_bytes / bw * 1e6
    row = {"heads": heads, "kv_heads": kv_heads, "head_dim": dim, "batch": batch, "context": CONTEXT,
           "kv_bytes": kv_bytes, "floor_us": floor_us}
    variants = {"attn": False, "attn_dot": True} if heads == kv_heads else {"attn": None}
    for name, use_dot in variants.items():
        row[f"{name}_us"] = 1e3 * bench(lambda use_dot=use_dot: ops.paged_decode(
            q, cache, tables, lens, dim**-0.5, out, use_dot=use_dot))
    row["forward_us"] = 1e3 * bench(lambda: backend.forward(q, k, k, cache, meta, dim**-0.5))
    max_len = tables.shape[1] * BLOCK_SIZE
    row["splits"] = ops.choose_num_splits(batch, kv_heads, max_len, ops.decode_block_n(max_len),
                                          ops.device_sm_count(q.device))
    row["ratio"] = row["attn_us"] / floor_us
    return row


def matmul_rate(dev) -> float:
    """Measured bf16 dense matmul FLOP/s (8192^3)."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    ms = bench(lambda: a @ a)
    return 2 * 8192**3 / (ms * 1e-3)


@section("prefill timing vs the FLOP floor")
def time_prefill(dev):
    rate = matmul_rate(dev)
    RESULTS["matmul_tflops"] = rate / 1e12
    print(f"   bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    budget = Budget("prefill")
    for heads, kv_heads, dim in ((32, 32, 128), (32, 8, 128)):
        row = prefill_row(dev, rate, heads, kv_heads, dim, budget)
        RESULTS["prefill"].append(row)
        print(f"   H{heads}/KV{kv_heads}: default {row['default_us']} us, best {row['best']} {row['best_us']:.1f} us, "
              f"SDPA(dense) {row['sdpa_us']:.1f} us, floor {row['floor_us']:.1f} us, ratio {row['ratio']:.2f}")
        print("   configs: " + ", ".join(f"{k} {v:.0f}" for k, v in row["configs"].items()))


def prefill_row(dev, rate: float, heads: int, kv_heads: int, dim: int, budget: Budget | None = None,
                spans_n: int = 8, n: int = 1024) -> dict:
    """Times causal prefill of ``spans_n`` spans of ``n`` tokens over a few kernel configs, and dense SDPA."""
    import torch.nn.functional as F

    from inferneo.attention.backend import PrefillSpan
    from inferneo.kernels import triton_attention as ops

    dtype = torch.bfloat16
    per_seq = n // BLOCK_SIZE
    num_blocks = spans_n * per_seq + 1
    cache = torch.randn((2, num_blocks, kv_heads, BLOCK_SIZE, dim), dtype=dtype, device=dev)
    perm = torch.randperm(num_blocks - 1, device=dev)[: spans_n * per_seq].view(spans_n, -1)
    spans = [PrefillSpan(i * n, n, 0, perm[i]) for i in range(spans_n)]
    q = torch.randn((spans_n * n, heads, dim), dtype=dtype, device=dev)
    out = torch.empty_like(q)
    flops = 4 * heads * dim * spans_n * n * (n + 1) / 2
    floor_us = flops / rate * 1e6
    row = {"heads": heads, "kv_heads": kv_heads, "head_dim": dim, "spans": spans_n, "tokens": n,
           "floor_us": floor_us, "configs": {}}
    n_default, w_default, s_default = ops.prefill_config(dim)
    default_key = f"m128-n{n_default}-w{w_default}-s{s_default}"
    candidates = [(128, (n_default, w_default, s_default)), (128, (128, 8, 3)), (64, (64, 4, 3)), (128, (64, 4, 2))]
    for block_m, config in candidates:
        key = f"m{block_m}-n{config[0]}-w{config[1]}-s{config[2]}"
        if key in row["configs"] or (budget is not None and key != default_key and budget.over(key)):
            continue
        tables, schedule = ops.build_prefill_schedule(spans, block_m, q.device)
        try:
            row["configs"][key] = 1e3 * bench(
                lambda config=config, tables=tables, schedule=schedule, block_m=block_m:
                ops.paged_prefill(q, cache, tables, schedule, dim**-0.5, out, block_m, config))
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for one config
            print(f"   {key}: {type(exc).__name__}: {str(exc)[:120]}")
    row["default_us"] = row["configs"].get(default_key)
    best = min(row["configs"], key=row["configs"].get)
    row["best"], row["best_us"] = best, row["configs"][best]
    dense = q.view(spans_n, n, heads, dim).transpose(1, 2)
    kd = torch.randn((spans_n, kv_heads, n, dim), dtype=dtype, device=dev)
    row["sdpa_us"] = 1e3 * bench(lambda: F.scaled_dot_product_attention(
        dense, kd, kd, is_causal=True, enable_gqa=heads != kv_heads))
    row["ratio"] = (row["default_us"] or row["best_us"]) / floor_us
    return row


def summary() -> None:
    """A compact table of the timing rows."""
    bad = [r["case"] for r in RESULTS["correctness"] if not r["ok"]]
    print(f"\n== summary: correctness {len(RESULTS['correctness']) - len(bad)}/{len(RESULTS['correctness'])} ok"
          + (f"; FAILED: {', '.join(bad)}" if bad else ""))
    print(f"{'decode':14s} {'batch':>5s} {'attn us':>9s} {'fwd us':>9s} {'floor us':>9s} {'ratio':>6s}")
    for r in RESULTS["decode"]:
        print(f"H{r['heads']}/KV{r['kv_heads']:<9d} {r['batch']:5d} {r['attn_us']:9.1f} {r['forward_us']:9.1f} "
              f"{r['floor_us']:9.1f} {r['ratio']:6.2f}")
    for r in RESULTS["prefill"]:
        print(f"prefill H{r['heads']}/KV{r['kv_heads']}: {r['default_us'] or float('nan'):.1f} us (best {r['best_us']:.1f}"
              f" {r['best']}), floor {r['floor_us']:.1f} us, ratio {r['ratio']:.2f}, SDPA {r['sdpa_us']:.1f} us")
    if RESULTS["errors"]:
        print("errors:", *RESULTS["errors"], sep="\n  ")


def main() -> None:
    """Run every section (or only ``variants`` when that is the first argument), print the summary, write JSON
    to ``$OUT/attention.json`` when ``OUT`` is set."""
    if not torch.cuda.is_available():
        print("no CUDA device")
        return
    dev = torch.device("cuda")
    RESULTS["device"] = torch.cuda.get_device_name(dev)
    print(RESULTS["device"], "torch", torch.__version__)
    if sys.argv[1:2] == ["variants"]:
        check_variants(dev)
    else:
        check_correctness(dev)
        check_graph(dev)
        check_variants(dev)
        time_decode(dev)
        time_prefill(dev)
    try:
        summary()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "attention.json").write_text(json.dumps(RESULTS, indent=1, default=str))
        print(f"wrote {out_dir}/attention.json")


if __name__ == "__main__":
    main()
