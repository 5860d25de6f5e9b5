"""Images over HTTP: the openai client's chat completions with ``image_url`` parts (base64 data URLs) against a
real server on a tiny LLaVA, whole and streamed, equal the offline engine's answer for the same conversation; the
Responses API's ``input_image`` parts (openai's ``responses.create``; inline, or uploaded with ``files.create`` and
named by ``file_id``) and the Messages API's ``image`` blocks
(anthropic's ``messages.create``) answer as the chat endpoint does and count the image tokens as generation does;
bad images, placeholder mismatches and images sent to a text model are 400s in each API's error shape."""

from __future__ import annotations

import anthropic
import httpx
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
def server(llava_dir):
    with RemoteServer(llava_dir, "--served-model-name", "tiny-llava", "--dtype", "float32", "--max-model-len", "512",
                      "--kv-cache-memory", "16MiB", "--num-threads", "1") as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="x")


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0)


def ask(client, messages, **options):
    return client.chat.completions.create(**{"model": "tiny-llava", "messages": messages, "max_tokens": MAX_NEW,
                                             "temperature": 0, "extra_body": {"ignore_eos": True}, **options})


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
    ([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}], "need --allowed-local-media-path"),
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


def response_input(**image) -> list[dict]:
    """``chat_with_image``'s conversation as a Responses input (``image``: the input_image part's fields)."""
    return [{"role": "user", "content": [{"type": "input_text", "text": "look:"}, {"type": "input_image", **image},
                                         {"type": "input_text", "text": "what is it?"}]}]


def claude_messages(source: dict) -> list[dict]:
    """``chat_with_image``'s conversation as Anthropic messages (the image's ``source``)."""
    return [{"role": "user", "content": [{"type": "text", "text": "look:"}, {"type": "image", "source": source},
                                         {"type": "text", "text": "what is it?"}]}]


def base64_source(url: str) -> dict:
    header, data = url.split(",", 1)
    return {"type": "base64", "media_type": header[5:].removesuffix(";base64"), "data": data}


def test_responses_and_messages_read_images_as_chat_does(client, claude):
    pictures = images(2, seed=5)
    urls = [data_url(p) for p in pictures]
    chats = [ask(client, chat_with_image(p), extra_body={}) for p in pictures]  # greedy, to the model's end
    texts = [c.choices[0].message.content for c in chats]
    assert texts[0] != texts[1]
    for url, chat, text in zip(urls, chats, texts, strict=True):
        response = client.responses.create(model="tiny-llava", input=response_input(image_url=url, detail="low"),
                                           max_output_tokens=MAX_NEW, temperature=0)
        assert response.output_text == text
        assert response.usage.input_tokens == chat.usage.prompt_tokens
        counted = client.responses.input_tokens.count(model="tiny-llava", input=response_input(image_url=url))
        assert counted.input_tokens == chat.usage.prompt_tokens
        message = claude.messages.create(model="tiny-llava", messages=claude_messages(base64_source(url)),
                                         max_tokens=MAX_NEW, extra_body={"temperature": 0})
        assert "".join(block.text for block in message.content if block.type == "text") == text
        assert message.usage.input_tokens + message.usage.cache_read_input_tokens == chat.usage.prompt_tokens
        counted = claude.messages.count_tokens(model="tiny-llava", messages=claude_messages(base64_source(url)))
        assert counted.input_tokens == chat.usage.prompt_tokens


@pytest.mark.parametrize("image,message", [
    ({"image_url": "data:image/png;base64,@@"}, "not valid base64"),
    ({"image_url": "data:image/png;base64,aGk="}, "could not be decoded"),
    ({"image_url": 3}, "image_url: must be the image's URL"),
    ({"file_id": "file-abc"}, "file_id: no file 'file-abc' on this server"),
    ({"file_id": "file-abc", "image_url": "IMAGE"}, "by image_url or by file_id, not both"),
    ({"image_url": "IMAGE", "detail": "huge"}, "detail: must be"),
    ({"image_url": "IMAGE", "size": 3}, "unknown field 'size'"),
])
def test_bad_response_images_are_400s(client, image, message):
    image = {k: data_url(images(1)[0]) if v == "IMAGE" else v for k, v in image.items()}
    for count in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            if count:
                client.responses.input_tokens.count(model="tiny-llava", input=response_input(**image))
            else:
                client.responses.create(model="tiny-llava", input=response_input(**image), max_output_tokens=2)
        assert message in caught.value.body["message"]
        assert caught.value.body["param"] == "input"


def test_responses_read_uploaded_images_by_file_id(client):
    """An image uploaded through the Files API (openai's ``files.create(purpose="vision")``) answers as the same
    image inline; a batch input file is no image, and the upload's content comes back as the image it is."""
    import base64

    url = data_url(images(1, seed=8)[0])
    png = base64.b64decode(url.partition(",")[2])
    uploaded = client.files.create(file=("picture.png", png, "image/png"), purpose="vision")
    assert uploaded.purpose == "vision" and uploaded.bytes == len(png)
    assert client.files.content(uploaded.id).content == png
    inline, by_id = (client.responses.create(model="tiny-llava", input=response_input(**image), temperature=0,
                                             max_output_tokens=MAX_NEW)
                     for image in ({"image_url": url}, {"file_id": uploaded.id}))
    assert by_id.output_text == inline.output_text and by_id.usage.input_tokens == inline.usage.input_tokens
    batch_file = client.files.create(file=("in.jsonl", b'{"custom_id": "a"}\n'), purpose="batch")
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="tiny-llava", input=response_input(file_id=batch_file.id), max_output_tokens=2)
    assert "was uploaded with purpose 'batch'; images are uploaded with purpose 'vision'" in caught.value.message
    with pytest.raises(openai.BadRequestError, match="stores files of purpose"):
        client.files.create(file=("a.txt", b"hello"), purpose="assistants")
    client.files.delete(uploaded.id)
    client.files.delete(batch_file.id)


def test_images_outside_user_messages_are_400s(client, claude):
    part = {"type": "input_image", "image_url": data_url(images(1)[0])}
    with pytest.raises(openai.BadRequestError, match="images go in user messages"):
        client.responses.create(model="tiny-llava", max_output_tokens=2,
                                input=[{"role": "system", "content": [part]}, {"role": "user", "content": "hi"}])
    result = {"type": "tool_result", "tool_use_id": "toolu_1",
              "content": [{"type": "image", "source": base64_source(data_url(images(1)[0]))}]}
    with pytest.raises(anthropic.BadRequestError, match="images inside a tool_result are not supported"):
        claude.messages.create(model="tiny-llava", max_tokens=2, messages=[
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]},
            {"role": "user", "content": [result]}])


@pytest.mark.parametrize("source,words", [
    ({"type": "base64", "media_type": "image/png", "data": "@@"}, "not valid base64"),
    ({"type": "base64", "media_type": "image/png", "data": "aGk="}, "could not be decoded"),
    ({"type": "base64", "media_type": "image/bmp", "data": "aGk="}, "media_type"),
    ({"type": "url", "url": "file:///etc/passwd"}, "only data: URLs"),
    ({"type": "file", "file_id": "file_1"}, "source"),
])
def test_bad_message_images_are_400s_in_anthropics_shape(claude, source, words):
    for count in (False, True):
        with pytest.raises(anthropic.BadRequestError) as caught:
            if count:
                claude.messages.count_tokens(model="tiny-llava", messages=claude_messages(source))
            else:
                claude.messages.create(model="tiny-llava", max_tokens=2, messages=claude_messages(source))
        body = caught.value.body
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        assert words in body["error"]["message"] and "messages" in body["error"]["message"]


def test_a_text_model_answers_images_with_a_400(tiny_llama_dir):
    url = data_url(images(1)[0])
    with RemoteServer(tiny_llama_dir, "--served-model-name", "tiny", "--kv-cache-memory", "16MiB",
                      "--num-threads", "1") as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x")
        claude = anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="takes text only"):
            client.chat.completions.create(model="tiny", messages=chat_with_image(images(1)[0]), max_tokens=2)
        for count in (False, True):
            with pytest.raises(openai.BadRequestError, match="takes text only") as caught:
                if count:
                    client.responses.input_tokens.count(model="tiny", input=response_input(image_url=url))
                else:
                    client.responses.create(model="tiny", input=response_input(image_url=url), max_output_tokens=2)
            assert caught.value.body["param"] == "input"
            with pytest.raises(anthropic.BadRequestError) as caught:
                if count:
                    claude.messages.count_tokens(model="tiny", messages=claude_messages(base64_source(url)))
                else:
                    claude.messages.create(model="tiny", max_tokens=2, messages=claude_messages(base64_source(url)))
            assert caught.value.body["error"]["type"] == "invalid_request_error"
            assert caught.value.body["error"]["message"].startswith("messages: this model takes text only")


def test_streams_several_answers_and_tokenize_carry_the_images(client, claude, server):
    """Streamed Responses and Messages answers to an image equal the whole chat answer; n=2 sampled answers both
    read the image (seeded: the same twice); /tokenize counts the image tokens the answer's usage reports."""
    picture = images(1, seed=31)[0]
    url = data_url(picture)
    chat = ask(client, chat_with_image(picture), extra_body={})
    text = chat.choices[0].message.content
    events = list(client.responses.create(model="tiny-llava", input=response_input(image_url=url),
                                          max_output_tokens=MAX_NEW, temperature=0, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text
    assert events[-1].type == "response.incomplete"  # (the answer ran to max_output_tokens)
    with claude.messages.stream(model="tiny-llava", messages=claude_messages(base64_source(url)), max_tokens=MAX_NEW,
                                extra_body={"temperature": 0}) as stream:
        assert "".join(stream.text_stream) == text
    sampled = ask(client, chat_with_image(picture), n=2, temperature=1.0, seed=7)
    again = ask(client, chat_with_image(picture), n=2, temperature=1.0, seed=7)
    assert [c.message.content for c in sampled.choices] == [c.message.content for c in again.choices]
    assert sampled.usage.prompt_tokens == chat.usage.prompt_tokens
    counted = httpx.post(f"{server.base_url}/tokenize", json={"model": "tiny-llava", "messages":
                                                               chat_with_image(picture)}).json()
    assert counted["count"] == chat.usage.prompt_tokens
