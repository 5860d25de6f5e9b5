"""API keys, CORS, request logging, the request timeout and the default bind address, on real servers.

One server at a time: first a locked-down one (two keys, defaults otherwise), then one that opens ``/metrics``,
allows one origin, logs requests and has a short request timeout.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import signal
import time
from types import SimpleNamespace

import httpx
import pytest

from inferneo.cli.main import build_parser
from inferneo.entrypoints.openai import guards as guards_module
from inferneo.entrypoints.openai.guards import GuardMiddleware, ServerGuards, api_keys_from_env
from inferneo.testing.server import RemoteServer

KEY, OTHER_KEY = "sk-inferneo-KEY-0123456789", "sk-second-KEY-abcdef"
WRONG_KEY = "sk-wrong-GUESS-555"
SECRET_PROMPT = "PROMPT-SECRET-4242 tell me"
GOOD_ORIGIN, EVIL_ORIGIN = "http://good.example", "http://evil.example"

PROTECTED = [
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/tiny", None),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
    ("POST", "/tokenize", {"prompt": "hi"}),
    ("POST", "/detokenize", {"tokens": [5]}),
    ("GET", "/metrics", None),
    ("GET", "/v1/unknown", None),
]
PUBLIC = ["/health", "/version", "/openapi.json", "/docs", "/redoc"]  # the docs pages are on by default


def call(base: str, method: str, path: str, body=None, headers=None) -> httpx.Response:
    return httpx.request(method, base + path, json=body, headers=headers, timeout=60)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def locked(tiny_llama_dir):
    """Two keys, access log on, everything else default."""
    srv = RemoteServer(tiny_llama_dir, "--served-model-name", "tiny", "--api-key", KEY, OTHER_KEY,
                       "--max-model-len", "256", "--kv-cache-memory", "16MiB", "--num-threads", "1")
    yield srv
    srv.close(signal.SIGKILL)


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[p for _, p, _ in PROTECTED])
def test_every_protected_route_needs_a_valid_key(locked, method, path, body):
    for headers in (None, bearer(WRONG_KEY), {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
                    bearer(KEY + "x"), bearer(KEY[:-1]), {"Authorization": "Bearer"}):
        r = call(locked.base_url, method, path, body, headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.headers["WWW-Authenticate"] == "Bearer"
    for key in (KEY, OTHER_KEY):
        r = call(locked.base_url, method, path, body, bearer(key))
        assert r.status_code == (404 if path == "/v1/unknown" else 200), r.text
    assert call(locked.base_url, method, path, body, {"authorization": f"bearer {KEY}"}).status_code != 401


@pytest.mark.parametrize("path", PUBLIC)
def test_health_version_and_schema_need_no_key(locked, path):
    assert httpx.get(locked.url(path)).status_code == 200


def test_cors_is_off_by_default(locked):
    preflight = httpx.options(locked.url("/v1/models"), headers={
        "Origin": GOOD_ORIGIN, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})
    assert "access-control-allow-origin" not in preflight.headers
    r = httpx.get(locked.url("/v1/models"), headers={"Origin": GOOD_ORIGIN, **bearer(KEY)})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_keys_prompts_and_outputs_stay_out_of_the_log(locked):
    call(locked.base_url, "POST", "/v1/completions", {"prompt": "x"}, bearer(WRONG_KEY))
    r = call(locked.base_url, "POST", "/v1/completions", {"prompt": SECRET_PROMPT, "max_tokens": 8}, bearer(KEY))
    assert r.status_code == 200
    output = r.json()["choices"][0]["text"]
    call(locked.base_url, "POST", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 4}, bearer(OTHER_KEY))
    time.sleep(0.2)
    log = locked.log()
    assert "POST /v1/completions" in log  # the access log is on, and shows the route only
    for secret in (KEY, OTHER_KEY, WRONG_KEY, "PROMPT-SECRET"):
        assert secret not in log
    assert len(output.strip()) < 3 or output.strip() not in log
    assert "(API key required)" in log


def test_the_default_bind_is_loopback(locked):
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1"
    assert f"http://127.0.0.1:{locked.port}/v1" in locked.log()


# ---- no server: key sources and the constant-time comparison ---------------------------------------------------


def test_keys_come_from_flags_else_from_the_environment(monkeypatch):
    monkeypatch.setenv("INFERNEO_API_KEY", "env-one, env-two")
    assert api_keys_from_env(["flag"]) == ["flag"]
    assert api_keys_from_env(None) == ["env-one", "env-two"]
    monkeypatch.setenv("INFERNEO_API_KEY", "")
    assert api_keys_from_env([]) == []


def test_every_key_is_compared_in_constant_time(monkeypatch):
    """Each request compares the given token with every key through hmac.compare_digest, matching or not."""
    calls = []
    compare = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(guards_module.hmac, "compare_digest", counting)

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    keys = ["k1", "k2", "k3"]
    guard = GuardMiddleware(app, SimpleNamespace(api_keys=keys), ServerGuards())

    def status(token: str | None) -> int:
        headers = [] if token is None else [(b"authorization", b"Bearer " + token.encode())]
        scope = {"type": "http", "method": "GET", "path": "/v1/models", "headers": headers}
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        asyncio.run(guard(scope, receive, send))
        return sent[0]["status"]

    for token, expected in (("k1", 200), ("k3", 200), ("nope", 401), (None, 401)):
        calls.clear()
        assert status(token) == expected
        assert len(calls) == len(keys)


# ---- a second server: public metrics, one allowed origin, request logging, a short timeout ---------------------


@pytest.fixture(scope="module")
def open_server(tiny_llama_dir, locked):
    locked.close(signal.SIGKILL)  # one server at a time
    srv = RemoteServer(tiny_llama_dir, "--api-key", KEY, "--metrics-public", "--allowed-origins", GOOD_ORIGIN,
                       "--log-requests", "--request-timeout", "1.5", "--max-model-len", "2048",
                       "--kv-cache-memory", "64MiB", "--num-threads", "1", "--disable-access-log")
    yield srv
    srv.close(signal.SIGKILL)


def test_metrics_public_opens_only_metrics(open_server):
    assert httpx.get(open_server.url("/metrics")).status_code == 200
    assert httpx.get(open_server.url("/v1/models")).status_code == 401


def test_cors_allows_only_the_named_origins(open_server):
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    good = httpx.options(open_server.url("/v1/completions"), headers={"Origin": GOOD_ORIGIN, **ask})
    assert good.status_code == 200 and good.headers["access-control-allow-origin"] == GOOD_ORIGIN
    evil = httpx.options(open_server.url("/v1/completions"), headers={"Origin": EVIL_ORIGIN, **ask})
    assert evil.status_code == 400 and "access-control-allow-origin" not in evil.headers
    r = httpx.get(open_server.url("/v1/models"), headers={"Origin": GOOD_ORIGIN, **bearer(KEY)})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == GOOD_ORIGIN
    refused = httpx.get(open_server.url("/v1/models"), headers={"Origin": GOOD_ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == GOOD_ORIGIN
    r = httpx.get(open_server.url("/v1/models"), headers={"Origin": EVIL_ORIGIN, **bearer(KEY)})
    assert "access-control-allow-origin" not in r.headers


def test_log_requests_logs_prompts_but_never_keys(open_server):
    r = call(open_server.base_url, "POST", "/v1/completions", {"prompt": SECRET_PROMPT, "max_tokens": 2}, bearer(KEY))
    assert r.status_code == 200
    time.sleep(0.2)
    log = open_server.log()
    assert SECRET_PROMPT in log and '"text_completion"' in log
    assert KEY not in log


def _busy(server) -> float:
    for line in httpx.get(server.url("/metrics")).text.splitlines():
        if line.startswith("inferneo:num_requests_running"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no running gauge")


def _wait_idle(server) -> None:
    deadline = time.monotonic() + 20
    while _busy(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _busy(server) == 0, "the timed-out request still runs"


LONG = {"prompt": "go", "max_tokens": 2000, "ignore_eos": True, "n": 32, "temperature": 1}


def test_a_request_past_the_timeout_gets_503_and_its_work_stops(open_server):
    start = time.monotonic()
    r = call(open_server.base_url, "POST", "/v1/completions", LONG, bearer(KEY))
    assert time.monotonic() - start < 10
    assert r.status_code == 503, r.text[:300]
    assert r.json()["error"]["code"] == "request_timeout" and "--request-timeout" in r.json()["error"]["message"]
    assert int(r.headers["Retry-After"]) >= 1
    _wait_idle(open_server)
    assert call(open_server.base_url, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2},
                bearer(KEY)).status_code == 200


def test_a_stream_past_the_timeout_ends_with_an_error_event(open_server):
    with httpx.stream("POST", open_server.url("/v1/completions"), json={**LONG, "stream": True},
                      headers=bearer(KEY), timeout=30) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "request_timeout"
    _wait_idle(open_server)
    assert httpx.get(open_server.url("/health")).status_code == 200
