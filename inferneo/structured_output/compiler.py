"""The core's side of structured output: grammars compiled off the step loop, one matcher per sequence.

:class:`GrammarCompiler` compiles each constraint against the model's vocabulary on a worker thread and keeps
the result by constraint (``StructuredOutputsParams.key``), so a batch that shares one schema compiles it once.
The tokenizer is loaded on that thread the first time a constrained request arrives; a core that never sees one
never loads it. :class:`SequenceGrammar` follows one sequence: it accepts the sequence's tokens as they are
sampled and fills that sequence's row of the step's token bitmask.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from inferneo.sampling_params import StructuredOutputsParams
from inferneo.structured_output.grammars import StructuredOutputError, build_grammar, xgrammar

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

    def _compile(self, params: StructuredOutputsParams):
        if self._compiler is None:
            xgr = xgrammar()
            tokenizer = self._load_tokenizer()
            if not callable(getattr(tokenizer, "get_vocab", None)):  # an architecture preset's stand-in
                raise StructuredOutputError("structured output needs the model's vocabulary, and this model has no "
                                            "tokenizer: give one (the tokenizer option)", "structured_outputs")
            info = _tokenizer_info(xgr, tokenizer, self.vocab_size)
            self._compiler = xgr.GrammarCompiler(info, max_threads=self._max_threads)
        grammar = build_grammar(params)
        try:
            return self._compiler.compile_grammar(grammar)
        except (RuntimeError, ValueError) as e:
            field = f"structured_outputs.{params.kind}"
            raise StructuredOutputError(f"{field} cannot be compiled: {e}", field) from None

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


class SequenceGrammar:
    """One sequence's matcher: which tokens may come next, given the tokens it has generated.

    ``stop_token_ids`` are the ids that end the sequence (its EOS ids): once the constraint is complete, only
    they are allowed.
    """

    def __init__(self, compiled, stop_token_ids: frozenset[int]) -> None:
        xgr = xgrammar()
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(stop_token_ids) or None)
        self.num_accepted = 0  # output tokens the matcher has taken
        self.broken = False  # a token was refused (the sampler was not masked): the constraint is off

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

    def refused(self, token_id: int) -> None:
        """The matcher refused ``token_id`` (already counted): the constraint is off for the rest."""
        logger.warning("a constrained sequence produced token %d that its grammar refuses; the constraint is off "
                       "for the rest of it", token_id)
        self.broken = True


class MatcherBatch:
    """Takes tokens and fills bitmask rows for many sequences at once, through xgrammar's batch matcher on
    ``num_threads`` threads. Each batch call is one call into xgrammar's C++ that lets go of the GIL, so a step's
    mask work can run on :attr:`worker` while the core's thread does other host work."""

    def __init__(self, num_threads: int) -> None:
        self.num_threads = num_threads
        self._batch = xgrammar().BatchGrammarMatcher(num_threads)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inferneo-bitmask")

    def accept(self, grammars: list[SequenceGrammar], tokens: list[int]) -> None:
        """Each grammar takes its one next token."""
        live = [(g, t) for g, t in zip(grammars, tokens, strict=True) if g.constrains]
        for g in grammars:
            g.num_accepted += 1
        if not live:
            return
        accepted = self._batch.batch_accept_token([g.matcher for g, _ in live], [t for _, t in live])
        for (g, t), ok in zip(live, accepted, strict=True):
            if not ok:
                g.refused(t)

    def fill(self, grammars: list[SequenceGrammar], bitmask: torch.Tensor) -> None:
        """Row ``i`` of ``bitmask`` gets the allowed next tokens of ``grammars[i]``."""
        self._batch.batch_fill_next_token_bitmask([g.matcher for g in grammars], bitmask)

    def shutdown(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)


def default_fill_threads() -> int:
    """xgrammar threads for a step's bitmasks: half the machine's cores, at most 8 (one on 2 or 3 cores)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))
