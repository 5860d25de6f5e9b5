"""Amazon SageMaker's routes (vLLM serves them too): ``/ping`` answers as ``/health`` does and needs no API key;
``POST /invocations`` answers each kind of body (chat, completion, embedding) exactly as its own endpoint does,
streams when asked, keeps the key and the request limits, and refuses a body it cannot place with a 400."""

from __future__ import annotations

import httpx
import pytest

from inferneo.testing.server import RemoteServer

KEY = {"Authorization": "Bearer sm-key"}


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with RemoteServer(tiny_llama_dir, "--served-model-name", "tiny", "--api-key", "sm-key", "--kv-cache-memory",
                      "16MiB", "--num-threads", "1", "--max-prompts-per-request", "3",
                      "--disable-access-log") as srv:
        yield srv


def _post(server, path, body, headers=KEY):
    return httpx.post(server.base_url + path, json=body, headers=headers, timeout=60)


def _comparable(body: dict) -> dict:
    """An answer without what differs between two requests: its id, time and prefix-cache hits."""
    usage = {k: v for k, v in body["usage"].items() if k != "prompt_tokens_details"}
    return {**{k: v for k, v in body.items() if k not in ("id", "created")}, "usage": usage}


def test_ping_is_health_without_a_key(server):
    for method in ("GET", "POST"):
        assert httpx.request(method, server.base_url + "/ping", timeout=10).status_code == 200


def test_invocations_answer_as_the_endpoints_do(server):
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}
    completion = {"model": "tiny", "prompt": "hello there", "max_tokens": 5, "temperature": 0}
    embedding = {"model": "tiny", "input": ["one", "two"]}
    for body, path in ((chat, "/v1/chat/completions"), (completion, "/v1/completions"),
                       (embedding, "/v1/embeddings")):
        direct, invoked = _post(server, path, body), _post(server, "/invocations", body)
        assert direct.status_code == invoked.status_code == 200, invoked.text
        assert _comparable(invoked.json()) == _comparable(direct.json())
    streamed = _post(server, "/invocations", {**completion, "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.text.rstrip().endswith("data: [DONE]")


def test_invocations_keep_the_key_the_limits_and_refuse_what_they_cannot_place(server):
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert _post(server, "/invocations", chat, headers={}).status_code == 401
    too_many = _post(server, "/invocations", {"model": "tiny", "prompt": ["a", "b", "c", "d"], "max_tokens": 1})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "prompt"
    unknown = _post(server, "/invocations", {"model": "tiny", "question": "hi"})
    assert unknown.status_code == 400
    assert "could not tell what this request is" in unknown.json()["error"]["message"]
    assert "messages (ChatCompletion)" in unknown.json()["error"]["message"]
    wrong_type = _post(server, "/invocations", {**chat, "max_tokens": "two"})
    assert wrong_type.status_code == 400 and wrong_type.json()["error"]["param"] == "max_tokens"
    not_an_object = _post(server, "/invocations", [chat])
    assert not_an_object.status_code == 400
