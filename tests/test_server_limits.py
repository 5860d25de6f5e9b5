"""A real server with an API key and a bounded queue: 401s, 429 + Retry-After under a burst, and a graceful
SIGTERM (in-flight stream finishes, exit status 0)."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import openai
import pytest

from inferneo.testing.server import RemoteServer

KEY = "sk-test-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    srv = RemoteServer(tiny_llama_dir, "--api-key", KEY, "other-key", "--max-queued-requests", "1",
                       "--max-num-seqs", "1", "--kv-cache-memory", "32MiB", "--num-threads", "1",
                       "--disable-access-log")
    yield srv
    srv.close(signal.SIGKILL)


def assert_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_missing_or_wrong_key_gives_401_and_health_stays_open(server):
    body = {"prompt": "hi", "max_tokens": 2}
    error = assert_error(httpx.post(server.url("/v1/completions"), json=body), 401)
    assert error["code"] == "invalid_api_key"
    assert_error(httpx.post(server.url("/v1/completions"), json=body, headers={"Authorization": "Bearer nope"}), 401)
    assert_error(httpx.post(server.url("/v1/completions"), json=body, headers={"Authorization": KEY}), 401)
    assert_error(httpx.get(server.url("/v1/models")), 401)
    assert httpx.get(server.url("/health")).status_code == 200
    assert httpx.post(server.url("/v1/completions"), json=body, headers=AUTH).status_code == 200
    other = httpx.post(server.url("/v1/completions"), json=body, headers={"Authorization": "Bearer other-key"})
    assert other.status_code == 200


def test_openai_client_with_the_key(server):
    client = openai.OpenAI(base_url=server.url("/v1"), api_key=KEY, max_retries=0)
    assert client.completions.create(model=client.models.list().data[0].id, prompt="hi", max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url("/v1"), api_key="wrong", max_retries=0).models.list()


def test_full_queue_gives_429_with_retry_after(server):
    async def main():
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as http:
            async def one(i):
                return await http.post(server.url("/v1/completions"), json={
                    "prompt": f"burst {i}", "max_tokens": 60, "ignore_eos": True})

            return await asyncio.gather(*(one(i) for i in range(8)))

    replies = asyncio.run(main())
    statuses = sorted(r.status_code for r in replies)
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    for r in replies:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert assert_error(r, 429)["code"] == "queue_full"
        else:
            assert r.json()["usage"]["completion_tokens"] == 60
    assert httpx.post(server.url("/v1/completions"), json={"prompt": "after", "max_tokens": 2},
                      headers=AUTH).status_code == 200


def test_a_fresh_prompt_with_n_choices_reports_no_cached_tokens(server):
    """With one sequence running at a time, the n choices of a request run one after another, and each after the
    first finds the prompt's blocks that the first computed. The prompt counts once in the usage, and so do its
    cached tokens: none of a fresh prompt (the siblings' hits are not a cache the client could have had), the
    prompt's full blocks when it is sent again."""

    def cached(body: dict) -> int:
        body = {"max_tokens": 2, "ignore_eos": True, **body}
        r = httpx.post(server.url("/v1/completions"), json=body, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        if not body.get("stream"):
            return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        events = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
        return events[-1]["usage"]["prompt_tokens_details"]["cached_tokens"]

    for stream in (False, True):
        prompt = [10 + stream + 2 * i for i in range(64)]  # 4 blocks of 16, not sent before
        extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
        assert cached({"prompt": prompt, "n": 3, **extra}) == 0
        again = cached({"prompt": prompt, "n": 3, **extra})
        assert 0 < again < 64 and again % 16 == 0, again


def test_sigterm_finishes_the_stream_in_flight_refuses_new_requests_and_exits_0(server):
    """Last in this module: it stops the server."""
    with httpx.Client(timeout=60, headers=AUTH) as http, http.stream(
            "POST", server.url("/v1/completions"),
            json={"prompt": "last words", "max_tokens": 1500, "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        assert first.startswith("data: ")
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        # draining: new requests and /health get 503 with Retry-After while the stream goes on
        refused = httpx.post(server.url("/v1/completions"), json={"prompt": "too late", "max_tokens": 2},
                             headers=AUTH, timeout=10)
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        assert refused.json()["error"]["code"] == "shutting_down"
        assert httpx.get(server.url("/health"), timeout=10).status_code == 503
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in [first, *rest[:-1]]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(timeout=60) == 0
    log = server.log()
    assert "Shutting down" in log and "Traceback" not in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url("/health"))
