"""The RMSNorm in the epilogues of the FP8 one-row GEMVs (``INFERNEO_FP8_NORM_EPILOGUE``,
``triton_fp8_gemv.fp8_residual_norm`` and ``row_scale``, ``device_kernels.EpilogueNormLayer``) on CUDA.

Kernels, Llama-2-7B's shapes in bfloat16 with per-channel e4m3 weights, the tuned one-row h2 launches, eager and
replayed from a CUDA graph, chained as the layer chains them (o_proj -> gate/up + SiLU -> down -> q/k/v):
- producers (o_proj 4096 x 4096, down 4096 x 11008): the residual sum and the scaled row bit-equal to the plain
  launch followed by the add and the weight's scaling (both round to nearest on the GPU), the per-program sums of
  squares within 1e-5 of the sums of the row's squares; with the scaled float16 copies, the same bits;
- readers (gate/up + SiLU 22016 x 4096, q/k/v 12288 x 4096): error against float32 on the exact normalized row
  within 1.5x the plain path's (the RMSNorm kernel, then the GEMV) plus 1e-3; with the copies, the same bits.

Engine: a tiny random Llama (hidden 256, bfloat16) with ``quantization="fp8"``, each prompt alone (one-row decode
steps), CUDA graphs, the switch off and on: producer calls only with it on; greedy tokens and logprobs against the
float32 model on the same de-quantized weights (rounding differs, so on and off need not be equal): the largest
chosen-token logprob difference from it, over the steps where both chose the same tokens, at most twice the plain
path's (or 0.1), as the W4A16 epilogue check asks.

Prints one JSON line per case and ``FP8 NORM EPILOGUE ok`` / ``FP8 NORM EPILOGUE FAILED``.
Usage: ``python benchmarks/gpu/fp8_norm_epilogue_check.py [--out FILE.jsonl]``
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from check_report import run_checks  # noqa: E402
from fp8_half_copies_check import fp8_weight  # noqa: E402
from w4a16_h2_e2e import distance, equal_share, greedy_run  # noqa: E402
from w4a16_half_copies_check import switch_runs  # noqa: E402
from w4a16_norm_epilogue_check import EPS, graphed  # noqa: E402

from inferneo.kernels import triton_fp8_gemv as fg  # noqa: E402
from inferneo.kernels.scaled_row import RowScale  # noqa: E402
from inferneo.quantization.fp8_math import quantize_groups  # noqa: E402
from inferneo.testing.tiny_models import make_tiny_checkpoint  # noqa: E402

SWITCH = "INFERNEO_FP8_NORM_EPILOGUE"


def run_form(form: str, fn):
    return graphed(fn) if form == "graph" else fn()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def producer(name: str, n: int, k: int, x: torch.Tensor, x_half: torch.Tensor | None) -> tuple[dict, tuple]:
    """One producer, eager and graphed; returns its line and (scaled row, sums, residual, copy) of the graph run."""
    q, s = fp8_weight(n, k)
    residual = 4 * torch.randn(1, n, device="cuda", dtype=torch.bfloat16)
    nw = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5
    line = {"kernel": name, "n": n, "k": k}
    for form in ("eager", "graph"):
        held, again = residual.clone(), residual.clone()
        half = torch.full((1, n), float("nan"), device="cuda", dtype=torch.float16)

        def plain(held=held):
            held.copy_(residual)
            return fg.fp8_residual_norm(x, q, s, held, nw)

        def copies(again=again, half=half):
            again.copy_(residual)
            return fg.fp8_residual_norm(x, q, s, again, nw, x_half=x_half, half_out=half)

        scaled, sums = run_form(form, plain)
        scaled2, sums2 = run_form(form, copies)
        total = (fg.fp8_gemv(x, q, s).float() + residual.float()).bfloat16()
        tile = fg.h2_epilogue_tile(x, q, s, None)[0]
        per_tile = torch.nn.functional.pad(held.float()[0] ** 2, (0, sums.numel() * tile - n)).view(-1, tile).sum(1)
        line[f"{form}_residual_equal"] = torch.equal(held, total)
        line[f"{form}_scaled_equal"] = torch.equal(scaled, (total.float() * nw.float()).bfloat16())
        line[f"{form}_sums_close"] = torch.allclose(sums, per_tile, rtol=1e-5)
        line[f"{form}_copies_equal"] = (torch.equal(scaled2, scaled) and torch.equal(sums2, sums)
                                        and torch.equal(again, held) and torch.equal(half, fg.scaled_half(scaled)))
    line["ok"] = all(v for key, v in line.items() if key.endswith(("_equal", "_close")))
    return line, (scaled, sums, held, half)


def normalized(held: torch.Tensor, nw_of_scaled: torch.Tensor) -> torch.Tensor:
    t = held.float()
    return ((t * torch.rsqrt((t * t).mean(-1, keepdim=True) + EPS)).bfloat16().float() * nw_of_scaled).bfloat16()


def reader(name: str, n: int, row: tuple, nw: torch.Tensor, gated: bool) -> tuple[dict, tuple]:
    scaled, sums, held, half = row
    q, s = fp8_weight(n, scaled.shape[1])
    normed = normalized(held, nw.float())
    exact_in = (held.float() * torch.rsqrt((held.float() ** 2).mean(-1, keepdim=True) + EPS)) * nw.float()
    w = q.float() * s[:, None]
    ref = exact_in @ w.T
    if gated:
        g, u = ref.chunk(2, dim=-1)
        ref = torch.nn.functional.silu(g) * u
    run = fg.fp8_gemv_silu_mul if gated else fg.fp8_gemv
    line = {"kernel": name, "n": n, "k": scaled.shape[1]}
    out = out_half = None
    for form in ("eager", "graph"):
        out_half = torch.full((1, n // 2), float("nan"), device="cuda", dtype=torch.float16) if gated else None
        y = run_form(form, lambda: run(scaled, q, s, row_scale=RowScale(sums, EPS)))
        y2 = run_form(form, lambda out_half=out_half: run(scaled, q, s, row_scale=RowScale(sums, EPS), x_half=half,
                                                          **({"half_out": out_half} if gated else {})))
        plain = run(normed, q, s)
        line[f"{form}_err"], line[f"{form}_plain_err"] = rel(y, ref), rel(plain, ref)
        line[f"{form}_copies_equal"] = torch.equal(y, y2) and (not gated or torch.equal(out_half, fg.scaled_half(y)))
        out = y
    line["ok"] = all(line[f"{f}_err"] <= 1.5 * line[f"{f}_plain_err"] + 1e-3 and line[f"{f}_copies_equal"]
                     for f in ("eager", "graph"))
    return line, (out, out_half)


def kernels() -> list[dict]:
    heads = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    o_line, o_row = producer("o_proj", 4096, 4096, heads, None)
    # the readers' norm weight: the producer multiplied its row by some weight; the exact reference needs the
    # same one, so the readers get rows whose weight is one (scaled == the residual sum)
    ones = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    scaled, sums, held, _ = o_row
    o_row = (held.clone(), sums, held, fg.scaled_half(held))
    gu_line, (act, act_half) = reader("gate_up_silu", 22016, o_row, ones, gated=True)
    down_line, down_row = producer("down_proj", 4096, 11008, act, act_half)
    down_row = (down_row[2].clone(), down_row[1], down_row[2], fg.scaled_half(down_row[2]))
    qkv_line, _ = reader("qkv_proj", 12288, down_row, ones, gated=False)
    return [o_line, gu_line, down_line, qkv_line]


def engine(tmp: str) -> dict:
    source = make_tiny_checkpoint(Path(tmp) / "llama-src", "llama", hidden_size=256, num_heads=4, num_kv_heads=2,
                                  num_layers=3)
    config = json.loads((source / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    qkv = hidden + 2 * config["num_key_value_heads"] * head_dim
    # h2 tilings for the tiny shapes (the shipped file names Llama-2-7B's only): one row of each layer
    shapes = {f"{n},{k},1": {"block_n": 8, "block_k": 256, "num_warps": 4, "options": ["h2"]}
              for n, k in ((qkv, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter))}
    tilings = Path(tmp) / "tilings.json"
    tilings.write_text(json.dumps({"max_rows": 16, "shapes": shapes}))
    os.environ["INFERNEO_FP8_GEMV_CONFIGS"] = str(tilings)
    fg._tuned.cache_clear()
    # asked: every producer launch (fp8_residual_norm)
    runs, asked = switch_runs(source, SWITCH, fg, "fp8_residual_norm", lambda args, kwargs: True,
                              quantization="fp8")
    os.environ.pop("INFERNEO_FP8_GEMV_CONFIGS")
    fg._tuned.cache_clear()
    ref = reference_runs(source, Path(tmp) / "llama-fp8-dequantized")
    (on, on_lp), (off, off_lp) = runs["1"], runs["0"]
    line = {"engine": "llama-fp8", "asked_off": asked["0"], "asked_on": asked["1"],
            "on_vs_off_prefix_share": equal_share(on, off), "on_vs_off_logprob_diff": distance(on, on_lp, off, off_lp),
            "on_prefix_share": equal_share(on, ref[0]), "off_prefix_share": equal_share(off, ref[0]),
            "on_logprob_diff": distance(on, on_lp, *ref), "off_logprob_diff": distance(off, off_lp, *ref)}
    # as the W4A16 epilogue check: as close to the float32 reference as the plain path (twice its distance, or 0.1)
    line["ok"] = (asked["0"] == 0 and asked["1"] > 0
                  and line["on_logprob_diff"] <= max(2 * line["off_logprob_diff"], 0.1))
    return line


def reference_runs(source: Path, dest: Path) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens and chosen-token logprobs of the float32 model on the weights the bfloat16 FP8 engine runs:
    every weight rounded to bfloat16, the decoder linears then quantized per output row to e4m3 as online FP8
    quantizes them (``quantize_groups``) and de-quantized; no activation quantization (the one-row GEMV has none)."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, dest / item.name)
    for shard in source.glob("*.safetensors"):
        tensors = {}
        for name, tensor in load_file(shard).items():
            tensor = tensor.to(torch.bfloat16).float()
            if name.startswith("model.layers.") and name.endswith("_proj.weight"):
                q, scales = quantize_groups(tensor)
                tensor = q.float() * scales
            tensors[name] = tensor.contiguous()
        save_file(tensors, dest / shard.name)
    return greedy_run(dest, dtype="float32")


if __name__ == "__main__":
    torch.manual_seed(0)
    raise SystemExit(run_checks("FP8 NORM EPILOGUE", kernels, engine))
