"""The batching tools without a model: adaptive sizing on synthetic throughput curves, and the batchers over a
client whose transport answers in this process (``httpx.MockTransport``)."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import httpx
import pytest

from inferneo.batching import (
    AdaptiveBatcher,
    AdaptiveBatchSizer,
    BatchResult,
    DynamicBatcher,
    astream_batches,
    stream_batches,
)
from inferneo.batching._core import is_prompt_error
from inferneo.client import (
    AsyncInferneoClient,
    BadRequestError,
    InferneoClient,
    InternalServerError,
    RateLimitError,
)


def peak_at(peak: float):
    """A throughput curve (prompts/s against batch size) that rises, peaks at ``peak`` and falls."""
    return lambda size: size / (1 + (size / peak) ** 2)


def drive(sizer: AdaptiveBatchSizer, curve, rounds: int, noise: float = 0.03, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    proposals = []
    for _ in range(rounds):
        size = sizer.size
        proposals.append(size)
        throughput = curve(size) * (1 + rng.uniform(-noise, noise))
        sizer.record(size, size / throughput, size)
    return proposals


# ---- AdaptiveBatchSizer ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("initial", [1, 8, 16, 64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sizer_settles_on_the_peak(initial, seed):
    sizer = AdaptiveBatchSizer(min_size=1, max_size=64, initial=initial)
    proposals = drive(sizer, peak_at(16), 40, seed=seed)
    assert proposals[-20:] == [16] * 20, proposals


def test_sizer_stays_within_bounds_and_on_its_ladder():
    sizer = AdaptiveBatchSizer(min_size=3, max_size=50, initial=1000)
    assert sizer.sizes == [3, 6, 12, 24, 48, 50] and sizer.size == 50
    rng = random.Random(7)
    for _ in range(500):
        size = sizer.size
        assert 3 <= size <= 50 and size in sizer.sizes
        error = RuntimeError("overloaded") if rng.random() < 0.2 else None
        sizer.record(size, rng.uniform(0.01, 2.0), 0 if error else size, error)
    with pytest.raises(ValueError):
        AdaptiveBatchSizer(min_size=0)
    with pytest.raises(ValueError):
        AdaptiveBatchSizer(min_size=8, max_size=4)


def test_sizer_backs_off_on_errors_and_avoids_the_failing_size():
    sizer = AdaptiveBatchSizer(min_size=1, max_size=64, initial=16, cooldown=10)
    drive(sizer, peak_at(16), 20)
    assert sizer.size == 16
    sizer.record(16, 5.0, 0, TimeoutError("too slow"))
    assert sizer.size == 8
    # During the cooldown the sizer does not go back to 16, even though 16 was the best size.
    proposals = drive(sizer, peak_at(16), 8)
    assert 16 not in proposals and set(proposals) <= {4, 8}
    # Afterwards it probes 16 again and, with no more failures, settles there.
    assert drive(sizer, peak_at(16), 30)[-10:] == [16] * 10


def test_sizer_hysteresis_ignores_small_changes_but_follows_a_regression():
    sizer = AdaptiveBatchSizer(min_size=1, max_size=64, initial=16)
    drive(sizer, peak_at(16), 30)
    # The curve flattens a little (within the tolerance): the sizer keeps its size.
    assert set(drive(sizer, lambda s: peak_at(16)(s) * (0.98 if s == 16 else 1.0), 20, noise=0)) == {16}
    # The load changes: now 4 is best and 16 is much slower. The sizer notices and settles on 4.
    assert drive(sizer, peak_at(4), 40)[-10:] == [4] * 10


# ---- fake servers ------------------------------------------------------------------------------------------------


class FakeCompletions:
    """A ``/v1/completions`` that answers each prompt with its upper-cased text, refuses prompts containing
    ``BAD`` (400 about the prompt, like a too-long prompt) and fails calls containing ``BOOM`` (500)."""

    def __init__(self, delay: float = 0.0, queue: int | None = None) -> None:
        self.delay = delay
        self.queue = queue  # calls with more prompts than this are turned away with 429 (the queue is full)
        self.calls: list[tuple[list, dict]] = []
        self.sent: list = []  # each call's "prompt" as sent: a list, or one prompt on its own
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak_in_flight = 0

    def answer(self, body: dict) -> httpx.Response:
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        with self.lock:
            self.calls.append((prompts, {k: v for k, v in body.items() if k not in ("prompt", "model")}))
            self.sent.append(body["prompt"])
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if self.delay:
                time.sleep(self.delay)
            if self.queue is not None and len(prompts) > self.queue:
                return _error(429, "the queue is full", None)
            if any("BOOM" in p for p in prompts):
                return _error(500, "engine failed", None)
            if any("BAD" in p for p in prompts):
                return _error(400, "the prompt is too long", "prompt")
            if body.get("temperature", 0) < 0:
                return _error(400, "temperature: must be >= 0", "temperature")
            n = body.get("n", 1)
            choices = [{"index": i * n + j, "text": p.upper() + (f"#{j}" if n > 1 else ""), "finish_reason": "stop"}
                       for i, p in enumerate(prompts) for j in range(n)]
            return httpx.Response(200, json={"id": "cmpl-x", "object": "text_completion", "created": 0,
                                             "model": "m", "choices": choices})
        finally:
            with self.lock:
                self.in_flight -= 1

    def client(self, **kw) -> InferneoClient:
        transport = httpx.MockTransport(lambda request: self.answer(json.loads(request.content)))
        return InferneoClient("http://fake", http_client=httpx.Client(transport=transport), max_retries=0, **kw)

    def async_client(self) -> AsyncInferneoClient:
        async def handler(request: httpx.Request) -> httpx.Response:
            await asyncio.sleep(0)
            return self.answer(json.loads(request.content))

        transport = httpx.MockTransport(handler)
        return AsyncInferneoClient("http://fake", http_client=httpx.AsyncClient(transport=transport), max_retries=0)


def _error(status: int, message: str, param: str | None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": "x", "param": param, "code": None}})


@pytest.mark.parametrize(("param", "one_prompts"), [("prompt", True), ("messages", True), ("max_tokens", True),
                                                    ("max_completion_tokens", True), (None, True),
                                                    ("temperature", False)])
def test_a_400_about_one_prompt_is_bisected_one_about_a_setting_is_not(param, one_prompts):
    """The server names the answer's limit as the request gave it (a chat request's max_completion_tokens): a
    prompt too long for it is that prompt's fault, as for max_tokens."""
    transport = httpx.MockTransport(lambda request: _error(400, "prompt 1: too long for the answer", param))
    client = InferneoClient("http://fake", http_client=httpx.Client(transport=transport), max_retries=0)
    with pytest.raises(BadRequestError) as caught:
        client.completions.create(model="m", prompt=["a", "b"], max_tokens=2)
    assert is_prompt_error(caught.value) is one_prompts


class CountingPrompts:
    """A generator of ``count`` prompts that tracks how far it has been read."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.pulled = 0

    def __iter__(self):
        for i in range(self.count):
            self.pulled += 1
            yield f"p{i}"


# ---- stream_batches ----------------------------------------------------------------------------------------------


def test_stream_batches_over_10000_prompts_is_ordered_and_bounded():
    fake = FakeCompletions()
    source = CountingPrompts(10_000)
    batch_size, max_in_flight = 16, 4
    ahead = 0
    seen = 0
    for result in stream_batches(fake.client(), "m", source, batch_size=batch_size, max_in_flight=max_in_flight,
                                 max_tokens=5):
        assert isinstance(result, BatchResult) and result.index == seen
        assert result.prompt == f"p{seen}" and result.text == f"P{seen}" and result.ok
        seen += 1
        ahead = max(ahead, source.pulled - seen)
    assert seen == 10_000
    assert ahead <= batch_size * max_in_flight  # never more than the in-flight window was read ahead
    assert fake.peak_in_flight <= max_in_flight
    assert len(fake.calls) == 10_000 // batch_size and all(p["max_tokens"] == 5 for _, p in fake.calls)


def test_stream_batches_gives_each_failed_prompt_its_error():
    fake = FakeCompletions()
    prompts = [f"p{i}" for i in range(20)]
    prompts[5] = "BAD one"   # refused alone: its batch is bisected
    prompts[13] = "BOOM"     # its whole batch fails
    results = list(stream_batches(fake.client(), "m", iter(prompts), batch_size=4, max_in_flight=2))
    assert [r.index for r in results] == list(range(20))
    failed = {r.index: r.error for r in results if not r.ok}
    assert set(failed) == {5, 12, 13, 14, 15}
    assert isinstance(failed[5], BadRequestError) and isinstance(failed[13], InternalServerError)
    assert results[4].text == "P4" and results[6].text == "P6"  # the BAD prompt's batch-mates succeed
    with pytest.raises(BadRequestError):
        _ = results[5].text  # never a silent None


def test_leaving_stream_batches_early_stops_reading():
    fake = FakeCompletions(delay=0.01)
    source = CountingPrompts(1_000_000)
    for result in stream_batches(fake.client(), "m", source, batch_size=8, max_in_flight=3):
        if result.index == 20:
            break
    time.sleep(0.1)
    assert source.pulled <= 8 * 3 + 24


def test_astream_batches_over_an_async_generator():
    fake = FakeCompletions()

    async def prompts():
        for i in range(1000):
            yield f"a{i}"

    async def main():
        client = fake.async_client()
        return [r async for r in astream_batches(client, "m", prompts(), batch_size=10, max_in_flight=3)]

    results = asyncio.run(main())
    assert [r.index for r in results] == list(range(1000))
    assert all(r.text == f"A{r.index}" for r in results) and fake.peak_in_flight <= 3


# ---- AdaptiveBatcher ---------------------------------------------------------------------------------------------


def test_adaptive_batcher_uses_the_sizers_sizes_in_order():
    fake = FakeCompletions()
    sizer = AdaptiveBatchSizer(min_size=2, max_size=32, initial=4)
    batcher = AdaptiveBatcher(fake.client(), "m", sizer, max_tokens=3)
    results = list(batcher.process(f"q{i}" for i in range(300)))
    assert [r.index for r in results] == list(range(300)) and all(r.text == f"Q{r.index}" for r in results)
    sent = [len(prompts) for prompts, _ in fake.calls]
    proposals = [size for size, *_ in sizer.history]
    assert sent[:len(proposals)] == proposals and all(2 <= s <= 32 for s in sent)


def test_adaptive_batcher_shrinks_after_a_server_failure():
    fake = FakeCompletions()
    sizer = AdaptiveBatchSizer(min_size=1, max_size=64, initial=16)
    prompts = [f"q{i}" for i in range(16)] + ["BOOM"] + [f"r{i}" for i in range(40)]
    results = AdaptiveBatcher(fake.client(), "m", sizer).run(prompts)
    assert [r.index for r in results] == list(range(len(prompts)))
    assert [len(p) for p, _ in fake.calls] == [16, 32, 9]  # 16 went well, 32 was tried and failed, back to 16
    assert [failed for *_, failed in sizer.history] == [False, True] and sizer.size == 16
    assert all(r.ok == (not 16 <= r.index < 48) for r in results)  # the failed call's prompts carry its error
    assert all(isinstance(r.error, InternalServerError) for r in results[16:48])


def test_adaptive_batcher_sends_a_batch_turned_away_with_429_again_smaller():
    """A server whose queue is full answers 429 without working on the call: its prompts once failed with the 429
    while the sizer stepped down; now they go again in the smaller batches, and fail only at the smallest size."""
    fake = FakeCompletions(queue=4)
    sizer = AdaptiveBatchSizer(min_size=2, max_size=64, initial=16)
    results = AdaptiveBatcher(fake.client(), "m", sizer).run([f"q{i}" for i in range(40)])
    assert [r.index for r in results] == list(range(40)) and all(r.text == f"Q{r.index}" for r in results)
    assert [len(p) for p, _ in fake.calls[:3]] == [16, 8, 4]
    assert sum(len(p) > 4 for p, _ in fake.calls) <= 4  # the sizer tries 8 again only after its cooldown
    fake = FakeCompletions(queue=1)
    results = AdaptiveBatcher(fake.client(), "m", AdaptiveBatchSizer(min_size=2, max_size=8, initial=4)).run(
        [f"q{i}" for i in range(6)])
    assert [r.index for r in results] == list(range(6))
    assert all(isinstance(r.error, RateLimitError) for r in results)  # nothing smaller to try: the 429 is the answer
    assert [len(p) for p, _ in fake.calls] == [4, 2, 2, 2]


# ---- DynamicBatcher (fast paths; the real-server tests are in test_batching.py) ------------------------------------


def test_dynamic_batcher_rejects_bad_settings_and_async_clients():
    fake = FakeCompletions()
    with pytest.raises(ValueError):
        DynamicBatcher(fake.client(), "m", max_batch_size=0)
    with pytest.raises(TypeError):
        DynamicBatcher(fake.async_client(), "m")


def test_dynamic_batcher_groups_by_params_and_honours_cancel():
    fake = FakeCompletions()
    with DynamicBatcher(fake.client(), "m", max_batch_size=100, max_wait_time=30, max_tokens=4) as batcher:
        a = [batcher.submit(f"a{i}") for i in range(5)]
        b = [batcher.submit(f"b{i}", max_tokens=9) for i in range(3)]
        c = batcher.submit("c", priority=-1)
        dropped = batcher.submit("dropped")
        assert dropped.cancel()
        batcher.flush()
        assert [f.result().text for f in a] == [f"A{i}" for i in range(5)]
        assert [f.result().text for f in b] == ["B0", "B1", "B2"] and c.result().text == "C"
    calls = {tuple(prompts): params for prompts, params in fake.calls}
    assert calls[("a0", "a1", "a2", "a3", "a4")]["max_tokens"] == 4
    assert calls[("b0", "b1", "b2")]["max_tokens"] == 9
    assert calls[("c",)]["priority"] == -1
    assert all("dropped" not in prompts for prompts, _ in fake.calls)
    with pytest.raises(RuntimeError):
        batcher.submit("late")


def test_dynamic_batcher_n_choices_per_prompt():
    fake = FakeCompletions()
    with DynamicBatcher(fake.client(), "m", max_batch_size=3, max_wait_time=30, n=2) as batcher:
        futures = [batcher.submit(f"x{i}") for i in range(3)]
        results = [f.result(timeout=5) for f in futures]
    assert [[c.text for c in r.choices] for r in results] == [[f"X{i}#0", f"X{i}#1"] for i in range(3)]


def test_stream_batches_checks_its_arguments_at_once():
    fake = FakeCompletions()
    with pytest.raises(ValueError):
        stream_batches(fake.client(), "m", [], batch_size=0)
    with pytest.raises(ValueError):
        astream_batches(fake.async_client(), "m", [], max_in_flight=0)


def test_one_string_or_one_message_is_refused_with_what_to_pass():
    """One string is not an iterable of prompts (it would be read a character a prompt), and a message dict is not
    a conversation (a list of messages): TypeErrors that say what to pass, before anything is sent."""
    fake = FakeCompletions()
    client = fake.client()
    with pytest.raises(TypeError, match=r"one string; pass an iterable of prompts, e\.g\. \[prompt\]"):
        stream_batches(client, "m", "hello", max_tokens=2)
    with pytest.raises(TypeError, match="one message dict"):
        astream_batches(fake.async_client(), "m", {"role": "user", "content": "hi"})
    with pytest.raises(TypeError, match="one string"):
        next(AdaptiveBatcher(client, "m").process("hello"))
    with pytest.raises(TypeError, match="put the conversation in a list"):
        list(stream_batches(client, "m", [{"role": "user", "content": "hi"}]))
    with DynamicBatcher(client, "m", max_batch_size=4, max_wait_time=0.01) as batcher:
        with pytest.raises(TypeError, match="put the conversation in a list"):
            batcher.submit({"role": "user", "content": "hi"})
        with pytest.raises(TypeError, match="got int"):
            batcher.submit(5)
    assert fake.calls == []


def test_a_prompt_refused_after_a_bisection_is_sent_alone():
    """The bisection's last call carries one prompt on its own, not a list of one, so the server's message names
    no position in a list the caller never made."""
    fake = FakeCompletions()
    results = list(stream_batches(fake.client(), "m", ["a", "BAD", "b", "c"], batch_size=4))
    assert [r.error is not None for r in results] == [False, True, False, False]
    assert fake.sent[0] == ["a", "BAD", "b", "c"] and "BAD" in fake.sent and ["BAD"] not in fake.sent
