"""The engine core: ``step() = schedule -> run the model -> update requests``. Token ids in, token ids out.

It owns no tokenizer and no HTTP. ``inferneo.engine.core_loop.CoreLoop`` drives it (commands in, step outputs
out, failures isolated); ``inferneo.engine.core_builder.build_engine_core`` makes one from an ``EngineConfig``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field

import torch

from inferneo.engine.prompt_logprobs import PromptLogprobsCollector, collect_step_scores
from inferneo.engine.protocol import CoreOutput, EngineSnapshot, FailureKind, RequestFailure
from inferneo.engine.request import Request, RequestStatus
from inferneo.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from inferneo.pooling.config import PoolingConfig
from inferneo.pooling.pooler import finish_embedding, fold_partial
from inferneo.sampling.metadata import min_tokens_banned, needs_output_tokens
from inferneo.sampling.ops import rewind_seeded_generator
from inferneo.spec_decode.acceptance import accepted_prefix
from inferneo.spec_decode.config import SpeculativeConfig
from inferneo.spec_decode.ngram import NgramProposer
from inferneo.spec_decode.state import SpeculationState
from inferneo.structured_output.compiler import GrammarCompiler
from inferneo.structured_output.reasoning_gate import ReasoningGate
from inferneo.structured_output.step_bitmask import ConstrainedRow, GrammarStats, StepBitmask
from inferneo.worker.model_runner import InFlightStep, RunnerOutput
from inferneo.worker.runner_api import Runner
from inferneo.worker.step_inputs import ScheduledSequence, StepRecord

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineStats:
    """Counters the server exposes as metrics and tests read."""

    num_steps: int = 0
    num_batched_tokens_total: int = 0
    max_batch_size: int = 0
    last_batch_size: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_preemptions: int = 0
    step_time_total: float = 0.0
    batch_size_histogram: dict[int, int] = field(default_factory=dict)
    # Structured output: time spent in matchers (taking tokens, filling bitmasks) and the bitmask rows filled.
    grammar: GrammarStats = field(default_factory=GrammarStats)
    # Speculative decoding: draft tokens verified, and those kept.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


class EngineCore:
    """Continuous batching over a paged KV cache.

    With ``async_scheduling`` the next step is scheduled and queued on the device before the current step's
    sampled tokens reach the host: a decoding request is scheduled with its token still in flight (the device
    feeds it to the next step), and the host updates requests, checks stops and builds outputs while the device
    runs. ``step()`` then returns the outputs of the step before the one it launched. A request that finishes on
    the token in flight has one wasted row in the next step, whose output is dropped. Steps with requests whose
    sampling depends on their previous tokens (penalties, ``min_tokens`` still banning tokens) wait for the
    step in flight first.

    Structured output: a constrained request waits outside the scheduler while its grammar compiles (on the
    ``grammars`` compiler's thread; other requests run meanwhile), and then carries a matcher. Each step's
    bitmask is filled by ``StepBitmask`` when the runner asks for it, after the forward pass is queued; with
    asynchronous scheduling it reads the token still in flight from the previous step itself, so constrained
    requests do not make the step wait.

    With ``pipeline_depth`` P > 1 (pipeline parallelism over P stages) up to P steps are in flight at once, each
    on requests the others do not hold, so that every stage has a micro-batch to work on: a new step is scheduled
    (leaving out the requests still in flight) and launched while older ones travel through the stages, and the
    oldest is resolved once P are in flight or nothing else can be scheduled. Asynchronous scheduling is then off.

    With ``speculative`` (speculative decoding, synchronous scheduling only) a decoding request may run its last
    token and draft tokens in one step (``inferneo.spec_decode``): the step samples a token at each of those
    positions, and the request keeps the drafts the model confirms plus the model's own next token. Requests
    whose sampling reads their previous tokens (penalties, ``min_tokens`` not reached) or follows a grammar decode
    one token at a time, in the same steps.
    """

    def __init__(self, runner: Runner, scheduler: Scheduler, max_model_len: int,
                 async_scheduling: bool = False, grammars: GrammarCompiler | None = None,
                 vocab_size: int | None = None, pooling: PoolingConfig | None = None,
                 pipeline_depth: int = 1, speculative: SpeculativeConfig | None = None):
        self.runner = runner
        self.scheduler = scheduler
        self.max_model_len = max_model_len
        self.stats = EngineStats()
        self.async_scheduling = async_scheduling
        self.grammars = grammars
        self.vocab_size = vocab_size if vocab_size is not None else (grammars.vocab_size if grammars else 0)
        self.pooling = pooling or PoolingConfig()  # how embedding requests pool (the front end checked them)
        scheduler.max_model_len = max_model_len
        self._in_flight: _Launched | None = None
        self.pipeline_depth = pipeline_depth
        self._pipeline: deque[_Launched] = deque()  # steps in flight through the pipeline stages, oldest first
        self.max_steps_in_flight = 0  # the most pipeline steps in flight at once (read by tests and tools)
        self._compiling: dict[str, tuple[Request, Future]] = {}  # constrained requests waiting for a grammar
        self._failures: list[RequestFailure] = []
        # Why new requests are refused now (sleep mode: ``engine_control.refusal_of_new_requests``); None: never
        self.refuse_new_requests: Callable[[], str | None] | None = None
        self.lora_slots = None  # the runner's LoRA slots (``inferneo.lora.slots.LoRASlots``); None: LoRA is off
        self.proposer = None
        self.speculative = speculative
        if speculative is not None:
            if async_scheduling or pipeline_depth > 1:
                raise ValueError("speculative decoding needs synchronous scheduling and no pipeline parallelism")
            if self.vocab_size <= 0:  # a seeded request's generator is rewound by whole rows of vocab_size draws
                raise ValueError("speculative decoding needs the model's vocab_size")
            self.proposer = NgramProposer(speculative)
            scheduler.propose_drafts = self._propose_drafts

    def add_request(self, request: Request) -> None:
        if self.refuse_new_requests is not None and (why := self.refuse_new_requests()) is not None:
            self._failures.append(RequestFailure([request.request_id], FailureKind.SLEEPING, why))
            return
        if request.pooling is not None:
            request.pooling_method = self.pooling.method
        if request.lora is not None and not self._adapter_ready(request):
            return
        constraint = request.sampling_params.structured_outputs
        if constraint is not None:
            if self.grammars is None:
                raise ValueError("this engine core was built without a grammar compiler: structured output is off")
            if request.request_id in self._compiling or request.request_id in self.scheduler.requests:
                raise ValueError(f"request id {request.request_id!r} is already in use")
            self._compiling[request.request_id] = (request, self.grammars.submit(constraint))
        else:
            self.scheduler.add_request(request)
        self.stats.num_prompt_tokens += request.num_prompt_tokens

    def _adapter_ready(self, request: Request) -> bool:
        """Read and check the request's LoRA adapter now; a bad one (or LoRA being off) fails this request alone,
        as an invalid one (``take_failures``)."""
        try:
            if self.lora_slots is None:
                raise ValueError("this engine runs without LoRA adapters (start it with enable_lora / --enable-lora)")
            self.lora_slots.check(request.lora)
        except ValueError as exc:
            self._failures.append(RequestFailure([request.request_id], FailureKind.INVALID, str(exc)))
            return False
        return True

    def live_lora_ids(self) -> set[int]:
        """The LoRA adapter ids of the unfinished requests (queued, running, or waiting for a grammar): the adapters
        whose host copies the LoRA slots keep."""
        requests = [*self.scheduler.requests.values(), *(request for request, _ in self._compiling.values())]
        return {request.lora.lora_id for request in requests if request.lora is not None}

    def abort_requests(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            if self._compiling.pop(request_id, None) is not None:
                continue
            request = self.scheduler.requests.get(request_id)
            if request is not None:
                self.scheduler.finish_request(request, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished_requests() or self._in_flight is not None
                or bool(self._compiling) or bool(self._pipeline))

    @property
    def num_unfinished_requests(self) -> int:
        """Requests taken and not finished: queued, running, or waiting for their grammar."""
        return len(self.scheduler.requests) + len(self._compiling)

    def take_failures(self) -> list[RequestFailure]:
        """Requests the core refused after taking them (a grammar that would not compile), since the last call."""
        failures, self._failures = self._failures, []
        return failures

    def _admit_compiled(self) -> None:
        """Hand requests whose grammar has compiled to the scheduler; refuse those whose grammar failed. When
        nothing else can run, wait a moment for a compile rather than spin."""
        if not self._compiling:
            return
        if not self.scheduler.has_unfinished_requests() and self._in_flight is None and not self._pipeline:
            wait([future for _, future in self._compiling.values()], timeout=0.01, return_when=FIRST_COMPLETED)
        for request_id, (request, future) in list(self._compiling.items()):
            if not future.done():
                continue
            del self._compiling[request_id]
            error = future.exception()
            if error is not None:
                kind = FailureKind.INVALID if isinstance(error, ValueError) else FailureKind.FAILED
                self._failures.append(RequestFailure([request_id], kind, str(error)))
                continue
            request.grammar = future.result().matcher(request.eos_token_ids)
            span = request.sampling_params.structured_outputs.reasoning
            if span is not None:
                request.grammar = ReasoningGate(request.grammar, span)
            self.scheduler.add_request(request)

    def _propose_drafts(self, request: Request, max_drafts: int) -> list[int]:
        """Draft tokens for a decoding request (the scheduler asks), never past its max_tokens or the context
        length, and no more than its drafts' keep rate makes worth checking (``SpeculationState``); none for a
        request whose sampling depends on its previous tokens or follows a grammar, and none while more requests
        run than ``disable_by_batch_size``."""
        params = request.sampling_params
        limit = self.speculative.disable_by_batch_size
        if limit is not None and len(self.scheduler.running) > limit:
            return []
        if (request.grammar is not None or request.pooling_method is not None
                or request.num_output_tokens < params.min_tokens or _needs_previous_tokens(request)):
            return []
        room = min(max_drafts, request.max_tokens - request.num_output_tokens - 1,
                   self.max_model_len - request.num_tokens - 1)
        if request.speculation is None:
            request.speculation = SpeculationState()
        room = request.speculation.draft_limit(room)
        if room <= 0:
            return []
        return self.proposer.propose(request.all_token_ids, room, request.speculation.history)

    def snapshot(self) -> EngineSnapshot:
        """The counters right now (for metrics and admission control)."""
        scheduler, kv_cache, stats = self.scheduler, self.scheduler.kv_cache, self.stats
        return EngineSnapshot(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            kv_usage=kv_cache.usage,
            prefix_cache_queries=kv_cache.prefix_cache_queries,
            prefix_cache_hits=kv_cache.prefix_cache_hits,
            num_preemptions=stats.num_preemptions,
            num_prompt_tokens=stats.num_prompt_tokens,
            num_generation_tokens=stats.num_generation_tokens,
            num_steps=stats.num_steps,
            max_batch_size=stats.max_batch_size,
            batch_size_histogram=dict(stats.batch_size_histogram),
            num_draft_tokens=stats.num_draft_tokens,
            num_accepted_tokens=stats.num_accepted_tokens,
        )

    def step(self) -> list[CoreOutput]:
        """Run one engine step; returns outputs for requests that produced a token."""
        self._admit_compiled()
        if self.pipeline_depth > 1:
            return self._step_pipelined()
        if self.async_scheduling:
            return self._step_async()
        if self._in_flight is not None:  # async scheduling was just switched off: land the step in flight
            previous, self._in_flight = self._in_flight, None
            return self._finish(previous)
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        start = time.perf_counter()
        plan = self._step_record(sched, None)
        result = self.runner.execute(plan.record)
        self.scheduler.update_after_step(sched)
        return self._process(sched, plan, result, start)

    def _step_async(self) -> list[CoreOutput]:
        previous = self._in_flight
        self._in_flight = None
        if previous is not None and self._must_wait(previous):
            return self._finish(previous)
        sched = self.scheduler.schedule()
        launched = None
        finished: list[list[CoreOutput]] = []

        def finish_previous() -> None:  # once: while the new step's bitmask fills, if it has one; else below
            if previous is not None and not finished:
                finished.append(self._finish(previous))

        if not sched.is_empty:
            plan = self._step_record(sched, previous.step if previous else None, finish_previous)
            step = self.runner.launch(plan.record, previous.step if previous else None)
            launched = _Launched(sched, plan, step, time.perf_counter())
        finish_previous()
        outputs = finished[0] if finished else []
        if launched is not None:
            # Only now, with the previous step's tokens appended, can blocks holding them join the prefix cache.
            self.scheduler.update_after_step(sched)
            for index, request in enumerate(launched.sampled):
                if not request.is_finished:
                    request.pending_sample = index
            self._in_flight = launched
        return outputs

    def _step_pipelined(self) -> list[CoreOutput]:
        """Launch a step on requests not in flight (if the pipeline has room), then resolve the oldest step when
        the pipeline is full or nothing more could be launched."""
        queue = self._pipeline
        if len(queue) < self.pipeline_depth:
            busy = [item.request for launched in queue for item in launched.sched.scheduled]
            sched = self.scheduler.schedule(busy)
            if not sched.is_empty:
                plan = self._step_record(sched, None)
                step = self.runner.launch(plan.record)
                self.scheduler.update_after_step(sched)
                queue.append(_Launched(sched, plan, step, time.perf_counter()))
                self.max_steps_in_flight = max(self.max_steps_in_flight, len(queue))
                if len(queue) < self.pipeline_depth:
                    return []
        return self._finish(queue.popleft()) if queue else []

    def _finish(self, launched: _Launched) -> list[CoreOutput]:
        """Wait for a launched step's tokens and turn them into outputs."""
        result = launched.step.resolve()
        for request in launched.sampled:
            request.pending_sample = -1
        return self._process(launched.sched, launched.plan, result, launched.start)

    def _must_wait(self, launched: _Launched) -> bool:
        """True when a request sampling next needs the token still in flight on the host first."""
        return any(r.pending_sample >= 0 and _needs_previous_tokens(r) for r in launched.sampled)

    def _process(self, sched: SchedulerOutput, plan: _StepPlan, result: RunnerOutput,
                 start: float) -> list[CoreOutput]:
        stats = self.stats
        stats.num_steps += 1
        stats.num_batched_tokens_total += sched.num_batched_tokens
        batch = len(sched.scheduled)
        stats.last_batch_size = batch
        stats.max_batch_size = max(stats.max_batch_size, batch)
        stats.batch_size_histogram[batch] = stats.batch_size_histogram.get(batch, 0) + 1
        stats.num_preemptions = self.scheduler.num_preemptions

        sampled, pooled = plan.sampled, plan.pooled
        collect_step_scores(plan.scored, result.prompt_logprobs)
        outputs: list[CoreOutput] = []
        num_rows = sum(1 + len(d) for d in plan.drafts)
        if len(result.sampled_token_ids) != num_rows:
            raise RuntimeError(f"the runner sampled {len(result.sampled_token_ids)} tokens for {num_rows} rows")
        row = 0
        for index, (request, drafts) in enumerate(zip(sampled, plan.drafts, strict=True)):
            first, row = row, row + 1 + len(drafts)
            if request.is_finished:  # finished (or aborted) on an earlier token while this step ran
                continue
            if request.max_tokens == 0:  # scoring only (prompt log-probabilities): the sampled token is dropped
                outputs.append(self._finish_scoring(request))
                continue
            kept = result.sampled_token_ids[first:row]
            if drafts:
                kept = accepted_prefix(drafts, kept)
                request.speculation.record(len(drafts), len(kept) - 1)
                state = plan.generator_states.get(index)
                if state is not None and len(kept) <= len(drafts):  # rows past a rejected draft drew noise too
                    rewind_seeded_generator(request.generator, state, self.vocab_size, len(kept))
                stats.num_draft_tokens += len(drafts)
                stats.num_accepted_tokens += len(kept) - 1
            status = stop_reason = None
            if request.grammar is not None and not self._grammar_allowed(plan, request, first, kept[0]):
                kept, status = [], RequestStatus.FINISHED_ERROR  # its answer so far is a valid prefix: it stays
            for count, token_id in enumerate(kept, 1):
                request.append_output_token(token_id)
                stats.num_generation_tokens += 1
                status, stop_reason = self._check_stop(request, token_id)
                if status is not None:
                    kept = kept[:count]
                    break
            out = CoreOutput(request.request_id, kept, num_cached_tokens=max(request.num_cached_tokens, 0))
            if request.prompt_logprobs is not None:
                out.prompt_logprobs = request.prompt_logprobs.take()
            if result.logprobs is not None:
                out.logprob_token_ids = result.logprob_token_ids[first : first + len(kept)]
                out.logprobs = result.logprobs[first : first + len(kept)]
                out.ranks = result.sampled_token_ranks[first : first + len(kept)]
            if status is not None:
                request.stop_reason = stop_reason
                self.scheduler.finish_request(request, status)
                out.finish_reason = status.finish_reason
                out.stop_reason = stop_reason
            elif drafts:
                self.scheduler.confirm_drafts(request, len(kept) - 1)
            outputs.append(out)
        if pooled:
            outputs += self._fold_pooled(pooled, result.pooled)
        stats.step_time_total += time.perf_counter() - start
        return outputs

    def _fold_pooled(self, chunks: list[_PooledChunk], partials: list) -> list[CoreOutput]:
        """Fold a step's pooling partials into their requests; an embedding request whose prompt is now
        computed gets its embedding and finishes (its blocks are freed: no KV is kept)."""
        outputs: list[CoreOutput] = []
        for chunk, partial in zip(chunks, partials, strict=True):
            request = chunk.request
            if request.status != RequestStatus.RUNNING:  # aborted, or preempted (it will run its prompt again)
                continue
            request.pooled = fold_partial(request.pooling_method, request.pooled, partial, chunk.start)
            if chunk.start + chunk.num_tokens < request.num_prompt_tokens:
                continue
            embedding = finish_embedding(request.pooling_method, request.pooled, request.num_prompt_tokens,
                                         self.pooling.normalize, request.pooling.dimensions)
            request.pooled = None
            self.scheduler.finish_request(request, RequestStatus.FINISHED_STOPPED)
            outputs.append(CoreOutput(request.request_id, [], finish_reason="stop", embedding=embedding,
                                      num_cached_tokens=max(request.num_cached_tokens, 0)))
        return outputs

    def _grammar_allowed(self, plan: _StepPlan, request: Request, row: int, token_id: int) -> bool:
        """Whether constrained ``request``, sampled in row ``row``, took a token its mask allowed. A token outside
        it means the mask left nothing to sample (a dead end: the grammar allows no token, or none that the
        request's ``allowed_token_ids`` / ``bad_words`` leave, and it is not complete), so the sampler fell back on
        a banned one; the request then ends there, without that token, with finish reason "error", rather than
        go on unconstrained (vLLM ends such a request with "error" too)."""
        bitmask = plan.record.bitmask
        if bitmask is None or bitmask.allowed(row, token_id):
            return True
        logger.warning("request %s: its structured-output constraint allows no next token after %d tokens "
                       "(a dead end: the grammar, or the request's allowed_token_ids / bad_words, leave none to "
                       "sample); it ends there with finish reason 'error'", request.request_id,
                       request.num_output_tokens)
        return False

    def _finish_scoring(self, request: Request) -> CoreOutput:
        """End a request that asked for no output tokens (``max_tokens=0``, prompt scoring): its prompt
        log-probabilities and finish reason "length", no token."""
        self.scheduler.finish_request(request, RequestStatus.FINISHED_LENGTH)
        out = CoreOutput(request.request_id, [], RequestStatus.FINISHED_LENGTH.finish_reason,
                         num_cached_tokens=max(request.num_cached_tokens, 0))
        if request.prompt_logprobs is not None:
            out.prompt_logprobs = request.prompt_logprobs.take()
        return out

    def _check_stop(self, request: Request, token_id: int) -> tuple[RequestStatus | None, int | None]:
        params = request.sampling_params
        if token_id in request.eos_token_ids and _constraint_ended(request):  # before min_tokens, despite ignore_eos
            return RequestStatus.FINISHED_STOPPED, None
        if request.num_output_tokens >= params.min_tokens:
            if token_id in request.eos_token_ids and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED, None
            if token_id in params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED, token_id
        if request.reaches_length_limit(self.max_model_len):
            return RequestStatus.FINISHED_LENGTH, None
        return None, None

    def _step_record(self, sched: SchedulerOutput, previous: InFlightStep | None,
                     meanwhile: Callable[[], None] | None = None) -> _StepPlan:
        """The plain record the runner gets for a scheduled step (decodes first), with the requests it samples,
        the embedding requests it pools and the prompt log-probability collectors of the sequences it scores
        (each in the order the runner returns their results).

        ``previous`` is the step still in flight (asynchronous scheduling), whose tokens constrained rows read;
        ``meanwhile`` is host work to do while the step's bitmask fills (see ``StepBitmask``).
        """
        sequences: list[ScheduledSequence] = []
        sampled: list[Request] = []
        constrained: list[ConstrainedRow] = []
        pooled: list[_PooledChunk] = []
        scored: list[tuple[PromptLogprobsCollector, int]] = []
        drafts: list[list[int]] = []
        generator_states: dict[int, torch.Tensor] = {}
        num_rows = 0  # sampled rows so far (a request with drafts has one per position it verifies)
        for item in sorted(sched.scheduled, key=_runner_order):
            request, num_new = item.request, item.num_new_tokens
            computed = request.num_computed_tokens
            # A token is sampled once every known token (and the one still being sampled, if any) is computed.
            samples = (computed + 1 == request.num_scheduled_tokens if num_new == 1
                       else computed + num_new == request.num_tokens + len(item.draft_token_ids))
            if request.pooling_method is not None:  # an embedding request: pooled, never sampled
                samples = False
                pooled.append(_PooledChunk(request, computed, num_new))
            span = None
            if request.prompt_logprobs is not None and (span := request.prompt_logprobs.span(computed, num_new)):
                scored.append((request.prompt_logprobs, span.count))
            token_ids = request.all_token_ids + item.draft_token_ids if item.draft_token_ids else request.all_token_ids
            sequences.append(ScheduledSequence(token_ids, computed, num_new, request.block_ids,
                                               request.pending_sample, samples, request.sampling_row,
                                               prompt_logprobs=span, pooling_method=request.pooling_method,
                                               lora=request.lora, num_draft_tokens=len(item.draft_token_ids),
                                               long_rope=request.long_rope, images=request.images,
                                               prompt_embeds=request.prompt_embeds,
                                               token_type_start=(request.pooling.token_type_start
                                                                 if request.pooling is not None else None)))
            if samples:
                if request.grammar is not None:  # never drafted: one row each
                    constrained.append(ConstrainedRow(num_rows, request.grammar, request.output_token_ids,
                                                      request.pending_sample))
                if item.draft_token_ids and request.generator is not None and not request.sampling_params.greedy:
                    generator_states[len(sampled)] = request.generator.get_state()
                sampled.append(request)
                drafts.append(item.draft_token_ids)
                num_rows += 1 + len(item.draft_token_ids)
        record = StepRecord(sequences, sched.num_batched_tokens)
        if constrained:
            previous_tokens = (lambda: previous.resolve().sampled_token_ids) if previous is not None else None
            record.bitmask = StepBitmask(constrained, self.vocab_size, previous_tokens, self.stats.grammar,
                                         self.grammars.matcher_batch, meanwhile)
        return _StepPlan(record, sampled, drafts, pooled, scored, generator_states)


def _runner_order(item: ScheduledRequest) -> int:
    """Sort key of a step's requests for the runner (stable): one-token decodes, then decodes with drafts (both
    run as decode rows), then multi-token spans."""
    if item.num_new_tokens == 1:
        return 0
    return 1 if item.num_new_tokens == 1 + len(item.draft_token_ids) else 2


def _constraint_ended(request: Request) -> bool:
    """Whether an EOS ``request`` just sampled ends its structured-output constraint: under a working constraint
    EOS is allowed only where the grammar is complete, so the answer ends there whatever ``ignore_eos`` and
    ``min_tokens`` say (what follows would be unconstrained)."""
    grammar = request.grammar
    return grammar is not None and grammar.in_force


def _needs_previous_tokens(request: Request) -> bool:
    """Whether sampling ``request``'s next token reads its generated tokens (penalties, min_tokens bans, bad words
    longer than one token)."""
    params = request.sampling_params
    return (params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
            or bool(min_tokens_banned(request.sampling_row)) or needs_output_tokens(params))


@dataclass(slots=True)
class _Launched:
    """A step on its way: what was scheduled, its plan (the requests it samples, pools and scores), the runner's
    handle."""

    sched: SchedulerOutput
    plan: _StepPlan
    step: InFlightStep
    start: float

    @property
    def sampled(self) -> list[Request]:
        return self.plan.sampled


@dataclass(slots=True)
class _StepPlan:
    """What one step runs and what comes back for whom: the runner's record, the requests it samples (in the
    order of the sampled rows; one row more than its drafts each), the embedding requests' chunks it pools and the prompt log-probability collectors
    it scores (each with its number of rows)."""

    record: StepRecord
    sampled: list[Request]
    drafts: list[list[int]]  # each sampled request's draft tokens ([] for most): it has 1 + len(drafts) rows
    pooled: list[_PooledChunk] = field(default_factory=list)
    scored: list[tuple[PromptLogprobsCollector, int]] = field(default_factory=list)
    # Seeded random requests with drafts, by index in ``sampled``: their generator's state before the step, to
    # rewind it past the rows of rejected drafts (``rewind_seeded_generator``).
    generator_states: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass(slots=True)
class _PooledChunk:
    """An embedding request's share of a step: the position its chunk starts at and how many tokens it runs."""

    request: Request
    start: int
    num_tokens: int

