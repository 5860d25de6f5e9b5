"""``inferneo serve --vllm-metric-names``: ``/metrics`` gives every metric twice, as ``inferneo:...`` and under the
name vLLM gives the same measure (``vllm:...``), with the same samples, labels and values, in a valid Prometheus
exposition; without the flag, no ``vllm:`` name is there."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inferneo.testing.server import RemoteServer

# names dashboards and autoscalers written for vLLM read (vLLM's V1 metric names)
VLLM_NAMES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
              "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
              "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
              "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_count",
              "vllm:e2e_request_latency_seconds_sum", "vllm:request_success_total")


def _samples(base_url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.parametrize("flag", [True, False])
def test_metrics_under_vllms_names(tiny_llama_dir, flag):
    flags = ["--vllm-metric-names"] if flag else []
    with RemoteServer(tiny_llama_dir, "--served-model-name", "tiny", "--kv-cache-memory", "16MiB", "--num-threads",
                      "1", "--disable-access-log", *flags) as server:
        r = httpx.post(server.base_url + "/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": "hello", "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200
        samples = _samples(server.base_url)
    own = {key: value for key, value in samples.items() if key[0].startswith("inferneo:")}
    theirs = {key: value for key, value in samples.items() if key[0].startswith("vllm:")}
    assert own and set(samples) == set(own) | set(theirs)
    if not flag:
        assert not theirs
        return
    renamed = {("vllm:" + name.removeprefix("inferneo:"), labels): value for (name, labels), value in own.items()}
    assert theirs == renamed
    names = {name for name, _ in theirs}
    assert set(VLLM_NAMES) <= names, sorted(set(VLLM_NAMES) - names)
    finished = {labels: v for (name, labels), v in theirs.items() if name == "vllm:request_success_total"}
    assert finished[(("finished_reason", "length"), ("model_name", "tiny"))] == 1
    assert theirs[("vllm:generation_tokens_total", (("model_name", "tiny"),))] == 4
