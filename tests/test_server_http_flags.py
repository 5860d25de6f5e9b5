"""More of vLLM's HTTP-layer serve flags on one real server that listens on a Unix domain socket (``--uds``):
CORS (``--allowed-methods``, ``--allowed-headers``, ``--allow-credentials``, vLLM's JSON-list form),
``--disable-fastapi-docs``, ``--enable-request-id-headers``, ``--enable-server-load-tracking`` with ``GET /load``
and ``--disable-uvicorn-access-log``. Their defaults are checked on the servers of test_security.py."""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest

from inferneo.testing.server import RemoteServer, port_in_use

KEY = "sk-http-flags-KEY"
ORIGIN = "http://good.example"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    socket_path = tmp_path_factory.mktemp("uds") / "inferneo.sock"
    with RemoteServer(
        tiny_llama_dir,
        "--served-model-name",
        "tiny",
        "--kv-cache-memory",
        "32MiB",
        "--api-key",
        KEY,
        "--allowed-origins",
        f'["{ORIGIN}"]',
        "--allowed-methods",
        "GET",
        "POST",
        "DELETE",
        "--allowed-headers",
        '["Authorization", "Content-Type", "X-Trace"]',
        "--allow-credentials",
        "--disable-fastapi-docs",
        "--enable-request-id-headers",
        "--enable-server-load-tracking",
        "--disable-uvicorn-access-log",
        uds=socket_path,
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(transport=server.transport(), base_url=server.base_url, timeout=60) as client:
        yield client


def test_uds_serves_the_openai_client_and_not_the_port(server):
    assert socket_path_exists(server.uds) and port_in_use(server.port) is None  # --port is ignored
    client = openai.OpenAI(
        base_url=server.url("/v1"),
        api_key=KEY,
        max_retries=0,
        http_client=httpx.Client(transport=server.transport()),
    )
    answer = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
    )
    assert answer.choices[0].message.role == "assistant" and answer.usage.completion_tokens >= 1
    assert f"serving the OpenAI API at http+unix:{server.uds}" in server.log()


def socket_path_exists(path: str) -> bool:
    import stat
    from pathlib import Path

    return stat.S_ISSOCK(Path(path).stat().st_mode)


def test_cors_preflight_takes_the_allowed_methods_headers_and_credentials(http):
    ask = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "DELETE",
        "Access-Control-Request-Headers": "authorization,x-trace",
    }
    preflight = http.options("/v1/models", headers=ask)
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert preflight.headers["access-control-allow-credentials"] == "true"
    assert {m.strip() for m in preflight.headers["access-control-allow-methods"].split(",")} == {
        "GET",
        "POST",
        "DELETE",
    }
    assert "x-trace" in preflight.headers["access-control-allow-headers"].lower()
    refused = http.options("/v1/models", headers={**ask, "Access-Control-Request-Method": "PUT"})
    assert refused.status_code == 400  # not an allowed method
    refused = http.options("/v1/models", headers={**ask, "Access-Control-Request-Headers": "x-other"})
    assert refused.status_code == 400  # not an allowed header
    simple = http.get("/v1/models", headers={"Origin": ORIGIN, **AUTH})
    assert simple.status_code == 200 and simple.headers["access-control-allow-credentials"] == "true"


def test_disable_fastapi_docs(http):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert http.get(path, headers=AUTH).status_code == 404, path


HEX_ID = re.compile(r"[0-9a-f]{32}")


def test_request_id_headers(http):
    mine = http.get("/v1/models", headers={**AUTH, "X-Request-Id": "trace-42"})
    assert mine.status_code == 200 and mine.headers["x-request-id"] == "trace-42"
    first, second = http.get("/health"), http.get("/health")
    assert (
        HEX_ID.fullmatch(first.headers["x-request-id"])
        and first.headers["x-request-id"] != second.headers["x-request-id"]
    )
    refused = http.get("/v1/models", headers={"X-Request-Id": "no-key"})  # the guards' refusals carry it too
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "no-key"
    with http.stream(
        "POST",
        "/v1/completions",
        headers={**AUTH, "X-Request-Id": "stream-7"},
        json={"prompt": "hi", "max_tokens": 2, "stream": True},
    ) as streamed:
        assert streamed.headers["x-request-id"] == "stream-7"
        streamed.read()


def test_load_counts_the_requests_in_flight(server, http):
    def load() -> int:
        return http.get("/load", headers=AUTH).json()["server_load"]

    def wait_load(value: int) -> int:
        deadline = time.monotonic() + 20
        while load() != value and time.monotonic() < deadline:
            time.sleep(0.05)
        return load()

    assert http.get("/load", headers=AUTH).json() == {"server_load": 0}
    long = {"max_tokens": 1900, "ignore_eos": True, "stream": True, "n": 8}
    with (
        httpx.Client(transport=server.transport(), base_url=server.base_url, timeout=60) as other,
        http.stream("POST", "/v1/completions", headers=AUTH, json={"prompt": "hello", **long}) as first,
    ):
        first_lines = first.iter_lines()  # kept: a dropped line iterator closes the connection
        next(first_lines)  # started; the answer (megabytes) is not read, so the server cannot finish it
        assert load() == 1  # /load itself and the other routes do not count
        with other.stream(
            "POST",
            "/v1/chat/completions",
            headers=AUTH,
            json={"messages": [{"role": "user", "content": "hi"}], **long},
        ) as second:
            second_lines = second.iter_lines()
            next(second_lines)
            assert load() == 2
        assert wait_load(1) == 1  # the client left the second stream: no longer in flight
    assert wait_load(0) == 0
    short = http.post("/v1/completions", headers=AUTH, json={"prompt": "hi", "max_tokens": 2})
    assert short.status_code == 200 and load() == 0  # a whole answer counts until it is sent
    refused = http.post("/v1/completions", json={"prompt": "hi"})
    assert refused.status_code == 401 and load() == 0


def test_disable_uvicorn_access_log(server, http):
    assert http.get("/v1/models", headers=AUTH).status_code == 200
    time.sleep(0.3)
    assert '"GET /v1/models HTTP/1.1" 200' not in server.log()
