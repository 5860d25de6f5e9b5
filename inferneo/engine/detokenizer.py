"""Incremental detokenization and stop-string handling for one generated sequence.

The front end feeds every engine step's new token ids to :class:`IncrementalDetokenizer`, which turns them into
text without re-decoding the whole output, holds back what is not yet final (half a multi-byte character, or a
suffix that may grow into a stop string) and reports the stop string that ended the sequence.

Decoding uses the classic two-offset window (as vLLM did before ``tokenizers.decoders.DecodeStream``): the new
text of a token is ``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])``, so decoders that treat the first
token specially (sentencepiece's leading space, WordPiece's ``##``) see the same left context in both halves.
``DecodeStream`` implements the same window in Rust and, in tokenizers 0.23, also takes prompt context, but its
state is opaque: it cannot hand back the bytes it holds when a request ends, and it knows nothing of
``spaces_between_special_tokens``. Both halves of our window go through the same Rust ``decode`` it uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from inferneo.sampling_params import SamplingParams

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded as left context of the first generated token (enough for every decoder we know).
_PROMPT_CONTEXT_TOKENS = 5
# Drop already-consumed ids from the decode window once this many pile up.
_TRIM_THRESHOLD = 256
_MAX_TOKEN_ID = 2**32 - 1  # the Rust tokenizer takes u32 ids


def _make_decoder(tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """A ``decode(ids) -> str`` equal to ``tokenizer.decode`` without clean-up of tokenization spaces."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(tokenizer)._decode is PreTrainedTokenizerFast._decode:
        # Same result as tokenizer.decode, without its Python overhead.
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


def _token_id_limit(tokenizer: PreTrainedTokenizerBase) -> int:
    """Ids at or above this cannot be decoded (the Rust backend already ignores unknown ids)."""
    if getattr(tokenizer, "backend_tokenizer", None) is not None:
        return _MAX_TOKEN_ID + 1
    return max([len(tokenizer), *(tid + 1 for tid in tokenizer.added_tokens_decoder)])


class IncrementalDetokenizer:
    """Text and stop strings of one generated sequence, updated token by token.

    ``output_text`` is what ``tokenizer.decode(prompt_ids + output_ids)`` adds after the prompt's own text
    (tokenization-space clean-up is never applied). While the sequence runs, a trailing half-decoded
    multi-byte character and any suffix that is the beginning of a stop string are held back, so
    ``output_text`` and the ``get_delta()`` stream only ever grow and never show text that is later withdrawn.
    A streaming consumer builds it with ``keep_text=False`` (then ``output_text`` stays empty and nothing but
    the undrained delta is kept); one that reads ``output_text`` once at the end, with ``stream=False``.

    Stop strings are searched only in the new text plus ``len(longest stop) - 1`` characters before it, and a
    stop string counts only once more than ``params.min_tokens`` tokens were generated. When several stop
    strings match, the one that ends first wins (ties: the one that starts first), so the result does not
    depend on how the tokens were split into ``update()`` calls.

    With ``skip_special_tokens=False`` and ``spaces_between_special_tokens=False``, an added token that follows
    another added token is rendered as its bare content, dropping any separator the decoder puts between them
    (vLLM's rule for fast tokenizers; transformers 5 itself no longer has this option).
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], params: SamplingParams,
        keep_text: bool = True, stream: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._keep_text = keep_text  # keep output_text (a consumer that only streams does not need it)
        self._stream = stream  # collect text for get_delta() (a consumer that reads output_text at the end does not)
        self._decode = _make_decoder(tokenizer, params.skip_special_tokens)
        self._id_limit = _token_id_limit(tokenizer)

        # Decode window: ids[prefix_offset:read_offset] were decoded into prefix_text; ids[read_offset:] are
        # tokens whose text is not out yet (an incomplete character).
        context = [int(t) for t in prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]]
        self._ids = [t for t in context if 0 <= t < self._id_limit]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids) if self._ids else ""

        self._stops = list(dict.fromkeys(params.stop))
        self._lookback = max(map(len, self._stops), default=1) - 1
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        # A stop string must end after this position of the text (None: min_tokens not reached yet).
        self._stop_from: int | None = 0 if params.min_tokens == 0 else None

        self._special_content: dict[int, str] | None = None
        self._last_special = False
        if not params.skip_special_tokens and not params.spaces_between_special_tokens:
            self._special_content = {
                tid: tok.content for tid, tok in tokenizer.added_tokens_decoder.items()
            } or None

        self._num_tokens = 0
        self._released: list[str] = []  # output_text, in chunks
        self._released_len = 0
        self._unstreamed: list[str] = []  # chunks not yet returned by get_delta()
        self._held = ""  # decoded but held back: the start of a possible stop string
        self._tail = ""  # last `lookback` characters of released + held text, for stop search
        self._finished = False
        self._anchor: tuple[list[int], str, Callable[[list[int]], str]] | None = None

    @property
    def output_text(self) -> str:
        """The text generated so far, without held-back text (O(len) on the first call after a change)."""
        if len(self._released) > 1:
            self._released = ["".join(self._released)]
        return self._released[0] if self._released else ""

    @property
    def has_stop_strings(self) -> bool:
        """Whether the sequence ends at stop strings (so its tokens must be taken one at a time to find where)."""
        return bool(self._stops)

    def get_delta(self) -> str:
        """Text added to ``output_text`` since the previous call, for streaming."""
        delta = "".join(self._unstreamed)
        self._unstreamed.clear()
        return delta

    def update(self, new_token_ids: Iterable[int]) -> str | None:
        """Add newly generated tokens; return the stop string if one now appears in the text, else None.

        After a match ``output_text`` ends right before the stop string (or right after it with
        ``include_stop_str_in_output``) and further calls are ignored, as they are after ``finish()``.
        Ids outside the vocabulary decode to nothing.
        """
        if self._finished:
            return None
        pieces: list[str] = []
        new_len = 0
        text_start = self._released_len + len(self._held)
        for token_id in new_token_ids:
            self._num_tokens += 1
            piece = self._decode_next(int(token_id))
            if piece:
                pieces.append(piece)
                new_len += len(piece)
            if self._stop_from is None and self._num_tokens >= self._min_tokens:
                self._stop_from = text_start + new_len
        new_text = "".join(pieces)
        if not new_text:
            return None

        if self._stops and self._stop_from is not None:
            match = self._find_stop(self._tail + new_text, text_start - len(self._tail), self._stop_from)
            if match is not None:
                start, stop = match
                end = start + len(stop) if self._include_stop else start
                pending = self._held + new_text
                assert end >= self._released_len, "released text overlaps a stop string"
                self._release(pending[: end - self._released_len])
                self._held = ""
                self._finished = True
                return stop

        pending = self._held + new_text
        hold = self._partial_stop_len(pending[-self._lookback :]) if self._stops and self._lookback else 0
        self._release(pending[: len(pending) - hold])
        self._held = pending[len(pending) - hold :]
        if self._lookback:
            self._tail = (self._tail + new_text)[-self._lookback :]
        return None

    def finish(self) -> None:
        """End the sequence for a reason other than a stop string: release all held-back text.

        Bytes of an incomplete character come out as U+FFFD, as ``tokenizer.decode`` would show them.
        """
        if self._finished:
            return
        self._finished = True
        tail = ""
        if self._read_offset < len(self._ids):
            text = self._decode(self._ids[self._prefix_offset :])
            tail = text[len(self._prefix_text) :]
        self._release(self._held + tail)
        self._held = ""

    def decode_token(self, token_id: int) -> str:
        """The text of one token as it reads after other text (keeps a sentencepiece leading space).

        Special tokens show their content; an id outside the vocabulary gives ``""``; a token holding part
        of a multi-byte character gives U+FFFD.
        """
        token_id = int(token_id)
        if not 0 <= token_id < self._id_limit:
            return ""
        if self._anchor is None:
            self._anchor = self._make_anchor()
        anchor_ids, anchor_text, decode = self._anchor
        if anchor_ids:
            text = decode([*anchor_ids, token_id])
            if text.startswith(anchor_text):
                return text[len(anchor_text) :]
        return decode([token_id])

    # -- internals ---------------------------------------------------------------------------------------

    def _decode_next(self, token_id: int) -> str:
        """Push one token into the decode window and return the text that became final."""
        if not 0 <= token_id < self._id_limit:
            return ""
        ids = self._ids
        ids.append(token_id)
        text = self._decode(ids[self._prefix_offset :])
        if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT_CHAR):
            return ""  # nothing new, or it ends in half a character: wait for more tokens
        new_text = text[len(self._prefix_text) :]
        if self._special_content is not None:
            content = self._special_content.get(token_id)
            if content is not None and self._last_special and self._read_offset == len(ids) - 1:
                new_text = content
            self._last_special = content is not None
        self._prefix_offset = self._read_offset
        self._read_offset = len(ids)
        self._prefix_text = self._decode(ids[self._prefix_offset : self._read_offset])
        if self._prefix_offset > _TRIM_THRESHOLD:
            del ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return new_text

    def _find_stop(self, window: str, window_start: int, min_end: int) -> tuple[int, str] | None:
        """The stop string in ``window`` that ends first after ``min_end``, as (absolute start, string)."""
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            i = window.find(stop)
            while i != -1 and window_start + i + len(stop) <= min_end:
                i = window.find(stop, i + 1)
            if i != -1:
                candidate = (window_start + i + len(stop), window_start + i, stop)
                if best is None or candidate < best:
                    best = candidate
        return None if best is None else (best[1], best[2])

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        best = 0
        n = len(text)
        for stop in self._stops:
            i = text.find(stop[0], max(n - len(stop) + 1, 0))
            while i != -1 and n - i > best:
                if stop.startswith(text[i:]):
                    best = n - i
                    break
                i = text.find(stop[0], i + 1)
        return best

    def _release(self, text: str) -> None:
        if text:
            if self._keep_text:
                self._released.append(text)
            if self._stream:
                self._unstreamed.append(text)
            self._released_len += len(text)

    def _make_anchor(self) -> tuple[list[int], str, Callable[[list[int]], str]]:
        """A short token sequence to decode a single token after, so it reads as it would in context."""
        decode = _make_decoder(self._tokenizer, skip_special_tokens=False)
        try:
            ids = list(self._tokenizer.encode("a", add_special_tokens=False))
        except Exception:  # a tokenizer without a usable encoder: decode tokens alone
            ids = []
        return ids, decode(ids) if ids else "", decode


class NoTextDetokenizer(IncrementalDetokenizer):
    """The detokenizer of a request with ``SamplingParams.detokenize=False`` (vLLM's option): no text at all, so
    ``output_text`` stays ``""`` and logprobs' ``decoded_token`` is None; the token ids are the answer. Such a
    request has no stop strings (``SamplingParams`` refuses them), so ``update`` never finds one."""

    def __init__(self) -> None:  # nothing of the parent's decoding state is needed
        pass

    @property
    def output_text(self) -> str:
        return ""

    @property
    def has_stop_strings(self) -> bool:
        return False

    def get_delta(self) -> str:
        return ""

    def update(self, new_token_ids: Iterable[int]) -> str | None:
        return None

    def finish(self) -> None:
        pass

    def decode_token(self, token_id: int) -> str | None:  # type: ignore[override]
        return None

