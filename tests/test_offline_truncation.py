"""``SamplingParams(truncate_prompt_tokens=k)`` (vLLM's field) offline: ``LLM.generate`` keeps each prompt's last k
tokens, as the server's field does, and answers as for those tokens given whole; -1 keeps as many as leave room
for ``max_tokens``; a prompt past the context length is run cut instead of refused; bad values are refused."""

from __future__ import annotations

import pytest
from test_hf_parity import mixed_prompts

from inferneo import LLM, SamplingParams

MAX_LEN = 96


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="16MiB", max_model_len=MAX_LEN, num_threads=1)


def _tokens(llm, prompt, **params):
    (out,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, **params),
                          use_tqdm=False)
    return out.prompt_token_ids, out.outputs[0].token_ids


def test_the_prompts_last_tokens_are_kept(llm):
    prompt = mixed_prompts(1, 200, seed=2, shared_prefix=40)[0]
    kept, tokens = _tokens(llm, prompt, truncate_prompt_tokens=12)
    assert kept == prompt[-12:] and (kept, tokens) == _tokens(llm, prompt[-12:])
    text = "the quick brown fox jumps over the lazy dog " * 6
    ids = llm.get_tokenizer()(text).input_ids
    assert _tokens(llm, text, truncate_prompt_tokens=7) == _tokens(llm, ids[-7:])
    long_prompt = (prompt * 4)[: MAX_LEN + 30]
    with pytest.raises(ValueError, match="context length"):
        _tokens(llm, long_prompt)
    kept, _ = _tokens(llm, long_prompt, truncate_prompt_tokens=-1)
    assert kept == long_prompt[-(MAX_LEN - 5):]  # room for max_tokens=5


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_values_are_refused(bad):
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=bad)


def test_more_than_the_context_is_refused(llm):
    with pytest.raises(ValueError, match="truncate_prompt_tokens: 97 is more than the model's context length"):
        _tokens(llm, [5, 6, 7], truncate_prompt_tokens=MAX_LEN + 1)
