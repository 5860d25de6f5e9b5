"""The development endpoints that reinforcement-learning trainers call between rollouts (vLLM serves them when
``VLLM_SERVER_DEV_MODE=1``; here ``--enable-dev-endpoints``), installed only when the server is started with
that flag (404 otherwise):

- ``POST /reset_prefix_cache``: forget every cached prefix block no running request holds; answers
  ``{"reset": true}``, or ``false`` when running requests hold cached blocks (they stay cached).
- ``POST /sleep?level=1``: free the KV cache (level 1; on CUDA the weights go to host memory) or drop the weights
  too (level 2: they must be loaded again before requests are served). Requests get 503 with ``Retry-After``
  while the engine sleeps. 409 while requests are unfinished (it sleeps between requests only).
- ``POST /wake_up``: end sleep mode.
- ``GET /is_sleeping``: ``{"is_sleeping": bool}``.

The rules are the engine core's (``inferneo.engine.engine_control``); its refusals reach the client as
``errors.to_api_error`` makes them: 400 for a bad level, 409 while busy.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from fastapi import FastAPI
from fastapi.responses import Response

from inferneo.entrypoints.openai.errors import to_api_error
from inferneo.entrypoints.openai.serving_common import ServerContext

T = TypeVar("T")


async def _answer(call: Awaitable[T]) -> T:
    """The engine's answer, or its refusal as the client's error (``to_api_error``)."""
    try:
        return await call
    except Exception as exc:
        raise to_api_error(exc) from None


def install_dev_routes(app: FastAPI, ctx: ServerContext) -> None:
    """Add the development endpoints (see the module docstring) to ``app``."""
    engine = ctx.engine

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> dict[str, bool]:
        return {"reset": await _answer(engine.reset_prefix_cache())}

    @app.post("/sleep")
    async def sleep(level: int = 1) -> Response:
        await _answer(engine.sleep(level))
        return Response(status_code=200)

    @app.post("/wake_up")
    async def wake_up() -> Response:
        await _answer(engine.wake_up())
        return Response(status_code=200)

    @app.get("/is_sleeping")
    async def is_sleeping() -> dict[str, bool]:
        return {"is_sleeping": engine.is_sleeping}
