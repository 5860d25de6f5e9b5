"""What an async caller iterates: the outputs of requests submitted together, as they arrive.

Outputs are deltas (the new text, tokens and log-probabilities of each step). A consumer that falls behind gets
the deltas that piled up merged into one per request, so a slow reader costs one output per wake-up, not one per
step. Closing the group (``abort()``, or the iterating task being cancelled) aborts whatever has not finished.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass

from inferneo.engine.prompt_embeds import PromptEmbeds
from inferneo.engine.protocol import LoraRef, PoolingRequest
from inferneo.multimodal.inputs import ImageInput
from inferneo.outputs import CompletionOutput, RequestOutput
from inferneo.sampling_params import SamplingParams


@dataclass(slots=True)
class EngineRequest:
    """One prompt (already tokenized) to generate for, or (``pooling`` set) to embed."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams | None  # None for an embedding request
    priority: int = 0
    _: KW_ONLY  # what a request is for is always named, never a position
    pooling: PoolingRequest | None = None
    lora: LoraRef | None = None  # the LoRA adapter to run with (None: the base model)
    cache_salt: str | None = None  # vLLM's: prefix-cache blocks shared only with requests of the same salt
    images: list[ImageInput] | None = None  # a vision-language prompt's images (its placeholders expanded)
    # a prompt given as embeddings (``prompt_token_ids`` are then its placeholders: ``InputProcessor``)
    prompt_embeds: PromptEmbeds | None = None


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
        by_index: dict[int, list[RequestOutput]] = {}
        for item in items:
            if isinstance(item, BaseException):
                self.abort()
                raise item
            index, output = item
            by_index.setdefault(index, []).append(output)
        merged = {index: deltas[0] if len(deltas) == 1 else gather_deltas(deltas)
                  for index, deltas in by_index.items()}
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


def gather_deltas(deltas: list[RequestOutput]) -> RequestOutput:
    """One delta saying what consecutive deltas of a request say."""
    gathered = DeltaAccumulator()
    for delta in deltas:
        gathered.add(delta)
    return gathered.result()


class DeltaAccumulator:
    """The deltas of one request gathered into one output: each choice's text pieces joined once (at the end),
    its tokens and log-probabilities appended, its finish taken from the last delta; the prompt log-probabilities
    kept from the delta that carried them."""

    __slots__ = ("_last", "_choices", "_prompt_logprobs")

    def __init__(self) -> None:
        self._last: RequestOutput | None = None
        self._choices: dict[int, _ChoicePieces] = {}
        self._prompt_logprobs = None

    def add(self, delta: RequestOutput) -> None:
        if delta.prompt_logprobs is not None:
            self._prompt_logprobs = delta.prompt_logprobs
        for choice in delta.outputs:
            self._choices.setdefault(choice.index, _ChoicePieces()).add(choice)
        self._last = delta

    def result(self) -> RequestOutput:
        last = self._last
        return RequestOutput(last.request_id, last.prompt, last.prompt_token_ids,
                             [self._choices[i].whole() for i in sorted(self._choices)], last.finished,
                             last.num_cached_tokens, self._prompt_logprobs, last.num_prompt_embeds)


class _ChoicePieces:
    """One choice's deltas, gathered."""

    __slots__ = ("texts", "token_ids", "logprobs", "last")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list | None = None
        self.last: CompletionOutput | None = None

    def add(self, delta: CompletionOutput) -> None:
        self.texts.append(delta.text)
        self.token_ids += delta.token_ids
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)
        self.last = delta

    def whole(self) -> CompletionOutput:
        last = self.last
        return CompletionOutput(index=last.index, text="".join(self.texts), token_ids=self.token_ids,
                                cumulative_logprob=last.cumulative_logprob, logprobs=self.logprobs,
                                finish_reason=last.finish_reason, stop_reason=last.stop_reason)
