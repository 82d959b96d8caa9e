r"""The variance metrics of ``K`` paired batch estimates of one estimator, as one JSON-ready dict.

Both engines and the benchmark suite (``benchmarks/test_variance_suite.py``) report the same numbers for an
estimator whose ``K`` independent batch estimates :math:`E_1, \dots, E_K` (``[P]`` each) were computed on batches
shared by every estimator of the comparison:

- ``variance``: :math:`\operatorname{tr}\widehat{\mathrm{Var}}[\hat g] = \frac{1}{K-1}\sum_j \|E_j - \bar E\|^2`,
  the variance of ONE batch estimate, and ``variance_se``, its standard error from the batches,
  :math:`\mathrm{sd}_j(d_j)\sqrt{K}/(K-1)` with :math:`d_j = \|E_j - \bar E\|^2` (the delta method; it is what
  the regression check of ``benchmarks/variance_report.py`` tests with);
- ``snr``: the plug-in :math:`\|\bar E\|^2 / \operatorname{tr}\widehat{\mathrm{Var}}` and ``snr_debiased``:
  :math:`(\|\bar E\|^2 - \operatorname{tr}\widehat{\mathrm{Var}}/K) / \operatorname{tr}\widehat{\mathrm{Var}}`;
- ``cosine`` (with ``cosine_se``) to the reference gradient, and ``pairwise_cosine`` between batch estimates;
- ``b_simple``: the gradient noise scale of McCandlish et al. (2018) in samples (steps or episodes),
  ``batch_size`` times :func:`pgvar.measure.gradient_noise_scale` of the batch estimates (which treats each batch
  estimate as one sample of the mean over ``batch_size`` samples: :math:`\operatorname{tr}\Sigma \approx
  B\,\operatorname{tr}\mathrm{Var}[\hat g]`);
- with an exact reference gradient: ``bias_norm`` and ``bias_max_abs_z`` (the largest per-coordinate
  :math:`|\bar E_k - \nabla J_k| / \mathrm{SE}_k`, see :class:`pgvar.measure.EstimateStatistics`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pgvar.compare.results import safe_ratio
from pgvar.measure import estimate_statistics, gradient_noise_scale, gradient_statistics

__all__ = ["estimator_metrics", "variance_standard_error"]


def variance_standard_error(estimates: torch.Tensor) -> float:
    r"""Standard error of :math:`\operatorname{tr}\widehat{\mathrm{Var}}` from ``K`` batch estimates ``[K, P]``.

    .. math::  d_j = \|E_j - \bar E\|^2, \quad \widehat{\mathrm{tr}} = \frac{\sum_j d_j}{K - 1}, \quad
               \mathrm{SE} = \frac{\sqrt{K}\, \mathrm{sd}_j(d_j)}{K - 1}

    (the plain standard error of a mean of the :math:`d_j`, rescaled by :math:`K / (K-1)`; the dependence of the
    :math:`d_j` through :math:`\bar E` is an :math:`O(1/K)` correction).

    >>> variance_standard_error(torch.tensor([[0.0], [2.0], [0.0], [2.0]]))  # d = 1 each: no spread
    0.0
    """
    matrix = estimates.double()
    k = matrix.shape[0]
    if k < 3:
        return math.inf
    d = (matrix - matrix.mean(0)).square().sum(1)
    return float(d.std() * math.sqrt(k) / (k - 1))


def estimator_metrics(
    estimates: torch.Tensor,
    reference: torch.Tensor,
    *,
    exact: bool,
    batch_size: int,
) -> dict[str, Any]:
    """The metrics of the module docstring for one estimator's ``[K, P]`` batch estimates (plain floats).

    :param estimates: ``[K, P]`` batch estimates, ``K >= 2``
    :param reference: ``[P]`` the exact gradient (``exact=True``) or a large-batch reference
    :param exact: whether ``reference`` is the exact gradient (adds ``bias_norm`` and ``bias_max_abs_z``)
    :param batch_size: samples (steps or episodes) behind one batch estimate (the unit of ``b_simple``)
    :return: dict with ``variance``, ``variance_se``, ``snr``, ``snr_debiased``, ``cosine``, ``cosine_se``,
        ``pairwise_cosine``, ``b_simple``, ``mean_norm`` and, when ``exact``, ``bias_norm``, ``bias_max_abs_z``

    >>> est = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> m = estimator_metrics(est, torch.tensor([1.0, 1.0]), exact=True, batch_size=4)
    >>> round(m["variance"], 4), round(m["bias_max_abs_z"], 4)
    (0.6667, 1.0)
    """
    stats = estimate_statistics(estimates, reference=reference)
    assert stats.cosine_to_reference is not None and stats.cosine_to_reference_se is not None
    k = stats.k
    variance, mean_sq = stats.variance_trace, stats.mean_norm**2
    noise = gradient_noise_scale(gradient_statistics(estimates.double()))
    out: dict[str, Any] = {
        "variance": variance,
        "variance_se": variance_standard_error(estimates),
        "snr": safe_ratio(mean_sq, variance),
        "snr_debiased": safe_ratio(mean_sq - variance / k, variance),
        "cosine": float(stats.cosine_to_reference),
        "cosine_se": float(stats.cosine_to_reference_se),
        "pairwise_cosine": float(stats.pairwise_cosine),
        "b_simple": float(batch_size * noise.b_simple),
        "mean_norm": float(stats.mean_norm),
        "n_batches": k,
    }
    if exact:
        assert stats.bias_norm is not None and stats.max_abs_z is not None
        out["bias_norm"] = float(stats.bias_norm)
        out["bias_max_abs_z"] = float(stats.max_abs_z)
    return out
