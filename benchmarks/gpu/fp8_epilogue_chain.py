#!/usr/bin/env python3
"""The FP8 one-row GEMVs of Llama-2-7B's 32 decode layers chained as a batch-1 step chains them, with the RMSNorms
as launches (as shipped) or in the GEMVs' epilogues (``INFERNEO_FP8_NORM_EPILOGUE``), and variants of the epilogue
launches: where the loss the epilogues showed on the H200 (2026-12-07: +6.3 us a layer of GEMV) comes from.

Per layer, plain: add + RMSNorm, q/k/v GEMV, o GEMV (of the q/k/v output's first 4,096 values: no attention),
add + RMSNorm, gate/up + SiLU GEMV, down GEMV; with the epilogues: q/k/v (reader), o (producer: residual add, scaled
row, partial sums of squares), gate/up + SiLU (reader), down (producer). Every layer has its own weights
(per-channel e4m3, 6.5 GB in all: nothing comes from L2), programmatic dependent launch as in the engine.

Variants (``VARIANTS``): the shipped epilogue form (the producers read the residual and norm weight after their
dot: ``EARLY_RES=False``), the producers reading them early, a cap on the registers a thread of each launch
(``maxnreg``: the gate/up reader's epilogue raises its 64 registers to 72, one program fewer a multiprocessor),
other tilings of the gate/up reader and o producer (fewer partial sums for the readers to load), and register caps
on the plain launches.

Each variant is one CUDA graph of the 32 layers, replayed in alternating rounds (ms a chain, us a layer); the
first round also records each slot's time added to the critical path (``kernel_timeline.py``). The variants'
outputs after the 32 layers are checked against the plain chain's (relative difference: the epilogues round
differently). Writes ``fp8_epilogue_chain.json`` / ``.log`` to ``--out``.
Usage: ``python benchmarks/gpu/fp8_epilogue_chain.py --out DIR [--rounds 3]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

from fp8_check import capture  # noqa: E402
from kernel_timeline import by_slot, critical_path, kernel_events  # noqa: E402
from moe_kernel_sweep import timestamped_log  # noqa: E402

from inferneo.kernels import _triton_elementwise as elementwise  # noqa: E402
from inferneo.kernels import triton_fp8_gemv as fg  # noqa: E402
from inferneo.kernels.scaled_row import RowScale  # noqa: E402
from inferneo.quantization.fp8_math import quantize_groups  # noqa: E402

HIDDEN, QKV, INTER, LAYERS, EPS = 4096, 12288, 11008, 32, 1e-5
SHIPPED = {"qkv": (8, 2048, 8), "o": (8, 2048, 8), "gate_up": (2, 4096, 4), "down": (16, 2048, 16)}
# name -> (epilogues, early producer loads, {layer: register cap}, {layer: tiling})
VARIANTS = {
    "plain": (False, False, {}, {}),
    "epilogue as shipped": (True, False, {}, {}),
    "epilogue, early loads": (True, True, {}, {}),
    "epilogue, early, gate/up cap 64": (True, True, {"gate_up": 64}, {}),
    "epilogue, early, gate/up cap 64, o 16 rows": (True, True, {"gate_up": 64}, {"o": (16, 2048, 16)}),
    "epilogue, early, gate/up 4 rows 8 warps": (True, True, {}, {"gate_up": (4, 4096, 8)}),
    "epilogue, early, gate/up 2 rows 8 warps": (True, True, {}, {"gate_up": (2, 4096, 8)}),
    "epilogue, early, gate/up 4 rows 8 warps, o 16 rows": (True, True, {}, {"gate_up": (4, 4096, 8),
                                                                           "o": (16, 2048, 16)}),
    "epilogue, early, caps 56/56/64/56": (True, True, {"qkv": 56, "o": 56, "gate_up": 64, "down": 56}, {}),
    "plain, gate/up cap 56": (False, False, {"gate_up": 56}, {}),
    "plain, caps 48": (False, False, {"qkv": 48, "o": 48, "down": 48}, {}),
    # added after the first call (H100: the gate/up reader's tiling was the lever)
    "epilogue, gate/up 4 rows 8 warps": (True, False, {}, {"gate_up": (4, 4096, 8)}),
    "epilogue, gate/up 4 rows 16 warps": (True, False, {}, {"gate_up": (4, 4096, 16)}),
    "epilogue, gate/up 8 rows 16 warps": (True, False, {}, {"gate_up": (8, 4096, 16)}),
    "epilogue, gate/up 4 rows 8 warps, q/k/v 16 rows 16 warps": (True, False, {}, {"gate_up": (4, 4096, 8),
                                                                                   "qkv": (16, 2048, 16)}),
    "plain, gate/up 4 rows 8 warps": (False, False, {}, {"gate_up": (4, 4096, 8)}),
}


class Layer:
    """One decoder layer's e4m3 weights (per-channel scales) and norm weights."""

    def __init__(self) -> None:
        def weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
            q, s = quantize_groups(torch.randn(n, k, device="cuda") * 0.02)
            return q, s.reshape(-1).float()

        self.qkv, self.o = weight(QKV, HIDDEN), weight(HIDDEN, HIDDEN)
        self.gate_up, self.down = weight(2 * INTER, HIDDEN), weight(HIDDEN, INTER)
        self.input_norm = (1 + 0.1 * torch.randn(HIDDEN, device="cuda")).to(torch.bfloat16)
        self.post_norm = (1 + 0.1 * torch.randn(HIDDEN, device="cuda")).to(torch.bfloat16)


class Launches:
    """What the variant changes at each launch: the tiling, the register cap and the producers' load order,
    injected through ``triton_fp8_gemv.epilogue_arguments`` (called at every h2 launch)."""

    def __init__(self) -> None:
        self.cap: int | None = None
        self.early = True
        self._original = fg.epilogue_arguments
        fg.epilogue_arguments = self._arguments

    def _arguments(self, row_scale, residual_norm) -> dict:
        arguments = self._original(row_scale, residual_norm)
        if residual_norm is not None:
            arguments["EARLY_RES"] = self.early
        if self.cap:
            arguments["maxnreg"] = self.cap
        return arguments


def chain(layers: list[Layer], variant: tuple, launches: Launches, start: torch.Tensor) -> callable:
    """A callable running the 32 layers in the variant's form; returns the last residual."""
    epilogue, early, caps, tiles = variant
    tiling = {name: tuple(tiles.get(name, SHIPPED[name])) + ("h2",) for name in SHIPPED}

    def launch(name, fn, *args, **kwargs):
        launches.cap, launches.early = caps.get(name), early
        try:
            return fn(*args, config=tiling[name], **kwargs)
        finally:
            launches.cap = None

    def run() -> torch.Tensor:
        residual = start.clone()
        if not epilogue:
            h = torch.zeros_like(residual)
            for layer in layers:
                normed, _ = elementwise.rms_norm(h, residual, layer.input_norm, EPS)
                qkv = launch("qkv", fg.fp8_gemv, normed, *layer.qkv)
                o = launch("o", fg.fp8_gemv, qkv[:, :HIDDEN], *layer.o)
                normed, _ = elementwise.rms_norm(o, residual, layer.post_norm, EPS)
                act = launch("gate_up", fg.fp8_gemv_silu_mul, normed, *layer.gate_up)
                h = launch("down", fg.fp8_gemv, act, *layer.down)
            elementwise.rms_norm(h, residual, layers[0].input_norm, EPS)  # the last add
            return residual
        scaled = (residual.float() * layers[0].input_norm.float()).to(torch.bfloat16)
        squares = residual.float().pow(2).sum().reshape(1)
        for i, layer in enumerate(layers):
            qkv = launch("qkv", fg.fp8_gemv, scaled, *layer.qkv, row_scale=RowScale(squares, EPS))
            scaled, squares = launch("o", fg.fp8_residual_norm, qkv[:, :HIDDEN], *layer.o, residual,
                                     layer.post_norm)
            act = launch("gate_up", fg.fp8_gemv_silu_mul, scaled, *layer.gate_up, row_scale=RowScale(squares, EPS))
            nxt = layers[(i + 1) % len(layers)].input_norm
            scaled, squares = launch("down", fg.fp8_residual_norm, act, *layer.down, residual, nxt)
        return residual

    return run


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int = 20) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def slots(graph: torch.cuda.CUDAGraph, per_layer: int) -> list[dict]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    # the chain's own kernels (not the copies and reductions that set up the first layer's row)
    events = [e for e in critical_path(kernel_events(prof)) if "fp8_gemv" in e["name"] or "rms_norm" in e["name"]]
    per_replay = len(events) // 3
    replays = [events[r * per_replay:(r + 1) * per_replay] for r in range(3)]
    middle = [e for replay in replays for e in replay[per_layer:][:per_layer * (LAYERS - 2)]]  # layers 2-31
    return [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}
            for row in by_slot(middle, per_layer)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/fp8_epilogue_chain")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="", help="comma-separated variant names (default: all)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = timestamped_log(out / "fp8_epilogue_chain.log")
    torch.manual_seed(0)
    names = [n for n in VARIANTS if not args.variants or n in args.variants.split(",")]
    log(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; variants {names}")
    layers = [Layer() for _ in range(LAYERS)]
    start = torch.randn(1, HIDDEN, device="cuda").to(torch.bfloat16)
    launches = Launches()
    graphs, results = {}, {"device": torch.cuda.get_device_name(), "variants": {}}
    reference = None
    for name in names:
        try:
            graph, residual = capture(chain(layers, VARIANTS[name], launches, start))
        except Exception as error:  # a variant that does not compile or launch is reported, not fatal
            log(f"{name}: failed: {type(error).__name__}: {error}")
            results["variants"][name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        if reference is None:
            reference = residual.float().clone()
        diff = ((residual.float() - reference).norm() / reference.norm()).item()
        per_layer = 4 if VARIANTS[name][0] else 6
        graphs[name] = graph
        results["variants"][name] = {"rel_diff_vs_first": diff, "ms": [], "slots": slots(graph, per_layer)}
        log(f"{name}: built; final residual rel. diff vs {names[0]!r} {diff:.2e}")
        for row in results["variants"][name]["slots"]:
            log(f"    {row['kernel']:<30} added {row['added_us']:6.2f} us, duration {row['dur_us']:6.2f}")
    for r in range(args.rounds):
        for name, graph in graphs.items():
            ms = replay_ms(graph)
            results["variants"][name]["ms"].append(ms)
            log(f"round {r + 1} {name}: {ms:.4f} ms a chain, {ms * 1e3 / LAYERS:.2f} us a layer")
    base = min(results["variants"][names[0]]["ms"]) if graphs else None
    for name in graphs:
        best = min(results["variants"][name]["ms"])
        results["variants"][name]["best_ms"] = best
        log(f"best {name}: {best:.4f} ms ({(best - base) * 1e3 / LAYERS:+.2f} us a layer vs {names[0]})")
    (out / "fp8_epilogue_chain.json").write_text(json.dumps(results, indent=1))
    log("done")


if __name__ == "__main__":
    main()
