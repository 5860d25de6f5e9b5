"""Front-end bookkeeping between requests and the token-level core: the one place core outputs become
``RequestOutput`` objects.

A request with ``n`` choices is one *parent* and ``n`` core sequences (ids ``req`` or ``req#j``). The processor
plans the core requests of a parent, and after each core step applies the new token ids to each sequence:
incremental detokenization, stop strings, log-probabilities, finish reasons. It never touches the core itself:
it returns the core ids to abort (a stop string found here) and the caller sends them on, so the same code
serves the in-process ``LLMEngine`` and the front end of a core that runs in another process.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from inferneo.engine.core import CoreOutput
from inferneo.engine.detokenizer import IncrementalDetokenizer
from inferneo.outputs import CompletionOutput, Logprob, RequestOutput
from inferneo.sampling_params import SamplingParams


class CoreRequestSpec(NamedTuple):
    """Everything the core needs to build one ``Request`` (picklable; sent as is to a core process)."""

    core_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    eos_token_ids: frozenset[int]
    priority: int
    arrival_time: float


@dataclass(slots=True)
class _Sequence:
    """Front-end state of one generated sequence."""

    index: int
    core_id: str
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class ParentRequest:
    """One user request: its prompt, parameters and the ``n`` sequences generated for it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[_Sequence]
    num_cached_tokens: int = 0

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
                max_tokens: int, eos_token_ids: frozenset[int], priority: int,
                arrival: float) -> tuple[ParentRequest, list[CoreRequestSpec]]:
        """Plan a request (``n`` sibling sequences, seeds ``seed + j``) without registering it yet."""
        if request_id in self.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        eos = frozenset() if params.ignore_eos else eos_token_ids
        sequences, specs = [], []
        for j in range(params.n):
            child_params = params
            if params.n > 1:
                child_params = params.clone()
                child_params.n = 1
                if params.seed is not None:
                    child_params.seed = params.seed + j
            core_id = request_id if params.n == 1 else f"{request_id}#{j}"
            seq = _Sequence(j, core_id, IncrementalDetokenizer(self.tokenizer, prompt_ids, child_params))
            if params.logprobs is not None:
                seq.logprobs, seq.cumulative_logprob = [], 0.0
            sequences.append(seq)
            specs.append(CoreRequestSpec(core_id, prompt_ids, child_params, max_tokens, eos, priority, arrival))
        return ParentRequest(request_id, prompt, prompt_ids, params, sequences), specs

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

    def process(self, outputs: Iterable[CoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Apply one step's core outputs; returns the touched requests' outputs and core ids to abort."""
        touched: dict[str, ParentRequest] = {}
        to_abort: list[str] = []
        for out in outputs:
            entry = self._by_core_id.get(out.request_id)
            if entry is None:
                continue
            parent, seq = entry
            if self._apply(parent, seq, out):
                to_abort.append(seq.core_id)
            touched[parent.request_id] = parent
        results = []
        for parent in touched.values():
            results.append(self._make_output(parent))
            if parent.finished:
                del self.parents[parent.request_id]
                for seq in parent.sequences:
                    self._by_core_id.pop(seq.core_id, None)
        return results, to_abort

    def _apply(self, parent: ParentRequest, seq: _Sequence, out: CoreOutput) -> bool:
        """Update one sequence; True when a stop string ended it while the core still runs it."""
        parent.num_cached_tokens = max(parent.num_cached_tokens, out.num_cached_tokens)
        seq.token_ids.extend(out.new_token_ids)
        if seq.logprobs is not None and out.logprobs is not None:
            top_n = parent.params.logprobs
            decode = seq.detokenizer.decode_token
            for ids, lps, rank in zip(out.logprob_token_ids, out.logprobs, out.ranks, strict=True):
                entry = {ids[0]: Logprob(lps[0], rank, decode(ids[0]))}
                for k, (tid, lp) in enumerate(zip(ids[1:], lps[1:], strict=True)):
                    if k >= top_n:
                        break
                    entry.setdefault(tid, Logprob(lp, k + 1, decode(tid)))
                seq.logprobs.append(entry)
                seq.cumulative_logprob += lps[0]
        stop_string = seq.detokenizer.update(out.new_token_ids)
        if stop_string is not None:
            seq.finish_reason, seq.stop_reason = "stop", stop_string
            return not out.finished
        if out.finished:
            seq.detokenizer.finish()
            seq.finish_reason, seq.stop_reason = out.finish_reason, out.stop_reason
        return False

    @staticmethod
    def _make_output(parent: ParentRequest) -> RequestOutput:
        outputs = [
            CompletionOutput(
                index=s.index,
                text=s.detokenizer.output_text,
                token_ids=list(s.token_ids),
                cumulative_logprob=s.cumulative_logprob,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            )
            for s in parent.sequences
        ]
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outputs, parent.finished,
                             parent.num_cached_tokens)
