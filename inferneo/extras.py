"""Which optional parts of Inferneo are installed, and the ``inferneo`` command's entry point that says so.

``pip install inferneo`` is the client alone (httpx, pydantic): ``InferneoClient``, ``inferneo.batching`` and the
commands that talk to a server. ``pip install "inferneo[engine]"`` adds what runs a model in this process
(torch, transformers, the HTTP server, ...): ``LLM``, ``inferneo serve``, ``inferneo generate``, ``inferneo chat``.
"""

from __future__ import annotations

import importlib.util
import sys

# Import names of the engine extra's packages (pyproject.toml's optional-dependencies "engine").
ENGINE_MODULES = ("torch", "transformers", "tokenizers", "safetensors", "gguf", "numpy", "jinja2", "psutil",
                  "fastapi", "uvicorn", "prometheus_client")
ENGINE_HINT = 'pip install "inferneo[engine]"'


def missing_engine_modules() -> list[str]:
    """The engine extra's modules that cannot be found (without importing any of them)."""
    return [name for name in ENGINE_MODULES if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    """``inferneo ...``: the command line, with a clear message instead of a traceback when a command needs the
    engine extra and it is not installed."""
    try:
        from inferneo.cli import main as cli_main

        return cli_main(argv)
    except ModuleNotFoundError as exc:
        root = (exc.name or "").partition(".")[0]
        if root not in ENGINE_MODULES:
            raise
        args = sys.argv[1:] if argv is None else argv
        command = next((a for a in args if a in ("generate", "chat", "serve", "batch", "bench")), "this command")
        print(f"inferneo: error: '{command}' runs a model in this process and needs the engine extra "
              f"({root} is not installed): {ENGINE_HINT}", file=sys.stderr)
        return 1
