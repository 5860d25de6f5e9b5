"""Which optional parts of Inferneo are installed.

``pip install inferneo`` is the client alone (httpx, pydantic): ``InferneoClient``, ``inferneo.batching`` and the
commands that talk to a server. ``pip install "inferneo[engine]"`` adds what runs a model in this process
(torch, transformers, the HTTP server, ...): ``LLM``, ``inferneo serve``, ``inferneo generate``, ``inferneo chat``.
The ``inferneo`` command (``inferneo.cli.main``) uses ``ENGINE_MODULES`` and ``ENGINE_HINT`` to say what to
install when a command needs the engine extra.
"""

from __future__ import annotations

import importlib.util

# Import names of the engine extra's packages (pyproject.toml's optional-dependencies "engine").
ENGINE_MODULES = ("torch", "transformers", "tokenizers", "safetensors", "gguf", "numpy", "jinja2", "psutil",
                  "fastapi", "uvicorn", "prometheus_client", "msgspec")
ENGINE_HINT = 'pip install "inferneo[engine]"'


def missing_engine_modules() -> list[str]:
    """The engine extra's modules that cannot be found (without importing any of them)."""
    return [name for name in ENGINE_MODULES if importlib.util.find_spec(name) is None]

