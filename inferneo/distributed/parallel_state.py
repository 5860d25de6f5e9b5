"""The tensor-parallel group of this process: rank, size and the collectives over it.

One process runs one rank. Rank 0 is the driver (it also schedules and samples); the others are workers. The
group is set up once per process with :func:`init_tensor_parallel`; until then every query answers "one rank",
so single-process code never touches ``torch.distributed``.

The backend is NCCL for CUDA devices and gloo for CPU. NCCL reads its settings from the environment (for
example ``NCCL_NVLS_ENABLE=0``); spawned workers inherit the parent's environment, so those settings hold there
too.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from inferneo.distributed.peer_all_reduce import PeerAllReduce


@dataclass(slots=True)
class TensorParallelGroup:
    """This process's place in the tensor-parallel group."""

    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None
    peer: PeerAllReduce | None = None  # small messages go through peer memory when the GPUs allow it

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks; returns the sum (``x`` itself, summed in place, or a new tensor)."""
        if self.world_size > 1:
            if self.peer is not None and self.peer.fits(x):
                return self.peer(x)
            dist.all_reduce(x, group=self.group)
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` on every rank, in place (``x`` must be contiguous); returns ``x``."""
        if self.world_size > 1:
            dist.broadcast(x, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim``, in rank order, on every rank."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def gather_to_driver(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        """Every rank's ``x`` concatenated along ``dim`` on rank 0; None on the other ranks."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)
        return torch.cat(parts, dim=dim) if parts is not None else None


_TP = TensorParallelGroup()


def get_tp_group() -> TensorParallelGroup:
    """The tensor-parallel group of this process (size 1 unless :func:`init_tensor_parallel` ran)."""
    return _TP


def init_tensor_parallel(rank: int, world_size: int, init_method: str | None, device: torch.device,
                         timeout: datetime.timedelta | None = None,
                         store: dist.Store | None = None) -> TensorParallelGroup:
    """Join the group of ``world_size`` ranks rendezvousing at ``init_method`` (e.g. ``tcp://127.0.0.1:PORT``),
    or through ``store``, a store every rank already reaches (then ``init_method`` is None).

    ``timeout`` bounds how long a collective waits for a missing rank before it fails.
    """
    global _TP
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        kwargs = {} if timeout is None else {"timeout": timeout}
        if store is not None:
            kwargs["store"] = store
        else:
            kwargs["init_method"] = init_method
        dist.init_process_group(backend, rank=rank, world_size=world_size, **kwargs)
        group = dist.group.WORLD
        _TP = TensorParallelGroup(rank, world_size, group, PeerAllReduce.create(group, device, world_size))
    else:
        _TP = TensorParallelGroup()
    return _TP


def destroy_tensor_parallel(barrier: bool = False, abort: bool = False) -> None:
    """Leave the group (safe to call when none was set up).

    With ``barrier``, first wait until every rank is leaving too: tearing gloo down while a peer is still inside
    it can abort that peer. Only use it when every rank is known to be alive. With ``abort`` (NCCL, a rank is
    gone), the communicators are aborted instead of finalized, which would wait for the missing rank.
    """
    global _TP
    _TP.peer = None  # its buffer goes before the group it was shared over
    if dist.is_available() and dist.is_initialized():
        if abort and dist.get_backend() == "nccl":
            from torch.distributed.distributed_c10d import _abort_process_group

            _abort_process_group()
        else:
            if barrier:
                dist.barrier()
            dist.destroy_process_group()
    _TP = TensorParallelGroup()
