"""``POST /classify`` (vLLM's endpoint; and ``/v1/classify``) of a decoder sequence classifier on a real
``inferneo serve`` over HTTP, against transformers' ``AutoModelForSequenceClassification`` on the same tiny
``Qwen2ForSequenceClassification``; a one-label ``LlamaForSequenceClassification`` serving ``/v1/score`` and
``/v1/rerank`` as a cross-encoder; and the refusals: bad bodies, over-long inputs, a generative model asked to
classify, a classifier asked to generate or embed."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from test_decoder_classifier import hf_logits

from inferneo.testing.server import RemoteServer
from inferneo.testing.tiny_models import _CORPUS, make_tiny_checkpoint

NAME = "jason9693/Qwen2.5-1.5B-apeach"
LABELS = ["Default", "Spoiled", "Hateful"]
WORDS = _CORPUS.split()
TEXTS = ["hello there", " ".join(WORDS[:20]), "a", " ".join(WORDS[5:12])]
MAX_LEN = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("classifier"), "qwen2", labels=LABELS, seed=3)


@pytest.fixture(scope="module")
def server(model_dir):
    with RemoteServer(
        model_dir,
        "--served-model-name",
        NAME,
        "--max-num-seqs",
        "4",
        "--max-model-len",
        str(MAX_LEN),
        "--max-num-batched-tokens",
        "16",
        "--dtype",
        "float32",
        "--disable-access-log",
    ) as srv:
        yield srv


def post(server, path: str, body: dict, model: str = NAME) -> httpx.Response:
    return httpx.post(server.url(path), json={"model": model, **body}, timeout=60)


@pytest.mark.parametrize("path", ["/classify", "/v1/classify", "/invocations"])  # SageMaker's: input -> classify
def test_classify_equals_transformers(server, model_dir, path):
    expected = torch.softmax(hf_logits(model_dir, TEXTS), dim=-1).numpy()
    r = post(server, path, {"input": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == NAME and body["id"].startswith("classify-")
    assert isinstance(body["created"], int)
    assert [d["index"] for d in body["data"]] == list(range(len(TEXTS)))
    np.testing.assert_allclose([d["probs"] for d in body["data"]], expected, atol=1e-4, rtol=0)
    assert [d["label"] for d in body["data"]] == [LABELS[i] for i in expected.argmax(1)]
    assert {d["num_classes"] for d in body["data"]} == {len(LABELS)}
    from transformers import AutoTokenizer

    tokens = sum(len(AutoTokenizer.from_pretrained(model_dir)(t).input_ids) for t in TEXTS)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == tokens
    # one string, and token ids, give the same answers
    one = post(server, path, {"input": TEXTS[1]}).json()["data"]
    assert len(one) == 1 and np.allclose(one[0]["probs"], expected[1], atol=1e-4)
    ids = AutoTokenizer.from_pretrained(model_dir)(TEXTS[3]).input_ids
    by_ids = post(server, path, {"input": ids}).json()["data"]
    assert np.allclose(by_ids[0]["probs"], expected[3], atol=1e-4)


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"input": ""}, "input", "empty"),
        ({"input": []}, "input", ""),
        ({"input": 3}, "input", ""),
        ({"input": ["ok", None]}, "input", ""),
        ({"input": ["ok", " ".join(WORDS[:80])]}, "input", "input 1"),
        ({"input": [[1, 2], [10**6]]}, "input", ""),
        ({}, "input", ""),
        ({"input": "ok", "priority": 1}, "priority", ""),
    ],
)
def test_bad_classify_requests_are_400s_naming_the_field(server, body, param, words):
    r = post(server, "/classify", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error", (
        error
    )


@pytest.mark.parametrize(
    "path, body, words",
    [
        ("/v1/completions", {"prompt": "hello", "max_tokens": 2}, "cannot generate"),
        ("/v1/embeddings", {"input": "hello"}, "does not embed"),
        ("/v1/score", {"text_1": "a", "text_2": "b"}, "one label; this one has 3"),
    ],
)
def test_a_classifier_refuses_other_tasks(server, path, body, words):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "model" and words in error["message"], error


def test_the_docs_classify_example_gets_an_answer(server):
    """The ``curl`` example of ``docs/embeddings.md``'s sequence-classifier section, run as written against this
    server."""
    import json
    import re
    import subprocess

    page = (Path(__file__).resolve().parents[1] / "docs" / "embeddings.md").read_text()
    (command,) = re.findall(
        r"^(curl -s localhost:8000/classify .*?)\n```", page, flags=re.DOTALL | re.MULTILINE
    )
    command = command.replace("localhost:8000", server.base_url.removeprefix("http://"))
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert [d["index"] for d in reply["data"]] == [0, 1], reply
    assert all(d["label"] in LABELS and abs(sum(d["probs"]) - 1) < 1e-5 for d in reply["data"]), reply


def test_a_generative_model_does_not_classify(hermes_server):
    r = post(hermes_server, "/classify", {"input": "hello"}, model="tiny")
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "model" and "does not classify" in error["message"], error


def test_a_one_label_decoder_reranks(tmp_path):
    """num_labels 1: ``/v1/score`` and ``/v1/rerank`` score (query, document) pairs as the sigmoid of the logit of
    the pair read as one input, and ``/classify`` answers the sigmoid of one input's logit."""
    path = make_tiny_checkpoint(tmp_path / "reranker", "llama", labels=["relevant"], seed=4)
    query, docs = "what is it?", TEXTS[:3]
    expected = torch.sigmoid(hf_logits(path, [(query, d) for d in docs])[:, 0]).numpy()
    alone = torch.sigmoid(hf_logits(path, docs)[:, 0]).numpy()
    with RemoteServer(path, "--served-model-name", NAME, "--dtype", "float32", "--disable-access-log") as srv:
        scores = post(srv, "/v1/score", {"text_1": query, "text_2": docs}).json()["data"]
        ranked = post(srv, "/v1/rerank", {"query": query, "documents": docs}).json()["results"]
        classified = post(srv, "/classify", {"input": docs}).json()["data"]
    np.testing.assert_allclose([s["score"] for s in scores], expected, atol=1e-4, rtol=0)
    assert [x["index"] for x in ranked] == list(np.argsort(-expected))
    np.testing.assert_allclose([c["probs"][0] for c in classified], alone, atol=1e-4, rtol=0)
    assert {c["label"] for c in classified} == {"relevant"} and {c["num_classes"] for c in classified} == {1}


def test_truncate_prompt_tokens_cuts_an_over_long_input(server, model_dir):
    """vLLM's ``truncate_prompt_tokens`` on ``/classify``: an input past the context length is cut as the tokenizer
    truncates (its end goes) instead of refused, and classified as transformers classifies the cut tokens."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    text = " ".join(WORDS[:200])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer(text).input_ids) > MAX_LEN
    assert post(server, "/classify", {"input": text}).status_code == 400
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    for keep, cut in ((20, 20), (-1, MAX_LEN)):
        ids = tokenizer(text, truncation=True, max_length=cut).input_ids
        with torch.no_grad():
            expected = torch.softmax(model(torch.tensor([ids])).logits[0], dim=-1).numpy()
        r = post(server, "/classify", {"input": [text], "truncate_prompt_tokens": keep})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == cut
        np.testing.assert_allclose(r.json()["data"][0]["probs"], expected, atol=1e-4, rtol=0)
    bad = post(server, "/classify", {"input": text, "truncate_prompt_tokens": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "truncate_prompt_tokens"
