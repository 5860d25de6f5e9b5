"""Beam search (``LLM.beam_search``, ``BeamSearchParams``): Hugging Face's beams where no beam ends, and the ranking
rule of ``inferneo.beam_search`` where beams end, against a search computed from Hugging Face's logits."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from inferneo import LLM, BeamSearchParams, SamplingParams
from inferneo.testing.tiny_models import EOS_ID

BLOCK_SIZE = 16 if torch.cuda.is_available() else 4  # the Triton backend pages >= 16 tokens
PROMPTS = [[1, 17, 250, 33, 99], [1, 200, 45, 45, 12, 7, 310, 64, 5, 77, 91], [1, 8]]


@pytest.fixture(scope="module")
def folder(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("llama")


@pytest.fixture(scope="module")
def hf_model(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # no beam ends: Hugging Face then keeps the best beam_width
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["prefix-cache", "no-prefix-cache"])
def llm(folder, request):
    engine = LLM(str(folder), dtype="float32", enable_prefix_caching=request.param, block_size=BLOCK_SIZE)
    yield engine
    engine.shutdown()


def hf_beams(model, prompt: list[int], width: int, max_new: int) -> tuple[list[list[int]], list[float]]:
    """Hugging Face's beam search: the ``width`` sequences' generated ids, best first, and their summed
    log-probabilities (``length_penalty=0``: the score is the sum)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             num_beams=width, num_return_sequences=width, max_new_tokens=max_new,
                             do_sample=False, length_penalty=0.0, early_stopping=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
    ids = [row[len(prompt):].tolist() for row in out.sequences]
    if width == 1:  # Hugging Face decodes greedily then, with no sequence scores: sum the steps' log-softmax
        steps = [torch.log_softmax(scores[0].double(), -1)[token] for scores, token in zip(out.scores, ids[0], strict=True)]
        return ids, [float(sum(steps))]
    return ids, out.sequences_scores.tolist()


@pytest.mark.parametrize("width", [1, 3, 4])
def test_beams_equal_hugging_face_where_no_beam_ends(llm, hf_model, width):
    max_new = 6
    params = BeamSearchParams(beam_width=width, max_tokens=max_new, ignore_eos=True)
    outputs = llm.beam_search(PROMPTS, params)  # the three prompts' beams scored together
    assert len(outputs) == len(PROMPTS)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        expected_ids, expected_scores = hf_beams(hf_model, prompt, width, max_new)
        assert [s.output_token_ids for s in output.sequences] == expected_ids
        np.testing.assert_allclose([s.cum_logprob for s in output.sequences], expected_scores, atol=1e-4)
        for sequence in output.sequences:
            assert sequence.tokens[:len(prompt)] == prompt and sequence.num_prompt_tokens == len(prompt)
            assert sequence.finish_reason == "length" and len(sequence.logprobs) == max_new
            assert sequence.output_text == llm.get_tokenizer().decode(sequence.output_token_ids,
                                                                      skip_special_tokens=True)
            chosen = [sequence.logprobs[i][t].logprob for i, t in enumerate(sequence.output_token_ids)]
            assert sum(chosen) == pytest.approx(sequence.cum_logprob, abs=1e-5)
    kv = llm.engine.kv_cache
    kv.check_integrity([])
    assert kv.num_free_blocks == kv.num_blocks and not llm.engine.has_unfinished_requests()


def test_width_one_is_greedy(llm):
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True), use_tqdm=False)
    beams = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=1, max_tokens=7, ignore_eos=True))
    assert [b.sequences[0].output_token_ids for b in beams] == [g.outputs[0].token_ids for g in greedy]
    assert [b.sequences[0].output_text for b in beams] == [g.outputs[0].text for g in greedy]


def reference_search(model, prompt: list[int], width: int, max_new: int, eos: set[int],
                     length_penalty: float) -> list[tuple[list[int], float, str]]:
    """The documented rule computed from Hugging Face's logits (each beam's whole sequence run again, no cache):
    top ``2 * width`` candidates per beam, beams ending in ``eos`` set aside, the ``width`` best of the rest kept;
    at the end the ``width`` best of both by ``cum / length ** length_penalty`` (length without the final eos)."""
    beams: list[tuple[list[int], float]] = [(list(prompt), 0.0)]
    finished: list[tuple[list[int], float, str]] = []

    def score(tokens, cum, reason):
        return cum / ((len(tokens) - (reason == "stop")) ** length_penalty)

    for _ in range(max_new):
        grown = []
        for tokens, cum in beams:
            with torch.no_grad():
                logits = model(torch.tensor([tokens])).logits[0, -1]
            top = torch.topk(torch.log_softmax(logits.double(), -1), 2 * width)
            for logprob, token in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                if token in eos:
                    finished.append((tokens + [token], cum + logprob, "stop"))
                else:
                    grown.append((tokens + [token], cum + logprob, "length"))
        grown.sort(key=lambda b: score(*b), reverse=True)
        beams = [(t, c) for t, c, _ in grown[:width]]
        if not beams:
            break
    ranked = sorted(finished + [(t, c, "length") for t, c in beams], key=lambda b: score(*b), reverse=True)
    return [(t[len(prompt):], c, r) for t, c, r in ranked[:width]]


@pytest.fixture(scope="module")
def ending_folder(folder, hf_model, tmp_path_factory):
    """The tiny model with a second end-of-sequence token: one that some beams of ``PROMPTS[0]`` meet early (the
    runner-up after the prompt and its greedy first token), so that finished and live beams compete."""
    prompt = PROMPTS[0]
    with torch.no_grad():
        first = int(hf_model(torch.tensor([prompt])).logits[0, -1].argmax())
        second = hf_model(torch.tensor([prompt + [first]])).logits[0, -1]
    stop_token = int(torch.topk(second, 2).indices[1])
    copy = tmp_path_factory.mktemp("beam-eos") / "model"
    shutil.copytree(folder, copy)
    generation = json.loads((copy / "generation_config.json").read_text())
    generation["eos_token_id"] = [EOS_ID, stop_token]
    (copy / "generation_config.json").write_text(json.dumps(generation))
    return copy, {EOS_ID, stop_token}


@pytest.mark.parametrize("length_penalty", [1.0, -2.0, 3.0])
def test_finished_and_live_beams_rank_by_the_length_penalised_score(ending_folder, hf_model, length_penalty):
    path, eos = ending_folder
    llm = LLM(str(path), dtype="float32", block_size=BLOCK_SIZE)
    try:
        width, max_new = 3, 5
        outputs = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=width, max_tokens=max_new,
                                                            length_penalty=length_penalty))
        ended = 0
        for prompt, output in zip(PROMPTS, outputs, strict=True):
            expected = reference_search(hf_model, prompt, width, max_new, eos, length_penalty)
            got = [(s.output_token_ids, s.cum_logprob, s.finish_reason) for s in output.sequences]
            assert [(t, r) for t, _, r in got] == [(t, r) for t, _, r in expected]
            np.testing.assert_allclose([c for _, c, _ in got], [c for _, c, _ in expected], atol=1e-4)
            for sequence in output.sequences:
                if sequence.finish_reason == "stop":
                    ended += 1
                    assert sequence.output_token_ids[-1] in eos
                    assert sequence.text_token_ids() == sequence.output_token_ids[:-1]
        if length_penalty > 1:  # the longest beams score best: the early ends lose to the beams that went on
            assert not ended
        else:
            assert ended, "no returned beam ended: the case does not test what it says"
    finally:
        llm.shutdown()


def test_text_prompts_lora_free_defaults_and_refusals(llm):
    tokenizer = llm.get_tokenizer()
    params = BeamSearchParams(beam_width=2, max_tokens=3)
    by_text = llm.beam_search([{"prompt": "the cat sat"}, "hello world"], params)
    by_ids = llm.beam_search([tokenizer("the cat sat").input_ids, tokenizer("hello world").input_ids], params)
    assert [[s.tokens for s in o.sequences] for o in by_text] == [[s.tokens for s in o.sequences] for o in by_ids]
    sequence = by_text[0].sequences[0]
    assert sequence.text == tokenizer.decode(sequence.tokens, skip_special_tokens=True)  # vLLM's: prompt + output
    with pytest.raises(ValueError, match="temperature must be 0"):
        BeamSearchParams(beam_width=2, max_tokens=3, temperature=0.7)
    with pytest.raises(ValueError, match="beam_width must be an integer from 1 to 10"):
        BeamSearchParams(beam_width=11, max_tokens=3)
    with pytest.raises(ValueError, match="ignore_eos must be a boolean"):
        BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos="yes")
    with pytest.raises(TypeError, match="params must be a BeamSearchParams"):
        llm.beam_search(["a"], SamplingParams())
    limit = llm.engine.input.limits.max_model_len
    with pytest.raises(ValueError, match="prompt 1: .*context length"):
        llm.beam_search([[1, 5], [1, 5, 6, 7, 8]], BeamSearchParams(beam_width=2, max_tokens=limit - 3))
    assert not llm.engine.has_unfinished_requests()
