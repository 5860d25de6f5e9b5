"""Tensor-parallel execution: the driver's runner plus one worker process per other rank.

:class:`TensorParallelRunner` stands where a :class:`ModelRunner` stands (the engine core cannot tell them apart).
It spawns ranks ``1..N-1``, joins them in one ``torch.distributed`` group as rank 0, and forwards every set-up
call (weights, KV cache) to the workers before doing the same itself. Each step the driver packs the inputs as
usual, sends the packed buffer down a pipe to every worker, and runs its own shard; the collectives inside the
sharded layers keep the ranks in lockstep, and the logits are gathered on the driver, which samples.

Workers are daemon processes started with ``spawn`` (they inherit the environment, so NCCL settings such as
``NCCL_NVLS_ENABLE=0`` hold there too). A worker that dies is noticed before the next step and turns into an
error that stops the engine, rather than a hang; ``shutdown`` stops the workers and reaps them.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import logging
import multiprocessing as mp
import signal
import socket
import time
import traceback
from multiprocessing.connection import Connection, wait

import torch

from inferneo import envs
from inferneo.distributed import destroy_tensor_parallel, init_tensor_parallel
from inferneo.kernel_config import KernelConfig
from inferneo.worker.model_runner import ModelRunner, RemoteStep

logger = logging.getLogger(__name__)

_TIMEOUT = datetime.timedelta(seconds=120)  # a collective that waits this long means a rank is gone


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker process exited."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


def _worker_main(rank: int, world: int, port: int, runner_kwargs: dict, conn: Connection) -> None:
    """A worker's life: join the group, build the shard, then obey the driver's messages until "stop"."""
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <worker>` prints its threads' stacks: the tool for a stalled rank
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    device = _rank_device(runner_kwargs["device"], rank)
    if device.type == "cpu":
        torch.set_num_threads(runner_kwargs.pop("num_threads", None) or torch.get_num_threads())
    else:
        runner_kwargs.pop("num_threads", None)
    group = init_tensor_parallel(rank, world, f"tcp://127.0.0.1:{port}", device, timeout=_TIMEOUT)
    runner = None
    timing = _StepTiming(rank) if envs.tp_timing() else None
    try:
        runner = ModelRunner(**dict(runner_kwargs, device=device, tp_group=group))
        if timing is not None:
            timing.watch_staging(runner)
        while True:
            waited = time.perf_counter()
            kind, arg = conn.recv()
            if kind == "step":
                started = time.perf_counter()
                runner.execute_remote(arg)
                if timing is not None:
                    timing.add(started - waited, time.perf_counter() - started)
                continue
            if timing is not None:
                timing.report()
            if kind == "stop":  # arg: whether to meet the driver at a barrier first (see ``shutdown``)
                runner.release_cuda_graphs()  # before the group: NCCL waits for graphs that captured its kernels
                destroy_tensor_parallel(barrier=arg)
                break
            try:
                conn.send(("ok", _set_up(runner, kind, arg)))
            except Exception:  # reported to the driver, which raises it and then stops every rank in order
                conn.send(("error", traceback.format_exc()))
    except (EOFError, KeyboardInterrupt):  # the driver is gone: nobody to leave the group with gracefully
        if runner is not None:
            runner.release_cuda_graphs()
        destroy_tensor_parallel(abort=True)
    except BaseException:  # a failed step: leave at once (a graceful teardown would wait on the other ranks)
        traceback.print_exc()
        if runner is not None:
            with contextlib.suppress(Exception):  # after a device fault this may fail too; leaving comes first
                runner.release_cuda_graphs()
        destroy_tensor_parallel(abort=True)
        raise
    finally:
        destroy_tensor_parallel()


class _StepTiming:
    """``INFERNEO_TP_TIMING=1``: a worker's host time per step, waiting for the driver vs launching its step,
    printed when the next non-step message arrives (for profiling; off by default)."""

    def __init__(self, rank: int) -> None:
        self.rank, self.steps, self.waiting, self.launching, self.staging = rank, 0, 0.0, 0.0, 0.0

    def watch_staging(self, runner: ModelRunner) -> None:
        """Also count the time the runner's input buffers wait for their previous copy to finish."""
        host = runner._inputs.host

        def timed_host(size: int):
            start = time.perf_counter()
            try:
                return host(size)
            finally:
                self.staging += time.perf_counter() - start

        runner._inputs.host = timed_host

    def add(self, waiting: float, launching: float) -> None:
        self.steps, self.waiting, self.launching = self.steps + 1, self.waiting + waiting, self.launching + launching

    def report(self) -> None:
        if self.steps:
            n = self.steps / 1e3
            print(f"tp worker {self.rank}: {self.steps} steps, waiting for the driver {self.waiting / n:.3f} ms/step, "
                  f"launching {self.launching / n:.3f} ms/step (of which waiting for an input buffer "
                  f"{self.staging / n:.3f})", flush=True)
        self.steps, self.waiting, self.launching, self.staging = 0, 0.0, 0.0, 0.0


def _set_up(runner: ModelRunner, kind: str, arg):
    """One set-up message of the driver, run on this worker's runner; returns what the driver gathers."""
    if kind == "load":
        from inferneo.model_loader import iter_weights, resolve_model

        runner.load_weights(iter_weights(resolve_model(arg)))
    elif kind == "dummy":
        runner.init_dummy_weights(arg)
    elif kind == "finalize":
        runner.finalize_weights()
    elif kind == "profile":
        return runner.profile_kv_memory(*arg)
    elif kind == "allocate":
        runner.allocate_kv_cache(arg)
    else:
        raise ValueError(f"unknown message {kind!r}")
    return None


class TensorParallelRunner:
    """A ModelRunner for rank 0 of ``world_size`` ranks, driving the other ranks' workers."""

    def __init__(self, world_size: int, model: str, num_threads: int | None = None, **runner_kwargs) -> None:
        device = runner_kwargs["device"]
        if device.type == "cuda" and torch.cuda.device_count() < world_size:
            raise ValueError(f"tensor_parallel_size {world_size} needs {world_size} GPUs; "
                             f"{torch.cuda.device_count()} are visible")
        self.world_size = world_size
        self._model = model
        self._device = device
        # One set of kernel switches for every rank, read here when the engine gave none.
        runner_kwargs["kernels"] = runner_kwargs.get("kernels") or KernelConfig.from_env()
        port = _free_port()
        ctx = mp.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[mp.Process] = []
        for rank in range(1, world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, name=f"inferneo-tp{rank}", daemon=True,
                               args=(rank, world_size, port, dict(runner_kwargs, num_threads=num_threads), child))
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        try:
            group = init_tensor_parallel(0, world_size, f"tcp://127.0.0.1:{port}", _rank_device(device, 0),
                                         timeout=_TIMEOUT)
            self.driver = ModelRunner(**dict(runner_kwargs, device=_rank_device(device, 0), tp_group=group))
        except BaseException:
            self.shutdown()
            raise
        self.driver.step_listener = self._send_step
        logger.info("tensor parallel: %d ranks (driver + %d workers); small all-reduces through %s", world_size,
                    world_size - 1, "peer memory" if group.peer is not None else "NCCL")

    # ---- the ModelRunner surface -------------------------------------------------------------------------

    def __getattr__(self, name):  # model_config, backend, device, num_blocks, ...: the driver's
        if name == "driver":
            raise AttributeError(name)
        return getattr(self.driver, name)

    def load_weights(self, weights) -> None:
        self._broadcast("load", self._model)
        self.driver.load_weights(weights)
        self._gather()

    def init_dummy_weights(self, seed: int = 0) -> None:
        self._broadcast("dummy", seed)
        self.driver.init_dummy_weights(seed)
        self._gather()

    def finalize_weights(self) -> None:
        self._broadcast("finalize", None)
        self.driver.finalize_weights()
        self._gather()

    @property
    def kv_bytes_per_block(self) -> int:
        return self.driver.kv_bytes_per_block

    def profile_kv_memory(self, max_num_batched_tokens: int, gpu_memory_utilization: float) -> int:
        self._broadcast("profile", (max_num_batched_tokens, gpu_memory_utilization))
        own = self.driver.profile_kv_memory(max_num_batched_tokens, gpu_memory_utilization)
        return min([own, *self._gather()])  # every rank holds the same number of blocks

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._broadcast("allocate", num_blocks)
        self.driver.allocate_kv_cache(num_blocks)
        self._gather()

    def execute(self, sched):
        return self.driver.execute(sched)

    def shutdown(self) -> None:
        """Stop the workers (waiting briefly, then terminating) and leave the group."""
        all_alive = all(proc.is_alive() for proc in self._procs)
        # The barrier keeps gloo from aborting a peer mid-teardown (NCCL's finalize needs none); with a rank gone,
        # nobody would arrive at it.
        barrier = all_alive and bool(self._procs) and self._device.type == "cpu"
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(("stop", barrier))
        if hasattr(self, "driver"):
            self.driver.release_cuda_graphs()  # NCCL cannot tear the group down while graphs hold its kernels
        destroy_tensor_parallel(barrier=barrier, abort=not all_alive)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        self._conns, self._procs = [], []

    def check_workers(self, timeout: float = 0.0) -> None:
        """Raise WorkerDiedError if a worker has exited, after waiting up to ``timeout`` s for one to exit (a
        collective fails as soon as a peer's sockets close, which can be a moment before that peer is reaped)."""
        if timeout > 0 and self._procs:
            wait([proc.sentinel for proc in self._procs], timeout)
        self._check_alive()

    # ---- messages ----------------------------------------------------------------------------------------

    def _check_alive(self) -> None:
        for rank, proc in enumerate(self._procs, start=1):
            if not proc.is_alive():
                raise WorkerDiedError(f"tensor-parallel worker {rank} exited with code {proc.exitcode}")

    def _send_step(self, step: RemoteStep) -> None:
        self._broadcast("step", step)

    def _broadcast(self, kind: str, arg) -> None:
        self._check_alive()
        for conn in self._conns:
            try:
                conn.send((kind, arg))
            except OSError as exc:
                raise WorkerDiedError(f"lost a tensor-parallel worker: {exc}") from exc

    def _gather(self) -> list:
        results = []
        for rank, conn in enumerate(self._conns, start=1):
            try:
                status, value = conn.recv()
            except EOFError as exc:
                raise WorkerDiedError(f"tensor-parallel worker {rank} exited during set-up") from exc
            if status == "error":
                raise RuntimeError(f"tensor-parallel worker {rank} failed during set-up:\n{value}")
            results.append(value)
        return results
