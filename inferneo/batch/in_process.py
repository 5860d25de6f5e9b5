"""The OpenAI server's own app and engine in this process, reached through httpx with no socket in between.

Batch requests in-process go through exactly what a server request goes through: the same FastAPI routes,
request validation, serving code and error replies; only the transport differs (httpx's ASGI transport).
"""

from __future__ import annotations

from typing import Any

import httpx

BASE_URL = "http://inferneo.in-process"


class InProcessServer:
    """Loads a model into an ``AsyncEngine`` and wraps it in the server app (not listening on any port).

    ``engine_kwargs`` are ``EngineConfig`` fields; ``served_model_names`` are the names a request body's
    ``model`` may use (default: ``model``, or the default model's name). The engine's core loop runs in a thread
    of this process, or with ``core_in_child_process`` in a child process as under ``inferneo serve`` (the
    front end's request handling then no longer shares this process's interpreter lock with the core loop).
    """

    def __init__(self, model: str | None = None, served_model_names: list[str] | None = None,
                 core_in_child_process: bool = False, **engine_kwargs: Any) -> None:
        from inferneo.config import EngineConfig
        from inferneo.engine.async_engine import AsyncEngine
        from inferneo.entrypoints.openai.api_server import build_app
        from inferneo.entrypoints.openai.serving_common import ServerContext

        config = EngineConfig(model=model, **engine_kwargs)
        build = AsyncEngine.in_child_process if core_in_child_process else AsyncEngine.in_thread
        self.engine = build(config)
        names = served_model_names or [model or self.engine.info.model_name]
        self.context = ServerContext(self.engine, names, self.engine.info.model_path)
        self.app = build_app(self.context)
        self.max_num_seqs = config.max_num_seqs

    def client(self, timeout: float = 600.0) -> httpx.AsyncClient:
        """An httpx client whose requests this process's server app answers; starts the engine thread."""
        self.engine.start()
        # raise_app_exceptions=False: an unexpected server error comes back as its 500 reply, as over HTTP.
        transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
        return httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=timeout)

    def shutdown(self) -> None:
        """Stop the engine thread (idempotent)."""
        self.engine.shutdown()
