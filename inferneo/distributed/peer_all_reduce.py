"""Collectives over peer memory for GPUs that can read each other's memory (NVLink).

Decode steps at small batch sizes all-reduce a few kilobytes twice per layer, and each costs several microseconds.
Both paths here share one buffer that every rank can read (PyTorch symmetric memory):

- **All-reduce fused with the residual add and RMSNorm** (the main use). A row-parallel layer writes its partial
  sum straight into one of two staging buffers (:meth:`PeerAllReduce.stage`) and hands a :class:`PartialSum` to
  the RMSNorm after it, which runs one Triton kernel: barrier, sum, residual add, norm
  (``inferneo/kernels/triton_peer_norm.py``). The attention output projection always stages in buffer 0 and the
  MLP down projection in buffer 1, so consecutive calls alternate and one barrier per call is safe. This replaces
  an NCCL all-reduce and a norm kernel per call.
- **The pushed variant** of the fused kernel, for 16-bit dtypes: each rank writes its partial rows into every
  peer's receive buffer and waits for theirs in its own, with no flags and no reads across GPUs
  (``INFERNEO_PEER_PUSH=0`` keeps the flags). Receive buffers start as negative zeros, the "empty" mark, and the
  kernel marks them empty again after reading. On two H200s a Llama-2-7B step at TP=2 took 2.63-2.65 ms at batch 1
  and 5.14-5.18 ms at batch 32 this way, against 2.73 and 5.58-5.60 ms with the flags.
- **A plain one-shot all-reduce** (PyTorch's ``one_shot_all_reduce``) for the other small all-reduces. On two
  H100s it measured the same as NCCL (7 µs inside a Llama-2-7B decode step).

Only the peer-to-peer path is used: NVLink multicast (``multimem``) stays off, as the shared hosts require.
Messages above the buffer size, and other dtypes, fall back to NCCL. Whether a message takes a peer path depends
only on its shape and dtype, the same on every rank.

Measured on two H200s in one run (``benchmarks/gpu/tp_fused_ab.sh``, docs/benchmarks.md): a Llama-2-7B decode
step at batch 1 takes 2.88 ms with the fused path against 3.22 ms with NCCL; equal at batch 32; at batch 128 the
fused path was slower (12.5 against 11.9 ms), so steps of more than ``MAX_FUSED_ROWS`` tokens keep NCCL.
``INFERNEO_PEER_ALL_REDUCE=0`` (``KernelConfig.peer_all_reduce``) turns both paths off; ``KernelConfig.peer_push``
and ``cuda_pdl`` choose the fused kernel's variant and launch (:meth:`PeerAllReduce.use_kernels`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from inferneo.kernel_config import KernelConfig

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 4 << 20  # per staging buffer: MAX_FUSED_ROWS rows of the widest fused row (16384 float32)
_DTYPES = (torch.float32, torch.bfloat16)
_NORM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_NORM_WIDTH = 16384  # one program holds a whole row
MAX_FUSED_ROWS = 64  # the fused kernel runs one program per row (each owns one flag per rank); more rows: NCCL
_MAX_WORLD = 8
_FLAG_BYTES = 2 * MAX_FUSED_ROWS * _MAX_WORLD * 4  # int32 flags for both staging buffers
_RECV_BYTES = 2 << 20  # one receive buffer of the pushed path: [source rank][row][col], 16-bit
_PUSH_DTYPES = (torch.bfloat16, torch.float16)
_ONE_SHOT_MAX_BYTES = 1 << 20  # the plain one-shot all-reduce: 128 decode tokens of hidden size 4096 in bf16
_state = {"exchanged": False}  # whether this process has set up symmetric memory for a group before


@dataclass(slots=True)
class PartialSum:
    """This rank's share of a row-parallel layer's output, staged in peer memory (not yet summed over ranks).

    Only an ``RMSNorm`` with a residual takes it: :meth:`add_rms_norm` sums the shares, adds the residual and
    normalizes in one kernel.
    """

    staged: torch.Tensor
    buffer_index: int
    reducer: PeerAllReduce

    def add_rms_norm(self, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rmsnorm(sum + residual), sum + residual)``; ``residual`` is updated in place."""
        return self.reducer.reduce_add_rms_norm(self, residual, weight, eps), residual


class PeerAllReduce:
    """Sums small tensors over the ranks of ``group`` through peer memory; see the module docstring."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, max_bytes: int = DEFAULT_MAX_BYTES,
                 kernels: KernelConfig | None = None) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        from inferneo.kernels.triton_peer_norm import DevicePointer

        self._group = group
        self.group_name = group.group_name
        self.max_bytes = max_bytes
        # Layout: staging buffer 0 (also the plain all-reduce's buffer), staging buffer 1, the flags, then the two
        # receive buffers of the pushed path.
        recv_start = 2 * max_bytes + _FLAG_BYTES
        self.buffer = symm_mem.empty(recv_start + 2 * _RECV_BYTES, dtype=torch.uint8, device=device)
        handle = symm_mem.rendezvous(self.buffer, self.group_name)
        self.rank, self.world_size = handle.rank, handle.world_size
        bases = list(handle.buffer_ptrs)
        self._stage_ptrs = [torch.tensor([b + i * max_bytes for b in bases], dtype=torch.int64, device=device)
                            for i in (0, 1)]
        self._flag_ptrs = torch.tensor([b + 2 * max_bytes for b in bases], dtype=torch.int64, device=device)
        self._recv_ptrs = [[DevicePointer(b + recv_start + i * _RECV_BYTES, torch.int16) for b in bases]
                           for i in (0, 1)]
        # Before any peer can signal or push: the first collective after this (in ``check``) is queued behind it.
        self.buffer[2 * max_bytes: recv_start].zero_()
        self.buffer[recv_start:].view(torch.int16).fill_(-32768)  # both receive buffers: the bits of -0, "empty"
        self._op = torch.ops.symm_mem.one_shot_all_reduce_copy_out
        self.use_kernels(kernels or KernelConfig.from_env(), device)

    def use_kernels(self, kernels: KernelConfig, device: torch.device) -> None:
        """Take the fused kernel's switches from ``kernels``: the pushed variant (``peer_push``) and programmatic
        dependent launch (``cuda_pdl``). Every rank must be given the same switches."""
        self.push_enabled = kernels.peer_push
        self.pdl = kernels.pdl_on(device)

    @classmethod
    def create(cls, group: dist.ProcessGroup, device: torch.device, world_size: int,
               kernels: KernelConfig | None = None) -> PeerAllReduce | None:
        """A reducer for ``group`` when its GPUs can reach each other's memory and ``kernels.peer_all_reduce`` is on
        (``kernels``; None: the environment's); None (use NCCL) otherwise.

        Every rank must call this at the same point, with the same switches: setting up the buffer is a collective.
        """
        kernels = kernels or KernelConfig.from_env()
        if device.type != "cuda" or world_size < 2 or not kernels.peer_all_reduce:
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
            reducer = cls(group, device, kernels=kernels)
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
        size = x.numel() * x.element_size()
        return x.dtype in _DTYPES and size <= min(self.max_bytes, _ONE_SHOT_MAX_BYTES) and x.is_contiguous()

    def fits_norm(self, rows: int, cols: int, dtype: torch.dtype) -> bool:
        """Whether a [rows, cols] partial sum can be staged for the fused all-reduce + RMSNorm."""
        size = rows * cols * dtype.itemsize
        return (dtype in _NORM_DTYPES and 0 < rows <= MAX_FUSED_ROWS and cols <= _MAX_NORM_WIDTH
                and size <= self.max_bytes and self.world_size <= _MAX_WORLD)

    def pushes(self, rows: int, cols: int, dtype: torch.dtype) -> bool:
        """Whether a fused call on a [rows, cols] partial sum takes the pushed variant (same answer on every rank)."""
        return self.push_enabled and dtype in _PUSH_DTYPES and self.world_size * rows * cols * 2 <= _RECV_BYTES

    def stage(self, buffer_index: int, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """A [rows, cols] view of this rank's staging buffer ``buffer_index`` (0 or 1), for a layer to write its
        partial sum into. Callers must alternate buffers from one fused call to the next (see the module doc)."""
        start = buffer_index * self.max_bytes
        size = rows * cols * dtype.itemsize
        return self.buffer[start:start + size].view(dtype).view(rows, cols)

    def reduce_add_rms_norm(self, partial: PartialSum, residual: torch.Tensor, weight: torch.Tensor,
                            eps: float) -> torch.Tensor:
        """Sum ``partial`` over the ranks, add it to ``residual`` in place, return the RMSNorm of the result."""
        from inferneo.kernels.triton_peer_norm import peer_reduce_add_rms_norm, pushed_reduce_add_rms_norm

        rows, cols = partial.staged.shape
        if self.pushes(rows, cols, partial.staged.dtype):
            return pushed_reduce_add_rms_norm(partial.staged, self._recv_ptrs[partial.buffer_index], self.rank,
                                              residual.view(rows, cols), weight, eps, pdl=self.pdl)
        flag_base = partial.buffer_index * MAX_FUSED_ROWS * self.world_size
        return peer_reduce_add_rms_norm(self._stage_ptrs[partial.buffer_index], self._flag_ptrs, flag_base,
                                        self.rank, self.world_size, rows, residual.view(rows, -1), weight, eps,
                                        pdl=self.pdl)

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
        # The fused path, through both staging buffers and twice each (the flags must have reset themselves).
        rows, cols = 3, 4096
        weight = torch.linspace(0.5, 1.5, cols, device=x.device)
        for call in range(4):
            share = torch.randn(rows, cols, device=x.device, generator=torch.Generator(x.device).manual_seed(call))
            share = share * (rank + 1)
            residual = torch.full((rows, cols), 0.25, device=x.device)
            total = share.clone()
            dist.all_reduce(total, group=self._group)
            summed = total + residual
            expected = weight * (summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-6))
            staged = self.stage(call % 2, rows, cols, torch.float32)
            staged.copy_(share)
            out, new_residual = PartialSum(staged, call % 2, self).add_rms_norm(residual, weight, 1e-6)
            torch.cuda.synchronize()
            if not (torch.allclose(new_residual, summed, atol=1e-5) and torch.allclose(out, expected, atol=1e-4)):
                raise RuntimeError("the fused peer all-reduce + RMSNorm differs from NCCL + RMSNorm")
        if self.push_enabled:  # the pushed variant, in bfloat16 (through both buffers, twice each)
            for call in range(4):
                gen = torch.Generator(x.device).manual_seed(100 + call)
                share = (torch.randn(rows, cols, device=x.device, generator=gen) * (rank + 1)).to(torch.bfloat16)
                residual = torch.full((rows, cols), 0.25, device=x.device, dtype=torch.bfloat16)
                total = share.float()
                dist.all_reduce(total, group=self._group)  # float32: the kernel adds the rounded shares in float32
                summed = (total.to(torch.bfloat16).float() + residual.float()).to(torch.bfloat16)
                xf = summed.float()
                normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16).float()
                norm_weight = weight.bfloat16()
                expected = (norm_weight.float() * normed).to(torch.bfloat16)
                staged = self.stage(call % 2, rows, cols, torch.bfloat16)
                staged.copy_(share)
                out, new_residual = PartialSum(staged, call % 2, self).add_rms_norm(residual, norm_weight, 1e-6)
                torch.cuda.synchronize()
                # bf16 keeps 8 bits: one rounding step apart at most (the sums themselves are the same numbers)
                if not (torch.allclose(new_residual.float(), summed.float(), rtol=1e-2, atol=1e-2)
                        and torch.allclose(out.float(), expected.float(), rtol=1e-2, atol=1e-2)):
                    raise RuntimeError(
                        "the pushed all-reduce + RMSNorm differs from NCCL + RMSNorm (call "
                        f"{call}: residual off by up to {(new_residual.float() - summed.float()).abs().max():.3g}, "
                        f"output by {(out.float() - expected.float()).abs().max():.3g})")
