"""Graceful shut-down that keeps answering: on SIGTERM/SIGINT the server drains instead of going dark at once.

While draining, the listener stays open: new requests (and ``/health``) get 503 with ``Retry-After`` in the
OpenAI error shape, so load balancers and clients retry elsewhere, while the requests already in flight run to
their end. Once none is left, or after the grace period, uvicorn's own shut-down runs (and aborts whatever is still
open when its graceful timeout ends). A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import uvicorn

from inferneo.entrypoints.openai.errors import error_body

logger = logging.getLogger(__name__)

_RETRY_AFTER = "5"


class DrainState:
    """Whether the server is draining, and how many HTTP requests are in flight."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0


class DrainMiddleware:
    """Counts requests in flight; while draining, refuses new ones with 503."""

    def __init__(self, app, state: DrainState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.state.draining:
            body = json.dumps(error_body(503, "the server is shutting down; retry on another replica or later",
                                         code="shutting_down")).encode()
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"retry-after", _RETRY_AFTER.encode()),
                (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal starts a drain of at most ``grace`` seconds."""

    def __init__(self, config: uvicorn.Config, state: DrainState, grace: float) -> None:
        super().__init__(config)
        self.state = state
        self.grace = grace

    def handle_exit(self, sig, frame) -> None:
        if self.state.draining:  # a second signal: stop now
            super().handle_exit(sig, frame)
            return
        self.state.draining = True
        logger.info("shutting down: draining %d request(s) in flight (at most %.0f s); new requests get 503",
                    self.state.in_flight, self.grace)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not inside the loop: fall back to uvicorn's immediate shut-down
            super().handle_exit(sig, frame)
            return
        loop.create_task(self._drain(sig, frame))

    async def _drain(self, sig, frame) -> None:
        deadline = time.monotonic() + self.grace
        while self.state.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        super().handle_exit(sig, frame)
