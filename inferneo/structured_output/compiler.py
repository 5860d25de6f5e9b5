"""The core's side of structured output: grammars compiled off the step loop, one matcher per sequence.

:class:`GrammarCompiler` compiles each constraint against the model's vocabulary on a worker thread and keeps
the result by constraint (``StructuredOutputsParams.key``), so a batch that shares one schema compiles it once.
The tokenizer is loaded on that thread the first time a constrained request arrives; a core that never sees one
never loads it. Each result is a :class:`CompiledConstraint` naming its backend: xgrammar for every constraint
it enforces, llguidance for a JSON schema only llguidance enforces (``grammars.GuidanceGrammar``).
:meth:`CompiledConstraint.matcher` gives the per-sequence matcher, :class:`SequenceGrammar` (xgrammar) or
:class:`GuidanceSequenceGrammar` (llguidance), both with one interface: each accepts the sequence's tokens as
they are sampled and fills that sequence's row of the step's token bitmask. :class:`MatcherBatch` does a step's
rows of both kinds.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch

from inferneo.sampling_params import StructuredOutputsParams
from inferneo.structured_output.grammars import (
    GuidanceGrammar,
    StructuredOutputError,
    build_grammar,
    llguidance,
    xgrammar,
)

logger = logging.getLogger(__name__)

MAX_CACHED_GRAMMARS = 512  # compiled grammars kept by constraint (least recently used dropped first)


class GrammarCompiler:
    """Compiles constraints against one vocabulary on a background thread; ``submit`` never blocks.

    ``load_tokenizer`` returns the model's Hugging Face tokenizer (called once, on the compile thread);
    ``vocab_size`` is the width of the model's logits, which may exceed the tokenizer's vocabulary.
    """

    def __init__(self, load_tokenizer: Callable[[], object], vocab_size: int, max_threads: int = 2,
                 fill_threads: int | None = None) -> None:
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self._max_threads = max_threads
        self.fill_threads = fill_threads or default_fill_threads()
        self._matcher_batch: MatcherBatch | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inferneo-grammar")
        self._compiler = None
        self._tokenizer = None
        self._guidance_tokenizer = None
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._lock = threading.Lock()

    def submit(self, params: StructuredOutputsParams) -> Future:
        """A future of the compiled grammar (shared by every request with the same constraint)."""
        key = params.key
        with self._lock:
            future = self._cache.get(key)
            if future is not None and not (future.done() and future.exception() is not None):
                self._cache.move_to_end(key)
                return future
            future = self._executor.submit(self._compile, params)
            self._cache[key] = future
            while len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
            return future

    def _compile(self, params: StructuredOutputsParams) -> CompiledConstraint:
        if self._compiler is None:
            xgr = xgrammar()
            tokenizer = self._hf_tokenizer()
            info = _tokenizer_info(xgr, tokenizer, self.vocab_size)
            self._compiler = xgr.GrammarCompiler(info, max_threads=self._max_threads)
        grammar = build_grammar(params)
        field = f"structured_outputs.{params.kind}"
        if isinstance(grammar, GuidanceGrammar):
            return self._compile_guidance(grammar, field)
        try:
            return CompiledConstraint("xgrammar", self._compiler.compile_grammar(grammar))
        except (RuntimeError, ValueError) as e:
            raise StructuredOutputError(f"{field} cannot be compiled: {e}", field) from None

    def _hf_tokenizer(self):
        if self._tokenizer is None:
            tokenizer = self._load_tokenizer()
            if not callable(getattr(tokenizer, "get_vocab", None)):  # an architecture preset's stand-in
                raise StructuredOutputError("structured output needs the model's vocabulary, and this model has no "
                                            "tokenizer: give one (the tokenizer option)", "structured_outputs")
            self._tokenizer = tokenizer
        return self._tokenizer

    def _compile_guidance(self, grammar: GuidanceGrammar, field: str) -> CompiledConstraint:
        """llguidance's matcher of ``grammar`` at its start (each sequence gets a copy)."""
        llg = llguidance()
        if self._guidance_tokenizer is None:
            from llguidance.hf import from_tokenizer

            try:  # its EOS ids are not used: each sequence's stop ids are applied by GuidanceSequenceGrammar
                self._guidance_tokenizer = from_tokenizer(self._hf_tokenizer(), n_vocab=self.vocab_size)
            except ValueError as e:  # a slow (Python) tokenizer
                raise StructuredOutputError(f"{field} needs llguidance, which cannot read this model's tokenizer: "
                                            f"{e}", field) from None
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar.text, self._guidance_tokenizer)
        if is_error or messages:
            raise StructuredOutputError(f"{field} cannot be compiled: {'; '.join(messages)}", field)
        matcher = llg.LLMatcher(self._guidance_tokenizer, grammar.text, log_level=0)
        if matcher.is_error():
            raise StructuredOutputError(f"{field} cannot be compiled: {matcher.get_error()}", field)
        eos = frozenset(self._guidance_tokenizer.eos_tokens)
        return CompiledConstraint("llguidance", matcher, eos)

    @property
    def matcher_batch(self) -> MatcherBatch:
        """What takes tokens and fills bitmasks for a step's matchers (made on first use)."""
        if self._matcher_batch is None:
            self._matcher_batch = MatcherBatch(self.fill_threads)
        return self._matcher_batch

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._matcher_batch is not None:
            self._matcher_batch.shutdown()


def _tokenizer_info(xgr, tokenizer, vocab_size: int):
    """xgrammar's view of the vocabulary, with the tokenizer's special tokens (BOS, ChatML markers, padding...)
    made special for xgrammar too, so no grammar allows them (the stop tokens stay allowed where the grammar ends).

    xgrammar reads a special token as its literal text ("<s>" is three characters to it), so a string or a free
    pattern could take one; the detokenizer then drops it (``skip_special_tokens``) and the text breaks its
    constraint: "E<s>㢲" came out as "E㢲" under ``minLength: 3``. A token xgrammar sees as empty is special to it.
    """
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    special = set(getattr(tokenizer, "all_special_ids", ()))
    special.update(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special)
    if not special:
        return info
    vocab = [""] * vocab_size
    for text, token_id in tokenizer.get_vocab().items():
        if token_id < vocab_size and token_id not in special:
            vocab[token_id] = text
    return xgr.TokenizerInfo.from_vocab_and_metadata(vocab, info.dump_metadata())


@dataclass(frozen=True, slots=True)
class CompiledConstraint:
    """A constraint compiled against the vocabulary, by one of the two backends: ``grammar`` is xgrammar's
    ``CompiledGrammar``, or llguidance's ``LLMatcher`` at the start of the grammar (copied for each sequence,
    never advanced itself), whose tokenizer's EOS ids are ``guidance_eos``."""

    backend: Literal["xgrammar", "llguidance"]
    grammar: object
    guidance_eos: frozenset[int] = frozenset()

    def matcher(self, stop_token_ids: frozenset[int]) -> SequenceMatcher:
        """A new sequence's matcher; ``stop_token_ids`` end the sequence once the constraint is complete."""
        if self.backend == "llguidance":
            return GuidanceSequenceGrammar(self, stop_token_ids)
        return SequenceGrammar(self.grammar, stop_token_ids)


class SequenceMatcher:
    """What both backends' per-sequence matchers share: ``accept_token``, ``constrains`` and ``fill`` (theirs),
    the count of output tokens taken and what a refused token does."""

    def __init__(self) -> None:
        self.num_accepted = 0  # output tokens the matcher has taken
        self.broken = False  # a token was refused (the sampler was not masked): the constraint is off

    def refused(self, token_id: int) -> None:
        """The matcher refused ``token_id`` (already counted): the sequence hit a dead end (its mask allowed no
        token, so the sampler took a banned one), and the engine core ends it there without that token (finish
        reason "error"); the matcher stops following it."""
        logger.debug("a constrained sequence sampled token %d, which its grammar refuses (a dead end)", token_id)
        self.broken = True

    @property
    def in_force(self) -> bool:
        """Whether the constraint decides the sequence's tokens now (an EOS taken then ends the answer)."""
        return not self.broken


class SequenceGrammar(SequenceMatcher):
    """One sequence's matcher: which tokens may come next, given the tokens it has generated.

    ``stop_token_ids`` are the ids that end the sequence (its EOS ids): once the constraint is complete, only
    they are allowed.
    """

    def __init__(self, compiled, stop_token_ids: frozenset[int]) -> None:
        super().__init__()
        xgr = xgrammar()
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(stop_token_ids) or None)

    def accept_token(self, token_id: int) -> None:
        """Take the sequence's next output token."""
        self.num_accepted += 1
        if self.broken or self.matcher.is_terminated():
            return
        if not self.matcher.accept_token(token_id):
            self.refused(token_id)

    @property
    def constrains(self) -> bool:
        """Whether the next token is constrained (False once the sequence ended its grammar or broke it)."""
        return not (self.broken or self.matcher.is_terminated())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (int32 words, bit ``t`` for token ``t``)."""
        self.matcher.fill_next_token_bitmask(bitmask, row)


class GuidanceSequenceGrammar(SequenceMatcher):
    """One sequence's llguidance matcher, with :class:`SequenceGrammar`'s interface and semantics.

    llguidance's own EOS ids (its tokenizer's) are taken out of every row: the sequence's ``stop_token_ids``
    are allowed instead, only where the constraint is complete, and taking one ends the constraint (the matcher
    itself never sees it). llguidance never allows special tokens (it reads them as non-text), nor ids past the
    tokenizer's vocabulary.
    """

    def __init__(self, compiled: CompiledConstraint, stop_token_ids: frozenset[int]) -> None:
        super().__init__()
        self.matcher = compiled.grammar.deep_copy()
        self.stop_token_ids = frozenset(stop_token_ids) or compiled.guidance_eos
        self._eos = sorted(compiled.guidance_eos)
        self.ended = False  # a stop token was taken where the constraint is complete
        self._words: tuple[torch.Tensor, torch.Tensor] | None = None  # (all but llguidance's EOS, the stop ids)

    def accept_token(self, token_id: int) -> None:
        """Take the sequence's next output token."""
        self.num_accepted += 1
        if self.constrains:
            self.take(token_id)

    def take(self, token_id: int) -> None:
        """Take a token (not counted: :meth:`accept_token` and the batch count)."""
        if token_id in self.stop_token_ids and self.matcher.is_accepting():
            self.ended = True
        elif token_id in self._eos or not self.matcher.consume_token(token_id):
            self.refused(token_id)

    @property
    def constrains(self) -> bool:
        """Whether the next token is constrained (False once the sequence ended its grammar or broke it)."""
        return not (self.broken or self.ended)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (int32 words, bit ``t`` for token ``t``)."""
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, bitmask, row)
        width = bitmask.shape[1]
        if self._words is None or self._words[0].shape[0] != width:
            self._words = (~token_words(self._eos, width), token_words(self.stop_token_ids, width))
        keep, stop = self._words
        words = bitmask[row]
        words &= keep
        if self.matcher.is_accepting():
            words |= stop


def token_words(token_ids, width: int) -> torch.Tensor:
    """A bitmask row of ``width`` int32 words with the bits of ``token_ids`` set (ids past the row left out)."""
    bits = torch.zeros(width * 32, dtype=torch.int64)
    bits[[t for t in token_ids if t < width * 32]] = 1
    words = (bits.view(width, 32) << torch.arange(32)).sum(-1)
    return (words - (words >= 2**31).long() * 2**32).to(torch.int32)


class MatcherBatch:
    """Takes tokens and fills bitmask rows for many sequences at once, through xgrammar's batch matcher on
    ``num_threads`` threads. Each batch call is one call into xgrammar's C++ that lets go of the GIL, so a step's
    mask work can run on :attr:`worker` while the core's thread does other host work. llguidance's sequences
    (:class:`GuidanceSequenceGrammar`) in the same step take their tokens and fill their rows one by one."""

    def __init__(self, num_threads: int) -> None:
        self.num_threads = num_threads
        self._batch = xgrammar().BatchGrammarMatcher(num_threads)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inferneo-bitmask")

    def accept(self, grammars: list[SequenceMatcher], tokens: list[int]) -> None:
        """Each grammar takes its one next token."""
        live = [(g, t) for g, t in zip(grammars, tokens, strict=True) if g.constrains]
        for g in grammars:
            g.num_accepted += 1
        xgrammar_live = [(g, t) for g, t in live if isinstance(g, SequenceGrammar)]
        for g, t in live:
            if not isinstance(g, SequenceGrammar):
                g.take(t)
        if not xgrammar_live:
            return
        accepted = self._batch.batch_accept_token([g.matcher for g, _ in xgrammar_live],
                                                  [t for _, t in xgrammar_live])
        for (g, t), ok in zip(xgrammar_live, accepted, strict=True):
            if not ok:
                g.refused(t)

    def fill(self, grammars: list[SequenceMatcher], bitmask: torch.Tensor) -> None:
        """Row ``i`` of ``bitmask`` gets the allowed next tokens of ``grammars[i]``."""
        rows = [i for i, g in enumerate(grammars) if isinstance(g, SequenceGrammar)]
        if len(rows) == len(grammars):
            self._batch.batch_fill_next_token_bitmask([g.matcher for g in grammars], bitmask)
            return
        if rows:
            self._batch.batch_fill_next_token_bitmask([grammars[i].matcher for i in rows], bitmask, indices=rows)
        for i, g in enumerate(grammars):
            if not isinstance(g, SequenceGrammar):
                g.fill(bitmask, i)

    def shutdown(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)


def default_fill_threads() -> int:
    """xgrammar threads for a step's bitmasks: half the machine's cores, at most 8 (one on 2 or 3 cores)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))
