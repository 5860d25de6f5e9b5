"""Which data-parallel replica a request goes to: prefix-aware, least loaded or round-robin.

The prefix-aware policy keeps, for each replica, an approximate index of the prompt blocks it has seen: the
chained hash of every full ``block_size``-token block of each prompt routed to it (the same chaining a prefix
cache uses, so a block's hash names the whole prefix up to it), with least-recently-used eviction at about the
replica's KV capacity. A request goes to the replica whose index holds the longest run of its leading blocks,
unless that replica is busier than the least loaded one by more than ``balance_threshold`` in-flight sequences,
or no replica holds even ``min_prefix_blocks`` of them; then it goes to the least loaded replica (ties in turn).
This is the idea of SGLang's cache-aware router (a per-worker approximate prefix tree, with a load-balance
escape when the workers drift apart), over block hashes instead of a character tree, since the front end has
token ids already.

The index is the router's guess, not the replicas' truth: a replica may have evicted a block the router still
lists (a miss costs a prefill, never a wrong answer), and it learns only from what it routed.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from inferneo.config import DATA_PARALLEL_ROUTINGS


def prompt_block_hashes(token_ids: Sequence[int], block_size: int, salt: int = 0) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids`` (``salt`` keeps e.g. LoRA adapters' prefixes apart)."""
    hashes = []
    previous = salt
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        previous = hash((previous, tuple(token_ids[start:start + block_size])))
        hashes.append(previous)
    return hashes


class ReplicaPrefixIndex:
    """The block hashes one replica was sent recently, oldest first, at most ``capacity`` of them."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def matched_blocks(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` this replica holds."""
        count = 0
        for block in hashes:
            if block not in self._blocks:
                break
            count += 1
        return count

    def insert(self, hashes: Sequence[int]) -> None:
        """Record ``hashes`` as held (most recently used), evicting the least recently used past capacity."""
        for block in hashes:
            self._blocks[block] = None
            self._blocks.move_to_end(block)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    """Where a request went and why: ``reason`` is ``prefix``, ``least_loaded`` or ``round_robin``."""

    replica: int
    reason: str
    matched_tokens: int = 0


class ReplicaRouter:
    """Picks a replica for each request among the live ones (see the module docstring).

    ``capacity_blocks`` bounds each replica's index (its KV blocks); ``balance_threshold`` is how many more
    in-flight sequences than the least loaded replica the prefix holder may have and still be chosen.
    """

    def __init__(self, num_replicas: int, policy: str, block_size: int, capacity_blocks: int,
                 balance_threshold: int = 16, min_prefix_blocks: int = 1) -> None:
        if policy not in DATA_PARALLEL_ROUTINGS:
            raise ValueError(f"routing policy must be one of {', '.join(DATA_PARALLEL_ROUTINGS)}; got {policy!r}")
        self.policy = policy
        self.block_size = block_size
        self.balance_threshold = balance_threshold
        self.min_prefix_blocks = min_prefix_blocks
        self.indexes = [ReplicaPrefixIndex(capacity_blocks) for _ in range(num_replicas)]
        self._turn = itertools.count()

    def route(self, token_ids: Sequence[int], loads: Sequence[int], live: Sequence[bool],
              salt: int = 0) -> RoutingDecision:
        """The replica for a prompt, given each replica's in-flight sequences and whether it is live."""
        candidates = [i for i, ok in enumerate(live) if ok]
        if not candidates:
            raise RuntimeError("no live replica to route to")
        if self.policy == "round_robin":
            return RoutingDecision(candidates[next(self._turn) % len(candidates)], "round_robin")
        least = self._least_loaded(candidates, loads)
        if self.policy == "prefix":
            hashes = prompt_block_hashes(token_ids, self.block_size, salt)
            decision = self._by_prefix(hashes, candidates, loads, loads[least])
            self.indexes[decision.replica if decision else least].insert(hashes)
            if decision is not None:
                return decision
        return RoutingDecision(least, "least_loaded")

    def _by_prefix(self, hashes: list[int], candidates: list[int], loads: Sequence[int],
                   least_load: int) -> RoutingDecision | None:
        best, best_blocks = None, 0
        for i in candidates:
            blocks = self.indexes[i].matched_blocks(hashes)
            if blocks > best_blocks or (blocks == best_blocks and best is not None and loads[i] < loads[best]):
                best, best_blocks = i, blocks
        if best is None or best_blocks < self.min_prefix_blocks:
            return None
        if loads[best] - least_load > self.balance_threshold:
            return None  # the holder is overloaded: better a prefill elsewhere than a long queue there
        return RoutingDecision(best, "prefix", best_blocks * self.block_size)

    def _least_loaded(self, candidates: list[int], loads: Sequence[int]) -> int:
        """The live replica with the fewest in-flight sequences; ties are taken in turn."""
        low = min(loads[i] for i in candidates)
        tied = [i for i in candidates if loads[i] == low]
        return tied[next(self._turn) % len(tied)]

    def forget(self, replica: int) -> None:
        """Nothing replica ``replica`` held is worth routing to (it died, or its prefix cache was emptied)."""
        self.indexes[replica].clear()
