"""Aggregates on synthetic results: known IQM, bootstrap intervals and probabilities of improvement."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pgvar.experiments import (
    SweepConfig,
    aggregate_results,
    interquartile_mean,
    probability_of_improvement,
    stratified_bootstrap_interval,
)
from pgvar.experiments.unit import unit_folder, write_json


def test_interquartile_mean_matches_a_loop_over_sorted_values():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 4, 5, 8, 10, 13):
        values = rng.normal(size=n)
        cut = n // 4
        expected = float(np.mean(sorted(values)[cut : n - cut]))
        assert interquartile_mean(values) == pytest.approx(expected)


def test_probability_of_improvement_matches_pair_enumeration():
    x, y = np.array([1.0, 2.0, 2.0, 5.0]), np.array([2.0, 3.0, 0.0])
    pairs = list(itertools.product(x, y))
    expected = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert probability_of_improvement(x, y) == pytest.approx(expected)
    assert probability_of_improvement(y, x) == pytest.approx(1 - expected)


def test_bootstrap_interval_of_the_mean_matches_its_exact_distribution():
    """Mean of 4 draws from {0, 0, 0, 10} is 2.5 K with K ~ Binomial(4, 1/4): 2.5% and 97.5% points are 0 and 7.5."""
    scores = [np.array([0.0, 0.0, 0.0, 10.0])]
    point, low, high = stratified_bootstrap_interval(
        scores, lambda s: float(np.mean(s[0])), reps=20_000, seed=1
    )
    assert (point, low, high) == (2.5, 0.0, 7.5)


def test_bootstrap_is_stratified_by_task():
    """Two tasks with constant runs: any resample keeps each task's value, so the interval is a point."""
    scores = [np.full(5, 1.0), np.full(3, 7.0)]
    point, low, high = stratified_bootstrap_interval(
        scores, lambda s: float(np.mean(np.concatenate(s))), reps=500
    )
    assert point == low == high == pytest.approx((5 * 1 + 3 * 7) / 8)


def write_synthetic_sweep(folder, finals: dict[str, list[float]]) -> SweepConfig:
    config = SweepConfig.from_dict(
        {
            "envs": ["Fake-v0"],
            "seeds": list(range(len(next(iter(finals.values()))))),
            "total_timesteps": 1000,
            "learners": {name: {"algo": "PPO"} for name in finals},
            "reference": {"Fake-v0": {"a": {"mean": 1.0, "sd": 0.5}}},
        }
    )
    from dataclasses import asdict

    write_json(folder / "sweep.json", {"name": "synthetic", "config": asdict(config)})
    for unit in config.units():
        value = finals[unit.learner.name][unit.seed]
        episodes = [[step, value * step / 1000, 10] for step in range(100, 1001, 100)]
        result = {"final_return": value, "episodes": episodes, "num_timesteps": 1000,
                  "versions": {"torch": "x"}, "machine": {"cpus": 2}}  # fmt: skip
        path = unit_folder(folder, unit)
        path.mkdir(parents=True)
        write_json(path / "result.json", result)
    return config


def test_aggregate_results_on_a_synthetic_sweep(tmp_path):
    finals = {"a": [0.0, 0.0, 0.0, 10.0], "b": [1.0, 2.0, 3.0, 100.0]}
    write_synthetic_sweep(tmp_path, finals)
    result = aggregate_results(tmp_path, reps=20_000, seed=1)
    rows = {row["learner"]: row for row in result.rows}
    assert (rows["a"]["mean"], rows["a"]["mean_low"], rows["a"]["mean_high"]) == (2.5, 0.0, 7.5)
    assert rows["a"]["iqm"] == 0.0 and rows["b"]["iqm"] == 2.5  # middle two of four
    assert rows["a"]["reference"] == {"mean": 1.0, "sd": 0.5} and "reference" not in rows["b"]
    point, low, high = result.improvement["Fake-v0"]["b", "a"]
    assert point == pytest.approx(probability_of_improvement(np.array(finals["b"]), np.array(finals["a"])))
    assert low <= point <= high
    curve = result.curves["Fake-v0", "b"]
    assert len(curve["steps"]) == 50 and curve["mean"][-1] == pytest.approx(np.mean(finals["b"]))
    assert result.missing == [] and result.provenance["versions"] == [{"torch": "x"}]


def test_aggregate_lists_missing_units_and_rejects_other_folders(tmp_path):
    config = write_synthetic_sweep(tmp_path, {"a": [1.0, 2.0]})
    (unit_folder(tmp_path, config.units()[1]) / "result.json").unlink()
    assert aggregate_results(tmp_path, reps=100).missing == ["a/Fake-v0/seed1"]
    with pytest.raises(ValueError, match="not a sweep's results folder"):
        aggregate_results(tmp_path / "units")
