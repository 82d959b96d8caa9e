"""Runs benchmarks/soft_q_learning.py in smoke mode: both learners on both envs, a figure and a table come out."""

from __future__ import annotations

import math

import pytest
import soft_q_learning


@pytest.mark.slow
def test_soft_q_learning_benchmark_runs_in_smoke_mode(tmp_path):
    figure, table = tmp_path / "curves.png", tmp_path / "table.md"
    results = soft_q_learning.main(["--smoke", "--out", str(figure), "--table", str(table)])
    assert figure.stat().st_size > 10_000  # a real PNG with two panels
    runs = {(r["env"], r["learner"]) for r in results}
    assert runs == {
        (env, learner) for env in soft_q_learning.ENVS for learner in soft_q_learning.DEFAULT_LEARNERS
    }
    for result in results:
        assert len(result["episodes"]) > 0 and math.isfinite(result["eval"])
    text = table.read_text()
    for env in soft_q_learning.ENVS:
        assert text.count(f"| {env} |") == len(soft_q_learning.DEFAULT_LEARNERS)
