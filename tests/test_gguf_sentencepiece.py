"""GGUF files with a SentencePiece vocabulary (``tokenizer.ggml.model == "llama"``: Llama 2, Mistral 7B, TinyLlama)
are tokenized with the space prefix (``add_space_prefix``) on each run of text between special tokens that does not
start with a space: a chat prompt's ``<s>[INST] hi`` is ``<s> ▁[ ...`` as llama.cpp and the Llama 2 / Mistral v0.1
tokenizer.json files give it, and a special ``[INST]`` followed by `` hi`` (Mistral v0.3) is ``[INST] ▁hi`` as its
tokenizer.json gives it; text decodes back as it was. Phi-3's chat tokens swallow the whitespace after them, as its
tokenizer.json (``rstrip``) and llama.cpp have it."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from inferneo.model_loader.gguf_tokenizer import load_gguf_tokenizer

_SPECIALS = ["<unk>", "<s>", "</s>"]
_CHAT_TOKENS = ["<|endoftext|>", "<|user|>", "<|end|>"]
_USER_DEFINED = ["<|assistant|>"]
# pieces in merge order (a SentencePiece BPE model scores piece i as -i)
_PIECES = ["▁", "[", "]", "I", "N", "S", "T", "h", "i", "▁[", "IN", "INS", "INST", "▁h", "▁hi", "hi"]


def _spm_file(path: Path, add_space_prefix: bool | None, arch: str = "llama") -> Path:
    tokens = [*_SPECIALS, *(f"<0x{b:02X}>" for b in range(256)), *_PIECES, *_CHAT_TOKENS, *_USER_DEFINED]
    scores = ([0.0] * (len(_SPECIALS) + 256) + [-float(i) for i in range(len(_PIECES))]
              + [0.0] * (len(_CHAT_TOKENS) + len(_USER_DEFINED)))
    types = [int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL), int(gguf.TokenType.CONTROL),
             *[int(gguf.TokenType.BYTE)] * 256, *[int(gguf.TokenType.NORMAL)] * len(_PIECES),
             *[int(gguf.TokenType.CONTROL)] * len(_CHAT_TOKENS),
             *[int(gguf.TokenType.USER_DEFINED)] * len(_USER_DEFINED)]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def _pieces(tok, text: str) -> list[str]:
    return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("flag", [True, None], ids=["add_space_prefix", "no-flag"])
def test_each_run_of_text_between_special_tokens_gets_the_space_prefix(flag, tmp_path):
    tok = load_gguf_tokenizer(_spm_file(tmp_path / "spm.gguf", flag))
    assert _pieces(tok, "<s>[INST] hi") == ["<s>", "▁[", "INST", "]", "▁hi"]
    assert _pieces(tok, "hi</s>hi") == ["▁hi", "</s>", "▁hi"]
    assert _pieces(tok, "<|user|> hi") == ["<|user|>", "▁hi"]  # a run starting with a space: no second one
    assert _pieces(tok, "<|user|>hi") == ["<|user|>", "▁hi"]
    assert tok("hi").input_ids[0] == 1  # add_bos_token
    for text in ["hi  [INST]", "hi  hi ", "[INST] hi"]:
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_no_space_prefix_when_the_file_says_so(tmp_path):
    tok = load_gguf_tokenizer(_spm_file(tmp_path / "spm.gguf", False))
    assert _pieces(tok, "hi hi") == ["hi", "▁hi"]
    assert _pieces(tok, "<s>[INST]") == ["<s>", "[", "INST", "]"]
    assert tok.decode(tok(" hi hi").input_ids, skip_special_tokens=True) == " hi hi"


def test_phi3_chat_tokens_swallow_the_whitespace_after_them(tmp_path):
    tok = load_gguf_tokenizer(_spm_file(tmp_path / "phi3.gguf", True, arch="phi3"))
    assert _pieces(tok, "<|user|>\nhi<|end|>\nhi</s> hi") == ["<|user|>", "▁hi", "<|end|>", "▁hi", "</s>", "▁hi"]
    assert _pieces(tok, "<|assistant|>\nhi") == ["<|assistant|>", "▁hi"]  # a user-defined one too, as llama.cpp
    assert _pieces(tok, "<s>\nhi<|endoftext|>\nhi") == ["<s>", "▁", "<0x0A>", "hi", "<|endoftext|>", "▁", "<0x0A>",
                                                         "hi"]
