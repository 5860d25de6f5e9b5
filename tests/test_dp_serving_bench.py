"""``benchmarks/dp_serving.py --smoke`` runs both comparisons end to end (real servers, the tiny model)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

import dp_serving  # noqa: E402


@pytest.mark.slow
def test_dp_serving_smoke_runs_both_comparisons(tmp_path):
    out = tmp_path / "dp.jsonl"
    lines = dp_serving.run(dp_serving.parse_args(["--smoke", "--out", str(out)]))
    summaries = {line["comparison"]: line for line in lines if "ratio_a_over_b" in line}
    assert set(summaries) == {"w1_dp_vs_separate", "shared_prefix_vs_round_robin"}
    assert all(s["a_output_tok_s"] > 0 and s["b_output_tok_s"] > 0 for s in summaries.values())
    shared = summaries["shared_prefix_vs_round_robin"]
    # Four requests per system prompt, one at a time: routed by prefix only the first of each misses; round-robin
    # puts each system prompt's requests on both replicas (in the seed's order), so a second miss for each.
    assert shared["a_prefix_hit_rate"] > shared["b_prefix_hit_rate"]
    assert len(out.read_text().splitlines()) == len(lines)
