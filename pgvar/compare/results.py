"""What a comparison returns: plain dataclasses of floats, JSON-ready (``to_dict``), with the library versions."""

from __future__ import annotations

import math
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = [
    "PairedEstimates",
    "ComparisonResult",
    "EnvComparisonResult",
    "EnvEstimatorSummary",
    "EstimatorSummary",
    "library_versions",
    "safe_ratio",
]


def library_versions() -> dict[str, str]:
    """Versions that matter for reproducing a number (MuJoCo trajectories drift between releases)."""
    import numpy as np

    import pgvar

    versions = {"pgvar": pgvar.__version__, "torch": torch.__version__, "numpy": np.__version__}
    versions["python"] = platform.python_version()
    for module in ("gymnasium", "stable_baselines3", "sb3_contrib", "mujoco"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:  # pragma: no cover - optional
            pass
    return versions


def safe_ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator`` as a float; over 0 it is ``inf`` (``nan`` for ``0 / 0``), not an error.

    A zero variance is a legitimate measurement (e.g. a same-batch mean baseline on one one-step episode per batch
    gives the estimate 0 every time), so ratios to it are reported as ``inf`` or ``nan``.

    >>> safe_ratio(1.0, 4.0), safe_ratio(1.0, 0.0), safe_ratio(0.0, 0.0)
    (0.25, inf, nan)
    """
    numerator, denominator = float(numerator), float(denominator)
    if denominator != 0.0:
        return numerator / denominator
    if numerator == 0.0 or math.isnan(numerator):
        return math.nan
    return math.copysign(math.inf, numerator)


@dataclass(frozen=True)
class EstimatorSummary:
    """What one estimator did over ``n_batches`` shared batches (all numbers are plain floats).

    :param name: estimator name (a key of :data:`~pgvar.compare.ESTIMATORS`)
    :param description: its learning signal in words
    :param bias_norm: :math:`\\lVert \\bar g - \\nabla J \\rVert` of the mean over batches
    :param bias_max_abs_z: largest per-coordinate :math:`|\\bar g_k - \\nabla J_k| / \\mathrm{SE}_k`
        (a few units for an unbiased estimator; it grows like :math:`\\sqrt{K}` for a biased one)
    :param variance: :math:`\\operatorname{tr}\\operatorname{Var}[\\hat g]` of one batch estimate, across batches
    :param variance_ratio: ``variance`` divided by that of the first estimator of the comparison (``inf`` or
        ``nan`` when that one is 0)
    :param snr: :math:`\\lVert \\nabla J \\rVert^2 / \\text{variance}` (exact gradient, so no plug-in bias;
        ``inf`` for a zero variance)
    :param cosine: mean cosine between a batch estimate and the exact gradient
    :param cosine_se: its standard error over the batches
    :param pairwise_cosine: mean cosine between two batch estimates (Ilyas et al. 2020)
    """

    name: str
    description: str
    bias_norm: float
    bias_max_abs_z: float
    variance: float
    variance_ratio: float
    snr: float
    cosine: float
    cosine_se: float
    pairwise_cosine: float


@dataclass(frozen=True)
class ComparisonResult:
    """A comparison's settings and one :class:`EstimatorSummary` per estimator (see :meth:`to_dict`)."""

    problem: str
    batch_size: int
    n_batches: int
    seed: int
    gamma: float
    gae_lambda: float
    n_parameters: int
    exact_gradient_norm: float
    estimators: list[EstimatorSummary]
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of everything (``json.dumps(result.to_dict())``)."""
        return asdict(self)

    def summary(self, name: str) -> EstimatorSummary:
        """The summary of the estimator called ``name``."""
        for row in self.estimators:
            if row.name == name:
                return row
        raise KeyError(f"no estimator {name!r} in this result; it has {[r.name for r in self.estimators]}")


@dataclass(frozen=True)
class EnvEstimatorSummary:
    """One baseline x normalization choice over ``n_batches`` batches at a fixed policy.

    Normalization rescales the gradient, so every number here is scale-free.

    :param baseline: a key of :data:`~pgvar.compare.ENV_BASELINES`
    :param normalization: one of :data:`~pgvar.compare.ENV_NORMALIZATIONS`
    :param snr: :math:`\\lVert \\bar g \\rVert^2 / \\operatorname{tr}\\operatorname{Var}[\\hat g]` (plug-in)
    :param snr_debiased: the same with the mean's own noise removed,
        :math:`(\\lVert \\bar g \\rVert^2 - \\operatorname{tr}\\operatorname{Var}/K) / \\operatorname{tr}\\operatorname{Var}`
    :param cosine: mean cosine between a batch estimate and the reference gradient
    :param cosine_se: its standard error over the batches
    :param pairwise_cosine: mean cosine between two batch estimates
    """

    baseline: str
    normalization: str
    snr: float
    snr_debiased: float
    cosine: float
    cosine_se: float
    pairwise_cosine: float


@dataclass(frozen=True)
class EnvComparisonResult:
    """Settings of an environment comparison and one :class:`EnvEstimatorSummary` per choice."""

    env_id: str
    batch_steps: int
    n_envs: int
    n_batches: int
    reference_batches: int
    trained_steps: int
    seed: int
    gamma: float
    gae_lambda: float
    minibatch_size: int
    reference: str
    estimators: list[EnvEstimatorSummary]
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of everything."""
        return asdict(self)

    def summary(self, baseline: str, normalization: str) -> EnvEstimatorSummary:
        """The summary of one baseline x normalization choice."""
        for row in self.estimators:
            if (row.baseline, row.normalization) == (baseline, normalization):
                return row
        raise KeyError(f"no estimator ({baseline!r}, {normalization!r}) in this result")


@dataclass
class PairedEstimates:
    """``K`` batch estimates of every estimator of a comparison, all on the same batches (paired), with what the
    benchmark suite needs to time one more estimate.

    :param group: the problem or environment id
    :param estimates: name -> ``[K, P]`` float64 batch estimates
    :param reference: ``[P]`` the exact gradient (``exact``) or a large-batch reference
    :param exact: whether ``reference`` is exact (bias and z-scores are then meaningful)
    :param batch_size: samples behind one batch estimate (episodes or steps: ``batch_unit``)
    :param batch_unit: ``"episodes"`` or ``"steps"``
    :param estimator: the prepared estimators (:class:`~pgvar.compare.ProblemEstimators` or
        :class:`~pgvar.compare.EnvEstimators`): ``estimator.estimates(timing_batch, [name])`` is one estimate
    :param timing_batch: one of the batches
    :param seconds: wall time of the stages (sampling, fitting, reference, estimates)
    :param settings: sizes, seed, discount and the like, JSON-ready
    :param versions: :func:`library_versions`
    """

    group: str
    estimates: dict[str, torch.Tensor]
    reference: torch.Tensor
    exact: bool
    batch_size: int
    batch_unit: str
    estimator: Any
    timing_batch: Any
    seconds: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def time_one(self, name: str) -> torch.Tensor:
        """One estimate of ``name`` on the timing batch (the body the benchmark suite times)."""
        return self.estimator.estimates(self.timing_batch, [name])[name]
