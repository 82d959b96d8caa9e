"""Gradient noise scale, the norm test and the per-coordinate gradient SNR: how big a batch the gradient needs.

Three views of the same signal-to-noise question (formulas.md section 8), all computed from the statistics that
:mod:`pgvar.measure.statistics` already produces (``N``, the unbiased covariance trace ``tr Sigma`` and the mean
gradient ``m``), so any of its routes works: materialized per-sample gradients
(:func:`pgvar.measure.gradient_statistics`), chunked (:func:`pgvar.measure.gradient_statistics_streaming`), the
squared-norm trick (:func:`pgvar.measure.gradient_statistics_from_norms`), or per-sample squared norms and a mean
you already have (:func:`gradient_statistics_from_sq_norms`).

- :func:`gradient_noise_scale`: McCandlish et al.'s ``B_simple = tr(Sigma) / |G|^2`` (arXiv:1812.06162), with
  the unbiased estimate of ``|G|^2``; :func:`gradient_noise_scale_two_batch` is their estimator from the
  gradient norms of two batch sizes, without per-sample gradients (as in gpt-neox).
- :func:`norm_test`: the norm test of Byrd et al. (2012) as Cockpit computes it: the largest ``theta`` the
  batch passes and the batch size the test asks for.
- :func:`mean_gsnr` / :func:`per_coordinate_gsnr`: the per-coordinate gradient signal-to-noise ratio of Liu et
  al. (2020), averaged over coordinates, as Cockpit's ``MeanGSNR`` computes it. It needs per-coordinate second
  moments, so per-sample gradients (or BackPACK's ``SumGradSquared``), not only their norms.

All reductions run in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from pgvar._validation import check_finite, check_positive
from pgvar.measure.per_sample import _check_grads_dict, _common_batch_size, flat_names, flatten
from pgvar.measure.statistics import (
    GradientLike,
    GradientStatistics,
    _check_two_samples,
    _rows_per_slice,
    _statistics,
)

__all__ = [
    "NoiseScale",
    "NormTest",
    "gradient_noise_scale",
    "gradient_noise_scale_two_batch",
    "gradient_statistics_from_sq_norms",
    "mean_gsnr",
    "norm_test",
    "per_coordinate_gsnr",
]

#: Cockpit's ``MeanGSNR`` stabilization constant (added to each coordinate's variance).
_COCKPIT_GSNR_EPSILON = 1e-5


@dataclass(frozen=True)
class NoiseScale:
    """The simple gradient noise scale ``B_simple`` and the two estimates it is the ratio of.

    :param b_simple: ``covariance_trace / grad_sq_norm``; ``inf`` when ``grad_sq_norm <= 0`` (the batch cannot
        tell the gradient from noise), ``nan`` when both are 0
    :param covariance_trace: estimate of ``tr(Sigma)``, the per-sample covariance trace (unbiased)
    :param grad_sq_norm: estimate of ``|G|^2``, the squared norm of the true gradient (unbiased; can be <= 0)
    :param b_simple_plugin: ``tr(Sigma) / |m|^2`` with the batch mean's squared norm (biased low by the noise in
        ``|m|^2``; ``= N / SNR``), or ``None`` for the two-batch estimator
    """

    b_simple: float
    covariance_trace: float
    grad_sq_norm: float
    b_simple_plugin: float | None = None


@dataclass(frozen=True)
class NormTest:
    """The norm test of Byrd et al. (2012) on one batch, as Cockpit computes it (see :func:`norm_test`).

    :param theta_max: the smallest ``theta`` the batch passes, ``sqrt(tr(Sigma) / (N |m|^2))``
    :param theta: the ``theta`` the suggested batch size is for
    :param batch_size: the batch size the test asks for at ``theta``, ``tr(Sigma) / (theta^2 |m|^2)`` (a real
        number; round it up to use it)
    :param passes: ``theta_max <= theta`` (the batch is large enough)
    """

    theta_max: float
    theta: float
    batch_size: float
    passes: bool


def gradient_statistics_from_sq_norms(
    sq_norms: Tensor, mean: GradientLike, *, reference: GradientLike | None = None
) -> GradientStatistics:
    """Return :class:`~pgvar.measure.GradientStatistics` from per-sample squared norms and the mean gradient.

    .. math::  \\operatorname{tr}\\widehat{\\Sigma} = \\frac{1}{N-1}\\Big(\\sum_i \\|G_i\\|^2 - N \\|m\\|^2\\Big)

    The pure core of :func:`pgvar.measure.gradient_statistics_from_norms`, for when ``||G_i||^2`` and ``m``
    come from elsewhere (BackPACK's ``BatchL2Grad``, a training loop that already did the backward). The trace
    is clamped at 0 (rounding can make the difference slightly negative); the difference of two sums loses
    relative precision ``~ eps * (1 + SNR)``.

    :param sq_norms: ``[N]`` per-sample squared gradient norms ``||G_i||^2`` (>= 0), ``N >= 2``
    :param mean: ``[P]`` (or a name -> tensor dict) mean gradient ``m = (1/N) sum_i G_i``
    :param reference: optional ``[P]`` (or dict) reference gradient for ``cosine_to_reference``
    :return: :class:`~pgvar.measure.GradientStatistics` (float64)

    >>> g = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 1.0]])
    >>> stats = gradient_statistics_from_sq_norms((g**2).sum(1), g.mean(0))
    >>> stats.covariance_trace, round(stats.snr, 4)  # as gradient_statistics(g)
    (2.0, 7.5)
    """
    if not isinstance(sq_norms, Tensor) or sq_norms.dim() != 1:
        got = tuple(sq_norms.shape) if isinstance(sq_norms, Tensor) else type(sq_norms).__name__
        raise ValueError(f"sq_norms must be a [N] tensor of per-sample squared norms, got {got}")
    check_finite("sq_norms", sq_norms)
    if bool((sq_norms < 0).any()):
        raise ValueError(f"sq_norms must be >= 0 (squared norms), got minimum {float(sq_norms.min())}")
    n = sq_norms.shape[0]
    _check_two_samples("sq_norms", n)
    vector = flatten(mean) if isinstance(mean, Mapping) else mean
    if not isinstance(vector, Tensor) or vector.dim() != 1:
        got = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
        raise ValueError(f"mean must be a [P] tensor (or a dict name -> tensor), got {got}")
    check_finite("mean", vector)
    vector = vector.detach().double()
    m2 = sq_norms.detach().double().sum() - n * vector.square().sum()
    return _statistics(n, vector, m2.clamp_min(0.0), reference)


def gradient_noise_scale(statistics: GradientStatistics) -> NoiseScale:
    """Return the simple gradient noise scale ``B_simple`` of McCandlish et al. from one batch's statistics.

    The batch size at which the gradient's noise and signal are about equal: below it, a larger batch is
    nearly free progress (linear scaling); far above it, wasted samples. It is the per-sample noise over the
    squared true gradient,

    .. math::  B_{\\text{simple}} = \\frac{\\operatorname{tr}\\Sigma}{|G|^2}, \\qquad
               \\widehat{|G|^2} = \\|m\\|^2 - \\frac{\\operatorname{tr}\\widehat\\Sigma}{N}
               \\;\\Rightarrow\\; \\widehat B_{\\text{simple}} = \\frac{N}{\\mathrm{SNR}_{\\text{debiased}}},

    with :math:`\\operatorname{tr}\\widehat\\Sigma` the unbiased covariance trace. Since
    :math:`\\mathbb E\\|m\\|^2 = |G|^2 + \\operatorname{tr}\\Sigma / N` for independent samples, both the
    numerator and :math:`\\widehat{|G|^2}` are unbiased (their ratio is consistent, not unbiased; to average
    over batches, average the two parts and then divide, as McCandlish et al. do, Appendix A.1). The plug-in
    ``tr / ||m||^2 = N / SNR`` is biased low and never exceeds ``N`` times a few; it is reported as
    ``b_simple_plugin``. Samples from one trajectory are correlated, which makes this an estimate for
    independent samples (see :class:`~pgvar.measure.GradientStatistics`).

    :param statistics: :class:`~pgvar.measure.GradientStatistics` of one batch (any route; see the module docstring)
    :return: :class:`NoiseScale`

    Reference: McCandlish, Kaplan, Amodei, OpenAI Dota Team (2018), "An Empirical Model of Large-Batch
    Training", arXiv:1812.06162, Eq. 2.8 (``B_simple``) and Appendix A.1 (the unbiased estimates).

    >>> from pgvar.measure import gradient_statistics
    >>> g = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 1.0]])  # m = (2, 1), tr = 2, N = 3
    >>> ns = gradient_noise_scale(gradient_statistics(g))
    >>> round(ns.b_simple, 4), round(ns.grad_sq_norm, 4), round(ns.b_simple_plugin, 4)  # 2 / (5 - 2/3), 2 / 5
    (0.4615, 4.3333, 0.4)
    """
    if not isinstance(statistics, GradientStatistics):
        raise ValueError(
            f"statistics must be a pgvar.measure.GradientStatistics, got {type(statistics).__name__}; "
            "build one with gradient_statistics(...) or gradient_statistics_from_sq_norms(...)"
        )
    trace = statistics.covariance_trace
    mean_sq = statistics.mean_norm**2
    grad_sq = mean_sq - trace / statistics.n
    return NoiseScale(
        b_simple=_ratio(trace, grad_sq),
        covariance_trace=trace,
        grad_sq_norm=grad_sq,
        b_simple_plugin=_ratio(trace, mean_sq),
    )


def gradient_noise_scale_two_batch(
    small_sq_norms: Tensor | float,
    big_sq_norms: Tensor | float,
    *,
    small_batch_size: int,
    big_batch_size: int,
) -> NoiseScale:
    """Return ``B_simple`` from the squared norms of batch-mean gradients at two batch sizes (no per-sample grads).

    For a batch-mean gradient over ``B`` independent samples :math:`\\mathbb E|G_B|^2 = |G|^2 +
    \\operatorname{tr}\\Sigma / B`; two batch sizes give two equations, solved by the unbiased estimates

    .. math::  \\widehat{\\operatorname{tr}\\Sigma} = \\frac{|G_{B_s}|^2 - |G_{B_b}|^2}{1/B_s - 1/B_b}, \\qquad
               \\widehat{|G|^2} = \\frac{B_b |G_{B_b}|^2 - B_s |G_{B_s}|^2}{B_b - B_s}, \\qquad
               \\widehat B_{\\text{simple}} = \\widehat{\\operatorname{tr}\\Sigma} / \\widehat{|G|^2}.

    Several measurements of each norm (tensors) are averaged first, and the ratio is taken of the averages:
    gpt-neox keeps exponential moving averages of the two estimates and divides them. With the ``N``
    single-sample norms as the small batch (``B_s = 1``) and the full batch as the big one (``B_b = N``), the
    two estimates equal :func:`gradient_noise_scale`'s exactly.

    :param small_sq_norms: ``|G_{B_s}|^2``: one value, or a tensor of values from several small batches
    :param big_sq_norms: ``|G_{B_b}|^2``: one value, or a tensor of values from several big batches
    :param small_batch_size: ``B_s`` (integer > 0)
    :param big_batch_size: ``B_b`` (integer > ``B_s``)
    :return: :class:`NoiseScale` (``b_simple_plugin`` is ``None``)

    Reference: McCandlish et al. (2018), arXiv:1812.06162, Appendix A.1, Eqs. A.2-A.3; EleutherAI gpt-neox,
    ``megatron/gradient_noise_scale/gradient_noise_scale.py`` (its ``noise`` is the ``|G|^2`` estimate and its
    ``scale`` the trace).

    >>> ns = gradient_noise_scale_two_batch(3.0, 1.2, small_batch_size=10, big_batch_size=100)
    >>> round(ns.covariance_trace, 6), round(ns.grad_sq_norm, 6), round(ns.b_simple, 6)  # tr 20, |G|^2 1
    (20.0, 1.0, 20.0)
    """
    small_batch_size = int(check_positive("small_batch_size", small_batch_size, integer=True))
    big_batch_size = int(check_positive("big_batch_size", big_batch_size, integer=True))
    if big_batch_size <= small_batch_size:
        raise ValueError(
            f"big_batch_size must be larger than small_batch_size ({small_batch_size}), got {big_batch_size}"
        )
    small = _mean_of_sq_norms("small_sq_norms", small_sq_norms)
    big = _mean_of_sq_norms("big_sq_norms", big_sq_norms)
    trace = (small - big) / (1.0 / small_batch_size - 1.0 / big_batch_size)
    grad_sq = (big_batch_size * big - small_batch_size * small) / (big_batch_size - small_batch_size)
    return NoiseScale(b_simple=_ratio(trace, grad_sq), covariance_trace=trace, grad_sq_norm=grad_sq)


def norm_test(statistics: GradientStatistics, *, theta: float = 0.9) -> NormTest:
    """Return the norm test of Byrd et al. on one batch: the smallest passing ``theta`` and the batch it asks for.

    The batch of ``N`` is large enough when the variance of its mean gradient is small against the gradient,

    .. math::  \\frac{\\operatorname{tr}\\widehat\\Sigma}{N \\|m\\|^2} \\le \\theta^2, \\qquad
               \\theta_{\\max} = \\sqrt{\\frac{\\operatorname{tr}\\widehat\\Sigma}{N \\|m\\|^2}}
               = \\frac{1}{\\sqrt{\\mathrm{SNR}}}, \\qquad
               B_\\theta = \\frac{\\operatorname{tr}\\widehat\\Sigma}{\\theta^2 \\|m\\|^2},

    with :math:`\\operatorname{tr}\\widehat\\Sigma` the unbiased trace (the ``l1`` norm of the per-coordinate
    sample variance, Byrd et al.'s Eq. 3.6) and the plug-in :math:`\\|m\\|^2` (not debiased, as in Cockpit).
    ``B_theta`` at ``theta = theta_max`` is ``N`` itself. Cockpit's ``NormTest`` logs ``theta_max``
    (``_compute_theta_max``) and computes ``B_theta`` in ``_compute_adapted_batch_size``; its per-sample
    gradients are those of a mean loss (``G_i / N``), which is why its formulas carry extra factors of ``N``.
    Compare :func:`gradient_noise_scale`: ``B_theta`` with ``theta = 1`` is the plug-in noise scale.

    :param statistics: :class:`~pgvar.measure.GradientStatistics` of one batch
    :param theta: the test's tolerance (> 0); Cockpit's own check prints the suggestion for 0.5 and 0.9
    :return: :class:`NormTest` (``inf`` values when ``m = 0``)

    Reference: Byrd, Chin, Nocedal, Wu (2012), "Sample size selection in optimization methods for machine
    learning", Math. Program. 134, Eqs. 3.9 and 3.12; Schneider, Dangel, Hennig (2021), "Cockpit",
    arXiv:2102.06604 (``cockpit/quantities/norm_test.py``).

    >>> from pgvar.measure import gradient_statistics
    >>> g = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 1.0]])  # tr 2, N 3, |m|^2 5
    >>> test = norm_test(gradient_statistics(g), theta=0.5)
    >>> round(test.theta_max, 4), round(test.batch_size, 4), test.passes  # sqrt(2/15), 2 / (0.25 * 5)
    (0.3651, 1.6, True)
    """
    if not isinstance(statistics, GradientStatistics):
        raise ValueError(
            f"statistics must be a pgvar.measure.GradientStatistics, got {type(statistics).__name__}"
        )
    theta = float(check_positive("theta", theta))
    trace = statistics.covariance_trace
    mean_sq = statistics.mean_norm**2
    theta_max = math.sqrt(_ratio(trace, statistics.n * mean_sq))
    return NormTest(
        theta_max=theta_max,
        theta=theta,
        batch_size=_ratio(trace, theta**2 * mean_sq),
        passes=theta_max <= theta,
    )


def per_coordinate_gsnr(
    mean: Tensor, second_moment: Tensor, *, epsilon: float = _COCKPIT_GSNR_EPSILON
) -> Tensor:
    """Return each coordinate's gradient signal-to-noise ratio ``m_j^2 / (Var_j + epsilon)`` (``[P]``, float64).

    .. math::  \\mathrm{GSNR}_j = \\frac{m_j^2}{\\overline{G^2_j} - m_j^2 + \\epsilon}, \\qquad
               m_j = \\frac1N \\sum_i G_{ij}, \\quad \\overline{G^2_j} = \\frac1N \\sum_i G_{ij}^2

    The variance is the plug-in (``1/N``) one and ``epsilon`` is added to it, exactly as Cockpit's ``MeanGSNR``
    (whose ``B * sum_grad_squared`` is :math:`\\overline{G^2_j}` for the mean-loss gradients ``G_i / B``). A
    coordinate with zero variance and zero mean gives 0; a negative rounding residue is not clamped (Cockpit
    does not either), so keep ``epsilon > 0`` unless the variances are safely positive.

    :param mean: ``[P]`` mean gradient ``m``
    :param second_moment: ``[P]`` per-coordinate mean of squares :math:`\\overline{G^2_j}` (BackPACK's
        ``SumGradSquared`` of a sum loss divided by ``N``)
    :param epsilon: stabilization constant added to each variance (>= 0), Cockpit's default 1e-5
    :return: ``[P]`` float64

    Reference: Liu, Jiang, Bai, Chen, Wang (2020), "Understanding Why Neural Networks Generalize Well Through
    GSNR of Parameters", ICLR, Eq. 1; Cockpit's ``cockpit/quantities/mean_gsnr.py``.

    >>> per_coordinate_gsnr(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 1.0]), epsilon=0.0)
    tensor([1., 0.], dtype=torch.float64)
    """
    for name, value in (("mean", mean), ("second_moment", second_moment)):
        if not isinstance(value, Tensor) or value.dim() != 1:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a [P] tensor, got {got}")
        check_finite(name, value)
    if mean.shape != second_moment.shape:
        raise ValueError(
            f"second_moment must have the shape of mean {tuple(mean.shape)}, got {tuple(second_moment.shape)}"
        )
    epsilon = _check_epsilon(epsilon)
    m_sq = mean.detach().double().square()
    variance = second_moment.detach().double() - m_sq + epsilon
    return torch.where(m_sq == 0, torch.zeros_like(m_sq), m_sq / variance)


def mean_gsnr(per_sample_grads: GradientLike, *, epsilon: float = _COCKPIT_GSNR_EPSILON) -> float:
    """Return the gradient signal-to-noise ratio averaged over coordinates (Cockpit's ``MeanGSNR``).

    .. math::  \\overline{\\mathrm{GSNR}} = \\frac1P \\sum_j \\frac{m_j^2}{\\overline{G^2_j} - m_j^2 + \\epsilon}

    (see :func:`per_coordinate_gsnr`). Unlike the global SNR ``||m||^2 / (tr Sigma / N)`` of
    :class:`~pgvar.measure.GradientStatistics`, it weighs every parameter equally and measures single samples
    (no ``1/N``): a coordinate with GSNR 1 has as much signal as noise in ONE sample's gradient. The plug-in
    :math:`m_j^2` carries the noise :math:`\\mathrm{Var}_j / N`, so for independent samples each term is biased
    up by about ``1/N``.

    :param per_sample_grads: ``[N, P]`` or name -> ``[N, *shape]`` per-sample gradients ``G_i``, ``N >= 1``
    :param epsilon: stabilization constant added to each variance (>= 0), Cockpit's default 1e-5
    :return: the mean over the ``P`` coordinates (float)

    Reference: Liu et al. (2020), ICLR, "Understanding Why Neural Networks Generalize Well Through GSNR of
    Parameters"; Schneider, Dangel, Hennig (2021), "Cockpit", arXiv:2102.06604.

    >>> g = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 1.0]])  # m (2, 1), variances (2/3, 2/3)
    >>> round(mean_gsnr(g, epsilon=0.0), 6)  # (6 + 1.5) / 2
    3.75
    """
    mean, second_moment = _first_two_moments(per_sample_grads)
    return float(per_coordinate_gsnr(mean, second_moment, epsilon=epsilon).mean())


# ---------------------------------------------------------------------------------------------- helpers
def _ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``; ``inf`` for a non-positive denominator (``nan`` when both are 0)."""
    if denominator > 0:
        return numerator / denominator
    return math.nan if numerator == 0 and denominator == 0 else math.inf


def _mean_of_sq_norms(name: str, value: Tensor | float) -> float:
    tensor = value if isinstance(value, Tensor) else torch.as_tensor(value, dtype=torch.float64)
    if not tensor.is_floating_point() or tensor.numel() == 0:
        raise ValueError(
            f"{name} must be a float or a non-empty floating tensor of squared norms, got {value!r}"
        )
    check_finite(name, tensor)
    if bool((tensor < 0).any()):
        raise ValueError(f"{name} must be >= 0 (squared norms), got minimum {float(tensor.min())}")
    return float(tensor.detach().double().mean())


def _check_epsilon(epsilon: float) -> float:
    value = float(epsilon)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    return value


def _first_two_moments(per_sample_grads: GradientLike) -> tuple[Tensor, Tensor]:
    """``(mean [P], mean of squares [P])`` in float64, reduced in row slices (no float64 copy of ``G``)."""
    if isinstance(per_sample_grads, Mapping):
        _check_grads_dict("per_sample_grads", per_sample_grads)
        n = _common_batch_size("per_sample_grads", per_sample_grads)
        blocks = [per_sample_grads[name].reshape(n, -1) for name in flat_names(per_sample_grads)]
    elif isinstance(per_sample_grads, Tensor) and per_sample_grads.dim() == 2:
        blocks, n = [per_sample_grads], per_sample_grads.shape[0]
    else:
        got = (
            tuple(per_sample_grads.shape)
            if isinstance(per_sample_grads, Tensor)
            else type(per_sample_grads).__name__
        )
        raise ValueError(f"per_sample_grads must be a [N, P] tensor or a dict name -> [N, *shape], got {got}")
    if n < 1:
        raise ValueError("per_sample_grads must hold at least one sample, got N = 0")
    means, squares = [], []
    for block in blocks:
        check_finite("per_sample_grads", block)
        total = torch.zeros(block.shape[1], dtype=torch.float64, device=block.device)
        total_sq = torch.zeros_like(total)
        for rows in block.detach().split(_rows_per_slice(block)):
            rows64 = rows.double()
            total += rows64.sum(dim=0)
            total_sq += rows64.square().sum(dim=0)
        means.append(total / n)
        squares.append(total_sq / n)
    return torch.cat(means), torch.cat(squares)
