"""Embeddings offline (``LLM.embed``): equal to sentence-transformers' ``encode`` and to Hugging Face's last hidden
state on the same tiny weights, through chunked prefill, batched with generation requests, with and without
prefix-cache hits, and the request rules (``dimensions``, empty and too-long inputs)."""

from __future__ import annotations

import pytest
import torch

from inferneo import LLM, SamplingParams
from inferneo.engine.protocol import InvalidRequestError, PoolingRequest
from inferneo.testing.embedding_models import make_tiny_embedding_model
from inferneo.testing.tiny_models import make_tiny_checkpoint

# Short texts and ones longer than the 16-token step budget (so their prefill runs in chunks), and a single
# character (a one-token prompt runs as a decode row).
TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog and runs far away into the forest", "a",
         "embeddings for retrieval from the same server that generates text, batched with it"]
ENGINE = dict(dtype="float32", max_num_batched_tokens=16, max_model_len=256, kv_cache_memory="8MiB")


def cosine(a, b) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(torch.as_tensor(a), torch.as_tensor(b), dim=-1)


def vectors(outputs) -> torch.Tensor:
    return torch.tensor([o.outputs.embedding for o in outputs])


@pytest.fixture(scope="module", params=[("mean", "llama"), ("last", "qwen3"), ("cls", "qwen3")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def st_model(request, tmp_path_factory):
    method, arch = request.param
    path = make_tiny_embedding_model(tmp_path_factory.mktemp(f"st-{method}"), method, arch)
    return method, path, LLM(str(path), **ENGINE)


def test_embeddings_equal_sentence_transformers(st_model):
    from sentence_transformers import SentenceTransformer

    method, path, llm = st_model
    reference = SentenceTransformer(str(path), device="cpu").encode(TEXTS, convert_to_tensor=True).float()
    outputs = llm.embed(TEXTS, use_tqdm=False)
    got = vectors(outputs)
    assert got.shape == reference.shape
    assert cosine(got, reference).min() > 1 - 1e-5, method
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)  # the Normalize module
    assert [o.prompt_token_ids for o in outputs] == [llm.get_tokenizer()(t).input_ids for t in TEXTS]
    kv_cache = llm.engine.kv_cache
    kv_cache.check_integrity([])
    assert kv_cache.num_free_blocks == kv_cache.num_blocks, "an embedding request kept KV blocks"


def test_token_id_inputs_equal_text_inputs(st_model):
    _, _, llm = st_model
    ids = [llm.get_tokenizer()(t).input_ids for t in TEXTS[:2]]
    by_text = vectors(llm.embed(TEXTS[:2], use_tqdm=False))
    assert torch.equal(vectors(llm.embed(ids, use_tqdm=False)), by_text)
    assert torch.equal(vectors(llm.embed(ids[0], use_tqdm=False)), by_text[:1])  # one prompt as a list of ids


@pytest.fixture(scope="module")
def plain_decoder(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("plain-qwen3"), "qwen3")
    return path, LLM(str(path), **ENGINE, async_scheduling=True)


def test_plain_decoder_pools_its_last_token_normalised(plain_decoder):
    from transformers import AutoModel

    path, llm = plain_decoder
    model = AutoModel.from_pretrained(path, torch_dtype=torch.float32).eval()
    outputs = llm.embed(TEXTS, use_tqdm=False)
    for text, output in zip(TEXTS, outputs, strict=True):
        ids = torch.tensor([output.prompt_token_ids])
        with torch.no_grad():
            last = model(ids).last_hidden_state[0, -1]
        expected = torch.nn.functional.normalize(last, dim=0)
        assert cosine(output.outputs.embedding, expected) > 1 - 1e-5, text
    assert llm.engine.core.pooling.source == "default"


def test_embeddings_batched_with_generation_are_unchanged(plain_decoder):
    """Embedding requests in the same steps as generating ones (asynchronous scheduling, chunked prefill, a
    prefix shared with a generation prompt): the same vectors as alone, the same tokens as alone."""
    _, llm = plain_decoder
    engine = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = ["the quick brown fox jumps over the lazy dog and runs", "one two three four five"]
    alone_tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    alone_vectors = vectors(llm.embed(TEXTS, use_tqdm=False))
    for i, prompt in enumerate(prompts):
        engine.add_request(f"gen-{i}", prompt, greedy)
    for i, text in enumerate(TEXTS):
        engine.add_embedding_request(f"emb-{i}", text)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            finished[output.request_id] = output
    assert [finished[f"gen-{i}"].outputs[0].token_ids for i in range(len(prompts))] == alone_tokens
    together = torch.tensor([finished[f"emb-{i}"].outputs.embedding for i in range(len(TEXTS))])
    assert cosine(together, alone_vectors).min() > 1 - 1e-6
    assert engine.core.stats.max_batch_size > 1
    engine.kv_cache.check_integrity([])
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_prefix_cache_reads_only_for_last_token_pooling(plain_decoder, st_model):
    """Last-token pooling may start from cached KV (it needs the last position's hidden state only, which it
    computes); mean and cls pooling need hidden states of cached positions and so never read the cache."""
    long_text = TEXTS[1] + " " + TEXTS[3]
    for llm, reads in ((plain_decoder[1], True), (st_model[2], st_model[0] == "last")):
        first = llm.embed([long_text], use_tqdm=False)[0]
        hits_before = llm.engine.kv_cache.prefix_cache_hits
        second = llm.embed([long_text], use_tqdm=False)[0]
        assert cosine(first.outputs.embedding, second.outputs.embedding) > 1 - 1e-6
        assert (llm.engine.kv_cache.prefix_cache_hits > hits_before) == reads


def test_dimensions_and_bad_inputs(plain_decoder, tmp_path):
    _, llm = plain_decoder
    with pytest.raises(InvalidRequestError) as info:
        llm.embed(["hello"], dimensions=8, use_tqdm=False)
    assert info.value.param == "dimensions" and "Matryoshka" in str(info.value)
    with pytest.raises(InvalidRequestError) as info:
        llm.embed([[]], use_tqdm=False)
    assert info.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as info:
        llm.embed([[5] * 257], use_tqdm=False)
    assert info.value.param == "prompt" and "257 tokens" in str(info.value)
    full = llm.embed([[5] * 256], use_tqdm=False)[0]  # the whole context may be prompt: nothing is generated
    assert len(full.outputs.embedding) == 64
    assert not llm.engine.has_unfinished_requests()


def test_matryoshka_dimensions_truncate_then_normalise(tmp_path):
    path = make_tiny_embedding_model(tmp_path / "mrl", "mean", "qwen3", matryoshka=True)
    llm = LLM(str(path), **ENGINE)
    full = vectors(llm.embed(TEXTS, use_tqdm=False))
    short = vectors(llm.embed(TEXTS, dimensions=8, use_tqdm=False))
    assert short.shape == (len(TEXTS), 8)
    expected = torch.nn.functional.normalize(full[:, :8], dim=-1)
    assert cosine(short, expected).min() > 1 - 1e-6
    assert torch.allclose(short.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    with pytest.raises(InvalidRequestError) as info:
        llm.engine.add_embedding_request(None, "hi", PoolingRequest(65))
    assert info.value.param == "dimensions" and "between 1 and 64" in str(info.value)


def test_preempted_embedding_requests_start_their_pooling_over(plain_decoder, tmp_path):
    """A KV cache too small for everything at once (24 blocks of 16 tokens): a long mean-pooled input that joins two
    generating requests is preempted part-way through its prefill, recomputed later, and its vector still equals
    the one computed alone."""
    path = make_tiny_embedding_model(tmp_path / "mean", "mean", base=plain_decoder[0])
    llm = LLM(str(path), **{**ENGINE, "kv_cache_memory": "192KiB"})
    long_input = [5 + (i * 37) % 370 for i in range(200)]
    alone = vectors(llm.embed([long_input], use_tqdm=False))
    engine = llm.engine
    scheduler, preempted = engine.scheduler, []
    preempt = scheduler._preempt
    scheduler._preempt = lambda request: (preempted.append(request.request_id), preempt(request))  # observe only
    long_output = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)
    for i in range(2):
        engine.add_request(f"gen-{i}", TEXTS[1], long_output)
    finished = {}
    for _ in range(60):
        engine.step()
    engine.add_embedding_request("emb", long_input)
    while engine.has_unfinished_requests():
        for output in engine.step():
            finished[output.request_id] = output
    assert "emb" in preempted, preempted
    assert cosine(finished["emb"].outputs.embedding, alone[0]) > 1 - 1e-6
    engine.kv_cache.check_integrity([])


def test_a_checkpoint_without_lm_head_serves_embeddings_only(plain_decoder, tmp_path):
    """Embedding checkpoints saved from the base model (no ``lm_head``, untied, no ``model.`` prefix, as
    Qwen3-Embedding-4B ships) load; they embed as sentence-transformers does and refuse generation (400)."""
    import shutil

    from safetensors.torch import load_file, save_file
    from sentence_transformers import SentenceTransformer

    from inferneo.testing.embedding_models import write_sentence_transformers_files

    path = tmp_path / "headless"
    shutil.copytree(plain_decoder[0], path)
    weights = load_file(path / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in weights.items() if k != "lm_head.weight"},
              path / "model.safetensors", metadata={"format": "pt"})
    write_sentence_transformers_files(path, "last", 64)
    llm = LLM(str(path), **ENGINE)
    reference = SentenceTransformer(str(path), device="cpu").encode(TEXTS[:2], convert_to_tensor=True).float()
    assert cosine(vectors(llm.embed(TEXTS[:2], use_tqdm=False)), reference).min() > 1 - 1e-5
    with pytest.raises(InvalidRequestError) as info:
        llm.generate(["hello"], SamplingParams(max_tokens=2), use_tqdm=False)
    assert info.value.param == "model" and "lm_head" in str(info.value)
