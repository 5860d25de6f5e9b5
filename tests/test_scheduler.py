"""Unit tests of the token-budget scheduler, driven without a model."""

from inferneo.engine.kv_cache_manager import KVCacheManager
from inferneo.engine.request import Request, RequestStatus
from inferneo.engine.scheduler import Scheduler
from inferneo.sampling_params import SamplingParams


def make_request(rid: str, n: int, priority: int = 0, arrival: float = 0.0) -> Request:
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=100), max_tokens=100,
                   priority=priority, arrival_time=arrival)


def make_scheduler(num_blocks=64, block_size=4, max_seqs=8, budget=32, policy="fcfs", chunked=True, prefix=False):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix)
    return Scheduler(kv, max_seqs, budget, policy=policy, enable_chunked_prefill=chunked), kv


def fake_step(sched: Scheduler, out) -> None:
    """Pretend the model ran: advance counts and give every request that finished its prompt a token."""
    sched.update_after_step(out)
    for item in out.scheduled:
        r = item.request
        if r.num_computed_tokens == r.num_tokens:
            r.append_output_token(7)


def test_budget_is_shared_and_long_prompts_are_chunked():
    sched, _ = make_scheduler(budget=32)
    sched.add_request(make_request("a", 50))
    sched.add_request(make_request("b", 10))
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 32)]
    fake_step(sched, out)
    out = sched.schedule()
    # a's remaining 18 tokens, then b gets the rest of the budget (10).
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 18), ("b", 10)]
    fake_step(sched, out)
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 1)]


def test_without_chunked_prefill_a_prompt_waits_for_a_step_with_room():
    sched, _ = make_scheduler(budget=32, chunked=False)
    sched.add_request(make_request("a", 20))
    sched.add_request(make_request("b", 20))
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["a"]


def test_max_num_seqs_caps_the_batch():
    sched, _ = make_scheduler(max_seqs=2, budget=100)
    for i in range(4):
        sched.add_request(make_request(str(i), 3))
    out = sched.schedule()
    assert len(out.scheduled) == 2 and len(sched.waiting) == 2


def test_priority_policy_admits_lower_value_first_then_by_arrival():
    sched, _ = make_scheduler(max_seqs=1, budget=100, policy="priority")
    sched.add_request(make_request("late-urgent", 3, priority=0, arrival=2.0))
    sched.add_request(make_request("bulk", 3, priority=5, arrival=0.0))
    sched.add_request(make_request("early-urgent", 3, priority=0, arrival=1.0))
    assert [r.request_id for r in sched.waiting] == ["early-urgent", "late-urgent", "bulk"]
    out = sched.schedule()
    assert out.scheduled[0].request.request_id == "early-urgent"


def test_fcfs_ignores_priority():
    sched, _ = make_scheduler(max_seqs=1, budget=100, policy="fcfs")
    sched.add_request(make_request("first", 3, priority=9))
    sched.add_request(make_request("second", 3, priority=0))
    assert sched.schedule().scheduled[0].request.request_id == "first"


def test_preemption_frees_the_newest_request_and_requeues_it_first():
    # 6 blocks of 4 tokens. Two prompts of 12 tokens take 3 blocks each; the first decode step needs a 4th.
    sched, kv = make_scheduler(num_blocks=6, block_size=4, budget=100)
    a, b = make_request("a", 12), make_request("b", 12)
    sched.add_request(a)
    sched.add_request(b)
    fake_step(sched, sched.schedule())  # prefill: 13 tokens each now known
    out = sched.schedule()  # decode: a needs block 4 -> b is preempted
    assert [s.request.request_id for s in out.scheduled] == ["a"]
    assert out.preempted == [b]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.block_ids == []
    assert sched.waiting.peek() is b
    kv.check_integrity(sched.running)


def test_priority_preemption_takes_the_least_important():
    sched, kv = make_scheduler(num_blocks=6, block_size=4, budget=100, policy="priority")
    important, bulk = make_request("important", 12, priority=0), make_request("bulk", 12, priority=9)
    sched.add_request(bulk)
    sched.add_request(important)
    fake_step(sched, sched.schedule())
    out = sched.schedule()
    assert out.preempted == [bulk]
    kv.check_integrity(sched.running)


def test_finish_request_frees_blocks_from_any_queue():
    sched, kv = make_scheduler()
    a, b = make_request("a", 5), make_request("b", 5)
    sched.add_request(a)
    sched.schedule()
    sched.add_request(b)
    sched.finish_request(a, RequestStatus.FINISHED_ABORTED)
    sched.finish_request(b, RequestStatus.FINISHED_ABORTED)
    assert kv.num_free_blocks == kv.num_blocks
    assert not sched.has_unfinished_requests()
    kv.check_integrity([])


def test_prefix_hits_reduce_the_tokens_scheduled():
    sched, _ = make_scheduler(budget=100, prefix=True)
    a = make_request("a", 13)
    sched.add_request(a)
    fake_step(sched, sched.schedule())
    b = make_request("b", 13)
    sched.add_request(b)
    out = sched.schedule()
    item = next(s for s in out.scheduled if s.request is b)
    assert b.num_cached_tokens == 12 and item.num_new_tokens == 1
