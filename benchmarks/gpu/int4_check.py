"""W4A16 (4-bit weights, AWQ layout, group 128) on the GPU: the Triton kernels against F.linear on the de-quantized
weight, their tiles tuned on Llama-2-7B's layer shapes, and their time beside bf16 (cuBLAS and the Triton GEMV).

Each layer is the engine's own :class:`QuantizedLinear` with :class:`Int4LinearMethod` (dummy weights from
``init_dummy``, finalized as after loading: repacked into the row layout), so the production layout is measured.
Per shape: the one-row GEMV over a grid of tiles (and the fused gate/up + SiLU variant on the gate/up shape), the
tensor-core kernel at 16 and 32 rows over a grid of tiles; every candidate is checked against float32
``F.linear`` on the de-quantized weight (relative error, bf16 activations). Times are CUDA-graph replays of
``CALLS`` calls cycling over enough copies of the weights that they do not stay in L2 (as in a real step, where
each layer reads its own), median of 5 replays, per call.

``--write-configs`` writes the fastest tiles per shape to ``inferneo/kernels/int4_configs.json`` (where the
kernels read them) and a copy to ``--out``.

Usage: ``python benchmarks/gpu/int4_check.py [--out DIR] [--write-configs] [--quick]``; ``--smoke`` (with
``TRITON_INTERPRET=1``) runs tiny shapes on CPU to check the script.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from inferneo.kernel_config import KernelConfig  # noqa: E402
from inferneo.kernels import triton_int4  # noqa: E402
from inferneo.kernels.triton_gemv import gemv, gemv_silu_mul  # noqa: E402
from inferneo.kernels.triton_int4 import (  # noqa: E402
    W4A16Config,
    config_key,
    default_config,
    w4a16_linear,
    w4a16_silu_mul,
)
from inferneo.quantization.base import LinearShape, QuantizedLinear  # noqa: E402
from inferneo.quantization.int4 import Int4LinearMethod, Int4Scheme  # noqa: E402
from inferneo.quantization.int4_layouts import Int4RowWeights, pack_rows  # noqa: E402

# Llama-2-7B: (name, output shards, in_features)
LAYERS = (("qkv_proj", (4096, 4096, 4096), 4096), ("o_proj", (4096,), 4096),
          ("gate_up_proj", (11008, 11008), 4096), ("down_proj", (4096,), 11008))
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
    return ((y.float() - ref).norm() / ref.norm()).item()


def gemv_grid(quick: bool) -> list[W4A16Config]:
    if quick:
        return [W4A16Config("gemv", bn, bg, num_warps=w) for bn, bg, w in ((16, 8, 4), (8, 4, 4))]
    return [W4A16Config("gemv", bn, bg) for bn in (8, 16, 32) for bg in (4, 8)] + [
        W4A16Config("gemv", 16, 16), W4A16Config("gemv", 16, 8, num_warps=8)]


def dot_grid(m: int, quick: bool) -> list[W4A16Config]:
    bm = 16 if m <= 16 else 32
    if quick:
        return [W4A16Config("dot", bn, block_m=bm, block_kw=kw) for bn, kw in ((64, 16), (32, 8))]
    return [W4A16Config("dot", bn, block_m=bm, block_kw=kw) for bn in (32, 64, 128) for kw in (8, 16)] + [
        W4A16Config("dot", 128, block_m=bm, block_kw=16, num_warps=8)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--write-configs", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a few tiles per shape")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU under TRITON_INTERPRET=1, to check the script")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    timer = host_time_us if args.smoke else graph_time_us
    layers = (("qkv_proj", (64, 64, 64), 256), ("gate_up_proj", (128, 128), 256)) if args.smoke else LAYERS
    quick = args.quick or args.smoke
    if args.smoke:  # bfloat16 tl.dot under the interpreter
        from tests.triton_interpreter_shims import patch_interpreter

        patch_interpreter()
    gen = torch.Generator(device=device).manual_seed(0)
    records, best, failures = [], {}, []
    started = time.perf_counter()

    def record(**r) -> None:
        r = {k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()}
        print(json.dumps(r), flush=True)
        records.append(r)
        if r.get("rel_err", 0) >= TOLERANCE:
            failures.append(r)

    def sweep(kind: str, m: int, n: int, k: int, configs, run, nbytes: int, copies: list) -> None:
        """Time ``run(config, copy)`` for each config (after checking it), keep the fastest for the shape."""
        key = config_key(kind, m, n, k, GROUP)
        default = default_config(kind, m, n, k, GROUP)
        for config in [default, *[c for c in configs if c != default]]:
            try:
                err = run(config, None)
                us = timer([lambda c=config, i=i: run(c, i) for i in range(len(copies))])
            except Exception as exc:  # a tile that does not compile or fit: say so, go on
                record(kind=kind, key=key, config=config.as_dict(), error=f"{type(exc).__name__}: {exc}"[:300])
                continue
            record(kind=kind, key=key, m=m, n=n, k=k, config=config.as_dict(), default=config == default,
                   rel_err=err, us=us, gbps=nbytes / us / 1e3)
            if key not in best or us < best[key][1]:
                best[key] = (config, us)

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
        for m in (1, 16, 32):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            ref = F.linear(x.float(), w_f32)
            layer_err = rel_err(layer(x), ref)  # the layer's own path (on CUDA: these kernels, default tiles)
            bf16_us = timer([lambda w=w, x=x: F.linear(x, w) for w in w_bf16])
            row = dict(kind="bf16", layer=name, m=m, n=n, k=k, cublas_us=bf16_us, layer_rel_err=layer_err)
            if m == 1 and not args.smoke:
                row["triton_gemv_us"] = graph_time_us([lambda w=w, x=x: gemv(x, w) for w in w_bf16])
            record(**row)

            def run(config, i, x=x, ref=ref, copies=copies):
                if i is None:
                    return rel_err(w4a16_linear(x, copies[0], config), ref)
                return w4a16_linear(x, copies[i], config)

            sweep("gemv" if m == 1 else "dot", m, n, k, gemv_grid(quick) if m == 1 else dot_grid(m, quick),
                  run, nbytes, copies)
            if name == "gate_up_proj" and m == 1:
                d = n // 2
                gate, up = ref[:, :d].to(torch.bfloat16).float(), ref[:, d:].to(torch.bfloat16).float()
                silu_ref = F.silu(gate).to(torch.bfloat16).float() * up

                def run_silu(config, i, x=x, silu_ref=silu_ref, copies=copies):
                    if i is None:
                        return rel_err(w4a16_silu_mul(x, copies[0], config), silu_ref)
                    return w4a16_silu_mul(x, copies[i], config)

                record(kind="bf16", layer="gate_up_silu", m=1, n=d, k=k,
                       triton_gemv_silu_us=0.0 if args.smoke else timer([lambda w=w, x=x: gemv_silu_mul(x, w)
                                                                         for w in w_bf16]))
                sweep("silu", 1, d, k, [replace(c, kind="silu") for c in gemv_grid(quick)], run_silu, nbytes, copies)
        del layer, weights, w_bf16
        copies.clear()
        torch.cuda.empty_cache()
        print(f"-- {name} done at {time.perf_counter() - started:.0f} s", flush=True)

    table = {key: config.as_dict() for key, (config, _) in sorted(best.items())}
    for key, (config, us) in sorted(best.items()):
        print(f"best {key}: {us:.2f} us {config}", flush=True)
    if args.write_configs and not args.smoke:
        triton_int4.TUNED_CONFIG_FILE.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {triton_int4.TUNED_CONFIG_FILE}", flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "int4_check.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / "int4_configs.json").write_text(json.dumps(table, indent=1) + "\n")
    if failures:
        print(f"FAILED: {len(failures)} launches over the tolerance {TOLERANCE}", flush=True)
        return 1
    print(f"all launches within {TOLERANCE} of float32 F.linear", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
