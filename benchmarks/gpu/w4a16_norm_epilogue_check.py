"""The RMSNorm in the W4A16 h2 GEMVs' epilogues (``kernels/scaled_row.py``, ``device_kernels.EpilogueNormLayer``,
switch ``INFERNEO_W4A16_NORM_EPILOGUE``) on CUDA.

Kernels, Llama-2-7B's shapes in bfloat16, the tuned one-row launches:
- the producers (output projection 4096 x 4096, down projection 4096 x 11008): the residual sum and the scaled row
  must equal, bit for bit, the plain launch's output added to the residual and multiplied by the norm weight as the
  fused add + RMSNorm rounds them, eager and replayed from a CUDA graph; the per-tile sums of squares within 1e-5
  of float32;
- the consumers (q/k/v 12288 x 4096, gate/up 22016 x 4096): ``1 / rms`` applied to the products of the scaled row,
  within ``TOLERANCE`` of float32 ``F.linear`` on the exactly normalized row and the de-quantized weight, and of
  the plain launch on the engine's normalized row (the Triton RMSNorm), eager and from a graph.

Engine: tiny random Llamas quantized to AWQ (groups 32 and 128, hidden 256, bfloat16), each prompt alone (one-row
decode steps), with CUDA graphs: the switch on against off and against ``reference_int4_linear`` (as
``w4a16_h2_e2e.py`` compares): the epilogue engine passes when its largest logprob distance from the reference is
within twice the plain engine's (or 0.1), when its eager run sends every one-row output and down projection but
the last layer's through the producer (launches counted) and when the eager run's tokens equal the graph run's.

The fused gate/up + SiLU with gate/up row pairs (``INFERNEO_W4A16_SILU_PAIRS``) on the gate/up shape: bit for bit
the projection's launch followed by the SiLU-and-mul kernel, with and without the row scale, eager and from a
graph; and the tiny engines with the switch on: tokens and logprobs equal to the epilogue engine's.

Prints one JSON line per case and ``EPILOGUE ok`` / ``EPILOGUE FAILED``.
Usage: ``python benchmarks/gpu/w4a16_norm_epilogue_check.py [--out FILE.jsonl] [--pairs-only] [--no-engine]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from int4_check import TOLERANCE, _random_rows, rel_err  # noqa: E402
from w4a16_h2_e2e import GREEDY, PROMPTS, distance, equal_share, greedy_run  # noqa: E402

from inferneo.kernels import triton_int4  # noqa: E402
from inferneo.kernels._triton_elementwise import rms_norm, silu_and_mul  # noqa: E402
from inferneo.kernels.triton_int4 import (  # noqa: E402
    RowScale,
    h2_epilogue_config,
    silu_fused_config,
    w4a16_linear,
    w4a16_residual_norm,
    w4a16_silu_mul,
)
from inferneo.quantization import int4  # noqa: E402
from inferneo.quantization.int4_layouts import dequantize_rows  # noqa: E402
from inferneo.testing.int4_checkpoints import write_int4_checkpoint  # noqa: E402
from inferneo.testing.tiny_models import make_tiny_checkpoint  # noqa: E402

SWITCH = "INFERNEO_W4A16_NORM_EPILOGUE"
EPS = 1e-5
PRODUCERS = (("o_proj", 4096, 4096), ("down_proj", 4096, 11008))
CONSUMERS = (("qkv_proj", 12288, 4096), ("gate_up_proj", 22016, 4096))
LAYERS = 3


def graphed(fn):
    """``fn()`` captured in a CUDA graph and replayed once; its output."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return out


def producer(name: str, n: int, k: int) -> dict:
    w = _random_rows(n, k, "cuda")
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    residual = 4 * torch.randn(1, n, device="cuda", dtype=torch.bfloat16)
    norm_w = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5
    total = (w4a16_linear(x, w).float() + residual.float()).bfloat16()
    scaled_ref = (total.float() * norm_w.float()).bfloat16()
    line = {"layer": name, "n": n, "k": k, "config": str(h2_epilogue_config(x, w, producer=True))}
    held = residual.clone()
    scaled, sums = w4a16_residual_norm(x, w, held, norm_w)
    block_n = -(-n // sums.numel())
    tiles = (total.float()[0] ** 2).view(-1, block_n).sum(1)
    line["eager_equal"] = torch.equal(held, total) and torch.equal(scaled, scaled_ref)
    line["sums_rel_err"] = ((sums - tiles).abs().max() / tiles.abs().max()).item()
    stage = residual.clone()

    def call():
        stage.copy_(residual)
        return w4a16_residual_norm(x, w, stage, norm_w)

    g_scaled, _ = graphed(call)
    line["graph_equal"] = torch.equal(stage, total) and torch.equal(g_scaled, scaled_ref)
    line["ok"] = line["eager_equal"] and line["graph_equal"] and line["sums_rel_err"] < 1e-5
    return line


def consumer(name: str, n: int, k: int) -> dict:
    w = _random_rows(n, k, "cuda")
    total = 4 * torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    norm_w = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
    tiles = (total.float()[0] ** 2).view(-1, 8).sum(1)  # as a producer of 8-row tiles writes them
    scaled = (total.float() * norm_w.float()).bfloat16()
    exact = total.float() * torch.rsqrt((total.float() ** 2).mean() + EPS) * norm_w.float()
    ref = F.linear(exact, dequantize_rows(w).float())
    plain = w4a16_linear(rms_norm(total, None, norm_w, EPS), w)
    config = h2_epilogue_config(scaled, w, producer=False)
    eager = w4a16_linear(scaled, w, config, row_scale=RowScale(tiles, EPS))
    graph = graphed(lambda: w4a16_linear(scaled, w, config, row_scale=RowScale(tiles, EPS)))
    line = {"layer": name, "n": n, "k": k, "config": str(config), "rel_err": rel_err(eager, ref),
            "plain_rel_err": rel_err(plain, ref), "vs_plain": rel_err(eager, plain.float()),
            "graph_equal_eager": torch.equal(eager, graph)}
    line["ok"] = line["rel_err"] < TOLERANCE and line["vs_plain"] < TOLERANCE and line["graph_equal_eager"]
    return line


def silu_pairs(d: int = 11008, k: int = 4096) -> dict:
    w = _random_rows(2 * d, k, "cuda")
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    tiles = (4 * torch.rand(512, device="cuda") + 1).float()
    os.environ["INFERNEO_W4A16_SILU_PAIRS"] = "1"
    pairs = silu_fused_config(x, w)
    os.environ.pop("INFERNEO_W4A16_SILU_PAIRS")
    linear = h2_epilogue_config(x, w, producer=False)
    line = {"layer": "gate_up_silu_pairs", "d": d, "k": k, "config": str(pairs), "ok": pairs is not None}
    for scaled in (False, True):
        extra = {"row_scale": RowScale(tiles, EPS)} if scaled else {}
        want = silu_and_mul(w4a16_linear(x, w, linear, **extra))
        eager = w4a16_silu_mul(x, w, pairs, **extra)
        graph = graphed(lambda extra=extra: w4a16_silu_mul(x, w, pairs, **extra))
        key = "scaled_equal" if scaled else "equal"
        line[key] = torch.equal(eager, want) and torch.equal(graph, want)
        line["ok"] = line["ok"] and line[key]
    return line


def run(path: Path, mode: str, eager: bool = False) -> tuple[list[list[int]], list[float], int]:
    """Greedy tokens, the chosen tokens' logprobs and producer launches from Python; ``mode``: "epilogue" (the
    switch on), "plain" (off) or "reference" (off, ``reference_int4_linear``). Each prompt runs alone."""
    calls = {"producer": 0}
    original = triton_int4.w4a16_residual_norm

    def counted(*args, **kwargs):
        calls["producer"] += 1
        return original(*args, **kwargs)

    original_select = int4.select_int4_kernel
    triton_int4.w4a16_residual_norm = counted
    os.environ[SWITCH] = "1" if mode.startswith("epilogue") else "0"
    if mode == "epilogue+pairs":
        os.environ["INFERNEO_W4A16_SILU_PAIRS"] = "1"
    if mode == "reference":
        int4.select_int4_kernel = lambda *args: int4.reference_int4_linear
    try:
        tokens, chosen = greedy_run(path, dtype="bfloat16", enforce_eager=eager)
    finally:
        triton_int4.w4a16_residual_norm = original
        int4.select_int4_kernel = original_select
        os.environ.pop(SWITCH, None)
        os.environ.pop("INFERNEO_W4A16_SILU_PAIRS", None)
    return tokens, chosen, calls["producer"]


def engine(tmp: str, pairs_only: bool) -> list[dict]:
    lines = []
    for group in (32, 128):
        source = make_tiny_checkpoint(Path(tmp) / "llama-src", "llama", hidden_size=256, num_heads=4, num_kv_heads=2,
                                      num_layers=LAYERS)
        quant, _ = write_int4_checkpoint(source, Path(tmp) / f"awq-{group}", Path(tmp) / f"awq-{group}-ref", "awq",
                                         group)
        got, got_lp, _ = run(quant, "epilogue")
        paired, paired_lp, _ = run(quant, "epilogue+pairs")
        pairs_line = {"engine": "llama-awq-silu-pairs", "group": group,
                      "tokens_equal": paired == got, "logprobs_equal": paired_lp == got_lp}
        pairs_line["ok"] = pairs_line["tokens_equal"] and pairs_line["logprobs_equal"]
        lines.append(pairs_line)
        if pairs_only:
            continue
        eager, _, producers = run(quant, "epilogue", eager=True)
        plain, plain_lp, _ = run(quant, "plain")
        ref, ref_lp, _ = run(quant, "reference")
        line = {"engine": "llama-awq", "group": group, "producers_eager": producers, "graphs_equal_eager": got == eager,
                "epilogue_equal_prefix_share": equal_share(got, ref), "plain_equal_prefix_share": equal_share(plain, ref),
                "epilogue_vs_plain_prefix_share": equal_share(got, plain),
                "epilogue_decode_logprob_diff": distance(got, got_lp, ref, ref_lp),
                "plain_decode_logprob_diff": distance(plain, plain_lp, ref, ref_lp)}
        # one-row decode steps x (every output projection, every down projection but the last layer's)
        wanted = len(PROMPTS) * (GREEDY.max_tokens - 1) * (2 * LAYERS - 1)
        line["ok"] = (producers >= wanted and got == eager
                      and line["epilogue_decode_logprob_diff"] <= max(2 * line["plain_decode_logprob_diff"], 0.1))
        lines.append(line)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--pairs-only", action="store_true", help="only the SiLU row-pair checks")
    parser.add_argument("--no-engine", action="store_true", help="the kernel checks only")
    args = parser.parse_args()
    lines = []
    if not args.pairs_only:
        for name, n, k in PRODUCERS:
            lines.append(producer(name, n, k))
            print(json.dumps(lines[-1]), flush=True)
        for name, n, k in CONSUMERS:
            lines.append(consumer(name, n, k))
            print(json.dumps(lines[-1]), flush=True)
    lines.append(silu_pairs())
    print(json.dumps(lines[-1]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for line in [] if args.no_engine else engine(tmp, args.pairs_only):
            lines.append(line)
            print(json.dumps(line), flush=True)
    ok = all(line["ok"] for line in lines)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(x) + "\n" for x in lines))
    print("EPILOGUE ok" if ok else "EPILOGUE FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    torch.manual_seed(0)
    raise SystemExit(main())
