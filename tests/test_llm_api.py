"""The offline API: input forms, sampling features, stop conditions, chat, and errors that name the problem."""

from __future__ import annotations

import io
import logging

import pytest
from tqdm.auto import tqdm

from inferneo import LLM, LoRARequest, RequestOutput, SamplingParams
from inferneo.engine.protocol import InvalidRequestError


@pytest.fixture(scope="module")
def llm(tiny_checkpoint_factory):
    return LLM(str(tiny_checkpoint_factory("llama")), dtype="float32")


def greedy(max_tokens=8, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def assert_clean(llm: LLM) -> None:
    kv = llm.engine.kv_cache
    kv.check_integrity([])
    assert kv.num_free_blocks == kv.num_blocks
    assert not llm.engine.has_unfinished_requests()


def test_accepts_a_string_a_list_of_strings_and_token_ids(llm):
    one = llm.generate("hello world", greedy(), use_tqdm=False)
    assert len(one) == 1 and isinstance(one[0], RequestOutput)
    assert one[0].prompt == "hello world"
    ids = one[0].prompt_token_ids
    many = llm.generate(["hello world", "the cat sat"], greedy(), use_tqdm=False)
    assert [o.prompt for o in many] == ["hello world", "the cat sat"]
    assert many[0].outputs[0].token_ids == one[0].outputs[0].token_ids
    by_ids = llm.generate(ids, greedy(), use_tqdm=False)  # one prompt as token ids
    assert by_ids[0].prompt is None and by_ids[0].outputs[0].token_ids == one[0].outputs[0].token_ids
    lists = llm.generate([ids, ids[:3]], greedy(), use_tqdm=False)
    assert lists[0].outputs[0].token_ids == one[0].outputs[0].token_ids
    assert_clean(llm)


def test_accepts_vllm_prompt_dicts(llm):
    plain = llm.generate(["hello world", "the cat"], greedy(), use_tqdm=False)
    ids = plain[0].prompt_token_ids
    one = llm.generate({"prompt": "hello world"}, greedy(), use_tqdm=False)
    assert len(one) == 1 and one[0].prompt == "hello world"
    assert one[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
    mixed = llm.generate([{"prompt_token_ids": ids}, {"prompt": "the cat"}, "the cat"], greedy(), use_tqdm=False)
    assert mixed[0].prompt is None and mixed[0].prompt_token_ids == ids
    assert [o.outputs[0].token_ids for o in mixed] == [p.outputs[0].token_ids for p in (plain[0], plain[1], plain[1])]
    assert llm.embed({"prompt_token_ids": ids}, use_tqdm=False)[0].prompt_token_ids == ids
    for bad, match in [({"prompt": "a", "prompt_token_ids": ids}, "exactly one of"), ({}, "exactly one of"),
                       ({"prompt": "a", "multi_modal_data": {"image": "data:image/png;base64,"}}, "takes text only"),
                       ({"prompt": "a", "multi_modal_data": {"video": []}}, "takes images only"),
                       ({"prompt_token_ids": "a b"}, "'prompt_token_ids' must be a list of token ids")]:
        with pytest.raises(ValueError, match=match):
            llm.generate(["ok", bad], greedy(), use_tqdm=False)
    assert_clean(llm)


def test_use_tqdm_takes_a_progress_bar_factory_and_llm_engine_is_the_engine(llm):
    bars = []

    class CountingBar(tqdm):
        """A silent bar that still counts (a disabled tqdm does not)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, file=io.StringIO(), **kwargs)
            self.updates = 0
            bars.append(self)

        def update(self, n=1):
            self.updates += n
            return super().update(n)

    factory = CountingBar

    outs = llm.generate(["a", "b", "c"], greedy(), use_tqdm=factory)
    assert len(outs) == 3 and len(bars) == 1 and bars[0].total == 3 and bars[0].updates == 3
    llm.embed(["a", "b"], use_tqdm=factory)
    assert len(bars) == 2 and bars[1].updates == 2
    assert llm.llm_engine is llm.engine and llm.llm_engine.tokenizer is llm.get_tokenizer()


def test_outputs_come_back_in_input_order_with_per_prompt_params(llm):
    prompts = ["a b c d e f g h i j k l m n o p", "x", "the quick brown fox", "y z"]
    params = [greedy(max_tokens=m, ignore_eos=True) for m in (3, 9, 1, 5)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 9, 1, 5]
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert all(o.finished for o in outs)


def test_text_is_the_decoded_tokens(llm):
    out = llm.generate("the cat", greedy(max_tokens=10), use_tqdm=False)[0].outputs[0]
    tok = llm.get_tokenizer()
    full = tok.decode(llm.engine.tokenize("the cat") + out.token_ids, skip_special_tokens=True)
    assert full.endswith(out.text) and out.text


def test_n_gives_n_sequences_and_seeds_make_them_differ_but_repeat(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12)
    first = llm.generate("once upon a time", params, use_tqdm=False)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1
    again = llm.generate("once upon a time", params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in first.outputs]
    assert_clean(llm)


def test_seeded_request_is_the_same_alone_and_in_a_batch_of_32(llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate("seeded prompt here", params, use_tqdm=False)[0].outputs[0]
    others = [SamplingParams(temperature=1.0, max_tokens=int(8 + i % 9), ignore_eos=True) for i in range(31)]
    prompts = [f"other prompt number {i} " * (1 + i % 4) for i in range(31)]
    batch = llm.generate(prompts[:13] + ["seeded prompt here"] + prompts[13:], others[:13] + [params] + others[13:],
                         use_tqdm=False)
    assert batch[13].outputs[0].token_ids == alone.token_ids
    assert batch[13].outputs[0].text == alone.text
    assert llm.engine.core.stats.max_batch_size >= 32


def test_stop_string_is_excluded_and_finishes_with_stop(llm):
    base = llm.generate("the quick brown fox", greedy(max_tokens=16, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(base.text) > 6
    stop = base.text[3:6]
    out = llm.generate("the quick brown fox", greedy(max_tokens=16, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == base.text[: base.text.index(stop)]
    assert_clean(llm)


def test_stop_token_ids_and_min_tokens(llm):
    base = llm.generate("hello there", greedy(max_tokens=10, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    stop_id = base.token_ids[4]
    first = base.token_ids.index(stop_id)
    out = llm.generate("hello there", greedy(max_tokens=10, ignore_eos=True, stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == base.token_ids[: first + 1]
    # The stop token's id is in the output, its text is not (unless include_stop_str_in_output), as in vLLM.
    before = llm.generate("hello there", greedy(max_tokens=first, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    through = llm.generate("hello there", greedy(max_tokens=first + 1, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    assert through.text != before.text  # the stop token has text of its own
    assert out.text == before.text
    kept = llm.generate("hello there", greedy(max_tokens=10, ignore_eos=True, stop_token_ids=[stop_id],
                                              include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.token_ids == out.token_ids and kept.text == through.text
    # min_tokens forbids the stop token until reached, so the output is at least that long.
    out = llm.generate("hello there", greedy(max_tokens=10, ignore_eos=True, stop_token_ids=[stop_id],
                                             min_tokens=first + 3), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= first + 3
    assert stop_id not in out.token_ids[: first + 3]


def test_eos_stops_unless_ignored(llm):
    eos = llm.get_tokenizer().eos_token_id
    assert eos in llm.engine.eos_token_ids
    prompts = [[5 + i, 40 + 3 * i, 7 + i] for i in range(60)]
    runs = llm.generate(prompts, greedy(max_tokens=20, ignore_eos=True), use_tqdm=False)
    hit = next((p, r.outputs[0].token_ids) for p, r in zip(prompts, runs, strict=True) if eos in r.outputs[0].token_ids)
    prompt, ignored = hit
    assert len(ignored) == 20
    out = llm.generate([prompt], greedy(max_tokens=20), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert out.token_ids == ignored[: ignored.index(eos) + 1]


def test_logprobs_are_returned_and_consistent(llm):
    out = llm.generate("the cat", greedy(max_tokens=5, logprobs=3), use_tqdm=False)[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 5
    total = 0.0
    for token_id, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert token_id in entry
        assert entry[token_id].rank == 1  # greedy picks the top token
        assert 3 <= len(entry) <= 4
        ranked = sorted((lp for lp in entry.values() if lp.rank is not None), key=lambda lp: lp.rank)
        assert all(a.logprob >= b.logprob for a, b in zip(ranked, ranked[1:], strict=False))
        assert all(lp.logprob <= 0 for lp in entry.values())
        total += entry[token_id].logprob
    assert out.cumulative_logprob == pytest.approx(total)


def test_detokenize_false_returns_token_ids_without_text(llm):
    prompts = ["the cat sat", "hello world"]
    texted = llm.generate(prompts, greedy(max_tokens=6, logprobs=2, prompt_logprobs=1), use_tqdm=False)
    bare = llm.generate(prompts, greedy(max_tokens=6, logprobs=2, prompt_logprobs=1, detokenize=False),
                        use_tqdm=False)
    for with_text, without in zip(texted, bare, strict=True):
        a, b = with_text.outputs[0], without.outputs[0]
        assert a.text and b.text == ""
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason
        assert [{t: lp.logprob for t, lp in e.items()} for e in b.logprobs] == \
            [{t: lp.logprob for t, lp in e.items()} for e in a.logprobs]
        assert all(lp.decoded_token is None for e in b.logprobs for lp in e.values())
        assert all(lp.decoded_token is None for e in without.prompt_logprobs[1:] for lp in e.values())
    stop_id = texted[0].outputs[0].token_ids[2]
    (stopped,) = llm.generate(prompts[0], greedy(max_tokens=6, stop_token_ids=[stop_id], detokenize=False),
                              use_tqdm=False)
    assert stopped.outputs[0].token_ids[-1] == stop_id and stopped.outputs[0].stop_reason == stop_id
    with pytest.raises(ValueError, match="stop strings need detokenize=True"):
        SamplingParams(stop=["x"], detokenize=False)
    with pytest.raises(ValueError, match="detokenize must be a boolean"):
        SamplingParams(detokenize="no")
    assert_clean(llm)


def test_chat_one_conversation_and_a_list(llm):
    conv = [{"role": "user", "content": "hi"}]
    brief = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "yo"}]
    one = llm.chat(conv, greedy(), use_tqdm=False)
    two = llm.chat([conv, brief], greedy(), use_tqdm=False)
    assert len(one) == 1 and len(two) == 2
    assert two[0].outputs[0].token_ids == one[0].outputs[0].token_ids
    tok = llm.get_tokenizer()
    rendered = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert one[0].prompt_token_ids == tok(rendered, add_special_tokens=False).input_ids
    assert one[0].prompt == rendered  # the conversation as rendered, as vLLM reports it
    assert two[1].prompt == tok.apply_chat_template(brief, tokenize=False, add_generation_prompt=True)
    # OpenAI text content parts are joined by newlines, as the server joins them
    parts = [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]
    (joined,) = llm.chat(parts, greedy(), use_tqdm=False)
    assert joined.prompt == tok.apply_chat_template([{"role": "user", "content": "h\ni"}], tokenize=False,
                                                    add_generation_prompt=True)


def test_chat_passes_tools_and_template_kwargs_to_the_template(llm):
    template = ("{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}"
                "{% if enable_thinking is defined %}think={{ enable_thinking }};{% endif %}"
                "{% for m in messages %}{{ m.content }}{% endfor %}")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    conv = [{"role": "user", "content": "hi"}]
    (out,) = llm.chat(conv, greedy(), use_tqdm=False, chat_template=template, tools=tools,
                      chat_template_kwargs={"enable_thinking": False})
    assert out.prompt == "[get_weather]think=False;hi"
    assert llm.chat(conv, greedy(), use_tqdm=False, chat_template=template)[0].prompt == "hi"
    with pytest.raises(ValueError, match="chat_template_kwargs cannot set add_generation_prompt"):
        llm.chat(conv, greedy(), use_tqdm=False, chat_template_kwargs={"add_generation_prompt": False})
    with pytest.raises(TypeError, match="tools must be a list"):
        llm.chat(conv, greedy(), use_tqdm=False, tools={"name": "f"})
    with pytest.raises(InvalidRequestError, match="without LoRA adapters"):  # lora_request reaches the engine
        llm.chat(conv, greedy(), use_tqdm=False, lora_request=LoRARequest("a", 1, "/nowhere"))
    assert_clean(llm)


def test_chat_renders_tool_calls_as_the_server_does(llm):
    """An assistant turn that only calls a tool (null content) and the tool's reply render as the server renders
    them: content "" and the call's JSON arguments decoded into an object for the template."""
    conv = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    template = ("{% for m in messages %}{{ m.role }}:{{ m.content }}{% for c in m.tool_calls or [] %}"
                "<{{ c.function.name }} {{ c.function.arguments.city }}>{% endfor %};{% endfor %}")
    (out,) = llm.chat(conv, greedy(), use_tqdm=False, chat_template=template)
    assert out.prompt == "user:weather?;assistant:<get_weather Paris>;tool:sunny;"
    (default,) = llm.chat(conv, greedy(), use_tqdm=False)  # the model's own template renders it too
    assert "weather?" in default.prompt and "sunny" in default.prompt
    assert conv[1]["content"] is None  # the caller's messages are left as they were
    assert_clean(llm)


def test_chat_continues_the_final_message(llm):
    """``continue_final_message``: the prompt ends with the assistant's prefix (no end-of-turn, no new turn), and
    the answer is what ``generate`` gives for that rendered text."""
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Well, the answer is"}]
    (out,) = llm.chat(conv, greedy(), use_tqdm=False, continue_final_message=True)
    tok = llm.get_tokenizer()
    rendered = tok.apply_chat_template(conv, tokenize=False, continue_final_message=True)
    assert out.prompt == rendered and rendered.endswith("Well, the answer is")
    assert rendered != tok.apply_chat_template(conv, tokenize=False)  # the turn is left open
    (plain,) = llm.generate([tok(rendered, add_special_tokens=False).input_ids], greedy(), use_tqdm=False)
    assert out.prompt_token_ids == plain.prompt_token_ids and out.outputs[0].token_ids == plain.outputs[0].token_ids
    with pytest.raises(ValueError, match="add_generation_prompt cannot also be true"):
        llm.chat(conv, greedy(), use_tqdm=False, continue_final_message=True, add_generation_prompt=True)
    with pytest.raises(ValueError, match="last message to be the assistant's"):
        llm.chat(conv[:1], greedy(), use_tqdm=False, continue_final_message=True)
    assert_clean(llm)


def test_chat_refuses_what_is_not_a_conversation(llm):
    conv = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="messages is empty"):
        llm.chat([], greedy(), use_tqdm=False)
    with pytest.raises(TypeError, match="messages must be a conversation"):
        llm.chat("hello", greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="conversation 1: the conversation has no messages"):
        llm.chat([conv, []], greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="conversation 1: message 0 must be a dict"):
        llm.chat([conv, ["hi"]], greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="chat template cannot render this conversation: TemplateSyntaxError"):
        llm.chat(conv, greedy(), chat_template="{% for %}", use_tqdm=False)
    with pytest.raises(ValueError, match="chat template cannot render this conversation: TypeError"):
        llm.chat(conv, greedy(), chat_template="{{ messages[0]['content'] + 1 }}", use_tqdm=False)
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    with pytest.raises(ValueError, match="takes text only: it cannot read images"):
        llm.chat([{"role": "user", "content": [image]}], greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="message 0: only text and image content parts are supported"):
        llm.chat([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], greedy(),
                 use_tqdm=False)
    assert_clean(llm)


def test_priority_runs_urgent_requests_first(tiny_checkpoint_factory):
    llm = LLM(str(tiny_checkpoint_factory("llama")), scheduling_policy="priority", max_num_seqs=1)
    order = []
    engine = llm.engine
    for i, prio in enumerate([5, 0, 3]):
        engine.add_request(f"r{i}", f"prompt {i}", greedy(max_tokens=2), priority=prio)
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["r1", "r2", "r0"]


def test_a_priority_is_refused_unless_the_engine_schedules_by_priority(llm):
    # vLLM's rule: under FCFS a priority would be ignored without a word, so a non-zero one is refused.
    with pytest.raises(InvalidRequestError, match="priority scheduling is not enabled") as refused:
        llm.generate(["a", "b"], greedy(), priority=[0, 3], use_tqdm=False)
    assert refused.value.param == "priority"
    assert_clean(llm)
    (out,) = llm.generate("a", greedy(2), priority=[0], use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logprobs": -1}, "logprobs"),
        ({"seed": "x"}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"stop": 5}, "stop"),
        ({"stop_token_ids": 5}, "stop_token_ids"),
        ({"stop_token_ids": "12"}, "stop_token_ids"),
        ({"logit_bias": 3}, "logit_bias"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_raise_clear_errors_and_leave_nothing_behind(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="token ids must be integers"):
        llm.generate([[1, 2, 10**9]], greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="context length"):
        llm.generate([[5] * 5000], greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="stop_token_ids must be below the vocabulary size"):
        llm.generate("hi", greedy(stop_token_ids=[10**6]), use_tqdm=False)
    with pytest.raises(ValueError, match="2 sampling_params for 3 prompts"):
        llm.generate(["a", "b", "c"], [greedy(), greedy()], use_tqdm=False)
    # Prompt + max_tokens past the context: refused (the server's rule too), never silently cut short.
    room = llm.engine.max_model_len - 3
    with pytest.raises(InvalidRequestError, match="context length") as refused:
        llm.generate([[5, 6, 7]], greedy(room + 1), use_tqdm=False)
    assert refused.value.param == "max_tokens"
    (whole,) = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                            use_tqdm=False)
    assert len(whole.outputs[0].token_ids) == room and whole.outputs[0].finish_reason == "length"
    # Arguments of the wrong type: a TypeError that names the argument, before anything is queued.
    with pytest.raises(TypeError, match="prompts must be a string"):
        llm.generate(None, greedy(), use_tqdm=False)
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams"):
        llm.generate("hi", {"max_tokens": 3}, use_tqdm=False)
    with pytest.raises(TypeError, match=r"sampling_params\[1\] must be a SamplingParams"):
        llm.generate(["a", "b"], [greedy(), {"max_tokens": 3}], use_tqdm=False)
    # A bad prompt in the middle of a list aborts the ones already queued.
    with pytest.raises(ValueError):
        llm.generate(["fine", [], "fine too"], greedy(), use_tqdm=False)
    assert_clean(llm)


def test_arguments_in_vllms_positional_order_are_refused_by_name(llm):
    """vLLM's ``generate`` takes ``use_tqdm`` third, here ``priority`` (which failed in ``len()``); vLLM's ``chat``
    takes ``lora_request`` fourth, here ``add_generation_prompt`` (which silently ran without the adapter)."""
    for third in (False, greedy()):
        with pytest.raises(TypeError, match="priority must be a list of integers.*pass use_tqdm and lora_request by"):
            llm.generate(["a"], greedy(), third)
    conv = [{"role": "user", "content": "hi"}]
    with pytest.raises(TypeError, match="add_generation_prompt must be a bool.*pass lora_request by keyword"):
        llm.chat(conv, greedy(), False, LoRARequest("a", 1, "/nowhere"))  # vLLM's chat takes lora_request fourth
    with pytest.raises(ValueError, match="got 2 priorities for 1 prompts"):
        llm.generate(["a"], greedy(), [0, 0], use_tqdm=False)
    assert_clean(llm)


def test_engine_config_errors(tiny_checkpoint_factory, tmp_path):
    path = str(tiny_checkpoint_factory("llama"))
    with pytest.raises(ValueError, match="dtype"):
        LLM(path, dtype="float8")
    with pytest.raises(ValueError, match="device"):
        LLM(path, device="tpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        LLM(path, device="cuda")
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(path, max_model_len=10**6)
    with pytest.raises(ValueError, match="scheduling_policy"):
        LLM(path, scheduling_policy="random")
    with pytest.raises(TypeError, match="unknown LLM argument"):
        LLM(path, not_an_option=1)
    with pytest.raises(FileNotFoundError):
        LLM(str(tmp_path / "nope"))


def test_unsupported_architecture_lists_the_supported_ones(tiny_checkpoint_factory, tmp_path):
    import json
    import shutil

    src = tiny_checkpoint_factory("llama")
    dst = tmp_path / "gpt2ish"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported architecture GPT2LMHeadModel; supported: LlamaForCausalLM"):
        LLM(str(dst))


def test_dummy_weights_run_from_config_alone(tiny_checkpoint_factory):
    llm = LLM(str(tiny_checkpoint_factory("qwen3")), load_format="dummy")
    out = llm.generate("hi", greedy(max_tokens=4, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 4


def test_generation_config_sampling_defaults_are_honoured(tiny_checkpoint_factory, tmp_path):
    import json
    import shutil

    dst = tmp_path / "with-defaults"
    shutil.copytree(tiny_checkpoint_factory("llama"), dst)
    gen = json.loads((dst / "generation_config.json").read_text())
    gen.update({"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, "eos_token_id": [2, 7]})
    (dst / "generation_config.json").write_text(json.dumps(gen))
    llm = LLM(str(dst))
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.repetition_penalty) == (0.6, 0.9, 20, 1.1)
    assert {2, 7} <= llm.engine.eos_token_ids
    gen["do_sample"] = False
    (dst / "generation_config.json").write_text(json.dumps(gen))
    assert LLM(str(dst)).get_default_sampling_params().temperature == 0.0


    # --generation-config vllm: the OpenAI defaults, the model's EOS ids kept; a folder: its defaults
    plain = LLM(str(dst), generation_config="vllm")
    defaults = plain.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.repetition_penalty) == (1.0, 1.0, 0, 1.0)
    assert {2, 7} <= plain.engine.eos_token_ids
    other = tmp_path / "other-defaults"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "top_k": 5, "eos_token_id": 9}))
    chosen = LLM(str(dst), generation_config=str(other))
    defaults = chosen.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.top_p) == (0.3, 5, 1.0)
    assert {2, 7} <= chosen.engine.eos_token_ids and 9 not in chosen.engine.eos_token_ids
    with pytest.raises(FileNotFoundError, match="generation-config"):
        LLM(str(dst), generation_config=str(tmp_path / "nowhere"))

    # --override-generation-config: set over the chosen defaults (the model's, or none with vllm); checked keys
    over = LLM(str(dst), override_generation_config={"temperature": 0.2, "min_p": 0.05}).get_default_sampling_params()
    assert (over.temperature, over.min_p, over.top_p, over.top_k) == (0.2, 0.05, 0.9, 20)
    # (the model's do_sample=False, in its file since above, made its own temperature 0; an override's is kept)
    over = LLM(str(dst), override_generation_config='{"temperature": 0.7}').get_default_sampling_params()
    assert over.temperature == 0.7
    only = LLM(str(dst), generation_config="vllm", override_generation_config={"top_k": 3})
    assert (only.get_default_sampling_params().top_k, only.get_default_sampling_params().temperature) == (3, 1.0)
    for bad, match in [({"max_new_tokens": 5}, "'max_new_tokens' not supported"),
                       ({"temperature": -1}, "temperature must be"), ("[1]", "must be a JSON object")]:
        with pytest.raises(ValueError, match=match):
            LLM(str(dst), override_generation_config=bad)


def test_chat_template_flag_replaces_the_models(tiny_llama_dir, tmp_path):
    """``chat_template`` (``--chat-template``): a Jinja file or the template itself, checked at start-up."""
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    inline = "{% for m in messages %}<{{ m.role }}:{{ m.content }}>{% endfor %}"
    llm = LLM(str(tiny_llama_dir), chat_template=inline, dtype="float32", num_threads=1)
    assert llm.chat(conversation, greedy(max_tokens=1), use_tqdm=False)[0].prompt == "<user:hi><assistant:yo>"
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    llm = LLM(str(tiny_llama_dir), chat_template=str(template), dtype="float32", num_threads=1)
    assert llm.chat(conversation, greedy(max_tokens=1), use_tqdm=False)[0].prompt == "[hi][yo]"
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        LLM(str(tiny_llama_dir), chat_template=str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="does not parse"):
        LLM(str(tiny_llama_dir), chat_template="{% for m in messages %}{{ m.content }}")


def test_a_prompt_past_the_tokenizer_limit_is_refused_without_a_transformers_warning(llm):
    """transformers warns that a text longer than the tokenizer's ``model_max_length`` "will result in indexing
    errors"; the engine checks the length itself (against the model's context), so that warning is noise."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    library_logger = logging.getLogger("transformers")  # the library's loggers do not propagate past it
    library_logger.addHandler(handler)
    tok = llm.get_tokenizer()
    saved = tok.model_max_length
    tok.model_max_length = 8
    try:
        with pytest.raises(ValueError, match="context length"):
            llm.generate("word " * 5000, greedy(), use_tqdm=False)
        out = llm.generate("one two three four five six seven eight nine ten", greedy(max_tokens=2),
                           use_tqdm=False)
        assert len(out[0].prompt_token_ids) > 8
        assert not [r for r in records if "sequence length" in r.getMessage()]
        tok("word " * 50)  # the tokenizer called as transformers' users call it does warn, through this handler
    finally:
        tok.model_max_length = saved
        library_logger.removeHandler(handler)
    assert [r for r in records if "sequence length" in r.getMessage()]
