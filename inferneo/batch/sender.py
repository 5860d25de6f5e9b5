"""Sending batch requests over HTTP (to a server, or to the server app in this process) with retries.

Connection errors, timeouts, 408, 429 and 5xx are retried with exponential backoff and jitter, waiting at least
what a ``Retry-After`` header asks for; other answers are final. A request that still cannot reach the server
after its retries raises :class:`ServerUnreachableError`, and one the server still turns away as overloaded
(429, 503) while none of the other requests got an answer either raises :class:`ServerBusyError`: either stops
the batch (the line stays undone for the rerun) instead of writing a record that only says the server was down or
busy. A request turned away while others are answered keeps waiting for a slot: the server is busy, not stuck. A timeout or another 5xx after the retries is
that request's answer (a failed record).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx

from inferneo.client._base import error_message, normalize_base_url

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
BUSY_STATUSES = frozenset({429, 503})  # overloaded or unavailable: the same request may succeed later
MAX_RETRY_AFTER = 120.0


class ServerUnreachableError(RuntimeError):
    """No answer from the server after every retry."""


class ServerBusyError(ServerUnreachableError):
    """The server still answered 429 (queue full) or 503 (unavailable) after every retry."""


@dataclass(slots=True)
class Reply:
    """The server's final answer to one request; ``body`` is the parsed JSON (or the text when it is not JSON)."""

    status_code: int
    request_id: str | None
    body: Any


class Sender:
    """POSTs JSON bodies through ``client`` (its ``base_url`` set), retrying what is worth retrying."""

    def __init__(self, client: httpx.AsyncClient, max_retries: int = 5, backoff: float = 0.5,
                 max_backoff: float = 30.0) -> None:
        self.client = client
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.num_retries = 0
        self.num_answered = 0  # final answers other than 429/503: the server is making progress

    async def post(self, url: str, body: dict[str, Any]) -> Reply:
        """The final reply to ``POST url``; raises ServerUnreachableError, or returns a 408 reply for a timeout."""
        attempt = 0
        answered_before = self.num_answered
        while True:
            try:
                response = await self.client.post(url, json=body)
            except httpx.TimeoutException as exc:
                if attempt >= self.max_retries:
                    return Reply(408, None, {"error": {"message": f"no answer in time after {attempt + 1} "
                                                                  f"attempts: {exc!r}", "type": "timeout",
                                                       "param": None, "code": "timeout"}})
                wait = self._delay(attempt, None)
            except httpx.TransportError as exc:
                if attempt >= self.max_retries:
                    raise ServerUnreachableError(
                        f"cannot reach the server at {self.client.base_url} after {attempt + 1} attempts: "
                        f"{exc!r}") from exc
                wait = self._delay(attempt, None)
            else:
                status = response.status_code
                if status in BUSY_STATUSES and attempt >= self.max_retries:
                    if self.num_answered == answered_before:
                        reason = error_message(response.text) or response.reason_phrase
                        raise ServerBusyError(f"the server at {self.client.base_url} still answered {status} "
                                              f"({reason}) after {attempt + 1} attempts")
                    # Turned away while other requests were answered: the server is busy with them (more
                    # requests in flight than it queues), not stuck. Keep waiting (at the longest backoff) for a
                    # slot, and give up only after a round of retries in which no request got an answer.
                    answered_before = self.num_answered
                    self.num_retries += 1
                    await asyncio.sleep(self._delay(attempt, response.headers.get("retry-after")))
                    continue
                if status not in RETRY_STATUSES or attempt >= self.max_retries:
                    if status not in BUSY_STATUSES:
                        self.num_answered += 1
                    return _reply(response)
                wait = self._delay(attempt, response.headers.get("retry-after"))
            attempt += 1
            self.num_retries += 1
            await asyncio.sleep(wait)

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)
        asked = parse_retry_after(retry_after)
        return max(delay, asked) if asked is not None else delay


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), capped; None if absent or bad."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _reply(response: httpx.Response) -> Reply:
    try:
        body: Any = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = response.text[:2000]
    request_id = response.headers.get("x-request-id")
    if request_id is None and isinstance(body, dict) and isinstance(body.get("id"), str):
        request_id = body["id"]
    return Reply(response.status_code, request_id, body)


def server_root(url: str) -> str:
    """The server's root URL (the batch lines name ``/v1/...`` paths) from what a user may give, as
    ``InferneoClient`` takes it: ``host:8000``, ``http://host:8000/`` or ``http://host:8000/v1``."""
    return normalize_base_url(url).removesuffix("/v1")


def remote_client(base_url: str, api_key: str | None = None, timeout: float = 600.0,
                  max_connections: int = 64) -> httpx.AsyncClient:
    """An HTTP client for a running server (``base_url`` with or without ``/v1``): pooled connections for
    ``max_connections`` requests in flight."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(base_url=server_root(base_url), headers=headers, limits=limits,
                             timeout=httpx.Timeout(timeout, connect=30.0))
