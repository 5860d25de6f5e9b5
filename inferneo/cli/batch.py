"""``inferneo batch``: run an OpenAI batch file (JSON lines) against a server, or a model in this process."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from inferneo.config import add_engine_args, engine_config_kwargs

DEFAULT_CONCURRENCY = 64
DEFAULT_RETRY_WINDOW = 300.0  # as inferneo.batch.sender's, which this module does not import at start-up


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


def add_parser(subparsers) -> None:
    """Register ``inferneo batch``."""
    parser = subparsers.add_parser(
        "batch", help="run a file of OpenAI batch requests (resumable)",
        description="Run each line of an OpenAI batch file ({custom_id, method, url, body}; url /v1/completions "
        "or /v1/chat/completions) and write one OpenAI batch output record per line. Against --url it talks "
        "to a running server; otherwise it loads --model (default: the bundled model) into this process and "
        "answers through the server's own code. Interrupted (Ctrl-C, kill -9) and rerun with the same "
        "arguments, it resumes where it stopped: each input line is written exactly once in total.")
    parser.add_argument("-i", "--input", required=True, help="the requests, one JSON object a line")
    parser.add_argument("-o", "--output", required=True, help="where the records go (appended; resumed if present)")
    parser.add_argument("--url", default=None, help="a running server, e.g. http://localhost:8000 "
                        "(default: run --model in this process)")
    parser.add_argument("--api-key", default=os.environ.get("INFERNEO_API_KEY"),
                        help="bearer key for --url (default $INFERNEO_API_KEY)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help=f"requests in flight (default {DEFAULT_CONCURRENCY} for --url, the engine's "
                        "--max-num-seqs in-process)")
    parser.add_argument("--max-retries", type=int, default=5,
                        help="retries of a request on timeouts, 408, 409 and 5xx (default 5); a 500 or a timeout "
                        "after them is that line's failed record")
    parser.add_argument("--retry-window", type=_seconds, default=DEFAULT_RETRY_WINDOW, metavar="SECONDS",
                        help="how long to wait for a server that is away (connection refused or reset, 429, 502, "
                        "503: restarting, draining, queue full) before stopping the job, counted from its last "
                        f"answer (default {DEFAULT_RETRY_WINDOW:.0f}; 0: give up after --max-retries). A stopped job "
                        "resumes when run again")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one answer (default 600)")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard what the output file holds instead of resuming into it")
    parser.add_argument("--retry-failed", action="store_true",
                        help="send again the lines the server answered with an error (a 4xx or 5xx: a model it did "
                        "not serve then, an engine failure); their records are replaced. Lines that could not be "
                        "sent keep theirs")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="in-process: the model name(s) request bodies may use (default: the --model value)")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="answer only shard I of N (0-based; the lines whose number n has (n-1) %% N == I), "
                        "e.g. a Slurm array or Kubernetes indexed job's index; give each shard its own --output")
    cluster = parser.add_argument_group("on a Ray cluster (pip install 'inferneo[ray]')")
    cluster.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                         help="answer with engine replicas on a Ray cluster: ADDRESS (e.g. ray://head:10001 or "
                         "auto), or without one $RAY_ADDRESS or a new local cluster")
    cluster.add_argument("--replicas", type=int, default=1, help="--ray: engine replicas (default 1)")
    cluster.add_argument("--replica-cpus", type=float, default=1.0, help="--ray: CPUs Ray reserves a replica")
    cluster.add_argument("--replica-gpus", type=float, default=None,
                         help="--ray: GPUs Ray reserves a replica (default: --tensor-parallel-size on a GPU "
                         "device, else 0)")
    cluster.add_argument("--batch-size", type=int, default=16, help="--ray: lines sent to a replica at a time")
    add_engine_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``inferneo batch``; returns the exit status (0: every line has its record)."""
    from inferneo.batch.job import BatchJob, Shard
    from inferneo.batch.output import OutputFileError
    from inferneo.batch.sender import ServerUnreachableError

    if args.url and args.model:
        print("inferneo batch: error: give --url (a running server) or --model (run it here), not both",
              file=sys.stderr)
        return 2
    if args.concurrency is not None and args.concurrency < 1:
        print("inferneo batch: error: --concurrency must be at least 1", file=sys.stderr)
        return 2
    if args.ray is not None and args.url:
        print("inferneo batch: error: give --url (a running server) or --ray (replicas on a cluster), not both",
              file=sys.stderr)
        return 2
    try:
        shard = None if args.shard is None else Shard.parse(args.shard)
        job = BatchJob(args.input, args.output, overwrite=args.overwrite, shard=shard,
                       retry_failed=args.retry_failed)
    except ValueError as exc:
        print(f"inferneo batch: error: {exc}", file=sys.stderr)
        return 2
    except OutputFileError as exc:
        print(f"inferneo batch: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an input that cannot be read (the output's are OutputFileErrors)
        print(f"inferneo batch: error: cannot read the input {args.input}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    with job:
        if job.repaired_bytes:
            print(f"inferneo batch: cut {job.repaired_bytes} bytes of an unfinished last line off {args.output}",
                  file=sys.stderr)
        if job.output.retried:
            print(f"inferneo batch: sending {job.output.retried} lines the server answered with an error again "
                  "(--retry-failed)", file=sys.stderr)
        if job.num_done:
            print(f"inferneo batch: resuming: {job.num_done} of {job.total} lines already done", file=sys.stderr)
        if job.num_done == job.total:
            print(f"inferneo batch: nothing to do: {args.output} has a record for every line", file=sys.stderr)
            return 0
        if args.ray is not None:
            return _run_on_ray(job, args)
        server = None
        try:
            if not args.url:
                from inferneo.batch.in_process import InProcessServer
                from inferneo.startup_heap import freeze_startup_heap

                engine_kwargs = engine_config_kwargs(args)
                model = engine_kwargs.pop("model")
                server = InProcessServer(model, args.served_model_name, **engine_kwargs)
                freeze_startup_heap("inferneo batch")
            try:
                summary = asyncio.run(_run(job, args, server))
            except KeyboardInterrupt:
                print(f"\ninferneo batch: interrupted; {job.num_done} of {job.total} lines are in {args.output}. "
                      "Run the same command again to resume.", file=sys.stderr)
                return 130
            except OutputFileError as exc:
                print(f"inferneo batch: error: {exc}", file=sys.stderr)
                return 2
            except (ServerUnreachableError, OSError) as exc:
                print(f"inferneo batch: error: {exc}\n{job.num_done} of {job.total} lines are in {args.output}; "
                      "run the same command again to resume.", file=sys.stderr)
                return 1
        finally:
            if server is not None:
                server.shutdown()
    return _report(job, args, summary)


def _report(job, args: argparse.Namespace, summary) -> int:
    failed = summary.failed + summary.invalid
    print(f"inferneo batch: {job.total} lines, {summary.already_done + summary.written} records in {args.output} "
          f"({summary.succeeded} ok, {failed} failed this run{', see their error field' if failed else ''})",
          file=sys.stderr)
    return 0 if summary.complete else 1


async def _run(job, args: argparse.Namespace, server):
    from inferneo.batch.sender import Sender, remote_client

    if server is None:
        concurrency = args.concurrency or DEFAULT_CONCURRENCY
        client = remote_client(args.url, args.api_key, args.timeout, concurrency)
    else:
        concurrency = args.concurrency or server.max_num_seqs
        client = server.client(args.timeout)
    async with client as http:
        sender = Sender(http, args.max_retries, retry_window=args.retry_window, notify=_notice)
        return await job.run(sender, concurrency, args.progress)


def _notice(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"inferneo batch: {message}", file=sys.stderr)  # above the progress bar, if there is one


def _run_on_ray(job, args: argparse.Namespace) -> int:
    import ray
    import ray.data

    from inferneo.batch.on_ray import run_on_ray
    from inferneo.integrations.ray import EngineProcessorConfig, ReplicaResources

    engine_kwargs = engine_config_kwargs(args)
    model = engine_kwargs.pop("model")
    gpus = args.replica_gpus
    if gpus is None:
        gpus = float(engine_kwargs.get("tensor_parallel_size") or 1) if str(engine_kwargs.get("device")).startswith("cuda") else 0.0
    try:
        config = EngineProcessorConfig(
            model=model, engine_options=engine_kwargs,
            served_model_name=args.served_model_name[0] if args.served_model_name else None,
            batch_size=args.batch_size, replicas=args.replicas,
            resources=ReplicaResources(num_cpus=args.replica_cpus, num_gpus=gpus))
    except ValueError as exc:
        print(f"inferneo batch: error: {exc}", file=sys.stderr)
        return 2
    ray.init(address=args.ray or None, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = args.progress
    try:
        summary = run_on_ray(job, config, args.progress)
    except KeyboardInterrupt:
        print(f"\ninferneo batch: interrupted; {job.num_done} of {job.total} lines are in {args.output}. "
              "Run the same command again to resume.", file=sys.stderr)
        return 130
    finally:
        ray.shutdown()
    return _report(job, args, summary)
