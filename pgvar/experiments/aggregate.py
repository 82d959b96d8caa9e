r"""Aggregates over seeds in the style of rliable (Agarwal et al. 2021, arXiv:2108.13264).

Per learner and environment: the mean and the interquartile mean (IQM, the mean of the middle 50% of runs) of the
final returns, each with a percentile confidence interval from a stratified bootstrap (runs resampled with
replacement within each environment); the probability of improvement
:math:`P(X > Y) + \tfrac12 P(X = Y)` between two learners (the Mann-Whitney statistic over runs, averaged over
environments) with its bootstrap interval; and learning curves on a common step grid with bootstrap bands.

Why not the ``rliable`` package itself: rliable 1.2 needs ``arch`` for its bootstrap, and ``arch`` 7.2 fails to
import with pandas 3 (``TypeError`` in ``deprecate_kwarg``, tried on this project's machine), besides pulling in
pandas, statsmodels and seaborn. The statistics are a few lines of numpy; they follow rliable's definitions
(``metrics.aggregate_iqm`` = ``scipy.stats.trim_mean(scores, 0.25)``, ``StratifiedBootstrap`` percentile
intervals, ``probability_of_improvement``), and the tests check them against hand-computed values.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pgvar.experiments.unit import read_json

__all__ = [
    "AggregateResult",
    "aggregate_results",
    "interquartile_mean",
    "probability_of_improvement",
    "stratified_bootstrap_interval",
]


def interquartile_mean(scores: np.ndarray) -> float:
    """Mean of the scores left after cutting ``floor(0.25 n)`` from each end (``scipy.stats.trim_mean(x, 0.25)``).

    >>> interquartile_mean(np.array([1.0, 2.0, 3.0, 4.0, 100.0, -50.0, 5.0, 6.0]))
    3.5
    """
    values = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    cut = int(0.25 * values.size)
    return float(values[cut : values.size - cut].mean())


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """:math:`P(X > Y) + \\tfrac12 P(X = Y)` for independent runs ``x`` of one learner and ``y`` of another.

    >>> probability_of_improvement(np.array([1.0, 2.0, 3.0]), np.array([0.0, 2.0]))
    0.75
    """
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    greater = (x[:, None] > y[None, :]).mean()
    equal = (x[:, None] == y[None, :]).mean()
    return float(greater + 0.5 * equal)


def stratified_bootstrap_interval(
    scores: list[np.ndarray],
    statistic: Callable[[list[np.ndarray]], float],
    *,
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Point estimate and percentile bootstrap interval of ``statistic`` over tasks' runs.

    Each task's runs (``scores[k]``, one entry per seed) are resampled with replacement independently of the
    other tasks' (stratified), ``reps`` times.

    :return: ``(point, low, high)``
    """
    rng = np.random.default_rng(seed)
    point = statistic(scores)
    samples = np.empty(reps)
    for rep in range(reps):
        resampled = [task[rng.integers(0, len(task), len(task))] for task in scores]
        samples[rep] = statistic(resampled)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return point, float(low), float(high)


@dataclasses.dataclass
class AggregateResult:
    """What :func:`aggregate_results` returns; the CLI renders it as a Markdown table and a plot."""

    #: one row per (env, learner): n, mean, mean_low, mean_high, iqm, iqm_low, iqm_high, finals, reference
    rows: list[dict[str, Any]]
    #: per (env, learner): ``{"steps": [...], "mean": [...], "low": [...], "high": [...]}``
    curves: dict[tuple[str, str], dict[str, list[float]]]
    #: per env: ``{(a, b): (point, low, high)}`` probability that learner a improves on learner b
    improvement: dict[str, dict[tuple[str, str], tuple[float, float, float]]]
    #: units that failed or have not finished
    missing: list[str]
    #: the sweep's ``sweep.json``
    sweep: dict[str, Any]
    #: versions and machine of the units (distinct values)
    provenance: dict[str, list[Any]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the tuple keys of ``curves`` and ``improvement`` become fields of list entries."""
        return {
            "rows": self.rows,
            "curves": [{"env": env, "learner": learner, **curve} for (env, learner), curve in self.curves.items()],
            "improvement": [
                {"env": env, "learner": a, "over": b, "probability": p, "low": low, "high": high}
                for env, pairs in self.improvement.items()
                for (a, b), (p, low, high) in pairs.items()
            ],
            "missing": self.missing,
            "sweep": self.sweep,
            "provenance": self.provenance,
        }


def _binned_curve(episodes: list[list[float]], grid: np.ndarray) -> np.ndarray:
    """The mean return of the episodes that ended in each bin ``(grid[i-1], grid[i]]``, carried forward."""
    steps = np.array([episode[0] for episode in episodes], dtype=np.float64)
    returns = np.array([episode[1] for episode in episodes], dtype=np.float64)
    values = np.full(grid.size, np.nan)
    previous = -np.inf
    last = np.nan
    for index, edge in enumerate(grid):
        inside = (steps > previous) & (steps <= edge)
        if inside.any():
            last = float(returns[inside].mean())
        values[index] = last
        previous = edge
    return values


def aggregate_results(
    results: str | os.PathLike[str],
    *,
    reps: int = 2000,
    confidence: float = 0.95,
    curve_points: int = 50,
    seed: int = 0,
) -> AggregateResult:
    """Read a sweep's results folder and aggregate the final returns and curves over seeds.

    :param results: a folder written by :func:`pgvar.experiments.run_sweep`
    :param reps: bootstrap resamples
    :param confidence: interval level
    :param curve_points: points of the common step grid of the learning curves
    :param seed: seed of the bootstrap
    """
    results = Path(results)
    sweep_path = results / "sweep.json"
    if not sweep_path.exists():
        raise ValueError(f"results={str(results)!r} is not a sweep's results folder (no sweep.json)")
    sweep = read_json(sweep_path)
    config = sweep["config"]
    reference = config.get("reference", {})
    finished: dict[tuple[str, str], list[dict[str, Any]]] = {}
    missing = []
    provenance: dict[str, list[Any]] = {"versions": [], "machine": []}
    for env_id in config["envs"]:
        for learner in config["learners"]:
            for seed_value in config["seeds"]:
                unit_id = f"{learner['name']}/{env_id}/seed{seed_value}"
                path = results / "units" / unit_id / "result.json"
                if not path.exists():
                    missing.append(unit_id)
                    continue
                result = read_json(path)
                finished.setdefault((env_id, learner["name"]), []).append(result)
                for key in ("versions", "machine"):
                    if result[key] not in provenance[key]:
                        provenance[key].append(result[key])
    rows, curves = [], {}
    tail = (1 - confidence) / 2 * 100
    for (env_id, learner_name), units in finished.items():
        finals = np.array([unit["final_return"] for unit in units], dtype=np.float64)
        finite = finals[np.isfinite(finals)]
        row: dict[str, Any] = {"env": env_id, "learner": learner_name, "n": int(finite.size),
                               "finals": [float(value) for value in finals]}  # fmt: skip
        if finite.size:
            for name, statistic in (
                ("mean", lambda s: float(np.mean(s[0]))),
                ("iqm", lambda s: interquartile_mean(s[0])),
            ):
                point, low, high = stratified_bootstrap_interval(
                    [finite], statistic, reps=reps, confidence=confidence, seed=seed
                )
                row.update({name: point, f"{name}_low": low, f"{name}_high": high})
        published = reference.get(env_id, {}).get(learner_name)
        if published is not None:
            row["reference"] = published
        rows.append(row)
        total = max(unit["num_timesteps"] for unit in units)
        grid = np.linspace(total / curve_points, total, curve_points)
        per_seed = np.stack([_binned_curve(unit["episodes"], grid) for unit in units])
        rng = np.random.default_rng(seed)
        with warnings.catch_warnings():  # grid points before any episode ended are NaN (not drawn)
            warnings.simplefilter("ignore", RuntimeWarning)
            boot = np.stack(
                [np.nanmean(per_seed[rng.integers(0, len(units), len(units))], axis=0) for _ in range(200)]
            )
            curves[env_id, learner_name] = {
                "steps": grid.tolist(),
                "mean": np.nanmean(per_seed, axis=0).tolist(),
                "low": np.nanpercentile(boot, tail, axis=0).tolist(),
                "high": np.nanpercentile(boot, 100 - tail, axis=0).tolist(),
            }
    improvement: dict[str, dict[tuple[str, str], tuple[float, float, float]]] = {}
    for env_id in config["envs"]:
        names = [learner["name"] for learner in config["learners"] if (env_id, learner["name"]) in finished]
        finals_of = {
            name: np.array(
                [u["final_return"] for u in finished[env_id, name] if math.isfinite(u["final_return"])]
            )
            for name in names
        }
        for a in names:
            for b in names:
                if a == b or not finals_of[a].size or not finals_of[b].size:
                    continue
                point, low, high = stratified_bootstrap_interval(
                    [finals_of[a], finals_of[b]],
                    lambda s: probability_of_improvement(s[0], s[1]),
                    reps=reps, confidence=confidence, seed=seed,
                )  # fmt: skip
                improvement.setdefault(env_id, {})[a, b] = (point, low, high)
    return AggregateResult(rows, curves, improvement, missing, sweep, provenance)
