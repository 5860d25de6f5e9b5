"""vLLM's ``use_beam_search`` over real HTTP with the ``openai`` client: completions (several prompts, streamed too)
and chat give Hugging Face's beams, best first; the fields a beam search cannot honour are 400s naming them."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from test_beam_search import hf_beams
from transformers import AutoModelForCausalLM, AutoTokenizer

from inferneo.testing.server import RemoteServer

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with RemoteServer(tiny_llama_dir, "--served-model-name", MODEL, "--kv-cache-memory", "32MiB",
                      "--num-threads", "1", "--block-size", "4", "--disable-access-log") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def expected_texts(hf_model, tokenizer, prompt_ids: list[int], width: int, max_new: int) -> list[str]:
    ids, _ = hf_beams(hf_model, prompt_ids, width, max_new)
    return [tokenizer.decode(i, skip_special_tokens=True) for i in ids]


def test_completions_give_the_beams_best_first_for_each_prompt(client, tokenizer, hf_model):
    prompts = ["the cat sat on", "hello world and"]
    width, max_new = 3, 5
    body = {"use_beam_search": True, "ignore_eos": True}
    response = client.completions.create(model=MODEL, prompt=prompts, n=width, max_tokens=max_new,
                                         extra_body=body)
    assert [c.index for c in response.choices] == list(range(len(prompts) * width))
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt).input_ids
        got = [c.text for c in response.choices[i * width:(i + 1) * width]]
        assert got == expected_texts(hf_model, tokenizer, ids, width, max_new)
        assert all(c.finish_reason == "length" for c in response.choices[i * width:(i + 1) * width])
    prompt_tokens = sum(len(tokenizer(p).input_ids) for p in prompts)
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.completion_tokens == len(prompts) * width * max_new

    stream = client.completions.create(model=MODEL, prompt=prompts, n=width, max_tokens=max_new, stream=True,
                                       stream_options={"include_usage": True}, extra_body=body)
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert [texts[k] for k in sorted(texts)] == [c.text for c in response.choices]
    assert set(finishes.values()) == {"length"} and len(finishes) == len(prompts) * width
    assert usage.completion_tokens == response.usage.completion_tokens


def test_chat_gives_the_beams_of_the_rendered_conversation(client, tokenizer, hf_model):
    messages = [{"role": "user", "content": "name a colour"}]
    width, max_new = 2, 4
    response = client.chat.completions.create(model=MODEL, messages=messages, n=width, max_tokens=max_new,
                                              extra_body={"use_beam_search": True, "ignore_eos": True,
                                                          "length_penalty": 0.5})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert [c.message.content for c in response.choices] == expected_texts(hf_model, tokenizer, ids, width,
                                                                           max_new)
    assert [c.index for c in response.choices] == [0, 1]


@pytest.mark.parametrize("body, param", [
    ({"use_beam_search": True, "temperature": 0.7}, "temperature"),
    ({"use_beam_search": True, "n": 11}, "n"),
    ({"use_beam_search": True, "logprobs": 2}, "logprobs"),
    ({"use_beam_search": True, "stop": ["x"]}, "stop"),
    ({"use_beam_search": True, "top_p": 0.5}, "top_p"),
    ({"use_beam_search": True, "structured_outputs": {"regex": "[a-z]+"}}, "structured_outputs"),
    ({"length_penalty": 2.0}, "length_penalty"),
    ({"use_beam_search": "true"}, "use_beam_search"),
    ({"use_beam_search": True, "prompt": ["ok", "x " * 3000]}, "prompt"),
])
def test_what_beam_search_cannot_honour_is_a_400_naming_it(server, body, param):
    payload = {"model": MODEL, "prompt": "hello", "max_tokens": 3, **body}
    response = httpx.post(server.url("/v1/completions"), json=payload, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    if param == "prompt":
        assert error["message"].startswith("prompt 1:"), error


def test_chat_refuses_logprobs_and_forced_tool_calls(server):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for body, param in [({"logprobs": True}, "logprobs"), ({"tools": [tool], "tool_choice": "required"},
                                                           "tool_choice")]:
        payload = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                   "use_beam_search": True, **body}
        response = httpx.post(server.url("/v1/chat/completions"), json=payload, timeout=60)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param


def test_the_server_serves_other_requests_after_beam_searches(client):
    response = client.completions.create(model=MODEL, prompt="the cat", max_tokens=4, temperature=0)
    assert response.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="the cat", max_tokens=4, extra_body={"length_penalty": 2})
