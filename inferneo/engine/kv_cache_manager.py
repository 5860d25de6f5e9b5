"""Paged KV cache bookkeeping: fixed-size blocks, reference counts and prefix caching.

The manager never touches tensors. It hands out block ids; the model runner turns them into slots of the KV
tensors. A block that fills up gets a hash chained from its parent's hash and its own tokens, so a later request
whose prompt starts with the same tokens reuses it. Freed blocks keep their contents and hash until they are
evicted, least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from inferneo.engine.request import Request
from inferneo.model_executor.layers.rotary import LongRopeSwitch
from inferneo.multimodal.inputs import images_in


@dataclass(slots=True)
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] = field(default_factory=tuple)


class KVCacheManager:
    """Allocates KV blocks to requests; never raises for lack of room (returns False instead)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 rope_switch: LongRopeSwitch | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # LongRoPE past its original context: where a sequence switches to the long rotation (the scheduler's rule)
        self.rope_switch = rope_switch
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Free blocks in eviction order (least recently freed first). Cached ones keep their hash while here.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # prompt tokens found

    # ---- queries -----------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live requests."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ------------------------------------------------------------------------------------

    def _update_block_hashes(self, request: Request) -> None:
        """Extend ``request.block_hashes`` to cover every full block of its current tokens."""
        hashes = request.block_hashes
        tokens = request.all_token_ids
        bs = self.block_size
        parent = hashes[-1] if hashes else self._chain_start(request)
        for start in range(len(hashes) * bs, len(tokens) - bs + 1, bs):
            block = tuple(tokens[start : start + bs])
            # a block holding image tokens is keyed by the images too: their tokens are the same for every image
            images = images_in(request.images, start, start + bs)
            if request.prompt_embeds is not None and start < request.prompt_embeds.length:
                # a block of a prompt given as embeddings is keyed by its rows: its tokens are placeholders
                images = (*images, request.prompt_embeds.rows_digest(start, start + bs))
            parent = hash((parent, block, images) if images else (parent, block))
            hashes.append(parent)

    def _chain_start(self, request: Request) -> tuple | None:
        """What a request's hash chain starts from: its adapter (blocks computed with one adapter never serve
        another's), whether it rotates by LongRoPE's long factors (``Request.long_rope``: its keys are rotated
        otherwise than a short sequence's), and its ``cache_salt`` (vLLM's: a tenant's blocks serve only requests
        with the same salt, so no one learns from a cache hit's speed what another tenant's prompts hold)."""
        start = None if request.lora is None else ("lora", request.lora.lora_id)
        if request.long_rope:
            start = ("long rope", start)
        if request.cache_salt is not None:
            start = ("salt", request.cache_salt, start)
        return start

    def find_cached_prefix(self, request: Request) -> tuple[list[int], int]:
        """Blocks already holding a prefix of the request's tokens, and how many tokens they cover.

        At least one token is always left to compute, so the model produces logits for the next one. A request
        that asks for prompt log-probabilities takes no cached blocks: it needs the logits of every prompt position
        (``inferneo.engine.prompt_logprobs``).
        """
        if not self.enable_prefix_caching or request.prompt_logprobs is not None:
            return [], 0
        self._update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        found: list[int] = []
        tokens = request.all_token_ids
        bs = self.block_size
        for i, block_hash in enumerate(request.block_hashes[:max_blocks]):
            block_id = self._cached.get(block_hash)
            if block_id is None or self.blocks[block_id].token_ids != tuple(tokens[i * bs : (i + 1) * bs]):
                break
            found.append(block_id)
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += len(found) * bs
        return found, len(found) * bs

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that are full of computed tokens, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        self._update_block_hashes(request)
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        bs = self.block_size
        for i in range(num_full):
            block = self.blocks[request.block_ids[i]]
            if block.block_hash is not None:
                continue
            block_hash = request.block_hashes[i]
            block.block_hash = block_hash
            block.token_ids = tuple(request.all_token_ids[i * bs : (i + 1) * bs])
            self._cached.setdefault(block_hash, block.block_id)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block no request holds (after new weights, their keys and values are stale); the
        blocks stay free. Returns True when no cached block is left, False when some are held by running requests
        (they stay cached)."""
        for block_id in self._free:
            self._forget(self.blocks[block_id])
        return not self._cached

    # ---- allocation --------------------------------------------------------------------------------------

    def allocate_slots(self, request: Request, num_new_tokens: int, cached_blocks: list[int] | None = None) -> bool:
        """Make room for ``num_new_tokens`` more tokens of the request; False (and nothing changed) if full.

        ``cached_blocks`` are prefix-cache hits for a request that holds no blocks yet; they are taken first.
        """
        cached_blocks = cached_blocks or []
        total = request.num_computed_tokens + num_new_tokens
        needed = self.blocks_needed(total) - len(request.block_ids) - len(cached_blocks)
        # Cached hits that sit in the free list are about to be taken out of it: they are not free for others.
        evictable_hits = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        if needed > self.num_free_blocks - evictable_hits:
            return False
        for block_id in cached_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            request.block_ids.append(block_id)
        for _ in range(max(needed, 0)):
            request.block_ids.append(self._pop_free_block())
        return True

    def _pop_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        self._forget(block)
        block.ref_count = 1
        return block_id

    def _forget(self, block: KVBlock) -> None:
        """Take a free block out of the prefix cache: its hash no longer finds it, and it holds no tokens."""
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) == block.block_id:
                del self._cached[block.block_hash]
            block.block_hash = None
            block.token_ids = ()

    def free(self, request: Request) -> None:
        """Release the request's blocks. Tail blocks go first into the free list, so they are evicted first."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        request.block_ids = []

    # ---- checks ------------------------------------------------------------------------------------------

    def check_integrity(self, live_requests: list[Request] | None = None) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (for tests and debugging)."""
        for block in self.blocks:
            assert block.ref_count >= 0, f"block {block.block_id} has ref count {block.ref_count}"
            assert (block.ref_count == 0) == (block.block_id in self._free), (
                f"block {block.block_id}: ref count {block.ref_count} but in free list: {block.block_id in self._free}"
            )
        for block_hash, block_id in self._cached.items():
            assert self.blocks[block_id].block_hash == block_hash, f"cache entry for block {block_id} is stale"
        if live_requests is not None:
            counts = [0] * self.num_blocks
            for request in live_requests:
                for block_id in request.block_ids:
                    counts[block_id] += 1
            for block in self.blocks:
                assert counts[block.block_id] == block.ref_count, (
                    f"block {block.block_id}: ref count {block.ref_count} but held {counts[block.block_id]} times"
                )
