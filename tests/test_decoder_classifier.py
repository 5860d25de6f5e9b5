"""Decoder sequence classifiers offline (``LLM.classify``, and ``LLM.score`` for one label): tiny random
``LlamaForSequenceClassification`` / ``MistralForSequenceClassification`` / ``Qwen2ForSequenceClassification`` /
``Qwen3ForSequenceClassification`` / ``Gemma2ForSequenceClassification`` / ``Phi3ForSequenceClassification``
checkpoints give Hugging Face's ``AutoModelForSequenceClassification`` probabilities (softmax of the logits of the
last token) for prompts of different lengths in one batch, chunked over steps and read from the prefix cache; a
one-label classifier scores pairs as the sigmoid of its logit; and the rules: a classifier does not generate or
embed, a generative model does not classify, a classifier of several labels does not score."""

from __future__ import annotations

import pytest
import torch

from inferneo import LLM, SamplingParams
from inferneo.engine.protocol import InvalidRequestError, PoolingRequest
from inferneo.testing.tiny_models import _CORPUS, make_tiny_checkpoint

LABELS = ["negative", "neutral", "positive"]
WORDS = _CORPUS.split()
PROMPTS = ["hello there", " ".join(WORDS[:20]), "a", " ".join(WORDS[5:12]), " ".join(WORDS[3:30])]
STEP_TOKENS = 16  # tokens per engine step: the longer prompts run in chunks


def hf_logits(path, texts: list[str] | list[tuple[str, str]]) -> torch.Tensor:
    """Hugging Face's logits of each text (or pair, tokenized as the tokenizer joins two texts), one at a time
    (unpadded, so its last token is the one pooled)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # eager attention: transformers' SDPA path (its default for Gemma 2 in some releases, 5.17 among them) leaves
    # out Gemma 2's attention soft-capping, which the engine applies, as the eager path and the checkpoint do
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = []
    for text in texts:
        ids = tokenizer(*text if isinstance(text, tuple) else (text,), return_tensors="pt").input_ids
        with torch.no_grad():
            rows.append(model(ids).logits[0])
    return torch.stack(rows)


def classifier(path, **options) -> LLM:
    return LLM(
        str(path),
        dtype="float32",
        max_num_seqs=4,
        max_num_batched_tokens=STEP_TOKENS,
        max_model_len=128,
        **options,
    )


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3"])
def test_probs_equal_transformers(arch, tmp_path):
    path = make_tiny_checkpoint(tmp_path, arch, labels=LABELS)
    expected = torch.softmax(hf_logits(path, PROMPTS), dim=-1)
    llm = classifier(path)
    tokenizer = llm.get_tokenizer()
    assert max(len(tokenizer(p).input_ids) for p in PROMPTS) > 2 * STEP_TOKENS  # chunked over several steps
    outputs = llm.classify(PROMPTS, use_tqdm=False)
    got = torch.tensor([o.outputs.probs for o in outputs])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert [o.prompt_token_ids for o in outputs] == [tokenizer(p).input_ids for p in PROMPTS]
    assert all(o.outputs.num_classes == len(LABELS) for o in outputs)
    # again: the prompts' full blocks now come from the prefix cache, and the answers stay
    hits = llm.engine.kv_cache.prefix_cache_hits
    again = llm.classify(PROMPTS[::-1], use_tqdm=False)
    assert llm.engine.kv_cache.prefix_cache_hits > hits
    torch.testing.assert_close(
        torch.tensor([o.outputs.probs for o in again]), expected.flip(0), atol=1e-4, rtol=0
    )
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.num_blocks


@pytest.fixture(scope="module")
def qwen3_classifier(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("cls"), "qwen3", labels=LABELS)
    return path, classifier(path)


@pytest.fixture(scope="module")
def one_label(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("one"), "qwen2", labels=["relevant"])
    return path, classifier(path)


def test_token_ids_and_prompt_dicts(qwen3_classifier):
    path, llm = qwen3_classifier
    ids = llm.get_tokenizer()(PROMPTS[1]).input_ids
    by_text, by_ids, by_dict = (
        llm.classify(p, use_tqdm=False)[0] for p in (PROMPTS[1], ids, {"prompt_token_ids": ids})
    )
    assert by_ids.prompt_token_ids == by_dict.prompt_token_ids == ids
    torch.testing.assert_close(by_ids.outputs.probs, by_text.outputs.probs, atol=1e-6, rtol=0)


def test_truncate_prompt_tokens_classifies_the_cut_prompt(qwen3_classifier):
    """``LLM.classify(truncate_prompt_tokens=k)``: a text cut as the tokenizer truncates it, token ids to their last
    k, each classified as its cut tokens are."""
    path, llm = qwen3_classifier
    tokenizer = llm.get_tokenizer()
    text = PROMPTS[4]
    ids = tokenizer(text).input_ids
    (by_text,) = llm.classify(text, truncate_prompt_tokens=9, use_tqdm=False)
    assert by_text.prompt_token_ids == tokenizer(text, truncation=True, max_length=9).input_ids
    (by_ids,) = llm.classify([ids], truncate_prompt_tokens=9, use_tqdm=False)
    assert by_ids.prompt_token_ids == ids[-9:]
    for output in (by_text, by_ids):
        (expected,) = llm.classify([output.prompt_token_ids], use_tqdm=False)
        torch.testing.assert_close(output.outputs.probs, expected.outputs.probs, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        llm.classify(text, truncate_prompt_tokens=0, use_tqdm=False)


def test_one_label_scores_pairs_by_sigmoid(one_label):
    """num_labels 1: ``classify`` gives the sigmoid of the logit (vLLM's rule), and ``score`` reads a pair as the
    tokenizer joins two texts and gives the sigmoid too (sentence-transformers' CrossEncoder default, and this
    repo's BERT cross-encoders')."""
    path, llm = one_label
    docs = PROMPTS[1:4]
    expected = torch.sigmoid(hf_logits(path, [("what is it?", d) for d in docs])[:, 0])
    scores = llm.score("what is it?", docs, use_tqdm=False)
    torch.testing.assert_close(torch.tensor([s.outputs.score for s in scores]), expected, atol=1e-4, rtol=0)
    # a tokenizer that marks the second text as token type 1 (Llama 3's does) changes nothing: decoders have none
    engine = llm.engine
    pair = engine.input.tokenize_pair("what is it?", docs[0])[0]
    engine.add_embedding_request("typed", pair, PoolingRequest(task="score", token_type_start=4))
    typed = llm._collect(["typed"], False, "")[0]
    assert abs(engine.info.pooling.score(typed.outputs.embedding) - scores[0].outputs.score) < 1e-6
    classified = llm.classify(PROMPTS[:2], use_tqdm=False)
    expected = torch.sigmoid(hf_logits(path, PROMPTS[:2]))
    torch.testing.assert_close(
        torch.tensor([c.outputs.probs for c in classified]), expected, atol=1e-4, rtol=0
    )


def test_what_a_classifier_refuses(qwen3_classifier, tiny_llama_dir):
    path, llm = qwen3_classifier
    with pytest.raises(InvalidRequestError, match="cannot generate") as info:
        llm.generate("hello", SamplingParams(max_tokens=2), use_tqdm=False)
    assert info.value.param == "model"
    with pytest.raises(InvalidRequestError, match="does not embed") as info:
        llm.embed("hello", use_tqdm=False)
    assert info.value.param == "model"
    with pytest.raises(InvalidRequestError, match="one label; this one has 3") as info:
        llm.score("q", "d", use_tqdm=False)
    assert info.value.param == "model"
    with pytest.raises(InvalidRequestError, match="longer|at most"):
        llm.classify(" ".join(WORDS[:200]), use_tqdm=False)
    with pytest.raises(ValueError, match="not served with pipeline parallelism"):
        LLM(str(path), pipeline_parallel_size=2)
    generator = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=64)
    with pytest.raises(InvalidRequestError, match="does not classify") as info:
        generator.classify("hello", use_tqdm=False)
    assert info.value.param == "model"
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.num_blocks


def test_tensor_parallel_classifies_as_one_rank(tmp_path):
    """At tensor-parallel size 2 the body is sharded as the causal LM's and ``score`` is replicated: the driver's
    pooled last tokens (the full hidden state) give the same probabilities as transformers."""
    path = make_tiny_checkpoint(tmp_path, "qwen3", labels=LABELS, seed=5)
    expected = torch.softmax(hf_logits(path, PROMPTS), dim=-1)
    llm = LLM(
        str(path),
        tensor_parallel_size=2,
        device="cpu",
        dtype="float32",
        max_model_len=128,
        kv_cache_memory="32MiB",
        num_threads=1,
    )
    try:
        got = torch.tensor([o.outputs.probs for o in llm.classify(PROMPTS, use_tqdm=False)])
    finally:
        llm.shutdown()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_bfloat16_body_float32_head(qwen3_classifier):
    """In bfloat16 the body runs in bfloat16 and ``score`` in float32 (vLLM's head dtype): the probabilities stay
    within bfloat16's rounding of the float32 reference."""
    path, _ = qwen3_classifier
    expected = torch.softmax(hf_logits(path, PROMPTS), dim=-1)
    llm = LLM(str(path), dtype="bfloat16", max_model_len=128)
    got = torch.tensor([o.outputs.probs for o in llm.classify(PROMPTS, use_tqdm=False)])
    torch.testing.assert_close(got, expected, atol=3e-2, rtol=0)
