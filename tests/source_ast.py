"""Parsing the package's own source files in tests that scan it (imports, engine options, the runner interface)."""

from __future__ import annotations

import ast
from pathlib import Path


def parse_file(path: Path) -> ast.Module:
    """``ast.parse`` of ``path``, again when CPython 3.11 raises its spurious "AST constructor recursion depth
    mismatch" (python/cpython#106905: 3.11 keeps that depth per interpreter, so another thread parsing at the same
    time, e.g. one a library left running from an earlier test, corrupts it; seen twice in full runs here)."""
    for attempt in range(3):
        try:
            return ast.parse(path.read_text(), str(path))
        except SystemError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")
