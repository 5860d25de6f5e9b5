"""Front-end bookkeeping between requests and the token-level core: the one place core outputs become
``RequestOutput`` objects.

A request with ``n`` choices is one *parent* and ``n`` core sequences (ids ``req`` or ``req#j``). The processor
plans the core requests of a parent, and after each core step applies the new token ids to each sequence:
incremental detokenization, stop strings, log-probabilities, finish reasons. It never touches the core itself:
it returns the core ids to abort (a stop string found here) and the caller sends them on.

Outputs come in two kinds (:class:`OutputKind`), chosen per request:

- ``DELTA`` (streaming consumers): after every step that advanced it, the request's new text, token ids and
  log-probabilities only. Nothing of the output is kept here, so a long stream costs the same per token at its
  end as at its start.
- ``FINAL`` (``LLM.generate``): one output when the request finishes, with the whole text and every token.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from inferneo.engine.detokenizer import IncrementalDetokenizer, NoTextDetokenizer
from inferneo.engine.prompt_embeds import PromptEmbeds
from inferneo.engine.protocol import CoreOutput, CoreRequest, LoraRef, PoolingRequest
from inferneo.engine.protocol import PromptLogprobs as CorePromptLogprobs
from inferneo.multimodal.inputs import ImageInput
from inferneo.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    Logprob,
    PromptLogprobs,
    RequestOutput,
)
from inferneo.sampling_params import SamplingParams


class OutputKind(enum.Enum):
    """What a request's outputs hold (see the module docstring)."""

    DELTA = "delta"
    FINAL = "final"


@dataclass(slots=True)
class _Sequence:
    """Front-end state of one generated sequence."""

    index: int
    core_id: str
    detokenizer: IncrementalDetokenizer | None  # None for an embedding request (no text)
    token_ids: list[int] | None  # every token so far (FINAL outputs only)
    logprobs: list[dict[int, Logprob]] | None = None  # every position so far (FINAL outputs only)
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # This step's delta (DELTA outputs only).
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[dict[int, Logprob]] | None = None
    final_delta_sent: bool = False
    embedding: list[float] | None = None  # an embedding request's result
    num_cached_tokens: int | None = None  # prefix-cache hits of its prompt, once the core has said


@dataclass(slots=True)
class ParentRequest:
    """One user request: its prompt, parameters and the ``n`` sequences generated for it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    kind: OutputKind
    sequences: list[_Sequence]
    # The prompt's prefix-cache hits: the fewest of any sequence's (the first scheduled; its siblings may then hit
    # the blocks it computed, but the prompt counts once, so its cached tokens do too).
    num_cached_tokens: int = 0
    pooling: PoolingRequest | None = None  # set: an embedding request (one sequence, no text)
    prompt_logprobs: PromptLogprobs | None = None  # once the core sent them
    prompt_logprobs_sent: bool = False  # in a stream, they go out once
    num_prompt_embeds: int = 0  # a prompt given as embeddings: its rows (``prompt_token_ids`` is then empty)

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)

    @property
    def core_ids(self) -> list[str]:
        return [s.core_id for s in self.sequences]


class OutputProcessor:
    """Turns core outputs into ``RequestOutput`` objects; not thread-safe (one owner at a time)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentRequest] = {}
        self._by_core_id: dict[str, tuple[ParentRequest, _Sequence]] = {}

    # ---- requests ----------------------------------------------------------------------------------------

    def prepare(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
                max_tokens: int, eos_token_ids: frozenset[int], priority: int, arrival: float,
                kind: OutputKind, lora: LoraRef | None = None, cache_salt: str | None = None,
                images: list[ImageInput] | None = None,
                prompt_embeds: PromptEmbeds | None = None) -> tuple[ParentRequest, list[CoreRequest]]:
        """Plan a request (``n`` sibling sequences, seeds ``seed + j``; all with adapter ``lora`` and prefix-cache
        salt ``cache_salt``, if given) without registering it yet. With ``prompt_embeds`` the prompt is given as
        embeddings: ``prompt_ids`` are its placeholders, which go to the core only (the outputs show no prompt
        tokens, and the detokenizer starts from none)."""
        if request_id in self.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        final = kind is OutputKind.FINAL
        shown_ids = [] if prompt_embeds is not None else prompt_ids
        sequences, specs = [], []
        for j in range(params.n):
            child_params = params
            if params.n > 1:
                child_params = params.clone()
                child_params.n = 1
                if params.seed is not None:  # seed + j, wrapped around within the 64-bit range
                    child_params.seed = (params.seed + j + 2**63) % 2**64 - 2**63
                if j and params.max_tokens != 0:  # the prompt is scored once, by the first sequence (all of them
                    child_params.prompt_logprobs = None  # when none generates: scoring is all they do)
            core_id = request_id if params.n == 1 else f"{request_id}#{j}"
            detokenizer = (IncrementalDetokenizer(self.tokenizer, shown_ids, child_params, keep_text=final,
                                                  stream=not final)
                           if params.detokenize else NoTextDetokenizer())
            seq = _Sequence(j, core_id, detokenizer, [] if final else None)
            if params.logprobs is not None:
                seq.cumulative_logprob = 0.0
                if final:
                    seq.logprobs = []
            sequences.append(seq)
            # every sequence carries the EOS ids, ignore_eos too: the core applies it (a constraint still ends at EOS)
            specs.append(CoreRequest(core_id, prompt_ids, child_params, max_tokens, eos_token_ids, priority, arrival,
                                     lora=lora, cache_salt=cache_salt, images=images, prompt_embeds=prompt_embeds))
        parent = ParentRequest(request_id, prompt, shown_ids, params, kind, sequences,
                               num_prompt_embeds=0 if prompt_embeds is None else prompt_embeds.length)
        return parent, specs

    def prepare_embedding(self, request_id: str, prompt_ids: list[int], pooling: PoolingRequest, priority: int,
                          arrival: float) -> tuple[ParentRequest, list[CoreRequest]]:
        """Plan an embedding request (one core sequence that is pooled, not sampled) without registering it."""
        if request_id in self.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = SamplingParams(max_tokens=1)
        seq = _Sequence(0, request_id, None, None)
        spec = CoreRequest(request_id, prompt_ids, params, 1, frozenset(), priority, arrival, pooling=pooling)
        return ParentRequest(request_id, None, prompt_ids, params, OutputKind.FINAL, [seq], pooling=pooling), [spec]

    def register(self, parent: ParentRequest) -> None:
        """Start routing core outputs to a prepared request."""
        self.parents[parent.request_id] = parent
        for seq in parent.sequences:
            self._by_core_id[seq.core_id] = (parent, seq)

    def abort(self, request_id: str) -> list[str]:
        """Forget a request; returns the core ids to abort (empty for an unknown or finished id)."""
        parent = self.parents.pop(request_id, None)
        if parent is None:
            return []
        for seq in parent.sequences:
            self._by_core_id.pop(seq.core_id, None)
        return parent.core_ids

    def parent_id(self, core_id: str) -> str | None:
        """The request a core sequence belongs to (None once it is gone)."""
        entry = self._by_core_id.get(core_id)
        return entry[0].request_id if entry is not None else None

    def has_unfinished(self) -> bool:
        return bool(self.parents)

    # ---- outputs -----------------------------------------------------------------------------------------

    def process(self, outputs: Iterable[CoreOutput],
                ) -> tuple[list[RequestOutput | EmbeddingRequestOutput], list[str]]:
        """Apply one step's core outputs; returns the requests' outputs (per their kind) and core ids to abort."""
        touched: dict[str, ParentRequest] = {}
        to_abort: list[str] = []
        for out in outputs:
            entry = self._by_core_id.get(out.request_id)
            if entry is None:
                continue
            parent, seq = entry
            if seq.finish_reason is not None:  # ended by a stop string; the core had not heard yet
                continue
            if self._apply(parent, seq, out):
                to_abort.append(seq.core_id)
            touched[parent.request_id] = parent
        results = []
        for parent in touched.values():
            finished = parent.finished
            if parent.pooling is not None:
                if finished:
                    seq = parent.sequences[0]
                    results.append(EmbeddingRequestOutput(parent.request_id, EmbeddingOutput(seq.embedding),
                                                          parent.prompt_token_ids))
            elif parent.kind is OutputKind.DELTA:
                results.append(self._delta_output(parent, finished))
            elif finished:
                results.append(self._final_output(parent))
            if finished:
                del self.parents[parent.request_id]
                for seq in parent.sequences:
                    self._by_core_id.pop(seq.core_id, None)
        return results, to_abort

    def _apply(self, parent: ParentRequest, seq: _Sequence, out: CoreOutput) -> bool:
        """Update one sequence; True when a stop string ended it while the core still runs it."""
        if len(out.new_token_ids) > 1 and seq.detokenizer is not None and seq.detokenizer.has_stop_strings:
            # Several tokens at once (speculative decoding): a stop string in one of them ends the sequence
            # there, so the tokens after it are not part of the output, as without speculation.
            for piece in _token_by_token(out):
                self._apply(parent, seq, piece)
                if seq.finish_reason is not None:
                    return not out.finished
            return False
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = out.num_cached_tokens
            parent.num_cached_tokens = min(s.num_cached_tokens for s in parent.sequences
                                           if s.num_cached_tokens is not None)
        if seq.detokenizer is None:  # an embedding request: one output, with the vector, when it finishes
            seq.embedding = out.embedding
            seq.finish_reason = out.finish_reason
            return False
        if out.prompt_logprobs is not None:
            parent.prompt_logprobs = prompt_logprob_entries(out.prompt_logprobs, parent.params.prompt_logprobs,
                                                            seq.detokenizer.decode_token)
        if seq.token_ids is not None:
            seq.token_ids.extend(out.new_token_ids)
        else:
            seq.new_token_ids.extend(out.new_token_ids)
        if seq.cumulative_logprob is not None and out.logprobs is not None:
            entries = self._logprob_entries(parent.params.logprobs, seq.detokenizer, out)
            seq.cumulative_logprob += sum(lps[0] for lps in out.logprobs)
            if seq.logprobs is not None:
                seq.logprobs.extend(entries)
            elif seq.new_logprobs is None:
                seq.new_logprobs = entries
            else:
                seq.new_logprobs.extend(entries)
        text_ids = out.new_token_ids
        if out.finish_reason == "stop" and text_ids and not parent.params.include_stop_str_in_output:
            # the last token is the EOS or stop_token_ids entry that ended it: its text is not part of the output
            # (as in vLLM), only its id is
            text_ids = text_ids[:-1]
        stop_string = seq.detokenizer.update(text_ids)
        if stop_string is not None:
            seq.finish_reason, seq.stop_reason = "stop", stop_string
            return not out.finished
        if out.finished:
            seq.detokenizer.finish()
            seq.finish_reason, seq.stop_reason = out.finish_reason, out.stop_reason
        return False

    @staticmethod
    def _logprob_entries(top_n: int, detokenizer: IncrementalDetokenizer,
                         out: CoreOutput) -> list[dict[int, Logprob]]:
        decode = detokenizer.decode_token
        entries = []
        for ids, lps, rank in zip(out.logprob_token_ids, out.logprobs, out.ranks, strict=True):
            entry = {ids[0]: Logprob(lps[0], rank, decode(ids[0]))}
            for k, (tid, lp) in enumerate(zip(ids[1:], lps[1:], strict=True)):
                if k >= top_n:
                    break
                entry.setdefault(tid, Logprob(lp, k + 1, decode(tid)))
            entries.append(entry)
        return entries

    @staticmethod
    def _delta_output(parent: ParentRequest, finished: bool) -> RequestOutput:
        outputs = []
        for s in parent.sequences:
            if s.final_delta_sent:
                continue
            text = s.detokenizer.get_delta()
            if not (text or s.new_token_ids or s.new_logprobs or s.finish_reason):
                continue
            outputs.append(CompletionOutput(index=s.index, text=text, token_ids=s.new_token_ids,
                                            cumulative_logprob=s.cumulative_logprob, logprobs=s.new_logprobs,
                                            finish_reason=s.finish_reason, stop_reason=s.stop_reason))
            s.new_token_ids = []
            s.new_logprobs = None
            s.final_delta_sent = s.finish_reason is not None
        prompt_logprobs = None
        if parent.prompt_logprobs is not None and not parent.prompt_logprobs_sent:
            prompt_logprobs, parent.prompt_logprobs_sent = parent.prompt_logprobs, True
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outputs, finished,
                             parent.num_cached_tokens, prompt_logprobs, parent.num_prompt_embeds)

    @staticmethod
    def _final_output(parent: ParentRequest) -> RequestOutput:
        outputs = [
            CompletionOutput(index=s.index, text=s.detokenizer.output_text, token_ids=s.token_ids,
                             cumulative_logprob=s.cumulative_logprob, logprobs=s.logprobs,
                             finish_reason=s.finish_reason, stop_reason=s.stop_reason)
            for s in parent.sequences
        ]
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outputs, True,
                             parent.num_cached_tokens, parent.prompt_logprobs, parent.num_prompt_embeds)


def prompt_logprob_entries(rows: CorePromptLogprobs, top_n: int, decode: Callable[[int], str]) -> PromptLogprobs:
    """The core's prompt rows in vLLM's shape: None for the first prompt token, then per position the prompt
    token's ``Logprob`` (its rank as computed) and the top ``top_n`` candidates (ranks 1..top_n)."""
    entries: PromptLogprobs = [None]
    for ids, lps, rank in zip(rows.token_ids, rows.logprobs, rows.ranks, strict=True):
        entry = {ids[0]: Logprob(lps[0], rank, decode(ids[0]))}
        for k, (tid, lp) in enumerate(zip(ids[1 : 1 + top_n], lps[1 : 1 + top_n], strict=True)):
            entry.setdefault(tid, Logprob(lp, k + 1, decode(tid)))
        entries.append(entry)
    return entries


def _token_by_token(out: CoreOutput) -> list[CoreOutput]:
    """A core output of several tokens as one output per token (prompt log-probabilities with the first, how it
    ended with the last)."""
    last = len(out.new_token_ids) - 1
    pieces = []
    for i, token_id in enumerate(out.new_token_ids):
        piece = CoreOutput(out.request_id, [token_id], num_cached_tokens=out.num_cached_tokens,
                           prompt_logprobs=out.prompt_logprobs if i == 0 else None)
        if i == last:
            piece.finish_reason, piece.stop_reason = out.finish_reason, out.stop_reason
        if out.logprobs is not None:
            piece.logprob_token_ids = out.logprob_token_ids[i : i + 1]
            piece.logprobs = out.logprobs[i : i + 1]
            piece.ranks = out.ranks[i : i + 1]
        pieces.append(piece)
    return pieces
