"""The ``inferneo`` command line: ``inferneo generate`` and ``inferneo chat`` (offline, in this process) and
``inferneo serve`` (the OpenAI-compatible HTTP server)."""

from __future__ import annotations

import argparse
import logging
import sys

from inferneo import cli_batch, cli_bench
from inferneo.entrypoints.openai.guards import add_guard_args


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine flags, named as vLLM names them where the concept is the same."""
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None, help="HF folder, hub id in the local HF cache, or .gguf file "
                   "(default: the bundled SmolLM2-135M-Instruct)")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder, if not the model's")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    g.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-memory", default=None, help="bytes for the KV cache, e.g. 4GiB")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights, activations and KV cache (default 0.9)")
    g.add_argument("--enforce-eager", action="store_true", help="never use CUDA graphs (decode runs eagerly)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule and queue the next step before the current one's tokens reach the host "
                        "(hides the host's per-step work behind the GPU's; default: on for CUDA, off on CPU)")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    g.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    g.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-threads", type=int, default=None, help="CPU threads for torch")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="shard the model over this many ranks (one process each; GPUs, or CPU over gloo)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    from inferneo.config import parse_memory_size

    return dict(
        tokenizer=args.tokenizer, dtype=args.dtype, device=args.device, load_format=args.load_format,
        max_model_len=args.max_model_len, block_size=args.block_size,
        kv_cache_memory=parse_memory_size(args.kv_cache_memory),
        gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=args.enable_chunked_prefill, scheduling_policy=args.scheduling_policy,
        seed=args.seed, num_threads=args.num_threads, enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        tensor_parallel_size=args.tensor_parallel_size,
    )


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (the default here) is greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed-sampling", dest="sampling_seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[])


def _sampling_params(args: argparse.Namespace):
    from inferneo.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.sampling_seed, stop=args.stop)


def _cmd_generate(args: argparse.Namespace) -> int:
    from inferneo.entrypoints.llm import LLM

    llm = LLM(args.model, **engine_kwargs(args))
    outputs = llm.generate(args.prompts, _sampling_params(args), use_tqdm=False)
    for prompt, output in zip(args.prompts, outputs, strict=True):
        if len(args.prompts) > 1:
            print(f"--- {prompt!r}")
        print(prompt + output.outputs[0].text if args.echo else output.outputs[0].text)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from inferneo.entrypoints.llm import LLM

    llm = LLM(args.model, **engine_kwargs(args))
    params = _sampling_params(args)
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    messages = args.message or []
    interactive = not messages
    while True:
        if messages:
            text = messages.pop(0)
        elif interactive:
            try:
                text = input("> ")
            except EOFError:
                return 0
        else:
            return 0
        history.append({"role": "user", "content": text})
        answer = llm.chat(history, params, use_tqdm=False)[0].outputs[0].text
        history.append({"role": "assistant", "content": answer})
        print(answer, flush=True)


def _cmd_serve(args: argparse.Namespace) -> int:
    from inferneo.entrypoints.openai.api_server import serve
    from inferneo.entrypoints.openai.guards import api_keys_from_env, guards_from_args

    api_keys = api_keys_from_env(args.api_key)
    return serve(
        engine_kwargs(args), args.model or args.model_tag, args.served_model_name, args.host, args.port, api_keys,
        args.max_queued_requests or None, log_level=args.log_level, access_log=not args.disable_access_log,
        shutdown_timeout=args.shutdown_timeout, engine_in_process=args.engine_in_process,
        guards=guards_from_args(args),
    )


def _add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_tag", nargs="?", default=None, help="the model (same as --model)")
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                   "0.0.0.0 serves other hosts)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) clients use; the first is the main one (default: the model argument)")
    g.add_argument("--api-key", nargs="+", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (any of these keys; default $INFERNEO_API_KEY)")
    g.add_argument("--max-queued-requests", type=int, default=1024,
                   help="refuse new requests (429 + Retry-After) while this many sequences wait for a batch slot "
                   "(default 1024; 0 for no limit)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM/SIGINT before they are aborted")
    g.add_argument("--disable-access-log", action="store_true", help="do not log each HTTP request")
    add_guard_args(g)  # limits, --metrics-public, --allowed-origins, --log-requests
    g.add_argument("--engine-in-process", action="store_true",
                   help="run the engine core in a thread of the server process instead of a child process "
                   "(less memory and start-up time; slower under load, as HTTP and the model share one GIL)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferneo", description="Fast LLM inference and serving")
    parser.add_argument("--log-level", default=None, help="debug, info, warning, error (default: info for "
                        "serve, warning otherwise)")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one or more prompts offline")
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--echo", action="store_true", help="print the prompt before its continuation")
    add_engine_args(gen)
    _add_sampling_args(gen)
    gen.set_defaults(func=_cmd_generate)

    chat = sub.add_parser("chat", help="chat with the model offline (interactive without --message)")
    chat.add_argument("--message", "-m", action="append", help="a user message; repeat for several turns")
    chat.add_argument("--system", default=None, help="a system prompt")
    add_engine_args(chat)
    _add_sampling_args(chat)
    chat.set_defaults(func=_cmd_chat)

    srv = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    _add_serve_args(srv)
    add_engine_args(srv)
    srv.set_defaults(func=_cmd_serve)
    cli_batch.add_parser(sub)
    cli_bench.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_level is None:
        args.log_level = "info" if args.command == "serve" else "warning"
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"inferneo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
