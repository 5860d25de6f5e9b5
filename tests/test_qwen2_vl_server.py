"""Qwen2-VL over HTTP: the openai client's chat completions with an ``image_url`` part (a base64 data URL) against
a real server on a tiny Qwen2-VL answer with Hugging Face's greedy tokens for the rendered prompt (the image
wrapped in Qwen's vision markers, its ``<|image_pad|>`` expanded to the image's grid), whole and streamed; a bad
image is a 400."""

from __future__ import annotations

import openai
import pytest
from transformers import AutoTokenizer

from inferneo import LLM
from inferneo.testing.server import RemoteServer
from inferneo.testing.vision_models import make_tiny_qwen2_vl
from tests.test_qwen2_vl import GREEDY, MAX_NEW, hf_greedy, images
from tests.test_vision_language import chat_with_image


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return make_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2-vl"))


@pytest.fixture(scope="module")
def server(qwen_dir):
    with RemoteServer(qwen_dir, "--served-model-name", "tiny-qwen2-vl", "--dtype", "float32", "--max-model-len",
                      "512", "--kv-cache-memory", "16MiB", "--num-threads", "1") as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="x")


def test_image_chat_answers_as_hugging_face(client, qwen_dir):
    first, second = images([(56, 84), (112, 112)], seed=3)
    answers = [client.chat.completions.create(model="tiny-qwen2-vl", messages=chat_with_image(p), max_tokens=MAX_NEW,
                                              temperature=0, extra_body={"ignore_eos": True})
               for p in (first, second)]
    offline = LLM(str(qwen_dir), dtype="float32", max_model_len=512).chat(
        [chat_with_image(p) for p in (first, second)], GREEDY, use_tqdm=False)
    tokenizer = AutoTokenizer.from_pretrained(str(qwen_dir))
    for answer, output, picture in zip(answers, offline, (first, second), strict=True):
        assert "look:\n<|vision_start|><|image_pad|><|vision_end|>\nwhat is it?" in output.prompt
        assert list(output.outputs[0].token_ids) == hf_greedy(qwen_dir, list(output.prompt_token_ids), [picture])
        assert answer.choices[0].message.content == output.outputs[0].text
        assert answer.usage.prompt_tokens == len(output.prompt_token_ids)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert [o.prompt_token_ids.count(pad) for o in offline] == [6, 16]  # 4×6 and 8×8 patches, merged 2×2
    assert answers[0].choices[0].message.content != answers[1].choices[0].message.content
    streamed = client.chat.completions.create(model="tiny-qwen2-vl", messages=chat_with_image(first),
                                              max_tokens=MAX_NEW, temperature=0, stream=True,
                                              extra_body={"ignore_eos": True})
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == answers[0].choices[0].message.content


def test_a_bad_image_is_a_400(client):
    messages = chat_with_image(images([(56, 56)])[0])
    messages[0]["content"][1]["image_url"]["url"] = "data:image/png;base64,@@@"
    with pytest.raises(openai.BadRequestError, match="not valid base64") as caught:
        client.chat.completions.create(model="tiny-qwen2-vl", messages=messages, max_tokens=2)
    assert caught.value.status_code == 400
