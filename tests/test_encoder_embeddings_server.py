"""``/v1/embeddings`` of a BERT encoder on a real ``inferneo serve`` over HTTP: the ``openai`` package's
``embeddings.create`` (base64 and float) against sentence-transformers on the same tiny ``BertModel`` folder, a
batch of many lengths, token-id inputs, and the 400s: generation requests and inputs past the model's length."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from inferneo.testing.encoder_models import make_tiny_encoder
from inferneo.testing.server import RemoteServer
from inferneo.testing.tiny_models import _CORPUS

NAME = "sentence-transformers/all-MiniLM-L6-v2"
MAX_SEQ = 64  # the folder's sentence_bert_config max_seq_length (its positions hold 96)
WORDS = _CORPUS.split()
TEXTS = ["hello world", "a"] + [
    " ".join(WORDS[i : i + n]) for i, n in enumerate([30, 4, 17, 40, 9, 25, 2, 12])
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_encoder(tmp_path_factory.mktemp("bert-server"), "bert", "mean", max_seq_length=MAX_SEQ)


@pytest.fixture(scope="module")
def server(model_dir):
    with RemoteServer(
        model_dir, "--served-model-name", NAME, "--max-num-seqs", "4", "--disable-access-log"
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(model_dir) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir), device="cpu").encode(TEXTS)


def min_cosine(a, b) -> float:
    a, b = (torch.as_tensor(np.asarray(x, dtype=np.float32)) for x in (a, b))
    return float(torch.nn.functional.cosine_similarity(a, b).min())


def test_openai_client_equals_sentence_transformers(server, reference, model_dir):
    from openai import OpenAI
    from transformers import AutoTokenizer

    client = OpenAI(base_url=server.url("/v1"), api_key="EMPTY")
    by_base64 = client.embeddings.create(model=NAME, input=TEXTS)  # the client asks for base64 and decodes it
    by_float = client.embeddings.create(model=NAME, input=TEXTS, encoding_format="float")
    for response in (by_base64, by_float):
        assert [d.index for d in response.data] == list(range(len(TEXTS))) and response.model == NAME
        assert min_cosine([d.embedding for d in response.data], reference) > 1 - 1e-5
    assert np.array_equal(
        np.asarray([d.embedding for d in by_base64.data], np.float32),
        np.asarray([d.embedding for d in by_float.data], np.float32),
    )
    ids = [AutoTokenizer.from_pretrained(model_dir)(t).input_ids for t in TEXTS]
    assert by_float.usage.prompt_tokens == sum(map(len, ids)) and max(map(len, ids)) > 40
    by_ids = client.embeddings.create(model=NAME, input=ids, encoding_format="float")
    assert min_cosine([d.embedding for d in by_ids.data], reference) > 1 - 1e-5
    one = client.embeddings.create(model=NAME, input=TEXTS[2])
    assert min_cosine([one.data[0].embedding], reference[2:3]) > 1 - 1e-5


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "hello", "max_tokens": 3}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}),
        ("/v1/responses", {"input": "hello", "max_output_tokens": 16}),
    ],
)
def test_generation_is_a_400(server, path, body):
    r = httpx.post(server.url(path), json={"model": NAME, **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "model" and "cannot generate" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"input": [5] * (MAX_SEQ + 1)}, f"{MAX_SEQ + 1} tokens"),
        ({"input": " ".join(WORDS[:80])}, "shorten it"),
        ({"input": [[2, 5, 3], [5] * (MAX_SEQ + 1)]}, "input 1"),
    ],
)
def test_too_long_input_is_a_400_naming_input(server, body, words):
    r = httpx.post(server.url("/v1/embeddings"), json={"model": NAME, **body}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "input" and words in error["message"], error


def test_the_longest_input_is_served(server):
    r = httpx.post(server.url("/v1/embeddings"), json={"model": NAME, "input": [5] * MAX_SEQ}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == MAX_SEQ


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/score", {"text_1": "a", "text_2": "b"}), ("/v1/rerank", {"query": "a", "documents": ["b"]})],
)
def test_an_embedding_model_does_not_score(server, path, body):
    r = httpx.post(server.url(path), json={"model": NAME, **body}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "model" and "does not score pairs" in error["message"], error


def test_truncate_prompt_tokens_over_http(server, model_dir):
    """vLLM's ``truncate_prompt_tokens`` through the ``openai`` client: an over-long text is cut by the tokenizer
    (sentence-transformers' vector at that ``max_seq_length``), -1 cuts it to the model's length (what
    sentence-transformers does by default), token ids keep their last tokens."""
    from openai import OpenAI
    from sentence_transformers import SentenceTransformer

    client = OpenAI(base_url=server.url("/v1"), api_key="EMPTY")
    reference = SentenceTransformer(str(model_dir), device="cpu")
    text = " ".join(WORDS[:100])
    ids = reference.tokenizer(text).input_ids
    assert len(ids) > MAX_SEQ
    for keep, cut in ((12, 12), (-1, MAX_SEQ)):
        reference.max_seq_length = cut
        expected = reference.encode([text, TEXTS[0]])
        got = client.embeddings.create(
            model=NAME, input=[text, TEXTS[0]], extra_body={"truncate_prompt_tokens": keep}
        )
        assert got.usage.prompt_tokens == cut + len(reference.tokenizer(TEXTS[0]).input_ids)
        assert min_cosine([d.embedding for d in got.data], expected) > 1 - 1e-5
    tail = client.embeddings.create(model=NAME, input=[ids], extra_body={"truncate_prompt_tokens": 9})
    exact = client.embeddings.create(model=NAME, input=[ids[-9:]])
    assert tail.usage.prompt_tokens == 9 and tail.data[0].embedding == exact.data[0].embedding
    one = httpx.post(
        server.url("/v1/embeddings"), json={"model": NAME, "input": ids, "truncate_prompt_tokens": 1}
    )
    assert one.status_code == 200 and one.json()["usage"]["prompt_tokens"] == 1, one.text


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"input": "hello", "truncate_prompt_tokens": 0}, "at least 1"),
        ({"input": "hello", "truncate_prompt_tokens": -2}, "greater than or equal to -1"),
        ({"input": "hello", "truncate_prompt_tokens": "5"}, ""),
        (
            {"input": "hello", "truncate_prompt_tokens": MAX_SEQ + 1},
            f"more than an input may have ({MAX_SEQ}",
        ),
        ({"input": ["hello", "world"], "truncate_prompt_tokens": 1}, "2 special tokens"),
    ],
)
def test_bad_truncate_prompt_tokens_is_a_400(server, body, words):
    r = httpx.post(server.url("/v1/embeddings"), json={"model": NAME, **body}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "truncate_prompt_tokens" and words in error["message"], error
