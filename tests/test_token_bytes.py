"""Chat logprobs' ``bytes``: a token's own bytes, so that characters split over several tokens can be rebuilt."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from inferneo.entrypoints.openai.token_bytes import token_bytes_reader

TEXT = "héllo ☃ 🙂 naïve"


def test_byte_level_tokens_give_their_bytes(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    read = token_bytes_reader(tokenizer)
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    pieces = [read(i, tokenizer.decode([i])) for i in ids]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some tokens hold part of a character
    assert bytes(b for piece in pieces for b in piece).decode("utf-8") == TEXT


def test_sentencepiece_byte_fallback_tokens_give_their_bytes():
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for word in ("\u2581h", "\u2581n", "a", "l", "o", "v", "e", "\u2581"):
        vocab[word] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    read = token_bytes_reader(tokenizer)
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    assert any(tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids)
    joined = bytes(b for i in ids for b in read(i, tokenizer.decode([i])))
    assert joined.decode("utf-8") == " " + TEXT  # SentencePiece's leading space is the first token's


def test_other_tokenizers_report_their_texts_utf8():
    class Plain:
        pass

    assert token_bytes_reader(Plain())(5, "é") == [0xC3, 0xA9]
