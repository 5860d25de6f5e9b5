"""One declaration of the engine options: every ``EngineConfig`` field is a command-line flag (or explicitly none)
and an ``LLM`` keyword, the flags' defaults are the fields' defaults, the flags of before still parse to the same
values, and the command-line modules import each other without cycles."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
from source_ast import parse_file

from inferneo import config as config_module
from inferneo.cli import main as cli_main
from inferneo.cli.main import build_parser
from inferneo.config import EngineConfig, add_engine_args, engine_flag_fields, flag_name, not_a_flag

ROOT = Path(__file__).resolve().parents[1]
CLI_DIR = ROOT / "inferneo" / "cli"
# Each command with the engine flags, with what else it needs to parse.
ENGINE_COMMANDS = {
    "generate": ["generate", "a prompt"],
    "chat": ["chat"],
    "serve": ["serve"],
    "batch": ["batch", "-i", "in.jsonl", "-o", "out.jsonl"],
    "bench throughput": ["bench", "throughput"],
}


def _config(argv: list[str], **overrides) -> EngineConfig:
    return EngineConfig.from_cli_args(build_parser().parse_args(argv), **overrides)


def test_every_field_is_a_flag_or_marked_as_none():
    flags = {f.name for f in engine_flag_fields()}
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    for f in dataclasses.fields(EngineConfig):
        assert "cli" in f.metadata, (
            f"EngineConfig.{f.name} says nothing about the command line: declare it with option(...) (a flag) or "
            "not_a_flag(...) (none)")
        if f.metadata["cli"] is None:
            assert f.name not in flags
            continue
        assert f.name in flags
        action = parser._option_string_actions.get(flag_name(f.name))
        assert action is not None and action.dest == f.name, f"no {flag_name(f.name)} flag for EngineConfig.{f.name}"


@pytest.mark.parametrize("command", ENGINE_COMMANDS)
def test_no_flags_give_the_default_config(command):
    argv = ENGINE_COMMANDS[command]
    assert _config(argv) == EngineConfig()
    args = build_parser().parse_args(argv)
    for f in engine_flag_fields():
        assert getattr(args, f.name) == f.default, f.name


def test_the_flags_of_before_parse_as_they_did():
    base = ["generate", "x"]
    cases = {
        ("--model", "m", "--tokenizer", "t"): dict(model="m", tokenizer="t"),
        ("--dtype", "bfloat16", "--device", "cpu", "--load-format", "dummy"):
            dict(dtype="bfloat16", device="cpu", load_format="dummy"),
        ("--max-model-len", "512", "--block-size", "32"): dict(max_model_len=512, block_size=32),
        ("--kv-cache-memory", "4GiB",): dict(kv_cache_memory=4 * 2**30),
        ("--kv-cache-memory", "512MiB",): dict(kv_cache_memory=512 * 2**20),
        ("--kv-cache-memory", "1000",): dict(kv_cache_memory=1000),
        ("--gpu-memory-utilization", "0.5",): dict(gpu_memory_utilization=0.5),
        ("--max-num-seqs", "8", "--max-num-batched-tokens", "64"): dict(max_num_seqs=8, max_num_batched_tokens=64),
        ("--no-enable-prefix-caching", "--no-enable-chunked-prefill"):
            dict(enable_prefix_caching=False, enable_chunked_prefill=False),
        ("--no-enable-prefix-caching", "--enable-prefix-caching"): dict(enable_prefix_caching=True),
        ("--scheduling-policy", "priority", "--seed", "7"): dict(scheduling_policy="priority", seed=7),
        ("--enforce-eager", "--num-threads", "1"): dict(enforce_eager=True, num_threads=1),
        ("--tensor-parallel-size", "2"): dict(tensor_parallel_size=2),
        ("-tp", "2"): dict(tensor_parallel_size=2),
        ("-tp", "2", "--pipeline-parallel-size", "2", "--distributed-executor-backend", "ray"):
            dict(tensor_parallel_size=2, pipeline_parallel_size=2, distributed_executor_backend="ray"),
        ("-pp", "3"): dict(pipeline_parallel_size=3),
        ("--async-scheduling",): dict(async_scheduling=True),
        ("--no-async-scheduling",): dict(async_scheduling=False),
    }
    for flags, expected in cases.items():
        assert _config([*base, *flags]) == EngineConfig(**expected), flags
    # serve also takes the model as a positional argument
    args = build_parser().parse_args(["serve", "some-model", "--max-num-seqs", "3"])
    assert args.model_tag == "some-model" and args.max_num_seqs == 3


@pytest.mark.parametrize("flags", [["--kv-cache-memory", "lots"], ["--dtype", "fp8"], ["--max-num-seqs", "x"],
                                   ["--scheduling-policy", "lifo"], ["--distributed-executor-backend", "slurm"]])
def test_bad_flag_values_are_refused_by_the_parser(flags, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["generate", "x", *flags])
    assert exc.value.code == 2
    assert flags[0] in capsys.readouterr().err


def test_out_of_range_values_are_refused_before_any_model_loads(capsys):
    assert cli_main.main(["generate", "x", "--max-num-seqs", "0"]) == 2
    assert "max_num_seqs must be a positive integer" in capsys.readouterr().err
    assert cli_main.main(["generate", "x", "--gpu-memory-utilization", "1.5"]) == 2
    assert "gpu_memory_utilization" in capsys.readouterr().err


def test_every_field_is_an_llm_keyword(monkeypatch):
    import inferneo.entrypoints.llm as llm_module

    built = []
    monkeypatch.setattr(llm_module, "LLMEngine", lambda config: built.append(config) or config)
    defaults = {f.name: getattr(EngineConfig(), f.name) for f in dataclasses.fields(EngineConfig)}
    llm_module.LLM(**defaults)
    assert built[-1] == EngineConfig()
    llm_module.LLM("m", kv_cache_memory="2GiB", max_num_seqs=4, enable_prefix_caching=False)
    assert built[-1] == EngineConfig(model="m", kv_cache_memory=2 * 2**30, max_num_seqs=4,
                                     enable_prefix_caching=False)
    with pytest.raises(TypeError, match="unknown LLM argument.*max_queued_requests"):
        llm_module.LLM(max_queued_requests=3)


def test_a_field_without_a_flag_is_allowed(monkeypatch):
    @dataclasses.dataclass
    class WithKernels(EngineConfig):
        kernels: dict = not_a_flag(default_factory=lambda: {"attention": "auto"}, help="a nested config")

    monkeypatch.setattr(config_module, "EngineConfig", WithKernels)
    parser = build_parser()
    assert "--kernels" not in parser.format_help()
    args = parser.parse_args(["generate", "x", "--max-num-seqs", "2"])
    assert not hasattr(args, "kernels")
    built = WithKernels.from_cli_args(args)
    assert built.kernels == {"attention": "auto"} and built.max_num_seqs == 2
    assert "kernels" not in config_module.engine_config_kwargs(args)


def test_serve_builds_its_config_from_the_flags_and_keeps_the_queue_limit_apart(monkeypatch):
    import inferneo.entrypoints.openai.api_server as api_server

    calls = []
    monkeypatch.setattr(api_server, "serve", lambda *a, **kw: calls.append((a, kw)) or 0)
    assert cli_main.main(["serve", "tag-model", "--max-num-seqs", "5", "--max-queued-requests", "0"]) == 0
    (config, names, host, port, keys), kw = calls[-1]
    assert config == EngineConfig(model="tag-model", max_num_seqs=5)
    assert (names, host, port) == (None, "127.0.0.1", 8000)
    assert kw["max_queued_requests"] is None  # 0: no limit
    assert cli_main.main(["serve", "--model", "m", "--max-queued-requests", "7"]) == 0
    config, kw = calls[-1][0][0], calls[-1][1]
    assert config.model == "m" and kw["max_queued_requests"] == 7
    assert "max_queued_requests" not in {f.name for f in dataclasses.fields(EngineConfig)}


def test_serve_refuses_a_bad_queue_limit_before_loading_a_model():
    from inferneo.entrypoints.openai.api_server import serve

    with pytest.raises(ValueError, match="max_queued_requests"):
        serve(EngineConfig(model="/nonexistent"), None, "127.0.0.1", 0, [], max_queued_requests=-1)


def test_the_docs_table_lists_every_engine_option():
    text = (ROOT / "docs" / "offline-inference.md").read_text()
    section = text.split("## Engine options", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE))
    assert {f.name for f in engine_flag_fields()} <= listed, "an engine flag the table does not list"
    assert listed <= {f.name for f in dataclasses.fields(EngineConfig)}, "a row for an option that is gone"


# ---- the command-line modules ---------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    """The ``inferneo...`` modules a file imports, anywhere in it (functions included)."""
    found = set()
    for node in ast.walk(parse_file(path)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # from inferneo.cli import batch
    return {m for m in found if m.startswith("inferneo")}


def test_the_cli_modules_have_no_import_cycles():
    modules = {f"inferneo.cli.{p.stem}": p for p in CLI_DIR.glob("*.py") if p.stem != "__init__"}
    modules["inferneo.cli"] = CLI_DIR / "__init__.py"
    modules["inferneo.config"] = ROOT / "inferneo" / "config.py"
    modules["inferneo.extras"] = ROOT / "inferneo" / "extras.py"
    graph = {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}
    assert graph["inferneo.cli"] == set(), "the package's __init__ imports nothing, so no submodule cycles back"
    for name in modules:  # depth-first search for a path back to ``name``
        stack, seen = list(graph[name]), set()
        while stack:
            current = stack.pop()
            assert current != name, f"import cycle through {name}: {graph}"
            if current not in seen:
                seen.add(current)
                stack.extend(graph[current])
    commands = {f"inferneo.cli.{c}" for c in ("generate", "serve", "batch", "bench")}
    assert commands <= graph["inferneo.cli.main"]
    assert all("inferneo.cli.main" not in graph[c] for c in commands)


def test_the_console_script_and_python_m_are_the_same_command():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^inferneo = "inferneo\.cli\.main:main"$', text, flags=re.MULTILINE)
    result = subprocess.run([sys.executable, "-m", "inferneo.cli", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "generate" in result.stdout and "serve" in result.stdout


def test_building_the_parser_imports_no_engine():
    """The flags come from the declaration without PyTorch, so a client-only install parses every command."""
    code = ("import sys; from inferneo.cli.main import build_parser; build_parser().parse_args(['serve', '-tp', '2']); "
            "print(sorted(m for m in sys.modules if m in ('torch', 'fastapi') or m.startswith('inferneo.engine')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


@pytest.mark.parametrize("flags", [["--port", "99999"], ["--port", "0"], ["--port", "http"],
                                   ["--shutdown-timeout", "-1"], ["--shutdown-timeout", "soon"],
                                   ["--default-chat-template-kwargs", "[1]"],
                                   ["--default-chat-template-kwargs", "{not json"]])
def test_bad_server_flag_values_are_refused_by_the_parser(flags, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", *flags])
    assert exc.value.code == 2
    assert flags[0] in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "says"), [
    (["--served-model-name", "a", "b", "a"], "--served-model-name lists a name twice"),
    (["--api-key", ""], "--api-key got an empty key"),
    (["--num-threads", "0"], "num_threads must be a positive integer"),
    (["--default-chat-template-kwargs", '{"tools": []}'],
     "default_chat_template_kwargs: chat_template_kwargs cannot set tools"),
])
def test_server_settings_that_cannot_work_are_refused_before_any_model_loads(flags, says, capsys):
    assert cli_main.main(["serve", "--model", "no-such-model", *flags]) == 2
    assert says in capsys.readouterr().err


def test_vllm_arguments_without_an_effect_here_are_accepted(monkeypatch, capsys):
    """vLLM scripts pass swap_space, disable_custom_all_reduce, max_seq_len_to_capture, tokenizer_mode and friends;
    they run unchanged (each is documented as having no effect here), and a tokenizer mode Inferneo lacks is
    refused by name."""
    import inferneo.entrypoints.llm as llm_module
    import inferneo.entrypoints.openai.api_server as api_server

    built = []
    monkeypatch.setattr(llm_module, "LLMEngine", lambda config: built.append(config) or config)
    llm_module.LLM("m", swap_space=4, disable_custom_all_reduce=True, max_seq_len_to_capture=8192,
                   tokenizer_mode="auto", code_revision="main")
    assert built[-1].swap_space == 4 and built[-1].tokenizer_mode == "auto"
    with pytest.raises(ValueError, match="tokenizer_mode 'mistral' is not supported"):
        EngineConfig(tokenizer_mode="mistral")
    calls = []
    monkeypatch.setattr(api_server, "serve", lambda *a, **kw: calls.append((a, kw)) or 0)
    assert cli_main.main(["serve", "m", "--swap-space", "16", "--disable-custom-all-reduce", "--tokenizer-mode", "hf",
                          "--max-seq-len-to-capture", "8192", "--enable-prompt-tokens-details",
                          "--disable-frontend-multiprocessing"]) == 0
    (config, *_), kw = calls[-1]
    assert kw["engine_in_process"] is True and config.disable_custom_all_reduce is True
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "m", "--tokenizer-mode", "mistral"])
    assert "--tokenizer-mode" in capsys.readouterr().err
