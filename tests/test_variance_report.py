"""benchmarks/variance_report.py: the per-group comparison and the regression check of two saved runs.

The runs are built the way the suite builds its pytest-benchmark JSON (``_variance.group_rows`` as ``extra_info``)
from real batch estimates on the exact bandit, so that the regression check is tested with real standard errors.
"""

from __future__ import annotations

import functools
import json
import math

import pytest

from benchmarks import _variance, variance_report
from pgvar.compare import sample_problem_estimates

ROWS = ["none", "optimal", "value", "true_value"]


def _run(sampling_seed: int, worse: str | None = None) -> dict:
    """A fresh copy of :func:`_saved_run`."""
    return json.loads(_saved_run(sampling_seed, worse))


@functools.cache
def _saved_run(sampling_seed: int, worse: str | None = None, n_batches: int = 200) -> str:
    """A saved run of the bandit group; ``worse``: that estimator deliberately made worse (its baseline dropped:
    its estimates are those of ``none``)."""
    engine = [_variance.BY_NAME[name].problem for name in ROWS]
    paired = sample_problem_estimates(
        "bandit", engine, batch_size=16, n_batches=n_batches, seed=0, sampling_seed=sampling_seed
    )
    if worse is not None:
        paired.estimates[_variance.BY_NAME[worse].problem] = paired.estimates["none"].clone()
    rows = _variance.group_rows(paired, ROWS, "bandit|exact", "exact", "test")
    benchmarks = []
    for name, row in rows.items():
        row = dict(row, group_wall_seconds=1.0)
        seconds = 2e-3 if name == "value" else 1e-3
        benchmarks.append({"extra_info": row, "stats": {"min": seconds, "rounds": 3}, "name": name})
    return json.dumps({"benchmarks": benchmarks, "datetime": "2026-01-01T00:00:00", "commit_info": {"id": "abc"}})


@pytest.fixture(scope="module")
def base_run() -> dict:
    return _run(sampling_seed=1)


def test_regression_check_fails_on_a_deliberately_worse_estimator(base_run):
    found = variance_report.regressions(base_run, _run(sampling_seed=1, worse="optimal"))
    worse = {r["estimator"] for r in found if r["worse"]}
    assert worse == {"optimal"}
    row = next(r for r in found if r["estimator"] == "optimal")
    assert row["variance_new"] > row["variance_old"] and row["z"] > row["threshold"]


def test_regression_check_passes_on_a_rerun(base_run):
    rerun = _run(sampling_seed=1)
    found = variance_report.regressions(base_run, rerun)
    assert all(r["z"] == 0.0 and not r["worse"] for r in found)
    # a rerun with other batches (same policy) differs by noise only: no false alarm at the Bonferroni threshold
    other = variance_report.regressions(base_run, _run(sampling_seed=2))
    assert not any(r["worse"] for r in other), [(r["estimator"], r["z"]) for r in other]
    assert all(math.isfinite(r["z"]) for r in other)


def test_regression_check_command_exit_codes(base_run, tmp_path, capsys):
    old, new, bad = tmp_path / "old.json", tmp_path / "new.json", tmp_path / "bad.json"
    old.write_text(json.dumps(base_run))
    new.write_text(json.dumps(_run(sampling_seed=1)))
    bad.write_text(json.dumps(_run(sampling_seed=1, worse="true_value")))
    assert variance_report.main(["--compare", str(old), str(new)]) == 0
    assert variance_report.main(["--compare", str(old), str(bad)]) == 1
    assert "WORSE" in capsys.readouterr().out


def test_comparison_ratios_against_the_reference(base_run, tmp_path):
    report = variance_report.comparison(base_run)
    rows = report["groups"]["bandit|exact"]["rows"]
    assert rows["value"]["variance_ratio"] == 1.0 and rows["value"]["time_ratio"] == 1.0
    assert rows["none"]["time_ratio"] == pytest.approx(0.5)
    assert rows["none"]["variance_ratio"] == pytest.approx(rows["none"]["variance"] / rows["value"]["variance"])
    assert rows["true_value"]["variance_ratio"] < rows["none"]["variance_ratio"]
    table = variance_report.group_table(report["groups"]["bandit|exact"])
    assert "| value (reference) | 1 ± " in table and "max bias z" in table
    # the command writes the comparison JSON and the Markdown table next to the run
    path = tmp_path / "run.json"
    path.write_text(json.dumps(base_run))
    assert variance_report.main([str(path)]) == 0
    written = json.loads((tmp_path / "run-report.json").read_text())
    assert written["groups"]["bandit|exact"]["rows"]["none"]["variance_ratio"] == pytest.approx(
        rows["none"]["variance_ratio"]
    )
    assert (tmp_path / "run-report.md").read_text().startswith("## bandit (exact gradient)")


def test_bad_input(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"benchmarks": [{"extra_info": {}, "stats": {}}]}))
    with pytest.raises(ValueError, match="no benchmark of the variance suite"):
        variance_report.load_run(empty)
    run = _run(sampling_seed=1)
    other_size = _run(sampling_seed=1)
    for bench in other_size["benchmarks"]:
        bench["extra_info"]["settings"]["n_batches"] = 30
    with pytest.raises(ValueError, match="same settings"):
        variance_report.regressions(run, other_size)
    with pytest.raises(ValueError, match="alpha"):
        variance_report.regressions({"benchmarks": []}, {"benchmarks": []}, alpha=2.0)
