"""Unit tests of the paged KV block manager: allocation, ref counts, prefix caching, LRU eviction."""

import pytest

from inferneo.engine.kv_cache_manager import KVCacheManager
from inferneo.engine.request import Request
from inferneo.sampling_params import SamplingParams


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=8), max_tokens=8)


def admit(kv: KVCacheManager, req: Request) -> bool:
    """Admit a request the way the scheduler does: prefix lookup, then allocation of the rest."""
    cached, num_cached = kv.find_cached_prefix(req)
    req.num_computed_tokens = num_cached
    ok = kv.allocate_slots(req, req.num_tokens - num_cached, cached)
    if not ok:
        req.num_computed_tokens = 0
    return ok


def compute_all(kv: KVCacheManager, req: Request) -> None:
    req.num_computed_tokens = req.num_tokens
    kv.cache_full_blocks(req)


def test_allocation_rounds_up_to_blocks_and_free_returns_them():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    req = make_request("a", list(range(9)))
    assert admit(kv, req)
    assert len(req.block_ids) == 3
    assert kv.num_free_blocks == 7
    kv.check_integrity([req])
    kv.free(req)
    assert kv.num_free_blocks == 10 and req.block_ids == []
    kv.check_integrity([])


def test_allocation_that_does_not_fit_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    req = make_request("a", list(range(12)))
    assert not admit(kv, req)
    assert req.block_ids == [] and kv.num_free_blocks == 2
    kv.check_integrity([])


def test_decode_allocates_a_new_block_only_at_a_boundary():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    req = make_request("a", list(range(4)))
    assert admit(kv, req)
    compute_all(kv, req)
    req.append_output_token(99)
    assert kv.allocate_slots(req, 1)
    assert len(req.block_ids) == 2
    req.num_computed_tokens += 1
    for t in range(3):
        req.append_output_token(100 + t)
        assert kv.allocate_slots(req, 1)
        req.num_computed_tokens += 1
    assert len(req.block_ids) == 2


def test_prefix_hit_shares_blocks_and_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = make_request("a", list(range(12)))
    assert admit(kv, a)
    compute_all(kv, a)
    b = make_request("b", list(range(12)))
    assert admit(kv, b)
    # 12 tokens = 3 full blocks, but the last token must be computed, so only 2 blocks are reused.
    assert b.num_computed_tokens == 8
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert kv.blocks[a.block_ids[0]].ref_count == 2
    kv.check_integrity([a, b])
    kv.free(a)
    kv.free(b)
    kv.check_integrity([])


def test_prefix_hit_survives_free_until_evicted_lru():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])
    assert admit(kv, a)
    compute_all(kv, a)
    kv.free(a)
    b = make_request("b", [1, 2, 3, 4, 9])
    assert admit(kv, b)
    assert b.num_computed_tokens == 4  # both full blocks came back from the free list
    kv.free(b)
    # A request of unrelated tokens that needs the whole pool evicts everything.
    c = make_request("c", [7] * 8)
    assert admit(kv, c)
    kv.free(c)
    d = make_request("d", [1, 2, 3, 4, 9])
    assert admit(kv, d)
    assert d.num_computed_tokens == 0
    kv.free(d)
    kv.check_integrity([])


def test_eviction_takes_least_recently_freed_first():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    old = make_request("old", [1, 2, 0])
    new = make_request("new", [3, 4, 0])
    for r in (old, new):
        assert admit(kv, r)
        compute_all(kv, r)
    kv.free(old)
    kv.free(new)
    # Free order: old's tail, old's head, new's tail, new's head. Two blocks needed: both of old's go.
    filler = make_request("f", [8, 8, 8])
    assert admit(kv, filler)
    probe_new = make_request("pn", [3, 4, 0])
    probe_old = make_request("po", [1, 2, 0])
    assert kv.find_cached_prefix(probe_new)[1] == 2
    assert kv.find_cached_prefix(probe_old)[1] == 0
    kv.check_integrity([filler])


def test_hash_collision_is_rejected_by_token_check():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    a = make_request("a", [1, 2, 3])
    assert admit(kv, a)
    compute_all(kv, a)
    # Forge a hash collision: b's first block hash points at a's block, but its tokens differ.
    b = make_request("b", [5, 6, 7])
    kv._update_block_hashes(b)
    kv._cached[b.block_hashes[0]] = a.block_ids[0]
    blocks, num = kv.find_cached_prefix(b)
    assert blocks == [] and num == 0


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = make_request("a", [1, 2, 3, 4, 5])
    assert admit(kv, a)
    compute_all(kv, a)
    b = make_request("b", [1, 2, 3, 4, 5])
    assert admit(kv, b)
    assert b.num_computed_tokens == 0


def test_cached_blocks_in_free_list_are_not_double_counted():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])
    assert admit(kv, a)
    compute_all(kv, a)
    kv.free(a)
    # b hits two cached blocks that sit in the free list and needs one more: exactly the pool.
    b = make_request("b", [1, 2, 3, 4, 6])
    assert admit(kv, b)
    assert kv.num_free_blocks == 0
    kv.check_integrity([b])
    c = make_request("c", [9])
    assert not admit(kv, c)


def test_integrity_check_catches_corruption():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = make_request("a", [1, 2, 3])
    assert admit(kv, a)
    kv.blocks[a.block_ids[0]].ref_count = 0
    with pytest.raises(AssertionError):
        kv.check_integrity([a])


def test_zero_blocks_is_refused():
    with pytest.raises(ValueError, match="at least one block"):
        KVCacheManager(num_blocks=0, block_size=16)
