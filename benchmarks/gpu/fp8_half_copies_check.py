"""The scaled float16 copies of the bfloat16 rows read by the FP8 one-row GEMVs (``triton_fp8_gemv.scaled_half``,
``device_kernels.HalfCopyQuantLayer``, switch ``INFERNEO_FP8_HALF_COPIES``) on CUDA: the same bits with them as
without.

Kernels, Llama-2-7B's shapes in bfloat16 with per-channel e4m3 weights, the tuned one-row launches, each eager and
replayed from a CUDA graph, chained as the layer chains them:
- the RMSNorm (with a residual): normalized row and residual equal; its copy equal to ``scaled_half`` of the row;
- q/k/v 12288 x 4096 reading the norm's copy: equal;
- gate/up + SiLU 22016 x 4096 reading it and writing the activation's copy: equal, the copy ``scaled_half``'s;
- down 4096 x 11008 reading that copy: equal.

Engine: a tiny random Llama (hidden 256, bfloat16) with ``quantization="fp8"``, each prompt alone (one-row decode
steps), CUDA graphs: tokens and logprobs with the switch on equal to those with it off, and copies asked for only
with it on.

Prints one JSON line per case and ``FP8 HALF COPIES ok`` / ``FP8 HALF COPIES FAILED``.
Usage: ``python benchmarks/gpu/fp8_half_copies_check.py [--out FILE.jsonl]``
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from check_report import run_checks  # noqa: E402
from w4a16_half_copies_check import switch_ab  # noqa: E402
from w4a16_norm_epilogue_check import graphed  # noqa: E402

from inferneo.kernels._triton_elementwise import rms_norm  # noqa: E402
from inferneo.kernels.triton_fp8_gemv import fp8_gemv, fp8_gemv_silu_mul, scaled_half  # noqa: E402
from inferneo.quantization.fp8 import Fp8LinearMethod  # noqa: E402
from inferneo.quantization.fp8_math import quantize_groups  # noqa: E402
from inferneo.testing.tiny_models import make_tiny_checkpoint  # noqa: E402

SWITCH = "INFERNEO_FP8_HALF_COPIES"
EPS = 1e-5


def fp8_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = quantize_groups(torch.randn(n, k, device="cuda") * 0.02)
    return q, s.reshape(-1).float()


def forms(fn) -> dict[str, object]:
    """``fn()`` eager and from a CUDA graph."""
    return {"eager": fn(), "graph": graphed(fn)}


def reader(name: str, n: int, x: torch.Tensor, x_half: torch.Tensor) -> dict:
    """An ``n``-row FP8 GEMV of ``x`` with and without reading its copy ``x_half``, eager and from a graph."""
    q, s = fp8_weight(n, x.shape[1])
    want = forms(lambda: fp8_gemv(x, q, s))
    got = forms(lambda: fp8_gemv(x, q, s, x_half=x_half))
    return {"kernel": name, "n": n, "k": x.shape[1], **{f"{f}_equal": torch.equal(want[f], got[f]) for f in want}}


def kernels() -> list[dict]:
    lines = []
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    residual = 4 * torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    nw = torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5
    line = {"kernel": "rms_norm", "k": 4096}
    for form in ("eager", "graph"):
        run = graphed if form == "graph" else (lambda fn: fn())
        half = torch.full((1, 4096), float("nan"), device="cuda", dtype=torch.float16)
        plain_res, copy_res = residual.clone(), residual.clone()
        xs, xc = x.clone(), x.clone()

        def plain_call(xs=xs, plain_res=plain_res):
            plain_res.copy_(residual)
            xs.copy_(x)
            return rms_norm(xs, plain_res, nw, EPS)[0]

        def copy_call(xc=xc, copy_res=copy_res, half=half):
            copy_res.copy_(residual)
            xc.copy_(x)
            return rms_norm(xc, copy_res, nw, EPS, half_out=half)[0]

        want, got = run(plain_call), run(copy_call)
        line[f"{form}_equal"] = (torch.equal(want, got) and torch.equal(plain_res, copy_res)
                                 and torch.equal(half, scaled_half(got)))
    normed, normed_half = got, half
    lines.append(line)
    lines.append(reader("qkv_proj", 12288, normed, normed_half))
    q, s = fp8_weight(22016, 4096)
    line = {"kernel": "gate_up_silu", "n": 22016, "k": 4096}
    for form in ("eager", "graph"):
        run = graphed if form == "graph" else (lambda fn: fn())
        act_half = torch.full((1, 11008), float("nan"), device="cuda", dtype=torch.float16)
        want = run(lambda: fp8_gemv_silu_mul(normed, q, s))
        act = run(lambda act_half=act_half: fp8_gemv_silu_mul(normed, q, s, x_half=normed_half, half_out=act_half))
        line[f"{form}_equal"] = torch.equal(want, act) and torch.equal(act_half, scaled_half(act))
    lines.append(line)
    lines.append(reader("down_proj", 4096, act, act_half))
    for line in lines:
        line["ok"] = line["eager_equal"] and line["graph_equal"]
    return lines


def engine(tmp: str) -> dict:
    source = make_tiny_checkpoint(Path(tmp) / "llama-src", "llama", hidden_size=256, num_heads=4, num_kv_heads=2,
                                  num_layers=3)
    # asked: the GEMVs given copies (every call of copy_apply)
    return {"engine": "llama-fp8", **switch_ab(source, SWITCH, Fp8LinearMethod, "copy_apply",
                                               lambda args, kwargs: True, quantization="fp8")}


if __name__ == "__main__":
    torch.manual_seed(0)
    raise SystemExit(run_checks("FP8 HALF COPIES", kernels, engine))
