"""``inferneo.batching`` against a real ``inferneo serve`` on a tiny model: the dynamic batcher under 200
concurrent submitters (each future gets its own prompt's answer; injected errors reach exactly their requests),
flush by time with no further requests, a close that loses nothing, and priority overtaking bulk work."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from inferneo.batching import DynamicBatcher, astream_batches, stream_batches
from inferneo.client import AsyncInferneoClient, BadRequestError, InferneoClient, UnsendableRequestError
from inferneo.client.resources.completions import AsyncCompletions, Completions
from inferneo.testing.server import RemoteServer

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with RemoteServer(tiny_llama_dir, "--served-model-name", MODEL, "--max-model-len", "128",
                      "--kv-cache-memory", "32MiB", "--num-threads", "1", "--disable-access-log") as srv:
        yield srv


@pytest.fixture()
def client(server):
    with InferneoClient(server.base_url, max_retries=0) as c:
        yield c


class CallLog:
    """Records the prompts of every completions call, through ``client`` or the async twin of it that a batcher
    sends through (so that a batch in flight can be cancelled)."""

    def __init__(self, client: InferneoClient, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[list] = []
        sync_create, async_create = Completions.create, AsyncCompletions.create

        def record(prompt) -> None:  # a call of one prompt sends it on its own
            self.calls.append(prompt if isinstance(prompt, list) else [prompt])

        def create(resource, **kwargs):
            record(kwargs["prompt"])
            return sync_create(resource, **kwargs)

        async def acreate(resource, **kwargs):
            record(kwargs["prompt"])
            return await async_create(resource, **kwargs)

        monkeypatch.setattr(Completions, "create", create)
        monkeypatch.setattr(AsyncCompletions, "create", acreate)


def test_200_concurrent_submitters_each_get_their_own_answer(client, monkeypatch):
    log = CallLog(client, monkeypatch)
    n = 200
    bad_param, too_long = {37}, {50, 150}
    prompt = {i: ("word " * 200 if i in too_long else f"request {i}:") for i in range(n)}
    outcomes: dict[int, object] = {}
    start = threading.Barrier(n)
    # echo=True: each answer starts with its prompt, so any mix-up between requests would show.
    with DynamicBatcher(client, MODEL, max_batch_size=16, max_wait_time=0.05, max_tokens=2, temperature=0,
                        echo=True) as batcher:
        def submitter(i: int) -> None:
            params = {"temperature": -1.0} if i in bad_param else {}
            start.wait()
            future = batcher.submit(prompt[i], **params)
            try:
                outcomes[i] = future.result(timeout=120)
            except Exception as exc:
                outcomes[i] = exc

        threads = [threading.Thread(target=submitter, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(outcomes) == n
    for i, outcome in outcomes.items():
        if i in bad_param:
            assert isinstance(outcome, BadRequestError) and outcome.param == "temperature", (i, outcome)
        elif i in too_long:
            assert isinstance(outcome, BadRequestError) and outcome.param == "prompt", (i, outcome)
        else:
            assert not isinstance(outcome, Exception), (i, outcome)
            assert outcome.prompt == prompt[i] and outcome.text.startswith(prompt[i]), (i, outcome.text)
            assert outcome.choice.finish_reason in ("stop", "length")
    # Batched: far fewer calls than requests (a few more bisect the batches holding the too-long prompts).
    assert len(log.calls) <= 80 and max(len(c) for c in log.calls) <= 16


def test_a_lone_request_is_sent_after_max_wait_time(client):
    with DynamicBatcher(client, MODEL, max_batch_size=64, max_wait_time=0.3, max_tokens=2) as batcher:
        start = time.monotonic()
        future = batcher.submit("hello")
        result = future.result(timeout=10)  # no flush, no further request
        elapsed = time.monotonic() - start
        assert result.ok and 0.28 <= elapsed < 5
        time.sleep(0.5)
        late = batcher.submit("again")  # the timer works again after an idle spell
        assert late.result(timeout=10).ok


def test_a_full_batch_is_sent_at_once(client):
    with DynamicBatcher(client, MODEL, max_batch_size=4, max_wait_time=60, max_tokens=2) as batcher:
        start = time.monotonic()
        futures = [batcher.submit(f"p{i}") for i in range(4)]
        assert all(f.result(timeout=10).ok for f in futures) and time.monotonic() - start < 10


def test_flush_and_close_lose_nothing(client, monkeypatch):
    log = CallLog(client, monkeypatch)
    batcher = DynamicBatcher(client, MODEL, max_batch_size=1000, max_wait_time=60, max_tokens=2, echo=True)
    first = [batcher.submit(f"a{i}") for i in range(10)]
    batcher.flush()
    assert all(f.done() and f.result().text.startswith(f"a{i}") for i, f in enumerate(first))
    second = [batcher.submit(f"b{i}") for i in range(25)]
    second.append(batcher.submit("c", max_tokens=3))
    batcher.close()
    assert all(f.done() and f.result().ok for f in second)
    assert sorted(len(c) for c in log.calls) == [1, 10, 25] and batcher.pending == 0
    with pytest.raises(RuntimeError):
        batcher.submit("too late")


def test_asubmit_from_asyncio(client):
    async def main(batcher):
        return await asyncio.gather(*(batcher.asubmit(f"x{i}") for i in range(30)))

    with DynamicBatcher(client, MODEL, max_batch_size=8, max_wait_time=0.05, max_tokens=2, echo=True) as batcher:
        results = asyncio.run(main(batcher))
    assert [r.prompt for r in results] == [f"x{i}" for i in range(30)]
    assert all(r.text.startswith(r.prompt) for r in results)


def test_stream_batches_against_the_server(client):
    prompts = (f"line {i}:" for i in range(100))
    results = list(stream_batches(client, MODEL, prompts, batch_size=16, max_in_flight=3, max_tokens=2, echo=True))
    assert [r.index for r in results] == list(range(100))
    assert all(r.ok and r.text.startswith(f"line {r.index}:") for r in results)


def test_a_prompt_json_cannot_carry_fails_alone(server, client):
    # A lone surrogate (text read with errors="surrogateescape", or a "\\ud800" escape in a JSON dataset) once made
    # the whole stream raise UnicodeEncodeError, and every batch-mate of the DynamicBatcher fail with it.
    bad = "broken \udcff text"
    prompts = ["line 0:", bad, "line 2:", [{"role": "user", "content": bad}], [{"role": "user", "content": "hi"}]]
    results = list(stream_batches(client, MODEL, prompts, batch_size=5, max_tokens=2))
    assert [r.index for r in results] == [0, 1, 2, 3, 4]
    assert [r.ok for r in results] == [True, False, True, False, True]
    for result, param in ((results[1], "prompt"), (results[3], "messages")):
        assert isinstance(result.error, UnsendableRequestError) and result.error.param == param
        assert "surrogate" in result.error.message
        with pytest.raises(UnsendableRequestError):
            _ = result.text

    async def main():
        async with AsyncInferneoClient(server.base_url, max_retries=0) as aclient:
            return [r async for r in astream_batches(aclient, MODEL, prompts, batch_size=5, max_tokens=2)]

    assert [r.ok for r in asyncio.run(main())] == [True, False, True, False, True]
    with DynamicBatcher(client, MODEL, max_batch_size=3, max_wait_time=10, max_tokens=2) as batcher:
        futures = [batcher.submit(p) for p in ("a", bad, "c")]
        assert futures[0].result().ok and futures[2].result().ok
        with pytest.raises(UnsendableRequestError):
            futures[1].result()
    with pytest.raises(UnsendableRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=float("nan"))
    assert info.value.param == "temperature" and isinstance(info.value, ValueError)


# ---- priority ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def priority_server(tiny_llama_dir):
    with RemoteServer(tiny_llama_dir, "--served-model-name", MODEL, "--scheduling-policy", "priority",
                      "--max-num-seqs", "1", "--kv-cache-memory", "32MiB", "--num-threads", "1",
                      "--disable-access-log") as srv:
        yield srv


def waiting_requests(server) -> float:
    for line in httpx.get(server.url("/metrics"), timeout=10).text.splitlines():
        if line.startswith("inferneo:num_requests_waiting"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no waiting gauge")


@pytest.mark.parametrize("urgent_priority", [-10, pytest.param(0, marks=pytest.mark.slow)])
def test_an_urgent_request_overtakes_queued_bulk_work(priority_server, urgent_priority):
    bulk = 8

    async def main():
        finished: list[str] = []
        async with AsyncInferneoClient(priority_server.base_url, max_retries=0) as client:
            async def one(name: str, priority: int) -> None:
                # Long enough that the urgent request arrives while the queue is still full, even on a busy machine
                # (the tiny model decodes a token in about 0.25 ms alone: 160 tokens left a 40 ms window).
                await client.completions.create(model=MODEL, prompt=name, max_tokens=1200, min_tokens=1200,
                                                ignore_eos=True, priority=priority)
                finished.append(name)

            tasks = [asyncio.create_task(one(f"bulk {i}", 0)) for i in range(bulk)]
            deadline = time.monotonic() + 30
            while await asyncio.to_thread(waiting_requests, priority_server) < bulk - 1:
                assert time.monotonic() < deadline, "the bulk requests never queued up"
                await asyncio.sleep(0.01)
            tasks.append(asyncio.create_task(one("urgent", urgent_priority)))
            await asyncio.gather(*tasks)
        return finished

    finished = asyncio.run(main())
    overtaken = bulk - finished.index("urgent")
    if urgent_priority < 0:
        assert overtaken >= bulk - 3, finished  # only the one running (and at most two more) finished first
    else:
        assert overtaken <= 1, finished  # the same request without priority waits its turn
