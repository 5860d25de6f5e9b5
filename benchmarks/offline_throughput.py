"""Offline throughput: one fixed batch of requests, one engine per invocation, one JSON line of results.

Every engine gets the same workload, built only from the command-line arguments: ``--num-requests`` prompts of
random token ids (numpy RNG seeded with ``--seed``; ids drawn from ``[100, vocab_size - 100)`` so that no special
token appears), prompt and output lengths uniform in ``--prompt-len`` and ``--output-len``. Decoding is greedy and
ignores EOS, and each request asks for exactly its output length (``max_tokens = min_tokens = L``), so all engines
produce the same number of tokens. Only the generation call is timed, after a warm-up of two tiny requests;
model loading, compilation and start-up are not.

Engines:

- ``inferneo``: ``inferneo.LLM``; by default the bundled default model (``--model`` to pick another).
- ``hf``: Hugging Face ``transformers`` ``generate`` on an HF folder, requests sorted by prompt length and
  batched ``--hf-batch-size`` at a time with left padding. A batch decodes ``max`` of its requests' output
  lengths; only each request's own output length is counted as output tokens (extra tokens decoded for the
  shorter requests of a batch are work HF does but that the workload did not ask for).
- ``vllm``: vLLM's CPU build, from its own venv::

      scratch/vllm-venv/bin/python benchmarks/offline_throughput.py --engine vllm

The default model for ``hf`` and ``vllm`` is the HF folder made by ``benchmarks/peers/convert_default_model.py``
(the same weights as Inferneo's default model, de-quantized to fp32). Results are printed and, with ``--out``,
appended to a JSON-lines file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
import time

import numpy as np

DEFAULT_HF_MODEL = "scratch/smollm2-hf"
DEFAULT_VOCAB_SIZE = 49152  # SmolLM2's, used when no HF folder can be read for it
TOKEN_MARGIN = 100  # keep this many ids clear of each end of the vocabulary (special tokens live there)
WARMUP_PROMPTS = [[1000 + i for i in range(8)], [2000 + i for i in range(12)]]
WARMUP_OUTPUT_LEN = 4


# ---- workload --------------------------------------------------------------------------------------------


def parse_range(text: str) -> tuple[int, int]:
    """``"16:128"`` -> (16, 128), both ends included; ``"64"`` -> (64, 64)."""
    lo, _, hi = text.partition(":")
    lo_i, hi_i = int(lo), int(hi or lo)
    if lo_i < 1 or hi_i < lo_i:
        raise argparse.ArgumentTypeError(f"bad range {text!r}: want LO:HI with 1 <= LO <= HI")
    return lo_i, hi_i


def make_workload(
    num_requests: int, prompt_len: tuple[int, int], output_len: tuple[int, int], seed: int, vocab_size: int
) -> tuple[list[list[int]], list[int]]:
    if vocab_size <= 2 * TOKEN_MARGIN:
        raise ValueError(f"vocab_size {vocab_size} is too small")
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(prompt_len[0], prompt_len[1] + 1, size=num_requests)
    output_lens = rng.integers(output_len[0], output_len[1] + 1, size=num_requests)
    prompts = [
        rng.integers(TOKEN_MARGIN, vocab_size - TOKEN_MARGIN, size=int(n)).tolist() for n in prompt_lens
    ]
    return prompts, [int(n) for n in output_lens]


def workload_digest(prompts: list[list[int]], output_lens: list[int]) -> str:
    """A short hash of the exact workload, to check that two result lines ran the same requests."""
    h = hashlib.sha256(json.dumps([prompts, output_lens]).encode())
    return h.hexdigest()[:16]


def read_vocab_size(model_dir: str | None) -> int | None:
    if not model_dir:
        return None
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        config = json.load(f)
    return config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")


# ---- engines: each returns (elapsed seconds, generated token ids per request) ------------------------------


def run_hf(args, prompts, output_lens):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model_dir = args.model or DEFAULT_HF_MODEL
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate_batch(batch_prompts, new_tokens):
        width = max(len(p) for p in batch_prompts)
        ids = torch.full((len(batch_prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch_prompts), width), dtype=torch.long)
        for row, p in enumerate(batch_prompts):  # left padding
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,  # masks EOS until the end, like vLLM's min_tokens: exact lengths
                pad_token_id=pad_id,
            )
        return out[:, width:].tolist()

    generate_batch(WARMUP_PROMPTS, WARMUP_OUTPUT_LEN)

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    args.hf_decoded_tokens = 0  # what HF really decoded, shorter requests' extra tokens included
    start = time.perf_counter()
    for b in range(0, len(order), args.hf_batch_size):
        idx = order[b : b + args.hf_batch_size]
        new_tokens = max(output_lens[i] for i in idx)
        args.hf_decoded_tokens += new_tokens * len(idx)
        generated = generate_batch([prompts[i] for i in idx], new_tokens)
        for i, tokens in zip(idx, generated, strict=True):
            results[i] = tokens[: output_lens[i]]
    elapsed = time.perf_counter() - start
    return elapsed, results


def run_vllm(args, prompts, output_lens):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB; without it start-up fails on memory
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")  # default: one core
    if args.vllm_preload == "auto" and "LD_PRELOAD" not in os.environ:
        # vLLM's CPU docs ask for tcmalloc + Intel OpenMP preloaded. The engine processes are started with
        # spawn (a fresh exec), so setting it here reaches them; this process itself is not affected.
        libs = [
            os.path.join(sys.prefix, "preload/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
            os.path.join(sys.prefix, "lib/libiomp5.so"),
        ]
        libs = [lib for lib in libs if os.path.exists(lib)]
        if libs:
            os.environ["LD_PRELOAD"] = ":".join(libs)
    args.env = {
        k: os.environ[k]
        for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "LD_PRELOAD")
        if k in os.environ
    }
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model or DEFAULT_HF_MODEL,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        seed=args.seed,
        **args.engine_args,
    )

    def params(n):
        return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)

    def as_prompts(token_lists):
        return [{"prompt_token_ids": p} for p in token_lists]

    llm.generate(
        as_prompts(WARMUP_PROMPTS), [params(WARMUP_OUTPUT_LEN)] * len(WARMUP_PROMPTS), use_tqdm=False
    )

    sampling = [params(n) for n in output_lens]
    start = time.perf_counter()
    outputs = llm.generate(as_prompts(prompts), sampling, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, [list(o.outputs[0].token_ids) for o in outputs]


def run_inferneo(args, prompts, output_lens):
    from inferneo import LLM, SamplingParams

    kwargs = {
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "num_threads": args.threads,
        "seed": args.seed,
        **args.engine_args,
    }
    llm = LLM(model=args.model, **kwargs)

    def params(n):
        return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)

    llm.generate(WARMUP_PROMPTS, [params(WARMUP_OUTPUT_LEN)] * len(WARMUP_PROMPTS), use_tqdm=False)

    sampling = [params(n) for n in output_lens]
    start = time.perf_counter()
    outputs = llm.generate(prompts, sampling, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, [list(o.outputs[0].token_ids) for o in outputs]


ENGINES = {"hf": run_hf, "vllm": run_vllm, "inferneo": run_inferneo}


# ---- bookkeeping -----------------------------------------------------------------------------------------


def versions(engine: str) -> dict[str, str]:
    names = ["numpy", "torch", "transformers"]
    names += {"vllm": ["vllm-cpu", "vllm"], "inferneo": ["inferneo"]}.get(engine, [])
    found = {"python": platform.python_version()}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def emit_json(record: dict, out: str | None) -> None:
    """Print ``record`` as one JSON line and, with ``out``, append the line to that file."""
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def host_info() -> dict:
    info = {"machine": platform.machine(), "cpu_count": os.cpu_count(), "loadavg_start": None}
    with contextlib.suppress(AttributeError):
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags = next(
            (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
        )
        info["cpu_flags"] = sorted(f for f in set(flags) if f.startswith(("avx512", "amx", "avx2", "fma")))
    except OSError:
        pass
    return info


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def parse_engine_args(items: list[str]) -> dict:
    """``key=value`` pairs; values are read as JSON when they parse (numbers, true/false), else strings."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--engine-arg wants key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", choices=sorted(ENGINES), required=True)
    parser.add_argument(
        "--model",
        default=None,
        help=f"model folder/file (default: hf, vllm: {DEFAULT_HF_MODEL}; inferneo: its default)",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=parse_range, default=(16, 128), metavar="LO:HI")
    parser.add_argument("--output-len", type=parse_range, default=(16, 128), metavar="LO:HI")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help=f"token ids are drawn below this (default: from {DEFAULT_HF_MODEL}/config.json, "
        f"else {DEFAULT_VOCAB_SIZE}); keep it equal across engines",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="vllm/inferneo context length (default: longest prompt + longest output, to 64)",
    )
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument(
        "--threads", type=int, default=2, help="CPU threads (hf, inferneo) / cores bound (vllm)"
    )
    parser.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra keyword argument for vllm.LLM / inferneo.LLM (repeatable)",
    )
    parser.add_argument(
        "--vllm-preload",
        choices=["auto", "none"],
        default="auto",
        help="auto: preload tcmalloc + libiomp5 from the vLLM venv into vLLM's engine processes "
        "when benchmarks/peers/setup_vllm_cpu.sh put them there (unless LD_PRELOAD is set)",
    )
    parser.add_argument("--out", default=None, help="append the JSON result line to this file")
    parser.add_argument(
        "--dump-tokens",
        default=None,
        help="write the generated token ids (JSON list per request) here, to compare engines",
    )
    parser.add_argument("--label", default=None, help="free text stored with the result")
    args = parser.parse_args()
    args.engine_args = parse_engine_args(args.engine_arg)
    args.env = {}

    vocab_size = args.vocab_size or read_vocab_size(DEFAULT_HF_MODEL) or DEFAULT_VOCAB_SIZE
    prompts, output_lens = make_workload(
        args.num_requests, args.prompt_len, args.output_len, args.seed, vocab_size
    )
    if args.max_model_len is None:
        need = args.prompt_len[1] + args.output_len[1]
        args.max_model_len = -(-need // 64) * 64

    load_start = loadavg()
    elapsed, generated = ENGINES[args.engine](args, prompts, output_lens)

    prompt_tokens = sum(len(p) for p in prompts)
    output_tokens = sum(output_lens)
    produced = [len(g) for g in generated]
    length_mismatches = sum(p != n for p, n in zip(produced, output_lens, strict=True))
    host = host_info()
    host["loadavg_start"], host["loadavg_end"] = load_start, loadavg()
    result = {
        "engine": args.engine,
        "model": args.model or (DEFAULT_HF_MODEL if args.engine != "inferneo" else "default"),
        "dtype": args.dtype,
        "num_requests": args.num_requests,
        "prompt_len": list(args.prompt_len),
        "output_len": list(args.output_len),
        "seed": args.seed,
        "vocab_size": vocab_size,
        "workload_sha256": workload_digest(prompts, output_lens),
        "total_prompt_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "generated_output_tokens": sum(min(p, n) for p, n in zip(produced, output_lens, strict=True)),
        "length_mismatches": length_mismatches,
        "elapsed_s": round(elapsed, 3),
        "output_tok_per_s": round(output_tokens / elapsed, 2),
        "total_tok_per_s": round((prompt_tokens + output_tokens) / elapsed, 2),
        "requests_per_s": round(args.num_requests / elapsed, 3),
        "hf_batch_size": args.hf_batch_size if args.engine == "hf" else None,
        "hf_decoded_tokens": getattr(args, "hf_decoded_tokens", None),
        "max_model_len": args.max_model_len if args.engine != "hf" else None,
        "threads": args.threads,
        "engine_args": args.engine_args,
        "env": args.env,
        "label": args.label,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(args.engine),
        "host": host,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    emit_json(result, args.out)
    if length_mismatches:
        print(
            f"WARNING: {length_mismatches} request(s) did not produce exactly their output length",
            file=sys.stderr,
        )
    if args.dump_tokens:
        with open(args.dump_tokens, "w") as f:
            json.dump(generated, f)


if __name__ == "__main__":  # required: vLLM starts its engine process with spawn
    main()
