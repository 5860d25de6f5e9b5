"""Images over HTTP: the openai client's chat completions with ``image_url`` parts (base64 data URLs) against a
real server on a tiny LLaVA, whole and streamed, equal the offline engine's answer for the same conversation; bad
images, placeholder mismatches and images sent to a text model are 400s in OpenAI's error shape."""

from __future__ import annotations

import openai
import pytest

from inferneo import LLM
from inferneo.testing.server import RemoteServer
from inferneo.testing.vision_models import make_tiny_llava
from tests.test_vision_language import GREEDY, MAX_NEW, chat_with_image, data_url, images


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def client(llava_dir):
    with RemoteServer(llava_dir, "--served-model-name", "tiny-llava", "--dtype", "float32", "--max-model-len", "512",
                      "--kv-cache-memory", "16MiB", "--num-threads", "1") as server:
        yield openai.OpenAI(base_url=server.base_url + "/v1", api_key="x")


def ask(client, messages, **options):
    return client.chat.completions.create(model="tiny-llava", messages=messages, max_tokens=MAX_NEW, temperature=0,
                                          extra_body={"ignore_eos": True}, **options)


def test_image_chat_equals_the_offline_engine(client, llava_dir):
    pictures = images(2, seed=11)
    answers = [ask(client, chat_with_image(p)) for p in pictures]
    llm = LLM(str(llava_dir), dtype="float32", max_model_len=512)
    offline = llm.chat([chat_with_image(p) for p in pictures], GREEDY, use_tqdm=False)
    assert [a.choices[0].message.content for a in answers] == [o.outputs[0].text for o in offline]
    assert answers[0].choices[0].message.content != answers[1].choices[0].message.content
    assert [a.usage.prompt_tokens for a in answers] == [len(o.prompt_token_ids) for o in offline]
    streamed = client.chat.completions.create(model="tiny-llava", messages=chat_with_image(pictures[0]),
                                              max_tokens=MAX_NEW, temperature=0, stream=True,
                                              extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == offline[0].outputs[0].text


@pytest.mark.parametrize("content,message", [
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}], "not valid base64"),
    ([{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}], "not an image"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}}], "could not be decoded"),
    ([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}], "only data: URLs"),
    ([{"type": "image_url", "image_url": "data:image/png;base64,aGk="}], "an image part is"),
    ([{"type": "image_url", "image_url": {"url": "x", "detail": "huge"}}], "detail must be"),
    ([{"type": "text", "text": "<image> and"}, {"type": "image_url", "image_url": {"url": "IMAGE"}}],
     "2 image placeholders"),
])
def test_bad_images_are_400s(client, content, message):
    url = data_url(images(1)[0])
    content = [{**p, "image_url": {**p["image_url"], "url": url}} if p.get("image_url") == {"url": "IMAGE"} else p
               for p in content]
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, [{"role": "user", "content": content}])
    assert message in caught.value.body["message"]
    assert caught.value.body["param"] == "messages"


def test_a_text_model_answers_images_with_a_400(tiny_llama_dir):
    with RemoteServer(tiny_llama_dir, "--served-model-name", "tiny", "--kv-cache-memory", "16MiB",
                      "--num-threads", "1") as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x")
        with pytest.raises(openai.BadRequestError, match="takes text only"):
            client.chat.completions.create(model="tiny", messages=chat_with_image(images(1)[0]), max_tokens=2)
