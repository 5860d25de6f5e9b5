"""Every example of ``docs/structured-output.md`` runs, in page order, against a real ``inferneo serve`` on a tiny
random-weight model at the address the page uses (port 8000): the Python blocks in one namespace, the ``curl``
and ``inferneo batch`` commands in a shell (``inferneo serve`` and ``pip`` lines are set-up and skipped). The
tiny model writes gibberish, so every answer that validates does so because the engine constrained it."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from inferneo.testing.server import docs_server

DOC = Path(__file__).resolve().parents[1] / "docs" / "structured-output.md"
MODEL = "meta-llama/Llama-2-7b-chat-hf"
RUN_COMMANDS = ("curl ", "inferneo batch ")


def page_steps(text: str) -> list[tuple[str, str]]:
    """``("python", code)`` and ``("shell", command)`` steps in page order."""
    steps: list[tuple[str, str]] = []
    for lang, block in re.findall(r"^```(python|bash)\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        if lang == "python":
            steps.append(("python", block))
            continue
        current = ""
        for line in block.splitlines():
            if current:
                current += "\n" + line
            elif line.startswith(RUN_COMMANDS):
                current = line
            if current and not line.endswith("\\") and current.count("'") % 2 == 0:
                steps.append(("shell", current))
                current = ""
    return steps


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with docs_server(tiny_llama_dir, 8000, MODEL, "--num-threads", "1") as srv:
        yield srv


def run_page(tmp_path: Path) -> tuple[str, list[tuple[str, str]]]:
    """Run every step; return what the Python blocks printed and each shell command with its output."""
    ns: dict = {"__name__": "__docs__"}
    printed = io.StringIO()
    shell: list[tuple[str, str]] = []
    for number, (kind, code) in enumerate(page_steps(DOC.read_text()), 1):
        if kind == "python":
            with contextlib.redirect_stdout(printed):
                try:
                    exec(compile(code, f"<structured-output.md step {number}>", "exec"), ns)
                except Exception as exc:
                    raise AssertionError(f"step {number} failed:\n{code}\n{printed.getvalue()}") from exc
            continue
        command = code.replace("inferneo batch ", f"{sys.executable} -m inferneo.cli batch ", 1)
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300,
                                cwd=tmp_path)
        assert result.returncode == 0, (code, result.stdout, result.stderr)
        shell.append((code, result.stdout))
    return printed.getvalue(), shell


def test_every_example_of_the_structured_output_page_runs(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("INFERNEO_BASE_URL", raising=False)
    monkeypatch.delenv("INFERNEO_API_KEY", raising=False)
    out, shell = run_page(tmp_path)
    lines = out.splitlines()

    def line(prefix: str) -> str:
        found = [x for x in lines if x.startswith(prefix)]
        assert found, f"nothing printed {prefix!r}:\n{out}"
        return found[0][len(prefix):].strip()

    # curl: the schema-constrained answer validates, the choice is one of the choices.
    curls = [(cmd, json.loads(stdout)) for cmd, stdout in shell if cmd.startswith("curl")]
    assert len(curls) == 2 and all("error" not in reply for _, reply in curls), curls
    (schema_cmd, schema_reply), (_, choice_reply) = curls
    request = json.loads(schema_cmd.split("-d '", 1)[1].rsplit("'", 1)[0])
    schema = request["response_format"]["json_schema"]["schema"]
    jsonschema.validate(json.loads(schema_reply["choices"][0]["message"]["content"]), schema)
    assert choice_reply["choices"][0]["text"] in ("positive", "negative", "mixed")

    assert re.fullmatch(r"City \S.* \d+", line("openai:")), out
    offline = [x for x in lines if x.startswith("offline:")]
    assert len(offline) == 3 and all("name=" in x for x in offline), out
    assert re.fullmatch(r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]", line("regex:"))
    assert line("choice:") in ("positive", "negative", "mixed")
    assert re.fullmatch(r"[1-9][0-9]?( [-+*] [1-9][0-9]?)?", line("grammar:"))
    assert re.fullmatch(r"[1-9][0-9]?( [-+*] [1-9][0-9]?)?", line("lark:"))
    assert line("json_object:") in ("dict", "cut off by max_tokens")
    assert line("tool call:") == "stop get_weather ['city', 'unit']"  # a named function: OpenAI's "stop"
    assert line("after the tool:") in ("stop", "length", "tool_calls")
    assert line("auto:")
    assert line("parse:").startswith("City(") and line("tool:").startswith("GetWeather(city=")
    assert line("too short:").startswith("length")
    assert line("batch:") == "8 cities, all valid: True"
    assert re.fullmatch(r"City (good|bad)", line("submit:"))
    assert line("batch tool call:") == "get_weather"
    assert line("batch file:") == "5 of 5 valid"
    refused = [x.split()[1:] for x in lines if x.startswith("refused:")]
    assert [status for status, *_ in refused] == ["400"] * 4, out
    params = [param[0] if param else None for _, *param in refused]
    assert params[0].startswith("response_format") and params[1].startswith("structured_outputs")
    assert params[2].startswith("structured_outputs") and params[3].startswith("tool_choice"), params
