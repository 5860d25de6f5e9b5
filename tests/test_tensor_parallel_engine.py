"""The whole engine at tensor-parallel sizes 2 and 4 (gloo on CPU) against size 1 on the same checkpoint.

Greedy token ids must be identical, with chunked prefill and prefix-cache hits in the mix, and at size 4, where
the ranks outnumber the kv heads and keep replicas of them; a dead worker turns into a prompt error instead of a
hang; shutdown leaves no worker process behind.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from inferneo import LLM, SamplingParams
from inferneo.testing.tiny_models import make_tiny_checkpoint
from inferneo.worker.tensor_parallel import WorkerDiedError

PROMPTS = [[5, 17, 33, 2, 9, 100, 250, 7] * 3, [40, 41, 42, 43, 44], list(range(60, 97)), [300, 301],
           [5, 17, 33, 2, 9, 100, 250, 7] * 3 + [11, 12], list(range(3, 70, 2))]
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
ENGINE = dict(dtype="float32", max_model_len=256, kv_cache_memory="32MiB", max_num_batched_tokens=32,
              num_threads=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tp") / "llama", "llama", num_heads=4, num_kv_heads=2)


def _ids(llm: LLM, prompts=PROMPTS, params=PARAMS) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


# size 2: half of the query heads and one of the two kv heads per rank, all prompts, then again with the prompts'
# blocks in the prefix cache; size 4: one query head per rank and each kv head kept by the two ranks whose query
# head reads it (vocabulary 384, hidden 64 and MLP 128 all split by 4 as well), fewer prompts to keep it short.
@pytest.mark.parametrize(("size", "heads_per_rank", "num_prompts", "max_tokens", "runs"),
                         [(2, (2, 1), len(PROMPTS), 12, 2), (4, (1, 1), 3, 6, 1)])
def test_greedy_equals_tp1(checkpoint, size, heads_per_rank, num_prompts, max_tokens, runs):
    prompts, params = PROMPTS[:num_prompts], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    expected = _ids(LLM(str(checkpoint), **ENGINE), prompts, params)
    llm = LLM(str(checkpoint), tensor_parallel_size=size, **ENGINE)
    try:
        runner = llm.engine.runner
        assert runner.world_size == size
        attn = runner.driver.model.layers[0].self_attn
        assert (attn.num_heads, attn.num_kv_heads) == heads_per_rank
        for _ in range(runs):
            assert _ids(llm, prompts, params) == expected
        workers = list(runner._procs)
        assert len(workers) == size - 1
    finally:
        llm.shutdown()
    assert all(not p.is_alive() for p in workers)


def test_a_dead_worker_fails_the_next_step_promptly(checkpoint):
    llm = LLM(str(checkpoint), tensor_parallel_size=2, **ENGINE)
    try:
        worker = llm.engine.runner._procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=10)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match="worker 1 exited"):
            llm.generate(PROMPTS[:2], PARAMS, use_tqdm=False)
        assert time.monotonic() - start < 10
    finally:
        llm.shutdown()


def test_a_worker_set_up_error_reaches_the_driver_and_shutdown_is_clean(checkpoint):
    """A worker whose set-up step raises reports the traceback to the driver (no silent exit, no half-torn group);
    the ranks then stop in order."""
    llm = LLM(str(checkpoint), tensor_parallel_size=2, **ENGINE)
    runner = llm.engine.runner
    workers = list(runner._procs)
    try:
        runner._broadcast("no-such-step", None)
        with pytest.raises(RuntimeError, match="worker 1 failed during set-up(.|\n)*unknown message 'no-such-step'"):
            runner._gather()
        assert all(p.is_alive() for p in workers)  # still obeying the driver
        assert _ids(llm)[0] == _ids(LLM(str(checkpoint), **ENGINE))[0]
    finally:
        llm.shutdown()
    assert all(not p.is_alive() for p in workers)
