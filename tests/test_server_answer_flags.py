"""vLLM's serve flags that shape answers, on one real server: ``--response-role``, ``--return-tokens-as-token-ids``
(and the requests' ``return_tokens_as_token_ids`` field), ``--enable-force-include-usage``, and ``--max-log-len``
(with ``--enable-log-requests``)."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from inferneo.testing.server import RemoteServer

HI = [{"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with RemoteServer(
        tiny_llama_dir,
        "--served-model-name",
        "tiny",
        "--kv-cache-memory",
        "32MiB",
        "--response-role",
        "bot",
        "--return-tokens-as-token-ids",
        "--enable-force-include-usage",
        "--enable-log-requests",
        "--max-log-len",
        "12",
    ) as srv:
        yield srv


def post(server, path: str, body: dict) -> dict:
    response = httpx.post(server.url(path), json={"model": "tiny", **body}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def events(server, path: str, body: dict) -> list[dict]:
    with httpx.stream(
        "POST", server.url(path), json={"model": "tiny", "stream": True, **body}, timeout=60
    ) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_response_role_after_a_new_turn_else_the_last_messages_role(server):
    answer = post(server, "/v1/chat/completions", {"messages": HI, "max_tokens": 2})
    assert answer["choices"][0]["message"]["role"] == "bot"
    chunks = events(server, "/v1/chat/completions", {"messages": HI, "max_tokens": 2})
    assert chunks[0]["choices"][0]["delta"]["role"] == "bot"
    # no new assistant turn: the answer continues the last message, and takes its role (vLLM's rule)
    answer = post(
        server, "/v1/chat/completions", {"messages": HI, "max_tokens": 2, "add_generation_prompt": False}
    )
    assert answer["choices"][0]["message"]["role"] == "user"
    prefix = [*HI, {"role": "assistant", "content": "Sure"}]
    answer = post(
        server,
        "/v1/chat/completions",
        {"messages": prefix, "max_tokens": 2, "continue_final_message": True, "add_generation_prompt": False},
    )
    assert answer["choices"][0]["message"]["role"] == "assistant"
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)
    assert (
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=2).choices[0].message.role
        == "bot"
    )


def ids_named(token_ids: list[int]) -> list[str]:
    return [f"token_id:{t}" for t in token_ids]


def test_completion_logprobs_name_tokens_by_id(server):
    body = {
        "prompt": "hello world",
        "max_tokens": 6,
        "logprobs": 2,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    choice = post(server, "/v1/completions", body)["choices"][0]
    as_text = post(server, "/v1/completions", {**body, "return_tokens_as_token_ids": False})["choices"][0]
    assert as_text["token_ids"] == choice["token_ids"] and len(choice["token_ids"]) == 6
    logprobs, plain = choice["logprobs"], as_text["logprobs"]
    assert logprobs["tokens"] == ids_named(choice["token_ids"])
    assert plain["tokens"] != logprobs["tokens"] and "".join(plain["tokens"]) == as_text["text"]
    assert logprobs["text_offset"] == plain["text_offset"]  # offsets still count the text's characters
    assert logprobs["token_logprobs"] == plain["token_logprobs"]
    for name, top in zip(logprobs["tokens"], logprobs["top_logprobs"], strict=True):
        assert name in top and all(key.startswith("token_id:") for key in top)
    streamed = events(server, "/v1/completions", body)
    tokens = [
        t for c in streamed if c["choices"] for t in (c["choices"][0]["logprobs"] or {}).get("tokens", [])
    ]
    offsets = [
        o
        for c in streamed
        if c["choices"]
        for o in (c["choices"][0]["logprobs"] or {}).get("text_offset", [])
    ]
    assert tokens == logprobs["tokens"] and offsets == logprobs["text_offset"]
    echoed = post(server, "/v1/completions", {**body, "echo": True, "max_tokens": 1})["choices"][0]
    assert echoed["logprobs"]["tokens"] == ids_named(echoed["prompt_token_ids"] + echoed["token_ids"])


def test_chat_logprobs_name_tokens_by_id(server):
    body = {
        "messages": HI,
        "max_tokens": 5,
        "logprobs": True,
        "top_logprobs": 2,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    choice = post(server, "/v1/chat/completions", body)["choices"][0]
    as_text = post(server, "/v1/chat/completions", {**body, "return_tokens_as_token_ids": False})["choices"][
        0
    ]
    content, plain = choice["logprobs"]["content"], as_text["logprobs"]["content"]
    assert [e["token"] for e in content] == ids_named(choice["token_ids"])
    assert [e["bytes"] for e in content] == [e["bytes"] for e in plain]  # the token's own bytes either way
    for entry in content:
        assert entry["top_logprobs"] and all(
            t["token"].startswith("token_id:") for t in entry["top_logprobs"]
        )
    streamed = events(server, "/v1/chat/completions", body)
    tokens = [
        e["token"]
        for c in streamed
        if c["choices"] and c["choices"][0]["logprobs"]
        for e in c["choices"][0]["logprobs"]["content"]
    ]
    assert tokens == ids_named(choice["token_ids"])


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"prompt": "hello", "n": 2}),
        ("/v1/chat/completions", {"messages": HI}),
    ],
)
def test_force_include_usage_without_stream_options(server, path, body):
    body = {**body, "max_tokens": 5, "ignore_eos": True}
    whole = post(server, path, body)["usage"]
    chunks = events(server, path, body)  # no stream_options
    def counts_of(usage: dict) -> dict:  # the second request may find the first one's prompt in the prefix cache
        return {k: v for k, v in usage.items() if k != "prompt_tokens_details"}

    assert chunks[-1]["choices"] == [] and counts_of(chunks[-1]["usage"]) == counts_of(whole)
    assert all(c["usage"] is not None for c in chunks)  # the counts so far in every chunk too (vLLM's)
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == whole["completion_tokens"]
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)
    fields = {k: v for k, v in body.items() if k != "ignore_eos"}
    create = client.completions.create if path == "/v1/completions" else client.chat.completions.create
    stream = create(model="tiny", stream=True, extra_body={"ignore_eos": True}, **fields)
    assert [c.usage for c in stream][-1].total_tokens == whole["total_tokens"]


def test_max_log_len_cuts_the_logged_prompts(server):
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    post(server, "/v1/completions", {"prompt": letters, "max_tokens": 1})
    post(server, "/v1/completions", {"prompt": list(range(100, 130)), "max_tokens": 1})
    post(
        server,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": letters.lower()}], "max_tokens": 1},
    )
    post(
        server,
        "/v1/chat/completions",
        {
            "max_tokens": 1,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "0123456789" * 3}]}],
        },
    )
    time.sleep(0.3)
    requests = [line for line in server.log().splitlines() if "request POST" in line]
    logged = "\n".join(requests)
    assert '"prompt": "ABCDEFGHIJKL"' in logged and "ABCDEFGHIJKLM" not in logged
    assert f'"prompt": {list(range(100, 112))}' in logged and "112" not in logged
    assert '"content": "abcdefghijkl"' in logged and "abcdefghijklm" not in logged
    assert '"text": "012345678901"' in logged and "0123456789012" not in logged
    assert '"max_tokens": 1' in logged  # the rest of the body is logged as sent
