"""The "Batch jobs on Ray" quick start of docs/distributed.md, run as written on the shared local Ray cluster
(its ``ray.init()`` joins the cluster the session already started instead of starting another one)."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.ray
@pytest.mark.slow  # loads the bundled default model in a replica
def test_ray_batch_quick_start_runs(ray_cluster, monkeypatch):
    import ray

    text = (REPO / "docs" / "distributed.md").read_text()
    section = text.split("## Batch jobs on Ray", 1)[1].split("\n## ", 1)[0]
    (block,) = [b for b in re.findall(r"^```python\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)
                if "ray.init()" in b]
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: None)  # already connected to the session's cluster
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "<docs/distributed.md>", "exec"), namespace)
    lines = out.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["1", "2", "3"], lines
    assert all(line.split()[1] in ("stop", "length") for line in lines), lines
    assert json.loads(ast.literal_eval(lines[2].split(maxsplit=2)[2])) in ("yes", "no"), lines[2]
