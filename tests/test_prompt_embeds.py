"""Prompts given as embeddings (vLLM's ``prompt_embeds``, with ``enable_prompt_embeds``): the rows of the model's
input embedding layer for some ids (what Hugging Face's ``model.get_input_embeddings()(ids)`` returns) generate
exactly what those ids do as a token prompt, in batches mixed with token prompts, over chunked prefill (the engine
runs at most 32 tokens a step, so the longer prompts are split), with the prefix cache keyed by the rows, and with
log-probabilities; bad tensors are refused naming ``prompt_embeds``. Over HTTP: ``/v1/completions`` with the
``openai`` client's ``extra_body``, and the 400s of bad payloads and of a server without the flag."""

from __future__ import annotations

import base64
import contextlib
import io
import math
import pickle
import re
from pathlib import Path

import httpx
import openai
import pytest
import torch
import transformers

from inferneo import LLM, SamplingParams
from inferneo.testing.server import RemoteServer
from tests.test_hf_parity import kv_bytes_per_block

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
SHORT = list(range(3, 10))  # 7 tokens
LONG = [(7 * i + 11) % 300 + 3 for i in range(70)]  # 70 tokens: three chunks of at most 32
MIDDLE = [(5 * i + 2) % 300 + 3 for i in range(45)]
ENGINE = dict(dtype="float32", kv_cache_memory="16MiB", num_threads=1, max_num_batched_tokens=32)


def _hf_embeddings(folder) -> torch.nn.Module:
    """The checkpoint's input embedding layer as transformers builds it (Gemma 3's scales its rows)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    return model.get_input_embeddings()


def _embeds(layer: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return layer(torch.tensor(ids))


def _tokens_and_logprobs(output) -> tuple[list[int], list[dict[int, float]]]:
    completion = output.outputs[0]
    return list(completion.token_ids), [{t: lp.logprob for t, lp in step.items()} for step in completion.logprobs]


def _assert_same(embedded, tokens) -> None:
    got, got_lp = _tokens_and_logprobs(embedded)
    want, want_lp = _tokens_and_logprobs(tokens)
    assert got == want
    for a, b in zip(got_lp, want_lp, strict=True):
        assert a.keys() == b.keys() and all(math.isclose(a[t], b[t], abs_tol=1e-4) for t in a)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), enable_prompt_embeds=True, **ENGINE), _hf_embeddings(tiny_llama_dir)


def test_embeddings_generate_what_their_tokens_do_mixed_in_a_batch_and_chunked(llama):
    llm, layer = llama
    prompts = [SHORT, {"prompt_embeds": _embeds(layer, LONG)}, LONG, {"prompt_embeds": _embeds(layer, SHORT)},
               {"prompt_embeds": _embeds(layer, MIDDLE).unsqueeze(0)}, MIDDLE]  # [1, n, h]: a batch of one
    out = llm.generate(prompts, GREEDY, use_tqdm=False)
    _assert_same(out[1], out[2])
    _assert_same(out[3], out[0])
    _assert_same(out[4], out[5])
    for embedded, ids in ((out[1], LONG), (out[3], SHORT), (out[4], MIDDLE)):
        assert embedded.prompt is None and embedded.prompt_token_ids == []
        assert embedded.num_prompt_tokens == len(ids)
        assert embedded.outputs[0].text  # detokenized from no prompt context
    # other float dtypes are taken (sent as they are, computed in the model's dtype)
    (half,) = llm.generate({"prompt_embeds": _embeds(layer, SHORT).to(torch.bfloat16)}, GREEDY, use_tqdm=False)
    assert len(half.outputs[0].token_ids) == GREEDY.max_tokens


def test_a_preempted_embeddings_prompt_is_computed_again_from_its_rows(llama, tiny_llama_dir):
    llm, layer = llama
    small = LLM(str(tiny_llama_dir), enable_prompt_embeds=True, **{
        **ENGINE, "kv_cache_memory": 10 * kv_bytes_per_block(str(tiny_llama_dir)), "max_model_len": 256})
    longer = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)  # two of them need 170 of 160 slots
    got = small.generate([{"prompt_embeds": _embeds(layer, MIDDLE)}, {"prompt_embeds": _embeds(layer, LONG[:45])}],
                         longer, use_tqdm=False)
    assert small.engine.core.stats.num_preemptions > 0
    want = llm.generate([MIDDLE, LONG[:45]], longer, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_the_prefix_cache_keys_embedded_blocks_by_their_rows(llama):
    llm, layer = llama
    ids = [(11 * i + 5) % 300 + 3 for i in range(50)]
    rows = _embeds(layer, ids)

    def run(prompt) -> tuple[list[int], int]:
        (out,) = llm.generate([prompt], GREEDY, use_tqdm=False)
        return list(out.outputs[0].token_ids), out.num_cached_tokens

    tokens, cached = run({"prompt_embeds": rows})
    assert cached == 0
    hits = llm.engine.kv_cache.prefix_cache_hits
    assert run({"prompt_embeds": rows.clone()}) == (tokens, 48)  # the same rows: their three whole blocks hit
    assert llm.engine.kv_cache.prefix_cache_hits == hits + 48  # the engine's counter (the hit-rate metric's)
    other = rows.clone()
    other[0, 0] += 0.5
    assert run({"prompt_embeds": other})[1] == 0  # other rows, the same placeholders: nothing shared
    tail = rows.clone()
    tail[40:] = _embeds(layer, [7] * 10)
    assert run({"prompt_embeds": tail})[1] == 32  # rows shared up to the third block: its first two blocks hit
    assert run(ids) == (tokens, 0)  # the token prompt never meets the embedded blocks (nor their placeholders)
    assert run({"prompt_embeds": rows, "cache_salt": "tenant"})[1] == 0  # a salt keeps them apart too


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(64), "must be 2-D"),
    (torch.zeros(2, 3, 64), "must be 2-D"),
    (torch.zeros(4, 32), "hidden size 64"),
    (torch.zeros(0, 64), "empty"),
    (torch.zeros(4, 64, dtype=torch.int64), "must hold floats"),
    (torch.full((4, 64), float("nan")), "NaN"),
    (torch.zeros(4, 64).to_sparse(), "dense"),
    ([[0.0] * 64], "torch.Tensor"),
    (torch.zeros(2048, 64), "context length"),
])
def test_bad_embeddings_are_refused(llama, bad, message):
    llm, _ = llama
    with pytest.raises(ValueError, match=message) as info:
        llm.generate({"prompt_embeds": bad}, GREEDY, use_tqdm=False)
    assert info.value.param == "prompt_embeds"


def test_what_embeddings_cannot_be_combined_with(llama):
    llm, layer = llama
    rows = _embeds(layer, SHORT)
    with pytest.raises(ValueError, match="not compatible with prompt embeddings"):
        llm.generate({"prompt_embeds": rows}, SamplingParams(max_tokens=2, prompt_logprobs=1), use_tqdm=False)
    with pytest.raises(ValueError, match="takes only a cache_salt besides"):
        llm.generate({"prompt_embeds": rows, "prompt": "hello"}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="unsupported prompt dict key.*prompt_embeds"):
        llm.embed({"prompt_embeds": rows})
    # truncate_prompt_tokens keeps the last rows, as it keeps a token prompt's last tokens
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, truncate_prompt_tokens=5)
    cut, whole = llm.generate([{"prompt_embeds": rows}, SHORT[-5:]], params, use_tqdm=False)
    assert cut.num_prompt_tokens == 5 and cut.outputs[0].token_ids == whole.outputs[0].token_ids


def test_tensor_parallel_ranks_take_the_drivers_rows(llama, tiny_llama_dir):
    """Two ranks (gloo): the driver broadcasts each step's embedding rows to the other rank with the step."""
    llm, layer = llama
    two = LLM(str(tiny_llama_dir), enable_prompt_embeds=True, tensor_parallel_size=2, **ENGINE)
    try:
        got = two.generate([{"prompt_embeds": _embeds(layer, LONG)}, SHORT, {"prompt_embeds": _embeds(layer, MIDDLE)}],
                           GREEDY, use_tqdm=False)
    finally:
        two.shutdown()
    want = llm.generate([LONG, SHORT, MIDDLE], GREEDY, use_tqdm=False)
    for a, b in zip(got, want, strict=True):
        _assert_same(a, b)


def test_an_engine_without_the_flag_refuses_embeddings(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), **ENGINE)
    with pytest.raises(ValueError, match="enable_prompt_embeds=True") as info:
        llm.generate({"prompt_embeds": torch.zeros(3, 64)}, GREEDY, use_tqdm=False)
    assert info.value.param == "prompt_embeds"


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "qwen2"])
def test_other_families_read_vllms_embeddings(tiny_checkpoint_factory, arch):
    """What "the embeddings" are follows vLLM: Gemma 2 scales by ``sqrt(hidden_size)`` inside the model, after given
    embeddings, so they are the table's rows unscaled (transformers 4's ``get_input_embeddings()`` output; 5's
    scales them); Gemma 3's embedding lookup scales, so given embeddings are the scaled rows (transformers'
    ``get_input_embeddings()`` output). Either way they generate what the ids do."""
    folder = tiny_checkpoint_factory(arch)
    llm = LLM(str(folder), enable_prompt_embeds=True, **ENGINE)
    layer = _hf_embeddings(folder)
    rows = layer.weight.detach()[LONG] if arch == "gemma2" else _embeds(layer, LONG)
    out = llm.generate([{"prompt_embeds": rows}, LONG], GREEDY, use_tqdm=False)
    _assert_same(out[0], out[1])


# ---- over HTTP --------------------------------------------------------------------------------------------------


def _b64(value) -> str:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return base64.b64encode(buffer.getvalue()).decode()


class _Opaque:
    """An object no weights-only load may build."""


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with RemoteServer(tiny_llama_dir, "--served-model-name", "tiny", "--kv-cache-memory", "16MiB", "--num-threads",
                      "1", "--max-num-batched-tokens", "32", "--max-model-len", "128", "--enable-prompt-embeds",
                      "--disable-access-log") as served:
        yield served


@pytest.fixture(scope="module")
def layer(tiny_llama_dir):
    return _hf_embeddings(tiny_llama_dir)


def test_completions_take_prompt_embeds_with_the_openai_client(server, layer):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x")

    def complete(**kwargs):
        return client.completions.create(model="tiny", max_tokens=5, temperature=0, logprobs=2, **kwargs)

    by_ids = complete(prompt=LONG)
    by_rows = complete(prompt="", extra_body={"prompt_embeds": _b64(_embeds(layer, LONG))})  # vLLM's example
    assert by_rows.choices[0].text == by_ids.choices[0].text
    assert by_rows.choices[0].logprobs.tokens == by_ids.choices[0].logprobs.tokens
    assert by_rows.usage.prompt_tokens == len(LONG)
    # a list of them, and beside text prompts: the embedded prompts' choices come first (vLLM's order)
    short = complete(prompt=SHORT).choices[0].text
    mixed = complete(prompt=SHORT, extra_body={"prompt_embeds": [_b64(_embeds(layer, LONG)),
                                                                  _b64(_embeds(layer, SHORT).half())]})
    assert [c.index for c in mixed.choices] == [0, 1, 2]
    assert mixed.choices[0].text == by_ids.choices[0].text and mixed.choices[2].text == short
    assert mixed.usage.prompt_tokens == len(LONG) + 2 * len(SHORT)
    # the same rows again: their blocks come from the prefix cache
    again = complete(prompt="", extra_body={"prompt_embeds": _b64(_embeds(layer, LONG))})
    assert again.usage.prompt_tokens_details.cached_tokens == 64
    assert again.choices[0].text == by_ids.choices[0].text
    # n choices of one prompt given as embeddings; truncate_prompt_tokens keeps its last rows
    two = complete(prompt="", n=2, extra_body={"prompt_embeds": _b64(_embeds(layer, LONG))})
    assert [c.text for c in two.choices] == [by_ids.choices[0].text] * 2
    cut = complete(prompt="", extra_body={"prompt_embeds": _b64(_embeds(layer, LONG)), "truncate_prompt_tokens": 9})
    assert cut.choices[0].text == complete(prompt=LONG[-9:]).choices[0].text and cut.usage.prompt_tokens == 9
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="", max_tokens=5, temperature=0, stream=True,
        extra_body={"prompt_embeds": _b64(_embeds(layer, LONG))}) if c.choices)
    assert streamed == by_ids.choices[0].text


BAD_PAYLOADS = [
    (_b64(torch.zeros(64)), "must be 2-D"),
    (_b64(torch.zeros(4, 32)), "hidden size 64"),
    (_b64(torch.zeros(0, 64)), "empty"),
    (_b64(torch.zeros(4, 64, dtype=torch.int32)), "must hold floats"),
    (_b64(torch.zeros(200, 64)), "context length is 128"),
    (_b64({"x": torch.zeros(4, 64)}), "torch.Tensor"),
    (_b64(_Opaque()), "not a torch.save'd tensor"),
    (base64.b64encode(pickle.dumps([1, 2])).decode(), "not a torch.save'd tensor"),
    (_b64(torch.zeros(4, 64).to_sparse()), "dense"),
    ("not base64!", "not valid base64"),
    ("A" * 1_500_000, "characters of base64"),  # longer than the context's rows could be: not decoded
    ([_b64(torch.zeros(4, 64)), 7], "prompt_embeds"),
]


@pytest.mark.parametrize("embeds, message", BAD_PAYLOADS, ids=[message for _, message in BAD_PAYLOADS])
def test_bad_prompt_embeds_are_400s(server, embeds, message):
    reply = httpx.post(server.url("/v1/completions"), json={"model": "tiny", "prompt_embeds": embeds},
                       timeout=30)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert message in error["message"] and error["param"].startswith("prompt_embeds")
    assert error["type"] == "invalid_request_error"


def test_prompt_embeds_refuse_echo_and_prompt_logprobs(server):
    rows = _b64(torch.zeros(4, 64))
    for extra, param in (({"echo": True}, "echo"), ({"prompt_logprobs": 1}, "prompt_logprobs")):
        reply = httpx.post(server.url("/v1/completions"),
                           json={"model": "tiny", "prompt_embeds": rows, **extra}, timeout=30)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
    reply = httpx.post(server.url("/v1/completions"), json={"model": "tiny"}, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt", reply.text


def test_the_online_serving_pages_example_runs(server, tiny_llama_dir):
    page = (Path(__file__).resolve().parents[1] / "docs" / "online-serving.md").read_text()
    (block,) = [b for b in re.findall(r"^```python\n(.*?)^```", page, flags=re.DOTALL | re.MULTILINE)
                if "prompt_embeds" in b]
    block = block.replace('"meta-llama/Llama-2-7b-chat-hf"', repr(str(tiny_llama_dir)))
    block = block.replace("http://127.0.0.1:8000/v1", server.base_url + "/v1").replace("model=name", 'model="tiny"')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "<doc example>", "exec"), {})
    rows = len(transformers.AutoTokenizer.from_pretrained(str(tiny_llama_dir))("The capital of France is").input_ids)
    assert out.getvalue().split()[-1] == str(rows)  # usage counts the prompt's rows


def test_a_server_without_the_flag_refuses_prompt_embeds(tiny_llama_dir):
    with RemoteServer(tiny_llama_dir, "--kv-cache-memory", "16MiB", "--num-threads", "1",
                      "--max-num-batched-tokens", "32", "--disable-access-log") as plain:
        reply = httpx.post(plain.url("/v1/completions"),
                           json={"prompt": "", "prompt_embeds": _b64(torch.zeros(4, 64))}, timeout=30)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert "--enable-prompt-embeds" in error["message"] and error["param"] == "prompt_embeds"
