"""Runs benchmarks/qprop_mirage.py in smoke mode: the three learners, the figure, the table, and the speed table."""

from __future__ import annotations

import math

import pytest
import qprop_mirage


@pytest.mark.slow
def test_qprop_mirage_benchmark_runs_in_smoke_mode(tmp_path):
    figure, table = tmp_path / "curves.png", tmp_path / "table.md"
    results = qprop_mirage.main(["--smoke", "--out", str(figure), "--table", str(table)])
    assert figure.stat().st_size > 10_000  # a real PNG
    assert {r["learner"] for r in results} == set(qprop_mirage.LEARNERS)
    for result in results:
        assert len(result["episodes"]) > 0 and math.isfinite(qprop_mirage.final_return(result))
        if result["learner"] != "TRPO":  # the control variate was on in the second iteration
            assert result["logged"]["pgvar/qprop_critic_updates"] > 0
            assert math.isfinite(result["logged"]["pgvar/qprop_critic_explained_variance"])
    text = table.read_text()
    for learner in qprop_mirage.LEARNERS:
        assert f"| {learner} |" in text


@pytest.mark.slow
def test_qprop_speed_table_runs_in_smoke_mode(tmp_path):
    table = tmp_path / "speed.md"
    text = qprop_mirage.main(["--smoke", "--speed", "--table", str(table)])
    for name in ("PPO", "QPropPPO", "TRPO", "QPropTRPO"):
        assert f"| {name} |" in text
    assert table.read_text().strip() == text.strip()
