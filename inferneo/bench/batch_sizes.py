"""Finding the best batch size: the same prompts sent as ``/v1/completions`` calls of N prompts each, for each
N, one call at a time; requests per second, output tokens per second and mean latency per request for each N.

A request's latency is the duration of the call that carried it (every prompt of a batch waits for the whole
batch), so the mean latency is the call durations weighted by their sizes. The best batch size is the one with
the most requests per second.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from inferneo.bench.stats import format_table
from inferneo.client._base import error_message


def run_batch_sizes(base_url: str, model: str, prompts: list[str | list[int]], batch_sizes: list[int],
                    max_tokens: int = 100, temperature: float = 0.7, ignore_eos: bool = False,
                    api_key: str | None = None, timeout: float = 600.0) -> dict[str, Any]:
    """Measure each batch size; returns ``{"results": [one dict per size], "optimal_batch_size": N}``."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results = []
    with httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout) as http:
        def call(batch: list[str | list[int]]) -> tuple[float, int, str | None]:
            body: dict[str, Any] = {"model": model, "prompt": batch, "max_tokens": max_tokens,
                                    "temperature": temperature}
            if ignore_eos:
                body["ignore_eos"] = True
            start = time.perf_counter()
            response = http.post("/v1/completions", json=body)
            elapsed = time.perf_counter() - start
            if response.status_code != 200:
                return elapsed, 0, f"HTTP {response.status_code}: {error_message(response.text, 200)}"
            return elapsed, response.json()["usage"]["completion_tokens"], None

        _, _, error = call(prompts[:1])
        if error:
            raise RuntimeError(f"the warm-up request failed: {error}")
        for size in batch_sizes:
            total_time = weighted_latency = 0.0
            done = failed = tokens = 0
            errors: list[str] = []
            for i in range(0, len(prompts), size):
                batch = prompts[i:i + size]
                elapsed, n_tokens, error = call(batch)
                if error:
                    failed += len(batch)
                    errors.append(error)
                    continue
                total_time += elapsed
                weighted_latency += elapsed * len(batch)
                done += len(batch)
                tokens += n_tokens
            results.append({
                "batch_size": size, "requests": done, "failed_requests": failed, "total_time_s": total_time,
                "requests_per_s": done / total_time if total_time else 0.0,
                "output_tokens": tokens, "output_tokens_per_s": tokens / total_time if total_time else 0.0,
                "mean_latency_s": weighted_latency / done if done else None,
                "errors": sorted(set(errors))[:5],
            })
    measured = [r for r in results if r["requests"]]
    optimal = max(measured, key=lambda r: r["requests_per_s"])["batch_size"] if measured else None
    return {"results": results, "optimal_batch_size": optimal}


def format_report(result: dict[str, Any]) -> str:
    """The table of results and the best batch size."""
    rows = [[r["batch_size"], r["requests"], r["failed_requests"], r["requests_per_s"], r["output_tokens_per_s"],
             r["mean_latency_s"]] for r in result["results"]]
    table = format_table(["batch size", "requests", "failed", "requests/s", "output tok/s", "mean latency (s)"],
                         rows)
    report = f"{table}\n\nOptimal batch size: {result['optimal_batch_size']}"
    failures = [f"  batch size {r['batch_size']}: {error}" for r in result["results"] for error in r["errors"]]
    if failures:
        report += "\n\nFailed calls (the first distinct errors of each size):\n" + "\n".join(failures)
    if result["optimal_batch_size"] is None:
        report += "\n(no batch size had a call that succeeded: see the errors above)"
    return report



def plot(result: dict[str, Any], path: str | Path) -> None:
    """A PNG with throughput and mean latency against batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["results"] if r["requests"]]
    sizes = [r["batch_size"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    left.plot(sizes, [r["requests_per_s"] for r in rows], "o-", color="tab:blue", label="requests/s")
    left.set_xlabel("batch size")
    left.set_ylabel("requests per second")
    left.set_title("Throughput vs batch size")
    tokens = left.twinx()
    tokens.plot(sizes, [r["output_tokens_per_s"] for r in rows], "s--", color="tab:green", label="output tok/s")
    tokens.set_ylabel("output tokens per second")
    right.plot(sizes, [r["mean_latency_s"] for r in rows], "o-", color="tab:red")
    right.set_xlabel("batch size")
    right.set_ylabel("mean latency per request (s)")
    right.set_title("Latency vs batch size")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.grid(True, alpha=0.4)
    best = result.get("optimal_batch_size")
    if best is not None:
        left.axvline(best, color="gray", linestyle=":", label=f"best: {best}")
    handles = left.get_legend_handles_labels()[0] + tokens.get_legend_handles_labels()[0]
    left.legend(handles=handles, loc="best")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
