"""vLLM's ``max_logprobs`` (``--max-logprobs N``, ``LLM(max_logprobs=N)``): the most log-probabilities a request
may ask for per token, 20 by default, -1 for the vocabulary size. Offline on a tiny Llama (the values checked
against Hugging Face's) and over real HTTP with the ``openai`` client: ``logprobs``, ``top_logprobs`` and
``prompt_logprobs`` up to the limit answer, past it are 400s naming the field and the limit."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
import torch

from inferneo import LLM, SamplingParams
from inferneo.beam_search import BeamSearchParams
from inferneo.engine.protocol import InvalidRequestError
from inferneo.testing.server import RemoteServer

PROMPT = [1, 17, 42, 99, 7, 250, 3]


@pytest.fixture(scope="module")
def llm30(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="32MiB", num_threads=1, max_logprobs=30)


def test_a_higher_limit_returns_the_models_top_k(llm30, tiny_llama_dir):
    """With ``max_logprobs=30``, 25 alternatives per token come back, prompt and generated, and they are the
    model's: Hugging Face's top 25 of the prompt's next-token distributions."""
    from transformers import AutoModelForCausalLM

    params = SamplingParams(max_tokens=3, temperature=0.0, logprobs=25, prompt_logprobs=25)
    (out,) = llm30.generate([PROMPT], params, use_tqdm=False)
    assert all(
        len(entry) in (25, 26) for entry in out.outputs[0].logprobs
    )  # the top 25 and the sampled token
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([PROMPT])).logits[0].double(), dim=-1)
    for i in range(1, len(PROMPT)):
        top = logprobs[i - 1].topk(25)
        entry = out.prompt_logprobs[i]
        ranked = {t: lp for t, lp in entry.items() if lp.rank <= 25}
        assert set(ranked) == set(top.indices.tolist()), i
        for token, value in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            assert abs(entry[token].logprob - value) < 1e-4
    first = out.outputs[0].logprobs[0]
    assert {t for t, lp in first.items() if lp.rank <= 25} == set(logprobs[-1].topk(25).indices.tolist())


def test_past_the_limit_is_refused_naming_the_field(llm30):
    for field in ("logprobs", "prompt_logprobs"):
        with pytest.raises(InvalidRequestError, match="at most 30, got 31") as info:
            llm30.generate([PROMPT], SamplingParams(max_tokens=1, **{field: 31}), use_tqdm=False)
        assert info.value.param == field
    assert llm30.engine.input.max_logprobs == 30


def test_the_default_is_20_and_minus_one_is_the_vocabulary(tiny_llama_dir):
    default = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="32MiB", num_threads=1)
    assert default.engine.input.max_logprobs == 20
    default.generate([PROMPT], SamplingParams(max_tokens=1, logprobs=20), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="at most 20, got 21"):
        default.generate([PROMPT], SamplingParams(max_tokens=1, logprobs=21), use_tqdm=False)
    whole = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="32MiB", num_threads=1, max_logprobs=-1)
    vocab = whole.engine.vocab_size
    assert whole.engine.input.max_logprobs == vocab
    (out,) = whole.generate([PROMPT], SamplingParams(max_tokens=1, logprobs=vocab), use_tqdm=False)
    entry = out.outputs[0].logprobs[0]
    assert len(entry) == vocab  # every token: the distribution sums to one
    assert abs(math.fsum(math.exp(lp.logprob) for lp in entry.values()) - 1) < 1e-4
    with pytest.raises(InvalidRequestError, match=f"at most {vocab}, got {vocab + 1}"):
        whole.generate([PROMPT], SamplingParams(max_tokens=1, prompt_logprobs=vocab + 1), use_tqdm=False)


def test_beam_width_follows_a_lower_limit(tiny_llama_dir):
    """A beam search asks each step for twice its width: a width past half the limit is refused, naming it."""
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="32MiB", num_threads=1, max_logprobs=4)
    (result,) = llm.beam_search([PROMPT], BeamSearchParams(beam_width=2, max_tokens=2))
    assert len(result.sequences) == 2
    with pytest.raises(InvalidRequestError, match="at most 2") as info:
        llm.beam_search([PROMPT], BeamSearchParams(beam_width=3, max_tokens=2))
    assert info.value.param == "beam_width"


@pytest.mark.parametrize("bad", [-2, 1.5, "20", True])
def test_bad_max_logprobs_is_refused(tiny_llama_dir, bad):
    with pytest.raises(ValueError, match="max_logprobs"):
        LLM(str(tiny_llama_dir), max_logprobs=bad)


# ---- over HTTP --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with RemoteServer(
        tiny_llama_dir,
        "--served-model-name",
        "tiny",
        "--kv-cache-memory",
        "32MiB",
        "--num-threads",
        "1",
        "--disable-access-log",
        "--max-logprobs",
        "30",
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)


def refused(call, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    error = info.value.body
    assert error["param"] == param and "at most 30, got 31" in error["message"], error
    assert "--max-logprobs" in error["message"]


def test_completions_take_21_logprobs_and_refuse_31(client):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0.0, logprobs=21)
    # the legacy object keys alternatives by their text (byte tokens decode alike), so count them by id below
    assert len(out.choices[0].logprobs.top_logprobs) == 2
    scored = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=1, echo=True, logprobs=25, extra_body={"prompt_logprobs": 25}
    )
    assert all(len(row) in (25, 26) for row in scored.choices[0].model_extra["prompt_logprobs"][1:])
    refused(
        lambda: client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1, logprobs=31), "logprobs"
    )
    refused(
        lambda: client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=1, extra_body={"prompt_logprobs": 31}
        ),
        "prompt_logprobs",
    )


def test_chat_takes_21_top_logprobs_and_refuses_31(client):
    messages = [{"role": "user", "content": "hello there"}]
    out = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=2, temperature=0.0, logprobs=True, top_logprobs=21
    )
    assert all(len(token.top_logprobs) == 21 for token in out.choices[0].logprobs.content)
    refused(
        lambda: client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=1, logprobs=True, top_logprobs=31
        ),
        "top_logprobs",
    )
    refused(
        lambda: client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=1, extra_body={"prompt_logprobs": 31}
        ),
        "prompt_logprobs",
    )


def test_responses_top_logprobs_follow_the_limit(server):
    body = {"model": "tiny", "input": "hello there", "max_output_tokens": 16, "temperature": 0.0}
    ok = httpx.post(server.url("/v1/responses"), json={**body, "top_logprobs": 21}, timeout=60)
    assert ok.status_code == 200, ok.text
    bad = httpx.post(server.url("/v1/responses"), json={**body, "top_logprobs": 31}, timeout=60)
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"]["param"] == "top_logprobs" and "at most 30" in bad.json()["error"]["message"]
