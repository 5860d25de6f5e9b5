"""Cross-encoders offline (``LLM.score``): tiny random ``XLMRobertaForSequenceClassification`` and
``RobertaForSequenceClassification`` rerankers score (query, document) pairs as sentence-transformers'
``CrossEncoder.predict`` does (sigmoid of the one logit, or the logit itself when the config says Identity), and
the rules: a cross-encoder does not embed or generate, an embedding model does not score."""

from __future__ import annotations

import json

import pytest
import torch

from inferneo import LLM, SamplingParams
from inferneo.engine.protocol import InvalidRequestError
from inferneo.testing.encoder_models import make_tiny_encoder
from inferneo.testing.tiny_models import _CORPUS

QUERY = "what is the capital of france?"
WORDS = _CORPUS.split()
DOCS = ["Paris is the capital of France.", "bananas are yellow", "a"] + [
    " ".join(WORDS[i : i + n]) for i, n in enumerate([30, 6, 45, 12])
]


@pytest.fixture(scope="module", params=["xlm_roberta", "roberta", "bert"])
def reranker(request, tmp_path_factory):
    path = make_tiny_encoder(tmp_path_factory.mktemp(request.param), request.param, None, head="classifier")
    return path, LLM(str(path), dtype="float32", max_num_seqs=4)


def test_scores_equal_cross_encoder(reranker):
    from sentence_transformers import CrossEncoder

    path, llm = reranker
    expected = torch.tensor(CrossEncoder(str(path), device="cpu").predict([(QUERY, d) for d in DOCS]))
    outputs = llm.score(QUERY, DOCS, use_tqdm=False)  # one query against every document
    got = torch.tensor([o.outputs.score for o in outputs], dtype=torch.float64)
    torch.testing.assert_close(got, expected.double(), atol=1e-5, rtol=0)
    assert bool(((got > 0) & (got < 1)).all())  # the sigmoid of the logit
    tokenizer = llm.get_tokenizer()
    assert [o.prompt_token_ids for o in outputs] == [tokenizer(QUERY, d).input_ids for d in DOCS]
    pairwise = llm.score([QUERY, DOCS[0]], [DOCS[1], DOCS[2]], use_tqdm=False)  # two lists, pair by pair
    torch.testing.assert_close(pairwise[0].outputs.score, outputs[1].outputs.score, atol=1e-6, rtol=0)
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.num_blocks


def test_bert_reads_the_document_as_token_type_1(reranker):
    """BERT's pairs: the document's tokens are of type 1 (its tokenizer says so, and the request carries where they
    start); scoring them all as type 0 would give other scores."""
    from transformers import AutoModelForSequenceClassification

    path, llm = reranker
    if llm.engine.info.architectures != ["BertForSequenceClassification"]:
        pytest.skip("BERT's token types only")
    types = llm.get_tokenizer()(QUERY, DOCS[0]).token_type_ids
    assert 0 in types and 1 in types
    typed = llm.score(QUERY, DOCS[0], use_tqdm=False)[0]
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([typed.prompt_token_ids])
    with torch.no_grad():
        as_type_0 = torch.sigmoid(model(ids).logits[0, 0]).item()
        as_pair = torch.sigmoid(model(ids, token_type_ids=torch.tensor([types])).logits[0, 0]).item()
    assert abs(typed.outputs.score - as_pair) < 1e-5 and abs(as_pair - as_type_0) > 1e-4


def test_truncate_prompt_tokens_cuts_the_longer_text_first(reranker):
    """vLLM's ``truncate_prompt_tokens``: each pair is cut by the tokenizer to that many tokens, the longer text
    first, so the score is ``CrossEncoder.predict``'s with that ``max_length``; -1 cuts to the model's length; a
    value below the pair's special tokens or above the model's length is a ValueError naming it."""
    from sentence_transformers import CrossEncoder

    path, llm = reranker
    limit = llm.engine.max_model_len
    tokenizer = llm.get_tokenizer()
    long_doc = " ".join(WORDS[:150])
    pairs = [(QUERY, long_doc), (long_doc, DOCS[0]), (QUERY, DOCS[0])]
    assert len(tokenizer(QUERY, long_doc).input_ids) > limit
    reference = CrossEncoder(str(path), device="cpu")
    for keep, cut in ((24, 24), (-1, limit)):
        reference.max_seq_length = cut
        expected = torch.tensor(reference.predict(pairs)).double()
        outputs = llm.score(
            [a for a, _ in pairs], [b for _, b in pairs], truncate_prompt_tokens=keep, use_tqdm=False
        )
        assert [o.prompt_token_ids for o in outputs] == [
            tokenizer(a, b, truncation=True, max_length=cut).input_ids for a, b in pairs
        ]
        assert len(outputs[0].prompt_token_ids) == cut and len(outputs[2].prompt_token_ids) < 24
        got = torch.tensor([o.outputs.score for o in outputs], dtype=torch.float64)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    special = tokenizer.num_special_tokens_to_add(pair=True)
    for bad, says in ((0, "at least 1"), (special - 1, "special tokens"), (limit + 1, "more than")):
        with pytest.raises(InvalidRequestError, match=says) as info:
            llm.score(QUERY, long_doc, truncate_prompt_tokens=bad, use_tqdm=False)
        assert info.value.param == "truncate_prompt_tokens"


def test_a_cross_encoder_classifies_one_input(reranker):
    """``LLM.classify`` on a cross-encoder (vLLM serves it): one text read alone through the head, the sigmoid of
    its one logit, as transformers' sequence classifier gives it."""
    from transformers import AutoModelForSequenceClassification

    path, llm = reranker
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = llm.get_tokenizer()
    with torch.no_grad():
        expected = [
            torch.sigmoid(model(tokenizer(d, return_tensors="pt").input_ids).logits[0]).tolist() for d in DOCS
        ]
    outputs = llm.classify(DOCS, use_tqdm=False)
    torch.testing.assert_close(
        torch.tensor([o.outputs.probs for o in outputs]), torch.tensor(expected), atol=1e-5, rtol=0
    )
    assert [o.prompt_token_ids for o in outputs] == [tokenizer(d).input_ids for d in DOCS]


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_an_encoder_classifier_of_several_labels(arch, tmp_path):
    """A BERT-family classifier of three labels (a sentiment or NLI model) classifies: the softmax of the logits of
    its first token through its head, as transformers gives it; it does not score pairs (one label needed)."""
    from transformers import AutoModelForSequenceClassification

    path = make_tiny_encoder(tmp_path / arch, arch, None, head="classifier", num_labels=3, seed=4)
    llm = LLM(str(path), dtype="float32")
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = llm.get_tokenizer()
    with torch.no_grad():
        expected = [
            torch.softmax(model(tokenizer(d, return_tensors="pt").input_ids).logits[0], -1) for d in DOCS
        ]
    got = torch.tensor([o.outputs.probs for o in llm.classify(DOCS, use_tqdm=False)])
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=0)
    with pytest.raises(InvalidRequestError, match="one label; this one has 3") as info:
        llm.score(QUERY, DOCS[0], use_tqdm=False)
    assert info.value.param == "model"


def test_a_cross_encoder_neither_embeds_nor_generates(reranker):
    _, llm = reranker
    with pytest.raises(InvalidRequestError, match="cross-encoder") as info:
        llm.embed("hello", use_tqdm=False)
    assert info.value.param == "model"
    with pytest.raises(InvalidRequestError, match="cannot generate"):
        llm.generate("hello", SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="lists of one length"):
        llm.score([QUERY, QUERY], DOCS, use_tqdm=False)


def test_identity_activation_gives_the_logit(tmp_path):
    """A cross-encoder whose ``config.json`` names sentence-transformers' Identity activation scores by the raw
    logit, as ``CrossEncoder.predict`` does."""
    from sentence_transformers import CrossEncoder

    path = make_tiny_encoder(tmp_path / "identity", "xlm_roberta", None, head="classifier", seed=3)
    config = json.loads((path / "config.json").read_text())
    config["sentence_transformers"] = {"activation_fn": "torch.nn.modules.linear.Identity"}
    (path / "config.json").write_text(json.dumps(config))
    expected = CrossEncoder(str(path), device="cpu").predict([(QUERY, d) for d in DOCS[:3]])
    got = [o.outputs.score for o in LLM(str(path), dtype="float32").score(QUERY, DOCS[:3], use_tqdm=False)]
    torch.testing.assert_close(
        torch.tensor(got, dtype=torch.float64), torch.tensor(expected).double(), atol=1e-5, rtol=0
    )


def test_an_embedding_model_does_not_score(tmp_path):
    path = make_tiny_encoder(tmp_path / "bert", "bert", "mean")
    with pytest.raises(InvalidRequestError, match="does not score pairs") as info:
        LLM(str(path), dtype="float32").score(QUERY, DOCS[:2], use_tqdm=False)
    assert info.value.param == "model"
