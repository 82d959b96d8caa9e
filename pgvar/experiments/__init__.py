"""Many training runs: sweeps of learners x environments x seeds, run locally or on Ray, and their aggregates.

- :func:`load_sweep_config` reads a TOML grid (or a shipped one: :func:`shipped_configs`);
- :func:`run_sweep` runs its units on a local process pool (default) or a Ray cluster, idempotently: finished
  units are skipped, interrupted ones resume exactly from their checkpoint (:mod:`pgvar.checkpoint`);
- :func:`aggregate_results` computes rliable-style aggregates (IQM, mean, stratified bootstrap intervals,
  probability of improvement, learning curves with bands);
- :func:`exact_frontier` and :func:`env_frontier` trace true reward against divergence from a reference policy for
  each regularizer (exactly on the reward-hacking problems, measured on a MuJoCo task with a speed-limit proxy);
- :func:`decompose_training` measures the Mirage variance decomposition at checkpoints of a training run, its
  states spread over the same backends.

The command line is ``pgvar sweep CONFIG``, ``pgvar aggregate RESULTS`` and ``pgvar decompose --env ID``, ``pgvar frontier``.
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
from pgvar.experiments.frontier import EXACT_PROBLEMS, FRONTIER_FAMILIES, exact_frontier, kl_gradient_variance
from pgvar.experiments.frontier_env import (
    EnvLearner,
    default_env_learners,
    env_frontier,
    evaluate_against_reference,
)
from pgvar.experiments.unit import run_unit

__all__ = [
    "BACKENDS",
    "DECOMPOSITION_ALGORITHMS",
    "DecompositionRun",
    "EXACT_PROBLEMS",
    "EnvLearner",
    "FRONTIER_FAMILIES",
    "default_env_learners",
    "env_frontier",
    "evaluate_against_reference",
    "exact_frontier",
    "kl_gradient_variance",
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
