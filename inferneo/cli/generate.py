"""``inferneo generate`` and ``inferneo chat``: a model in this process, prompts or a conversation from the
command line."""

from __future__ import annotations

import argparse

from inferneo.config import add_engine_args, engine_config_kwargs


def add_parsers(subparsers) -> None:
    """Register ``inferneo generate`` and ``inferneo chat``."""
    gen = subparsers.add_parser("generate", help="complete one or more prompts offline")
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--echo", action="store_true", help="print the prompt before its continuation")
    add_engine_args(gen)
    _add_sampling_args(gen)
    gen.set_defaults(func=run_generate)

    chat = subparsers.add_parser("chat", help="chat with the model offline (interactive without --message)")
    chat.add_argument("--message", "-m", action="append", help="a user message; repeat for several turns")
    chat.add_argument("--system", default=None, help="a system prompt")
    add_engine_args(chat)
    _add_sampling_args(chat)
    chat.set_defaults(func=run_chat)


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


def _llm(args: argparse.Namespace):
    from inferneo.entrypoints.llm import LLM

    return LLM(**engine_config_kwargs(args))


def run_generate(args: argparse.Namespace) -> int:
    params = _sampling_params(args)  # a bad flag is refused before the model loads
    llm = _llm(args)
    outputs = llm.generate(args.prompts, params, use_tqdm=False)
    for prompt, output in zip(args.prompts, outputs, strict=True):
        if len(args.prompts) > 1:
            print(f"--- {prompt!r}")
        print(prompt + output.outputs[0].text if args.echo else output.outputs[0].text)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    params = _sampling_params(args)  # a bad flag is refused before the model loads
    llm = _llm(args)
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
