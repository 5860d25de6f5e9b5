"""``/v1/score`` and ``/v1/rerank`` (and ``/v2/rerank``) of a cross-encoder on a real ``inferneo serve`` over HTTP,
against sentence-transformers' ``CrossEncoder.predict`` on the same tiny ``XLMRobertaForSequenceClassification``;
a BERT reranker (token types) too; the refusals: bad bodies, over-long pairs, embedding and generation requests to a cross-encoder."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from inferneo.testing.encoder_models import make_tiny_encoder
from inferneo.testing.server import RemoteServer
from inferneo.testing.tiny_models import _CORPUS

NAME = "BAAI/bge-reranker-v2-m3"
MAX_LEN = 94  # the tiny model's 96 positions, past RoBERTa's padding index
QUERY = "what is the capital of france?"
WORDS = _CORPUS.split()
DOCS = ["Paris is the capital of France.", "bananas are yellow", "a"] + [
    " ".join(WORDS[i : i + n]) for i, n in enumerate([30, 6, 12])
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_encoder(
        tmp_path_factory.mktemp("reranker"), "xlm_roberta", None, head="classifier", seed=1
    )


@pytest.fixture(scope="module")
def server(model_dir):
    with RemoteServer(
        model_dir, "--served-model-name", NAME, "--max-num-seqs", "4", "--disable-access-log"
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def expected(model_dir) -> np.ndarray:
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(model_dir), device="cpu").predict([(QUERY, d) for d in DOCS])


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url(path), json={"model": NAME, **body}, timeout=60)


def test_score_equals_cross_encoder(server, expected):
    r = post(server, "/v1/score", {"text_1": QUERY, "text_2": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == NAME
    assert [d["index"] for d in body["data"]] == list(range(len(DOCS)))
    assert {d["object"] for d in body["data"]} == {"score"}
    np.testing.assert_allclose([d["score"] for d in body["data"]], expected, atol=1e-5, rtol=0)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    alias = post(server, "/score", {"text_1": QUERY, "text_2": DOCS})  # vLLM's unversioned path
    assert alias.json()["data"] == body["data"]
    pairwise = post(server, "/v1/score", {"text_1": [QUERY, QUERY], "text_2": DOCS[:2]}).json()
    np.testing.assert_allclose([d["score"] for d in pairwise["data"]], expected[:2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank", "/rerank"])
def test_rerank_sorts_by_cross_encoder_score(server, expected, path):
    r = post(server, path, {"query": QUERY, "documents": DOCS, "top_n": 4})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    order = list(np.argsort(-expected))[:4]
    assert [x["index"] for x in results] == order
    np.testing.assert_allclose([x["relevance_score"] for x in results], expected[order], atol=1e-5, rtol=0)
    assert [x["document"]["text"] for x in results] == [DOCS[i] for i in order]
    bare = post(server, path, {"query": QUERY, "documents": DOCS[:2], "return_documents": False}).json()[
        "results"
    ]
    assert len(bare) == 2 and "document" not in bare[0]
    assert r.json()["usage"]["total_tokens"] > 0


@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [
        ("/v1/score", {"text_1": [QUERY, QUERY], "text_2": DOCS[:3]}, "text_1", "lists of one length"),
        ("/v1/score", {"text_1": "", "text_2": "x"}, "text_1", "empty string"),
        ("/v1/score", {"text_1": "q", "text_2": []}, "text_2", "at least one text"),
        ("/v1/score", {"text_1": "q", "text_2": 5}, "text_2", "a string or a list of strings"),
        ("/v1/score", {"text_1": "q", "text_2": " ".join(WORDS[:120])}, "text_2", "the pair has"),
        ("/v1/rerank", {"query": "q", "documents": ["ok", " ".join(WORDS[:120])]}, "documents", "pair 1"),
        (
            "/v1/rerank",
            {"query": "q", "documents": ["ok", ""]},
            "documents",
            "documents 1 is an empty string",
        ),
        ("/v1/rerank", {"query": "q", "documents": ["ok"], "top_n": 0}, "top_n", ""),
        ("/v1/rerank", {"query": "q", "documents": ["ok"], "rank_fields": ["x"]}, "rank_fields", ""),
        ("/v1/embeddings", {"input": "hello"}, "model", "cross-encoder"),
        ("/v1/completions", {"prompt": "hello", "max_tokens": 2}, "model", "cannot generate"),
    ],
)
def test_bad_requests_are_400s_naming_the_field(server, path, body, param, words):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_the_docs_rerank_example_gets_an_answer(server):
    """The ``curl`` example of ``docs/embeddings.md``'s cross-encoder section, run as written against this
    server."""
    import json
    import re
    import subprocess

    page = (Path(__file__).resolve().parents[1] / "docs" / "embeddings.md").read_text()
    (command,) = re.findall(
        r"^(curl -s localhost:8000/v1/rerank .*?)\n```", page, flags=re.DOTALL | re.MULTILINE
    )
    command = command.replace("localhost:8000", server.base_url.removeprefix("http://"))
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    texts = sorted(r["document"]["text"] for r in reply["results"])
    assert texts == ["Bananas are yellow.", "Paris is the capital of France."], reply
    scores = [r["relevance_score"] for r in reply["results"]]
    assert scores == sorted(scores, reverse=True)


def test_a_bert_reranker_over_http(tmp_path):
    """A ``BertForSequenceClassification`` reranker (its documents are token type 1) through ``/v1/rerank``."""
    from sentence_transformers import CrossEncoder

    path = make_tiny_encoder(tmp_path / "bert-reranker", "bert", None, head="classifier", seed=2)
    expected = CrossEncoder(str(path), device="cpu").predict([(QUERY, d) for d in DOCS])
    with RemoteServer(path, "--served-model-name", NAME, "--disable-access-log") as srv:
        results = post(srv, "/v1/rerank", {"query": QUERY, "documents": DOCS}).json()["results"]
    assert [x["index"] for x in results] == list(np.argsort(-expected))
    np.testing.assert_allclose(
        [x["relevance_score"] for x in results], np.sort(expected)[::-1], atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("path", ["/v1/score", "/score", "/v1/rerank", "/v2/rerank", "/rerank"])
def test_truncate_prompt_tokens_over_http(server, model_dir, path):
    """vLLM's ``truncate_prompt_tokens`` on every scoring path: each over-long pair is cut by the tokenizer, the
    longer text first, so its score is ``CrossEncoder.predict``'s at that ``max_length`` (-1: the model's length);
    without it the pair is a 400; bad values are 400s naming the field."""
    from sentence_transformers import CrossEncoder

    long_doc = " ".join(WORDS[:140])
    docs = [long_doc, DOCS[0]]
    reference = CrossEncoder(str(model_dir), device="cpu")

    def scores(extra: dict) -> httpx.Response:
        body = {"text_1": QUERY, "text_2": docs} if "score" in path else {"query": QUERY, "documents": docs}
        return post(server, path, {**body, **extra})

    assert scores({}).status_code == 400
    for keep, cut in ((24, 24), (-1, MAX_LEN)):
        reference.max_seq_length = cut
        expected = reference.predict([(QUERY, d) for d in docs])
        r = scores({"truncate_prompt_tokens": keep})
        assert r.status_code == 200, r.text
        if "score" in path:
            got = [d["score"] for d in r.json()["data"]]
            assert r.json()["usage"]["prompt_tokens"] == cut + len(
                reference.tokenizer(QUERY, DOCS[0]).input_ids
            )
        else:
            got = [x["relevance_score"] for x in sorted(r.json()["results"], key=lambda x: x["index"])]
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    for bad, words in ((0, "at least 1"), (3, "4 special tokens"), (MAX_LEN + 1, "more than"), (True, "")):
        r = scores({"truncate_prompt_tokens": bad})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "truncate_prompt_tokens" and words in error["message"], error
