"""The Python examples of the README, the offline-inference page and the online-serving page, run as written.

Offline examples run on the bundled default model. Examples that talk to a server run against a real
``inferneo serve --served-model-name meta-llama/Llama-2-7b-chat-hf`` on a tiny model at the address the pages
use (port 8000).
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from inferneo.testing.server import docs_server

REPO = Path(__file__).resolve().parents[1]
PORT = 8000
# Every module that serves on port 8000 (the docs' examples talk to it) runs on one xdist worker, so none of them
# finds the port taken by another and skips (--dist loadgroup, pyproject.toml).
pytestmark = pytest.mark.xdist_group("port-8000")


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.DOTALL | re.MULTILINE)


def run_block(block: str, namespace: dict) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "<doc example>", "exec"), namespace)
    return out.getvalue()


@pytest.fixture(scope="module")
def docs_example_server(tiny_llama_dir):
    server = docs_server(tiny_llama_dir, PORT, "meta-llama/Llama-2-7b-chat-hf")
    with server:
        yield server


def test_readme_offline_example_runs_on_the_default_model():
    block = next(b for b in python_blocks(REPO / "README.md") if "LLM()" in b)
    ns: dict = {}
    out = run_block(block, ns)
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 2 and all(line.endswith(("stop", "length")) for line in lines), out
    assert len(ns["answers"]) == 2 and all(a.outputs[0].text for a in ns["answers"])


def test_offline_inference_page_examples_run(tmp_path, monkeypatch):
    generate_block, vision_block, embeds_block, beam_block, rl_block = python_blocks(
        REPO / "docs" / "offline-inference.md")
    ns: dict = {}
    out = run_block(generate_block, ns)
    assert out.strip(), "the example prints the second completion"
    assert len(ns["outputs"]) == 2
    ns = {}
    out = run_block(beam_block, ns)
    lines = out.splitlines()
    assert len(lines) == 3 and all(line.endswith(("stop", "length")) for line in lines), out
    scores = [s.cum_logprob / len(s.tokens) for s in ns["outputs"][0].sequences if s.finish_reason == "length"]
    assert scores == sorted(scores, reverse=True), "the beams come best first"
    assert run_block(rl_block, {}).split() == ["True", "True"]  # sleep, wake up, reset the prefix cache
    # the prompt embeddings example, on the tiny Llama in place of SmolLM2
    from inferneo.testing.tiny_models import make_tiny_checkpoint

    small = make_tiny_checkpoint(tmp_path / "llama")
    out = run_block(embeds_block.replace('"HuggingFaceTB/SmolLM2-135M-Instruct"', repr(str(small))), {})
    assert out.split() == ["True"]
    # the images example, on a tiny LLaVA in place of LLaVA 1.5 and a picture of noise in place of the cat
    from inferneo.testing.vision_models import make_tiny_llava
    from tests.test_vision_language import images

    monkeypatch.chdir(tmp_path)
    images(1)[0].save("cat.png")
    tiny = make_tiny_llava(tmp_path / "llava")
    ns = {}
    out = run_block(vision_block.replace('"llava-hf/llava-1.5-7b-hf"', repr(str(tiny))), ns)
    assert len(out.splitlines()) >= 2 and ns["out"][0].outputs[0].token_ids and ns["answer"][0].outputs[0].token_ids
    model = ns["llm"].engine.runner.model
    assert ns["out"][0].prompt_token_ids.count(model.image_token_id) == model.num_image_tokens == 16


def test_readme_client_example(docs_example_server):
    block = next(b for b in python_blocks(REPO / "README.md") if "InferneoClient" in b)
    ns: dict = {}
    out = run_block(block, ns)
    assert len(ns["responses"].choices) == 2
    assert out.startswith("[")


def test_online_serving_page_examples(docs_example_server):
    blocks = python_blocks(REPO / "docs" / "online-serving.md")
    batch_block = next(b for b in blocks if "client.batches.create" in b)
    ns: dict = {}
    anthropic_block = next(b for b in blocks if "anthropic.Anthropic" in b)
    # (the prompt embeddings example needs a server with --enable-prompt-embeds: tests/test_prompt_embeds.py runs it)
    openai_block, conversations_block, in_process_block = [b for b in blocks if b not in (batch_block,
                                                                                          anthropic_block)
                                                           and "prompt_embeds" not in b]
    out = run_block(openai_block, ns)
    assert out.startswith("0 ") and "\n1 " in out
    out = run_block(conversations_block, ns)
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("Conversation")] == [
        "Conversation 1", "Conversation 2"]
    out = run_block(in_process_block, {})
    assert "Paris" in out
    out = run_block(batch_block, {})  # OpenAI's Batch API: both questions answered, in the output file
    assert sorted(line.split(" ")[0] for line in out.splitlines() if line.startswith("q")) == ["q0", "q1"]
    out = run_block(anthropic_block, {})  # Anthropic's Messages API, through the anthropic package
    assert out.split(" ")[0] in ("end_turn", "max_tokens") and 1 <= int(out.split(" ")[1]) <= 20


def shell_commands(path: Path, program: str) -> list[str]:
    """Commands of the ```bash blocks that start with ``program``, continuation lines joined."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", path.read_text(), flags=re.DOTALL | re.MULTILINE):
        current = ""
        for line in block.splitlines():
            if current:
                current += "\n" + line
            elif line.startswith(program + " "):
                current = line
            if current and not line.endswith("\\") and current.count("'") % 2 == 0:
                commands.append(current)
                current = ""
    return commands


@pytest.mark.parametrize("page", ["README.md", "docs/online-serving.md"])
def test_curl_examples_get_answers(docs_example_server, page):
    import json
    import subprocess

    commands = shell_commands(REPO / page, "curl")
    assert commands, f"{page} has curl examples"
    for command in commands:
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120,
                                env={"PATH": "/usr/bin:/bin", "MY_KEY": "unused"})
        assert result.returncode == 0, (command, result.stderr)
        body = result.stdout.strip()
        if body.startswith("data:"):
            assert body.endswith("data: [DONE]"), body[-200:]
        else:
            reply = json.loads(body)
            assert "error" not in reply, reply
