"""Beam searches run on the asynchronous engine, read the way a ``RequestGroup`` is read (the server's
``use_beam_search``).

Each prompt's search (``inferneo.beam_search.BeamSearch``) advances one token per step: every live beam of every
prompt is submitted as a single-token request together, and the candidates they return extend the beams. When a
prompt's search ends, the group yields ``(index, RequestOutput)`` for it once: a finished output whose choices are
its beams, best first. Closing the group (``abort()``, or the reading task being cancelled) stops the searches and
aborts the step in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from inferneo.beam_search import BeamSearch, BeamSearchParams, step_sampling_params
from inferneo.engine.protocol import LoraRef
from inferneo.engine.request_group import DeltaAccumulator, EngineRequest, RequestGroup
from inferneo.outputs import RequestOutput


@dataclass(frozen=True, slots=True)
class BeamSearchPrompt:
    """One prompt of a beam-search request: its token ids and its search's settings (prompts of one request differ
    only in ``max_tokens`` when the request left it to the context)."""

    prompt_token_ids: list[int]
    params: BeamSearchParams


class BeamSearchGroup:
    """Beam searches of several prompts; async-iterate it for one ``(index, RequestOutput)`` per prompt.

    ``engine`` is the ``AsyncEngine`` (its ``submit`` and end-of-sequence ids are used); ``decode`` turns a beam's
    generated token ids into its text. Requests are named ``{request_id}-{step}-{prompt}-{beam}``. Construct it on
    the event loop: the searches start at once.
    """

    def __init__(self, engine, request_id: str, prompts: list[BeamSearchPrompt], priority: int,
                 lora: LoraRef | None, decode: Callable[[list[int]], str], cache_salt: str | None = None) -> None:
        self._engine = engine
        self._cache_salt = cache_salt
        self._request_id = request_id
        self._prompts = prompts
        self._priority = priority
        self._lora = lora
        self._decode = decode
        self._queue: asyncio.Queue = asyncio.Queue()
        self._open = len(prompts)
        self._closed = False
        self._step: RequestGroup | None = None
        self._task = asyncio.get_running_loop().create_task(self._run())

    def __aiter__(self) -> BeamSearchGroup:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self._open or self._closed:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled: the client went away
            self.abort()
            raise
        if isinstance(item, BaseException):
            self.abort()
            raise item
        self._open -= 1
        return item

    def abort(self) -> None:
        """Stop the searches and the step in flight; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._task.cancel()
        if self._step is not None:
            self._step.abort()

    async def aclose(self) -> None:
        self.abort()

    async def _run(self) -> None:
        try:
            await self._search()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the reader, who raises it
            self._queue.put_nowait(exc)

    async def _search(self) -> None:
        eos = self._engine.input.eos_token_ids
        searches = [BeamSearch(p.prompt_token_ids, p.params, eos) for p in self._prompts]
        reported: set[int] = set()
        step = 0
        while True:
            pending = [search.pending() for search in searches]
            for index, search in enumerate(searches):
                if search.done and index not in reported:
                    reported.add(index)
                    self._queue.put_nowait((index, search.request_output(f"{self._request_id}-{index}", None,
                                                                         self._decode)))
            if not any(pending):
                return
            requests = [EngineRequest(f"{self._request_id}-{step}-{i}-{b}", tokens,
                                      step_sampling_params(self._prompts[i].params), self._priority, lora=self._lora,
                                      cache_salt=self._cache_salt)
                        for i, beams in enumerate(pending) for b, tokens in enumerate(beams)]
            scored = await self._score(requests)
            for search, beams in zip(searches, pending, strict=True):
                if beams:
                    search.advance([next(scored).outputs[0].logprobs[0] for _ in beams])
            step += 1

    async def _score(self, requests: list[EngineRequest]):
        """Run one step's single-token requests; their finished outputs, in order."""
        group = self._engine.submit(requests)
        self._step = group
        gathered = [DeltaAccumulator() for _ in requests]
        finals: list[RequestOutput | None] = [None] * len(requests)
        try:
            async for index, delta in group:
                gathered[index].add(delta)
                if delta.finished:
                    finals[index] = gathered[index].result()
        finally:
            group.abort()
            self._step = None
        if any(output is None or not output.outputs[0].logprobs for output in finals):
            raise RuntimeError("a beam's scoring request ended without its log-probabilities")
        return iter(finals)
