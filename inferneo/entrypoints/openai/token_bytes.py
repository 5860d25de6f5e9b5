"""The bytes a token stands for, as OpenAI's chat logprobs report them (``bytes``): a token that holds part of a
multi-byte character decodes to U+FFFD on its own, but its bytes, joined with its neighbours', rebuild the text.

Two tokenizer families say their bytes exactly: byte-level BPE (GPT-2's byte alphabet: Llama 3, Qwen, Mistral's
Tekken, SmolLM) and SentencePiece with byte fallback (``<0xNN>`` tokens; ``▁`` for a space: Llama 2, Gemma). Any
other tokenizer reports the UTF-8 of the token's decoded text, as vLLM does for all of them."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

from transformers.convert_slow_tokenizer import bytes_to_unicode

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SENTENCEPIECE_SPACE = "\u2581"


def token_bytes_reader(tokenizer) -> Callable[[int, str], list[int]]:
    """``read(token_id, decoded_text)``: the token's bytes (a list of ints; each vocabulary entry converted once)."""
    kind = _tokenizer_kind(tokenizer)
    if kind is None:
        return lambda token_id, text: list(text.encode("utf-8"))
    convert = tokenizer.convert_ids_to_tokens
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}

    @functools.lru_cache(maxsize=65536)
    def of_piece(piece: str | None) -> bytes | None:
        if piece is None:
            return None
        if kind == "byte_level":
            if all(char in byte_of for char in piece):
                return bytes(byte_of[char] for char in piece)
            return None  # an added token written as plain text
        fallback = _BYTE_FALLBACK.fullmatch(piece)
        if fallback:
            return bytes([int(fallback[1], 16)])
        return piece.replace(_SENTENCEPIECE_SPACE, " ").encode("utf-8")

    special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())

    def read(token_id: int, text: str) -> list[int]:
        exact = None if token_id in special_ids else of_piece(convert(token_id))
        return list(exact if exact is not None else text.encode("utf-8"))

    return read


def _tokenizer_kind(tokenizer) -> str | None:
    """``byte_level``, ``sentencepiece`` (byte fallback) or None, from the fast tokenizer's decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = repr(getattr(backend, "decoder", None))
    if "ByteLevel" in decoder:
        return "byte_level"
    if "ByteFallback" in decoder:
        return "sentencepiece"
    return None
