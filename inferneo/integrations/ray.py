"""Batch inference over a Ray Dataset: ``build_processor(config)(dataset)`` answers every row.

Two processors share one row format (:mod:`inferneo.integrations.rows`: a ``prompt``, ``messages`` or an
OpenAI request ``body`` in, ``generated_text``, ``finish_reason``, ``response``, ``error``... out):

- :class:`EngineProcessorConfig`: ``replicas`` Ray actors, each loading the model into one Inferneo engine and
  answering rows through the OpenAI server's own code in that process (no socket), so a body's structured-output
  fields, tools and error replies behave exactly as over HTTP;
- :class:`EndpointProcessorConfig`: actors that post rows to ``inferneo serve`` endpoints already running.

Both are ``Dataset.map_batches`` over an actor pool, so the run streams: Ray Data hands each actor a bounded
number of batches and reads further input only as results are taken, which is the back-pressure. A replica that
dies mid-run is restarted by Ray and the batches it held are run again (``max_restarts``, ``max_task_retries``;
a batch's rows come out once, from the attempt that finished); past those bounds the run raises
(``inferneo batch --ray`` then retries and writes the lines still unanswered with their error: :mod:`inferneo.batch.on_ray`).

``ray`` is imported only when a processor is applied (``pip install "inferneo[ray]"``).
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from inferneo.integrations.rows import OUTPUT_COLUMNS, RowError, answer_of, request_of, row_error

if TYPE_CHECKING:
    import numpy as np
    import ray.data

__all__ = ["EndpointProcessorConfig", "EngineProcessorConfig", "Processor", "ReplicaResources", "build_processor"]


@dataclass(frozen=True, slots=True)
class ReplicaResources:
    """What Ray reserves for one engine replica. A tensor-parallel replica runs its ranks as local processes
    of the replica's node, so it asks for all their GPUs at once (``num_gpus = tensor_parallel_size``): Ray then
    places the whole group on one node, as a ``STRICT_PACK`` placement group would."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: float | None = None  # bytes
    accelerator_type: str | None = None


@dataclass(frozen=True, slots=True)
class EngineProcessorConfig:
    """Answer rows with ``replicas`` engines on the cluster.

    ``engine_options`` are the ``LLM`` / ``EngineConfig`` keyword arguments (``max_num_seqs``,
    ``tensor_parallel_size``, ``kv_cache_memory``, ...). ``sampling`` holds request-field defaults
    (``{"max_tokens": 64, "temperature": 0}``); ``request_fields`` names row columns copied into each request.
    ``batch_size`` rows go to a replica at a time, and up to ``batches_per_replica`` batches wait on each (more
    keeps the engine's continuous batch full across batch boundaries). ``actor_options`` are further Ray actor
    options for every replica, passed as they are (custom ``resources`` to keep replicas on the nodes that have
    them, ``label_selector``, ``scheduling_strategy``, ``runtime_env``...). The engine's core loop runs in a child
    process of the replica, as under ``inferneo serve``; ``engine_in_process`` keeps it in a thread of the actor
    (as ``--engine-in-process`` does; measured slower: the rows' request handling and the core loop then share
    one interpreter lock)."""

    model: str | None = None
    engine_options: dict[str, Any] = field(default_factory=dict)
    served_model_name: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    request_fields: tuple[str, ...] = ()
    batch_size: int = 16
    replicas: int = 1
    batches_per_replica: int = 4
    resources: ReplicaResources = field(default_factory=ReplicaResources)
    max_restarts: int = 3
    max_task_retries: int = 3
    actor_options: dict[str, Any] = field(default_factory=dict)
    engine_in_process: bool = False

    def __post_init__(self) -> None:
        _check_positive(batch_size=self.batch_size, replicas=self.replicas,
                        batches_per_replica=self.batches_per_replica)
        if not isinstance(self.engine_in_process, bool):
            raise TypeError(f"engine_in_process must be a bool, got {self.engine_in_process!r}")
        taken = sorted(set(self.actor_options) & _OPTIONS_SET_ELSEWHERE)
        if taken:
            raise ValueError(f"actor_options must not set {', '.join(taken)}: the config's own fields "
                             "(resources, max_restarts, max_task_retries) say that")


@dataclass(frozen=True, slots=True)
class EndpointProcessorConfig:
    """Answer rows with running ``inferneo serve`` endpoints (``urls``, e.g. ``http://10.0.0.5:8000``).

    ``model`` is a served model name; ``actors`` client actors (each ``num_cpus``) post rows round-robin over
    the endpoints, retrying timeouts, 408, 409 and 5xx up to ``max_retries`` times, and an endpoint that is away
    (connection errors, 429, 502, 503: restarting, draining, queue full) until it has answered none of the actor's
    rows for ``retry_window`` seconds, as ``inferneo batch --retry-window`` does; a row that still got no answer
    gets a ``server_unreachable`` or ``server_busy`` error."""

    urls: tuple[str, ...]
    model: str
    api_key: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    request_fields: tuple[str, ...] = ()
    batch_size: int = 16
    actors: int = 1
    batches_per_actor: int = 4
    num_cpus: float = 0.25
    max_retries: int = 5
    retry_window: float = 300.0
    timeout: float = 600.0
    max_restarts: int = 3
    max_task_retries: int = 3

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("EndpointProcessorConfig needs at least one url")
        _check_positive(batch_size=self.batch_size, actors=self.actors, batches_per_actor=self.batches_per_actor)


class Processor:
    """Maps a ``ray.data.Dataset`` to one with the answer columns added (lazily, like any Dataset op).
    ``replica_class`` and ``sender_class`` are the actor classes used (a subclass may wrap them)."""

    replica_class: type[EngineReplica]
    sender_class: type[EndpointSender]

    def __init__(self, config: EngineProcessorConfig | EndpointProcessorConfig) -> None:
        self.config = config

    def __call__(self, dataset: ray.data.Dataset) -> ray.data.Dataset:
        import ray.data

        config = self.config
        if isinstance(config, EngineProcessorConfig):
            actor_class, size, per_actor = self.replica_class, config.replicas, config.batches_per_replica
            res = config.resources
            resources: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
            if res.memory is not None:
                resources["memory"] = res.memory
            if res.accelerator_type is not None:
                resources["accelerator_type"] = res.accelerator_type
            resources.update(config.actor_options)
        else:
            actor_class, size, per_actor = self.sender_class, config.actors, config.batches_per_actor
            resources = {"num_cpus": config.num_cpus}
        pool = ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=per_actor,
                                          **_concurrent_calls(per_actor, resources))
        return dataset.map_batches(
            actor_class, fn_constructor_args=(config,), batch_size=config.batch_size, batch_format="numpy",
            compute=pool, max_restarts=config.max_restarts, max_task_retries=config.max_task_retries, **resources)


def _concurrent_calls(per_actor: int, remote_args: dict[str, Any]) -> dict[str, Any]:
    """Let each actor *run* ``per_actor`` batches at once, not only hold them. A Ray Data actor runs one call at a
    time unless told otherwise, and a replica answering one batch at a time drains its engine's continuous batch at
    the end of every batch (measured: half the throughput of ``LLM.generate``). Newer Ray says so on the pool
    (returned here); older Ray through the actor's ``max_concurrency`` (set into ``remote_args``)."""
    import inspect

    import ray.data

    if "max_concurrent_calls_per_actor" in inspect.signature(ray.data.ActorPoolStrategy).parameters:
        return {"max_concurrent_calls_per_actor": per_actor}
    remote_args["max_concurrency"] = per_actor
    return {}


def build_processor(config: EngineProcessorConfig | EndpointProcessorConfig) -> Processor:
    """The processor for ``config``: ``build_processor(config)(dataset)`` is the answered dataset."""
    return Processor(config)


class _RowMapper:
    """Answers a batch of rows concurrently; subclasses say how one request is posted."""

    sampling: dict[str, Any]
    request_fields: tuple[str, ...]
    model: str

    async def post(self, url: str, body: dict[str, Any]) -> tuple[int, str | None, Any]:
        raise NotImplementedError

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import numpy as np

        num_rows = len(next(iter(batch.values()))) if batch else 0
        rows = [{name: column[i] for name, column in batch.items()} for i in range(num_rows)]
        answers = await asyncio.gather(*(self._answer(row) for row in rows))
        out = dict(batch)
        for name in OUTPUT_COLUMNS:
            column = np.empty(num_rows, dtype=object)
            column[:] = [answer[name] for answer in answers]
            out[name] = column
        return out

    async def _answer(self, row: dict[str, Any]) -> dict[str, Any]:
        try:
            url, body = request_of(row, self.sampling, self.request_fields, self.model)
        except RowError as exc:
            return row_error(str(exc))
        return answer_of(*await self.post(url, body))


class EngineReplica(_RowMapper):
    """One engine replica (a Ray Data actor): the model in an engine of this process, behind the server's app."""

    def __init__(self, config: EngineProcessorConfig) -> None:
        from inferneo.batch.in_process import InProcessServer
        from inferneo.startup_heap import freeze_startup_heap

        names = [config.served_model_name] if config.served_model_name else None
        self.server = InProcessServer(config.model, names, core_in_child_process=not config.engine_in_process,
                                      **config.engine_options)
        freeze_startup_heap("Ray engine replica")  # a Ray Data actor's process is the replica's alone
        self.model = self.server.context.served_model_names[0]
        self.sampling = dict(config.sampling)
        self.request_fields = tuple(config.request_fields)
        self._sender = None

    async def post(self, url: str, body: dict[str, Any]) -> tuple[int, str | None, Any]:
        from inferneo.batch.sender import Sender

        if self._sender is None:  # made on the actor's event loop, where every batch runs
            self._sender = Sender(self.server.client())
        reply = await self._sender.post(url, body)
        return reply.status_code, reply.request_id, reply.body

    def __del__(self) -> None:
        server = getattr(self, "server", None)  # absent if loading the model failed
        if server is not None:
            server.shutdown()


class EndpointSender(_RowMapper):
    """A client actor posting rows round-robin to running servers."""

    def __init__(self, config: EndpointProcessorConfig) -> None:
        self.config = config
        self.model = config.model
        self.sampling = dict(config.sampling)
        self.request_fields = tuple(config.request_fields)
        self._senders: list[Any] = []
        self._turn = itertools.count()

    async def post(self, url: str, body: dict[str, Any]) -> tuple[int, str | None, Any]:
        from inferneo.batch.sender import (
            Sender,
            ServerAuthError,
            ServerBusyError,
            ServerUnreachableError,
            remote_client,
        )

        if not self._senders:
            cfg = self.config
            self._senders = [Sender(remote_client(u, cfg.api_key, cfg.timeout), cfg.max_retries,
                                    retry_window=cfg.retry_window) for u in cfg.urls]
        sender = self._senders[next(self._turn) % len(self._senders)]
        try:
            reply = await sender.post(url, body)
        except ServerAuthError as exc:  # the key is wrong: the row gets the server's 401
            return 401, None, {"error": {"message": str(exc), "type": "authentication_error", "param": None,
                                         "code": "invalid_api_key"}}
        except ServerUnreachableError as exc:  # ServerBusyError too: still 429 / 503 after the retries
            kind = "server_busy" if isinstance(exc, ServerBusyError) else "server_unreachable"
            return 503, None, {"error": {"message": str(exc), "type": kind, "param": None, "code": kind}}
        return reply.status_code, reply.request_id, reply.body


Processor.replica_class = EngineReplica
Processor.sender_class = EndpointSender


_OPTIONS_SET_ELSEWHERE = frozenset({"num_cpus", "num_gpus", "memory", "accelerator_type", "max_restarts",
                                    "max_task_retries", "compute", "fn_constructor_args", "batch_size",
                                    "batch_format"})


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
