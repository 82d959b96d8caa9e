"""Measure gradient estimators: per-sample gradients (torch.func), covariance trace, SNR, cosines, bias,
and the trajectory / action / state decomposition of the variance (Tucker et al. 2018).

Imports torch only; works on any ``nn.Module``, including a plain SB3 policy (pass a ``loss_fn`` that calls
``policy.evaluate_actions``). See ``docs`` and ``formulas.md`` section 6 for what each number means.
"""

from __future__ import annotations

from pgvar.measure.decomposition import VarianceDecomposition, variance_decomposition
from pgvar.measure.moments import MOMENT_METHODS, GradientMoments, gradient_moments
from pgvar.measure.noise_scale import (
    NoiseScale,
    NormTest,
    gradient_noise_scale,
    gradient_noise_scale_two_batch,
    gradient_statistics_from_sq_norms,
    mean_gsnr,
    norm_test,
    per_coordinate_gsnr,
)
from pgvar.measure.per_sample import (
    DEFAULT_STREAMING_MEMORY_BYTES,
    flat_names,
    flatten,
    flatten_per_sample,
    per_sample_gradients,
    unflatten,
)
from pgvar.measure.sq_norms import per_sample_grad_sq_norms
from pgvar.measure.statistics import (
    EstimateStatistics,
    GradientStatistics,
    estimate_statistics,
    gradient_statistics,
    gradient_statistics_from_norms,
    gradient_statistics_streaming,
    pairwise_cosine,
)
from pgvar.measure.trust_region import (
    KL_ESTIMATORS,
    TrustRegionDiagnostics,
    behaviour_kl,
    clip_fraction,
    clipped_surrogate_loss,
    effective_sample_size,
    max_importance_ratio,
    trust_region_diagnostics,
)

__all__ = [
    "DEFAULT_STREAMING_MEMORY_BYTES",
    "EstimateStatistics",
    "GradientMoments",
    "MOMENT_METHODS",
    "GradientStatistics",
    "VarianceDecomposition",
    "estimate_statistics",
    "flat_names",
    "flatten",
    "flatten_per_sample",
    "gradient_moments",
    "gradient_statistics",
    "gradient_statistics_from_norms",
    "gradient_statistics_streaming",
    "pairwise_cosine",
    "per_sample_grad_sq_norms",
    "per_sample_gradients",
    "variance_decomposition",
    "unflatten",
    "KL_ESTIMATORS",
    "NoiseScale",
    "NormTest",
    "TrustRegionDiagnostics",
    "behaviour_kl",
    "clip_fraction",
    "clipped_surrogate_loss",
    "effective_sample_size",
    "gradient_noise_scale",
    "gradient_noise_scale_two_batch",
    "gradient_statistics_from_sq_norms",
    "max_importance_ratio",
    "mean_gsnr",
    "norm_test",
    "per_coordinate_gsnr",
    "trust_region_diagnostics",
]
