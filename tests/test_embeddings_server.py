"""``/v1/embeddings`` on a real ``inferneo serve`` over HTTP: the ``openai`` package's ``embeddings.create``
(base64, decoded by the client, and float) against sentence-transformers on the same tiny model, the four input
forms, generation from the same server, bad input, and the examples of ``docs/embeddings.md``."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from inferneo.testing.embedding_models import make_tiny_embedding_model
from inferneo.testing.server import RemoteServer

REPO = Path(__file__).resolve().parents[1]
NAME = "Qwen/Qwen3-Embedding-0.6B"  # the served name the docs use
TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog", "retrieval from the same server"]
MAX_MODEL_LEN = 128


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_embedding_model(tmp_path_factory.mktemp("st-mean-server"), "mean", "qwen3")


@pytest.fixture(scope="module")
def server(model_dir):
    with RemoteServer(model_dir, "--served-model-name", NAME, "--max-model-len", str(MAX_MODEL_LEN),
                      "--kv-cache-memory", "16MiB", "--max-num-batched-tokens", "32",
                      "--disable-access-log") as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(model_dir) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir), device="cpu").encode(TEXTS)


def min_cosine(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(torch.as_tensor(np.asarray(a, dtype=np.float32)),
                                                       torch.as_tensor(np.asarray(b, dtype=np.float32))).min())


def test_openai_client_equals_sentence_transformers(server, reference, model_dir):
    from openai import OpenAI
    from transformers import AutoTokenizer

    client = OpenAI(base_url=server.url("/v1"), api_key="EMPTY")
    by_base64 = client.embeddings.create(model=NAME, input=TEXTS)  # the client asks for base64 and decodes it
    by_float = client.embeddings.create(model=NAME, input=TEXTS, encoding_format="float", user="someone")
    for response in (by_base64, by_float):
        assert [d.index for d in response.data] == [0, 1, 2] and response.model == NAME
        assert min_cosine([d.embedding for d in response.data], reference) > 1 - 1e-5
    assert np.array_equal(np.asarray([d.embedding for d in by_base64.data], np.float32),
                          np.asarray([d.embedding for d in by_float.data], np.float32))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = [tokenizer(t).input_ids for t in TEXTS]
    assert by_float.usage.prompt_tokens == by_float.usage.total_tokens == sum(map(len, ids))
    by_ids = client.embeddings.create(model=NAME, input=ids, encoding_format="float")
    assert min_cosine([d.embedding for d in by_ids.data], reference) > 1 - 1e-5
    one = client.embeddings.create(model=NAME, input=ids[1], encoding_format="float")
    assert len(one.data) == 1 and min_cosine([one.data[0].embedding], reference[1:2]) > 1 - 1e-5


def test_base64_is_little_endian_float32(server, reference):
    r = httpx.post(server.url("/v1/embeddings"), json={"model": NAME, "input": TEXTS[0], "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    vector = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert vector.shape == (reference.shape[1],) and min_cosine([vector], reference[:1]) > 1 - 1e-5


def test_the_same_server_generates(server):
    r = httpx.post(server.url("/v1/completions"), json={"model": NAME, "prompt": "hello", "max_tokens": 3,
                                                        "ignore_eos": True}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"input": ""}, "input", "empty"),
    ({"input": []}, "input", "must be"),
    ({"input": ["ok", ""]}, "input", "input 1 is an empty string"),
    ({"input": [[]]}, "input", "must be"),
    ({"input": [1] * (MAX_MODEL_LEN + 1)}, "input", "129 tokens"),
    ({"input": ["ok", [1] * (MAX_MODEL_LEN + 1)]}, "input", "must be"),
    ({"input": [[1, 2], [1] * (MAX_MODEL_LEN + 1)]}, "input", "input 1"),
    ({"input": 5}, "input", "must be"),
    ({"input": [1.5]}, "input", "must be"),
    ({"input": "hi", "encoding_format": "double"}, "encoding_format", "float"),
    ({"input": "hi", "dimensions": "8"}, "dimensions", "integer"),
    ({"input": "hi", "dimensions": 8}, "dimensions", "Matryoshka"),
    ({"input": "hi", "dimensions": 0}, "dimensions", "greater than or equal"),
    ({"input": "hi", "user": 3}, "user", "string"),
    ({"input": "hi", "truncate": True}, "truncate", "Unrecognized"),
    ({"input": [999999]}, "input", "[0, "),
])
def test_bad_input_is_a_400_naming_the_field(server, body, param, words):
    r = httpx.post(server.url("/v1/embeddings"), json={"model": NAME, **body}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_unknown_model_is_a_404(server):
    r = httpx.post(server.url("/v1/embeddings"), json={"model": "nope", "input": "hi"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.DOTALL | re.MULTILINE)


def test_docs_examples_run(server, model_dir, capsys):
    offline, online = python_blocks(REPO / "docs" / "embeddings.md")
    exec(compile(offline.replace(f'LLM("{NAME}")', f'LLM({str(model_dir)!r}, dtype="float32")'), "<offline>",
                 "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("64 [") and len(out.split(",")) == 2, out
    exec(compile(online.replace("http://localhost:8000", server.base_url), "<online>", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["0 64", "1 64"] and lines[2].startswith("prompt tokens: "), lines
    assert int(lines[2].split(": ")[1]) > 0
