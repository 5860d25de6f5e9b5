"""Summary of a serving-suite result file: every run, then medians per server and scenario, and the ratios the
server-overhead issue asks about (each server's online (b) throughput against its offline figure on the same
requests, Inferneo against vLLM on each figure).

    python benchmarks/peers/serving_summary.py RESULTS.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict


def load(path: str) -> tuple[dict, dict]:
    online: dict[tuple[str, str], list[dict]] = defaultdict(list)
    offline: dict[str, list[float]] = defaultdict(list)
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for row in rows:
        if row.get("benchmark") == "serving":
            online[(row["label"], row["scenario"])].append(row)
        elif row.get("engine"):
            offline[row["engine"]].append(row["output_tok_per_s"])
    return online, offline


def median_of(rows: list[dict], key: str, sub: str | None = None) -> float | None:
    values = [(r[key] or {}).get(sub) if sub else r[key] for r in rows]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> None:
    online, offline = load(sys.argv[1])
    figures: dict[tuple[str, str], dict[str, float | None]] = {}
    for (label, scenario), rows in sorted(online.items()):
        figures[(label, scenario)] = fig = {
            "req/s": median_of(rows, "requests_per_s"), "out tok/s": median_of(rows, "output_tok_per_s"),
            "TTFT mean ms": median_of(rows, "ttft_s", "mean"), "TTFT p99 ms": median_of(rows, "ttft_s", "p99"),
            "TPOT mean ms": median_of(rows, "tpot_s", "mean"), "TPOT p99 ms": median_of(rows, "tpot_s", "p99"),
        }
        runs = ", ".join(f"{r['requests_per_s']:.1f} req/s {r['output_tok_per_s']:.1f} tok/s" for r in rows)
        print(f"{label} ({scenario}), {len(rows)} runs: {runs}")
        shown = {k: (round(v * 1e3, 1) if "ms" in k else round(v, 1)) for k, v in fig.items() if v is not None}
        print(f"    median: {shown}")
    for engine, values in sorted(offline.items()):
        print(f"{engine} offline (b): {', '.join(f'{v:.1f}' for v in values)} tok/s")
    for engine, label in (("inferneo", "inferneo-serve"), ("vllm", "vllm-serve")):
        fig = figures.get((label, "b"))
        if fig and offline.get(engine):
            ratio = fig["out tok/s"] / statistics.median(offline[engine])
            print(f"{engine}: online (b) median / offline median = {ratio:.3f}")
    ours, theirs = figures.get(("inferneo-serve", "a")), figures.get(("vllm-serve", "a"))
    if ours and theirs:
        print(f"(a) req/s, Inferneo / vLLM (medians): {ours['req/s'] / theirs['req/s']:.3f}")
    ours, theirs = figures.get(("inferneo-serve", "b")), figures.get(("vllm-serve", "b"))
    if ours and theirs:
        for key in ("out tok/s", "TTFT mean ms", "TTFT p99 ms", "TPOT mean ms", "TPOT p99 ms"):
            if ours[key] and theirs[key]:
                better = "higher" if key == "out tok/s" else "lower"
                print(f"(b) {key}, Inferneo / vLLM (medians): {ours[key] / theirs[key]:.3f} ({better} is better)")


if __name__ == "__main__":
    main()
