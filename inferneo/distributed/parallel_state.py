"""The parallel groups of this process: its tensor-parallel group (rank, size, collectives) and its place in the
pipeline (stage, neighbours, point-to-point sends of hidden states).

One process runs one rank. Global rank 0 is the driver (it also schedules and samples); the others are workers.
With ``pp`` pipeline stages of ``tp`` ranks each, global rank ``stage * tp + tp_rank`` holds tensor-parallel
shard ``tp_rank`` of stage ``stage``'s layers: each stage has its own tensor-parallel group, and a rank's pipeline
neighbours are the ranks with the same ``tp_rank`` in the stages before and after it. The groups are set up once
per process with :func:`init_parallel` (or :func:`init_tensor_parallel`, one stage); until then every query
answers "one rank, one stage", so single-process code never touches ``torch.distributed``.

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


@dataclass(slots=True)
class PipelineGroup:
    """This process's place in the pipeline: its stage and the global ranks it exchanges hidden states with.

    ``send``/``recv`` are blocking point-to-point transfers over the world group (gloo on CPU, NCCL on CUDA);
    a stage sends its activations to the same tensor-parallel rank of the next stage."""

    stage: int = 0
    num_stages: int = 1
    tp_size: int = 1
    tp_rank: int = 0

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    @property
    def prev_rank(self) -> int:
        """Global rank of this rank's counterpart in the previous stage."""
        return (self.stage - 1) * self.tp_size + self.tp_rank

    @property
    def next_rank(self) -> int:
        """Global rank of this rank's counterpart in the next stage."""
        return (self.stage + 1) * self.tp_size + self.tp_rank

    @property
    def last_stage_driver(self) -> int:
        """Global rank of tensor-parallel rank 0 of the last stage (it holds the gathered logits)."""
        return (self.num_stages - 1) * self.tp_size

    def send(self, x: torch.Tensor, dst: int) -> None:
        """Send ``x`` (made contiguous) to global rank ``dst``; returns once it is handed over."""
        dist.send(x.contiguous(), dst=dst)

    def isend(self, x: torch.Tensor, dst: int):
        """Start sending ``x`` (contiguous) to global rank ``dst``; returns the work to wait on (keep ``x`` alive
        until then)."""
        return dist.isend(x, dst=dst)

    def irecv(self, out: torch.Tensor, src: int):
        """Start receiving into ``out`` from global rank ``src``; returns the work to wait on."""
        return dist.irecv(out, src=src)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, src: int) -> torch.Tensor:
        """A tensor of ``shape`` and ``dtype`` received from global rank ``src``."""
        out = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(out, src=src)
        return out


_TP = TensorParallelGroup()
_PP = PipelineGroup()


def get_pp_group() -> PipelineGroup:
    """This process's pipeline stage (one stage unless :func:`init_parallel` ran with ``pp_size > 1``)."""
    return _PP


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
    return init_parallel(rank, world_size, 1, init_method, device, timeout=timeout, store=store)[0]


def init_parallel(rank: int, tp_size: int, pp_size: int, init_method: str | None, device: torch.device,
                  timeout: datetime.timedelta | None = None,
                  store: dist.Store | None = None) -> tuple[TensorParallelGroup, PipelineGroup]:
    """Join the world of ``tp_size * pp_size`` ranks as global rank ``rank`` (rendezvous as in
    :func:`init_tensor_parallel`), then form every stage's tensor-parallel group (each rank takes part in forming
    all of them, as ``torch.distributed`` requires) and keep this rank's; returns its two groups."""
    global _TP, _PP
    world_size = tp_size * pp_size
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
        stage, tp_rank = divmod(rank, tp_size)
        if pp_size == 1:
            group = dist.group.WORLD
        else:
            groups = [dist.new_group(list(range(s * tp_size, (s + 1) * tp_size)), **({} if timeout is None else
                                     {"timeout": timeout})) for s in range(pp_size)]
            group = groups[stage]
        # Peer memory is set up over the whole world only (its exchange is not known to hold for sub-groups).
        peer = PeerAllReduce.create(group, device, tp_size) if pp_size == 1 else None
        _TP = TensorParallelGroup(tp_rank, tp_size, group, peer)
        _PP = PipelineGroup(stage, pp_size, tp_size, tp_rank)
    else:
        _TP, _PP = TensorParallelGroup(), PipelineGroup()
    return _TP, _PP


def destroy_tensor_parallel(barrier: bool = False, abort: bool = False) -> None:
    """Leave the group (safe to call when none was set up).

    With ``barrier``, first wait until every rank is leaving too: tearing gloo down while a peer is still inside
    it can abort that peer. Only use it when every rank is known to be alive. With ``abort`` (NCCL, a rank is
    gone), the communicators are aborted instead of finalized, which would wait for the missing rank.
    """
    global _TP, _PP
    _TP.peer = None  # its buffer goes before the group it was shared over
    if dist.is_available() and dist.is_initialized():
        if abort and dist.get_backend() == "nccl":
            from torch.distributed.distributed_c10d import _abort_process_group

            _abort_process_group()
        else:
            if barrier:
                dist.barrier()
            dist.destroy_process_group()
    _TP, _PP = TensorParallelGroup(), PipelineGroup()
