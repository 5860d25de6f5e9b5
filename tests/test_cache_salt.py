"""vLLM's ``cache_salt``: a request's prefix-cache blocks serve only requests with the same salt, so one tenant
cannot learn from a faster answer (a cache hit) what another tenant's prompts hold. Shown through the prefix-cache
hits each answer reports: offline (``RequestOutput.num_cached_tokens``) and over HTTP
(``usage.prompt_tokens_details.cached_tokens``) on completions, chat and Responses; the tokens are the same
whatever the salt; bad salts are refused naming the field."""

from __future__ import annotations

import openai
import pytest
from test_hf_parity import mixed_prompts

from inferneo import LLM, BeamSearchParams, SamplingParams
from inferneo.testing.server import RemoteServer

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPT = mixed_prompts(1, 200, seed=4, shared_prefix=64)[0]  # several 16-token blocks
CACHED = (len(PROMPT) - 1) // 16 * 16  # the whole blocks of the prompt, its last token left to compute


def _run(llm: LLM, prompt) -> tuple[list[int], int]:
    (out,) = llm.generate([prompt], GREEDY, use_tqdm=False)
    return out.outputs[0].token_ids, out.num_cached_tokens


def test_a_salted_prompt_shares_cached_blocks_only_with_its_own_salt(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="16MiB", num_threads=1)
    tokens, cached = _run(llm, {"prompt_token_ids": PROMPT})
    assert cached == 0
    assert _run(llm, {"prompt_token_ids": PROMPT}) == (tokens, CACHED)  # unsalted: the blocks above serve it
    for salt, expected in (("tenant-a", 0), ("tenant-a", CACHED), ("tenant-b", 0), ("tenant-b", CACHED)):
        assert _run(llm, {"prompt_token_ids": PROMPT, "cache_salt": salt}) == (tokens, expected), salt
    assert _run(llm, PROMPT) == (tokens, CACHED)  # the unsalted blocks are still there for unsalted prompts
    # beam search keeps the salt on every step's requests
    beams = llm.beam_search([{"prompt_token_ids": PROMPT, "cache_salt": "tenant-c"}],
                            BeamSearchParams(beam_width=2, max_tokens=3))
    assert beams[0].sequences
    assert _run(llm, {"prompt_token_ids": PROMPT, "cache_salt": "tenant-c"})[1] == CACHED
    for bad in ("", 7):
        with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
            llm.generate([{"prompt_token_ids": PROMPT, "cache_salt": bad}], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="unsupported prompt dict key.*cache_salt"):
        llm.embed([{"prompt_token_ids": PROMPT, "cache_salt": "x"}])


@pytest.fixture(scope="module")
def client(tiny_llama_dir):
    with RemoteServer(tiny_llama_dir, "--served-model-name", "tiny", "--kv-cache-memory", "16MiB", "--num-threads",
                      "1", "--disable-access-log") as server:
        yield openai.OpenAI(base_url=server.base_url + "/v1", api_key="x")


def test_over_http_cached_tokens_follow_the_salt(client):
    def completion(**extra):
        out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, extra_body=extra)
        return out.choices[0].text, out.usage.prompt_tokens_details.cached_tokens

    text, _ = completion()
    assert completion() == (text, CACHED)
    assert completion(cache_salt="a") == (text, 0)
    assert completion(cache_salt="a") == (text, CACHED)
    assert completion(cache_salt="b") == (text, 0)
    messages = [{"role": "user", "content": "a question long enough to fill a block or two of the cache " * 3}]

    def chat(**extra):
        out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0,
                                             extra_body=extra)
        return out.usage.prompt_tokens_details.cached_tokens

    chat()
    assert chat() > 0 and chat(cache_salt="c") == 0 and chat(cache_salt="c") > 0
    response = client.responses.create(model="tiny", input=messages[0]["content"], max_output_tokens=3,
                                       extra_body={"cache_salt": "d"})
    assert response.usage.input_tokens_details.cached_tokens == 0
    for bad in ("", 12, ["a"]):
        with pytest.raises(openai.BadRequestError) as exc:
            completion(cache_salt=bad)
        assert exc.value.body["param"] == "cache_salt"
