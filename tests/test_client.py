"""``inferneo.client`` against a real ``inferneo serve`` (with an API key) on a tiny model: each method, sync and
async, streaming (and that streams close), each error type, timeouts; and a light import."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import pytest

import inferneo
from inferneo import AsyncInferneoClient, InferneoClient
from inferneo.client import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ChatCompletion,
    Completion,
    InferneoError,
    NotFoundError,
    Stream,
)
from inferneo.testing.guide import GUIDE_MODEL
from inferneo.testing.server import RemoteServer, free_port

KEY = "sk-client-test"


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with RemoteServer(tiny_llama_dir, "--served-model-name", GUIDE_MODEL, "tiny", "--api-key", KEY,
                      "--kv-cache-memory", "32MiB", "--num-threads", "1", "--disable-access-log") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with InferneoClient(server.base_url, api_key=KEY, max_retries=0) as c:
        yield c


def running_requests(server) -> float:
    text = httpx.get(server.url("/metrics"), headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    line = next(x for x in text.splitlines() if x.startswith("inferneo:num_requests_running"))
    return float(line.rsplit(" ", 1)[1])


def wait_no_running(server, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while running_requests(server) != 0:
        assert time.monotonic() < deadline, "the server still runs the request"
        time.sleep(0.05)


# ---- construction and imports ------------------------------------------------------------------------------------


def test_importing_the_client_pulls_in_no_engine():
    code = ("import sys, inferneo.client\n"
            "from inferneo import InferneoClient, AsyncInferneoClient, BadRequestError\n"
            "from inferneo.batching import DynamicBatcher, stream_batches\n"
            "heavy = [m for m in ('torch', 'transformers', 'numpy', 'fastapi', 'inferneo.engine') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_base_url_and_key_defaults(monkeypatch):
    monkeypatch.delenv("INFERNEO_BASE_URL", raising=False)
    monkeypatch.delenv("INFERNEO_API_KEY", raising=False)
    assert InferneoClient().base_url == "http://localhost:8000/v1"
    assert InferneoClient("http://localhost:8000").base_url == "http://localhost:8000/v1"
    assert InferneoClient("http://h:1/v1/").base_url == "http://h:1/v1"
    assert InferneoClient("h:1").base_url == "http://h:1/v1"
    assert InferneoClient().api_key is None
    monkeypatch.setenv("INFERNEO_BASE_URL", "http://example.invalid:9")
    monkeypatch.setenv("INFERNEO_API_KEY", "from-env")
    client = InferneoClient()
    assert client.base_url == "http://example.invalid:9/v1" and client.api_key == "from-env"
    assert client._headers["Authorization"] == "Bearer from-env"
    assert InferneoClient(api_key="given").api_key == "given"
    assert client.with_options(max_retries=7).max_retries == 7
    assert inferneo.InferneoClient is InferneoClient and inferneo.BadRequestError is BadRequestError
    with pytest.raises(ValueError):
        InferneoClient(max_retries=-1)


def test_unknown_keyword_is_a_type_error(client):
    with pytest.raises(TypeError, match="unexpected keyword argument 'tempurature'"):
        client.completions.create(prompt="hi", tempurature=0.5)


# ---- methods -----------------------------------------------------------------------------------------------------


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models] == [GUIDE_MODEL, "tiny"] == [m.id for m in models.data]
    assert models.data[0].owned_by == "inferneo" and models.data[0].max_model_len == 2048  # an extra field
    assert client.models.retrieve(GUIDE_MODEL).id == GUIDE_MODEL
    with pytest.raises(NotFoundError) as info:
        client.models.retrieve("nope")
    assert info.value.status_code == 404


def test_completion_one_prompt_many_prompts_and_token_ids(client):
    one = client.completions.create(model="tiny", prompt="hello world", max_tokens=4, temperature=0)
    assert isinstance(one, Completion) and one.object == "text_completion" and one.model == "tiny"
    assert len(one.choices) == 1 and one.choices[0].index == 0 and isinstance(one.choices[0].text, str)
    assert one.choices[0].finish_reason in ("stop", "length")
    assert one.usage.total_tokens == one.usage.prompt_tokens + one.usage.completion_tokens

    many = client.completions.create(model="tiny", prompt=["hello world", "the cat", "once"], max_tokens=4,
                                     temperature=0)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].text == one.choices[0].text  # greedy, so the same continuation in a batch

    ids = client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=3, temperature=0)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 5


def test_completion_extensions_and_extra_body(client):
    out = client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=6, min_tokens=6, ignore_eos=True,
                                    top_k=5, min_p=0.01, repetition_penalty=1.1, stop_token_ids=[], seed=3,
                                    skip_special_tokens=True, priority=0, n=2, temperature=0.8)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 4 * 6 and {c.finish_reason for c in out.choices} == {"length"}
    echoed = client.completions.create(model="tiny", prompt="the cat", max_tokens=2, echo=True, logprobs=None,
                                       extra_body={"top_k": 1})
    assert echoed.choices[0].text.startswith("the cat")
    with pytest.raises(BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", extra_body={"not_a_field": 1})
    assert info.value.param == "not_a_field"


def test_chat_one_conversation_and_a_list(client):
    conversation = [{"role": "user", "content": "What is AI?"}]
    one = client.chat.completions.create(model=GUIDE_MODEL, messages=conversation, max_tokens=5, temperature=0)
    assert isinstance(one, ChatCompletion) and one.object == "chat.completion"
    assert one.choices[0].message.role == "assistant" and isinstance(one.choices[0].message.content, str)
    several = client.chat.completions.create(model=GUIDE_MODEL, messages=[conversation, conversation[:1] * 2],
                                             max_tokens=5, temperature=0)
    assert [c.index for c in several.choices] == [0, 1]
    assert several.choices[0].message.content == one.choices[0].message.content
    assert client.chat.completions.create(messages=conversation, max_tokens=2).model == GUIDE_MODEL  # default


# ---- streaming ---------------------------------------------------------------------------------------------------


def test_completion_stream_matches_the_whole_answer(client):
    whole = client.completions.create(model="tiny", prompt="the cat", max_tokens=12, temperature=0)
    with client.completions.create(model="tiny", prompt="the cat", max_tokens=12, temperature=0, stream=True,
                                   stream_options={"include_usage": True}) as stream:
        assert isinstance(stream, Stream)
        chunks = list(stream)
    assert stream.closed
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_stream(client):
    messages = [{"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(messages=messages, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(messages=messages, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert stream.closed and chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_leaving_a_stream_early_closes_it_and_aborts_the_request(server, client):
    stream = client.completions.create(model="tiny", prompt="x", max_tokens=1500, ignore_eos=True, stream=True)
    for _ in stream:
        break
    assert stream.closed
    wait_no_running(server)
    with client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], max_tokens=1500,
                                        ignore_eos=True, stream=True) as chat_stream:
        next(chat_stream)
    assert chat_stream.closed
    wait_no_running(server)


def test_async_client_methods_and_streams(server):
    async def main():
        async with AsyncInferneoClient(server.base_url, api_key=KEY, max_retries=0) as client:
            assert [m.id async for m in _aiter((await client.models.list()).data)] == [GUIDE_MODEL, "tiny"]
            assert (await client.models.retrieve("tiny")).id == "tiny"
            whole = await client.completions.create(model="tiny", prompt=["the cat", "a"], max_tokens=8,
                                                    temperature=0)
            assert len(whole.choices) == 2
            stream = await client.completions.create(model="tiny", prompt="the cat", max_tokens=8, temperature=0,
                                                     stream=True)
            async with stream:
                text = "".join([c.choices[0].text async for c in stream])
            assert text == whole.choices[0].text and stream.closed
            chat = await client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            assert chat.choices[0].message.content is not None
            chat_stream = await client.chat.completions.create(messages=[{"role": "user", "content": "hi"}],
                                                               max_tokens=1500, ignore_eos=True, stream=True)
            async for _ in chat_stream:
                break
            for _ in range(50):  # the event loop finalizes the abandoned iterator, which closes the stream
                if chat_stream.closed:
                    break
                await asyncio.sleep(0.01)
            assert chat_stream.closed
            with pytest.raises(BadRequestError):
                await client.completions.create(prompt="x", temperature=-1)

    asyncio.run(main())
    wait_no_running(server)


async def _aiter(items):
    for item in items:
        yield item


# ---- errors ------------------------------------------------------------------------------------------------------


def test_status_errors_are_typed(server, client):
    with pytest.raises(BadRequestError) as bad:
        client.completions.create(model="tiny", prompt="x", temperature=-1)
    err = bad.value
    assert isinstance(err, APIStatusError) and isinstance(err, APIError) and isinstance(err, InferneoError)
    assert err.status_code == 400 and err.param == "temperature" and err.type == "invalid_request_error"
    assert "temperature" in err.message and err.body["param"] == "temperature" and "400" in str(err)

    with pytest.raises(NotFoundError) as missing:
        client.completions.create(model="no-such-model", prompt="x")
    assert missing.value.code == "model_not_found" and missing.value.status_code == 404

    for key in ("wrong-key", None):
        with InferneoClient(server.base_url, api_key=key, max_retries=0) as other:
            if key is None:
                other.api_key = None  # the environment may hold a key
            with pytest.raises(AuthenticationError) as auth:
                other.models.list()
            assert auth.value.status_code == 401 and auth.value.code == "invalid_api_key"


def test_connection_refused_is_a_connection_error():
    with InferneoClient(f"http://127.0.0.1:{free_port()}", max_retries=0) as client, \
            pytest.raises(APIConnectionError) as info:
        client.models.list()
    assert not isinstance(info.value, APITimeoutError)


def test_slow_answer_is_a_timeout(client):
    start = time.monotonic()
    with pytest.raises(APITimeoutError):
        client.completions.create(model="tiny", prompt="x", max_tokens=1500, ignore_eos=True, timeout=0.3)
    assert time.monotonic() - start < 5
    slow = InferneoClient(client.base_url, api_key=KEY, timeout=0.3, max_retries=0)
    with pytest.raises(APITimeoutError):
        slow.completions.create(model="tiny", prompt="x", max_tokens=1500, ignore_eos=True)


def test_engine_commands_explain_a_missing_engine_extra(tmp_path):
    # Hide torch, as on a client-only install, and run the command line's entry point.
    code = ("import sys\n"
            "class HideTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.partition('.')[0] == 'torch':\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, HideTorch())\n"
            "from inferneo.cli.main import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    for argv in (["generate", "hello"], ["serve", "--port", "1"]):
        proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr
        assert f"'{argv[0]}' runs a model" in proc.stderr and 'pip install "inferneo[engine]"' in proc.stderr
        assert "Traceback" not in proc.stderr


def test_the_typed_arguments_are_fields_the_server_takes():
    """Every keyword ``create`` types (the ``TypedDict``s of ``_params``) is a field of the server's request body:
    one the server does not define would be a 400 at the first call."""
    from inferneo.client.resources._params import ChatCompletionArgs, CompletionArgs
    from inferneo.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest

    for args, body in [(CompletionArgs, CompletionRequest), (ChatCompletionArgs, ChatCompletionRequest)]:
        typed = {name for cls in args.__mro__ for name in getattr(cls, "__annotations__", {})}
        fields = {f.alias or name for name, f in body.model_fields.items()}
        assert typed and typed <= fields, sorted(typed - fields)
        assert {"use_beam_search", "length_penalty", "prompt_logprobs"} <= typed
