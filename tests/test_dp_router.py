"""The data-parallel router's policies on token prompts (pure Python, no engine)."""

from __future__ import annotations

import pytest

from inferneo.engine.dp_router import ReplicaPrefixIndex, ReplicaRouter, prompt_block_hashes

SYSTEM = list(range(100, 164))  # four blocks of 16


def test_block_hashes_chain_and_ignore_the_partial_block():
    a = prompt_block_hashes(SYSTEM + [1, 2, 3], 16)
    b = prompt_block_hashes(SYSTEM[:16] + [0] + SYSTEM[17:], 16)
    assert len(a) == 4 and a[0] == b[0] and all(x != y for x, y in zip(a[1:], b[1:], strict=True))
    assert prompt_block_hashes(SYSTEM, 16, salt=7)[0] != a[0]  # another adapter: another prefix


def test_prefix_routing_follows_the_holder_and_escapes_an_overloaded_one():
    router = ReplicaRouter(2, "prefix", 16, capacity_blocks=64, balance_threshold=4)
    first = router.route(SYSTEM + [1], loads=[0, 0], live=[True, True])
    assert first.reason == "least_loaded"
    again = router.route(SYSTEM + [2, 3], loads=[3, 0], live=[True, True])
    assert (again.replica, again.reason, again.matched_tokens) == (first.replica, "prefix", 64)
    busy = [0, 0]
    busy[first.replica] = 9
    escaped = router.route(SYSTEM + [4], loads=busy, live=[True, True])
    assert escaped.replica != first.replica and escaped.reason == "least_loaded"
    router.forget(first.replica)  # died: its index is gone, the other replica now holds the prefix
    moved = router.route(SYSTEM + [5], loads=[0, 0], live=[first.replica == 1, first.replica == 0])
    assert moved.replica == escaped.replica and moved.reason == "prefix"


def test_unrelated_prompts_spread_by_load_and_round_robin_ignores_prefixes():
    router = ReplicaRouter(3, "prefix", 16, capacity_blocks=64)
    picks = [router.route([i] * 20, loads=[0, 0, 0], live=[True] * 3).replica for i in range(3)]
    assert sorted(picks) == [0, 1, 2]
    assert router.route([9] * 20, loads=[2, 0, 1], live=[True] * 3).replica == 1
    rr = ReplicaRouter(2, "round_robin", 16, capacity_blocks=64)
    assert [rr.route(SYSTEM, [0, 0], [True, True]).replica for _ in range(4)] == [0, 1, 0, 1]
    assert [rr.route(SYSTEM, [0, 0], [False, True]).replica for _ in range(2)] == [1, 1]
    with pytest.raises(RuntimeError, match="no live replica"):
        rr.route(SYSTEM, [0, 0], [False, False])


def test_the_index_forgets_least_recently_used_blocks_past_its_capacity():
    index = ReplicaPrefixIndex(capacity=4)
    old, new = prompt_block_hashes(SYSTEM, 16), prompt_block_hashes(list(range(200, 232)), 16)
    index.insert(old)
    assert index.matched_blocks(old) == 4
    index.insert(new)
    assert len(index) == 4 and index.matched_blocks(new) == 2 and index.matched_blocks(old) == 0


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="routing policy"):
        ReplicaRouter(2, "random", 16, 64)


def test_data_parallel_options_are_checked_and_one_engine_refuses_them(tiny_llama_dir):
    from inferneo import LLM
    from inferneo.config import EngineConfig

    for bad in ({"data_parallel_size": 0}, {"data_parallel_backend": "slurm"}, {"data_parallel_routing": "random"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EngineConfig(**bad)
    with pytest.raises(ValueError, match="inferneo serve --data-parallel-size"):
        LLM(str(tiny_llama_dir), data_parallel_size=2)
