"""The W4A16 tensor-core kernel launched with programmatic dependent launch (``INFERNEO_W4A16_TC_PDL``) against
the same kernel's plain launch, on Llama-2-7B's layer shapes.

Check: in a CUDA graph, the Triton RMSNorm (a PDL launch, as in a decode step) writes each call's input and the
W4A16 launch reads it; every output must equal, bit for bit, the plain launch's output on the same input (the
PDL form only adds L2 prefetches and the wait, so its sums are the same), and be within ``TOLERANCE`` of float32
``F.linear`` on the de-quantized weight. Time: the same norm + W4A16 chain, ``CALLS`` calls over weight copies
larger than L2, PDL on against off, per layer and row count (the tuned launch of ``int4_configs.json``).

Modes (the switch's values): ``off`` (the plain launch), ``early`` and ``wait``.

The kernel takes PDL above ``triton_int4.TC_PDL_MIN_ROWS`` (16) rows only; at fewer rows every mode is the plain
launch.

Engine (``--engine``): a tiny random Llama quantized to AWQ (group 128) runs 24 prompts together (decode steps of
24 rows: the tensor-core kernel under PDL) with CUDA graphs in each mode; tokens and the chosen tokens' logprobs
must equal the plain launch's exactly, and launches of more than 16 rows must have been captured.

Usage: ``python benchmarks/gpu/w4a16_tc_pdl_check.py [--rows 32,64] [--out FILE.jsonl] [--engine]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from int4_check import TOLERANCE, _random_rows, clone_weights, copies_for, graph_time_us, rel_err  # noqa: E402

from inferneo import LLM, SamplingParams  # noqa: E402
from inferneo.kernels import triton_int4  # noqa: E402
from inferneo.kernels._triton_elementwise import rms_norm  # noqa: E402
from inferneo.kernels.triton_int4 import silu_fused_config, w4a16_linear, w4a16_silu_mul  # noqa: E402
from inferneo.quantization.int4_layouts import dequantize_rows  # noqa: E402
from inferneo.testing.int4_checkpoints import write_int4_checkpoint  # noqa: E402
from inferneo.testing.tiny_models import make_tiny_checkpoint  # noqa: E402

LAYERS = (("qkv_proj", 12288, 4096, False), ("o_proj", 4096, 4096, False), ("gate_up_proj", 22016, 4096, False),
          ("gate_up_silu", 11008, 4096, True), ("down_proj", 4096, 11008, False))
SWITCH = "INFERNEO_W4A16_TC_PDL"
MODES = ("off", "early", "wait")


def run(fn, mode: str):
    os.environ[SWITCH] = mode
    return fn()


def graph_us(calls, mode: str) -> float:
    """``int4_check.graph_time_us`` of ``calls`` captured with the switch at ``mode``."""
    os.environ[SWITCH] = mode
    return graph_time_us(calls)


def layer(name: str, n: int, k: int, silu: bool, m: int, out) -> dict | None:
    gen_w = _random_rows(2 * n if silu else n, k, "cuda")
    hidden = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    norm_w = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
    x = rms_norm(hidden, None, norm_w, 1e-5)
    if silu and silu_fused_config(x, gen_w) is None:
        return None  # the tuned table runs the projection, then the SiLU kernel, at these rows
    copies = [gen_w] + [clone_weights(gen_w) for _ in range(copies_for(gen_w.packed.numel() * 4) - 1)]

    def project(xx, w):
        return w4a16_silu_mul(xx, w) if silu else w4a16_linear(xx, w)

    def call(w):  # the norm (a PDL launch) writes the input the W4A16 launch reads
        return lambda: project(rms_norm(hidden, None, norm_w, 1e-5), w)

    ref = x.float() @ dequantize_rows(gen_w).float().T
    if silu:
        ref = F.silu(ref[:, :n]) * ref[:, n:]
    plain = run(lambda: project(x, gen_w), "off")
    line = {"layer": name, "rows": m, "n": n, "k": k, "ok": True}
    for mode in MODES[1:]:
        eager = run(lambda: project(x, gen_w), mode)
        chained = call(gen_w)
        chained()  # warm the launch
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graphed = chained()
        graph.replay()
        torch.cuda.synchronize()
        err = rel_err(eager, ref)
        line[f"{mode}_equal"] = torch.equal(eager, plain) and torch.equal(graphed, plain)
        line[f"{mode}_rel_err"] = err
        line["ok"] = line["ok"] and line[f"{mode}_equal"] and err < TOLERANCE
    calls = [call(w) for w in copies]
    for mode in MODES + ("off",):
        line[f"{mode}_us" if f"{mode}_us" not in line else f"{mode}_again_us"] = graph_us(calls, mode)
    print(json.dumps(line), flush=True)
    out.write(json.dumps(line) + "\n")
    return line


def engine_check(out) -> bool:
    """Greedy tokens and logprobs of 24 prompts run together, in each mode, against the plain launch's."""
    import tempfile

    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    prompts = [[1, 5 + i, 9, 33 + 3 * i, 70] * (1 + i % 3) for i in range(24)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        source = make_tiny_checkpoint(Path(tmp) / "src", "llama", hidden_size=256, num_heads=4, num_kv_heads=2,
                                      num_layers=2)
        quant, _ = write_int4_checkpoint(source, Path(tmp) / "awq", Path(tmp) / "awq-ref", "awq", 128)
        original = triton_int4._tc
        for mode in MODES:
            calls = {"tc": 0}

            def counted(*args, calls=calls, **kwargs):
                calls["tc"] += args[0].shape[0] > triton_int4.TC_PDL_MIN_ROWS
                return original(*args, **kwargs)

            os.environ[SWITCH] = mode
            triton_int4._tc = counted
            try:
                llm = LLM(str(quant), dtype="bfloat16", max_model_len=256, kv_cache_memory="64MiB")
                outs = llm.generate(prompts, greedy, use_tqdm=False)
                llm.shutdown()
            finally:
                triton_int4._tc = original
            tokens = [list(o.outputs[0].token_ids) for o in outs]
            logprobs = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)]
                        for o in outs]
            results[mode] = (tokens, logprobs, calls["tc"])
    ok = True
    for mode in MODES[1:]:
        line = {"engine": mode, "tc_calls": results[mode][2], "tokens_equal": results[mode][0] == results["off"][0],
                "logprobs_equal": results[mode][1] == results["off"][1]}
        line["ok"] = line["tc_calls"] > 0 and line["tokens_equal"] and line["logprobs_equal"]
        ok &= line["ok"]
        print(json.dumps(line), flush=True)
        out.write(json.dumps(line) + "\n")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="32,64")
    parser.add_argument("--out", default="w4a16_tc_pdl_check.jsonl")
    parser.add_argument("--engine", action="store_true", help="also the tiny AWQ engine check")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    lines = []
    with open(args.out, "w") as out:
        for m in (int(r) for r in args.rows.split(",")):
            for name, n, k, silu in LAYERS:
                line = layer(name, n, k, silu, m, out)
                if line is not None:
                    lines.append(line)
        if args.engine and not engine_check(out):
            lines.append({"layer": "engine", "rows": 0, "ok": False})
    failed = [f"{x['layer']}@{x['rows']}" for x in lines if not x["ok"]]
    for m in sorted({x["rows"] for x in lines if x["layer"] != "engine"}):
        rows = [x for x in lines if x["rows"] == m and x["layer"] != "gate_up_silu"]
        print(f"rows {m}: layer set, us: " + ", ".join(
            f"{key.removesuffix('_us')} {sum(x[key] for x in rows):.1f}"
            for key in ("off_us", "early_us", "wait_us", "off_again_us")))
    print("FAILED: " + ", ".join(failed) if failed else "all checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
