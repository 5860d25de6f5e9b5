"""The ``inferneo`` console script: ``generate`` and ``chat`` (offline, in this process), ``serve`` (the
OpenAI-compatible HTTP server), ``batch`` and ``bench``.

On a client-only install (no ``inferneo[engine]`` extra), a command that runs a model here ends with a message
that says what to install instead of a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from inferneo.cli import batch, bench, generate, serve
from inferneo.cli.config_file import parse_args_with_config_file
from inferneo.extras import ENGINE_HINT, ENGINE_MODULES

COMMANDS = ("generate", "chat", "serve", "batch", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferneo", description="Fast LLM inference and serving")
    parser.add_argument("--log-level", default=None, help="debug, info, warning, error (default: info for "
                        "serve, warning otherwise)")
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_parsers(sub)
    serve.add_parser(sub)
    batch.add_parser(sub)
    bench.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``inferneo ARGS``; returns the exit status."""
    try:
        return _run(argv)
    except ModuleNotFoundError as exc:
        root = (exc.name or "").partition(".")[0]
        if root not in ENGINE_MODULES:
            raise
        args = sys.argv[1:] if argv is None else argv
        command = next((a for a in args if a in COMMANDS), "this command")
        print(f"inferneo: error: '{command}' runs a model in this process and needs the engine extra "
              f"({root} is not installed): {ENGINE_HINT}", file=sys.stderr)
        return 1


def _run(argv: list[str] | None) -> int:
    args = parse_args_with_config_file(build_parser(), sys.argv[1:] if argv is None else list(argv))
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
