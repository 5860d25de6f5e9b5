"""What ``/health`` and ``/metrics`` say about data-parallel replicas (``inferneo serve --data-parallel-size N``).

``/health`` stays 200 while at least one replica serves and then carries the capacity as JSON:
``{"status": "ok" | "degraded", "replicas": N, "live_replicas": k, "replica_states": [...]}``; a server with one
engine keeps its empty 200. ``/metrics`` adds per-replica families labelled ``replica="i"``.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from inferneo.engine.data_parallel import DataParallelCoreClient


def replica_client(engine) -> DataParallelCoreClient | None:
    """The engine's data-parallel client, or None for a single engine."""
    client = getattr(engine, "client", None)
    return client if isinstance(client, DataParallelCoreClient) else None


def health_body(client: DataParallelCoreClient) -> dict[str, Any]:
    """The capacity ``/health`` reports for replicas (see the module docstring)."""
    states = client.replica_status()
    live = sum(1 for s in states if s.live)
    return {
        "status": "ok" if live == len(states) else "degraded",
        "replicas": len(states),
        "live_replicas": live,
        "replica_states": [{"replica": s.index, "live": s.live, "in_flight": s.in_flight, "pid": s.pid,
                            **({"error": s.death} if s.death else {})} for s in states],
    }


def replica_metric_families(client: DataParallelCoreClient, model_name: str):
    """Per-replica gauges and counters (the server-wide families already sum the replicas)."""
    labels = ["model_name", "replica"]
    states = client.replica_status()

    def family(kind, name: str, doc: str, value_of) -> Any:
        metric = kind(f"inferneo:replica_{name}", doc, labels=labels)
        for s in states:
            metric.add_metric([model_name, str(s.index)], value_of(s))
        return metric

    yield family(GaugeMetricFamily, "live", "1 while the replica is in rotation, 0 once it has died.",
                 lambda s: 1.0 if s.live else 0.0)
    yield family(GaugeMetricFamily, "in_flight", "Sequences routed to the replica and not finished.",
                 lambda s: s.in_flight)
    yield family(GaugeMetricFamily, "num_requests_running", "Sequences in the replica's running batch.",
                 lambda s: s.snapshot.num_running)
    yield family(GaugeMetricFamily, "num_requests_waiting", "Sequences waiting in the replica.",
                 lambda s: s.snapshot.num_waiting)
    yield family(GaugeMetricFamily, "kv_cache_usage_perc", "Fraction of the replica's KV blocks in use.",
                 lambda s: s.snapshot.kv_usage)
    yield family(CounterMetricFamily, "prefix_cache_queries", "Prompt tokens the replica looked up.",
                 lambda s: s.snapshot.prefix_cache_queries)
    yield family(CounterMetricFamily, "prefix_cache_hits", "Prompt tokens the replica found cached.",
                 lambda s: s.snapshot.prefix_cache_hits)
    yield family(CounterMetricFamily, "generation_tokens", "Tokens the replica generated.",
                 lambda s: s.snapshot.num_generation_tokens)
    routed = CounterMetricFamily("inferneo:replica_routed_requests", "Prompts routed to the replica, by why.",
                                 labels=[*labels, "reason"])
    for s in states:
        for reason, count in sorted(s.routed.items()):
            routed.add_metric([model_name, str(s.index), reason], count)
    yield routed
