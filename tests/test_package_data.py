"""The package ships every data file its code reads: tuned kernel tables and native sources."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_every_non_python_file_of_the_package_is_package_data():
    """A file under ``inferneo/`` that is not Python (a tiling table, a C++ source) is found at run time next to
    the module that reads it, so a wheel without it runs with untuned defaults or no native kernels. Every such
    file must match a ``[tool.setuptools.package-data]`` pattern."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["inferneo"]
    package = ROOT / "inferneo"
    data = [p.relative_to(package).as_posix() for p in package.rglob("*")
            if p.is_file() and p.suffix in {".json", ".cpp", ".h", ".cu", ".jinja", ".txt"}]
    assert data, "expected kernel tables and native sources under inferneo/"
    missing = [f for f in data if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)]
    assert not missing, f"not in package-data, so not in the wheel: {missing}"
