"""What an async caller iterates: the outputs of requests submitted together, as they arrive.

Outputs are deltas (the new text, tokens and log-probabilities of each step). A consumer that falls behind gets
the deltas that piled up merged into one per request, so a slow reader costs one output per wake-up, not one per
step. Closing the group (``abort()``, or the iterating task being cancelled) aborts whatever has not finished.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from inferneo.outputs import CompletionOutput, RequestOutput
from inferneo.sampling_params import SamplingParams


@dataclass(slots=True)
class EngineRequest:
    """One prompt (already tokenized) to generate for."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0


class RequestGroup:
    """Requests submitted together; async-iterate it for ``(index, RequestOutput)`` deltas until all finish."""

    def __init__(self, abort: Callable[[list[str]], None], abort_later: Callable[[list[str]], None],
                 request_ids: list[str]) -> None:
        self._abort = abort
        self._abort_later = abort_later
        self.request_ids = request_ids
        self._queue: asyncio.Queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self._open = set(range(len(request_ids)))
        self._ready: deque[tuple[int, RequestOutput]] = deque()
        self._closed = False

    def __aiter__(self) -> RequestGroup:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if self._ready:
            return self._ready.popleft()
        if not self._open or self._closed:
            raise StopAsyncIteration
        try:
            items = [await self._queue.get()]
        except BaseException:  # cancelled: the client went away
            self.abort()
            raise
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        merged: dict[int, RequestOutput] = {}
        for item in items:
            if isinstance(item, BaseException):
                self.abort()
                raise item
            index, output = item
            earlier = merged.get(index)
            merged[index] = output if earlier is None else merge_deltas(earlier, output)
        for index, output in merged.items():
            if output.finished:
                self._open.discard(index)
        self._ready.extend(merged.items())
        return self._ready.popleft()

    def abort(self) -> None:
        """Stop every request of the group that has not finished; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._open:
            self._abort([self.request_ids[i] for i in sorted(self._open)])

    async def aclose(self) -> None:
        self.abort()

    def put(self, item: object) -> None:
        """Deliver an output or an exception (call on the group's event loop)."""
        self._queue.put_nowait(item)

    def __del__(self) -> None:
        # Safety net for a group dropped without being closed (e.g. a response that never started): the
        # engine's late-abort queue is lock-free, so this is safe wherever the collector runs.
        if not self._closed and self._open:
            self._abort_later([self.request_ids[i] for i in self._open])


def merge_deltas(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One delta saying what two consecutive deltas of a request say."""
    by_index = {c.index: c for c in earlier.outputs}
    for c in later.outputs:
        before = by_index.get(c.index)
        if before is None:
            by_index[c.index] = c
            continue
        logprobs = before.logprobs
        if c.logprobs is not None:
            logprobs = c.logprobs if logprobs is None else logprobs + c.logprobs
        by_index[c.index] = CompletionOutput(
            index=c.index, text=before.text + c.text, token_ids=before.token_ids + c.token_ids,
            cumulative_logprob=c.cumulative_logprob, logprobs=logprobs, finish_reason=c.finish_reason,
            stop_reason=c.stop_reason)
    return RequestOutput(later.request_id, later.prompt, later.prompt_token_ids,
                         [by_index[i] for i in sorted(by_index)], later.finished, later.num_cached_tokens)
