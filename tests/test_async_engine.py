"""AsyncEngine (core loop in a thread) on a real tiny engine: streaming, shared steps, aborts that free blocks, admission control,
and fault handling (a failed step fails only its batch; repeated failures kill the engine and everything pending).

The HTTP layer is exercised in-process here only for the 500 on an engine fault; the rest of the server is tested
over real HTTP in test_server_*.py.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from inferneo import LLM, SamplingParams
from inferneo.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineRequest,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
)
from inferneo.engine.core_client import ThreadCoreClient
from inferneo.entrypoints.openai.api_server import build_app
from inferneo.entrypoints.openai.serving_common import ServerContext

POISON = [7, 7, 7, 7]  # a prompt starting with these makes the injected fault fire


@pytest.fixture
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="8MiB", num_threads=1)


def AsyncLLMEngine(llm_engine, max_queued_requests=None, max_consecutive_step_failures=3) -> AsyncEngine:
    """An AsyncEngine whose core loop runs in a thread over the core ``llm_engine`` already loaded."""
    client = ThreadCoreClient(llm_engine.core, llm_engine.info, max_consecutive_step_failures)
    return AsyncEngine(client, llm_engine.tokenizer, llm_engine.input.generation_config,
                       max_queued_requests=max_queued_requests,
                       max_consecutive_step_failures=max_consecutive_step_failures)


@pytest.fixture
def engine(llm):
    aengine = AsyncLLMEngine(llm.engine)
    aengine.start()
    yield aengine
    aengine.shutdown()
    assert not aengine.client.is_alive()


def inject_fault(llm: LLM, always: list[bool] | None = None) -> None:
    """Make the model runner raise for batches holding a POISON prompt (or every batch while always[0])."""
    runner = llm.engine.runner
    execute = runner.execute

    def faulty(step):
        if (always and always[0]) or any(seq.token_ids[:4] == POISON for seq in step.sequences):
            raise RuntimeError("injected fault")
        return execute(step)

    runner.execute = faulty


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


async def wait_until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def idle(engine: AsyncEngine) -> bool:
    snap = engine.snapshot
    return snap.num_running == 0 and snap.num_waiting == 0 and snap.kv_usage == 0


async def collect(engine: AsyncEngine, prompt, params, request_id: str):
    """The deltas of one request, as they came."""
    outputs = [out async for out in engine.generate(prompt, params, request_id)]
    return outputs


def token_ids(deltas) -> list[int]:
    return [t for d in deltas for c in d.outputs for t in c.token_ids]


def test_generate_streams_deltas_that_add_up_to_the_offline_output(llm):
    # 48 steps each: with 12, all of a request's tokens once came as one delta on a fresh machine (the consumer
    # scheduled after the engine had finished), which the stream may rightly do; over 48 steps it does not happen
    params = greedy(48, ignore_eos=True)
    expected = llm.generate(["hello world", "the cat"], params, use_tqdm=False)
    engine = AsyncLLMEngine(llm.engine)
    engine.start()
    try:
        async def main():
            return await asyncio.gather(collect(engine, "hello world", params, "a"),
                                        collect(engine, "the cat", params, "b"))

        streams = asyncio.run(main())
    finally:
        engine.shutdown()
    for deltas, exp in zip(streams, expected, strict=True):
        assert len(deltas) > 1  # streamed, not delivered whole
        assert all(len(d.outputs) == 1 and len(d.outputs[0].token_ids) >= 1 for d in deltas)
        assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
        assert token_ids(deltas) == exp.outputs[0].token_ids
        assert "".join(d.outputs[0].text for d in deltas) == exp.outputs[0].text


def test_concurrent_requests_share_engine_steps(engine):
    async def main():
        params = greedy(16, ignore_eos=True)
        return await asyncio.gather(*(collect(engine, f"prompt {i}", params, str(i)) for i in range(16)))

    results = asyncio.run(main())
    assert all(len(token_ids(r)) == 16 for r in results)
    stats = engine.client.core.stats
    assert stats.max_batch_size > 1 and stats.num_steps < 16 * 16 / 4


def test_leaving_the_stream_early_aborts_and_frees_blocks(engine):
    async def main():
        received = 0
        async for out in engine.generate("a long one", greedy(1500, ignore_eos=True), "long"):
            received += len(out.outputs[0].token_ids)
            if received >= 3:
                break
        await wait_until(lambda: idle(engine))

    asyncio.run(main())
    assert engine.client.core.stats.num_generation_tokens < 1500
    kv = engine.client.core.scheduler.kv_cache
    assert kv.num_free_blocks == kv.num_blocks


def test_cancelling_the_consumer_task_aborts(engine):
    async def main():
        task = asyncio.ensure_future(collect(engine, "cancel me", greedy(1500, ignore_eos=True), "c"))
        await wait_until(lambda: engine.snapshot.num_running == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: idle(engine))

    asyncio.run(main())
    assert not engine.client.core.has_unfinished_requests()


def test_invalid_request_is_refused_up_front(engine):
    async def main():
        with pytest.raises(InvalidRequestError, match="context length"):
            engine.submit([EngineRequest("x", [1] * engine.max_model_len, greedy(4))])
        with pytest.raises(InvalidRequestError, match="token ids"):
            engine.submit([EngineRequest("y", [1, 10**6], greedy(4))])

    asyncio.run(main())


def test_full_queue_refuses_new_requests(llm):
    llm.engine.scheduler.max_num_seqs = 1
    engine = AsyncLLMEngine(llm.engine, max_queued_requests=1)
    engine.start()
    try:
        async def main():
            first = asyncio.ensure_future(collect(engine, "one", greedy(200, ignore_eos=True), "1"))
            await wait_until(lambda: engine.snapshot.num_running == 1)
            second = asyncio.ensure_future(collect(engine, "two", greedy(5), "2"))
            await wait_until(lambda: engine.snapshot.num_waiting == 1)
            with pytest.raises(QueueFullError):
                engine.submit([EngineRequest("3", [1, 2, 3], greedy(5))])
            await asyncio.gather(first, second)

        asyncio.run(main())
    finally:
        engine.shutdown()


def test_priority_reaches_the_scheduler(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="8MiB", num_threads=1,
              scheduling_policy="priority", max_num_seqs=1)
    engine = AsyncLLMEngine(llm.engine)
    engine.start()
    finished: list[str] = []

    async def run(name, priority, max_tokens):
        async for out in engine.generate(name, greedy(max_tokens, ignore_eos=True), name, priority):
            if out.finished:
                finished.append(name)

    try:
        async def main():
            first = asyncio.ensure_future(run("first", 0, 100))
            await wait_until(lambda: engine.snapshot.num_running == 1)
            low = asyncio.ensure_future(run("low", 9, 4))
            await wait_until(lambda: engine.snapshot.num_waiting == 1)
            high = asyncio.ensure_future(run("high", -1, 4))
            await asyncio.gather(first, low, high)

        asyncio.run(main())
    finally:
        engine.shutdown()
    assert finished == ["first", "high", "low"]


def test_failed_step_fails_only_its_batch_and_the_engine_goes_on(llm, engine):
    inject_fault(llm)

    async def main():
        with pytest.raises(RequestFailedError, match="injected fault"):
            await collect(engine, POISON + [9, 10], greedy(4), "poison")
        good = await collect(engine, "fine", greedy(4, ignore_eos=True), "good")
        assert len(token_ids(good)) == 4
        await wait_until(lambda: idle(engine))

    asyncio.run(main())
    assert engine.is_healthy
    llm.engine.kv_cache.check_integrity([])


def test_repeated_failures_kill_the_engine_and_fail_everything_pending(llm, engine):
    always = [False]
    inject_fault(llm, always)

    async def main():
        waiting = asyncio.ensure_future(collect(engine, "in flight", greedy(1500, ignore_eos=True), "w"))
        await wait_until(lambda: engine.snapshot.num_running == 1)
        always[0] = True
        with pytest.raises(RequestFailedError):
            await waiting
        for i in range(engine.max_consecutive_step_failures):
            with pytest.raises((RequestFailedError, EngineDeadError)):
                await collect(engine, f"doomed {i}", greedy(4), f"d{i}")
        await wait_until(lambda: not engine.is_healthy)
        with pytest.raises(EngineDeadError):
            await collect(engine, "too late", greedy(4), "late")

    asyncio.run(main())
    engine.client._thread.join(5)
    assert not engine.client.is_alive()


def test_shutdown_fails_requests_in_flight(engine):
    async def main():
        task = asyncio.ensure_future(collect(engine, "long", greedy(1500, ignore_eos=True), "s"))
        await wait_until(lambda: engine.snapshot.num_running == 1)
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineDeadError, match="shutting down"):
            await task

    asyncio.run(main())


def test_http_500_on_engine_fault_then_the_server_serves_others(llm):
    inject_fault(llm)
    engine = AsyncLLMEngine(llm.engine)
    app = build_app(ServerContext(engine, ["tiny"], "tiny"))
    engine.start()
    try:
        async def main():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                bad = await http.post("/v1/completions", json={"prompt": POISON + [9], "max_tokens": 3})
                good = await http.post("/v1/completions", json={"prompt": "fine", "max_tokens": 3})
                health = await http.get("/health")
                return bad, good, health

        bad, good, health = asyncio.run(main())
    finally:
        engine.shutdown()
    assert bad.status_code == 500
    error = bad.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_error" and "injected" in error["message"]
    assert good.status_code == 200 and good.json()["choices"][0]["text"] is not None
    assert health.status_code == 200


def test_http_503_once_the_engine_is_dead(llm):
    inject_fault(llm, [True])
    engine = AsyncLLMEngine(llm.engine, max_consecutive_step_failures=1)
    app = build_app(ServerContext(engine, ["tiny"], "tiny"))
    engine.start()
    try:
        async def main():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                first = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
                await wait_until(lambda: not engine.is_healthy)
                return first, await http.get("/health"), await http.post("/v1/completions", json={"prompt": "x"})

        first, health, after = asyncio.run(main())
    finally:
        engine.shutdown()
    assert first.status_code == 500
    assert health.status_code == 503 and health.json()["error"]["code"] == "engine_unavailable"
    assert after.status_code == 503 and after.headers["Retry-After"]


def test_deltas_that_pile_up_are_gathered_into_one():
    """What a slow reader of a group gets: consecutive deltas as one (text joined, tokens and logprobs appended,
    the finish of the last), and the server's non-streaming answer is assembled the same way."""
    from inferneo.engine.request_group import gather_deltas
    from inferneo.outputs import CompletionOutput, Logprob, RequestOutput

    def delta(choices, finished=False):
        return RequestOutput("r", None, [1, 2], [CompletionOutput(i, t, ids, -1.0 * len(ids), lps, reason)
                                                 for i, t, ids, lps, reason in choices], finished, 3)

    first = delta([(0, "he", [5], [{5: Logprob(-0.5)}], None), (1, "x", [9], None, None)])
    second = delta([(0, "llo", [6, 7], [{6: Logprob(-0.1)}, {7: Logprob(-0.2)}], "stop")])
    third = delta([(1, "y", [8], None, "length")], finished=True)
    whole = gather_deltas([first, second, third])
    assert whole.finished and whole.num_cached_tokens == 3 and [c.index for c in whole.outputs] == [0, 1]
    zero, one = whole.outputs
    assert (zero.text, zero.token_ids, zero.finish_reason) == ("hello", [5, 6, 7], "stop")
    assert [next(iter(e)) for e in zero.logprobs] == [5, 6, 7] and zero.cumulative_logprob == -2.0
    assert (one.text, one.token_ids, one.logprobs, one.finish_reason) == ("xy", [9, 8], None, "length")
    assert first.outputs[0].token_ids == [5]  # the deltas themselves are left as they were
