"""Trust-region diagnostics of a PPO/TRPO update, as pure functions of log-probabilities.

After some optimizer steps on one rollout, the new policy ``pi`` and the behaviour policy ``mu`` (the one that
sampled the actions) differ. With the importance ratios of the sampled actions

.. math::  w_i = \\frac{\\pi(a_i|s_i)}{\\mu(a_i|s_i)} = \\exp(\\log\\pi(a_i|s_i) - \\log\\mu(a_i|s_i)),

these functions say how far the update went and how much of the batch still carries information:

- :func:`effective_sample_size`: Kish's ``(sum w)^2 / sum w^2``, as a fraction of ``N``;
- :func:`max_importance_ratio`: the largest ``w``;
- :func:`behaviour_kl`: ``KL(mu || pi)`` from the samples (Schulman's ``k1`` and ``k3`` estimators; SB3 logs
  ``k3`` as ``train/approx_kl``);
- :func:`clip_fraction`: the fraction of samples PPO's clip is active on (SB3's ``train/clip_fraction``);
- :func:`trust_region_diagnostics`: all of them at once;
- :func:`clipped_surrogate_loss`: PPO's clipped surrogate per sample, the loss whose per-sample gradients are
  those of a later epoch of the update (ratio != 1).

Inputs are the log-probabilities of the SAME sampled actions under the two policies, any (equal) shape; every
sample counts once. The diagnostics need no gradients: they are detached, reduced in float64.
:func:`clipped_surrogate_loss` is differentiable in ``log_prob`` (only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pgvar._validation import check_choice, check_finite, check_positive

__all__ = [
    "KL_ESTIMATORS",
    "TrustRegionDiagnostics",
    "behaviour_kl",
    "clip_fraction",
    "clipped_surrogate_loss",
    "effective_sample_size",
    "max_importance_ratio",
    "trust_region_diagnostics",
]

#: Sample estimators of ``KL(mu || pi)`` accepted by :func:`behaviour_kl`.
KL_ESTIMATORS = ("k1", "k3")


@dataclass(frozen=True)
class TrustRegionDiagnostics:
    """What :func:`trust_region_diagnostics` returns (floats).

    :param n: number of samples ``N``
    :param effective_sample_size: Kish's ESS divided by ``N``, in ``(0, 1]``
    :param max_ratio: the largest importance ratio ``pi / mu``
    :param kl_k1: ``KL(mu || pi)`` by the ``k1`` estimator (unbiased, can be negative)
    :param kl_k3: ``KL(mu || pi)`` by the ``k3`` estimator (unbiased, >= 0)
    :param clip_fraction: fraction of samples with ``|w - 1| > clip_range``, or ``None`` without a clip range
    """

    n: int
    effective_sample_size: float
    max_ratio: float
    kl_k1: float
    kl_k3: float
    clip_fraction: float | None = None


def effective_sample_size(log_prob: Tensor, behaviour_log_prob: Tensor, *, normalized: bool = True) -> Tensor:
    """Return Kish's effective sample size of the importance weights ``w = pi / mu`` (0-dim float64).

    .. math::  \\mathrm{ESS} = \\frac{(\\sum_i w_i)^2}{\\sum_i w_i^2}
               = \\exp\\big(2 \\operatorname{logsumexp}(\\log w) - \\operatorname{logsumexp}(2 \\log w)\\big)

    computed in log space, so huge or tiny ratios do not overflow. ``normalized`` divides by ``N``: 1 when
    ``pi = mu`` on the batch, ``1/N`` when one sample carries all the weight. For large ``N`` the normalized ESS
    tends to :math:`1 / \\mathbb E_\\mu[w^2] = 1 / (1 + \\chi^2(\\pi \\| \\mu))`. TorchRL's PPO losses log it;
    a drift away from 1 at the first epoch signals a train/eval mismatch of the policy.

    :param log_prob: ``log pi(a|s)`` of the sampled actions under the new policy, any shape
    :param behaviour_log_prob: ``log mu(a|s)`` of the same actions under the behaviour policy, same shape
    :param normalized: divide by ``N``
    :return: 0-dim float64 tensor

    Reference: Kish (1965), *Survey Sampling*; Owen (2013), *Monte Carlo theory, methods and examples*,
    Eq. 9.13.

    >>> lp_old = torch.zeros(4)
    >>> effective_sample_size(torch.log(torch.tensor([1.0, 1.0, 1.0, 1.0])), lp_old)
    tensor(1., dtype=torch.float64)
    >>> effective_sample_size(torch.log(torch.tensor([2.0, 2.0, 0.0, 0.0])), lp_old)  # 16 / 8 / 4
    tensor(0.5000, dtype=torch.float64)
    """
    log_w = _log_ratios(log_prob, behaviour_log_prob)
    log_ess = 2 * torch.logsumexp(log_w, dim=0) - torch.logsumexp(2 * log_w, dim=0)
    ess = log_ess.exp()
    return ess / log_w.numel() if normalized else ess


def max_importance_ratio(log_prob: Tensor, behaviour_log_prob: Tensor) -> Tensor:
    """Return the largest importance ratio ``max_i pi(a_i|s_i) / mu(a_i|s_i)`` (0-dim float64).

    .. math::  w_{\\max} = \\exp\\big(\\max_i (\\log\\pi(a_i|s_i) - \\log\\mu(a_i|s_i))\\big)

    Ilyas et al. (2020) log it to show that PPO's clipping does not bound the ratios it is meant to bound.

    :param log_prob: ``log pi(a|s)`` of the sampled actions under the new policy, any shape
    :param behaviour_log_prob: ``log mu(a|s)`` of the same actions, same shape
    :return: 0-dim float64 tensor

    Reference: Ilyas et al. (2020), "A Closer Look at Deep Policy Gradients", ICLR, arXiv:1811.02553, Sec. 3.

    >>> max_importance_ratio(torch.log(torch.tensor([0.5, 3.0])), torch.zeros(2))
    tensor(3.0000, dtype=torch.float64)
    """
    return _log_ratios(log_prob, behaviour_log_prob).max().exp()


def behaviour_kl(log_prob: Tensor, behaviour_log_prob: Tensor, *, estimator: str = "k3") -> Tensor:
    """Return the sample estimate of ``KL(mu || pi)``, the new policy's divergence from the behaviour policy.

    With actions drawn from the behaviour policy ``mu`` and :math:`\\log w = \\log\\pi - \\log\\mu`:

    .. math::  k_1 = \\frac1N \\sum_i -\\log w_i, \\qquad
               k_3 = \\frac1N \\sum_i \\big((w_i - 1) - \\log w_i\\big),
               \\qquad \\mathbb E_\\mu[k_1] = \\mathbb E_\\mu[k_3] = \\mathrm{KL}(\\mu \\| \\pi).

    Both are unbiased (:math:`\\mathbb E_\\mu[w] = 1`); ``k1`` can be negative and has the larger variance when
    the policies are close, ``k3`` is >= 0 sample by sample. SB3's PPO logs ``k3`` as ``train/approx_kl``;
    TRPO's constraint is on the mean of the exact per-state ``KL(mu || pi)`` (this is its sample estimate).

    :param log_prob: ``log pi(a|s)`` of the sampled actions under the new policy, any shape
    :param behaviour_log_prob: ``log mu(a|s)`` of the same actions (which ``mu`` sampled), same shape
    :param estimator: ``"k1"`` or ``"k3"``
    :return: 0-dim float64 tensor

    Reference: J. Schulman (2020), "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.

    >>> lp_new = torch.log(torch.tensor([2.0, 0.5]))
    >>> behaviour_kl(lp_new, torch.zeros(2), estimator="k1")  # -(log 2 + log 0.5) / 2
    tensor(0., dtype=torch.float64)
    >>> behaviour_kl(lp_new, torch.zeros(2))  # ((1 - log 2) + (-0.5 + log 2)) / 2
    tensor(0.2500, dtype=torch.float64)
    """
    check_choice("estimator", estimator, KL_ESTIMATORS)
    log_w = _log_ratios(log_prob, behaviour_log_prob)
    if estimator == "k1":
        return (-log_w).mean()
    return torch.expm1(log_w).sub(log_w).mean()


def clip_fraction(log_prob: Tensor, behaviour_log_prob: Tensor, *, clip_range: float) -> Tensor:
    """Return the fraction of samples whose ratio is outside PPO's clip interval ``[1 - eps, 1 + eps]``.

    .. math::  \\frac1N \\sum_i \\mathbf 1\\big[|w_i - 1| > \\epsilon\\big]

    SB3's definition of ``train/clip_fraction`` (strict inequality, on the ratio itself), whether or not the
    clipped branch is the one the PPO minimum picks for that sample's advantage sign.

    :param log_prob: ``log pi(a|s)`` of the sampled actions under the new policy, any shape
    :param behaviour_log_prob: ``log mu(a|s)`` of the same actions, same shape
    :param clip_range: PPO's ``epsilon`` (> 0)
    :return: 0-dim float64 tensor in ``[0, 1]``

    Reference: Schulman, Wolski, Dhariwal, Radford, Klimov (2017), "Proximal Policy Optimization Algorithms",
    arXiv:1707.06347, Eq. 7; stable-baselines3 ``PPO.train``.

    >>> clip_fraction(torch.log(torch.tensor([1.0, 1.1, 1.3, 0.7])), torch.zeros(4), clip_range=0.2)
    tensor(0.5000, dtype=torch.float64)
    """
    clip_range = float(check_positive("clip_range", clip_range))
    ratio = _log_ratios(log_prob, behaviour_log_prob).exp()
    return ((ratio - 1).abs() > clip_range).double().mean()


def trust_region_diagnostics(
    log_prob: Tensor, behaviour_log_prob: Tensor, *, clip_range: float | None = None
) -> TrustRegionDiagnostics:
    """Return all trust-region diagnostics of one update: ESS, maximum ratio, KL (``k1``, ``k3``), clip fraction.

    See :func:`effective_sample_size`, :func:`max_importance_ratio`, :func:`behaviour_kl` and
    :func:`clip_fraction` for the formulas. Call it on the rollout's actions after each epoch of a PPO update
    (or after a TRPO step) with the behaviour policy's stored log-probabilities.

    :param log_prob: ``log pi(a|s)`` of the sampled actions under the new policy, any shape
    :param behaviour_log_prob: ``log mu(a|s)`` of the same actions, same shape
    :param clip_range: PPO's ``epsilon`` (> 0), or ``None`` to skip the clip fraction
    :return: :class:`TrustRegionDiagnostics`

    >>> d = trust_region_diagnostics(torch.zeros(3), torch.zeros(3), clip_range=0.2)
    >>> round(d.effective_sample_size, 6), d.max_ratio, d.kl_k3, d.clip_fraction
    (1.0, 1.0, 0.0, 0.0)
    """
    log_w = _log_ratios(log_prob, behaviour_log_prob)
    zeros = torch.zeros_like(log_w)
    return TrustRegionDiagnostics(
        n=log_w.numel(),
        effective_sample_size=float(effective_sample_size(log_w, zeros)),
        max_ratio=float(max_importance_ratio(log_w, zeros)),
        kl_k1=float(behaviour_kl(log_w, zeros, estimator="k1")),
        kl_k3=float(behaviour_kl(log_w, zeros, estimator="k3")),
        clip_fraction=None
        if clip_range is None
        else float(clip_fraction(log_w, zeros, clip_range=clip_range)),
    )


def clipped_surrogate_loss(
    log_prob: Tensor, behaviour_log_prob: Tensor, advantages: Tensor, *, clip_range: float | None
) -> Tensor:
    r"""Return PPO's clipped surrogate objective per sample, as a loss (same shape as the inputs).

    .. math::  \ell_i = -\min\big(w_i A_i,\ \operatorname{clip}(w_i, 1 - \epsilon, 1 + \epsilon)\, A_i\big),
               \qquad w_i = \exp\big(\log\pi(a_i|s_i) - \log\mu(a_i|s_i)\big)

    Its gradient is :math:`-A_i w_i \nabla\log\pi(a_i|s_i)` where the unclipped term is the minimum, and 0 on
    the samples where the clip binds (:math:`A_i > 0,\ w_i > 1 + \epsilon` or :math:`A_i < 0,\ w_i < 1 -
    \epsilon`): at :math:`w = 1` (the first minibatch step of an update) it is the plain policy-gradient term
    :math:`-A_i \nabla\log\pi`. SB3's ``PPO.train`` minimizes the mean of :math:`\ell_i` over a minibatch.
    ``clip_range=None`` gives the unclipped importance-sampled surrogate :math:`-w_i A_i` (TRPO's objective).

    Gradient flow: through ``log_prob`` only; ``behaviour_log_prob`` and ``advantages`` are detached.

    :param log_prob: ``log pi(a|s)`` of the sampled actions under the current policy, any shape
    :param behaviour_log_prob: ``log mu(a|s)`` of the same actions under the behaviour policy, same shape
    :param advantages: the (normalized) advantages ``A``, same shape
    :param clip_range: PPO's ``epsilon`` (> 0), or ``None`` for no clipping
    :return: per-sample loss, the shape and dtype of ``log_prob``

    Reference: Schulman, Wolski, Dhariwal, Radford, Klimov (2017), "Proximal Policy Optimization Algorithms",
    arXiv:1707.06347, Eq. 7; stable-baselines3 ``PPO.train``.

    >>> lp = torch.log(torch.tensor([1.0, 1.5, 1.5, 0.5]))  # ratios w
    >>> clipped_surrogate_loss(lp, torch.zeros(4), torch.tensor([2.0, 1.0, -1.0, -1.0]), clip_range=0.2)
    tensor([-2.0000, -1.2000,  1.5000,  0.8000])
    """
    for name, value in (
        ("log_prob", log_prob),
        ("behaviour_log_prob", behaviour_log_prob),
        ("advantages", advantages),
    ):
        if not isinstance(value, Tensor) or not value.is_floating_point():
            got = value.dtype if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a floating-point tensor, got {got}")
        if value.shape != log_prob.shape:
            raise ValueError(
                f"{name} must have the shape of log_prob {tuple(log_prob.shape)}, got {tuple(value.shape)}"
            )
        check_finite(name, value)
    ratio = torch.exp(log_prob - behaviour_log_prob.detach())
    advantages = advantages.detach()
    if clip_range is None:
        return -(ratio * advantages)
    eps = float(check_positive("clip_range", clip_range))
    return -torch.min(ratio * advantages, torch.clamp(ratio, 1 - eps, 1 + eps) * advantages)


def _log_ratios(log_prob: Tensor, behaviour_log_prob: Tensor) -> Tensor:
    """Flattened, detached float64 ``log pi - log mu`` after checking both arguments."""
    for name, value in (("log_prob", log_prob), ("behaviour_log_prob", behaviour_log_prob)):
        if not isinstance(value, Tensor) or not value.is_floating_point():
            got = value.dtype if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a floating-point tensor of log-probabilities, got {got}")
        if value.numel() == 0:
            raise ValueError(f"{name} must hold at least one sample, got an empty tensor")
        if bool(torch.isnan(value).any()) or bool((value == math.inf).any()):
            check_finite(name, value)
    if log_prob.shape != behaviour_log_prob.shape:
        raise ValueError(
            f"behaviour_log_prob must have the shape of log_prob {tuple(log_prob.shape)}, "
            f"got {tuple(behaviour_log_prob.shape)}"
        )
    if bool((behaviour_log_prob == -math.inf).any()):
        raise ValueError(
            "behaviour_log_prob must be finite: the behaviour policy sampled these actions, so their "
            "probability under it cannot be 0 (got -inf)"
        )
    return (log_prob.detach().double() - behaviour_log_prob.detach().double()).reshape(-1)
