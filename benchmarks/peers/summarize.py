"""Print a table of the result lines that benchmarks/offline_throughput.py appended to a JSON-lines file.

python benchmarks/peers/summarize.py scratch/offline_throughput.jsonl
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    header = (
        f"{'engine':9} {'dtype':9} {'hf_bs':>5} {'requests':>8} {'out tok/s':>10} {'total tok/s':>11} "
        f"{'elapsed s':>9} {'load':>5}  {'workload':16}  date"
    )
    print(header)
    for r in rows:
        load = (r.get("host", {}).get("loadavg_start") or [float("nan")])[0]
        print(
            f"{r['engine']:9} {r['dtype']:9} {r.get('hf_batch_size') or '':>5} {r['num_requests']:>8} "
            f"{r['output_tok_per_s']:>10.1f} {r['total_tok_per_s']:>11.1f} {r['elapsed_s']:>9.1f} "
            f"{load:>5.2f}  {r['workload_sha256']:16}  {r['date']}"
        )
    if len({r["workload_sha256"] for r in rows}) > 1:
        print("note: the file mixes different workloads (see the workload column)")


if __name__ == "__main__":
    main()
