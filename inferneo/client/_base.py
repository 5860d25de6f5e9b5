"""The request core shared by :class:`InferneoClient` and :class:`AsyncInferneoClient`.

``_BaseClient`` decides everything that does not wait (URLs, headers, bodies, whether and how long to back off,
which exception a failure becomes); ``SyncAPIClient`` and ``AsyncAPIClient`` only send, sleep and read.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import time
import weakref
from collections.abc import Mapping
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from inferneo import __version__
from inferneo.client.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    UnsendableRequestError,
    status_error,
)
from inferneo.client.streaming import AsyncStream, Stream
from inferneo.client.types import FileContent

T = TypeVar("T", bound=BaseModel)

DEFAULT_BASE_URL = "http://localhost:8000"
DEFAULT_TIMEOUT = 600.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_MAX_RETRIES = 2
INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
MAX_RETRY_AFTER = 60.0
RETRY_STATUSES = frozenset({408, 409, 429})
# Answers that say the server is not taking requests right now (queue full, a proxy with no server behind it, starting
# or shutting down), not that this request failed: a client with a ``retry_window`` keeps retrying these, as it does
# connection errors, for that long. A rolling restart of a server takes 30-120 s.
OUTAGE_STATUSES = frozenset({429, 502, 503})

Timeout = float | httpx.Timeout | None

# The connection pools the sync clients made for themselves (not given by the caller).
_PLAIN_POOLS: weakref.WeakSet[httpx.Client] = weakref.WeakSet()


def error_message(text: str, limit: int = 300) -> str:
    """The ``error.message`` of an OpenAI-shaped error body given as text, else the start of the text (at most
    ``limit`` characters either way)."""
    try:
        return str(json.loads(text)["error"]["message"])[:limit]
    except (ValueError, KeyError, TypeError):
        return text[:limit]


def normalize_base_url(url: str) -> str:
    """``http://host:8000``, ``http://host:8000/`` and ``http://host:8000/v1`` all become ``http://host:8000/v1``."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url if url.endswith("/v1") else url + "/v1"


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The wait a response asks for (``retry-after-ms``, or ``Retry-After`` in seconds or as an HTTP date), capped
    at ``MAX_RETRY_AFTER``; ``None`` when it asks for none."""
    seconds: float | None = None
    if "retry-after-ms" in headers:
        try:
            seconds = float(headers["retry-after-ms"]) / 1000
        except ValueError:
            seconds = None
    if seconds is None and "retry-after" in headers:
        value = headers["retry-after"].strip()
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                return None
            seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds is None or seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def encode_body(body: Mapping[str, Any]) -> bytes:
    """A request body as JSON (UTF-8, compact, as httpx writes ``json=``). Raises UnsendableRequestError, naming
    the field, for a value JSON cannot carry: a lone surrogate, NaN or an infinity."""
    try:
        return _dumps(body)
    except UnicodeEncodeError:
        pass
    except ValueError as exc:
        if "float" not in str(exc):  # a circular reference: the caller's bug, not a value to name
            raise
    param, why = None, "a value JSON cannot carry"
    for key, value in body.items():
        try:
            _dumps(value)
        except UnicodeEncodeError:
            param, why = str(key), "a string with a lone surrogate (half of a UTF-16 pair, e.g. '\\ud800')"
            break
        except ValueError:
            param, why = str(key), "NaN or an infinite number, which JSON does not allow"
            break
    where = f"{param}: " if param else ""
    raise UnsendableRequestError(f"{where}the request holds {why}; it was not sent", param)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def is_retryable_status(status: int) -> bool:
    """Whether an answer with this status may succeed if sent again: 408, 409, 429 and every 5xx."""
    return status in RETRY_STATUSES or status >= 500


def is_outage_answer(response: httpx.Response) -> bool:
    """Whether a (read) answer says the server is away rather than that this request failed: 429, 502 or 503, except
    a 503 for a request that ran past the server's ``--request-timeout`` (``code: request_timeout``), which is this
    request's own failure, as a timeout is: sending it again for minutes would only time out again."""
    if response.status_code not in OUTAGE_STATUSES:
        return False
    try:
        return response.json()["error"]["code"] != "request_timeout"
    except (ValueError, KeyError, TypeError, httpx.StreamError):  # not an error object, or a body that was lost
        return True


def is_outage_error(exc: httpx.TransportError) -> bool:
    """Whether a failed attempt says the server is not there right now (refused, reset, closed before answering, no
    connection in time), as opposed to a request it is taking too long to answer (a read or write timeout)."""
    return not isinstance(exc, (httpx.ReadTimeout, httpx.WriteTimeout))


def backoff_seconds(retries_done: int) -> float:
    """Exponential backoff with jitter: 0.5 s, 1 s, 2 s, ... capped at 8 s, each shortened by up to 25 %."""
    delay = min(INITIAL_RETRY_DELAY * 2.0 ** min(retries_done, 32), MAX_RETRY_DELAY)
    return delay * (1 - 0.25 * random.random())


def _to_timeout(timeout: Timeout) -> httpx.Timeout:
    if isinstance(timeout, httpx.Timeout):
        return timeout
    if timeout is None:
        return httpx.Timeout(None, connect=DEFAULT_CONNECT_TIMEOUT)
    return httpx.Timeout(timeout, connect=min(float(timeout), DEFAULT_CONNECT_TIMEOUT))


class _BaseClient:
    def __init__(self, base_url: str | None, api_key: str | None, timeout: Timeout, max_retries: int,
                 default_headers: Mapping[str, str] | None, retry_window: float = 0.0) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0; got {max_retries}")
        if not retry_window >= 0:
            raise ValueError(f"retry_window must be >= 0 seconds; got {retry_window}")
        self.retry_window = float(retry_window)
        self.base_url = normalize_base_url(base_url or os.environ.get("INFERNEO_BASE_URL") or DEFAULT_BASE_URL)
        self.api_key = api_key if api_key is not None else os.environ.get("INFERNEO_API_KEY")
        self.timeout = timeout
        self.max_retries = max_retries
        self._default_headers = dict(default_headers or {})

    def _options(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "api_key": self.api_key, "timeout": self.timeout,
                "max_retries": self.max_retries, "default_headers": self._default_headers,
                "retry_window": self.retry_window}

    @property
    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": f"inferneo-python/{__version__}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return {**headers, **self._default_headers}

    def _build_request(self, http: httpx.Client | httpx.AsyncClient, method: str, path: str, *,
                       body: Mapping[str, Any] | None = None, query: Mapping[str, Any] | None = None,
                       headers: Mapping[str, str] | None = None, timeout: Timeout | None = None,
                       stream: bool = False, files: Mapping[str, Any] | None = None,
                       data: Mapping[str, str] | None = None) -> httpx.Request:
        """``body`` goes as JSON; ``files`` and ``data`` (httpx's) as a multipart form instead, whose file objects
        httpx reads again from their start when the request is sent again."""
        hdrs = {**self._headers, **(headers or {})}
        if stream:
            hdrs["Accept"] = "text/event-stream"
        content = None
        if body is not None:
            content = encode_body(body)
            hdrs["Content-Type"] = "application/json"
        params = None if query is None else {k: v for k, v in query.items() if v is not None}
        return http.build_request(method, self.base_url + path, content=content, files=files, data=data,
                                  params=params, headers=hdrs,
                                  timeout=_to_timeout(self.timeout if timeout is None else timeout))

    def _may_retry(self, retries_done: int, failing_since: float, outage: bool) -> bool:
        """Whether to send again after ``retries_done`` retries: while retries are left, and after that, for a
        failure that says the server is away (``outage``), until ``retry_window`` seconds after the first failure."""
        if retries_done < self.max_retries:
            return True
        return outage and time.monotonic() - failing_since < self.retry_window

    @staticmethod
    def _wait_before_retry(retries_done: int, response: httpx.Response | None) -> float:
        if response is not None:
            asked = retry_after_seconds(response.headers)
            if asked is not None:
                return asked
        return backoff_seconds(retries_done)

    @staticmethod
    def _transport_error(exc: httpx.TransportError, request: httpx.Request) -> APIConnectionError:
        if isinstance(exc, httpx.TimeoutException):
            return APITimeoutError(request)
        return APIConnectionError(f"Connection error: {exc!r}", request)

    @staticmethod
    def _parse(cast_to: type[T], response: httpx.Response) -> T:
        if issubclass(cast_to, FileContent):  # a file's bytes as they are, not JSON
            return cast_to(content=response.content)
        try:
            return cast_to.model_validate(response.json())
        except ValueError as exc:
            raise APIError(f"the server sent an answer that is not a {cast_to.__name__}: {exc}",
                           response.request) from exc


class SyncAPIClient(_BaseClient):
    """Sends requests with retries over one ``httpx.Client`` (a connection pool; safe to share between threads)."""

    def __init__(self, base_url: str | None, api_key: str | None, timeout: Timeout, max_retries: int,
                 default_headers: Mapping[str, str] | None, http_client: httpx.Client | None,
                 retry_window: float = 0.0) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, default_headers, retry_window)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(limits=httpx.Limits(max_connections=1000,
                                                                     max_keepalive_connections=100))
        if http_client is None:
            _PLAIN_POOLS.add(self._http)

    @property
    def _plain_pool(self) -> bool:
        """Whether this client sends through a connection pool a client made (its own, or shared by
        ``with_options``) rather than an ``http_client`` the caller gave (a transport of theirs)."""
        return self._http in _PLAIN_POOLS

    def request(self, method: str, path: str, cast_to: type[T], *, body: Mapping[str, Any] | None = None,
                query: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None,
                timeout: Timeout | None = None, stream: bool = False, files: Mapping[str, Any] | None = None,
                data: Mapping[str, str] | None = None) -> T | Stream[T]:
        """Send, retrying connection errors, timeouts, 408/409/429 and 5xx (connection errors, 429, 502 and 503 for
        up to ``retry_window`` seconds once the retries are used up); parse the answer as ``cast_to``."""
        request = self._build_request(self._http, method, path, body=body, query=query, headers=headers,
                                      timeout=timeout, stream=stream, files=files, data=data)
        retries_done = 0
        failing_since = 0.0  # when the first attempt failed
        while True:
            try:
                response = self._http.send(request, stream=True)
            except httpx.TransportError as exc:
                failing_since = failing_since or time.monotonic()
                if not self._may_retry(retries_done, failing_since, is_outage_error(exc)):
                    raise self._transport_error(exc, request) from exc
                time.sleep(self._wait_before_retry(retries_done, None))
                retries_done += 1
                continue
            if response.is_success:
                if stream:
                    return Stream(cast_to, response)
                try:
                    response.read()
                except httpx.TransportError as exc:
                    raise self._transport_error(exc, request) from exc
                finally:
                    response.close()
                return self._parse(cast_to, response)
            try:
                response.read()
            except httpx.TransportError:
                pass
            finally:
                response.close()
            failing_since = failing_since or time.monotonic()
            status = response.status_code
            if is_retryable_status(status) and self._may_retry(retries_done, failing_since,
                                                               is_outage_answer(response)):
                time.sleep(self._wait_before_retry(retries_done, response))
                retries_done += 1
                continue
            raise status_error(response)

    def close(self) -> None:
        """Close the connection pool (when the client created it)."""
        if self._owns_http:
            self._http.close()


class AsyncAPIClient(_BaseClient):
    """The async twin of :class:`SyncAPIClient`, over one ``httpx.AsyncClient``."""

    def __init__(self, base_url: str | None, api_key: str | None, timeout: Timeout, max_retries: int,
                 default_headers: Mapping[str, str] | None, http_client: httpx.AsyncClient | None,
                 retry_window: float = 0.0) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, default_headers, retry_window)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(limits=httpx.Limits(max_connections=1000,
                                                                          max_keepalive_connections=100))

    async def request(self, method: str, path: str, cast_to: type[T], *, body: Mapping[str, Any] | None = None,
                      query: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None,
                      timeout: Timeout | None = None, stream: bool = False, files: Mapping[str, Any] | None = None,
                      data: Mapping[str, str] | None = None) -> T | AsyncStream[T]:
        """Send, retrying connection errors, timeouts, 408/409/429 and 5xx (connection errors, 429, 502 and 503 for
        up to ``retry_window`` seconds once the retries are used up); parse the answer as ``cast_to``."""
        request = self._build_request(self._http, method, path, body=body, query=query, headers=headers,
                                      timeout=timeout, stream=stream, files=files, data=data)
        retries_done = 0
        failing_since = 0.0  # when the first attempt failed
        while True:
            try:
                response = await self._http.send(request, stream=True)
            except httpx.TransportError as exc:
                failing_since = failing_since or time.monotonic()
                if not self._may_retry(retries_done, failing_since, is_outage_error(exc)):
                    raise self._transport_error(exc, request) from exc
                await asyncio.sleep(self._wait_before_retry(retries_done, None))
                retries_done += 1
                continue
            if response.is_success:
                if stream:
                    return AsyncStream(cast_to, response)
                try:
                    await response.aread()
                except httpx.TransportError as exc:
                    raise self._transport_error(exc, request) from exc
                finally:
                    await response.aclose()
                return self._parse(cast_to, response)
            try:
                await response.aread()
            except httpx.TransportError:
                pass
            finally:
                await response.aclose()
            failing_since = failing_since or time.monotonic()
            status = response.status_code
            if is_retryable_status(status) and self._may_retry(retries_done, failing_since,
                                                               is_outage_answer(response)):
                await asyncio.sleep(self._wait_before_retry(retries_done, response))
                retries_done += 1
                continue
            raise status_error(response)

    async def close(self) -> None:
        """Close the connection pool (when the client created it)."""
        if self._owns_http:
            await self._http.aclose()
