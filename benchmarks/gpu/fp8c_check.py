#!/usr/bin/env python3
"""Issue 20's FP8 targets on the H200 (2026-12-04 evening), the kernel-level part of one device call:

0. the one-row FP8 GEMV with ``INFERNEO_FP8_GEMV_PREFETCH`` (its rows asked into L2 before its wait): the same
   bits as without, eager and in a CUDA graph, Llama-2-7B's four shapes;
1. the decode kernel's weight prefetch (``paged_decode(weight_prefetch=...)``, the switch
   ``INFERNEO_DECODE_WEIGHT_PREFETCH``): the output equal bit for bit with and without it, on a bf16 and an FP8
   cache, split (one request) and not; and the kernel alone with 0, 17, 33 and 50 MB asked into L2 (how much
   longer a launch takes when it issues them: ``triton.testing.do_bench`` median, L2 flushed);
2. (``--w2``) the FP8 decode kernel at W2's shapes (Llama-2-7B: 32 query and 32 KV heads of 128, block tables 2,048 tokens
   wide) with other launch settings than the shipped ones: CUDA-core scores (``use_dot=False``) and 8 warps,
   each checked against the shipped kernel's output first (relative error), then timed beside a bf16 cache.

    python benchmarks/gpu/fp8c_check.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import torch  # noqa: E402
import triton  # noqa: E402
from fp8kv_decode_bench import _cache  # noqa: E402

from inferneo.attention.fp8_kv import FP8_KV_DTYPE, KVCacheScales  # noqa: E402
from inferneo.kernels import triton_attention as ops  # noqa: E402


def _setup(batch: int, context: int, device, kv_heads: int = 32, head_dim: int = 128):
    tables, base = _cache(batch, context, 2048, kv_heads, head_dim, device=device)
    lens = torch.full((batch,), context, dtype=torch.int64, device=device)
    q = torch.randn(batch, kv_heads, head_dim, device=device, dtype=torch.bfloat16)
    caches = {"bf16": base.to(torch.bfloat16), "fp8": base.to(FP8_KV_DTYPE)}
    return tables, lens, q, caches, KVCacheScales.ones(kv_heads, device)


def check_prefetch(device) -> dict:
    weights = torch.randint(0, 255, (200 << 20,), dtype=torch.uint8, device=device)
    spans = {0: [], 17: [weights[: 16 << 20]], 33: [weights[: 16 << 20], weights[100 << 20: 108 << 20],
                                                    weights[150 << 20: 158 << 20]],
             50: [weights[: 16 << 20], weights[100 << 20: 117 << 20], weights[150 << 20: 167 << 20]]}
    out: dict = {"equal": {}, "us": {}}
    ok = True
    for batch, context in ((1, 1040), (4, 1040)):
        tables, lens, q, caches, scales = _setup(batch, context, device)
        for name, cache in caches.items():
            kv = scales if name == "fp8" else None
            res = {}
            for mb, span in spans.items():
                o = torch.full_like(q, float("nan"))
                ops.paged_decode(q, cache, tables, lens, 128**-0.5, o, kv_scales=kv, weight_prefetch=span or None)
                res[mb] = o
                if batch == 1:
                    fn = (lambda q=q, tables=tables, lens=lens, cache=cache, kv=kv, span=span, o=o:  # noqa: E731
                          ops.paged_decode(q, cache, tables, lens, 128**-0.5, o, kv_scales=kv,
                                           weight_prefetch=span or None))
                    out["us"][f"{name}_b{batch}_{mb}MB"] = triton.testing.do_bench(fn, warmup=25, rep=100) * 1000
            for mb in spans:
                equal = bool(torch.equal(res[0], res[mb])) and not res[mb].isnan().any().item()
                out["equal"][f"{name}_b{batch}_{mb}MB"] = equal
                ok &= equal
    print("weight prefetch, output equal bit for bit:", "PASS" if ok else "FAIL", out["equal"])
    print("decode kernel alone at 1 x 1,040 with the prefetch, us:",
          ", ".join(f"{k} {v:.1f}" for k, v in out["us"].items()))
    out["ok"] = ok
    return out


VARIANTS = (("bf16", "bf16", {}), ("fp8", "fp8", {}), ("fp8-cuda-core", "fp8", {"use_dot": False}),
            ("fp8-8warps", "fp8", {"num_warps": 8}), ("fp8-cuda-core-8warps", "fp8", {"use_dot": False, "num_warps": 8}),
            ("fp8-2warps", "fp8", {"num_warps": 2}))


def w2_variants(device) -> dict:
    rows = {}
    ok = True
    for batch, context in ((256, 640), (200, 640), (32, 1040)):
        tables, lens, q, caches, scales = _setup(batch, context, device)
        ref = torch.empty_like(q)
        ops.paged_decode(q, caches["fp8"], tables, lens, 128**-0.5, ref, kv_scales=scales)
        row = {}
        for label, name, kw in VARIANTS:
            kv = scales if name == "fp8" else None
            o = torch.full_like(q, float("nan"))
            try:
                ops.paged_decode(q, caches[name], tables, lens, 128**-0.5, o, kv_scales=kv, **kw)
                torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001 - a variant that does not compile is reported, not fatal
                row[label] = {"error": repr(exc)[:200]}
                continue
            err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
            fn = (lambda q=q, tables=tables, lens=lens, cache=caches[name], kv=kv, kw=kw, o=o:  # noqa: E731
                  ops.paged_decode(q, cache, tables, lens, 128**-0.5, o, kv_scales=kv, **kw))
            us = triton.testing.do_bench(fn, warmup=25, rep=100) * 1000
            good = err == err and (name == "bf16" or err < 1.5e-2)
            ok &= good
            row[label] = {"us": us, "rel_err_vs_fp8": err, "ok": good}
        rows[f"{batch}x{context}"] = row
        print(f"decode {batch} x {context}: " + ", ".join(
            f"{k} {v['us']:.1f} us (err {v['rel_err_vs_fp8']:.1e})" if "us" in v else f"{k} {v['error']}"
            for k, v in row.items()))
        del caches
        torch.cuda.empty_cache()
    return {"rows": rows, "ok": ok}


def check_gemv_prefetch(device) -> dict:
    """The one-row FP8 GEMV (and its gate/up + SiLU form) at Llama-2-7B's four shapes with
    ``INFERNEO_FP8_GEMV_PREFETCH`` on and off: the same bits; eager and in a CUDA graph."""
    import os

    from inferneo.kernels.triton_fp8_gemv import fp8_gemv, fp8_gemv_silu_mul

    out, ok = {}, True
    for n, k, gated in ((12288, 4096, False), (4096, 4096, False), (22016, 4096, True), (4096, 11008, False)):
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        w = (torch.randn(n, k, device=device) * 0.5).to(torch.float8_e4m3fn)
        scale = torch.rand(n, device=device) * 0.01 + 0.001
        fn = fp8_gemv_silu_mul if gated else fp8_gemv
        res = {}
        for flag in ("0", "1"):
            os.environ["INFERNEO_FP8_GEMV_PREFETCH"] = flag
            res[flag] = fn(x, w, scale)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = fn(x, w, scale)
            graph.replay()
            torch.cuda.synchronize()
            res[flag + "g"] = y.clone()
        os.environ.pop("INFERNEO_FP8_GEMV_PREFETCH")
        equal = all(torch.equal(res["0"], r) for r in res.values()) and not res["1"].isnan().any().item()
        out[f"{n}x{k}{'-silu' if gated else ''}"] = equal
        ok &= equal
    print("FP8 GEMV prefetch, output equal bit for bit:", "PASS" if ok else "FAIL", out)
    return {"equal": out, "ok": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".")
    parser.add_argument("--w2", action="store_true", help="also the FP8 decode launch settings at W2's shapes")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    result["gemv_prefetch"] = check_gemv_prefetch(device)
    result["prefetch"] = check_prefetch(device)
    Path(args.out, "fp8c_check.json").write_text(json.dumps(result, indent=1))
    if args.w2:
        result["w2"] = w2_variants(device)
        Path(args.out, "fp8c_check.json").write_text(json.dumps(result, indent=1))
    return 0 if result["prefetch"]["ok"] and result["gemv_prefetch"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
