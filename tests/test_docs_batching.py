"""Every Python example of ``docs/batching.md`` runs, in order and in one namespace, against a real server on a
tiny model (``$INFERNEO_BASE_URL`` points the examples' ``InferneoClient()`` at it)."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from inferneo.testing.server import RemoteServer

DOC = Path(__file__).resolve().parents[1] / "docs" / "batching.md"


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with RemoteServer(tiny_llama_dir, "--served-model-name", "meta-llama/Llama-2-7b-chat-hf",
                      "--scheduling-policy", "priority", "--max-model-len", "512", "--kv-cache-memory", "32MiB",
                      "--num-threads", "1", "--disable-access-log") as srv:
        yield srv


def test_every_example_of_the_batching_page_runs(server, tmp_path, monkeypatch):
    monkeypatch.setenv("INFERNEO_BASE_URL", server.base_url)
    monkeypatch.delenv("INFERNEO_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("".join(f"Line {i} of the input\n" for i in range(50)) + "\n")

    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.DOTALL | re.MULTILINE)
    assert len(blocks) >= 6
    ns: dict = {"__name__": "__docs__"}
    printed = []
    for number, block in enumerate(blocks, 1):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                exec(compile(block, f"<docs/batching.md block {number}>", "exec"), ns)
            except Exception as exc:
                raise AssertionError(f"docs/batching.md block {number} failed:\n{block}") from exc
        printed.append(out.getvalue())
    text = "\n".join(printed)

    assert re.search(r"^0 (stop|length) ", text, flags=re.MULTILINE)
    assert "64 answers" in text
    assert "batch: completed 2 of 2" in text  # InferneoClient's files and batches
    assert "answered: 200 of 200" in text and re.search(r"^settled on: \d+$", text, flags=re.MULTILINE)
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["index"] for a in answers] == list(range(50)) and all("text" in a for a in answers)
    assert "1 failed: BadRequestError" in text and re.search(r"^0 ok: ", text, flags=re.MULTILINE)
    assert re.search(r"^2 ok: ", text, flags=re.MULTILINE) and "400 temperature" in text
    assert "urgent answer:" in text
