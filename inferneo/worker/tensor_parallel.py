"""Tensor-parallel execution: the driver's runner plus one worker process per other rank.

:class:`TensorParallelRunner` stands where a :class:`ModelRunner` stands (the engine core cannot tell them apart).
It spawns ranks ``1..N-1``, joins them in one ``torch.distributed`` group as rank 0, and forwards every set-up
call (weights, KV cache) to the workers before doing the same itself. Each step the driver packs the inputs as
usual, sends the packed buffer down a pipe to every worker, and runs its own shard; the collectives inside the
sharded layers keep the ranks in lockstep, and the logits are gathered on the driver, which samples.

Workers are daemon processes started with ``spawn`` (they inherit the environment, so NCCL settings such as
``NCCL_NVLS_ENABLE=0`` hold there too). Start-up runs in steps the driver watches: the driver owns the
rendezvous store; each worker checks in there, then all ranks form the group, then each worker builds its shard
and reports "ready" down its pipe. While it waits for the check-ins and the reports, the driver also watches
the worker processes, so a worker that dies while starting (``spawn`` could not re-import the main module, its
shard did not fit, ...) becomes a ``WorkerDiedError`` within a fraction of a second instead of a store timeout.
A worker that dies later is noticed before the next step and turns into an error that stops the engine, rather
than a hang; ``shutdown`` stops the workers and reaps them.

:class:`TensorParallelRunner` implements :class:`~inferneo.worker.runner_api.Runner` member by member; each
member says whether it runs on every rank or only the driver.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import logging
import multiprocessing as mp
import signal
import time
import traceback
from multiprocessing.connection import Connection, wait

import torch
import torch.distributed as dist

from inferneo import envs
from inferneo.distributed import destroy_tensor_parallel, init_parallel
from inferneo.kernel_config import KernelConfig
from inferneo.model_loader.source import ModelRef
from inferneo.startup_heap import freeze_startup_heap
from inferneo.worker.model_runner import InFlightStep, ModelRunner, RemoteStep, RunnerOutput
from inferneo.worker.runner_api import Runner, driver_only, every_rank
from inferneo.worker.step_inputs import StepRecord

logger = logging.getLogger(__name__)

_TIMEOUT = datetime.timedelta(seconds=120)  # a collective that waits this long means a rank is gone
_POLL_S = 0.05  # while starting, how often the driver looks at the store between exits of worker processes

_SPAWN_HINT = (
    "Workers are started with multiprocessing's 'spawn' method, which imports the program's main module again "
    "in every worker: run the program from a file (not from standard input) and put the code that builds the "
    "engine under `if __name__ == \"__main__\":`. The worker's own error, if any, was printed above."
)


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker process exited."""


def _joined_key(rank: int) -> str:
    return f"inferneo/tp/joined/{rank}"


def _exited(proc: mp.Process) -> str:
    """How ``proc`` ended, for a message: "exited with code 1", "exited with code -9 (killed by SIGKILL)"."""
    if hasattr(proc, "describe_exit"):  # a Ray actor (``ray_executor.RayRank``)
        return proc.describe_exit()
    proc.join(timeout=1)  # its pipes close a moment before its exit status can be read
    code = proc.exitcode
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"exited with code {code} (killed by {signal.Signals(-code).name})"
    return f"exited with code {code}"


def _rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


# Messages that may come while the engine serves (weight updates, sleep mode), not only at start-up.
_RUNTIME_MESSAGES = ("update", "sleep", "wake_up")


def _worker_main(rank: int, tp_size: int, pp_size: int, port: int, runner_kwargs: dict, conn: Connection,
                 store_host: str = "127.0.0.1", device: torch.device | None = None) -> None:
    """A worker's life: check in at the driver's store (at ``store_host``), join the group, build the shard,
    report "ready", then obey the driver's messages until "stop". ``device``: this rank's device when not the
    local ``cuda:rank`` (a Ray actor sees only its own GPU)."""
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <worker>` prints its threads' stacks: the tool for a stalled rank
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    for sig in (signal.SIGINT, signal.SIGTERM):  # a signal to the process group: the driver decides (see "stop")
        signal.signal(sig, signal.SIG_IGN)
    device = device or _rank_device(runner_kwargs["device"], rank)
    if device.type == "cpu":
        torch.set_num_threads(runner_kwargs.pop("num_threads", None) or torch.get_num_threads())
    else:
        runner_kwargs.pop("num_threads", None)
    store = dist.TCPStore(store_host, port, tp_size * pp_size, is_master=False, timeout=_TIMEOUT)
    store.set(_joined_key(rank), "1")  # the driver waits for every rank's check-in before it forms the group
    group, stage = init_parallel(rank, tp_size, pp_size, None, device, timeout=_TIMEOUT, store=store)
    runner = None
    timing = _StepTiming(rank) if envs.tp_timing() else None
    try:
        try:
            runner = ModelRunner(**dict(runner_kwargs, device=device, tp_group=group, pp_group=stage))
        except Exception:  # the driver raises it; this rank just leaves (the driver stops the others)
            conn.send(("error", traceback.format_exc()))
            destroy_tensor_parallel(abort=True)
            return
        conn.send(("ok", None))  # ready
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
                continue
            if kind not in _RUNTIME_MESSAGES:  # the other set-up messages come only before traffic
                freeze_startup_heap(f"tensor-parallel rank {rank}")
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
        from inferneo.model_loader import iter_weights

        runner.load_weights(iter_weights(arg.resolve()))  # a ModelRef: resolved (or downloaded) on this machine
    elif kind == "dummy":
        runner.init_dummy_weights(arg)
    elif kind == "finalize":
        runner.finalize_weights()
    elif kind == "profile":
        return runner.profile_kv_memory(*arg)
    elif kind == "allocate":
        runner.allocate_kv_cache(arg)
    elif kind == "kv_bytes":
        return runner.kv_bytes_per_block
    elif kind == "update":
        runner.update_weights(arg)
    elif kind == "sleep":
        runner.sleep(arg)
    elif kind == "wake_up":
        runner.wake_up()
    elif kind == "enable_lora":
        runner.enable_lora(*arg)
    else:
        raise ValueError(f"unknown message {kind!r}")
    return None


class TensorParallelRunner(Runner):
    """The :class:`Runner` for rank 0 of ``world_size`` ranks, driving the other ranks' workers.

    Every interface member is defined here, none is forwarded implicitly, and each is marked: ``every_rank``
    (the workers are told first, then the driver does the same on its shard) or ``driver_only`` (rank 0 alone
    answers; the ranks agree on it).
    """

    def __init__(self, world_size: int, model: ModelRef, num_threads: int | None = None,
                 pipeline_parallel_size: int = 1,
                 executor_backend: str = "mp", **runner_kwargs) -> None:
        tp_size = world_size
        world_size = tp_size * pipeline_parallel_size
        device = runner_kwargs["device"]
        if device.type == "cuda" and torch.cuda.device_count() < world_size:
            raise ValueError(f"tensor_parallel_size {tp_size} x pipeline_parallel_size {pipeline_parallel_size} "
                             f"needs {world_size} GPUs; "
                             f"{torch.cuda.device_count()} are visible")
        self.world_size = world_size
        self.tp_size, self.pp_size = tp_size, pipeline_parallel_size
        self._model = model
        self._device = device
        # One set of kernel switches for every rank, read here when the engine gave none.
        runner_kwargs["kernels"] = runner_kwargs.get("kernels") or KernelConfig.from_env()
        self._conns: list[Connection] = []
        self._procs: list[mp.Process] = []  # or ``ray_executor.RayRank`` handles, which answer the same calls
        self._joined = False
        self.executor_backend = executor_backend
        self._ray = None
        worker_kwargs = dict(runner_kwargs, num_threads=num_threads)
        try:
            if executor_backend == "ray":
                from inferneo.worker.ray_executor import RayWorkers

                self._ray = RayWorkers(world_size, device)
                # Ray's workers may run on other machines: the store listens on this node's address.
                store = dist.TCPStore(self._ray.host, 0, world_size, is_master=True, timeout=_TIMEOUT,
                                      wait_for_workers=False)
                self._procs, self._conns = self._ray.start(
                    _worker_main, lambda rank: (rank, tp_size, pipeline_parallel_size, store.port, worker_kwargs),
                    WorkerDiedError)
            elif executor_backend == "mp":
                # The driver owns the rendezvous store (port 0: the system picks a free one), so that it can watch
                # the workers check in instead of blocking inside ``init_process_group`` until a timeout.
                store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=_TIMEOUT,
                                      wait_for_workers=False)
                self._spawn_processes(tp_size, pipeline_parallel_size, store.port, worker_kwargs)
            else:
                raise ValueError(f"distributed_executor_backend must be mp or ray; got {executor_backend!r}")
            self._wait_for_check_ins(store)
            driver_device = _rank_device(device, 0)
            group, stage = init_parallel(0, tp_size, pipeline_parallel_size, None, driver_device,
                                         timeout=_TIMEOUT, store=store)
            self._joined = True
            self.driver = ModelRunner(**dict(runner_kwargs, device=driver_device, tp_group=group,
                                             pp_group=stage))
            self._gather(starting=True)  # every worker built its shard: "ready"
            # Pipeline stages may hold different numbers of layers: a block costs what the largest stage needs.
            self._broadcast("kv_bytes", None)
            self._kv_bytes_per_block = max([self.driver.kv_bytes_per_block, *self._gather()])
        except BaseException:
            self._abandon_start()
            raise
        self.driver.step_listener = self._send_step
        logger.info("parallel: %d ranks (tensor %d x pipeline %d; driver + %d workers); small all-reduces through %s",
                    world_size, tp_size, pipeline_parallel_size, world_size - 1,
                    "peer memory" if group.peer is not None else
                    ("NCCL" if driver_device.type == "cuda" else "gloo"))

    def _spawn_processes(self, tp_size: int, pp_size: int, port: int, worker_kwargs: dict) -> None:
        """Start ranks ``1..world_size-1`` as local processes, each with a pipe to the driver."""
        ctx = mp.get_context("spawn")
        for rank in range(1, self.world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, name=f"inferneo-tp{rank}", daemon=True,
                               args=(rank, tp_size, pp_size, port, worker_kwargs, child))
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    # ---- the Runner interface ----------------------------------------------------------------------------

    @property
    @driver_only
    def model_config(self):
        """The model's shape (the same on every rank)."""
        return self.driver.model_config

    @property
    @driver_only
    def backend(self):
        """The attention backend (every rank uses the same)."""
        return self.driver.backend

    @property
    @driver_only
    def rope_switch(self):
        """LongRoPE's switch (the same on every rank)."""
        return self.driver.rope_switch

    @property
    @driver_only
    def decode_buckets(self) -> list[int]:
        """The decode batch sizes the driver pads to; the workers follow the bucket the driver sends."""
        return self.driver.decode_buckets

    @property
    @driver_only
    def kv_bytes_per_block(self) -> int:
        """Bytes of one KV block on the rank that needs the most (every rank of a stage holds the same number of
        heads; pipeline stages may hold different numbers of layers)."""
        return self._kv_bytes_per_block

    @property
    @driver_only
    def sleep_level(self) -> int:
        """The driver's (every rank sleeps and wakes together)."""
        return self.driver.sleep_level

    @property
    @driver_only
    def missing_weights(self) -> set[str]:
        """The driver's (every rank takes the same updates)."""
        return self.driver.missing_weights

    @property
    @driver_only
    def takes_prompt_embeds(self) -> bool:
        """The driver's: it writes the rows and broadcasts them with each step (``RemoteStep.embedded``)."""
        return self.driver.takes_prompt_embeds

    @driver_only
    def take_prompt_embeds(self) -> None:
        """The driver's steps look for prompt embeddings; the workers read the rows it broadcasts."""
        self.driver.take_prompt_embeds()

    @driver_only
    def weights_update_refusal(self) -> str | None:
        """The driver's answer (every rank holds the same kind of shard)."""
        return self.driver.weights_update_refusal()

    @every_rank
    def update_weights(self, weights) -> None:
        """Checked on the driver first (a refusal reaches no worker), then every rank takes its slices of the
        whole tensors (sent to each worker)."""
        self.driver.check_weights(weights)  # a refusal reaches no worker
        self._broadcast("update", weights)
        self.driver.update_weights(weights)
        self._gather()

    @every_rank
    def sleep(self, level: int) -> None:
        self.driver.check_sleep(level)  # a refusal reaches no worker
        self._broadcast("sleep", level)
        self.driver.sleep(level)
        self._gather()

    @every_rank
    def wake_up(self) -> None:
        if not self.driver.sleep_level:
            return
        self._broadcast("wake_up", None)
        self.driver.wake_up()
        self._gather()

    @every_rank
    def load_weights(self, weights) -> None:
        """Each worker reads its own slices from the checkpoint; the driver loads from ``weights``."""
        self._broadcast("load", self._model)
        self.driver.load_weights(weights)
        self._gather()

    @every_rank
    def init_dummy_weights(self, seed: int = 0) -> None:
        self._broadcast("dummy", seed)
        self.driver.init_dummy_weights(seed)
        self._gather()

    @every_rank
    def finalize_weights(self) -> None:
        self._broadcast("finalize", None)
        self.driver.finalize_weights()
        self._gather()

    @every_rank
    def profile_kv_memory(self, max_num_batched_tokens: int, gpu_memory_utilization: float) -> int:
        """The smallest budget of all ranks: every rank holds the same number of blocks."""
        self._broadcast("profile", (max_num_batched_tokens, gpu_memory_utilization))
        own = self.driver.profile_kv_memory(max_num_batched_tokens, gpu_memory_utilization)
        return min([own, *self._gather()])

    @every_rank
    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._broadcast("allocate", num_blocks)
        self.driver.allocate_kv_cache(num_blocks)
        self._gather()

    @every_rank
    def execute(self, step: StepRecord) -> RunnerOutput:
        """The driver packs the step and sends it to the workers (its ``step_listener``) before running its own
        shard; the tokens are sampled on the driver."""
        return self.driver.execute(step)

    @every_rank
    def launch(self, step: StepRecord, previous: InFlightStep | None = None) -> InFlightStep:
        """As ``execute``, without waiting for the sampled tokens."""
        return self.driver.launch(step, previous)

    @every_rank
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
        self._release_ray()

    def _release_ray(self) -> None:
        """With the Ray backend: kill what is left of the actors and free their placement group."""
        if self._ray is not None:
            self._ray.release()
            self._ray = None

    @every_rank
    def enable_lora(self, max_loras: int, max_lora_rank: int, max_cpu_loras: int, max_num_batched_tokens: int):
        """Every rank wraps its shards' projections (each reads the adapters' folders itself when a step first
        uses one); the driver's slots are returned, and each step tells the workers its adapters
        (``RemoteStep.lora``). Pipeline stages are refused."""
        if self.pp_size > 1:
            raise ValueError("enable_lora with pipeline_parallel_size > 1 is not supported yet")
        self._broadcast("enable_lora", (max_loras, max_lora_rank, max_cpu_loras, max_num_batched_tokens))
        slots = self.driver.enable_lora(max_loras, max_lora_rank, max_cpu_loras, max_num_batched_tokens)
        self._gather()
        return slots

    @driver_only
    def check_workers(self, timeout: float = 0.0) -> None:
        """Raise WorkerDiedError if a worker has exited, after waiting up to ``timeout`` s for one to exit (a
        collective fails as soon as a peer's sockets close, which can be a moment before that peer is reaped)."""
        if timeout > 0 and self._procs:
            self._wait_for_exits(timeout)
        self._check_alive()

    # ---- start-up ----------------------------------------------------------------------------------------

    def _wait_for_check_ins(self, store: dist.TCPStore) -> None:
        """Wait until every worker has reached the store, raising as soon as one of them exits instead."""
        keys = [_joined_key(rank) for rank in range(1, self.world_size)]
        deadline = time.monotonic() + _TIMEOUT.total_seconds()
        while not store.check(keys):
            exited = self._wait_for_exits(_POLL_S)
            if exited:
                rank = min(exited)
                raise WorkerDiedError(f"tensor-parallel worker {rank} {_exited(self._procs[rank - 1])} while "
                                      f"starting, before it joined the group. {_SPAWN_HINT}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel workers did not start within {_TIMEOUT.total_seconds():.0f} s")

    def _wait_for_exits(self, timeout: float) -> list[int]:
        """The ranks whose worker has exited, waiting up to ``timeout`` s for one to (processes signal their exit;
        Ray actors are polled)."""
        sentinels = [proc.sentinel for proc in self._procs if proc.sentinel is not None]
        if sentinels:
            wait(sentinels, timeout)
        else:
            time.sleep(timeout)
        return [rank for rank, proc in enumerate(self._procs, start=1) if not proc.is_alive()]

    def _abandon_start(self) -> None:
        """Start-up failed: stop every worker at once (none has anything to save) and leave the group."""
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()
        if self._joined:  # leave only a group this runner joined (not another engine's)
            destroy_tensor_parallel(abort=True)
        self._conns, self._procs = [], []
        self._release_ray()

    # ---- messages ----------------------------------------------------------------------------------------

    def _check_alive(self) -> None:
        for rank, proc in enumerate(self._procs, start=1):
            if not proc.is_alive():
                raise WorkerDiedError(f"tensor-parallel worker {rank} {_exited(proc)}")

    def _send_step(self, step: RemoteStep) -> None:
        self._broadcast("step", step)

    def _broadcast(self, kind: str, arg) -> None:
        self._check_alive()
        for conn in self._conns:
            try:
                conn.send((kind, arg))
            except OSError as exc:
                raise WorkerDiedError(f"lost a tensor-parallel worker: {exc}") from exc

    def _gather(self, starting: bool = False) -> list:
        """Every worker's answer to the last message, in rank order. The worker processes are watched meanwhile:
        one that exits instead of answering raises WorkerDiedError at once."""
        when = "while starting (building its shard of the model)" if starting else "during set-up"
        ranks = {conn: rank for rank, conn in enumerate(self._conns, start=1)}
        # Processes signal their exit; a Ray actor's death closes its connection, which reads as EOF below.
        exits = {proc.sentinel: rank for rank, proc in enumerate(self._procs, start=1) if proc.sentinel is not None}
        results: dict[int, object] = {}
        while len(results) < len(ranks):
            ready = wait([conn for conn, rank in ranks.items() if rank not in results] + list(exits))
            for conn in ready:
                if conn not in ranks:
                    continue
                rank = ranks[conn]
                try:
                    status, value = conn.recv()
                except EOFError:
                    raise WorkerDiedError(f"tensor-parallel worker {rank} {_exited(self._procs[rank - 1])} "
                                          f"{when}") from None
                if status == "error":
                    raise RuntimeError(f"tensor-parallel worker {rank} failed {when}:\n{value}")
                results[rank] = value
            for sentinel in ready:
                if sentinel in exits:  # answers it sent before exiting were read above
                    rank = exits[sentinel]
                    raise WorkerDiedError(f"tensor-parallel worker {rank} {_exited(self._procs[rank - 1])} {when}")
        return [results[rank] for rank in sorted(results)]
