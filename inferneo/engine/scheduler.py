"""The token-budget scheduler: there is no prefill phase and no decode phase.

Each step hands out at most ``max_num_batched_tokens`` tokens. Running requests are served first (one token
for a decoding request, plus its draft tokens under speculative decoding; the next chunk for one still
prefilling), then waiting requests are admitted in policy
order while budget, sequence slots and KV blocks last. When blocks run out, the lowest-ranked running request
is preempted: its blocks are freed and it goes back to the waiting queue to be recomputed later.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from inferneo.engine.kv_cache_manager import KVCacheManager
from inferneo.engine.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    """A request's share of a step: ``num_new_tokens`` tokens to run, the last ``len(draft_token_ids)`` of them
    draft tokens (speculative decoding) that the step verifies."""

    request: Request
    num_new_tokens: int
    draft_token_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class WaitingQueue:
    """Requests waiting for admission: first-come-first-served or by (priority, arrival)."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self._fifo: deque[Request] = deque()
        self._heap: list[tuple[int, float, int, Request]] = []
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._fifo) if self.policy == "fcfs" else len(self._heap)

    def __iter__(self):
        if self.policy == "fcfs":
            return iter(self._fifo)
        return (entry[-1] for entry in sorted(self._heap))

    def add(self, request: Request, front: bool = False) -> None:
        if self.policy == "fcfs":
            (self._fifo.appendleft if front else self._fifo.append)(request)
        else:
            heapq.heappush(self._heap, (request.priority, request.arrival_time, next(self._counter), request))

    def peek(self) -> Request:
        return self._fifo[0] if self.policy == "fcfs" else self._heap[0][-1]

    def pop(self) -> Request:
        return self._fifo.popleft() if self.policy == "fcfs" else heapq.heappop(self._heap)[-1]

    def remove(self, request: Request) -> None:
        if self.policy == "fcfs":
            self._fifo.remove(request)
        else:
            self._heap = [entry for entry in self._heap if entry[-1] is not request]
            heapq.heapify(self._heap)


class Scheduler:
    """Decides which requests run in the next step and how many of their tokens."""

    def __init__(
        self,
        kv_cache: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        policy: str = "fcfs",
        enable_chunked_prefill: bool = True,
        whole_images: bool = False,
    ) -> None:
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.enable_chunked_prefill = enable_chunked_prefill
        # A model whose image tokens attend to each other both ways (Gemma 3): no prompt chunk ends inside an
        # image, so each image's last rows are computed in one step with the rest of it (the earlier ones may be
        # in the cache already); the engine core makes sure one image fits a step.
        self.whole_images = whole_images
        self.waiting = WaitingQueue(policy)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_rope_recomputes = 0  # sequences computed again on growing past LongRoPE's original context
        self.max_model_len: int | None = None  # set by the engine core; used with asynchronous scheduling
        self.max_loras = 0  # LoRA: distinct adapters the running batch may hold (0: LoRA is off)
        # LoRA: after this many steps passed over for want of a slot, a waiting request stops every adapter request
        # behind it from starting, so the running adapters finish and free a slot (a busy adapter whose requests
        # keep coming would otherwise hold the slots, and the request would wait for ever)
        self.lora_max_wait_steps = 64
        # Speculative decoding (set by the engine core): a decoding request's draft tokens for this step, at most
        # the given number ([] when it takes none); None: speculation is off.
        self.propose_drafts: Callable[[Request, int], list[int]] | None = None

    # ---- request lifecycle -------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        switch = self.kv_cache.rope_switch
        request.long_rope = switch is not None and switch.long_prompt(request.num_prompt_tokens)
        self.requests[request.request_id] = request
        request.status = RequestStatus.WAITING
        self.waiting.add(request)

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        """Remove a request from whichever queue holds it and free its blocks."""
        if request.is_finished:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        self.kv_cache.free(request)
        del self.requests[request.request_id]

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- scheduling --------------------------------------------------------------------------------------

    def schedule(self, busy: list[Request] | None = None) -> SchedulerOutput:
        """The next step. ``busy`` (pipeline parallelism): requests in steps still in flight, which this step
        neither schedules nor preempts."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        busy = busy or []
        busy_ids = {id(r) for r in busy}
        scheduled_running: list[Request] = []

        # 1. Running requests, in order; preempt from the back when the cache is full.
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if self._grows_past_rope_switch(request):
                if request.pending_sample >= 0:  # its last token is not on the host yet: switch once it lands
                    index += 1
                    continue
                self._switch_to_long_rope(request)
            num_new = min(request.num_scheduled_tokens - request.num_computed_tokens, budget)
            if self.whole_images:
                num_new = self._image_boundary(request, request.num_computed_tokens, num_new)
            if num_new <= 0 or id(request) in busy_ids or self._ends_with_pending_token(request):
                index += 1  # nothing to compute, or the token in flight is its last: it finishes when that lands
                continue
            drafts = self._drafts(request, num_new, budget)
            if drafts and not self.kv_cache.allocate_slots(request, 1 + len(drafts)):
                drafts = []  # no room for them: one token, preempting others if even that finds none
            num_new += len(drafts)  # (with drafts, their slots are held already: the loop below passes at once)
            while not self.kv_cache.allocate_slots(request, num_new):
                victim = self._pick_victim(exclude=scheduled_running + busy)
                if victim is None:  # only requests already scheduled this step remain: wait for the next step
                    victim = request
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(request, num_new, drafts))
                scheduled_running.append(request)
                budget -= num_new
                index += 1
                continue
            # The request itself was preempted; ``self.running`` shrank, so ``index`` already points at the next.

        # 2. Waiting requests, unless this step had to preempt (no point admitting more).
        skipped: list[Request] = []  # waiting requests whose adapter finds no free slot this step
        loras = self._running_loras() if self.max_loras else set()
        held = False  # a request has waited lora_max_wait_steps for a slot: no adapter request behind it starts
        if not out.preempted:
            while len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
                request = self.waiting.peek()
                if request.lora is not None and (held or (request.lora.lora_id not in loras
                                                          and len(loras) >= self.max_loras)):
                    request.lora_slot_waits += 1
                    held = held or request.lora_slot_waits > self.lora_max_wait_steps
                    skipped.append(self.waiting.pop())
                    continue
                if self._grows_past_rope_switch(request):  # preempted at the switch: computed again, long
                    if request.pending_sample >= 0:
                        break  # its last token is not on the host yet
                    self._switch_to_long_rope(request)
                cached_blocks: list[int] = []
                if request.num_computed_tokens == 0 and not request.block_ids and request.reads_prefix_cache:
                    cached_blocks, num_cached = self.kv_cache.find_cached_prefix(request)
                else:
                    num_cached = request.num_computed_tokens
                num_new = request.num_tokens - num_cached
                if num_new > budget:
                    if not self.enable_chunked_prefill:
                        break
                    num_new = budget
                if self.whole_images:
                    num_new = self._image_boundary(request, num_cached, num_new)
                    if num_new <= 0:
                        break  # the next image does not fit what is left of this step's budget
                if request.num_computed_tokens == 0 and not request.block_ids:
                    request.num_computed_tokens = num_cached
                if not self.kv_cache.allocate_slots(request, num_new, cached_blocks):
                    request.num_computed_tokens = 0
                    break
                if request.num_cached_tokens < 0:
                    request.num_cached_tokens = num_cached
                self.waiting.pop()
                request.status = RequestStatus.RUNNING
                self.running.append(request)
                out.scheduled.append(ScheduledRequest(request, num_new))
                budget -= num_new
                if request.lora is not None:
                    loras.add(request.lora.lora_id)
                    request.lora_slot_waits = 0
        for request in reversed(skipped):
            self.waiting.add(request, front=True)

        out.num_batched_tokens = self.max_num_batched_tokens - budget
        return out

    @staticmethod
    def _image_boundary(request: Request, start: int, num_new: int) -> int:
        """``num_new`` tokens from ``start``, cut back to the start of the image a chunk would end inside (0 when
        that image starts at or before ``start``: it waits for a step with room for the rest of it)."""
        stop = start + num_new
        for image in request.images or ():
            if image.offset < stop < image.end:
                return max(image.offset - start, 0)
        return num_new

    def _drafts(self, request: Request, num_new: int, budget: int) -> list[int]:
        """Draft tokens for a request decoding its next token (speculation on), within the step's budget; the
        caller runs them only if the KV cache has room for them too (else the request decodes one token). A
        sequence on LongRoPE's short rotation drafts no further than the original context (past it, it switches)."""
        if self.propose_drafts is None or num_new != 1 or budget < 2 or request.pending_sample >= 0:
            return []
        room = budget - 1
        switch = self.kv_cache.rope_switch
        if switch is not None and not request.long_rope:
            room = min(room, switch.original - request.num_tokens)
        return self.propose_drafts(request, room) if room > 0 else []

    def _grows_past_rope_switch(self, request: Request) -> bool:
        """Whether ``request``, on LongRoPE's short rotation, has a token at the original context's length or past it
        to compute (its sequence is longer than the original context now)."""
        switch = self.kv_cache.rope_switch
        return switch is not None and not request.long_rope and request.num_scheduled_tokens > switch.original

    def _switch_to_long_rope(self, request: Request) -> None:
        """Move ``request`` to LongRoPE's long rotation: its KV blocks are freed (the prefix cache keeps them for
        short sequences) and every token is computed again, rotated by the long factors, as Hugging Face's generation
        recomputes a sequence that grows past the original context."""
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.block_hashes.clear()  # its hash chain starts otherwise now (``KVCacheManager._chain_start``)
        request.long_rope = True
        self.num_rope_recomputes += 1

    def _running_loras(self) -> set[int]:
        return {r.lora.lora_id for r in self.running if r.lora is not None}

    def _ends_with_pending_token(self, request: Request) -> bool:
        """True when the token still being sampled for ``request`` reaches its max_tokens or the context limit."""
        return request.pending_sample >= 0 and request.reaches_length_limit(self.max_model_len, extra=1)

    def _pick_victim(self, exclude: list[Request]) -> Request | None:
        candidates = [r for r in self.running if not any(r is e for e in exclude)]
        if not candidates:
            return None
        if self.policy == "priority":
            return max(candidates, key=Request.sort_key)
        return candidates[-1]

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add(request, front=True)

    # ---- after the model ran -----------------------------------------------------------------------------

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance computed-token counts and register newly full blocks in the prefix cache.

        Requests that finished (or were preempted) while the step ran are skipped.
        """
        for item in out.scheduled:
            request = item.request
            if request.status != RequestStatus.RUNNING:
                continue
            # Draft tokens count once they are confirmed (``confirm_drafts``); their KV is written already.
            request.num_computed_tokens += item.num_new_tokens - len(item.draft_token_ids)
            self.kv_cache.cache_full_blocks(request)

    def confirm_drafts(self, request: Request, num_confirmed: int) -> None:
        """``num_confirmed`` draft tokens of the request's last step were kept: their keys and values, written by
        that step, are now part of the sequence (and full blocks of them join the prefix cache)."""
        if num_confirmed and request.status == RequestStatus.RUNNING:
            request.num_computed_tokens += num_confirmed
            self.kv_cache.cache_full_blocks(request)
