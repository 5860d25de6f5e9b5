"""Worker ranks as Ray actors: ``--distributed-executor-backend ray``.

The driver (rank 0) stays in the engine's process, as with local processes; ranks ``1..N-1`` run in Ray actors,
one per bundle of a placement group (one CPU each, or ``INFERNEO_RAY_WORKER_CPUS``; one GPU each on CUDA), so
they may sit on other machines of the cluster. The driver publishes two addresses on its node's IP: the
``torch.distributed`` rendezvous store and a listener (with a random key) that each actor connects back to. Over
that connection the actor runs the very worker loop a local process runs (``tensor_parallel._worker_main``),
so set-up messages, steps, errors and shutdown behave the same. An actor that dies closes its connection, which
the driver reads as the worker's exit; ``RayRank`` answers the liveness calls the runner makes of a process.

The environment's ``INFERNEO_*`` and ``NCCL_*`` variables (and ``PYTHONPATH``) are forwarded to the actors, so
every rank reads the same switches (a layer partition, NCCL settings). Ray is imported only here.
"""

from __future__ import annotations

import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener

import torch

from inferneo import envs

_READY_TIMEOUT_S = 120.0  # for the placement group's resources, then for every actor to connect back


def _forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(("INFERNEO_", "NCCL_")) or k == "PYTHONPATH"}


class _RankActor:
    """The body of one worker actor: connect back to the driver, then run the worker loop until told to stop."""

    def run(self, address, authkey: bytes, rank: int, worker_main: Callable, args: tuple, store_host: str,
            gpu: bool) -> None:
        conn = Client(address, authkey=authkey)
        conn.send(rank)
        device = torch.device("cuda", 0) if gpu else None  # Ray shows the actor its own GPU only
        worker_main(*args, conn, store_host=store_host, device=device)


class RayRank:
    """A worker rank in a Ray actor, answering the calls the runner makes of a local ``multiprocessing`` process."""

    sentinel = None  # nothing to select on: a dead actor's connection reads as EOF instead

    def __init__(self, rank: int, actor, ref) -> None:
        self.rank, self.actor, self.ref = rank, actor, ref

    def is_alive(self) -> bool:
        import ray

        return not ray.wait([self.ref], timeout=0)[0]

    def join(self, timeout: float | None = None) -> None:
        import ray

        ray.wait([self.ref], timeout=timeout)

    def terminate(self) -> None:
        import ray

        ray.kill(self.actor, no_restart=True)

    kill = terminate

    def describe_exit(self) -> str:
        """How the actor ended, for a message."""
        import ray

        try:
            ray.get(self.ref, timeout=1)
        except ray.exceptions.GetTimeoutError:
            return "is still running"
        except ray.exceptions.RayActorError as exc:
            return f"died (its Ray actor is gone: {str(exc).splitlines()[0]})"
        except ray.exceptions.RayTaskError as exc:
            return f"failed: {exc}"
        return "exited"


class RayWorkers:
    """The placement group and actors of one engine's worker ranks; ``release`` gives them back to Ray."""

    def __init__(self, world_size: int, device: torch.device) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        if not ray.is_initialized():
            ray.init()  # the cluster RAY_ADDRESS names, or the one started on this node, or a new local one
        self.world_size = world_size
        self.host = ray.util.get_node_ip_address()
        self.gpu = device.type == "cuda"
        self.cpus = envs.ray_worker_cpus()
        bundle = {"CPU": self.cpus, **({"GPU": 1} if self.gpu else {})}
        self.placement = placement_group([dict(bundle) for _ in range(world_size - 1)], strategy="PACK")
        self.ranks: list[RayRank] = []
        try:
            ray.get(self.placement.ready(), timeout=_READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.placement)
            raise RuntimeError(f"the Ray cluster did not grant {world_size - 1} bundles of {bundle} within "
                               f"{_READY_TIMEOUT_S:.0f} s (available: {ray.available_resources()})") from None

    def start(self, worker_main: Callable, args_for_rank: Callable[[int], tuple],
              died_error: type[Exception]) -> tuple[list[RayRank], list[Connection]]:
        """Start one actor per worker rank and wait until each has connected back; returns the ranks' handles
        and connections in rank order. An actor that fails first raises ``died_error``."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        authkey = secrets.token_bytes(32)
        listener = Listener((self.host, 0), authkey=authkey)
        accepted: queue.Queue = queue.Queue()

        def accept_all() -> None:
            try:
                for _ in range(self.world_size - 1):
                    accepted.put(listener.accept())
            except OSError:  # the listener was closed: start-up gave up
                pass

        threading.Thread(target=accept_all, name="inferneo-ray-accept", daemon=True).start()
        actor_cls = ray.remote(_RankActor)
        try:
            for index, rank in enumerate(range(1, self.world_size)):
                actor = actor_cls.options(
                    num_cpus=self.cpus, num_gpus=1 if self.gpu else 0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement,
                                                                         placement_group_bundle_index=index),
                    runtime_env={"env_vars": _forwarded_env()}).remote()
                ref = actor.run.remote(listener.address, authkey, rank, worker_main, args_for_rank(rank), self.host,
                                       self.gpu)
                self.ranks.append(RayRank(rank, actor, ref))
            conns: dict[int, Connection] = {}
            deadline = time.monotonic() + _READY_TIMEOUT_S
            while len(conns) < self.world_size - 1:
                try:
                    conn = accepted.get(timeout=0.1)
                except queue.Empty:
                    for handle in self.ranks:
                        if not handle.is_alive():
                            raise died_error(f"tensor-parallel worker {handle.rank} {handle.describe_exit()} "
                                             "before it connected to the driver") from None
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"Ray worker actors did not connect within {_READY_TIMEOUT_S:.0f} s") from None
                    continue
                if not conn.poll(_READY_TIMEOUT_S):
                    raise TimeoutError("a Ray worker actor connected but did not say its rank")
                conns[conn.recv()] = conn
        finally:
            listener.close()
        return self.ranks, [conns[rank] for rank in range(1, self.world_size)]

    def release(self) -> None:
        """Kill the actors (those still running) and remove the placement group."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for handle in self.ranks:
            ray.kill(handle.actor, no_restart=True)
        self.ranks = []
        remove_placement_group(self.placement)
