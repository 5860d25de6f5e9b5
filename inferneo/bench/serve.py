"""Online serving benchmark: streamed ``/v1/completions`` requests at a Poisson rate or a fixed concurrency.

Each request streams with ``stream_options.include_usage``. Time to first token (TTFT) runs from sending the
request to the first chunk that carries text; inter-token latency (ITL) is the gap between successive chunks
that carry text (a chunk may hold several tokens when the client falls behind); time per output token (TPOT)
is ``(latency - TTFT) / (output tokens - 1)``; E2E is the whole request. Token counts come from the usage
chunk. Throughputs divide by the benchmark's duration, from the first request sent to the last one finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

try:  # the faster client when installed (the dev extra has it); httpx otherwise
    import aiohttp
except ImportError:  # pragma: no cover - exercised by client-only installs
    aiohttp = None

from inferneo.bench.stats import format_table, summarize
from inferneo.bench.workload import Workload
from inferneo.client._base import error_message


@dataclass(slots=True)
class ServeConfig:
    """How to load the server."""

    base_url: str
    model: str
    request_rate: float = math.inf
    max_concurrency: int | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    api_key: str | None = None
    timeout: float = 600.0
    seed: int = 0
    num_warmups: int = 1


@dataclass(slots=True)
class RequestResult:
    """What one request measured (seconds)."""

    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (None for fewer than two tokens)."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


async def stream_completion(http: httpx.AsyncClient | Any, config: ServeConfig, prompt: str | list[int],
                            max_tokens: int) -> RequestResult:
    """Send one streamed completion and time it (``http``: an ``aiohttp.ClientSession`` or ``httpx.AsyncClient``
    from :func:`make_stream_client`)."""
    body: dict[str, Any] = {"model": config.model, "prompt": prompt, "max_tokens": max_tokens,
                            "temperature": config.temperature, "stream": True,
                            "stream_options": {"include_usage": True}}
    if config.ignore_eos:
        body["ignore_eos"] = True
    result = RequestResult()
    start = time.perf_counter()
    last = start
    text_chunks = 0
    try:
        async with _post_stream(http, "/v1/completions", body) as (status, lines, read_body):
            if status != 200:
                text = await read_body()
                result.error = f"HTTP {status}: {error_message(text)}"
                return result
            async for line in lines:
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = error_message(line[6:])
                    continue
                now = time.perf_counter()
                if any(c.get("text") for c in chunk.get("choices") or []):
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
                    text_chunks += 1
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                    result.output_tokens = chunk["usage"].get("completion_tokens", 0)
    except (*_TRANSPORT_ERRORS, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    if not result.output_tokens:  # a server that sends no usage: count what arrived
        result.output_tokens = text_chunks
        result.prompt_tokens = len(prompt) if isinstance(prompt, list) else 0
    result.ok = result.error is None
    return result


@contextlib.asynccontextmanager
async def _post_stream(http, path: str, body: dict[str, Any]):
    """POST ``body`` and yield ``(status, lines, read_body)``: the response's lines as text (without their line
    ends) and a coroutine function reading the whole body, whichever HTTP client ``http`` is."""
    if isinstance(http, httpx.AsyncClient):
        async with http.stream("POST", path, json=body) as response:
            async def read_body() -> str:
                return (await response.aread()).decode(errors="replace")

            yield response.status_code, response.aiter_lines(), read_body
        return
    async with http.post(path, data=json.dumps(body), headers={"Content-Type": "application/json"}) as response:
        async def lines():
            async for raw in response.content:  # aiohttp's reader splits on newlines in C
                yield raw.decode().rstrip("\r\n")

        yield response.status, lines(), response.text


_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (httpx.HTTPError, asyncio.TimeoutError) + (
    (aiohttp.ClientError,) if aiohttp is not None else ())


def make_client(base_url: str, api_key: str | None, timeout: float, max_connections: int) -> httpx.AsyncClient:
    """An HTTP client for the benchmark's side requests: pooled connections, no retries."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, limits=limits,
                             timeout=httpx.Timeout(timeout, connect=30.0))


def make_stream_client(base_url: str, api_key: str | None, timeout: float, max_connections: int):
    """The HTTP client that sends the timed streams: pooled connections, no retries.

    aiohttp when it is installed (its C parser reads a stream of server-sent events for a fraction of httpx's
    CPU time: one httpx client measured about 110 µs a chunk and saturated its core when 256 streams decoded
    at once on an H200, which capped the figure it measured), else httpx. Use it as an async context manager.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if aiohttp is not None:
        connector = aiohttp.TCPConnector(limit=max_connections)
        return aiohttp.ClientSession(base_url=base_url.rstrip("/") + "/", headers=headers, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=timeout, connect=30.0))
    return make_client(base_url, api_key, timeout, max_connections)


async def run_serve_benchmark(config: ServeConfig, workload: Workload) -> dict[str, Any]:
    """Run the workload against the server; returns every figure (see :func:`summarize_results`)."""
    connections = config.max_concurrency or min(len(workload), 1000)
    rng = random.Random(config.seed)
    async with make_stream_client(config.base_url, config.api_key, config.timeout, connections) as http:
        for _ in range(config.num_warmups):
            warm = await stream_completion(http, config, workload.prompts[0], min(4, workload.output_lens[0]))
            if not warm.ok:
                raise RuntimeError(f"the warm-up request failed: {warm.error}")
        gate = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None

        async def one(prompt: str | list[int], max_tokens: int) -> RequestResult:
            if gate is None:
                return await stream_completion(http, config, prompt, max_tokens)
            async with gate:
                return await stream_completion(http, config, prompt, max_tokens)

        start = time.perf_counter()
        tasks = []
        for i, (prompt, max_tokens) in enumerate(zip(workload.prompts, workload.output_lens, strict=True)):
            tasks.append(asyncio.create_task(one(prompt, max_tokens)))
            if math.isfinite(config.request_rate) and i + 1 < len(workload):
                await asyncio.sleep(rng.expovariate(config.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize_results(results, duration)


def summarize_results(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """Throughputs and mean / median / p99 of TTFT, TPOT, ITL and E2E latency (milliseconds)."""
    ok = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    figures: dict[str, Any] = {
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:10],
        "duration_s": duration, "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration, "input_throughput": input_tokens / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    series = {"ttft": [r.ttft for r in ok if r.ttft is not None], "tpot": [r.tpot for r in ok if r.tpot is not None],
              "itl": [gap for r in ok for gap in r.itls], "e2el": [r.latency for r in ok]}
    for name, values in series.items():
        for stat, value in summarize(values, scale=1000.0).items():
            figures[f"{stat}_{name}_ms"] = value
    return figures


def format_report(result: dict[str, Any]) -> str:
    """The figures as text, for the terminal."""
    c = result["config"]
    rate = "all at once" if c["request_rate"] == "inf" else f"{c['request_rate']} req/s (Poisson)"
    lines = [
        f"serving benchmark: {c['num_prompts']} requests to {c['base_url']} ({c['model']}), {rate}, "
        f"max concurrency {c['max_concurrency'] or 'unlimited'}",
        f"  completed / failed        {result['completed']} / {result['failed']}",
        f"  duration                  {result['duration_s']:.2f} s",
        f"  request throughput        {result['request_throughput']:.2f} req/s",
        f"  input token throughput    {result['input_throughput']:.1f} tok/s",
        f"  output token throughput   {result['output_throughput']:.1f} tok/s",
        f"  total token throughput    {result['total_token_throughput']:.1f} tok/s",
        "",
    ]
    names = {"ttft": "time to first token", "tpot": "time per output token", "itl": "inter-token latency",
             "e2el": "end-to-end latency"}
    rows = [[label, result[f"mean_{key}_ms"], result[f"median_{key}_ms"], result[f"p99_{key}_ms"]]
            for key, label in names.items()]
    lines.append(format_table(["(ms)", "mean", "median", "p99"], rows))
    for error in result["errors"]:
        lines.append(f"  error: {error}")
    return "\n".join(lines)


async def fetch_model_info(base_url: str, api_key: str | None, timeout: float = 30.0) -> dict[str, Any]:
    """The server's first model card (``id``, ``max_model_len``)."""
    async with make_client(base_url, api_key, timeout, 1) as http:
        response = await http.get("/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]


async def probe_vocab_size(base_url: str, api_key: str | None, timeout: float = 30.0) -> int:
    """The model's vocabulary size, found by asking ``/detokenize`` which token ids it accepts."""
    async with make_client(base_url, api_key, timeout, 1) as http:
        async def valid(token_id: int) -> bool:
            response = await http.post("/detokenize", json={"tokens": [token_id]})
            if response.status_code == 404:
                raise RuntimeError("the server has no /detokenize endpoint: give --vocab-size")
            return response.status_code == 200

        if not await valid(0):
            raise RuntimeError("the server refused token id 0 on /detokenize: give --vocab-size")
        lo, hi = 0, 256  # lo is valid; find an invalid hi
        while await valid(hi):
            lo, hi = hi, hi * 2
            if hi > 2**24:
                raise RuntimeError("could not find the vocabulary size: give --vocab-size")
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if await valid(mid) else (lo, mid)
        return hi
