"""Graceful shut-down that keeps answering: on SIGTERM/SIGINT the server drains instead of going dark at once.

While draining, the listener stays open: new requests (and ``/health``) get 503 with ``Retry-After`` in the
OpenAI error shape, so load balancers and clients retry elsewhere, while the requests already in flight run to
their end. Once none is left, or after the grace period, uvicorn's own shut-down runs (and aborts whatever is still
open when its graceful timeout ends). A second signal stops at once.

The same server also stops by itself once its engine has died: from then on ``/health`` and new requests get 503
(the engine refuses them), and after ``engine_death_exit_s`` seconds uvicorn shuts down and ``exit_code`` is 1, so
a supervisor sees a failure and restarts the process instead of keeping a server that can never serve again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time

import uvicorn

from inferneo.entrypoints.openai.errors import error_body
from inferneo.entrypoints.openai.guards import route_path

logger = logging.getLogger(__name__)

_RETRY_AFTER = "5"
_DEAD_ENGINE_SHUTDOWN_S = 5.0  # after an engine death nothing in flight can finish: don't wait long for it


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
                                         code="shutting_down", path=route_path(scope))).encode()
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
    """A uvicorn server whose first exit signal starts a drain of at most ``grace`` seconds, and which stops by
    itself ``engine_death_exit_s`` seconds after ``engine`` reports a fatal error (never, if negative).

    ``exit_code`` is 1 once the engine has died while serving, 0 otherwise.
    """

    def __init__(self, config: uvicorn.Config, state: DrainState, grace: float, engine=None,
                 engine_death_exit_s: float = 2.0) -> None:
        super().__init__(config)
        self.state = state
        self.grace = grace
        self.engine = engine
        self.engine_death_exit_s = engine_death_exit_s
        self.exit_code = 0
        self._exit_at: float | None = None  # when the server stops because its engine died

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

    async def on_tick(self, counter: int) -> bool:
        # uvicorn's main loop calls this every 0.1 s (it is where uvicorn itself checks ``should_exit``): checking
        # the engine here costs one attribute read per tick and needs no task or thread of our own.
        self._watch_engine()
        return await super().on_tick(counter)

    def _watch_engine(self) -> None:
        if self.engine is None:
            return
        if self._exit_at is None:
            error = self.engine.dead_error
            if error is None:
                return
            self.exit_code = 1
            delay = self.engine_death_exit_s
            if delay < 0:
                self._exit_at = math.inf
                logger.error("the engine has died (%r): /health and new requests get 503 until the server is "
                             "stopped (INFERNEO_ENGINE_DEATH_EXIT_S is negative)", error)
                return
            self._exit_at = time.monotonic() + delay
            logger.error("the engine has died (%r): /health and new requests get 503; the server exits with "
                         "status 1 in %.1f s", error, delay)
        if time.monotonic() >= self._exit_at and not self.should_exit:
            self.should_exit = True
            timeout = self.config.timeout_graceful_shutdown
            self.config.timeout_graceful_shutdown = (_DEAD_ENGINE_SHUTDOWN_S if timeout is None
                                                     else min(timeout, _DEAD_ENGINE_SHUTDOWN_S))
