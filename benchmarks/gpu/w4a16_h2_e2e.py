"""The one-row packed-half W4A16 kernel (``triton_int4._gemv_h2_kernel``) inside the engine on CUDA, bf16 and fp16.

Tiny random Llama and Qwen3 checkpoints are quantized to AWQ (groups of 32 and 128) and to GPTQ with act order
(``inferneo.testing.int4_checkpoints``), run in bfloat16, one AWQ one also in float16. Each runs greedy decoding
through the engine in one process: with the Triton W4A16 kernels as chosen (the h2 kernel at every one-row step),
with the Triton kernels before it (the h2 kernel switched off: the tensor-core kernel or the float32 GEMV at one
row), and with ``reference_int4_linear`` (the de-quantized weight rounded to the model dtype, ``F.linear``). All
three compute the same weights rounded differently (random tiny models amplify that), so the check compares
distances: the share of greedy tokens equal up to the first difference, and the logprobs of the chosen tokens at
the decode steps whose inputs agree (up to each sequence's first difference). The h2 engine passes when its
largest logprob distance from the reference is within twice the older kernels' (or 0.1), when an eager run (no
CUDA graphs) sends every one-row decode projection through the h2 kernel (launches counted), and when that eager
run's tokens equal the graph run's. Prints one JSON line per checkpoint and ``E2E ok`` /
``E2E FAILED``.

Usage: ``python benchmarks/gpu/w4a16_h2_e2e.py [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from inferneo import LLM, SamplingParams  # noqa: E402
from inferneo.kernels import triton_int4  # noqa: E402
from inferneo.quantization import int4  # noqa: E402
from inferneo.testing.int4_checkpoints import write_int4_checkpoint  # noqa: E402
from inferneo.testing.tiny_models import make_tiny_checkpoint  # noqa: E402

PROMPTS = [[1, 5, 9, 33, 70], [1, 200, 3, 4, 5, 6, 7, 8, 100, 101, 300, 44, 55, 66, 77, 88, 99], [1, 17, 250],
           [1, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54]]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
LAYERS = 2
CASES = (("llama", "awq", 32, False, "bfloat16"), ("llama", "awq", 128, False, "bfloat16"),
         ("qwen3", "gptq", 32, True, "bfloat16"), ("llama", "awq", 128, False, "float16"))


def greedy_run(path: Path, **llm_kw) -> tuple[list[list[int]], list[list[float]]]:
    """A tiny engine from ``path`` (CUDA graphs unless ``llm_kw`` says otherwise, each prompt alone): the greedy
    tokens of every prompt and their logprobs."""
    llm = LLM(str(path), max_model_len=256, kv_cache_memory="64MiB", **llm_kw)
    outs = [llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0] for prompt in PROMPTS]
    llm.shutdown()
    return ([list(o.token_ids) for o in outs],
            [[step[t].logprob for step, t in zip(o.logprobs, o.token_ids, strict=True)] for o in outs])


def run(path: Path, mode: str, dtype: str, eager: bool = False) -> tuple[list[list[int]], list[float], int]:
    """Greedy tokens, the chosen tokens' logprobs and h2 launches from Python (with CUDA graphs, only those made
    while capturing); ``mode``: "h2", "older" or "reference". Each prompt runs alone, so that every decode step
    is one row."""
    calls = {"h2": 0}
    original_h2 = triton_int4._gemv_h2

    def counted(*args, **kwargs):
        calls["h2"] += 1
        return original_h2(*args, **kwargs)

    original_select, original_takes = int4.select_int4_kernel, triton_int4._h2_takes
    triton_int4._gemv_h2 = counted
    if mode == "reference":
        int4.select_int4_kernel = lambda *args: int4.reference_int4_linear
    if mode == "older":
        triton_int4._h2_takes = lambda *args: False
    try:
        tokens, chosen = greedy_run(path, dtype=dtype, enforce_eager=eager)
    finally:
        triton_int4._gemv_h2 = original_h2
        int4.select_int4_kernel, triton_int4._h2_takes = original_select, original_takes
    return tokens, chosen, calls["h2"]


def equal_share(got: list[list[int]], ref: list[list[int]]) -> float:
    """The share of ``ref``'s tokens that ``got`` repeats before its first difference in each sequence."""
    equal = 0
    for g, r in zip(got, ref, strict=True):
        for a, b in zip(g, r, strict=True):
            if a != b:
                break
            equal += 1
    return round(equal / sum(len(r) for r in ref), 4)


def distance(got: list[list[int]], got_lp: list[list[float]], ref: list[list[int]], ref_lp: list[list[float]]) -> float:
    """The largest difference of the chosen tokens' logprobs at the decode steps (the first token comes from the
    prefill) whose inputs are the same in both runs: up to the first differing token of each sequence."""
    worst = 0.0
    for g, gl, r, rl in zip(got, got_lp, ref, ref_lp, strict=True):
        for i in range(1, len(r)):
            if g[i - 1] != r[i - 1] or g[i] != r[i]:
                break
            worst = max(worst, abs(gl[i] - rl[i]))
    return round(worst, 5)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lines, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        for arch, layout, group, desc_act, dtype in CASES:
            source = make_tiny_checkpoint(Path(tmp) / f"{arch}-src", arch, hidden_size=256, num_heads=4,
                                          num_kv_heads=2, num_layers=LAYERS)
            quant, _ = write_int4_checkpoint(source, Path(tmp) / f"{arch}-{layout}-{group}",
                                             Path(tmp) / f"{arch}-{layout}-{group}-ref", layout, group,
                                             desc_act=desc_act)
            got, got_lp, _ = run(quant, "h2", dtype)
            eager, _, h2_calls = run(quant, "h2", dtype, eager=True)
            older, older_lp, _ = run(quant, "older", dtype)
            ref, ref_lp, _ = run(quant, "reference", dtype)
            line = {"arch": arch, "layout": layout, "group": group, "desc_act": desc_act, "dtype": dtype,
                    "h2_calls_eager": h2_calls,
                    "graphs_equal_eager": got == eager,
                    "h2_equal_prefix_share": equal_share(got, ref), "older_equal_prefix_share": equal_share(older, ref),
                    "h2_decode_logprob_diff": distance(got, got_lp, ref, ref_lp),
                    "older_decode_logprob_diff": distance(older, older_lp, ref, ref_lp)}
            # one-row steps x layers x (qkv, o, gate/up, down)
            decode_calls = len(PROMPTS) * (GREEDY.max_tokens - 1) * LAYERS * 4
            case_ok = (h2_calls >= decode_calls and got == eager
                       and line["h2_decode_logprob_diff"] <= max(2 * line["older_decode_logprob_diff"], 0.1))
            line["ok"] = case_ok
            ok &= case_ok
            print(json.dumps(line), flush=True)
            lines.append(line)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(x) + "\n" for x in lines))
    print("E2E ok" if ok else "E2E FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    torch.manual_seed(0)
    raise SystemExit(main())
