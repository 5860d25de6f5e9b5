"""Data-parallel serving: one ``inferneo serve --data-parallel-size N`` against N separately started servers
behind a round-robin client, and the prefix-aware router against round-robin on a shared-system-prompt workload.

Two comparisons, each run ``--rounds`` times, alternating the two sides (A B A B ...) so that a shared,
loaded machine weighs on both alike; every server is started for its run and stopped after it (on GPUs the two
sides need the same devices):

- ``w1`` (overhead of one front end over N replicas): random token prompts, ``--num-requests`` x
  ``--prompt-len`` -> ``--output-len``, ``--concurrency`` in flight. Side A: one server with
  ``--data-parallel-size N``; side B: N servers of one replica each, request ``i`` sent to server ``i % N``.
  The figure is A's output-token throughput over B's (target >= 0.95). ``--w1-baseline single`` makes side B
  one server of one replica instead: the scale-up of N replicas.
- ``shared`` (what prefix-aware routing buys): ``--num-prefixes`` system prompts of ``--prefix-len`` tokens,
  each followed by ``--suffix-len`` tokens of its own; requests of the same system prompt are spread through the
  run. Side A: ``--data-parallel-routing prefix``; side B: ``round_robin``. Reported: throughput and the prefix
  cache hit rate (hit tokens over looked-up tokens, from ``/metrics``).

On CPU (the default) each replica gets ``--num-threads``; on GPUs pass ``--devices 0,1`` (one per replica, or
``tensor_parallel_size`` each via ``--server-args``): the separate servers get ``CUDA_VISIBLE_DEVICES`` of their
own, the DP server all of them. ``--smoke`` runs everything on a tiny random model in seconds of work (a test
runs it). One JSON line per measured run and one per comparison are printed (and appended to ``--out``)::

    python benchmarks/dp_serving.py --model /models/llama-3-8b --devices 0,1 --scenario w1 \\
        --num-requests 256 --prompt-len 1024 --output-len 128 --concurrency 256
    python benchmarks/dp_serving.py --model /models/llama-3-8b --devices 0,1 --scenario shared
    python benchmarks/dp_serving.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from inferneo.bench.serve import ServeConfig, make_stream_client, stream_completion, summarize_results
from inferneo.bench.stats import environment
from inferneo.bench.workload import TOKEN_MARGIN, Workload, random_workload
from inferneo.testing.server import RemoteServer

SERVED_NAME = "bench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="the model every server loads (required unless --smoke); "
                   "'tiny': a tiny random Llama built here (what --smoke uses)")
    p.add_argument("--scenario", choices=("w1", "shared", "all"), default="all")
    p.add_argument("--data-parallel-size", type=int, default=2)
    p.add_argument("--devices", default=None, help="GPU ids for the replicas, e.g. 0,1 (default: CPU)")
    p.add_argument("--server-args", default="", help="more flags for every server (one string)")
    p.add_argument("--num-threads", type=int, default=1, help="torch threads per replica on CPU")
    p.add_argument("--w1-baseline", choices=("separate", "single"), default="separate",
                   help="w1's side B: N separate servers behind a round-robin client, or one server of one "
                   "replica (the scale-up figure)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--num-prefixes", type=int, default=None, help="shared: system prompts (default requests/4)")
    p.add_argument("--prefix-len", type=int, default=256)
    p.add_argument("--suffix-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="alternating A/B runs of each comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--out", default=None, help="append the JSON lines here too")
    p.add_argument("--smoke", action="store_true", help="a tiny random model and a tiny workload (CPU)")
    args = p.parse_args(argv)
    if args.smoke:
        # one request at a time: which requests find their system prompt cached is then set by the routing
        # alone (two in flight, a request could arrive before its prefix's first request had filled the cache)
        args.num_requests, args.prompt_len, args.output_len, args.concurrency = 8, 32, 4, 1
        args.prefix_len, args.suffix_len, args.rounds = 48, 8, 1
        args.server_args = (args.server_args + " --kv-cache-memory 16MiB --max-model-len 256").strip()
        args.model = args.model or "tiny"
    elif args.model is None:
        p.error("--model is required (or --smoke)")
    return args


# ---- workloads ------------------------------------------------------------------------------------------------


def shared_prefix_workload(args: argparse.Namespace, vocab_size: int) -> Workload:
    """``num_prefixes`` system prompts, each shared by about ``num_requests / num_prefixes`` requests, shuffled."""
    rng = random.Random(args.seed)
    num_prefixes = args.num_prefixes or max(1, args.num_requests // 4)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(TOKEN_MARGIN, vocab_size - TOKEN_MARGIN) for _ in range(n)]

    prefixes = [tokens(args.prefix_len) for _ in range(num_prefixes)]
    order = [i % num_prefixes for i in range(args.num_requests)]
    rng.shuffle(order)
    return Workload([prefixes[k] + tokens(args.suffix_len) for k in order], [args.output_len] * args.num_requests)


# ---- servers and load ---------------------------------------------------------------------------------------


def start_servers(args: argparse.Namespace, model: str, side: str) -> list[RemoteServer]:
    """``side``: ``dp`` (one server of N replicas, prefix routing), ``dp_round_robin``, ``separate`` (N servers)
    or ``single`` (one server of one replica)."""
    base = ["--served-model-name", SERVED_NAME, "--disable-access-log", *shlex.split(args.server_args)]
    if not args.devices:
        base += ["--device", "cpu", "--num-threads", str(args.num_threads)]
    n = args.data_parallel_size
    if side in ("dp", "dp_round_robin"):
        routing = "prefix" if side == "dp" else "round_robin"
        env = {"CUDA_VISIBLE_DEVICES": args.devices} if args.devices else None
        return [RemoteServer(model, *base, "--data-parallel-size", str(n), "--data-parallel-routing", routing,
                             env=env, startup_timeout=args.startup_timeout)]
    devices = args.devices.split(",") if args.devices else []
    per = len(devices) // n if devices else 0
    servers: list[RemoteServer] = []
    try:
        for i in range(1 if side == "single" else n):
            env = {"CUDA_VISIBLE_DEVICES": ",".join(devices[i * per:(i + 1) * per])} if devices else None
            servers.append(RemoteServer(model, *base, env=env, startup_timeout=args.startup_timeout))
    except BaseException:
        for server in servers:
            server.close()
        raise
    return servers


def prefix_counters(servers: list[RemoteServer]) -> tuple[float, float]:
    """(hit tokens, looked-up tokens) summed over the servers' ``/metrics``."""
    hits = queries = 0.0
    for server in servers:
        for line in httpx.get(server.url("/metrics"), timeout=30).text.splitlines():
            if line.startswith("inferneo:prefix_cache_hits_total{"):
                hits += float(line.rsplit(" ", 1)[1])
            elif line.startswith("inferneo:prefix_cache_queries_total{"):
                queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


async def drive(servers: list[RemoteServer], workload: Workload, concurrency: int) -> dict[str, Any]:
    """Stream the workload, request ``i`` to server ``i % len(servers)``, at most ``concurrency`` in flight."""
    configs = [ServeConfig(s.base_url, SERVED_NAME, ignore_eos=True) for s in servers]
    clients = [make_stream_client(s.base_url, None, 3600.0, concurrency) for s in servers]
    for client in clients:
        await client.__aenter__()
    try:
        for config, client in zip(configs, clients, strict=True):  # warm-up, untimed
            warm = await stream_completion(client, config, workload.prompts[0][:8], 2)
            if not warm.ok:
                raise RuntimeError(f"the warm-up request failed: {warm.error}")
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int):
            async with gate:
                k = i % len(servers)
                return await stream_completion(clients[k], configs[k], workload.prompts[i], workload.output_lens[i])

        loop = asyncio.get_running_loop()
        start = loop.time()
        results = await asyncio.gather(*(one(i) for i in range(len(workload))))
        duration = loop.time() - start
    finally:
        for client in clients:
            await client.__aexit__(None, None, None)
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[0]}")
    return summarize_results(results, duration)


def measure(args: argparse.Namespace, model: str, side: str, workload: Workload) -> dict[str, Any]:
    servers = start_servers(args, model, side)
    try:
        hits0, queries0 = prefix_counters(servers)
        figures = asyncio.run(drive(servers, workload, args.concurrency))
        hits1, queries1 = prefix_counters(servers)
    finally:
        for server in servers:
            server.close()
    figures["prefix_hit_rate"] = (hits1 - hits0) / (queries1 - queries0) if queries1 > queries0 else 0.0
    return figures


def compare(args: argparse.Namespace, model: str, name: str, sides: tuple[str, str], workload: Workload,
            emit) -> dict[str, Any]:
    """Alternate the two sides ``args.rounds`` times; the ratio of their summed output-token throughputs."""
    totals = {side: [] for side in sides}
    for round_index in range(args.rounds):
        for side in sides if round_index % 2 == 0 else sides[::-1]:
            figures = measure(args, model, side, workload)
            totals[side].append(figures)
            emit({"comparison": name, "side": side, "round": round_index, **_headline(figures)})
    a, b = (sum(f["output_throughput"] for f in totals[s]) / len(totals[s]) for s in sides)
    summary = {"comparison": name, "a": sides[0], "b": sides[1], "a_output_tok_s": a, "b_output_tok_s": b,
               "ratio_a_over_b": a / b if b else None,
               "a_prefix_hit_rate": sum(f["prefix_hit_rate"] for f in totals[sides[0]]) / args.rounds,
               "b_prefix_hit_rate": sum(f["prefix_hit_rate"] for f in totals[sides[1]]) / args.rounds}
    emit(summary)
    return summary


def _headline(figures: dict[str, Any]) -> dict[str, Any]:
    keys = ("completed", "duration_s", "request_throughput", "output_throughput", "mean_ttft_ms",
            "median_ttft_ms", "mean_tpot_ms", "prefix_hit_rate")
    return {k: figures[k] for k in keys if k in figures}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    header = {"benchmark": "dp_serving", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "data_parallel_size": args.data_parallel_size, "devices": args.devices,
              "server_args": args.server_args, "environment": environment(),
              "argv": sys.argv[1:]}

    def emit(record: dict[str, Any]) -> None:
        record = {**header, **record} if not lines else record
        lines.append(record)
        text = json.dumps(record)
        print(text, flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(text + "\n")

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model == "tiny":
            from inferneo.testing.tiny_models import make_tiny_checkpoint

            model = str(Path(scratch) / "tiny")
            make_tiny_checkpoint(Path(model), "llama")
        vocab_size = json.loads((Path(model) / "config.json").read_text())["vocab_size"] \
            if (Path(model) / "config.json").exists() else 32000
        if args.scenario in ("w1", "all"):
            w1 = random_workload(args.num_requests, (args.prompt_len, args.prompt_len),
                                 (args.output_len, args.output_len), args.seed, vocab_size)
            compare(args, model, f"w1_dp_vs_{args.w1_baseline}", ("dp", args.w1_baseline), w1, emit)
        if args.scenario in ("shared", "all"):
            compare(args, model, "shared_prefix_vs_round_robin", ("dp", "dp_round_robin"),
                    shared_prefix_workload(args, vocab_size), emit)
    return lines


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
