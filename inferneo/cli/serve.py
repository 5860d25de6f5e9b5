"""``inferneo serve``: the OpenAI-compatible HTTP server over a model loaded here."""

from __future__ import annotations

import argparse

from inferneo.cli.config_file import add_config_arg
from inferneo.config import EngineConfig, add_engine_args
from inferneo.entrypoints.openai.guards import add_guard_args, api_keys_from_env, guards_from_args
from inferneo.entrypoints.openai.http_options import add_http_args, http_options_from_args
from inferneo.entrypoints.openai.reasoning import REASONING_PARSERS
from inferneo.entrypoints.openai.response_options import add_response_args, response_options_from_args
from inferneo.entrypoints.openai.tool_parsers import TOOL_CALL_PARSERS
from inferneo.json_text import json_object_option

DEFAULT_MAX_QUEUED_REQUESTS = 1024


def add_parser(subparsers) -> None:
    """Register ``inferneo serve``: server flags, the guards' flags, then the engine flags."""
    parser = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    parser.add_argument("model_tag", nargs="?", default=None,
                        help="the model (as --model; given both, this one is served)")
    add_config_arg(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                   "0.0.0.0 serves other hosts; ignored with --uds)")
    g.add_argument("--port", type=_port, default=8000)
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) clients use; the first is the main one (default: the model argument)")
    g.add_argument("--api-key", nargs="+", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (any of these keys; default $INFERNEO_API_KEY)")
    g.add_argument("--max-queued-requests", type=int, default=DEFAULT_MAX_QUEUED_REQUESTS,
                   help="refuse new requests (429 + Retry-After) while this many sequences wait for a batch slot "
                   f"(default {DEFAULT_MAX_QUEUED_REQUESTS}; 0 for no limit)")
    g.add_argument("--tool-call-parser", choices=[*TOOL_CALL_PARSERS, "none"], default=None,
                   help="how tool calls are read from answers to tool_choice 'auto': hermes (<tool_call> blocks: "
                   "Hermes, Qwen), llama3_json (Llama 3.1's JSON calls), mistral ([TOOL_CALLS]), qwen3_coder "
                   "(Qwen3-Coder's XML calls), pythonic ([f(x=1)]), deepseek_v3 / deepseek_v31 (DeepSeek-V3 and R1 / "
                   "V3.1), openai (gpt-oss), none (they stay in content); default: "
                   "chosen from the model's chat template")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted so that vLLM command lines run unchanged: tool_choice 'auto' is always served, "
                   "read by --tool-call-parser or the parser the chat template implies")
    g.add_argument("--reasoning-parser", choices=list(REASONING_PARSERS), default=None,
                   help="split a reasoning model's thinking (<think> ... </think>) from its answers: returned as "
                   "'reasoning' (and 'reasoning_content'), with tool calls and structured output applied to the "
                   "answer after it (qwen3, deepseek_r1, deepseek_v3, glm45, mimo; seed_oss: <seed:think>; "
                   "mistral: Magistral's [THINK]); openai_gptoss reads gpt-oss's harmony channels "
                   "(analysis: reasoning; final: content; to=functions.NAME: tool calls) (default: not split)")
    g.add_argument("--default-chat-template-kwargs", type=_json_object, default=None, metavar="JSON",
                   help="the chat template's variables for requests that do not set them in chat_template_kwargs, "
                   'as JSON, e.g. \'{"enable_thinking": false}\' (a request\'s own keys win)')
    g.add_argument("--shutdown-timeout", type=_non_negative_seconds, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM/SIGINT before they are aborted")
    g.add_argument("--disable-access-log", "--disable-uvicorn-access-log", action="store_true",
                   dest="disable_access_log", help="do not log each HTTP request (uvicorn's access log; "
                   "--disable-uvicorn-access-log is vLLM's name)")
    g.add_argument("--files-dir", default=None, metavar="DIR",
                   help="where OpenAI's Files and Batch APIs (/v1/files, /v1/batches) keep uploaded batch inputs and "
                   "their results (default: a temporary folder, removed at shut-down)")
    g.add_argument("--vllm-metric-names", action="store_true",
                   help="/metrics also gives every metric under the name vLLM gives it (vllm:num_requests_running, "
                   "vllm:time_to_first_token_seconds, ...), so that dashboards, alerts and autoscalers written for "
                   "vLLM read them unchanged")
    g.add_argument("--enable-dev-endpoints", action="store_true",
                   help="serve POST /sleep?level=N, POST /wake_up, GET /is_sleeping and POST /reset_prefix_cache, "
                   "which reinforcement-learning trainers call between rollouts (vLLM serves them with "
                   "VLLM_SERVER_DEV_MODE=1); off by default: anyone who can reach them can stop the server serving")
    g.add_argument("--disable-log-stats", action="store_true",
                   help="do not log the engine's throughput, queue and cache statistics every 10 s "
                   "(INFERNEO_LOG_STATS_INTERVAL_S) while it has work")
    g.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH", type=_lora_module,
                   help="LoRA adapters (PEFT folders) to serve, each as name=path or as vLLM's JSON "
                   "'{\"name\": ..., \"path\": ..., \"base_model_name\": ...}' (the adapter's parent in /v1/models); "
                   "a request picks one by its name in 'model' (needs --enable-lora)")
    add_guard_args(g)  # limits, --metrics-public, --allowed-origins, --log-requests
    add_http_args(g)  # TLS, --root-path, --uvicorn-log-level, --uds, docs, X-Request-Id, /load
    add_response_args(g)  # --response-role, --return-tokens-as-token-ids, --enable-force-include-usage
    g.add_argument("--enable-prompt-tokens-details", action="store_true",
                   help="accepted so that vLLM command lines run unchanged: usage.prompt_tokens_details.cached_tokens "
                   "(the prompt tokens the prefix cache served) is always reported")
    g.add_argument("--engine-in-process", "--disable-frontend-multiprocessing", action="store_true",
                   dest="engine_in_process",
                   help="run the engine core in a thread of the server process instead of a child process "
                   "(less memory and start-up time; slower under load, as HTTP and the model share one GIL)")
    add_engine_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inferneo.entrypoints.openai.api_server import serve

    names = args.served_model_name or []
    if len(set(names)) != len(names):
        raise ValueError(f"--served-model-name lists a name twice: {' '.join(names)}")
    if args.api_key is not None and not all(args.api_key):
        raise ValueError("--api-key got an empty key (which would switch authentication off); give a non-empty key, "
                         "or leave the flag out to serve without one")

    config = EngineConfig.from_cli_args(args, model=args.model_tag or args.model)
    return serve(
        config, args.served_model_name, args.host, args.port, api_keys_from_env(args.api_key),
        max_queued_requests=args.max_queued_requests or None, log_level=args.log_level,
        access_log=not args.disable_access_log, shutdown_timeout=args.shutdown_timeout,
        engine_in_process=args.engine_in_process, guards=guards_from_args(args),
        tool_call_parser=args.tool_call_parser, lora_modules=args.lora_modules,
        reasoning_parser=args.reasoning_parser, http=http_options_from_args(args),
        log_stats=not args.disable_log_stats, response_options=response_options_from_args(args),
        default_chat_template_kwargs=args.default_chat_template_kwargs, vllm_metric_names=args.vllm_metric_names,
        files_dir=args.files_dir, dev_endpoints=args.enable_dev_endpoints,
    )


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a TCP port is a number 1-65535; got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1-65535; got {port}")
    return port


def _non_negative_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0; got {text}")
    return seconds


def _json_object(text: str) -> dict:
    try:
        return json_object_option(text, "default_chat_template_kwargs")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _lora_module(text: str):
    from inferneo.lora.registry import LoraModule

    try:
        return LoraModule.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
