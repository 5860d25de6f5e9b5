"""Data-parallel serving: N engine-core replicas behind one front end, as one :class:`CoreClient`.

:class:`DataParallelCoreClient` holds one core client per replica (a child process each, or a Ray actor each:
``inferneo.engine.ray_core_client``) and looks like a single core to :class:`~inferneo.engine.async_engine.
AsyncEngine`: commands go in, one stream of ``StepOutputs`` comes out. It

- routes each new sequence to a replica (``ReplicaRouter``: the replica that holds the prompt's longest cached
  prefix, else the least loaded; or round-robin), keeping the sequences that share a prompt (``n`` > 1) together;
- sends an abort to the replica that holds the sequence;
- sends control commands (prefix-cache reset, new weights, sleep, wake-up) to every replica and answers once,
  refusing new weights and sleep while any replica runs a request, so the replicas never differ;
- merges the replicas' counters into one ``EngineSnapshot`` (counters summed over every replica that ever ran,
  gauges over the live ones) and keeps each replica's own for per-replica metrics and ``/health``;
- survives a replica's death: it is taken out of rotation, its sequences that produced no token yet are sent
  again to a live replica (once), the others fail with ``RequestFailedError`` (a 500 for their callers), and the
  server goes on with reduced capacity. Only when the last replica dies does the front end see ``CoreDead``.

Everything the replicas send arrives on their clients' reader threads; one re-entrant lock orders it, so the
merged ``num_taken`` only grows and the front end sees each replica's messages in order.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
from dataclasses import dataclass, field

from inferneo.config import EngineConfig
from inferneo.engine.core_client import CoreClient, MessageHandler
from inferneo.engine.dp_router import ReplicaRouter, RoutingDecision
from inferneo.engine.protocol import (
    AbortRequests,
    AddRequests,
    ControlCommand,
    ControlReply,
    CoreCommand,
    CoreDead,
    CoreInfo,
    CoreRequest,
    EngineSnapshot,
    FailureKind,
    RequestFailure,
    ResetPrefixCache,
    Shutdown,
    Sleep,
    StepOutputs,
    UpdateWeights,
    WakeUp,
)

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Sequence:
    """One sequence in flight: where it runs, the request (to send again if its replica dies before it starts)."""

    replica: int
    request: CoreRequest
    started: bool = False
    retried: bool = False


@dataclass(slots=True)
class _PendingCall:
    """A control command sent to every live replica: those yet to answer, and the replies so far."""

    waiting: set[int]
    replies: list[ControlReply] = field(default_factory=list)


def _merged_reply(replies: list[ControlReply]) -> ControlReply:
    """The replicas' replies to one command as one: done when every replica did it (a reset's ``value``: every
    cache is empty now); else the gravest refusal (a failure, then a refused command, then busy), saying how many
    replicas did apply it, since the replicas then differ until the command is sent again."""
    call_id, sleeping = replies[0].call_id, all(r.sleeping for r in replies)
    refused = [r for r in replies if not r.ok]
    if not refused:
        return ControlReply(call_id, True, value=all(r.value for r in replies), sleeping=sleeping)
    worst = next((r for r in refused if r.failed), None) or next((r for r in refused if not r.busy), refused[0])
    message = worst.message
    if len(refused) < len(replies):
        message += (f" ({len(replies) - len(refused)} of {len(replies)} data-parallel replicas applied it: they "
                    "differ until it is sent again)")
    return ControlReply(call_id, False, message=message, busy=worst.busy, sleeping=sleeping, failed=worst.failed)


@dataclass(slots=True)
class ReplicaState:
    """What the front end knows of one replica."""

    index: int
    client: CoreClient
    live: bool = True
    death: str | None = None  # why it left the rotation
    sent: int = 0  # sequences sent to it
    taken: int = 0  # sequences it has taken in (its num_taken)
    snapshot: EngineSnapshot = field(default_factory=EngineSnapshot)
    in_flight: set[str] = field(default_factory=set)  # core ids of its unfinished sequences
    routed: dict[str, int] = field(default_factory=dict)  # requests routed here, by routing reason


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """One replica as ``/health`` and ``/metrics`` show it."""

    index: int
    live: bool
    death: str | None
    in_flight: int
    snapshot: EngineSnapshot
    routed: dict[str, int]
    pid: int


class DataParallelCoreClient:
    """Several engine cores behind the one-core interface (see the module docstring).

    ``clients`` must be ready (their ``info`` known); ``policy`` is ``prefix``, ``round_robin`` or
    ``least_loaded``.
    """

    def __init__(self, clients: list[CoreClient], policy: str = "prefix", balance_threshold: int = 16) -> None:
        if not clients:
            raise ValueError("a data-parallel client needs at least one replica")
        self.replicas = [ReplicaState(i, c) for i, c in enumerate(clients)]
        self.info: CoreInfo = clients[0].info
        self.router = ReplicaRouter(len(clients), policy, self.info.block_size, self.info.num_blocks,
                                    balance_threshold=balance_threshold)
        self._lock = threading.RLock()
        self._sequences: dict[str, _Sequence] = {}
        self._front_sent = 0  # sequences the front end sent
        self._on_message: MessageHandler | None = None
        self._closing = False
        self._gone = 0  # replicas that stopped for good (dead or shut down)
        self._reported_end = False
        self._calls: dict[int, _PendingCall] = {}  # control commands some replica has not answered yet

    # ---- CoreClient --------------------------------------------------------------------------------------

    def start(self, on_message: MessageHandler) -> None:
        with self._lock:
            if self._on_message is not None:
                return
            self._on_message = on_message
        for replica in self.replicas:
            replica.client.start(functools.partial(self._on_replica_message, replica.index))

    def send(self, command: CoreCommand) -> None:
        with self._lock:
            if isinstance(command, AddRequests):
                self._front_sent += len(command.requests)
                self._add(command.requests)
            elif isinstance(command, AbortRequests):
                self._abort(command.request_ids)
            elif isinstance(command, Shutdown):
                for replica in self.replicas:
                    if replica.live:
                        replica.client.send(command)
            elif isinstance(command, ResetPrefixCache | UpdateWeights | Sleep | WakeUp):
                self._fan_out(command)
            else:
                raise TypeError(f"unknown core command {command!r}")

    def is_alive(self) -> bool:
        return any(r.live and r.client.is_alive() for r in self.replicas)

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._closing = True
        threads = [threading.Thread(target=r.client.close, args=(timeout,), daemon=True) for r in self.replicas]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout + 10)

    # ---- facts -------------------------------------------------------------------------------------------

    @property
    def num_replicas(self) -> int:
        return len(self.replicas)

    @property
    def num_live(self) -> int:
        return sum(1 for r in self.replicas if r.live and r.client.is_alive())

    def replica_status(self) -> list[ReplicaStatus]:
        """Each replica's state, for ``/health`` and per-replica metrics."""
        with self._lock:
            return [ReplicaStatus(r.index, r.live and r.client.is_alive(), r.death, len(r.in_flight), r.snapshot,
                                  dict(r.routed), r.client.info.pid) for r in self.replicas]

    # ---- routing -----------------------------------------------------------------------------------------

    def _add(self, requests: list[CoreRequest]) -> None:
        """Route sequences (those sharing a prompt and adapter together), then send each replica its share."""
        groups: dict[tuple, list[CoreRequest]] = {}
        for request in requests:
            key = (request.lora.lora_id if request.lora else 0, tuple(request.prompt_token_ids))
            groups.setdefault(key, []).append(request)
        batches: dict[int, list[CoreRequest]] = {}
        for (salt, _), group in groups.items():
            decision = self._route(group[0], salt)
            for request in group:
                self._sequences[request.request_id] = _Sequence(decision.replica, request)
            batches.setdefault(decision.replica, []).extend(group)
        for index, batch in batches.items():
            self._send_to(index, batch)

    def _route(self, request: CoreRequest, salt: int) -> RoutingDecision:
        live = [r.live for r in self.replicas]
        loads = [len(r.in_flight) for r in self.replicas]
        decision = self.router.route(request.prompt_token_ids, loads, live, salt)
        routed = self.replicas[decision.replica].routed
        routed[decision.reason] = routed.get(decision.reason, 0) + 1
        return decision

    def _send_to(self, index: int, batch: list[CoreRequest]) -> None:
        replica = self.replicas[index]
        replica.sent += len(batch)
        replica.in_flight.update(r.request_id for r in batch)
        replica.client.send(AddRequests(batch))

    def _abort(self, core_ids: list[str]) -> None:
        by_replica: dict[int, list[str]] = {}
        for core_id in core_ids:
            sequence = self._sequences.pop(core_id, None)
            if sequence is None:
                continue  # finished, failed or never seen: the core would ignore it too
            replica = self.replicas[sequence.replica]
            replica.in_flight.discard(core_id)
            if replica.live:
                by_replica.setdefault(sequence.replica, []).append(core_id)
        for index, ids in by_replica.items():
            self.replicas[index].client.send(AbortRequests(ids))

    # ---- messages from the replicas (their reader threads) ---------------------------------------------

    def _on_replica_message(self, index: int, message: StepOutputs | CoreDead | None) -> None:
        with self._lock:
            replica = self.replicas[index]
            if isinstance(message, StepOutputs):
                self._absorb(replica, message)
                merged = StepOutputs(message.outputs, message.failures, self._num_taken(),
                                     self._merged_snapshot() if message.snapshot is not None else None,
                                     replies=self._gather_replies(index, message.replies))
                self._forward(merged)
                return
            if not replica.live:
                return
            replica.live = False
            self._gone += 1
            if message is None and self._closing:
                if self._gone == len(self.replicas):
                    self._forward_end(None)
                return
            self._replica_died(replica, message.message if isinstance(message, CoreDead)
                               else "its core stopped unexpectedly")

    def _absorb(self, replica: ReplicaState, message: StepOutputs) -> None:
        replica.taken = message.num_taken
        if message.snapshot is not None:
            replica.snapshot = message.snapshot
        for output in message.outputs:
            sequence = self._sequences.get(output.request_id)
            if sequence is None or sequence.replica != replica.index:
                continue
            sequence.started = True
            if output.finished:
                del self._sequences[output.request_id]
                replica.in_flight.discard(output.request_id)
        for failure in message.failures:
            for core_id in failure.request_ids:
                sequence = self._sequences.get(core_id)
                if sequence is not None and sequence.replica == replica.index:
                    del self._sequences[core_id]
                    replica.in_flight.discard(core_id)

    # ---- control commands: every replica applies them --------------------------------------------------------

    def _fan_out(self, command: ControlCommand) -> None:
        """Send a control command to every live replica; their replies become one (``_gather_replies``). New
        weights and sleep are refused here, before any replica sees them, while sequences run anywhere: an idle
        replica would apply them while a busy one refuses, and the replicas would differ."""
        if isinstance(command, UpdateWeights | Sleep) and self._sequences:
            what = "new weights are loaded" if isinstance(command, UpdateWeights) else "the engine sleeps"
            reply = ControlReply(command.call_id, False, busy=True, sleeping=False,
                                 message=f"{len(self._sequences)} request(s) are unfinished; {what} only between "
                                         "requests: let them finish or abort them, then try again")
            self._forward(StepOutputs([], [], self._num_taken(), None, replies=[reply]))
            return
        live = [r for r in self.replicas if r.live]
        self._calls[command.call_id] = _PendingCall({r.index for r in live})
        for replica in live:
            if not isinstance(command, WakeUp):  # their prefix caches are emptied: nothing to route by
                self.router.forget(replica.index)
            replica.client.send(command)

    def _gather_replies(self, index: int, replies: list[ControlReply]) -> list[ControlReply]:
        """Replica ``index``'s replies taken in; the merged reply of each call every replica has now answered."""
        done = []
        for reply in replies:
            call = self._calls.get(reply.call_id)
            if call is None:
                continue
            call.waiting.discard(index)
            call.replies.append(reply)
            if not call.waiting:
                del self._calls[reply.call_id]
                done.append(_merged_reply(call.replies))
        return done

    def _replica_died(self, replica: ReplicaState, why: str) -> None:
        """Take a dead replica out of rotation; send its unstarted sequences elsewhere, fail the rest."""
        replica.death = why
        self.router.forget(replica.index)
        answered = []  # the calls it was the last to owe a reply to
        for call_id, call in list(self._calls.items()):
            call.waiting.discard(replica.index)
            if not call.waiting:
                del self._calls[call_id]
                if call.replies:
                    answered.append(_merged_reply(call.replies))
                else:
                    answered.append(ControlReply(call_id, False, failed=True,
                                                 message=f"data-parallel replica {replica.index} died before "
                                                         f"answering: {why}"))
        live = [r for r in self.replicas if r.live]
        logger.error("data-parallel replica %d has died (%s); %d of %d replicas serve on", replica.index, why,
                     len(live), len(self.replicas))
        orphans = [self._sequences.pop(core_id) for core_id in sorted(replica.in_flight)
                   if core_id in self._sequences]
        replica.in_flight.clear()
        failed: list[str] = []
        again: list[CoreRequest] = []
        for sequence in orphans:
            if live and not sequence.started and not sequence.retried:
                again.append(sequence.request)
            else:
                failed.append(sequence.request.request_id)
        for request in again:
            salt = request.lora.lora_id if request.lora else 0
            decision = self._route(request, salt)
            self._sequences[request.request_id] = _Sequence(decision.replica, request, retried=True)
            self._send_to(decision.replica, [request])
        if again:
            logger.warning("sent %d not-yet-started sequences of replica %d to other replicas", len(again),
                           replica.index)
        failures = [RequestFailure(failed, FailureKind.FAILED,
                                   f"data-parallel replica {replica.index} died while running this request: "
                                   f"{why}")] if failed else []
        self._forward(StepOutputs([], failures, self._num_taken(), self._merged_snapshot(), replies=answered))
        if not live:
            self._forward_end(CoreDead(f"every data-parallel replica has died; the last: {why}"))

    def _num_taken(self) -> int:
        """Sequences sent by the front end minus those still on their way to a live replica."""
        in_transit = sum(max(0, r.sent - r.taken) for r in self.replicas if r.live)
        return self._front_sent - in_transit

    def _merged_snapshot(self) -> EngineSnapshot:
        """Counters summed over every replica, gauges over the live ones, KV usage averaged over the live."""
        snaps = [r.snapshot for r in self.replicas]
        live = [r.snapshot for r in self.replicas if r.live]
        histogram: dict[int, int] = {}
        for snap in snaps:
            for size, count in snap.batch_size_histogram.items():
                histogram[size] = histogram.get(size, 0) + count
        return EngineSnapshot(
            num_running=sum(s.num_running for s in live),
            num_waiting=sum(s.num_waiting for s in live),
            kv_usage=sum(s.kv_usage for s in live) / len(live) if live else 0.0,
            prefix_cache_queries=sum(s.prefix_cache_queries for s in snaps),
            prefix_cache_hits=sum(s.prefix_cache_hits for s in snaps),
            num_preemptions=sum(s.num_preemptions for s in snaps),
            num_prompt_tokens=sum(s.num_prompt_tokens for s in snaps),
            num_generation_tokens=sum(s.num_generation_tokens for s in snaps),
            num_steps=sum(s.num_steps for s in snaps),
            max_batch_size=max(s.max_batch_size for s in snaps),
            batch_size_histogram=histogram,
            num_draft_tokens=sum(s.num_draft_tokens for s in snaps),
            num_accepted_tokens=sum(s.num_accepted_tokens for s in snaps))

    def _forward(self, message: StepOutputs) -> None:
        if self._on_message is not None and not self._reported_end:
            self._on_message(message)

    def _forward_end(self, message: CoreDead | None) -> None:
        if self._on_message is not None and not self._reported_end:
            self._reported_end = True
            self._on_message(message)


# ---- building the replicas -----------------------------------------------------------------------------------


def replica_config(config: EngineConfig) -> EngineConfig:
    """The configuration of one replica: the same engine, without the data-parallel options."""
    return dataclasses.replace(config, data_parallel_size=1, data_parallel_backend="mp",
                               data_parallel_routing="prefix")


def replica_device_environments(config: EngineConfig, visible: str | None = None) -> list[dict[str, str]]:
    """Per replica, the environment that gives it its own GPUs (``CUDA_VISIBLE_DEVICES``); empty on CPU.

    Replica ``i`` of tensor-parallel size ``t`` gets the ``i``-th run of ``t`` visible devices."""
    size, tp = config.data_parallel_size, config.tensor_parallel_size
    if config.torch_device.type != "cuda":
        return [{} for _ in range(size)]
    if config.device.startswith("cuda:"):
        raise ValueError(f"device {config.device!r} names one GPU; data-parallel replicas each take their own: "
                         "use device 'cuda' (or 'auto') and CUDA_VISIBLE_DEVICES to choose the GPUs")
    import torch

    visible = visible if visible is not None else os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = ([d.strip() for d in visible.split(",") if d.strip()] if visible
               else [str(i) for i in range(torch.cuda.device_count())])
    if len(devices) < size * tp:
        raise ValueError(f"data_parallel_size {size} x tensor_parallel_size {tp} needs {size * tp} GPUs; "
                         f"{len(devices)} are visible")
    return [{"CUDA_VISIBLE_DEVICES": ",".join(devices[i * tp:(i + 1) * tp])} for i in range(size)]


def start_process_replicas(config: EngineConfig, max_consecutive_step_failures: int = 3) -> list[CoreClient]:
    """Start ``config.data_parallel_size`` engine cores in child processes (all loading at once); wait for all."""
    from inferneo.engine.core_client import ProcessCoreClient

    one = replica_config(config)
    clients: list = []
    try:
        for environment in replica_device_environments(config):
            clients.append(ProcessCoreClient(one, max_consecutive_step_failures, extra_env=environment))
        for client in clients:
            client.wait_ready()
    except BaseException:
        for client in clients:
            client.close()
        raise
    return clients


def start_replicas(config: EngineConfig, max_consecutive_step_failures: int = 3) -> DataParallelCoreClient:
    """The replicas ``config`` asks for (``data_parallel_backend`` mp or ray), ready, behind one client."""
    if config.data_parallel_backend == "ray":
        from inferneo.engine.ray_core_client import start_ray_replicas

        clients = start_ray_replicas(config, max_consecutive_step_failures)
    else:
        clients = start_process_replicas(config, max_consecutive_step_failures)
    return DataParallelCoreClient(clients, config.data_parallel_routing)
