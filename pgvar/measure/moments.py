"""Per-coordinate first and second moments of the per-sample gradients, without the ``[N, P]`` matrix.

The mean GSNR of Liu et al. (2020) (:func:`pgvar.measure.mean_gsnr`, Cockpit's ``MeanGSNR``) needs, for every
coordinate ``j``, the mean ``m_j`` and the mean of squares ``(1/N) sum_i G_ij^2`` of the per-sample gradients.
:func:`gradient_moments` gets both in one pass:

- ``method="norms"``: the closed form of ``nn.Linear``'s per-sample gradient, in the same vmapped forward and
  backward as :func:`pgvar.measure.gradient_statistics_from_norms`. For a layer with one input row per sample,
  ``sum_i G_i(W)^2 = (delta^2)^T (h^2)`` coordinate-wise (BackPACK's ``SumGradSquared``, Dangel et al. 2020,
  arXiv:1912.10985): one extra matrix product per layer, no ``[N, out, in]`` tensor;
- ``method="vmap"``: chunks of ``vmap(grad)`` per-sample gradients, reduced to float64 sums and discarded.

The moments also give the covariance trace, so :meth:`GradientMoments.statistics` returns the same
:class:`~pgvar.measure.GradientStatistics` as the norms route (SNR, noise scale, norm test) at no extra cost.

This module imports torch only (no SB3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pgvar._validation import check_choice
from pgvar.measure.noise_scale import _COCKPIT_GSNR_EPSILON, per_coordinate_gsnr
from pgvar.measure.per_sample import (
    DEFAULT_STREAMING_MEMORY_BYTES,
    ParamSelector,
    _chunk_size,
    _iter_chunks,
    _plan_vmap,
    flat_names,
    flatten,
)
from pgvar.measure.sq_norms import _sq_norms_and_grad_sum
from pgvar.measure.statistics import GradientLike, GradientStatistics, _check_two_samples, _statistics

__all__ = ["MOMENT_METHODS", "GradientMoments", "gradient_moments"]

#: The routes of :func:`gradient_moments`.
MOMENT_METHODS = ("norms", "vmap")


@dataclass(frozen=True, eq=False)
class GradientMoments:
    """Per-coordinate mean and mean of squares of ``N`` per-sample gradients ``G_i`` (``[P]`` float64 each).

    .. math::  m_j = \\frac1N \\sum_i G_{ij}, \\qquad \\overline{G^2_j} = \\frac1N \\sum_i G_{ij}^2

    Flattened in sorted parameter-name order (:func:`pgvar.measure.flatten`).

    :param n: number of samples ``N``
    :param mean: ``[P]`` float64, ``m``
    :param second_moment: ``[P]`` float64, :math:`\\overline{G^2}` (BackPACK's ``SumGradSquared`` of the sum
        loss, divided by ``N``)
    """

    n: int
    mean: Tensor
    second_moment: Tensor

    def statistics(self, *, reference: GradientLike | None = None) -> GradientStatistics:
        """Return :class:`~pgvar.measure.GradientStatistics` (trace, SNR) from the moments.

        .. math::  \\operatorname{tr}\\widehat\\Sigma = \\frac{N}{N-1} \\sum_j \\big(\\overline{G^2_j} - m_j^2\\big)

        (clamped at 0), equal to :func:`~pgvar.measure.gradient_statistics_from_norms` to rounding: the
        difference of two sums loses relative precision ``~ eps * (1 + SNR)``.

        :param reference: optional ``[P]`` (or dict) reference gradient for ``cosine_to_reference``
        :return: :class:`~pgvar.measure.GradientStatistics`
        """
        _check_two_samples("moments", self.n)
        m2 = self.n * (self.second_moment.sum() - self.mean.square().sum())
        return _statistics(self.n, self.mean, m2.clamp_min(0.0), reference)

    def per_coordinate_gsnr(self, *, epsilon: float = _COCKPIT_GSNR_EPSILON) -> Tensor:
        """``[P]`` GSNR of each coordinate, :func:`pgvar.measure.per_coordinate_gsnr` of these moments."""
        return per_coordinate_gsnr(self.mean, self.second_moment, epsilon=epsilon)

    def mean_gsnr(self, *, epsilon: float = _COCKPIT_GSNR_EPSILON) -> float:
        """The GSNR averaged over coordinates (Cockpit's ``MeanGSNR``), as :func:`pgvar.measure.mean_gsnr`."""
        return float(self.per_coordinate_gsnr(epsilon=epsilon).mean())


def gradient_moments(
    module: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Tensor | Sequence[Tensor],
    *,
    params: ParamSelector = None,
    method: str = "norms",
    chunk_size: int | None = None,
    max_memory_bytes: int | None = None,
) -> GradientMoments:
    """Return the per-coordinate mean and second moment of the per-sample gradients, never forming ``[N, P]``.

    .. math::  m_j = \\frac1N \\sum_i G_{ij}, \\qquad \\overline{G^2_j} = \\frac1N \\sum_i G_{ij}^2, \\qquad
               \\sum_i G_i(W)^{\\odot 2} = (\\delta^{\\odot 2})^T (h^{\\odot 2}) \\ \\text{(Linear, one row per sample)}

    ``method="norms"``: the squared-norm trick's single vmapped forward and backward
    (:func:`pgvar.measure.per_sample_grad_sq_norms`, same limits), with the coordinate-wise squares of each
    Linear's per-sample gradient summed by one matrix product of the squared output gradients ``delta`` and
    squared inputs ``h`` (Dangel, Kunstner, Hennig 2020, "BackPACK", arXiv:1912.10985, ``SumGradSquared``). A
    Linear run several times per sample forms its per-sample gradient for the chunk; other parameters (SB3's
    ``log_std``) come from the same vmapped backward. ``method="vmap"``: chunked ``vmap(grad)`` as in
    :func:`pgvar.measure.gradient_statistics_streaming`. Both reduce in float64.

    :param module: the network, e.g. an SB3 ``ActorCriticPolicy``
    :param loss_fn: ``loss_fn(module, *batch) -> scalar``, called on a batch of one sample (as in
        :func:`pgvar.measure.per_sample_gradients`)
    :param inputs: a tensor or a sequence of tensors sharing the leading batch dimension ``N >= 1``
    :param params: which parameters (``None``: all with ``requires_grad``; names; or ``name -> bool``)
    :param method: ``"norms"`` (closed form for ``nn.Linear``) or ``"vmap"``
    :param chunk_size: samples per vmap call (overrides ``max_memory_bytes``)
    :param max_memory_bytes: bound on the estimated working memory per chunk (default
        ``DEFAULT_STREAMING_MEMORY_BYTES``)
    :return: :class:`GradientMoments` (sorted name order)

    Reference: Dangel, Kunstner, Hennig (2020), "BackPACK: Packing more into backprop", ICLR, arXiv:1912.10985;
    Liu et al. (2020), ICLR (GSNR); Schneider, Dangel, Hennig (2021), "Cockpit", arXiv:2102.06604.

    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    >>> x = torch.randn(6, 3, dtype=torch.float64)
    >>> loss_fn = lambda m, xb: (m(xb) ** 2).sum()
    >>> moments = gradient_moments(net, loss_fn, x)
    >>> from pgvar.measure import flatten_per_sample, per_sample_gradients
    >>> g = flatten_per_sample(per_sample_gradients(net, loss_fn, x))
    >>> torch.allclose(moments.second_moment, (g**2).mean(0)), torch.allclose(moments.mean, g.mean(0).double())
    (True, True)
    """
    method = check_choice("method", method, MOMENT_METHODS)
    if method == "norms":
        sq_norms, grad_sum, grad_sq_sum = _sq_norms_and_grad_sum(
            module,
            loss_fn,
            inputs,
            params=params,
            chunk_size=chunk_size,
            max_memory_bytes=max_memory_bytes,
            coordinate_squares=True,
        )
        assert grad_sq_sum is not None
        n = sq_norms.shape[0]
        return GradientMoments(
            n=n, mean=flatten(grad_sum).double() / n, second_moment=flatten(grad_sq_sum) / n
        )
    plan = _plan_vmap(module, loss_fn, inputs, params=params)
    step = _chunk_size(plan, chunk_size, max_memory_bytes, default_bytes=DEFAULT_STREAMING_MEMORY_BYTES)
    device = next(iter(plan.specs.values()))[2]
    size = sum(int(torch.Size(shape).numel()) for shape, _, _ in plan.specs.values())
    total = torch.zeros(size, dtype=torch.float64, device=device)
    total_sq = torch.zeros_like(total)
    for _, chunk in _iter_chunks(plan, step):
        rows = next(iter(chunk.values())).shape[0]
        flat = torch.cat([chunk[name].reshape(rows, -1) for name in flat_names(chunk)], dim=1).double()
        total += flat.sum(dim=0)
        total_sq += flat.square().sum(dim=0)
    return GradientMoments(n=plan.n, mean=total / plan.n, second_moment=total_sq / plan.n)
