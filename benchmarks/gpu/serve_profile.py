#!/usr/bin/env python3
"""Where the serving gap goes: W1's requests through ``inferneo serve`` all at once, with every process's CPU.

``h100_suite.py``'s serve section measures online ÷ offline output throughput. This script runs the same
workload (256 prompts x 1024 random tokens -> 128 tokens, ``--ignore-eos``, Llama-2-7B architecture with dummy
bf16 weights) and, while ``inferneo bench serve`` runs, samples the CPU time of the server's front end, of its
engine-core child process and of the benchmark client every 0.25 s. A process near one full core for the whole
decode phase is the bottleneck of that phase. Variants, each on the same server:

- ``one_client``: one ``bench serve`` process sends all 256 (what the suite measures);
- ``two_clients``: two ``bench serve`` processes at once, 128 requests each (the same prompts): when the gap
  closes here, the single client was the limit, not the server.

The prefix cache is off (every variant sends the same prompts; the offline run sees each once).

Writes ``serve_profile.json`` and ``serve_profile.log`` to ``--out``. ``--smoke`` runs it on CPU with a tiny model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1])]

from inferneo.bench.workload import random_workload  # noqa: E402
from inferneo.model_executor import arch_presets  # noqa: E402
from inferneo.model_executor.arch_presets import preset_config  # noqa: E402
from inferneo.testing.server import RemoteServer  # noqa: E402
from inferneo.testing.tiny_models import make_tiny_checkpoint, make_tiny_tokenizer  # noqa: E402

ENGINE = ["--no-enable-prefix-caching", "--max-model-len", "2048", "--max-num-seqs", "256", "--max-num-batched-tokens", "8192",
          "--gpu-memory-utilization", "0.95", "--load-format", "dummy", "--dtype", "bfloat16"]


class CpuSampler:
    """Samples the CPU seconds of named processes every ``period`` seconds on a thread."""

    def __init__(self, period: float = 0.25) -> None:
        self.period = period
        self.procs: dict[str, psutil.Process] = {}
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, name: str, pid: int) -> None:
        self.procs[name] = psutil.Process(pid)

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            row = {"t": round(time.perf_counter() - self._t0, 3)}
            for name, proc in list(self.procs.items()):
                try:
                    cpu = proc.cpu_times()
                    row[name] = cpu.user + cpu.system
                except psutil.Error:
                    row[name] = None
            self.samples.append(row)
            self._stop.wait(self.period)

    def busy(self) -> dict[str, dict]:
        """Per process: CPU seconds over the run, and the busiest 2 s window (cores used)."""
        out = {}
        for name in self.procs:
            rows = [(r["t"], r[name]) for r in self.samples if r.get(name) is not None]
            if len(rows) < 2:
                continue
            total = rows[-1][1] - rows[0][1]
            window = max(1, int(2.0 / self.period))
            peak = max(((rows[i + window][1] - rows[i][1]) / (rows[i + window][0] - rows[i][0])
                        for i in range(len(rows) - window)), default=0.0)
            out[name] = {"cpu_s": round(total, 2), "wall_s": round(rows[-1][0] - rows[0][0], 2),
                         "peak_cores_2s": round(peak, 2)}
        return out

    def timeline(self) -> list[dict]:
        """Cores used by each process per sample interval."""
        out = []
        for a, b in zip(self.samples, self.samples[1:], strict=False):
            dt = b["t"] - a["t"]
            out.append({"t": b["t"], **{n: round((b[n] - a[n]) / dt, 2) for n in self.procs
                                        if a.get(n) is not None and b.get(n) is not None}})
        return out


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "inferneo.cli", *args]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU (checks the script)")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = (out_dir / "serve_profile.log").open("w")

    def log(text: str) -> None:
        print(text, flush=True)
        log_file.write(text + "\n")
        log_file.flush()

    work = Path(tempfile.mkdtemp())
    if args.smoke:
        folder, vocab, n, plen, olen = make_tiny_checkpoint(work / "tiny"), 384, 16, 64, 16
        engine = ["--device", "cpu", "--max-model-len", "512", "--no-enable-prefix-caching"]
    else:
        folder = arch_presets.materialize_preset("llama-2-7b")
        vocab, n, plen, olen = preset_config("llama-2-7b")["vocab_size"], 256, 1024, 128
        engine = [*ENGINE, "--device", "cuda"]
    workload_flags = ["--num-prompts", str(n), "--input-len", str(plen), "--output-len", str(olen), "--seed", "0",
                      "--vocab-size", str(vocab)]
    results: dict = {"workload": {"prompts": n, "input_len": plen, "output_len": olen}}

    offline_json = work / "offline.json"
    proc = subprocess.run(cli("bench", "throughput", "--model", str(folder), *engine, *workload_flags,
                              "--output-json", str(offline_json)), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-3000:])
    offline = json.loads(offline_json.read_text())
    results["offline"] = offline
    log("offline:\n" + "\n".join(proc.stdout.strip().splitlines()[-8:]))
    offline_tps = offline.get("output_tok_per_s") or offline.get("output_throughput")

    workload = random_workload(n, (plen, plen), (olen, olen), 0, vocab)
    halves = []
    for h in range(2):
        path = work / f"half{h}.jsonl"
        with path.open("w") as f:
            for prompt, out_len in list(zip(workload.prompts, workload.output_lens, strict=True))[h::2]:
                f.write(json.dumps({"prompt": prompt, "output_len": out_len}) + "\n")
        halves.append(path)

    tokenizer_dir = work / "tokenizer"
    make_tiny_tokenizer().save_pretrained(tokenizer_dir)
    with RemoteServer(folder, *engine, "--tokenizer", str(tokenizer_dir), "--disable-access-log",
                      startup_timeout=300) as server:
        front = psutil.Process(server.proc.pid)
        variants = {"one_client": [workload_flags],
                    "two_clients": [["--dataset", str(p), "--num-prompts", str(n // 2)] for p in halves]}
        for repeat in range(2):
            for label, client_args in variants.items():
                sampler = CpuSampler()
                sampler.watch("front_end", front.pid)
                for i, child in enumerate(front.children(recursive=True)):
                    sampler.watch(f"core_{i}", child.pid)
                result_files = [work / f"{label}_{repeat}_{i}.json" for i in range(len(client_args))]
                sampler.start()
                start = time.perf_counter()
                clients = [subprocess.Popen(cli("bench", "serve", "--url", server.base_url, *flags, "--ignore-eos",
                                                "--request-rate", "inf", "--num-warmups", "0",
                                                "--result-json", str(rf)),
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                           for flags, rf in zip(client_args, result_files, strict=True)]
                for i, c in enumerate(clients):
                    sampler.watch(f"client_{i}", c.pid)
                outputs = [c.communicate()[0] for c in clients]
                wall = time.perf_counter() - start
                sampler.stop()
                if any(c.returncode for c in clients):
                    raise SystemExit("\n".join(o[-3000:] for o in outputs))
                figures = [json.loads(rf.read_text()) for rf in result_files]
                tokens = sum(f["total_output_tokens"] for f in figures)
                duration = max(f["duration_s"] for f in figures)
                tps = tokens / duration
                entry = {"output_tok_per_s": tps, "duration_s": duration, "process_wall_s": wall,
                         "online_over_offline": tps / offline_tps, "cpu": sampler.busy(),
                         "timeline": sampler.timeline(), "clients": figures}
                results[f"{label}_{repeat}"] = entry
                log(f"{label} (repeat {repeat}): {tps:.0f} output tok/s over {duration:.2f} s, "
                    f"online/offline {tps / offline_tps:.3f}")
                for name, busy in entry["cpu"].items():
                    log(f"    {name:10s} {busy['cpu_s']:7.2f} CPU s over {busy['wall_s']:.1f} s, "
                        f"busiest 2 s: {busy['peak_cores_2s']:.2f} cores")
                (out_dir / "serve_profile.json").write_text(json.dumps(results, indent=1))
    log("done")


if __name__ == "__main__":
    main()
