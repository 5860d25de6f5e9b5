"""``inferneo bench serve | batch-sizes | throughput``: load a server, find the best batch size, or measure
offline throughput."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from typing import Any

from inferneo.config import add_engine_args, engine_config_kwargs


def add_parser(subparsers) -> None:
    """Register ``inferneo bench`` and its three benchmarks."""
    from inferneo.bench.workload import parse_range

    bench = subparsers.add_parser("bench", help="benchmark a server or the engine")
    kinds = bench.add_subparsers(dest="bench_command", required=True)

    serve = kinds.add_parser(
        "serve", help="online load on a server: throughput, TTFT, TPOT, ITL and E2E latency",
        description="Stream completions to a running server at a Poisson request rate (or all at once), "
        "optionally capped at a concurrency, and report request and token throughput and the mean, median and "
        "p99 of time to first token, time per output token, inter-token latency and end-to-end latency.")
    _add_server_args(serve)
    _add_workload_args(serve, parse_range, seed=True)
    serve.add_argument("--request-rate", type=float, default=math.inf,
                       help="requests per second, arrivals drawn from a Poisson process (default inf: all at once)")
    serve.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    serve.add_argument("--ignore-eos", action="store_true", help="generate exactly the output lengths")
    serve.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    serve.add_argument("--num-warmups", type=int, default=1, help="untimed requests first (default 1)")
    serve.add_argument("--result-json", default=None, help="write every figure and the configuration here")
    serve.set_defaults(func=_guarded(_cmd_serve))

    sizes = kinds.add_parser(
        "batch-sizes", help="throughput and latency against batch size, and the best batch size",
        description="Send the same prompts as /v1/completions calls of N prompts each (one call at a time) for "
        "each batch size N; print requests/s, output tokens/s and mean latency per request, plot them, and "
        "name the batch size with the most requests per second.")
    _add_server_args(sizes)
    sizes.add_argument("--batch-sizes", type=_int_list, default=[1, 2, 4, 8, 16, 32, 64],
                       help="comma-separated (default 1,2,4,8,16,32,64)")
    sizes.add_argument("--num-prompts", type=int, default=100, help="prompts sent at each batch size (default 100)")
    sizes.add_argument("--prompt", default="Test prompt", help="the prompt repeated (default 'Test prompt')")
    sizes.add_argument("--dataset", default=None, help="prompts from a JSON-lines file instead ({\"prompt\": ...})")
    sizes.add_argument("--max-tokens", type=int, default=100, help="tokens to generate a prompt (default 100)")
    sizes.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    sizes.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-tokens every time")
    sizes.add_argument("--output-png", default=None, help="plot throughput and latency against batch size here")
    sizes.add_argument("--output-json", default=None, help="write the results here")
    sizes.set_defaults(func=_guarded(_cmd_batch_sizes))

    offline = kinds.add_parser(
        "throughput", help="offline throughput of a model in this process (LLM.generate)",
        description="Generate for a synthetic (random token ids) or JSON-lines workload with LLM.generate and "
        "report requests/s, output tokens/s and total tokens/s. --seed seeds the workload and the engine.")
    _add_workload_args(offline, parse_range, seed=False)
    offline.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                         help="stop at EOS instead of generating exactly the output lengths")
    offline.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    offline.add_argument("--output-json", default=None, help="write the results here")
    add_engine_args(offline)
    offline.set_defaults(func=_cmd_throughput)


def _guarded(command):
    """Run a server benchmark, turning an unreachable or failing server into a message and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        import httpx

        try:
            return command(args)
        except (httpx.HTTPError, RuntimeError) as exc:
            print(f"inferneo bench: error: {exc or type(exc).__name__} (server {args.url})", file=sys.stderr)
            return 1

    return run


def _add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://localhost:8000", help="the server (default http://localhost:8000)")
    parser.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    parser.add_argument("--api-key", default=os.environ.get("INFERNEO_API_KEY"),
                        help="bearer key (default $INFERNEO_API_KEY)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")


def _add_workload_args(parser: argparse.ArgumentParser, parse_range, seed: bool) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument("--num-prompts", type=int, default=64, help="requests in the workload (default 64)")
    g.add_argument("--input-len", type=parse_range, default=(16, 128), metavar="N|LO:HI",
                   help="random prompt lengths in tokens (default 16:128)")
    g.add_argument("--output-len", type=parse_range, default=(16, 128), metavar="N|LO:HI",
                   help="tokens to generate (default 16:128)")
    g.add_argument("--dataset", default=None,
                   help="JSON lines {\"prompt\": text or token ids, \"output_len\": N} instead of random prompts")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="random ids are drawn below this (default: the model's vocabulary size)")
    if seed:
        g.add_argument("--seed", type=int, default=0, help="seeds the prompts and the arrival times")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return values


def _workload(args: argparse.Namespace, vocab_size: int | None):
    from inferneo.bench.workload import load_dataset, random_workload

    if args.dataset:
        return load_dataset(args.dataset, args.num_prompts, args.output_len[1])
    return random_workload(args.num_prompts, args.input_len, args.output_len, args.seed, vocab_size)


def _workload_config(args: argparse.Namespace, workload, vocab_size: int | None) -> dict[str, Any]:
    return {"num_prompts": args.num_prompts, "dataset": args.dataset,
            "input_len": None if args.dataset else list(args.input_len), "output_len": list(args.output_len),
            "seed": args.seed, "vocab_size": vocab_size, "workload_sha256": workload.digest()}


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _cmd_serve(args: argparse.Namespace) -> int:
    from inferneo.bench.serve import (
        ServeConfig,
        fetch_model_info,
        format_report,
        probe_vocab_size,
        run_serve_benchmark,
    )
    from inferneo.bench.stats import environment, write_json

    _check_positive(num_prompts=args.num_prompts, max_concurrency=args.max_concurrency)
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate must be positive (or inf), got {args.request_rate}")
    card = asyncio.run(fetch_model_info(args.url, args.api_key))
    model = args.model or card["id"]
    vocab_size = args.vocab_size
    if vocab_size is None and not args.dataset:
        vocab_size = asyncio.run(probe_vocab_size(args.url, args.api_key))
    workload = _workload(args, vocab_size)
    config = ServeConfig(args.url, model, args.request_rate, args.max_concurrency, args.ignore_eos,
                         args.temperature, args.api_key, args.timeout, args.seed, args.num_warmups)
    result = asyncio.run(run_serve_benchmark(config, workload))
    result = {
        "benchmark": "serve",
        "config": {"base_url": args.url, "model": model,
                   "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
                   "max_concurrency": args.max_concurrency, "ignore_eos": args.ignore_eos,
                   "temperature": args.temperature, "num_warmups": args.num_warmups,
                   **_workload_config(args, workload, vocab_size)},
        **result,
        "environment": environment(),
        "command": " ".join(["inferneo", *sys.argv[1:]]),
    }
    print(format_report(result))
    if args.result_json:
        write_json(args.result_json, result)
    return 0 if result["completed"] else 1


def _cmd_batch_sizes(args: argparse.Namespace) -> int:
    from inferneo.bench.batch_sizes import format_report, plot, run_batch_sizes
    from inferneo.bench.serve import fetch_model_info
    from inferneo.bench.stats import environment, write_json
    from inferneo.bench.workload import load_dataset

    _check_positive(num_prompts=args.num_prompts, max_tokens=args.max_tokens)
    model = args.model or asyncio.run(fetch_model_info(args.url, args.api_key))["id"]
    if args.dataset:
        prompts = load_dataset(args.dataset, args.num_prompts).prompts
    else:
        prompts = [args.prompt] * args.num_prompts
    result = run_batch_sizes(args.url, model, prompts, args.batch_sizes, args.max_tokens, args.temperature,
                             args.ignore_eos, args.api_key, args.timeout)
    result = {
        "benchmark": "batch-sizes",
        "config": {"base_url": args.url, "model": model, "batch_sizes": args.batch_sizes,
                   "num_prompts": args.num_prompts, "prompt": None if args.dataset else args.prompt,
                   "dataset": args.dataset, "max_tokens": args.max_tokens, "temperature": args.temperature,
                   "ignore_eos": args.ignore_eos},
        **result,
        "environment": environment(),
        "command": " ".join(["inferneo", *sys.argv[1:]]),
    }
    print(format_report(result))
    if args.output_png:
        plot(result, args.output_png)
        print(f"plot: {args.output_png}")
    if args.output_json:
        write_json(args.output_json, result)
    return 0 if result["optimal_batch_size"] is not None else 1


def _cmd_throughput(args: argparse.Namespace) -> int:
    from inferneo.bench.stats import environment, write_json
    from inferneo.bench.throughput import format_report, run_throughput
    from inferneo.entrypoints.llm import LLM

    _check_positive(num_prompts=args.num_prompts)
    kwargs = engine_config_kwargs(args)
    derived = kwargs["max_model_len"] is None and not args.dataset
    if derived:
        # As benchmarks/offline_throughput.py does: room for the longest prompt and output, to a multiple of 64.
        kwargs["max_model_len"] = -(-(args.input_len[1] + args.output_len[1]) // 64) * 64
    try:
        llm = LLM(**kwargs)
    except ValueError as exc:
        if derived and "max_model_len" in str(exc):  # a context the user never asked for by name
            raise ValueError(f"--input-len (up to {args.input_len[1]}) plus --output-len (up to "
                             f"{args.output_len[1]}) tokens need a context of {kwargs['max_model_len']} (to a "
                             f"multiple of 64), more than the model has: {exc}") from None
        raise
    engine = {k: v for k, v in kwargs.items() if v is not None and k != "model"}
    vocab_size = args.vocab_size or llm.engine.vocab_size
    workload = _workload(args, vocab_size)
    result = run_throughput(llm, workload, args.ignore_eos, args.temperature)
    result = {
        "benchmark": "throughput",
        "config": {"model": args.model, "dtype": str(llm.engine.dtype).removeprefix("torch."),
                   "device": str(llm.engine.device), "ignore_eos": args.ignore_eos,
                   "temperature": args.temperature, "engine": engine,
                   **_workload_config(args, workload, vocab_size)},
        **result,
        "environment": environment(),
        "command": " ".join(["inferneo", *sys.argv[1:]]),
    }
    print(format_report(result))
    if args.output_json:
        write_json(args.output_json, result)
    return 0
