"""Gemma 3 images over HTTP: the openai client's chat completion with an ``image_url`` part (a base64 data URL)
against a real server on a tiny Gemma 3 answers with transformers' greedy tokens for the same conversation."""

from __future__ import annotations

import openai
import pytest

from inferneo import LLM, SamplingParams
from inferneo.testing.server import RemoteServer
from inferneo.testing.vision_models import make_tiny_gemma3
from tests.test_gemma3_vision import MAX_NEW, hf_greedy, images
from tests.test_vision_language import data_url


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    return make_tiny_gemma3(tmp_path_factory.mktemp("gemma3"))


@pytest.fixture(scope="module")
def client(gemma3_dir):
    with RemoteServer(gemma3_dir, "--served-model-name", "tiny-gemma3", "--dtype", "float32", "--max-model-len",
                      "512", "--kv-cache-memory", "16MiB", "--num-threads", "1") as server:
        yield openai.OpenAI(base_url=server.base_url + "/v1", api_key="x")


def conversation(picture) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "look at "},
                                         {"type": "image_url", "image_url": {"url": data_url(picture)}},
                                         {"type": "text", "text": " and say what it is"}]}]


def test_image_chat_equals_hugging_face(client, gemma3_dir):
    picture = images(1, seed=21)[0]
    answer = client.chat.completions.create(model="tiny-gemma3", messages=conversation(picture),
                                            max_tokens=MAX_NEW, temperature=0, extra_body={"ignore_eos": True})
    llm = LLM(str(gemma3_dir), dtype="float32", max_model_len=512)
    offline = llm.chat(conversation(picture), SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True),
                       use_tqdm=False)[0]
    prompt = list(offline.prompt_token_ids)
    assert prompt.count(383) == 4 and prompt.count(381) == 1  # the image's tokens, framed as Gemma 3 frames them
    assert list(offline.outputs[0].token_ids) == hf_greedy(gemma3_dir, prompt, [picture])[0]
    assert answer.choices[0].message.content == offline.outputs[0].text
    assert answer.usage.prompt_tokens == len(prompt)
