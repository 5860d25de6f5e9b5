"""Sending batch requests over HTTP (to a server, or to the server app in this process) with retries.

What may succeed if sent again is retried with capped exponential backoff and jitter, waiting at least what a
``Retry-After`` header asks for: connection errors, timeouts, 408, 409, 429 and 5xx, as ``InferneoClient`` retries
them. A failure that says the server is away rather than that this request failed (refused, reset, closed before
answering, 429, 502, 503: a server restarting, draining, or with its queue full; not a 503 for a request that ran past
the server's ``--request-timeout``) is retried for as long as the server
has given no answer to any of the job's requests for less than ``retry_window`` seconds (and at least
``max_retries`` times), so a job rides through a rolling restart of its server, and a request turned away while the
server answers the job's others keeps waiting for a slot. Past that, :class:`ServerUnreachableError` (or
:class:`ServerBusyError` for a 429 / 503) stops the batch: the line stays undone for the rerun instead of getting a
record that only says the server was down or busy. A timeout or another 5xx after ``max_retries`` retries is that
request's answer (a failed record). A 401 stops the batch at once (:class:`ServerAuthError`): the key is wrong
for every line, not this one.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from inferneo.client._base import (
    error_message,
    is_outage_answer,
    is_outage_error,
    is_retryable_status,
    normalize_base_url,
)

BUSY_STATUSES = frozenset({429, 503})  # overloaded or unavailable: the same request may succeed later
MAX_RETRY_AFTER = 120.0
DEFAULT_RETRY_WINDOW = 300.0  # a rolling restart of a server takes 30-120 s


class ServerUnreachableError(RuntimeError):
    """No answer from the server after every retry."""


class ServerBusyError(ServerUnreachableError):
    """The server still answered 429 (queue full) or 503 (unavailable) after every retry."""


class ServerAuthError(ServerUnreachableError):
    """The server refused the job's API key (401): no request of the job can succeed, so none gets a record."""


@dataclass(slots=True)
class Reply:
    """The server's final answer to one request; ``body`` is the parsed JSON (or the text when it is not JSON)."""

    status_code: int
    request_id: str | None
    body: Any


class Sender:
    """POSTs JSON bodies through ``client`` (its ``base_url`` set), retrying what is worth retrying.

    ``max_retries`` bounds the retries of a request that failed on its own (a timeout, a 500); a server that is
    away (connection errors, 429, 502, 503) is waited for until it has answered none of this sender's requests for
    ``retry_window`` seconds (0: give up after ``max_retries`` retries, as for the rest). Waits double from
    ``backoff`` up to ``max_backoff`` seconds, with jitter. ``notify``, if given, is called with a line of text when
    the server stops answering (a connection error, 502 or 503 past the first retries) and when it answers again.
    """

    def __init__(self, client: httpx.AsyncClient, max_retries: int = 5, backoff: float = 0.5,
                 max_backoff: float = 10.0, retry_window: float = DEFAULT_RETRY_WINDOW,
                 notify: Callable[[str], None] | None = None) -> None:
        if not retry_window >= 0:
            raise ValueError(f"retry_window must be >= 0 seconds, got {retry_window}")
        self.client = client
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.retry_window = retry_window
        self.num_retries = 0
        self.num_answered = 0  # final answers other than outages: the server is making progress
        self._last_answer = time.monotonic()  # when the server last gave a request of this sender its answer
        self.notify = notify
        self._away_since: float | None = None  # when notify was told the server stopped answering

    async def post(self, url: str, body: dict[str, Any]) -> Reply:
        """The final reply to ``POST url``; raises ServerUnreachableError, or returns a 408 reply for a timeout."""
        attempt = 0
        failing_since = 0.0  # when this request's first attempt failed
        while True:
            retry_after = None
            try:
                response = await self.client.post(url, json=body)
            except httpx.TransportError as exc:
                failing_since = failing_since or time.monotonic()
                if not is_outage_error(exc):  # a read or write timeout: this request is slow, the server is there
                    if attempt >= self.max_retries:
                        return Reply(408, None, {"error": {"message": f"no answer in time after {attempt + 1} "
                                                                      f"attempts: {exc!r}", "type": "timeout",
                                                           "param": None, "code": "timeout"}})
                else:
                    if attempt >= 1:
                        self._tell_away(type(exc).__name__)
                    if self._give_up(attempt, failing_since):
                        self._away_since = None  # the job stops and says why
                        raise ServerUnreachableError(
                            f"cannot reach the server at {self.client.base_url} after {attempt + 1} attempts in "
                            f"{time.monotonic() - failing_since:.0f} s: {exc!r}") from exc
            else:
                status = response.status_code
                failing_since = failing_since or time.monotonic()
                if is_outage_answer(response):
                    if status != 429 and attempt >= 1:  # 429 is a busy server, not one that is away
                        self._tell_away(f"{status} {error_message(response.text, 120) or response.reason_phrase}")
                    if self._give_up(attempt, failing_since):
                        self._away_since = None
                        reason = error_message(response.text) or response.reason_phrase
                        error = ServerBusyError if status in BUSY_STATUSES else ServerUnreachableError
                        raise error(f"the server at {self.client.base_url} still answered {status} ({reason}) "
                                    f"after {attempt + 1} attempts in {time.monotonic() - failing_since:.0f} s")
                elif status == 401:  # the job's key, not this line: stop before every line records the 401
                    reason = error_message(response.text) or response.reason_phrase
                    raise ServerAuthError(f"the server at {self.client.base_url} refused the API key (401: {reason}); "
                                          "give the right one with --api-key or $INFERNEO_API_KEY")
                elif not is_retryable_status(status) or attempt >= self.max_retries:
                    self.num_answered += 1
                    self._last_answer = time.monotonic()
                    if self._away_since is not None:
                        self._tell(f"the server at {self.client.base_url} answers again, after "
                                   f"{self._last_answer - self._away_since:.0f} s away")
                        self._away_since = None
                    return _reply(response)
                retry_after = response.headers.get("retry-after")
            attempt += 1
            self.num_retries += 1
            await asyncio.sleep(self._delay(attempt - 1, retry_after))

    def _tell_away(self, reason: str) -> None:
        if self._away_since is None:
            self._away_since = time.monotonic()
            self._tell(f"the server at {self.client.base_url} does not answer ({reason}); waiting for it up to "
                       f"{self.retry_window:.0f} s (--retry-window) before stopping")

    def _tell(self, message: str) -> None:
        if self.notify is not None:
            self.notify(message)

    def _give_up(self, attempt: int, failing_since: float) -> bool:
        """Whether a request whose ``attempt``-th retry (0-based) found the server away stops waiting: once its
        retries are used up and the server has answered none of this sender's requests for ``retry_window``."""
        if attempt < self.max_retries:
            return False
        return time.monotonic() - max(failing_since, self._last_answer) >= self.retry_window

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = min(self.max_backoff, self.backoff * 2.0 ** min(attempt, 32)) * random.uniform(0.5, 1.0)
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
