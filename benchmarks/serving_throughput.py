"""Online serving benchmark: many concurrent streamed requests against an OpenAI-compatible server.

Works against any server that speaks ``/v1/completions`` with token-id prompts and vLLM's ``min_tokens`` /
``ignore_eos`` extensions (Inferneo and vLLM both do). The workload is built exactly as in
``offline_throughput.py`` (same flags, same ``workload_sha256``), so online and offline figures can be compared
request for request. Start the server first, then::

    python benchmarks/serving_throughput.py --base-url http://127.0.0.1:8000 --scenario a   # 256 x max_tokens=1
    python benchmarks/serving_throughput.py --base-url http://127.0.0.1:8000 --scenario b   # 128 x 64 in, 64 out

Each request streams (``stream_options.include_usage``); time to first token (TTFT) is when the first chunk
with text arrives, time per output token (TPOT) is ``(end - first token) / (output tokens - 1)``. Before timing,
two tiny warm-up requests run. One JSON line of results is printed and, with ``--out``, appended to a file.

The client is aiohttp (as in vLLM's serving benchmark), not httpx: on a machine of two cores the client's CPU time
is taken from the server under test, and aiohttp's C parser reads a stream of server-sent events for about 40% of
httpx's CPU time (0.36 s against 0.83-0.97 s for workload (b) here).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import sys
import time

import aiohttp
import httpx
from offline_throughput import (
    DEFAULT_VOCAB_SIZE,
    WARMUP_OUTPUT_LEN,
    WARMUP_PROMPTS,
    emit_json,
    host_info,
    loadavg,
    make_workload,
    parse_range,
    workload_digest,
)

SCENARIOS = {
    # (a) request overhead: tiny requests, one output token each
    "a": {"num_requests": 256, "prompt_len": (16, 16), "output_len": (1, 1), "concurrency": 64},
    # (b) steady generation: 64 prompt and 64 output tokens each
    "b": {"num_requests": 128, "prompt_len": (64, 64), "output_len": (64, 64), "concurrency": 64},
}


async def one_request(http: aiohttp.ClientSession, url: str, model: str, prompt: list[int],
                      output_len: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "min_tokens": output_len,
            "ignore_eos": True, "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    tokens = None
    error = None
    async with http.post(url, json=body) as r:
        if r.status != 200:
            return {"error": f"HTTP {r.status}: {(await r.read())[:200]!r}"}
        async for raw in r.content:  # one line at a time
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"].get("message")
            elif chunk.get("choices") and first is None and chunk["choices"][0].get("text"):
                first = time.perf_counter()
            elif chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    first = first or end
    return {"ttft": first - start, "e2e": end - start, "tokens": tokens or 0, "start": start, "end": end,
            "error": error, "tpot": (end - first) / (tokens - 1) if tokens and tokens > 1 else None}


async def run(args, prompts: list[list[int]], output_lens: list[int]) -> tuple[float, list[dict]]:
    url = args.base_url.rstrip("/") + "/v1/completions"
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as http:
        await asyncio.gather(*(one_request(http, url, args.model, p, WARMUP_OUTPUT_LEN) for p in WARMUP_PROMPTS))
        gate = asyncio.Semaphore(args.concurrency)

        async def limited(p, n):
            async with gate:
                return await one_request(http, url, args.model, p, n)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(p, n) for p, n in zip(prompts, output_lens, strict=True)))
    return start, results


def summarize(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    ordered = sorted(values)
    return {"mean": statistics.fmean(ordered), "p50": ordered[len(ordered) // 2],
            "p99": ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default=None,
                        help="preset workload; explicit flags below override it")
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--prompt-len", type=parse_range, default=None)
    parser.add_argument("--output-len", type=parse_range, default=None)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--label", default=None, help="free text recorded with the result (e.g. the server)")
    parser.add_argument("--out", default=None, help="append the JSON result line to this file")
    parser.add_argument("--per-request", default=None,
                        help="write one JSON line per request (send time, TTFT, end, tokens; seconds from the start)")
    args = parser.parse_args()
    preset = SCENARIOS.get(args.scenario, SCENARIOS["b"])
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model is None:
        args.model = httpx.get(args.base_url.rstrip("/") + "/v1/models", timeout=30).json()["data"][0]["id"]

    prompts, output_lens = make_workload(args.num_requests, args.prompt_len, args.output_len, args.seed,
                                         args.vocab_size)
    load_start = loadavg()
    cpu_start = time.process_time()
    start, results = asyncio.run(run(args, prompts, output_lens))
    client_cpu_s = time.process_time() - cpu_start  # on a small machine the client competes with the server
    ok = [r for r in results if not r.get("error")]
    elapsed = max(r["end"] for r in ok) - start if ok else float("nan")
    out_tokens = sum(r["tokens"] for r in ok)
    result = {
        "benchmark": "serving", "scenario": args.scenario, "base_url": args.base_url, "model": args.model,
        "num_requests": args.num_requests, "concurrency": args.concurrency,
        "prompt_len": list(args.prompt_len), "output_len": list(args.output_len), "seed": args.seed,
        "vocab_size": args.vocab_size, "workload_sha256": workload_digest(prompts, output_lens),
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if r.get("error")})[:5],
        "length_mismatches": sum(1 for r, n in zip(results, output_lens, strict=True)
                                 if not r.get("error") and r["tokens"] != n),
        "elapsed_s": elapsed, "requests_per_s": len(ok) / elapsed if ok else 0.0,
        "output_tokens": out_tokens, "output_tok_per_s": out_tokens / elapsed if ok else 0.0,
        "ttft_s": summarize([r["ttft"] for r in ok]),
        "tpot_s": summarize([r["tpot"] for r in ok if r["tpot"] is not None]),
        "e2e_s": summarize([r["e2e"] for r in ok]),
        "client_cpu_s": client_cpu_s,
        "label": args.label, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {**host_info(), "loadavg_start": load_start, "loadavg_end": loadavg()},
        "command": " ".join(sys.argv),
    }
    if args.per_request:
        with open(args.per_request, "w") as f:
            for i, r in enumerate(results):
                row = {"index": i, "error": r.get("error")}
                if not r.get("error"):
                    row.update(sent=r["start"] - start, ttft=r["ttft"], end=r["end"] - start, tokens=r["tokens"])
                f.write(json.dumps(row) + "\n")
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
