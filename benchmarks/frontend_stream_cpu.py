"""Front-end CPU time per streamed token, as the output grows: one long streamed completion through a real
``inferneo serve`` (engine core in its child process), for one or more source trees in the same run.

The figure is the CPU time (user + system) of the server's front-end process alone (HTTP, detokenization, the
output processor; the engine core is its child and is not counted) divided by the tokens streamed. A front end
whose cost per token grows with the output length is quadratic in it.

    python benchmarks/frontend_stream_cpu.py --tree before=/path/to/old/checkout --tree after=. \\
        --tokens 1024 8192 32768 --out benchmarks/results/frontend-stream.json

A tiny random Llama checkpoint with a 40k context is built for the run, so the model's own cost is small and
the front end's shows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil


def start_server(name: str, tree: Path, model: Path, port: int, log: Path) -> subprocess.Popen:
    # Each tree builds its native kernels in a folder of its own (one shared folder would rebuild per tree).
    extensions = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()), TORCH_EXTENSIONS_DIR=str(extensions / f"bench-{name}"))
    cmd = [sys.executable, "-m", "inferneo.cli", "serve", "--model", str(model), "--port", str(port),
           "--dtype", "float32", "--max-model-len", "40000", "--kv-cache-memory", "512MiB",
           "--disable-access-log", "--request-timeout", "0"]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start")


def stream(port: int, num_tokens: int) -> tuple[int, int]:
    """Stream one completion of ``num_tokens`` tokens; returns (chunks, characters) received."""
    body = {"prompt": "hello", "max_tokens": num_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    chunks = chars = 0
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=None) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunks += 1
                chars += len(json.loads(line[6:])["choices"][0]["text"]) if '"choices":[{' in line else 0
    return chunks, chars


def measure(name: str, tree: Path, model: Path, sizes: list[int], port: int, workdir: Path) -> list[dict]:
    proc = start_server(name, tree, model, port, workdir / f"server-{port}.log")
    front = psutil.Process(proc.pid)
    results = []
    try:
        stream(port, 64)  # warm-up
        for size in sizes:
            before = front.cpu_times()
            start = time.perf_counter()
            chunks, chars = stream(port, size)
            wall = time.perf_counter() - start
            after = front.cpu_times()
            cpu = (after.user - before.user) + (after.system - before.system)
            results.append({"tokens": size, "chunks": chunks, "chars": chars, "front_end_cpu_s": round(cpu, 3),
                            "front_end_cpu_us_per_token": round(1e6 * cpu / size, 1), "wall_s": round(wall, 2)})
            print(f"  {size:6d} tokens: {1e6 * cpu / size:7.1f} us front-end CPU per token ({wall:.1f} s wall)",
                  flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=PATH",
                        help="a source tree to measure (repeat to compare trees in one run)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--port", type=int, default=8473)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from inferneo.testing.tiny_models import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = make_tiny_checkpoint(workdir / "model", "llama", max_position_embeddings=40000)
        report = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
                  "cores": os.cpu_count(), "python": platform.python_version(), "trees": {}}
        with open("/proc/cpuinfo") as f:
            report["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                                 report["cpu"])
        for index, spec in enumerate(args.tree):
            name, _, path = spec.partition("=")
            print(f"{name} ({path}):", flush=True)
            report["trees"][name] = measure(name, Path(path), model, args.tokens, args.port + index, workdir)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
