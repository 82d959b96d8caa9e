"""Many training runs: sweeps of learners x environments x seeds, run locally or on Ray, and their aggregates.

- :func:`load_sweep_config` reads a TOML grid (or a shipped one: :func:`shipped_configs`);
- :func:`run_sweep` runs its units on a local process pool (default) or a Ray cluster, idempotently: finished
  units are skipped, interrupted ones resume exactly from their checkpoint (:mod:`pgvar.checkpoint`);
- :func:`aggregate_results` computes rliable-style aggregates (IQM, mean, stratified bootstrap intervals,
  probability of improvement, learning curves with bands);
- :func:`decompose_training` measures the Mirage variance decomposition at checkpoints of a training run, its
  states spread over the same backends.

The command line is ``pgvar sweep CONFIG``, ``pgvar aggregate RESULTS`` and ``pgvar decompose --env ID``.
"""

from pgvar.experiments.aggregate import (
    AggregateResult,
    aggregate_results,
    interquartile_mean,
    probability_of_improvement,
    stratified_bootstrap_interval,
)
from pgvar.experiments.backends import BACKENDS, SweepProgress, run_sweep
from pgvar.experiments.config import LearnerSpec, SweepConfig, UnitSpec, load_sweep_config, shipped_configs
from pgvar.experiments.decomposition import DECOMPOSITION_ALGORITHMS, DecompositionRun, decompose_training
from pgvar.experiments.unit import run_unit

__all__ = [
    "BACKENDS",
    "DECOMPOSITION_ALGORITHMS",
    "DecompositionRun",
    "AggregateResult",
    "LearnerSpec",
    "SweepConfig",
    "SweepProgress",
    "UnitSpec",
    "aggregate_results",
    "decompose_training",
    "interquartile_mean",
    "load_sweep_config",
    "probability_of_improvement",
    "run_sweep",
    "run_unit",
    "shipped_configs",
    "stratified_bootstrap_interval",
]
