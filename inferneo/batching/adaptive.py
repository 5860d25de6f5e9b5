"""Batch sizes chosen from measured throughput: ``AdaptiveBatchSizer`` decides, ``AdaptiveBatcher`` uses it."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from inferneo.batching._core import (
    BatchResult,
    Prompt,
    complete_batch,
    is_capacity_error,
    is_turned_away,
    prepare_params,
    prompt_source,
    to_result,
)
from inferneo.client import InferneoClient


class AdaptiveBatchSizer:
    """Proposes the next batch size from the throughput (answered prompts per second) measured at each size.

    The sizes form a doubling ladder from ``min_size`` to ``max_size``. The sizer hill-climbs it: from the best
    size measured so far it tries the next size up, then the next one down, while they are unmeasured; it moves
    to another measured size only when that one is better by more than ``tolerance`` (hysteresis, so noise does
    not make it wander), and otherwise stays: it settles on the best size. Throughput at a size is smoothed
    (``smoothing`` is the weight of a new measurement). A failed batch makes it step down one size and stay
    below the failing size for ``cooldown`` records (twice as long on each new failure there). A clear
    regression at the current size (a measurement below ``1 - regression`` times its average) means the load
    changed: the other sizes' measurements are forgotten and the climb starts again from here.

    ``history`` lists every record as ``(batch_size, elapsed, n_ok, failed)``.
    """

    def __init__(self, min_size: int = 1, max_size: int = 64, initial: int = 8, *, tolerance: float = 0.05,
                 smoothing: float = 0.5, regression: float = 0.3, cooldown: int = 10) -> None:
        if not 1 <= min_size <= max_size:
            raise ValueError(f"need 1 <= min_size <= max_size; got {min_size}, {max_size}")
        if not 0 < smoothing <= 1 or tolerance < 0 or not 0 < regression < 1 or cooldown < 0:
            raise ValueError("need 0 < smoothing <= 1, tolerance >= 0, 0 < regression < 1 and cooldown >= 0")
        ladder = {min_size, max_size}
        size = min_size
        while size < max_size:
            ladder.add(size)
            size *= 2
        self.sizes: list[int] = sorted(ladder)
        self.tolerance = tolerance
        self.smoothing = smoothing
        self.regression = regression
        self.cooldown = cooldown
        self._rung = self._nearest(max(min_size, min(initial, max_size)))
        self._throughput: dict[int, float] = {}
        self._ceiling = len(self.sizes) - 1  # the highest rung allowed for now (lowered after a failure)
        self._ceiling_left = 0  # records until the ceiling lifts
        self._failures: dict[int, int] = {}
        self.history: list[tuple[int, float, int, bool]] = []

    @property
    def size(self) -> int:
        """The batch size to use next."""
        return self.sizes[self._rung]

    def throughput(self, size: int) -> float | None:
        """The smoothed throughput measured at ``size`` (``None`` when unmeasured or forgotten)."""
        return self._throughput.get(self._nearest(size))

    def record(self, batch_size: int, elapsed: float, n_ok: int, error: BaseException | None = None) -> int:
        """Record a batch of ``batch_size`` prompts that took ``elapsed`` seconds, answered ``n_ok`` of them and
        failed with ``error`` (for failures that a smaller batch may avoid); return the next size."""
        failed = error is not None or n_ok <= 0
        self.history.append((batch_size, elapsed, n_ok, failed))
        rung = self._nearest(batch_size)
        if self._ceiling_left:
            self._ceiling_left -= 1
            if not self._ceiling_left:
                self._ceiling = len(self.sizes) - 1
        if failed:
            self._throughput.pop(rung, None)
            self._failures[rung] = self._failures.get(rung, 0) + 1
            if rung > 0 and self.cooldown:
                self._ceiling = min(self._ceiling, rung - 1) if self._ceiling_left else rung - 1
                self._ceiling_left = self.cooldown * 2 ** min(self._failures[rung] - 1, 6)
            self._rung = max(min(rung - 1, self._ceiling), 0)
            return self.size
        measured = n_ok / max(elapsed, 1e-9)
        previous = self._throughput.get(rung)
        if previous is not None and measured < previous * (1 - self.regression):
            self._throughput = {rung: measured}
        elif previous is None:
            self._throughput[rung] = measured
        else:
            self._throughput[rung] = previous + self.smoothing * (measured - previous)
        self._rung = self._next(rung)
        return self.size

    def _next(self, rung: int) -> int:
        usable = {r: t for r, t in self._throughput.items() if r <= self._ceiling or r == rung}
        best = max(usable, key=usable.__getitem__)
        if best != rung and usable[best] > usable.get(rung, 0.0) * (1 + self.tolerance):
            return best
        for neighbour in (rung + 1, rung - 1):
            if 0 <= neighbour <= self._ceiling and neighbour not in self._throughput:
                return neighbour
        return min(rung, self._ceiling)

    def _nearest(self, size: int) -> int:
        target = math.log(max(size, 1))
        return min(range(len(self.sizes)), key=lambda r: abs(math.log(self.sizes[r]) - target))


class AdaptiveBatcher:
    """Completes a stream of prompts in batches whose size an :class:`AdaptiveBatchSizer` picks from measured
    throughput: ``for result in AdaptiveBatcher(client, model, max_tokens=64).process(prompts): ...``.

    The input is read lazily (a generator of any length works) and results come in input order, one
    :class:`BatchResult` per prompt, with its ``error`` when it failed. Failures that suggest overload (timeouts,
    429, 5xx, lost connections, once the client's own retries are spent) shrink the batches. ``params`` go with
    every call; ``response_format=`` a pydantic model or JSON schema fills each result's ``parsed``.
    """

    def __init__(self, client: InferneoClient, model: str | None = None, sizer: AdaptiveBatchSizer | None = None,
                 **params: Any) -> None:
        self.client = client
        self.model = model
        self.sizer = sizer or AdaptiveBatchSizer()
        self.params, self.output_format = prepare_params(params)

    def process(self, prompts: Iterable[Prompt]) -> Iterator[BatchResult]:
        """Yield one result per prompt, in order, sending one batch at a time. A batch the server turned away whole
        without working on it (429, 503, no connection) is sent again in the smaller batches the sizer steps down
        to; its prompts fail with that error only once the sizer cannot step down below it."""
        source = iter(prompt_source(prompts))
        index = 0
        turned_away: list[Prompt] = []  # the prompts of a batch to send again, smaller
        while True:
            size = self.sizer.size
            batch = turned_away[:size]
            batch += islice(source, size - len(batch))
            if not batch:
                return
            start = time.perf_counter()
            outcomes = complete_batch(self.client, self.model, batch, self.params)
            elapsed = time.perf_counter() - start
            errors = [o for o in outcomes if isinstance(o, BaseException)]
            overload = next((e for e in errors if is_capacity_error(e)), None)
            # A short last batch says little about its size, and prompts refused on their merits say nothing.
            if overload is not None or (len(batch) == size and len(errors) < len(batch)):
                self.sizer.record(len(batch), elapsed, len(batch) - len(errors), overload)
            if len(errors) == len(batch) and all(map(is_turned_away, errors)) and self.sizer.size < size:
                turned_away = batch + turned_away[len(batch):]
                continue
            turned_away = turned_away[len(batch):]
            for k, (prompt, outcome) in enumerate(zip(batch, outcomes, strict=True)):
                yield to_result(index + k, prompt, outcome, self.output_format)
            index += len(batch)

    def run(self, prompts: Iterable[Prompt]) -> list[BatchResult]:
        """All results of :meth:`process` as a list."""
        return list(self.process(prompts))
