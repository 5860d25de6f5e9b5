"""The server's periodic engine-statistics log line (vLLM's, which ``--disable-log-stats`` turns off).

Every ``interval`` seconds while the engine has work (requests running or waiting, or tokens computed since the
last line), one line says the prompt and generation throughput over the interval, the requests running and
waiting, the KV cache in use and the prefix cache's hit rate over the interval. An idle server logs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time

from inferneo.engine.protocol import EngineSnapshot

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 10.0


def stats_line(previous: EngineSnapshot, current: EngineSnapshot, seconds: float) -> str | None:
    """The log line for the interval of ``seconds`` between two snapshots, or None when the engine was idle."""
    prompt = current.num_prompt_tokens - previous.num_prompt_tokens
    generated = current.num_generation_tokens - previous.num_generation_tokens
    if not (prompt or generated or current.num_running or current.num_waiting):
        return None
    queries = current.prefix_cache_queries - previous.prefix_cache_queries
    hits = current.prefix_cache_hits - previous.prefix_cache_hits
    seconds = max(seconds, 1e-9)
    line = (f"prompt throughput {prompt / seconds:.1f} tokens/s, generation throughput {generated / seconds:.1f} "
            f"tokens/s, running {current.num_running} reqs, waiting {current.num_waiting} reqs, KV cache usage "
            f"{100 * current.kv_usage:.1f}%, prefix cache hit rate "
            + (f"{100 * hits / queries:.1f}%" if queries else "-"))
    preempted = current.num_preemptions - previous.num_preemptions
    if preempted:
        line += f", {preempted} preempted"
    return line


async def log_stats_forever(engine, interval: float = DEFAULT_INTERVAL_S) -> None:
    """Log ``stats_line`` for ``engine`` (anything with a ``snapshot``) every ``interval`` seconds until
    cancelled."""
    previous, since = engine.snapshot, time.monotonic()
    while True:
        await asyncio.sleep(interval)
        current, now = engine.snapshot, time.monotonic()
        line = stats_line(previous, current, now - since)
        if line is not None:
            logger.info("%s", line)
        previous, since = current, now
