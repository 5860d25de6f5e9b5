"""Retries, against a scripted HTTP server in this process: ``Retry-After`` (seconds and HTTP dates) is honoured,
408/409/429/5xx and lost connections are retried with backoff, other 4xx never; a mid-stream error event raises."""

from __future__ import annotations

import asyncio
import email.utils
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from inferneo.client import (
    APIConnectionError,
    APIError,
    AsyncInferneoClient,
    BadRequestError,
    InferneoClient,
    InternalServerError,
    NotFoundError,
    RateLimitError,
)
from inferneo.client._base import backoff_seconds, retry_after_seconds
from inferneo.testing.server import free_port

COMPLETION = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "text": "ok", "finish_reason": "stop", "logprobs": None}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def error(status: int, message: str = "nope", **headers: str) -> tuple[int, dict[str, str], bytes]:
    body = {"error": {"message": message, "type": "x", "param": None, "code": None}}
    return status, headers, json.dumps(body).encode()


def ok(body: dict = COMPLETION) -> tuple[int, dict[str, str], bytes]:
    return 200, {}, json.dumps(body).encode()


class ScriptedServer:
    """Answers each request with the next scripted reply (status, headers, body), and records when each came."""

    def __init__(self, *replies: tuple[int, dict[str, str], bytes]) -> None:
        self.replies = list(replies)
        self.arrivals: list[float] = []
        script = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                script.arrivals.append(time.monotonic())
                status, headers, body = script.replies.pop(0) if script.replies else error(500, "script ran out")
                self.send_response(status)
                headers = {"Content-Type": "application/json", **headers}
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]


def test_429_with_retry_after_waits_then_succeeds():
    with ScriptedServer(error(429, "queue full", **{"Retry-After": "1"}), ok()) as srv:
        client = InferneoClient(srv.url, max_retries=2)
        start = time.monotonic()
        out = client.completions.create(model="m", prompt="x")
        elapsed = time.monotonic() - start
    assert out.choices[0].text == "ok" and len(srv.arrivals) == 2
    assert 0.95 <= srv.gaps()[0] < 2.0 and elapsed < 3


def test_retry_after_as_an_http_date_and_503():
    when = email.utils.formatdate(time.time() + 2, usegmt=True)  # whole seconds: waits between 1 and 2 s
    with ScriptedServer(error(503, "busy", **{"Retry-After": when}), ok()) as srv:
        assert InferneoClient(srv.url, max_retries=1).completions.create(prompt="x").choices[0].text == "ok"
    assert 0.9 <= srv.gaps()[0] < 2.6


def test_async_client_honours_retry_after():
    async def main(url):
        async with AsyncInferneoClient(url, max_retries=2) as client:
            return await client.completions.create(prompt="x")

    with ScriptedServer(error(429, **{"Retry-After": "1"}), ok()) as srv:
        assert asyncio.run(main(srv.url)).choices[0].text == "ok"
    assert 0.95 <= srv.gaps()[0] < 2.0


@pytest.mark.parametrize("status", [408, 409, 500, 502])
def test_retryable_statuses_back_off_and_give_up_typed(status):
    with ScriptedServer(*[error(status)] * 3) as srv, pytest.raises(APIError) as info:
        InferneoClient(srv.url, max_retries=2).completions.create(prompt="x")
    assert info.value.status_code == status and len(srv.arrivals) == 3
    if status >= 500:
        assert isinstance(info.value, InternalServerError)
    first, second = srv.gaps()
    assert 0.35 <= first <= 0.9 and 0.7 <= second <= 1.6 and second > first  # 0.5 s, 1 s, less <= 25 % jitter


@pytest.mark.parametrize(("status", "kind"), [(400, BadRequestError), (404, NotFoundError)])
def test_other_4xx_are_never_retried(status, kind):
    with ScriptedServer(error(status, **{"Retry-After": "0"}), ok()) as srv, pytest.raises(kind):
        InferneoClient(srv.url, max_retries=5).completions.create(prompt="x")
    assert len(srv.arrivals) == 1


def test_max_retries_zero_raises_the_429_at_once():
    with ScriptedServer(error(429, **{"Retry-After": "5"}), ok()) as srv:
        start = time.monotonic()
        with pytest.raises(RateLimitError):
            InferneoClient(srv.url, max_retries=0).completions.create(prompt="x")
    assert time.monotonic() - start < 1 and len(srv.arrivals) == 1


def test_connection_errors_are_retried_with_backoff():
    client = InferneoClient(f"http://127.0.0.1:{free_port()}", max_retries=2)
    start = time.monotonic()
    with pytest.raises(APIConnectionError):
        client.models.list()
    assert 1.1 <= time.monotonic() - start < 3  # 0.5 s + 1 s of backoff, less jitter


def test_retry_window_waits_out_a_server_that_is_away():
    """Past max_retries, what says the server is away (429, 502, 503, a refused connection) is retried until
    retry_window seconds after the first failure, as inferneo batch's --retry-window; a 500 is not."""
    away = [error(503, "starting", **{"Retry-After": "0"}), error(502), error(429, **{"Retry-After": "0"})] * 2
    with ScriptedServer(*away, ok()) as srv:
        client = InferneoClient(srv.url, max_retries=1, retry_window=30)
        assert client.completions.create(prompt="x").choices[0].text == "ok" and len(srv.arrivals) == 7
        assert client.with_options(timeout=5).retry_window == 30
    with ScriptedServer(*away, ok()) as srv, pytest.raises(InternalServerError):
        InferneoClient(srv.url, max_retries=1).completions.create(prompt="x")  # no window: as before
    assert len(srv.arrivals) == 2
    timed_out = 503, {"Retry-After": "0"}, json.dumps({"error": {"message": "slow", "code": "request_timeout"}}).encode()
    with ScriptedServer(timed_out, timed_out, ok()) as srv, pytest.raises(InternalServerError):
        InferneoClient(srv.url, max_retries=1, retry_window=30).completions.create(prompt="x")  # this request's own
    assert len(srv.arrivals) == 2
    with ScriptedServer(error(500), error(500), ok()) as srv, pytest.raises(InternalServerError):
        InferneoClient(srv.url, max_retries=1, retry_window=30).completions.create(prompt="x")
    assert len(srv.arrivals) == 2
    start = time.monotonic()
    with pytest.raises(APIConnectionError):
        InferneoClient(f"http://127.0.0.1:{free_port()}", max_retries=0, retry_window=1.2).models.list()
    assert 1.2 <= time.monotonic() - start < 4
    with pytest.raises(ValueError, match="retry_window"):
        InferneoClient(retry_window=-1)


def test_async_client_retry_window():
    async def main(url):
        async with AsyncInferneoClient(url, max_retries=0, retry_window=30) as client:
            return await client.completions.create(prompt="x")

    with ScriptedServer(error(503, **{"Retry-After": "0"}), error(503, **{"Retry-After": "0"}), ok()) as srv:
        assert asyncio.run(main(srv.url)).choices[0].text == "ok"


def test_error_event_in_a_stream_raises():
    chunk = dict(COMPLETION, choices=[{"index": 0, "text": "par", "finish_reason": None}])
    events = (f"data: {json.dumps(chunk)}\n\n"
              'data: {"error": {"message": "engine failed", "type": "server_error", "param": null, '
              '"code": "engine_error"}}\n\ndata: [DONE]\n\n').encode()
    with ScriptedServer((200, {"Content-Type": "text/event-stream"}, events)) as srv:
        stream = InferneoClient(srv.url).completions.create(prompt="x", stream=True)
        pieces = []
        with pytest.raises(APIError) as info:
            for c in stream:
                pieces.append(c.choices[0].text)
    assert pieces == ["par"] and info.value.code == "engine_error" and stream.closed


def test_retry_after_parsing_and_backoff_bounds():
    assert retry_after_seconds({"retry-after": "2"}) == 2
    assert retry_after_seconds({"retry-after": "1.5"}) == 1.5
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert retry_after_seconds({"retry-after": "3600"}) == 60  # capped
    assert retry_after_seconds({"retry-after": "-3"}) == 0
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None
    date = email.utils.formatdate(1000.0, usegmt=True)
    assert retry_after_seconds({"retry-after": date}, now=990.0) == 10
    for retries, top in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (10, 8.0)]:
        delays = [backoff_seconds(retries) for _ in range(50)]
        assert all(0.75 * top <= d <= top for d in delays)
        assert len(set(delays)) > 1  # jitter
