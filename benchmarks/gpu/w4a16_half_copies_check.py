"""The float16 copies of the bfloat16 rows between the W4A16 h2 GEMVs (``kernels/scaled_row.py``, switch
``INFERNEO_W4A16_HALF_COPIES``) on CUDA: the same bits with them as without.

Kernels, Llama-2-7B's shapes in bfloat16, the launches the engine chains at one row, each eager and replayed from a
CUDA graph, with and without the copies:
- output projection 4096 x 4096 (producer): residual sum, scaled row and sums of squares equal; its float16 copy
  equal to the scaled row's (``paired_half``);
- gate/up 22016 x 4096 + SiLU (row pairs, row scale), reading the scaled row's copy: activation equal; its copy
  equal to the activation's;
- down projection 4096 x 11008 (producer), reading the activation's copy: equal, as the output projection;
- q/k/v 12288 x 4096 (row scale), reading the down projection's copy: equal.

Engine: a tiny random Llama quantized to AWQ (group 128, hidden 256, bfloat16), each prompt alone (one-row decode
steps), CUDA graphs: tokens and logprobs with the switch on equal to those with it off, and the producers asked
for copies only with it on.

Prints one JSON line per case and ``HALF COPIES ok`` / ``HALF COPIES FAILED``.
Usage: ``python benchmarks/gpu/w4a16_half_copies_check.py [--out FILE.jsonl]``
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from check_report import run_checks  # noqa: E402
from int4_check import _random_rows  # noqa: E402
from w4a16_h2_e2e import greedy_run  # noqa: E402
from w4a16_norm_epilogue_check import EPS, graphed  # noqa: E402

from inferneo.kernels import triton_int4  # noqa: E402
from inferneo.kernels.triton_int4 import (  # noqa: E402
    RowScale,
    h2_epilogue_config,
    paired_half,
    silu_fused_config,
    w4a16_linear,
    w4a16_residual_norm,
    w4a16_silu_mul,
)
from inferneo.testing.int4_checkpoints import write_int4_checkpoint  # noqa: E402
from inferneo.testing.tiny_models import make_tiny_checkpoint  # noqa: E402

SWITCH = "INFERNEO_W4A16_HALF_COPIES"


def half_like(row: torch.Tensor) -> torch.Tensor:
    return torch.full_like(row, float("nan"), dtype=torch.float16)


def producer(name: str, n: int, k: int, x: torch.Tensor, x_half: torch.Tensor | None) -> tuple[dict, tuple]:
    """The producer launch with and without the copies; the line and (scaled, sums, scaled's copy) for the next."""
    w = _random_rows(n, k, "cuda")
    residual = 4 * torch.randn(1, n, device="cuda", dtype=torch.bfloat16)
    norm_w = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5
    line = {"layer": name, "n": n, "k": k, "reads_copy": x_half is not None}
    for form in ("eager", "graph"):
        run = graphed if form == "graph" else (lambda fn: fn())
        plain_res, copy_res = residual.clone(), residual.clone()
        half = half_like(residual)

        def plain_call(stage=plain_res):
            stage.copy_(residual)
            return w4a16_residual_norm(x, w, stage, norm_w)

        def copy_call(stage=copy_res, half=half):
            stage.copy_(residual)
            return w4a16_residual_norm(x, w, stage, norm_w, x_half=x_half, half_out=half)

        scaled, sums = run(plain_call)
        scaled2, sums2 = run(copy_call)
        line[f"{form}_equal"] = (torch.equal(scaled, scaled2) and torch.equal(sums, sums2)
                                 and torch.equal(plain_res, copy_res) and torch.equal(half, paired_half(scaled)))
    line["ok"] = line["eager_equal"] and line["graph_equal"]
    return line, (scaled, sums, half)


def gate_up(row: tuple, d: int = 11008, k: int = 4096) -> tuple[dict, tuple]:
    scaled, sums, half = row
    w = _random_rows(2 * d, k, "cuda")
    os.environ["INFERNEO_W4A16_SILU_PAIRS"] = "1"
    config = silu_fused_config(scaled, w)
    os.environ.pop("INFERNEO_W4A16_SILU_PAIRS")
    line = {"layer": "gate_up_silu_pairs", "d": d, "k": k, "config": str(config)}
    for form in ("eager", "graph"):
        run = graphed if form == "graph" else (lambda fn: fn())
        act_half = torch.full((1, d), float("nan"), device="cuda", dtype=torch.float16)
        want = run(lambda: w4a16_silu_mul(scaled, w, config, row_scale=RowScale(sums, EPS)))
        got = run(lambda act_half=act_half: w4a16_silu_mul(scaled, w, config, row_scale=RowScale(sums, EPS),
                                                           x_half=half, half_out=act_half))
        line[f"{form}_equal"] = torch.equal(want, got) and torch.equal(act_half, paired_half(want))
    line["ok"] = line["eager_equal"] and line["graph_equal"]
    return line, (want, act_half)


def qkv(row: tuple, n: int = 12288, k: int = 4096) -> dict:
    scaled, sums, half = row
    w = _random_rows(n, k, "cuda")
    config = h2_epilogue_config(scaled, w, producer=False)
    line = {"layer": "qkv_proj", "n": n, "k": k, "config": str(config)}
    for form in ("eager", "graph"):
        run = graphed if form == "graph" else (lambda fn: fn())
        want = run(lambda: w4a16_linear(scaled, w, config, row_scale=RowScale(sums, EPS)))
        got = run(lambda: w4a16_linear(scaled, w, config, row_scale=RowScale(sums, EPS), x_half=half))
        line[f"{form}_equal"] = torch.equal(want, got)
    line["ok"] = line["eager_equal"] and line["graph_equal"]
    return line


def switch_runs(path: Path, switch: str, owner, name: str, asks, **llm_kw) -> tuple[dict, dict]:
    """A tiny engine from ``path`` (bfloat16, CUDA graphs, each prompt alone) with ``switch`` at 0 and at 1:
    ``(runs, asked)``, by switch value the greedy tokens and their logprobs (one list per prompt each), and how many
    calls of ``owner.<name>`` (patched while it runs) ``asks(args, kwargs)`` counted (calls from Python: captures
    and eager steps)."""
    runs, asked = {}, {"0": 0, "1": 0}
    original = getattr(owner, name)
    for value in ("0", "1"):
        def counted(*args, value=value, **kwargs):
            asked[value] += bool(asks(args, kwargs))
            return original(*args, **kwargs)

        os.environ[switch] = value
        setattr(owner, name, counted)
        try:
            runs[value] = greedy_run(path, dtype="bfloat16", **llm_kw)
        finally:
            os.environ.pop(switch, None)
            setattr(owner, name, original)
    return runs, asked


def switch_ab(path: Path, switch: str, owner, name: str, asks, **llm_kw) -> dict:
    """:func:`switch_runs`, as a line that is ok when the tokens and their logprobs are equal with the switch off
    and on and the counted calls came with the switch on only."""
    runs, asked = switch_runs(path, switch, owner, name, asks, **llm_kw)
    line = {"tokens_equal": runs["0"][0] == runs["1"][0], "logprobs_equal": runs["0"][1] == runs["1"][1],
            "asked_off": asked["0"], "asked_on": asked["1"]}
    line["ok"] = line["tokens_equal"] and line["logprobs_equal"] and asked["0"] == 0 and asked["1"] > 0
    return line


def engine(tmp: str) -> dict:
    source = make_tiny_checkpoint(Path(tmp) / "llama-src", "llama", hidden_size=256, num_heads=4, num_kv_heads=2,
                                  num_layers=3)
    quant, _ = write_int4_checkpoint(source, Path(tmp) / "awq", Path(tmp) / "awq-ref", "awq", 128)
    # asked: the producers' calls with a copy to write
    return {"engine": "llama-awq-128", **switch_ab(quant, SWITCH, triton_int4, "w4a16_residual_norm",
                                                   lambda args, kwargs: kwargs.get("half_out") is not None)}


def kernels() -> list[dict]:
    """Llama-2-7B's four launches chained as a layer chains them."""
    heads = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    o_line, o_row = producer("o_proj", 4096, 4096, heads, None)
    gu_line, (act, act_half) = gate_up(o_row)
    down_line, down_row = producer("down_proj", 4096, 11008, act, act_half)
    return [o_line, gu_line, down_line, qkv(down_row)]


if __name__ == "__main__":
    torch.manual_seed(0)
    raise SystemExit(run_checks("HALF COPIES", kernels, engine))
