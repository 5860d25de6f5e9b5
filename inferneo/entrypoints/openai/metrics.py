"""Prometheus metrics at ``/metrics``, all named ``inferneo:...`` (and, with ``--vllm-metric-names``, each also as
``vllm:...``, the name vLLM gives the same measure, so that dashboards, alerts and autoscalers written for vLLM read
them unchanged).

Engine counters (requests running and waiting, KV usage, prefix cache, preemptions, tokens, batch sizes) are read
from the snapshot the engine publishes after each step; request latencies (time to first token, inter-token,
end-to-end) are observed by the front end as each step's outputs come out. Each server has its own registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from inferneo.engine.async_engine import AsyncEngine
from inferneo.entrypoints.openai.replicas import replica_client, replica_metric_families

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                5.0, 10.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                240.0, 480.0, 960.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    """The registry of one server and the request observer the engine reports to."""

    def __init__(self, engine: AsyncEngine, model_name: str, vllm_names: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        self.ttft = Histogram("inferneo:time_to_first_token_seconds", "Time from arrival to the first token.",
                              labels, buckets=_TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.itl = Histogram("inferneo:inter_token_latency_seconds", "Time between consecutive outputs of a request.",
                             labels, buckets=_ITL_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram("inferneo:e2e_request_latency_seconds", "Time from arrival to the end of a request.",
                             labels, buckets=_E2E_BUCKETS, registry=self.registry).labels(model_name)
        self._finished = Counter("inferneo:request_success", "Requests ended, by finish reason.",
                                 ["model_name", "finished_reason"], registry=self.registry)
        self._model_name = model_name
        self.registry.register(_EngineCollector(engine, model_name))
        self._exposed = self.registry
        if vllm_names:  # every family twice: as it is, and renamed vllm:...
            self._exposed = CollectorRegistry(auto_describe=False)
            self._exposed.register(_Renamed(self.registry, OWN_PREFIX, VLLM_PREFIX))

    # RequestObserver, called from the engine's thread (prometheus_client metrics are thread-safe).
    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_next_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def on_finished(self, seconds: float, finish_reason: str) -> None:
        self.e2e.observe(seconds)
        self._finished.labels(self._model_name, finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self._exposed)


OWN_PREFIX = "inferneo:"
VLLM_PREFIX = "vllm:"


class _Renamed:
    """Yields every family of ``registry`` as it is and once more with the name prefix ``old`` replaced by ``new``
    (the samples' names too: ``_total``, ``_bucket``, ... keep their suffixes)."""

    def __init__(self, registry: CollectorRegistry, old: str, new: str) -> None:
        self.registry, self.old, self.new = registry, old, new

    def collect(self):
        for family in self.registry.collect():
            yield family
            if not family.name.startswith(self.old):
                continue
            copy = Metric(self.new + family.name.removeprefix(self.old), family.documentation, family.type,
                          family.unit)
            copy.samples = [sample._replace(name=self.new + sample.name.removeprefix(self.old))
                            for sample in family.samples]
            yield copy


class _EngineCollector:
    """Turns the engine's published snapshot into metric families at scrape time."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def describe(self):
        return []

    def collect(self):
        snap = self.engine.snapshot
        labels = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"inferneo:{name}", doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(f"inferneo:{name}", doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        yield gauge("num_requests_running", "Sequences in the running batch.", snap.num_running)
        yield gauge("num_requests_waiting", "Sequences waiting for a batch slot.", snap.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV cache blocks held by requests (0 to 1).", snap.kv_usage)
        yield gauge("engine_healthy", "1 while the engine serves requests, 0 once it cannot.",
                    1.0 if self.engine.is_healthy else 0.0)
        yield gauge("max_batch_size", "Largest number of sequences run in one engine step so far.",
                    snap.max_batch_size)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      snap.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", snap.prefix_cache_hits)
        yield counter("num_preemptions", "Requests preempted (their KV blocks freed for recompute).",
                      snap.num_preemptions)
        yield counter("prompt_tokens", "Prompt tokens taken by the engine.", snap.num_prompt_tokens)
        yield counter("generation_tokens", "Tokens generated.", snap.num_generation_tokens)
        yield counter("engine_steps", "Engine steps run.", snap.num_steps)
        yield counter("spec_decode_num_draft_tokens", "Draft tokens verified (speculative decoding).",
                      snap.num_draft_tokens)
        yield counter("spec_decode_num_accepted_tokens", "Draft tokens the model confirmed and kept.",
                      snap.num_accepted_tokens)
        yield _batch_histogram(snap.batch_size_histogram, labels)
        replicas = replica_client(self.engine)
        if replicas is not None:
            yield from replica_metric_families(replicas, self.model_name)


def _batch_histogram(counts: dict[int, int], labels: list[str]) -> HistogramMetricFamily:
    """Sequences per engine step, as a Prometheus histogram built from the engine's exact counts."""
    buckets = []
    for bound in _BATCH_BUCKETS:
        buckets.append((str(float(bound)), sum(c for size, c in counts.items() if size <= bound)))
    buckets.append(("+Inf", sum(counts.values())))
    family = HistogramMetricFamily("inferneo:iteration_batch_size", "Sequences per engine step.",
                                   labels=["model_name"])
    family.add_metric(labels, buckets, sum_value=float(sum(size * c for size, c in counts.items())))
    return family
