"""``inferneo bench serve | batch-sizes | throughput`` on tiny settings: they run and write sane results (no
timing assertions), and the workload matches ``benchmarks/offline_throughput.py`` request for request."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from inferneo.bench.serve import probe_vocab_size
from inferneo.bench.stats import format_table, percentile, summarize
from inferneo.bench.workload import load_dataset, make_workload, parse_range, random_workload
from inferneo.cli.main import main
from inferneo.testing.server import RemoteServer

ENGINE = ["--kv-cache-memory", "32MiB", "--num-threads", "1"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with RemoteServer(tiny_llama_dir, "--served-model-name", "tiny", *ENGINE, "--disable-access-log") as srv:
        yield srv


def test_bench_serve_writes_every_figure(server, tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--url", server.base_url, "--num-prompts", "6", "--input-len", "4:12",
                 "--output-len", "3:6", "--request-rate", "50", "--max-concurrency", "3", "--ignore-eos",
                 "--result-json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "time to first token" in printed and "request throughput" in printed
    result = json.loads(out.read_text())
    config = result["config"]
    assert config["model"] == "tiny" and config["vocab_size"] == 384 and config["request_rate"] == 50
    assert config["max_concurrency"] == 3 and len(config["workload_sha256"]) == 16
    assert result["completed"] == 6 and result["failed"] == 0 and result["errors"] == []
    workload = random_workload(6, (4, 12), (3, 6), 0, 384)
    assert result["total_output_tokens"] == sum(workload.output_lens)  # ignore_eos: exact lengths
    assert result["total_input_tokens"] == sum(len(p) for p in workload.prompts)
    for key in ("request_throughput", "input_throughput", "output_throughput", "total_token_throughput"):
        assert result[key] > 0
    assert result["total_token_throughput"] == pytest.approx(result["input_throughput"]
                                                             + result["output_throughput"])
    for metric in ("ttft", "tpot", "itl", "e2el"):
        mean, median, p99 = (result[f"{s}_{metric}_ms"] for s in ("mean", "median", "p99"))
        if metric == "itl" and mean is None:
            # every stream came as one chunk: on a loaded host the server sends a slow reader's pending tokens
            # together, and a single chunk has no gap to time (the figure is absent, not zero)
            assert median is None and p99 is None and "inter-token latency" in printed
            continue
        assert mean > 0 and 0 < median <= p99
    assert result["p99_ttft_ms"] <= result["p99_e2el_ms"]
    assert result["environment"]["cpu_count"] >= 1


def test_bench_serve_all_at_once_with_a_dataset(server, tmp_path):
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text('{"prompt": "hello there", "output_len": 3}\n{"prompt": [5, 6, 7], "max_tokens": 2}\n')
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--url", server.base_url, "--dataset", str(dataset), "--num-prompts", "4",
                 "--ignore-eos", "--result-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["request_rate"] == "inf" and result["config"]["vocab_size"] is None
    assert result["completed"] == 4 and result["total_output_tokens"] == 3 + 2 + 3 + 2


def test_bench_serve_counts_failures(server, tmp_path):
    out = tmp_path / "serve.json"
    # Token ids up to 999 are outside the tiny vocabulary (384): every request but the warm-up fails.
    dataset = tmp_path / "bad.jsonl"
    dataset.write_text('{"prompt": "fine"}\n{"prompt": [999]}\n')
    assert main(["bench", "serve", "--url", server.base_url, "--dataset", str(dataset), "--num-prompts", "2",
                 "--output-len", "2", "--result-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["completed"] == 1 and result["failed"] == 1
    assert "400" in result["errors"][0] and "prompt" in result["errors"][0]


def test_bench_batch_sizes_table_plot_and_json(server, tmp_path, capsys):
    png, out = tmp_path / "plot.png", tmp_path / "sizes.json"
    assert main(["bench", "batch-sizes", "--url", server.base_url, "--model", "tiny", "--batch-sizes", "1,2,4",
                 "--num-prompts", "4", "--max-tokens", "4", "--output-png", str(png), "--output-json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [r["batch_size"] for r in result["results"]] == [1, 2, 4]
    for row in result["results"]:
        assert row["requests"] == 4 and row["failed_requests"] == 0
        assert row["requests_per_s"] > 0 and row["mean_latency_s"] > 0 and 0 < row["output_tokens"] <= 16
    best = max(result["results"], key=lambda r: r["requests_per_s"])["batch_size"]
    assert result["optimal_batch_size"] == best
    assert f"Optimal batch size: {best}" in printed and "requests/s" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_bench_batch_sizes_says_why_every_call_failed(server, capsys):
    """A size past the server's prompts-per-request limit fails every call: the report gives the server's message,
    not only a count, and the exit status is 1."""
    assert main(["bench", "batch-sizes", "--url", server.base_url, "--model", "tiny", "--batch-sizes", "300",
                 "--num-prompts", "300", "--max-tokens", "1"]) == 1
    printed = capsys.readouterr().out
    assert "Optimal batch size: None" in printed and "no batch size had a call that succeeded" in printed
    assert "batch size 300: HTTP 400: prompt: 300 prompts in one request" in printed, printed


def test_bench_throughput_names_the_lengths_that_ask_for_too_much_context(tiny_llama_dir, capsys):
    assert main(["bench", "throughput", "--model", str(tiny_llama_dir), *ENGINE, "--num-prompts", "1",
                 "--input-len", "100000", "--output-len", "2"]) != 0
    assert "--input-len (up to 100000) plus --output-len (up to 2)" in capsys.readouterr().err


def test_bench_throughput_in_process(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "throughput.json"
    assert main(["bench", "throughput", "--model", str(tiny_llama_dir), *ENGINE, "--num-prompts", "5",
                 "--input-len", "4:10", "--output-len", "3:5", "--output-json", str(out)]) == 0
    assert "output tokens" in capsys.readouterr().out
    result = json.loads(out.read_text())
    workload = random_workload(5, (4, 10), (3, 5), 0, 384)
    assert result["config"]["workload_sha256"] == workload.digest() and result["config"]["vocab_size"] == 384
    assert result["num_requests"] == 5 and result["total_output_tokens"] == sum(workload.output_lens)
    assert result["total_prompt_tokens"] == sum(len(p) for p in workload.prompts)
    assert result["requests_per_s"] > 0 and result["output_tok_per_s"] > 0
    assert result["total_tok_per_s"] == pytest.approx(
        (result["total_prompt_tokens"] + result["total_output_tokens"]) / result["elapsed_s"])
    assert result["config"]["dtype"] == "float32" and result["config"]["engine"]["num_threads"] == 1


def test_workload_matches_the_offline_benchmark_script():
    spec = importlib.util.spec_from_file_location("offline_throughput", REPO / "benchmarks" / "offline_throughput.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ours = make_workload(64, (16, 128), (16, 128), 0, 49152)
    assert ours == script.make_workload(64, (16, 128), (16, 128), 0, 49152)
    assert random_workload(64, (16, 128), (16, 128), 0, 49152).digest() == script.workload_digest(*ours)
    assert script.workload_digest(*ours) == "84bd0fbb308f62c0"  # the figure benchmarks/README.md quotes


def test_vocab_size_probe(server):
    assert asyncio.run(probe_vocab_size(server.base_url, None)) == 384


def test_dataset_loading(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": [1, 2], "output_len": 7}\n')
    workload = load_dataset(path, default_output_len=9)
    assert workload.prompts == ["a", [1, 2]] and workload.output_lens == [9, 7]
    assert load_dataset(path, num_requests=5).prompts == ["a", [1, 2], "a", [1, 2], "a"]
    path.write_text('{"prompt": ""}\n')
    with pytest.raises(ValueError, match="line 1 needs a 'prompt'"):
        load_dataset(path)


def test_stats_helpers():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert summarize(values, scale=1000) == {"mean": pytest.approx(3875.0), "median": 3500.0,
                                              "p99": pytest.approx(np.percentile(values, 99) * 1000)}
    assert summarize([]) == {"mean": None, "median": None, "p99": None}
    assert parse_range("8") == (8, 8) and parse_range("2:5") == (2, 5)
    table = format_table(["name", "value"], [["a", 1.5], ["bb", None]])
    assert table.splitlines()[2].startswith("a ") and table.splitlines()[3].endswith("-")
