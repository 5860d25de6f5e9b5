"""The OpenAI-compatible server, over real HTTP, on a tiny model: the official ``openai`` client, the wire
format, the guide's examples, parity with ``LLM.generate``, shared batching, disconnects and error replies."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from inferneo import LLM, SamplingParams
from inferneo.testing.guide import GUIDE_CONVERSATIONS, GUIDE_MODEL, GUIDE_PROMPTS
from inferneo.testing.server import RemoteServer

PROMPTS = ["hello world", "the quick brown fox", "Once upon a time", "The capital of France is"]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with RemoteServer(tiny_llama_dir, "--served-model-name", GUIDE_MODEL, "tiny", "--kv-cache-memory", "32MiB",
                      "--num-threads", "1", "--disable-access-log") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="32MiB", num_threads=1)


def post(server, path, body, **kw):
    return httpx.post(server.url(path), json=body, timeout=60, **kw)


def metrics(server) -> dict[str, float]:
    """The server's metrics as {'name{labels}': value} (labels kept, model_name dropped)."""
    values = {}
    for line in httpx.get(server.url("/metrics"), timeout=10).text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        name = re.sub(r'model_name="[^"]*",?', "", name).replace("{}", "").replace(",}", "}")
        values[name] = float(value)
    return values


def wait_idle(server, timeout=10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if m["inferneo:num_requests_running"] == 0 and m["inferneo:kv_cache_usage_perc"] == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"the server did not go idle: {m}")
        time.sleep(0.05)


def sse_events(text: str) -> list:
    events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ---- the official openai client -------------------------------------------------------------------------------


def test_models_list_names_every_served_name(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [GUIDE_MODEL, "tiny"]
    assert all(m.object == "model" and m.owned_by == "inferneo" for m in models.data)
    assert client.models.retrieve("tiny").id == "tiny"


def test_sync_completion(client):
    out = client.completions.create(model="tiny", prompt="hello world", max_tokens=5, temperature=0)
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == "tiny"
    assert isinstance(out.created, int) and abs(out.created - time.time()) < 60
    assert len(out.choices) == 1 and out.choices[0].index == 0 and isinstance(out.choices[0].text, str)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 5 and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_sync_chat_and_stream_agree(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is AI?"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_answers_carry_the_models_system_fingerprint(client):
    """OpenAI's system_fingerprint names the backend configuration: the same on completions and chat, whole and
    streamed (every chunk), and a digest of what decides the outputs (see engine/fingerprint.py)."""
    completion = client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    fingerprint = completion.system_fingerprint
    assert fingerprint.startswith("inferneo-") and len(fingerprint) == len("inferneo-") + 16
    assert chat.system_fingerprint == fingerprint
    for stream in (client.completions.create(model="tiny", prompt="hi", max_tokens=2, stream=True),
                   client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=2, stream=True)):
        assert {chunk.system_fingerprint for chunk in stream} == {fingerprint}


def test_async_client_completion_and_chat_streams(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)
        whole = await client.completions.create(model="tiny", prompt="the cat", max_tokens=10, temperature=0)
        stream = await client.completions.create(model="tiny", prompt="the cat", max_tokens=10, temperature=0,
                                                 stream=True)
        pieces = [c.choices[0].text async for c in stream]
        chat = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0)
        chat_stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, stream=True)
        chat_text = "".join([c.choices[0].delta.content or "" async for c in chat_stream])
        models = await client.models.list()
        await client.close()
        return whole, pieces, chat, chat_text, models

    whole, pieces, chat, chat_text, models = asyncio.run(main())
    assert "".join(pieces) == whole.choices[0].text
    assert chat_text == chat.choices[0].message.content
    assert models.data[0].id == GUIDE_MODEL


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt="x")
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", top_p=3)
    assert info.value.body["param"] == "top_p"


# ---- parity with the offline API ---------------------------------------------------------------------------


def test_greedy_http_equals_llm_generate(server, llm):
    expected = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    body = post(server, "/v1/completions", {"model": "tiny", "prompt": PROMPTS, "max_tokens": 12,
                                            "temperature": 0}).json()
    assert [c["text"] for c in body["choices"]] == [o.outputs[0].text for o in expected]
    assert [c["finish_reason"] for c in body["choices"]] == [o.outputs[0].finish_reason for o in expected]
    for prompt, out in zip(PROMPTS, expected, strict=True):  # one at a time, and streamed
        r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True})
        assert "".join(e["choices"][0]["text"] for e in sse_events(r.text)) == out.outputs[0].text


def test_greedy_chat_equals_llm_chat(server, llm):
    conversations = [[{"role": "user", "content": "What is AI?"}],
                     [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                      {"role": "user", "content": "how are you"}]]
    expected = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    body = post(server, "/v1/chat/completions", {"messages": conversations, "max_tokens": 10,
                                                 "temperature": 0}).json()
    assert [c["message"]["content"] for c in body["choices"]] == [o.outputs[0].text for o in expected]
    assert body["usage"]["prompt_tokens"] == sum(len(o.prompt_token_ids) for o in expected)


def test_chat_template_kwargs_follow_one_rule_offline_and_served(server, llm):
    """A template variable reaches the template on both sides; a key that would set the conversation, the tools or
    where the prompt ends, or change what the template call returns, is refused on both (a 400 naming
    chat_template_kwargs on the server), never dropped without a word."""
    conversation = [{"role": "user", "content": "hello"}]
    extra = {"unused_variable": 1}
    expected = llm.chat(conversation, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False,
                        chat_template_kwargs=extra)
    body = post(server, "/v1/chat/completions", {"messages": conversation, "max_tokens": 6, "temperature": 0,
                                                 "chat_template_kwargs": extra}).json()
    assert body["choices"][0]["message"]["content"] == expected[0].outputs[0].text
    for key, field in (("add_generation_prompt", "add_generation_prompt"), ("tools", "tools"),
                       ("conversation", "messages"), ("tokenize", None), ("return_dict", None)):
        r = post(server, "/v1/chat/completions", {"messages": conversation, "max_tokens": 2,
                                                  "chat_template_kwargs": {key: True}})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "chat_template_kwargs" and f"cannot set {key}" in error["message"]
        tokenized = post(server, "/tokenize", {"messages": conversation, "chat_template_kwargs": {key: True}})
        assert tokenized.status_code == 400 and f"cannot set {key}" in tokenized.json()["error"]["message"]
        with pytest.raises(ValueError, match=f"chat_template_kwargs cannot set {key}") as offline:
            llm.chat(conversation, SamplingParams(max_tokens=2), use_tqdm=False, chat_template_kwargs={key: True})
        assert field is None or field in str(offline.value)


def test_a_vllm_command_line_with_a_chat_template_file_serves(tiny_llama_dir, tmp_path, llm):
    """vLLM's serve flags as its users write them: --chat-template (a file), --generation-config vllm with
    --override-generation-config, --default-chat-template-kwargs, --enable-auto-tool-choice, --trust-remote-code,
    --disable-log-requests and --disable-log-stats, some of them from a --config YAML file."""
    template = tmp_path / "template.jinja"
    template.write_text("{% if tools %}T{{ tools | length }}:{% endif %}{% for m in messages %}[{{ m.content }}]"
                        "{% endfor %}{{ mark | default('') }}")
    config = tmp_path / "serve.yaml"
    config.write_text(f"chat-template: {template}\ngeneration-config: vllm\n"
                      "override-generation-config: {temperature: 0}\nkv-cache-memory: 16MiB\n"
                      "enable-auto-tool-choice: true\ntrust_remote_code: true\nnum-threads: 1\n")
    with RemoteServer(tiny_llama_dir, "--config", str(config), "--disable-log-requests",
                      "--default-chat-template-kwargs", '{"mark": "?"}', "--disable-log-stats",
                      "--engine-in-process", "--disable-access-log") as srv:
        messages = [{"role": "user", "content": "hi"}]
        tokens = post(srv, "/tokenize", {"messages": messages, "add_generation_prompt": False}).json()["tokens"]
        assert tokens == llm.get_tokenizer()("[hi]?", add_special_tokens=False).input_ids  # the server's default
        chat = post(srv, "/v1/chat/completions", {"messages": messages, "max_tokens": 3, "temperature": 0}).json()
        assert chat["usage"]["prompt_tokens"] == len(tokens)
        # /tokenize renders tools and template variables as chat does; the request's variables win
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        extra = {"tools": [tool], "chat_template_kwargs": {"mark": "!"}}
        tokens = post(srv, "/tokenize", {"messages": messages, **extra}).json()["tokens"]
        assert tokens == llm.get_tokenizer()("T1:[hi]!", add_special_tokens=False).input_ids
        chat = post(srv, "/v1/chat/completions", {"messages": messages, "max_tokens": 1, **extra}).json()
        assert chat["usage"]["prompt_tokens"] == len(tokens)
        # the override's temperature 0 is the default: a request without one is greedy
        answer = post(srv, "/v1/completions", {"prompt": "hello world", "max_tokens": 8, "ignore_eos": True}).json()
        greedy = llm.generate("hello world", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                              use_tqdm=False)[0]
        assert answer["choices"][0]["text"] == greedy.outputs[0].text


# ---- the guide's two basic examples, as raw HTTP and through the openai client ----------------------------------

def test_guide_prompt_batch_over_raw_http(server):
    r = post(server, "/v1/completions", {"model": GUIDE_MODEL, "prompt": GUIDE_PROMPTS, "max_tokens": 100,
                                         "temperature": 0.7})
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == GUIDE_MODEL and len(body["choices"]) == 4
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(isinstance(c["text"], str) and c["finish_reason"] in ("stop", "length") for c in body["choices"])
    assert body["usage"]["completion_tokens"] <= 400


def test_guide_conversation_batch_over_raw_http(server):
    r = post(server, "/v1/chat/completions", {"model": GUIDE_MODEL, "messages": GUIDE_CONVERSATIONS,
                                              "max_tokens": 150, "temperature": 0.7})
    assert r.status_code == 200
    body = r.json()
    assert len(body["choices"]) == 3 and [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str)
               for c in body["choices"])


def test_guide_examples_through_the_openai_client(client):
    responses = client.completions.create(model=GUIDE_MODEL, prompt=GUIDE_PROMPTS, max_tokens=100, temperature=0.7)
    assert len(responses.choices) == 4
    chats = client.chat.completions.create(model=GUIDE_MODEL, messages=GUIDE_CONVERSATIONS, max_tokens=150,
                                           temperature=0.7)
    assert [type(c.message.content) for c in chats.choices] == [str, str, str]


# ---- wire format details -------------------------------------------------------------------------------------


def test_choice_index_is_prompt_position_times_n_plus_j(server):
    body = post(server, "/v1/completions", {"prompt": ["a b", "c d", "e f"], "n": 2, "max_tokens": 3,
                                            "seed": 1}).json()
    assert [c["index"] for c in body["choices"]] == list(range(6))
    r = post(server, "/v1/completions", {"prompt": [[1, 300, 301], [1, 302]], "n": 2, "max_tokens": 3,
                                         "stream": True, "seed": 1})
    finished = sorted(e["choices"][0]["index"] for e in sse_events(r.text) if e["choices"][0]["finish_reason"])
    assert finished == [0, 1, 2, 3]


def test_n_copies_of_edge_requests_are_served_and_the_engine_lives(server):
    """The ``n`` sequences of one request are each a valid request: a scoring request (``max_tokens`` 0) scores the
    prompt in every copy, and seeds near the 64-bit limit wrap around instead of leaving the range (either used to
    stop the engine)."""
    body = post(server, "/v1/completions", {"prompt": "hello world", "max_tokens": 0, "echo": True, "logprobs": 0,
                                            "n": 2})
    assert body.status_code == 200, body.text
    choices = body.json()["choices"]
    assert [c["text"] for c in choices] == ["hello world", "hello world"]
    assert choices[0]["logprobs"]["token_logprobs"] == choices[1]["logprobs"]["token_logprobs"]
    for seed in (2**63 - 1, 2**63 - 3, -(2**63)):
        r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 3, "seed": seed, "n": 4,
                                             "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 4
    assert httpx.get(server.url("/health"), timeout=10).status_code == 200


def test_completion_logprobs_shape(server):
    body = post(server, "/v1/completions", {"prompt": "hello", "max_tokens": 4, "logprobs": 3,
                                            "temperature": 0, "ignore_eos": True}).json()
    lp = body["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    assert all(1 <= len(top) <= 4 for top in lp["top_logprobs"])
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert all(v <= 0 for v in lp["token_logprobs"])


def test_chat_logprobs_shape(client, llm):
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                         temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 3
    # each token's own bytes: joined they are the answer's text (a character split over tokens included; special
    # tokens are left out of the text)
    special = set(llm.get_tokenizer().all_special_tokens)
    joined = bytes(b for entry in content if entry.token not in special
                   for b in entry.bytes).decode("utf-8", errors="replace")
    assert joined == out.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy picks the top token


def test_logprobs_cover_the_texts_tokens_only(server, llm, client):
    """A stop token (EOS, stop_token_ids) ends the answer without being part of its text: as in OpenAI's answers,
    the logprobs are those of the text's tokens (the stop token's too with include_stop_str_in_output)."""
    messages = [{"role": "user", "content": "hi"}]
    greedy = llm.chat([messages], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                      use_tqdm=False)[0].outputs[0].token_ids
    stop_id = greedy[3]
    first = greedy.index(stop_id)
    for include in (False, True):
        kw = dict(model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=1,
                  extra_body={"ignore_eos": True, "stop_token_ids": [stop_id], "include_stop_str_in_output": include})
        whole = client.chat.completions.create(**kw).choices[0]
        assert whole.finish_reason == "stop"
        assert len(whole.logprobs.content) == first + include
        streamed = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices]
        entries = [e for c in streamed if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        assert [e.token for e in entries] == [e.token for e in whole.logprobs.content]
        body = {"prompt": "hello there", "max_tokens": 8, "temperature": 0, "logprobs": 1, "ignore_eos": True,
                "stop_token_ids": [stop_id], "include_stop_str_in_output": include}
        free = post(server, "/v1/completions", {**body, "stop_token_ids": []}).json()["choices"][0]
        cut = post(server, "/v1/completions", body).json()["choices"][0]
        if cut["finish_reason"] == "stop":
            assert "".join(cut["logprobs"]["tokens"]) == cut["text"] or include
            assert len(cut["logprobs"]["tokens"]) < len(free["logprobs"]["tokens"]) + include


def test_extensions_and_echo(server, llm):
    tokenizer = llm.get_tokenizer()
    stop_id = tokenizer("the", add_special_tokens=False).input_ids[0]
    body = post(server, "/v1/completions", {"prompt": "hello", "max_tokens": 7, "min_tokens": 7,
                                            "ignore_eos": True, "temperature": 0, "top_k": 5, "min_p": 0.01,
                                            "repetition_penalty": 1.1, "priority": 0, "echo": True}).json()
    assert body["choices"][0]["text"].startswith("hello") and body["usage"]["completion_tokens"] == 7
    body = post(server, "/v1/completions", {"prompt": "the cat the cat the", "max_tokens": 30, "temperature": 0,
                                            "stop_token_ids": [stop_id], "ignore_eos": True}).json()
    assert body["usage"]["completion_tokens"] <= 30


def test_logit_bias_forces_and_bans_tokens(server, llm, client):
    """OpenAI's logit_bias over HTTP (completions and chat) and offline, on the same weights."""
    tok = llm.get_tokenizer()
    forced = tok("x", add_special_tokens=False).input_ids[-1]
    body = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "logit_bias": {str(forced): 100}}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == tok.decode([forced] * 4)
    offline = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4, temperature=0, logit_bias={forced: 100}))
    assert offline[0].outputs[0].token_ids == [forced] * 4
    with pytest.raises(ValueError, match="logit_bias token ids must be below the vocabulary size"):
        llm.generate([PROMPTS[0]], SamplingParams(max_tokens=1, logit_bias={10**6: 1.0}))
    # Banning the greedy first token changes the first token, and only that token is banned.
    plain = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=1, temperature=0))[0].outputs[0].token_ids[0]
    banned = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=1, temperature=0,
                                       logit_bias={str(plain): -100}, logprobs=0)
    assert banned.choices[0].logprobs.tokens[0] != tok.decode([plain])
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logit_bias={str(forced): 100})
    assert chat.choices[0].message.content == tok.decode([forced] * 3)


def test_allowed_token_ids_limit_every_sampled_token(server, llm, client):
    """vLLM's allowed_token_ids over HTTP (completions and chat, sampled and greedy) and offline."""
    tok = llm.get_tokenizer()
    labels = [tok(w, add_special_tokens=False).input_ids[-1] for w in ("x", " y")]
    names = {tok.decode([t]) for t in labels}
    sampled = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=6, temperature=1.5, n=4,
                                        seed=3, extra_body={"allowed_token_ids": labels})
    offline = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=6, temperature=1.5, n=4, seed=3,
                                                        allowed_token_ids=labels), use_tqdm=False)
    assert all(set(o.token_ids) <= set(labels) for o in offline[0].outputs)
    assert len({t for o in offline[0].outputs for t in o.token_ids}) == 2  # sampled, not one forced token
    assert [c.text for c in sampled.choices] == [o.text for o in offline[0].outputs]  # same seeds, same tokens
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=3,
                                          extra_body={"allowed_token_ids": labels})
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(t.token in names for t in content)
    # the alternatives past the allowed ones have no probability left
    assert all({alt.token for alt in t.top_logprobs[:2]} == names and t.top_logprobs[2].logprob <= -9999
               for t in content)
    for bad, message in (([], "must not be empty"), ([-1], "token ids must be in"), (["1"], "integer"),
                         ([10**6], "allowed_token_ids token ids must be below the vocabulary size")):
        r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1, "allowed_token_ids": bad})
        assert r.status_code == 400, r.text
        assert message in r.json()["error"]["message"]
        assert r.json()["error"]["param"].startswith("allowed_token_ids")


def test_bad_words_never_appear_in_the_answer(server, llm, client):
    """vLLM's bad_words: a word of the greedy answer, banned, is spelled neither at its first token nor later, and
    the answer up to the word's last token is unchanged; a word of several tokens is banned at its last token."""
    tok = llm.get_tokenizer()
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = llm.generate([PROMPTS[3]], params, use_tqdm=False)[0].outputs[0]
    ids = plain.token_ids
    # a word of one token that the answer says after a space
    word = next(tok.decode([t]).strip() for t in ids if tok.decode([t]).startswith(" ") and tok.decode([t]).strip())
    banned = llm.engine.input.bad_words_token_ids([word])
    assert any(len(w) == 1 and w[0] in ids for w in banned)
    answer = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=24, temperature=0,
                                       extra_body={"bad_words": [word], "ignore_eos": True}).choices[0].text
    answer_ids = tok(answer, add_special_tokens=False).input_ids
    assert answer != plain.text
    assert not any(answer_ids[i:i + len(w)] == w for w in banned for i in range(len(answer_ids)))
    # two tokens of the answer as one word: its first token stays, the second never follows it
    first = next(i for i in range(len(ids) - 1) if ids[i] != ids[i + 1])
    pair = [ids[first], ids[first + 1]]
    out = llm.generate([PROMPTS[3]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                    bad_words_token_ids=[pair]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids[:first + 1] == ids[:first + 1] and out.token_ids[first + 1] != pair[1]
    assert not any(out.token_ids[i:i + 2] == pair for i in range(len(out.token_ids)))
    # the user's SamplingParams are left as given (the front end tokenizes a copy)
    mine = SamplingParams(max_tokens=2, temperature=0, bad_words=[word])
    llm.generate([PROMPTS[3]], mine, use_tqdm=False)
    assert mine.bad_words_token_ids is None
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "bad_words": [" "]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "bad_words", r.text


def test_stop_string_is_cut_and_never_streamed(server, llm):
    text = llm.generate("once upon", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].text
    stop = text[8:10]
    expected = text[: text.index(stop)]
    body = {"prompt": "once upon", "max_tokens": 24, "ignore_eos": True, "temperature": 0, "stop": [stop]}
    whole = post(server, "/v1/completions", body).json()["choices"][0]
    assert whole["text"] == expected and whole["finish_reason"] == "stop"
    assert whole["stop_reason"] == stop  # vLLM's field: which stop string (or stop token id) ended it
    events = sse_events(post(server, "/v1/completions", {**body, "stream": True}).text)
    assert "".join(e["choices"][0]["text"] for e in events) == expected
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and events[-1]["choices"][0]["stop_reason"] == stop
    assert all(e["choices"][0]["stop_reason"] is None for e in events[:-1])
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 24, "ignore_eos": True,
            "temperature": 0}
    answer = post(server, "/v1/chat/completions", chat).json()["choices"][0]
    assert answer["finish_reason"] == "length" and answer["stop_reason"] is None
    token_stop = llm.chat([chat["messages"]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids[2]
    chat["stop_token_ids"] = [token_stop]
    answer = post(server, "/v1/chat/completions", chat).json()["choices"][0]
    assert answer["finish_reason"] == "stop" and answer["stop_reason"] == token_stop
    events = sse_events(post(server, "/v1/chat/completions", {**chat, "stream": True}).text)
    assert events[-1]["choices"][0]["stop_reason"] == token_stop


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(server, path):
    """vLLM's ``stream_options.continuous_usage_stats``: each chunk's ``usage`` is the request's so far (its
    prompts counted from the start, the tokens generated up to then), growing to the totals of the last chunk;
    without ``include_usage`` it is a 400 naming stream_options."""
    body = ({"prompt": ["usage so far", "and another"]} if path == "/v1/completions"
            else {"messages": [{"role": "user", "content": "usage so far"}]})
    body |= {"n": 2, "max_tokens": 5, "ignore_eos": True, "stream": True}
    whole = post(server, path, {**body, "stream": False}).json()["usage"]
    events = sse_events(post(server, path, {**body, "stream_options": {"include_usage": True,
                                                                       "continuous_usage_stats": True}}).text)
    *chunks, last = events
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == whole["completion_tokens"]
    assert last["usage"]["prompt_tokens"] == whole["prompt_tokens"]
    seen = [e["usage"]["completion_tokens"] for e in chunks]
    assert seen == sorted(seen) and seen[-1] == whole["completion_tokens"]
    for e in chunks:
        u = e["usage"]
        assert u["prompt_tokens"] == whole["prompt_tokens"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    if path == "/v1/chat/completions":
        assert seen[0] == 0  # the role chunks come before any token
    error = post(server, path, {**body, "stream_options": {"continuous_usage_stats": True}})
    assert error.status_code == 400 and error.json()["error"]["param"] == "stream_options"
    assert "include_usage" in error.json()["error"]["message"]
    plain = sse_events(post(server, path, {**body, "stream_options": {"include_usage": True}}).text)
    assert all(e["usage"] is None for e in plain[:-1])
    assert plain[-1]["usage"]["total_tokens"] == last["usage"]["total_tokens"]


def test_tokenize_detokenize_health_version(server, llm):
    tok = post(server, "/tokenize", {"prompt": "hello world"}).json()
    assert tok["tokens"] == llm.engine.tokenize("hello world") and tok["count"] == len(tok["tokens"])
    assert tok["max_model_len"] == llm.engine.max_model_len
    assert post(server, "/detokenize", {"tokens": tok["tokens"][1:]}).json() == {"prompt": "hello world"}
    chat = post(server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == llm.apply_chat_template([{"role": "user", "content": "hi"}])
    assert httpx.get(server.url("/health")).status_code == 200
    assert httpx.get(server.url("/version")).json()["version"]


def test_chat_continues_the_final_message(server, client, llm):
    """vLLM's ``continue_final_message``: the prompt is the conversation up to the assistant's prefix (as
    ``/tokenize`` and ``LLM.chat`` render it), and the answer is the offline engine's for that prompt; a request that
    also asks for a new turn, or whose last message is not the assistant's, is a 400 naming the field."""
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Well, the answer is"}]
    answer = client.chat.completions.create(model="tiny", messages=conv, max_tokens=6, temperature=0,
                                            extra_body={"continue_final_message": True})
    tokens = post(server, "/tokenize", {"messages": conv, "continue_final_message": True}).json()["tokens"]
    (offline,) = llm.chat(conv, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False,
                          continue_final_message=True)
    assert tokens == offline.prompt_token_ids and answer.usage.prompt_tokens == len(tokens)
    assert answer.choices[0].message.content == offline.outputs[0].text
    assert post(server, "/detokenize", {"tokens": tokens}).json()["prompt"].endswith("Well, the answer is")
    for body in ({"messages": conv, "continue_final_message": True, "add_generation_prompt": True},
                 {"messages": conv[:1], "continue_final_message": True},
                 {"messages": conv, "continue_final_message": "yes"}):
        r = post(server, "/v1/chat/completions", {"model": "tiny", "max_tokens": 2, **body})
        assert r.status_code == 400, r.text[:300]
        assert "continue_final_message" in r.json()["error"]["message"]


def test_truncate_prompt_tokens_keeps_the_prompts_end(server, client, llm):
    """vLLM's ``truncate_prompt_tokens``: the last k tokens of each prompt (completions and chat); -1 keeps as many
    as leave room for max_tokens, so a prompt past the context runs; 0 or more than the context is a 400."""
    ids = list(range(100, 140))
    params = SamplingParams(temperature=0, max_tokens=4)
    answer = client.completions.create(model="tiny", prompt=[ids, ids[:3]], max_tokens=4, temperature=0,
                                       extra_body={"truncate_prompt_tokens": 5})
    expected = llm.generate([ids[-5:], ids[:3]], params, use_tqdm=False)
    assert answer.usage.prompt_tokens == 5 + 3
    assert [c.text for c in answer.choices] == [o.outputs[0].text for o in expected]
    conv = [{"role": "user", "content": "hello there, how are you today?"}]
    full = client.chat.completions.create(model="tiny", messages=conv, max_tokens=2, temperature=0)
    cut = client.chat.completions.create(model="tiny", messages=conv, max_tokens=2, temperature=0,
                                         extra_body={"truncate_prompt_tokens": 6})
    assert full.usage.prompt_tokens > 6 and cut.usage.prompt_tokens == 6
    context = llm.engine.max_model_len
    long_ids = [100 + i % 50 for i in range(context + 10)]
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": long_ids, "max_tokens": 4})
    assert r.status_code == 400  # too long without truncation
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": long_ids, "max_tokens": 4, "temperature": 0,
                                         "truncate_prompt_tokens": -1})
    assert r.status_code == 200, r.text[:300]
    assert r.json()["usage"]["prompt_tokens"] == context - 4
    for bad in (0, context + 1, "5"):
        r = post(server, "/v1/completions", {"model": "tiny", "prompt": ids, "truncate_prompt_tokens": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens", r.text[:300]


# ---- continuous batching, disconnects ------------------------------------------------------------------------


def test_64_concurrent_requests_share_engine_steps(server):
    before = wait_idle(server)

    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as http:
            async def one(i):
                r = await http.post(server.url("/v1/completions"), json={
                    "prompt": f"request number {i}", "max_tokens": 16, "ignore_eos": True, "temperature": 0})
                return r.status_code, r.json()

            return await asyncio.gather(*(one(i) for i in range(64)))

    results = asyncio.run(main())
    assert all(status == 200 for status, _ in results)
    assert all(body["usage"]["completion_tokens"] == 16 for _, body in results)
    after = wait_idle(server)
    steps = after["inferneo:engine_steps_total"] - before["inferneo:engine_steps_total"]
    tokens = after["inferneo:generation_tokens_total"] - before["inferneo:generation_tokens_total"]
    assert tokens == 64 * 16
    # Batched, whatever the machine's load: fewer steps than tokens, and steps of more than 8 sequences in this
    # window (how many depends on how fast the 64 requests arrive: 64 steps unloaded, 375 once on a busy 2-core host).
    assert steps < tokens
    assert after["inferneo:max_batch_size"] > 8

    def wide_steps(snapshot: dict) -> float:
        return (snapshot["inferneo:iteration_batch_size_count"]
                - snapshot['inferneo:iteration_batch_size_bucket{le="8.0"}'])

    assert wide_steps(after) - wide_steps(before) > 0


def test_client_disconnect_aborts_and_frees_blocks(server):
    before = wait_idle(server)
    with httpx.Client(timeout=60) as http, http.stream(
            "POST", server.url("/v1/completions"),
            json={"prompt": "a long story", "max_tokens": 2000, "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # (breaking out of a loop over it would close the connection already)
        for _ in range(6):
            next(lines)
        during = metrics(server)
        assert during["inferneo:num_requests_running"] == 1 and during["inferneo:kv_cache_usage_perc"] > 0
    after = wait_idle(server, timeout=5)
    aborted = 'inferneo:request_success_total{finished_reason="abort"}'
    assert after.get(aborted, 0) == before.get(aborted, 0) + 1
    assert after["inferneo:generation_tokens_total"] - before["inferneo:generation_tokens_total"] < 2000


def test_disconnect_before_a_non_streamed_answer_aborts_it(server):
    before = wait_idle(server)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(server.url("/v1/completions"), timeout=0.5,
                   json={"prompt": "x", "max_tokens": 2000, "ignore_eos": True})
    after = wait_idle(server, timeout=5)
    aborted = 'inferneo:request_success_total{finished_reason="abort"}'
    assert after.get(aborted, 0) == before.get(aborted, 0) + 1
    assert after["inferneo:generation_tokens_total"] - before["inferneo:generation_tokens_total"] < 2000


# ---- errors ----------------------------------------------------------------------------------------------------


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param and param in error["message"]
    return error


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "x", "max_tokenz": 3}, "max_tokenz"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": "x", "min_tokens": 9, "max_tokens": 2}, "min_tokens"),
    ({"prompt": "x", "stop": ["", "a"]}, "stop"),
    ({"prompt": "x", "stop": ""}, "stop"),  # as vLLM: the string alone is refused as it is in a list
])
def test_bad_completion_params_give_400_naming_the_field(server, body, param):
    assert_error(post(server, "/v1/completions", body), 400, param)


def test_bad_chat_params_give_400(server):
    assert_error(post(server, "/v1/chat/completions", {"messages": []}), 400, "messages")
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"content": "no role"}]}), 400, "messages")
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                       "top_logprobs": 2}), 400, "top_logprobs")
    r = httpx.post(server.url("/v1/chat/completions"), content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert_error(r, 400)


def test_a_priority_needs_a_server_that_schedules_by_priority(server):
    # As vLLM answers: this server runs FCFS, where a priority would be silently ignored.
    message = [{"role": "user", "content": "x"}]
    for path, body in [("/v1/completions", {"prompt": "x", "max_tokens": 1}),
                       ("/v1/chat/completions", {"messages": message, "max_tokens": 1}),
                       ("/v1/responses", {"input": "x", "max_output_tokens": 1}),
                       ("/v1/embeddings", {"input": "x", "model": "tiny"})]:
        error = assert_error(post(server, path, {**body, "priority": -1}), 400, "priority")
        assert "--scheduling-policy priority" in error["message"]
        assert post(server, path, {**body, "priority": 0}).status_code == 200


def test_unknown_model_and_route_give_404(server):
    error = assert_error(post(server, "/v1/completions", {"model": "gpt-4", "prompt": "x"}), 404, "model")
    assert error["code"] == "model_not_found"
    assert_error(post(server, "/v1/chat/completions", {"model": "gpt-4", "messages": [
        {"role": "user", "content": "x"}]}), 404, "model")
    assert_error(httpx.get(server.url("/v1/nothing-here")), 404)
    assert_error(httpx.get(server.url("/v1/completions")), 405)


def test_a_request_with_long_prompts_is_tokenized_off_the_loop_with_the_same_tokens(server, llm):
    """Five prompts of about 3,600 characters each (past ``OFF_LOOP_TEXT_CHARS`` together) go through the tokenizer
    thread; the answers are those of the same prompts offline."""
    from inferneo.entrypoints.openai.serving_common import OFF_LOOP_TEXT_CHARS

    prompts = [f"{word} sat on the mat. " * 150 for word in ("the cat", "one dog", "a bird", "my fish", "a cow")]
    assert sum(map(len, prompts)) >= OFF_LOOP_TEXT_CHARS
    body = post(server, "/v1/completions", {"prompt": prompts, "max_tokens": 4, "temperature": 0,
                                            "ignore_eos": True}).json()
    expected = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert [c["text"] for c in body["choices"]] == [o.outputs[0].text for o in expected]
    assert body["usage"]["prompt_tokens"] == sum(len(o.prompt_token_ids) for o in expected)
    chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": prompts[0]}],
                                                 "max_tokens": 2, "temperature": 0}).json()
    assert chat["usage"]["prompt_tokens"] > 1000


def test_too_long_prompt_gives_400_with_both_lengths(server, llm):
    limit = llm.engine.max_model_len
    prompt = "hello " * (limit + 10)
    n = len(llm.engine.tokenize(prompt))
    error = assert_error(post(server, "/v1/completions", {"prompt": prompt}), 400, "prompt")
    assert str(n) in error["message"] and str(limit) in error["message"]
    error = assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}),
                         400, "messages")
    assert str(limit) in error["message"]
    assert httpx.get(server.url("/health")).status_code == 200  # and the server goes on


def test_a_batch_refusal_names_the_prompt_that_cannot_run(server, llm):
    """Of several prompts (or conversations), the one too long, with token ids outside the vocabulary, or without
    room for max_tokens is named by its position; a setting all of them share is refused without one."""
    limit = llm.engine.max_model_len
    long = "hello " * (limit + 10)
    error = assert_error(post(server, "/v1/completions", {"prompt": ["fine", "also fine", long]}), 400, "prompt")
    assert error["message"].startswith("prompt 2: the prompt has ")
    error = assert_error(post(server, "/v1/completions", {"prompt": [[5, 6], [10**6]]}), 400, "prompt")
    assert error["message"].startswith("prompt 1: ")
    room = limit - len(llm.engine.tokenize("fine"))
    error = assert_error(post(server, "/v1/completions", {"prompt": ["fine", "hello " * 20], "max_tokens": room}),
                         400, "max_tokens")
    assert error["message"].startswith("prompt 1: the model's context length")
    conversations = [[{"role": "user", "content": "fine"}], [{"role": "user", "content": long}]]
    error = assert_error(post(server, "/v1/chat/completions", {"messages": conversations}), 400, "messages")
    assert error["message"].startswith("messages: conversation 1: the prompt has ")
    error = assert_error(post(server, "/v1/completions", {"prompt": ["a", "b"], "logit_bias": {str(10**6): 1}}),
                         400, "logit_bias")
    assert not error["message"].startswith("prompt")


@pytest.mark.parametrize(("path", "field"), [("/v1/completions", "max_tokens"), ("/v1/chat/completions", "max_tokens"),
                                             ("/v1/chat/completions", "max_completion_tokens"),
                                             ("/v1/responses", "max_output_tokens")])
def test_a_prompt_and_answer_past_the_context_give_400_naming_the_field_sent(server, llm, path, field):
    """The prompt fits, the answer asked for does not: the 400 names the lengths and the field the client sent
    (the engine checks the sampling parameter max_tokens, whatever the endpoint calls it)."""
    limit = llm.engine.max_model_len
    body = {"/v1/completions": {"prompt": "hello there"}, "/v1/responses": {"input": "hello there"},
            "/v1/chat/completions": {"messages": [{"role": "user", "content": "hello there"}]}}[path]
    error = assert_error(post(server, path, {**body, field: limit}), 400, field)
    assert str(limit) in error["message"] and f"{limit} in {field}" in error["message"]
    assert f"lower {field} " in error["message"]
    others = {"max_tokens", "max_completion_tokens", "max_output_tokens"} - {field}
    assert not any(name in error["message"] for name in others), error["message"]
    if path != "/v1/responses":  # min_tokens (an extension) past the limit: the limit goes by its name too
        error = assert_error(post(server, path, {**body, field: 5, "min_tokens": 10}), 400, "min_tokens")
        assert field in error["message"] and not any(name in error["message"] for name in others), error["message"]


def test_return_token_ids_gives_the_prompt_and_answer_ids_whole_and_streamed(client, llm):
    """vLLM's ``return_token_ids``: each choice's generated ids (the ids the offline engine generates) and its
    prompt's; streamed, the prompt's ids come in a choice's first chunk and the chunks' ids add up to the answer's."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = ["hello world", "the quick brown fox"]
    offline = llm.generate(prompts, params, use_tqdm=False)
    body = {"return_token_ids": True, "ignore_eos": True}
    whole = client.completions.create(model="tiny", prompt=prompts, max_tokens=12, temperature=0,
                                      extra_body=body)
    for choice, expected in zip(whole.choices, offline, strict=True):
        assert choice.model_extra["token_ids"] == expected.outputs[0].token_ids
        assert choice.model_extra["prompt_token_ids"] == expected.prompt_token_ids
    stream = client.completions.create(model="tiny", prompt=prompts, max_tokens=12, temperature=0, stream=True,
                                       extra_body=body)
    ids: dict[int, list[int]] = {}
    prompt_ids: dict[int, list[int]] = {}
    for chunk in stream:
        for choice in chunk.choices:
            first = choice.index not in ids
            ids.setdefault(choice.index, []).extend(choice.model_extra["token_ids"])
            if "prompt_token_ids" in choice.model_extra:  # in a choice's first chunk only
                assert first
                prompt_ids[choice.index] = choice.model_extra["prompt_token_ids"]
    assert [ids[i] for i in range(2)] == [o.outputs[0].token_ids for o in offline]
    assert [prompt_ids[i] for i in range(2)] == [o.prompt_token_ids for o in offline]

    messages = [{"role": "user", "content": "hello"}]
    chat_offline = llm.chat(messages, params, use_tqdm=False)[0]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                          extra_body=body)
    assert chat.choices[0].model_extra["token_ids"] == chat_offline.outputs[0].token_ids
    assert chat.model_extra["prompt_token_ids"] == chat_offline.prompt_token_ids
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, extra_body=body))
    assert chunks[0].model_extra["prompt_token_ids"] == chat_offline.prompt_token_ids
    streamed = [t for c in chunks for ch in c.choices for t in ch.model_extra["token_ids"]]
    assert streamed == chat_offline.outputs[0].token_ids
    plain = client.completions.create(model="tiny", prompt="hello", max_tokens=2)
    assert "token_ids" not in (plain.choices[0].model_extra or {})
