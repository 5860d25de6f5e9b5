"""A one-kernel all-reduce for small messages on GPUs that can read each other's memory (NVLink).

Decode steps at small batch sizes all-reduce a few kilobytes twice per layer, and each costs several microseconds.
Here every rank copies its part into a buffer the others can read (PyTorch symmetric memory), meets them at a
barrier of signal flags, and sums all the buffers itself: one kernel, launched like any other, so CUDA graphs
capture it. On two H100s it measured the same as NCCL (7 µs an all-reduce inside a Llama-2-7B decode step), so it
is off by default; it is the set-up (buffers, rendezvous, the ranks' agreement) that a fused all-reduce with the
RMSNorm after it would build on.

Only the peer-to-peer path is used: NVLink multicast (``multimem``) stays off, as the shared hosts require.
Messages above the buffer size, and every dtype but float32 and bfloat16, fall back to NCCL. Whether a message
takes this path depends only on its size and dtype, the same on every rank.

``INFERNEO_PEER_ALL_REDUCE=1`` turns it on.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 1 << 20  # a batch of 128 decode tokens of hidden size 4096 in bf16
_DTYPES = (torch.float32, torch.bfloat16)
_state = {"exchanged": False}  # whether this process has set up symmetric memory for a group before


class PeerAllReduce:
    """Sums small tensors over the ranks of ``group`` through peer memory; see the module docstring."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self._group = group
        self.group_name = group.group_name
        self.max_bytes = max_bytes
        self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)
        self._op = torch.ops.symm_mem.one_shot_all_reduce_copy_out

    @classmethod
    def create(cls, group: dist.ProcessGroup, device: torch.device, world_size: int) -> PeerAllReduce | None:
        """A reducer for ``group`` when its GPUs can reach each other's memory; None (use NCCL) otherwise.

        Every rank must call this at the same point: setting up the buffer is a collective.
        """
        from inferneo import envs

        if device.type != "cuda" or world_size < 2 or not envs.peer_all_reduce():
            return None
        try:  # the same answers on every rank of one host
            import torch.distributed._symmetric_memory  # noqa: F401

            if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"):
                raise RuntimeError("this PyTorch has no symm_mem.one_shot_all_reduce_copy_out")
            here = device.index or 0
            if not all(torch.cuda.can_device_access_peer(here, other)
                       for other in range(torch.cuda.device_count()) if other != here):
                raise RuntimeError("not every GPU can read the others' memory")
        except Exception as exc:
            logger.warning("peer all-reduce unavailable, using NCCL for every all-reduce: %s", exc)
            return None
        # PyTorch numbers the symmetric-memory exchanges of a process from 0 and matches ranks by that number, so
        # a process that already set up a group (an earlier engine in the same program) cannot meet freshly
        # started workers: such groups agree to stay on NCCL before anyone tries.
        fresh = torch.tensor([0 if _state["exchanged"] else 1], dtype=torch.int32, device=device)
        dist.all_reduce(fresh, op=dist.ReduceOp.MIN, group=group)
        if int(fresh.item()) != 1:
            logger.info("peer all-reduce not set up: this process already used symmetric memory for an earlier "
                        "group; using NCCL")
            return None
        _state["exchanged"] = True
        reducer, error = None, None
        try:
            reducer = cls(group, device)
            reducer.check()
        except Exception as exc:
            reducer, error = None, exc
        agreed = torch.tensor([1 if reducer is not None else 0], dtype=torch.int32, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)  # every rank takes the same path
        if int(agreed.item()) != 1:
            logger.warning("peer all-reduce unavailable, using NCCL for every all-reduce: %s",
                           error or "it failed on another rank")
            return None
        return reducer

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype in _DTYPES and x.numel() * x.element_size() <= self.max_bytes and x.is_contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the ranks, as a new tensor (``x`` must pass :meth:`fits`)."""
        shared = self.buffer.view(x.dtype)[: x.numel()].view(x.shape)
        out = torch.empty_like(x)
        self._op(shared, x, "sum", self.group_name, out)
        return out

    def check(self) -> None:
        """Sum a known tensor once and compare with NCCL's answer (collective: every rank calls it)."""
        rank = dist.get_rank(self._group)
        x = torch.arange(4096, dtype=torch.float32, device=self.buffer.device) * (rank + 1)
        expected = x.clone()
        dist.all_reduce(expected, group=self._group)
        got = self(x)
        torch.cuda.synchronize()
        if not torch.equal(got, expected):
            raise RuntimeError("peer all-reduce gave a different sum from NCCL")
