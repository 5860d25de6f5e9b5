"""Every command in docs/performance-tuning.md parses with the real CLI, and every ``inferneo bench`` and
``inferneo batch`` command there runs (against a tiny model, with sizes shrunk) and writes what it promises."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from inferneo.batch.records import BatchRequest, parse_line
from inferneo.cli.main import build_parser, main
from inferneo.testing.guide import GUIDE_MODEL
from inferneo.testing.server import RemoteServer

DOC = Path(__file__).resolve().parents[1] / "docs" / "performance-tuning.md"
ENGINE = ["--kv-cache-memory", "32MiB", "--num-threads", "1"]
# Appended to each command (argparse keeps the last value): tiny sizes, so that the examples run in seconds.
SHRINK = {
    "batch-sizes": ["--batch-sizes", "1,2", "--num-prompts", "2", "--max-tokens", "2"],
    "serve": ["--num-prompts", "3", "--input-len", "4", "--output-len", "2"],
    "throughput": ["--num-prompts", "2", "--input-len", "4", "--output-len", "2", *ENGINE],
}


def blocks(kind: str) -> list[str]:
    return re.findall(rf"^```{kind}\n(.*?)^```", DOC.read_text(), flags=re.DOTALL | re.MULTILINE)


def commands() -> list[tuple[dict[str, str], list[str]]]:
    """``(environment, argv after 'inferneo')`` for each command line of the bash blocks."""
    found = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            env = {}
            while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                key, _, value = words.pop(0).partition("=")
                env[key] = value
            assert words and words[0] == "inferneo", f"not an inferneo command: {line!r}"
            found.append((env, words[1:]))
    return found


def test_every_command_parses():
    found = commands()
    assert {argv[0] for _, argv in found} == {"serve", "bench", "batch"}
    for _, argv in found:
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            raise AssertionError(f"the CLI refuses: inferneo {' '.join(argv)}") from exc


def test_the_batch_input_example_is_valid():
    (block,) = blocks("jsonl")
    lines = block.splitlines()
    assert len(lines) == 2
    seen: set[str] = set()
    assert all(isinstance(parse_line(i, line.encode(), seen), BatchRequest) for i, line in enumerate(lines, 1))


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with RemoteServer(tiny_llama_dir, "--served-model-name", GUIDE_MODEL, *ENGINE, "--disable-access-log") as srv:
        yield srv


def test_the_examples_run(server, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "requests.jsonl").write_text(blocks("jsonl")[0])
    ran = []
    for env, argv in commands():
        if argv[0] == "serve":
            continue  # the server itself: the fixture runs one
        argv = [a.replace("http://localhost:8000", server.base_url).replace("/models/Llama-2-7b-chat-hf",
                                                                          str(tiny_llama_dir)) for a in argv]
        if argv[0] == "bench":
            argv += SHRINK[argv[1]]
            if argv[1] == "throughput":
                argv += ["--model", str(tiny_llama_dir)]
        elif "--url" not in argv:
            argv += ENGINE
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            assert main([*argv, "--no-progress"] if argv[0] == "batch" else argv) == 0, argv
        ran.append(argv[:2])
    assert len(ran) == 9  # with INFERNEO_CPU_LINEAR_KERNEL=onednn inferneo bench throughput
    for name in ("batch-sizes.json", "serve-rate4.json", "serve-c16.json", "throughput.json",
                 "throughput-bf16.json"):
        assert json.loads((tmp_path / name).read_text())["environment"]
    assert (tmp_path / "batch-sizes.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "throughput-bf16.json").read_text())["config"]["dtype"] == "bfloat16"
    for name in ("results.jsonl", "results-local.jsonl"):
        records = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        assert sorted(r["custom_id"] for r in records) == ["q1", "q2"]
        assert all(r["error"] is None and r["response"]["status_code"] == 200 for r in records)
