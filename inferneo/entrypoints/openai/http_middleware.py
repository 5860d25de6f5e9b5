"""Two small ASGI middlewares of the HTTP layer, each switched on by a vLLM ``serve`` flag:
``RequestIdMiddleware`` (``--enable-request-id-headers``) and ``LoadMiddleware`` with ``ServerLoad``
(``--enable-server-load-tracking``, read at ``GET /load``)."""

from __future__ import annotations

import uuid
from typing import Any

# The routes whose requests count as server load: those that run the model (vLLM's list, less the audio and pooling
# routes this server does not have, plus /v1/responses and Anthropic's /v1/messages).
LOAD_PATHS = frozenset(
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/messages",
        "/v1/embeddings",
        "/score",
        "/v1/score",
        "/rerank",
        "/v1/rerank",
        "/v2/rerank",
        "/classify",
        "/v1/classify",
        "/invocations",
    }
)


class RequestIdMiddleware:
    """Every response carries ``X-Request-Id``: the request's own ``X-Request-Id`` when it sent one, else a new
    random id (32 hex digits), as vLLM's ``--enable-request-id-headers`` does. Refusals (401, 413, 429, ...) carry
    it too when this middleware wraps the guards."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == b"x-request-id"), None)
        request_id = given if given else uuid.uuid4().hex.encode()

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class ServerLoad:
    """How many requests to the model's routes (``LOAD_PATHS``) are in flight; ``tracking`` off keeps it at 0
    (vLLM's ``GET /load`` then answers ``{"server_load": 0}``)."""

    def __init__(self, tracking: bool = False) -> None:
        self.tracking = tracking
        self.in_flight = 0


class LoadMiddleware:
    """Counts the requests to ``LOAD_PATHS`` in ``load.in_flight`` from their arrival until their response (a stream
    too) has been sent, or the client left. Installed inside the guards, it counts only admitted requests."""

    def __init__(self, app: Any, load: ServerLoad, route_path: Any) -> None:
        self.app = app
        self.load = load
        self.route_path = route_path  # scope -> the path routes match (without --root-path)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.load.tracking or self.route_path(scope) not in LOAD_PATHS:
            await self.app(scope, receive, send)
            return
        self.load.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.load.in_flight -= 1
