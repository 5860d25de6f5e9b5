"""``inferneo serve --config FILE`` (vLLM's flag): the YAML file's flags reach the engine and server settings as the
same flags on the command line would, the command line wins over the file and the file over the defaults, and a
file that names an unknown flag, a wrong value or a non-switch for a switch is refused before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferneo.cli import main as cli_main
from inferneo.config import EngineConfig


@pytest.fixture
def served(monkeypatch):
    """The arguments ``inferneo serve`` passes to the server, in place of starting one."""
    import inferneo.entrypoints.openai.api_server as api_server

    calls = []
    monkeypatch.setattr(api_server, "serve", lambda *a, **kw: calls.append((a, kw)) or 0)
    return calls


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "serve.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


FILE = """\
model: some-model
port: 8081
host: 0.0.0.0
max-num-seqs: 64
enable_prefix_caching: false
enforce-eager: true
served-model-name: [qwen, default]
override-generation-config: {temperature: 0.6, top_p: 0.9}
speculative-config: {method: ngram, num_speculative_tokens: 3}
kv-cache-memory: 1GiB
max-queued-requests: 7
disable-access-log: true
block-size: null
"""


def test_the_files_flags_are_the_command_lines(served, tmp_path):
    path = _yaml(tmp_path, FILE)
    assert cli_main.main(["serve", "--config", path]) == 0
    from_file = served[-1]
    assert cli_main.main(["serve", "--model", "some-model", "--port", "8081", "--host", "0.0.0.0",
                          "--max-num-seqs", "64", "--no-enable-prefix-caching", "--enforce-eager",
                          "--served-model-name", "qwen", "default",
                          "--override-generation-config", '{"temperature": 0.6, "top_p": 0.9}',
                          "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}',
                          "--kv-cache-memory", "1GiB", "--max-queued-requests", "7", "--disable-access-log"]) == 0
    assert from_file == served[-1]
    (config, names, host, port, _keys), kw = from_file
    assert config == EngineConfig(model="some-model", max_num_seqs=64, enable_prefix_caching=False,
                                  enforce_eager=True, override_generation_config={"temperature": 0.6, "top_p": 0.9},
                                  speculative_config=config.speculative_config, kv_cache_memory=2**30)
    assert config.speculative_config.num_speculative_tokens == 3
    assert (names, host, port) == (["qwen", "default"], "0.0.0.0", 8081)
    assert kw["max_queued_requests"] == 7 and kw["access_log"] is False


def test_the_command_line_wins_over_the_file_and_the_file_over_the_defaults(served, tmp_path):
    path = _yaml(tmp_path, FILE)
    assert cli_main.main(["serve", "--max-num-seqs", "3", f"--config={path}", "--enable-prefix-caching",
                          "--served-model-name", "mine"]) == 0
    (config, names, _host, port, _keys), _kw = served[-1]
    assert config.max_num_seqs == 3 and config.enable_prefix_caching is True
    assert names == ["mine"] and port == 8081 and config.enforce_eager is True  # from the file
    assert config.block_size == EngineConfig().block_size  # null: the default
    # the positional model wins over the file's model
    assert cli_main.main(["serve", "other-model", "--config", path]) == 0
    assert served[-1][0][0].model == "other-model"


@pytest.mark.parametrize(("text", "message"), [
    ("bogus-flag: 1\n", "'bogus-flag' is not a flag of this command"),
    ("port: abc\n", "argument --port: a TCP port is a number"),
    ("enforce-eager: yes please\n", "enforce-eager is a switch: give true or false"),
    ("dtype: fp8\n", "argument --dtype: invalid choice"),
    ("port: [1, 2]\n", "port takes one value, not a list"),
    ("- port\n- 8000\n", "must be a mapping of flag names to values"),
    ("port: [unclosed\n", "not valid YAML"),
    ("config: other.yaml\n", "cannot name another config file"),
])
def test_a_bad_file_is_refused_before_a_model_loads(served, tmp_path, capsys, text, message):
    with pytest.raises(SystemExit) as exc:
        cli_main.main(["serve", "--config", _yaml(tmp_path, text)])
    assert exc.value.code == 2 and not served
    assert message in capsys.readouterr().err


def test_a_missing_file_and_a_command_without_the_flag_are_usage_errors(served, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main.main(["serve", "--config", str(tmp_path / "absent.yaml")])
    assert "cannot read it" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main.main(["generate", "a prompt", "--config", _yaml(tmp_path, "port: 1\n")])
    assert "unrecognized arguments: --config" in capsys.readouterr().err
    assert not served


def test_an_empty_file_changes_nothing(served, tmp_path):
    assert cli_main.main(["serve", "m", "--config", _yaml(tmp_path, "# nothing yet\n")]) == 0
    assert served[-1][0][0] == EngineConfig(model="m")
