"""What a full garbage collection costs a loaded front end, before and after its start-up objects are frozen.

Builds the server app and engine as ``inferneo batch`` and a Ray engine replica do (``InProcessServer``, the core in
a child process) with ``INFERNEO_GC_FREEZE=0``, counts the objects the collector tracks, times ``gc.collect()``
``--repeats`` times, then freezes them as ``inferneo/startup_heap.py`` does and times the collections again.
Prints one JSON line.

    python3 benchmarks/startup_heap_gc.py [--model small-llama] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offline_throughput import host_info  # noqa: E402
from ray_processor_overhead import resolve_model  # noqa: E402


def timed_collections(repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        gc.collect()
        times.append(round(time.perf_counter() - start, 4))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="a model path, or 'small-llama' / 'tiny' (built here); default: the bundled model")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    os.environ["INFERNEO_GC_FREEZE"] = "0"  # the freeze is done below, by hand, between the two timings
    from inferneo.batch.in_process import InProcessServer

    server = InProcessServer(resolve_model(args.model, Path(tempfile.mkdtemp())), None, core_in_child_process=True,
                             num_threads=1)
    try:
        tracked = len(gc.get_objects())
        before = timed_collections(args.repeats)
        gc.freeze()
        after = timed_collections(args.repeats)
        print(json.dumps({"benchmark": "startup_heap_gc", "model": args.model or "default", "tracked_objects": tracked,
                          "frozen": gc.get_freeze_count(), "full_collection_s": before,
                          "after_freeze_s": after, "host": host_info()}))
    finally:
        server.shutdown()


if __name__ == "__main__":
    main()
