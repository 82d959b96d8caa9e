"""Measure gradient estimators: per-sample gradients (torch.func), covariance trace, SNR, cosines, bias,
and the trajectory / action / state decomposition of the variance (Tucker et al. 2018).

Imports torch only; works on any ``nn.Module``, including a plain SB3 policy (pass a ``loss_fn`` that calls
``policy.evaluate_actions``). See ``docs`` and ``formulas.md`` section 6 for what each number means.
"""

from __future__ import annotations

from pgvar.measure.decomposition import VarianceDecomposition, variance_decomposition
from pgvar.measure.per_sample import (
    DEFAULT_STREAMING_MEMORY_BYTES,
    flat_names,
    flatten,
    flatten_per_sample,
    per_sample_grad_sq_norms,
    per_sample_gradients,
    unflatten,
)
from pgvar.measure.statistics import (
    EstimateStatistics,
    GradientStatistics,
    estimate_statistics,
    gradient_statistics,
    gradient_statistics_from_norms,
    gradient_statistics_streaming,
    pairwise_cosine,
)

__all__ = [
    "DEFAULT_STREAMING_MEMORY_BYTES",
    "EstimateStatistics",
    "GradientStatistics",
    "VarianceDecomposition",
    "estimate_statistics",
    "flat_names",
    "flatten",
    "flatten_per_sample",
    "gradient_statistics",
    "gradient_statistics_from_norms",
    "gradient_statistics_streaming",
    "pairwise_cosine",
    "per_sample_grad_sq_norms",
    "per_sample_gradients",
    "variance_decomposition",
    "unflatten",
]
