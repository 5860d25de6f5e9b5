"""Kernel timelines from ``torch.profiler`` traces, CUDA-graph replays included: per kernel its duration and the
time it adds to the end of the stream (the critical path).

Under programmatic dependent launch a kernel starts while its predecessor still runs and waits inside, so its own
duration counts that wait too; what it costs the step is how far it moves the latest end seen so far
(``added_us``: ``max(0, end - max(earlier ends))`` in start order). The sum of ``added_us`` over a replay is the
replay's device time less the idle gaps; ``gap_us`` counts those gaps (a kernel starting after everything before it
has ended).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def kernel_events(prof) -> list[dict]:
    """The device kernels (and memcpy/memset) of a finished ``torch.profiler.profile``, by start time:
    ``{"name", "ts", "dur"}`` in microseconds."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"
              and str(e.get("cat", "")).lower() in ("kernel", "gpu_memcpy", "gpu_memset")]
    events = [{"name": e["name"], "ts": float(e["ts"]), "dur": float(e.get("dur", 0.0))} for e in events]
    return sorted(events, key=lambda e: e["ts"])


def critical_path(events: list[dict]) -> list[dict]:
    """Each event with ``added_us`` (how far it moves the latest end) and ``gap_us`` (idle time before it)."""
    latest = None
    out = []
    for e in events:
        end = e["ts"] + e["dur"]
        if latest is None:
            added, gap = e["dur"], 0.0
        else:
            added = max(0.0, end - max(latest, e["ts"])) if e["ts"] > latest else max(0.0, end - latest)
            gap = max(0.0, e["ts"] - latest)
        latest = end if latest is None else max(latest, end)
        out.append({**e, "added_us": added, "gap_us": gap})
    return out


def short_name(name: str) -> str:
    return name.split("(")[0].split("<")[0].replace("void ", "").strip()[:60]


def by_slot(events: list[dict], per_group: int) -> list[dict]:
    """Events grouped by their position in a repeating group of ``per_group`` launches (a layer): per slot its
    name (with ``#i`` for the i-th kernel of that name in the group), calls, mean duration, mean added time and
    mean gap, in microseconds."""
    if not events or per_group <= 0:
        return []
    rows = []
    names = [short_name(e["name"]) for e in events[:per_group]]
    for slot in range(per_group):
        mine = events[slot::per_group]
        nth = names[:slot].count(names[slot])
        label = names[slot] + (f"#{nth}" if names.count(names[slot]) > 1 else "")
        n = len(mine)
        rows.append({"slot": slot, "kernel": label, "calls": n,
                     "dur_us": sum(e["dur"] for e in mine) / n, "added_us": sum(e["added_us"] for e in mine) / n,
                     "gap_us": sum(e["gap_us"] for e in mine) / n,
                     "same_name": all(short_name(e["name"]) == names[slot] for e in mine)})
    return rows


def by_name(events: list[dict], per: float) -> list[dict]:
    """Events summed by kernel name, per ``per`` (e.g. the number of steps): calls, duration, added time, gaps."""
    table: dict[str, dict] = {}
    for e in events:
        row = table.setdefault(short_name(e["name"]), {"kernel": short_name(e["name"]), "calls": 0, "dur_us": 0.0,
                                                       "added_us": 0.0, "gap_us": 0.0})
        row["calls"] += 1
        row["dur_us"] += e["dur"]
        row["added_us"] += e["added_us"]
        row["gap_us"] += e["gap_us"]
    rows = [{k: (v / per if k != "kernel" else v) for k, v in r.items()} for r in table.values()]
    return sorted(rows, key=lambda r: -r["added_us"])
