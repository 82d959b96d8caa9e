r"""Paired comparison of policy-gradient estimators on shared batches: numbers only.

Every estimator sees the *same* sampled batches, so differences between them are not sampling luck. Two engines:

- :func:`compare_on_problem` (:mod:`pgvar.compare.problem_engine`): on a problem whose exact gradient is known
  (:mod:`pgvar.problems`), the bias of each estimator against the exact gradient with its standard error, the
  variance of one batch estimate, the SNR and the cosine to the exact gradient.
- :func:`compare_on_env` (:mod:`pgvar.compare.env_engine`): on a gymnasium environment, at a fixed SB3 policy,
  every baseline x normalization choice against a large-batch reference gradient.

For the benchmark suite (``benchmarks/test_variance_suite.py``), :func:`sample_problem_estimates` and
:func:`sample_env_estimates` return every estimator's raw batch estimates on shared batches
(:class:`PairedEstimates`), from :class:`ProblemEstimators` and :class:`EnvEstimators` (every row on real
environments: learned V at lambda 0.95 and 1, a Monte Carlo V by state restore, the horizon-aware V, Q-Prop with
fixed / conservative / adaptive eta and consistent / as-published normalization, the all-action control variate, the
factorized action-dependent baseline), and :func:`estimator_metrics` turns one estimator's estimates into the
suite's metrics.

Both engines return the dataclasses of :mod:`pgvar.compare.results`. The value functions and critics the problem
engine fits live in :mod:`pgvar.compare.fitted` (the env engine's networks in :mod:`pgvar.compare.env_fitted`); the
environment samplers in :mod:`pgvar.rollouts`. The constant baselines have the names of the algorithms' ``baseline`` option (``none``, ``mean``, ``optimal``) in both engines
and in the ``pgvar compare`` command, which calls this package.
"""

from pgvar.compare.env_engine import ENV_BASELINES, ENV_NORMALIZATIONS, compare_on_env
from pgvar.compare.env_estimators import (
    ENV_ESTIMATORS,
    EnvEstimators,
    applicable_env_estimators,
    sample_env_estimates,
)
from pgvar.compare.metrics import estimator_metrics, variance_standard_error
from pgvar.compare.problem_engine import (
    ALL_ESTIMATORS,
    ESTIMATORS,
    PROBLEM_SPECIFIC_ESTIMATORS,
    PROBLEMS,
    ProblemEstimators,
    applicable_problem_estimators,
    compare_on_problem,
    make_problem,
    sample_problem_estimates,
)
from pgvar.compare.results import (
    ComparisonResult,
    EnvComparisonResult,
    EnvEstimatorSummary,
    EstimatorSummary,
    PairedEstimates,
    library_versions,
)
from pgvar.rollouts import RolloutBatch, collect_rollout

__all__ = [
    "ALL_ESTIMATORS",
    "ENV_BASELINES",
    "ENV_ESTIMATORS",
    "ENV_NORMALIZATIONS",
    "ESTIMATORS",
    "PROBLEMS",
    "PROBLEM_SPECIFIC_ESTIMATORS",
    "ComparisonResult",
    "EnvComparisonResult",
    "EnvEstimatorSummary",
    "EnvEstimators",
    "EstimatorSummary",
    "PairedEstimates",
    "ProblemEstimators",
    "RolloutBatch",
    "applicable_env_estimators",
    "applicable_problem_estimators",
    "collect_rollout",
    "compare_on_env",
    "compare_on_problem",
    "estimator_metrics",
    "library_versions",
    "make_problem",
    "sample_env_estimates",
    "sample_problem_estimates",
    "variance_standard_error",
]
