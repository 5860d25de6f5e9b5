"""BERT-family encoders offline (``LLM.embed``): tiny random ``BertModel`` / ``XLMRobertaModel`` sentence-transformers
folders give the vectors sentence-transformers' ``encode`` gives (single inputs and batches of many lengths), a
bare masked-LM checkpoint pools CLS normalised as vLLM does, RoBERTa's positions skip padding tokens as Hugging
Face's do, and the rules: no generation, no input past the model's length, no KV held, options refused."""

from __future__ import annotations

import pytest
import torch

from inferneo import LLM, SamplingParams
from inferneo.engine.protocol import InvalidRequestError
from inferneo.testing.encoder_models import make_tiny_encoder
from inferneo.testing.tiny_models import _CORPUS

TEXTS = [
    "hello world",
    "The capital of France is Paris.",
    "a",
    "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun",
]
WORDS = _CORPUS.split()
# 1 to 49 words (3 to ~70 tokens), in an order that mixes long and short in one batch
MANY = [
    " ".join(WORDS[i : i + n]) for i, n in enumerate([7, 1, 49, 3, 22, 12, 40, 2, 30, 17, 5, 45, 9, 26, 35])
]
ST_MAX = 80  # the RoBERTa folder's sentence_bert_config max_seq_length (its positions hold 94 tokens)


def cosine(a, b) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(
        torch.as_tensor(a).float(), torch.as_tensor(b).float(), dim=-1
    )


def vectors(outputs) -> torch.Tensor:
    return torch.tensor([o.outputs.embedding for o in outputs])


@pytest.fixture(
    scope="module",
    params=[("bert", "mean"), ("xlm_roberta", "cls"), ("roberta", "mean")],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def encoder(request, tmp_path_factory):
    arch, pooling = request.param
    max_seq = ST_MAX if arch == "xlm_roberta" else None
    path = make_tiny_encoder(tmp_path_factory.mktemp(arch), arch, pooling, max_seq_length=max_seq)
    return arch, path, LLM(str(path), dtype="float32", max_num_seqs=8)


@pytest.fixture(scope="module")
def reference(encoder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(encoder[1]), device="cpu")


def test_vectors_equal_sentence_transformers(encoder, reference):
    _, _, llm = encoder
    expected = reference.encode(TEXTS, convert_to_tensor=True)
    batched = llm.embed(TEXTS, use_tqdm=False)
    assert cosine(vectors(batched), expected).min() > 1 - 1e-5
    assert torch.allclose(vectors(batched).norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    for text, vector in zip(TEXTS, expected, strict=True):  # one at a time
        assert cosine(llm.embed(text, use_tqdm=False)[0].outputs.embedding, vector) > 1 - 1e-5, text
    assert [o.prompt_token_ids for o in batched] == [reference.tokenizer(t).input_ids for t in TEXTS]
    kv_cache = llm.engine.kv_cache
    kv_cache.check_integrity([])
    assert kv_cache.num_free_blocks == kv_cache.num_blocks, "an encoder request kept blocks"


def test_a_batch_of_many_lengths(encoder, reference):
    """More inputs than ``max_num_seqs`` (8), of 3 to ~70 tokens, queued together: each is run whole, next to
    others of other lengths, and equals sentence-transformers (which pads the batch and masks)."""
    _, _, llm = encoder
    expected = reference.encode(MANY, convert_to_tensor=True, batch_size=len(MANY))
    outputs = llm.embed(MANY, use_tqdm=False)
    lengths = [len(o.prompt_token_ids) for o in outputs]
    assert min(lengths) <= 4 and max(lengths) >= 60, lengths
    assert cosine(vectors(outputs), expected).min() > 1 - 1e-5
    assert llm.engine.core.stats.max_batch_size > 1


def test_token_ids_and_a_one_token_input(encoder):
    """Token ids embed as their text does; a one-token input (it runs as a decode row) attends to itself alone,
    as Hugging Face's model computes it."""
    from transformers import AutoModel

    arch, path, llm = encoder
    ids = [llm.get_tokenizer()(t).input_ids for t in TEXTS[:2]]
    assert torch.equal(vectors(llm.embed(ids, use_tqdm=False)), vectors(llm.embed(TEXTS[:2], use_tqdm=False)))
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model(torch.tensor([[7]])).last_hidden_state[0, 0]
    got = llm.embed([[7]], use_tqdm=False)[0].outputs.embedding
    assert cosine(got, torch.nn.functional.normalize(hidden, dim=0)) > 1 - 1e-5


def test_generation_is_refused(encoder):
    _, _, llm = encoder
    with pytest.raises(InvalidRequestError, match="cannot generate") as info:
        llm.generate("hello", SamplingParams(max_tokens=2), use_tqdm=False)
    assert info.value.param == "model"


def test_too_long_input_is_refused(encoder):
    """The longest input is what the position table holds (RoBERTa's starts past its padding index) and at most
    the sentence-transformers ``max_seq_length``; a longer one is refused, not cut."""
    arch, _, llm = encoder
    limit = {"bert": 96, "roberta": 94, "xlm_roberta": ST_MAX}[arch]  # RoBERTa's 96 positions hold 94 tokens
    assert llm.engine.max_model_len == limit
    llm.embed([[5] * limit], use_tqdm=False)  # the longest fits
    with pytest.raises(InvalidRequestError, match=f"{limit + 1} tokens") as info:
        llm.embed([[5] * (limit + 1)], use_tqdm=False)
    assert info.value.param == "prompt"


def test_truncate_prompt_tokens_cuts_as_sentence_transformers(encoder, reference):
    """vLLM's ``truncate_prompt_tokens``: a text is cut by the tokenizer (its end goes, the special tokens stay),
    so its vector is sentence-transformers' with that ``max_seq_length``; -1 cuts it to the model's length;
    token ids keep their last tokens; a value no input can meet is a ValueError naming it."""
    arch, _, llm = encoder
    limit = llm.engine.max_model_len
    text = " ".join(WORDS[:120])
    assert len(reference.tokenizer(text).input_ids) > limit
    saved = reference.max_seq_length
    try:
        for keep, cut in ((9, 9), (-1, limit)):
            reference.max_seq_length = cut
            expected = reference.encode([text], convert_to_tensor=True)[0]
            (got,) = llm.embed(text, truncate_prompt_tokens=keep, use_tqdm=False)
            assert (
                got.prompt_token_ids == reference.tokenizer(text, truncation=True, max_length=cut).input_ids
            )
            assert len(got.prompt_token_ids) == cut and cosine(got.outputs.embedding, expected) > 1 - 1e-5
    finally:
        reference.max_seq_length = saved
    ids = reference.tokenizer(text).input_ids
    (tail,) = llm.embed([ids], truncate_prompt_tokens=7, use_tqdm=False)
    assert tail.prompt_token_ids == ids[-7:]
    assert torch.equal(vectors([tail]), vectors(llm.embed([ids[-7:]], use_tqdm=False)))
    assert len(llm.embed([ids], truncate_prompt_tokens=1, use_tqdm=False)[0].prompt_token_ids) == 1
    short = llm.embed(TEXTS[0], truncate_prompt_tokens=50, use_tqdm=False)[0]  # shorter: unchanged
    assert short.prompt_token_ids == reference.tokenizer(TEXTS[0]).input_ids
    for bad, says in ((0, "at least 1"), (-2, "at least 1"), (limit + 1, "more than"), (1, "special tokens")):
        with pytest.raises(InvalidRequestError, match=says) as info:
            llm.embed(text, truncate_prompt_tokens=bad, use_tqdm=False)
        assert info.value.param == "truncate_prompt_tokens"


def test_roberta_positions_skip_padding_tokens(encoder):
    """A RoBERTa input holding its padding id: Hugging Face gives that token the padding position and counts the
    others on, so the positions after it shift; the vectors agree."""
    from transformers import AutoModel

    arch, path, llm = encoder
    if arch == "bert":
        pytest.skip("RoBERTa's positions only")
    pad = llm.get_tokenizer().pad_token_id
    ids = [0, 17, pad, 23, pad, 40, 2]
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model(torch.tensor([ids])).last_hidden_state[0]  # every token attended (no padding mask)
    pooled = hidden[0] if llm.engine.core.pooling.method == "cls" else hidden.mean(0)
    got = llm.embed([ids, [0, 17, 2]], use_tqdm=False)[0].outputs.embedding
    assert cosine(got, torch.nn.functional.normalize(pooled, dim=0)) > 1 - 1e-5


def test_bare_masked_lm_checkpoint_pools_cls_normalised(tmp_path):
    """A ``BertForMaskedLM`` folder without sentence-transformers files: its ``bert.`` weights load (the head is
    skipped) and it pools the CLS token, normalised (vLLM's default for BERT)."""
    from transformers import AutoModel

    path = make_tiny_encoder(tmp_path / "mlm", "bert", None, head="masked_lm", hidden_act="gelu_new")
    llm = LLM(str(path), dtype="float32")
    assert llm.engine.core.pooling.method == "cls" and llm.engine.core.pooling.source == "default"
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = llm.get_tokenizer()
    for text, output in zip(TEXTS, llm.embed(TEXTS, use_tqdm=False), strict=True):
        with torch.no_grad():
            cls = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0, 0]
        assert cosine(output.outputs.embedding, torch.nn.functional.normalize(cls, dim=0)) > 1 - 1e-5, text


def test_options_an_encoder_does_not_take(tmp_path):
    path = make_tiny_encoder(tmp_path / "bert", "bert", "mean")
    with pytest.raises(ValueError, match="enable_lora: not supported for BERT-family encoder models"):
        LLM(str(path), dtype="float32", enable_lora=True)


def test_asynchronous_scheduling_gives_the_same_vectors(encoder):
    """With asynchronous scheduling (the CUDA default) the next step is scheduled while one runs: an input is still
    run once, whole, and finishes with the same vector."""
    _, path, llm = encoder
    other = LLM(str(path), dtype="float32", max_num_seqs=3, async_scheduling=True)
    assert (
        cosine(vectors(other.embed(MANY, use_tqdm=False)), vectors(llm.embed(MANY, use_tqdm=False))).min()
        > 1 - 1e-6
    )
    assert other.engine.core.stats.max_batch_size > 1
    other.engine.kv_cache.check_integrity([])
    assert other.engine.kv_cache.num_free_blocks == other.engine.kv_cache.num_blocks


@pytest.mark.parametrize("budget", [1 << 20, 600])
def test_padded_attention_groups_equal_hugging_face(encoder, budget, monkeypatch):
    """The model alone on a flat batch of one-token and longer inputs: inputs are attended in padded groups (one
    group, or with a small budget one per input or two), and every row equals Hugging Face's model on that input
    alone."""
    from transformers import AutoModel

    from inferneo.attention import AttentionMetadata, PrefillSpan
    from inferneo.model_executor.models import bert
    from inferneo.model_executor.models.registry import get_model_class
    from inferneo.model_loader import iter_weights, load_hf_config, resolve_model

    _, path, _ = encoder
    monkeypatch.setattr(bert, "GROUP_SCORES", budget)
    source = resolve_model(str(path))
    hf = load_hf_config(source)
    cls = get_model_class(hf)
    model = cls(cls.config_from_hf(hf)).eval()
    model.load_weights(iter_weights(source))
    inputs = [[9], [4], list(range(5, 30)), list(range(40, 43)), list(range(3, 20)), list(range(7, 15))]
    starts = [sum(map(len, inputs[:i])) for i in range(len(inputs))]
    spans = [
        PrefillSpan(s, len(ids), 0, torch.zeros(1)) for s, ids in zip(starts[2:], inputs[2:], strict=True)
    ]
    metadata = AttentionMetadata(16, 2, torch.zeros(1), None, None, prefills=spans)
    ids = torch.tensor([t for ids in inputs for t in ids])
    positions = torch.tensor([p for ids in inputs for p in range(len(ids))])
    assert len(bert.padded_groups([(s.start, s.num_tokens) for s in spans], ids.device)) == (
        1 if budget > 600 else 3
    )
    reference = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(ids, positions, [], metadata)
        for start, one in zip(starts, inputs, strict=True):
            expected = reference(torch.tensor([one])).last_hidden_state[0]
            torch.testing.assert_close(got[start : start + len(one)], expected, atol=1e-5, rtol=1e-4)
