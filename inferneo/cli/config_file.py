"""``--config FILE``: a command's flags read from a YAML file, as ``vllm serve --config`` reads them.

The file maps flag names (their long form, with ``-`` or ``_``) to values::

    model: Qwen/Qwen3-8B
    port: 8080
    max-num-seqs: 64
    enable-prefix-caching: false
    served-model-name: [qwen, default]
    override-generation-config: {temperature: 0.6}

A ``true`` turns a switch on, a ``false`` off (``--no-NAME``); a list gives a flag that takes several values its
values; a mapping is passed as JSON; ``null`` leaves the flag at its default. Each value goes through the same
checks as on the command line. A flag given on the command line wins over the file, which wins over the defaults;
the model given as the positional argument wins over the file's ``model``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

CONFIG_FLAG = "--config"


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    """The ``--config FILE`` flag, for ``--help`` (``parse_args_with_config_file`` reads it before parsing)."""
    parser.add_argument(CONFIG_FLAG, metavar="FILE", default=None,
                        help="read flags from a YAML file (flag names as keys, e.g. 'max-num-seqs: 64'); flags on "
                        "the command line win over the file")


def parse_args_with_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with the flags of a ``--config FILE`` in ``argv`` (given after a sub-command
    that has the flag) as the sub-command's defaults."""
    path, rest = _take_config_flag(argv)
    if path is None:
        return parser.parse_args(argv)
    command = _command_parser(parser, rest)
    if command is None or not any(CONFIG_FLAG in action.option_strings for action in command._actions):
        return parser.parse_args(argv)  # argparse's own "unrecognized arguments" for a command without it
    values = read_config_file(path, command)
    tokens = config_tokens(command, values, path)
    try:
        from_file = command.parse_args(tokens)
    except SystemExit:
        print(f"{command.prog}: error: in --config {path}", file=sys.stderr)
        raise
    dests = {_action(command, key, path).dest for key in values if values[key] is not None}
    command.set_defaults(**{dest: getattr(from_file, dest) for dest in dests})
    return parser.parse_args(rest)


def read_config_file(path: str, command: argparse.ArgumentParser) -> dict[str, Any]:
    """The file's mapping of flag names to values; exits with a usage error when it is not one."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        command.error(f"--config {path}: cannot read it: {exc.strerror or exc}")
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        command.error(f"--config {path}: not valid YAML: {exc}")
    if values is None:
        return {}
    if not isinstance(values, dict) or not all(isinstance(key, str) for key in values):
        command.error(f"--config {path}: the file must be a mapping of flag names to values (e.g. 'port: 8080')")
    if CONFIG_FLAG.removeprefix("--") in values:
        command.error(f"--config {path}: a config file cannot name another config file")
    return values


def config_tokens(command: argparse.ArgumentParser, values: dict[str, Any], path: str) -> list[str]:
    """The command-line tokens that give ``values`` (see the module's docstring for each kind of value)."""
    tokens: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        action = _action(command, key, path)
        flag = _long_flag(key)
        if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
            if not isinstance(value, bool):
                command.error(f"--config {path}: {key} is a switch: give true or false, not {value!r}")
            if value:
                tokens.append(flag)
            elif isinstance(action, argparse.BooleanOptionalAction):
                tokens.append("--no-" + flag.removeprefix("--"))
            continue
        if isinstance(value, list):
            if action.nargs not in ("+", "*") and not isinstance(action.nargs, int):
                command.error(f"--config {path}: {key} takes one value, not a list")
            tokens += [flag, *(_text(item) for item in value)]
        else:
            tokens += [flag, _text(value)]
    return tokens


def _take_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """The ``--config`` path (the last one given) and ``argv`` without it."""
    path, rest, tokens = None, [], iter(argv)
    for token in tokens:
        if token == CONFIG_FLAG:
            path = next(tokens, None)
            if path is None:
                return None, argv  # argparse says the value is missing
        elif token.startswith(CONFIG_FLAG + "="):
            path = token.partition("=")[2]
        else:
            rest.append(token)
    return path, rest


def _command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser | None:
    """The (innermost) sub-command parser that ``argv`` names."""
    found = None
    current = parser
    for token in argv:
        subcommands = next((a for a in current._actions if isinstance(a, argparse._SubParsersAction)), None)
        if subcommands is None:
            break
        if token in subcommands.choices:
            current = found = subcommands.choices[token]
    return found


def _long_flag(key: str) -> str:
    return "--" + key.strip().removeprefix("--").replace("_", "-")


def _action(command: argparse.ArgumentParser, key: str, path: str) -> argparse.Action:
    flag = _long_flag(key)
    for action in command._actions:
        if flag in action.option_strings:
            return action
    command.error(f"--config {path}: {key!r} is not a flag of this command (see --help)")
    raise AssertionError  # error() exits


def _text(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
