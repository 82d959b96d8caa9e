r"""The factorized action-dependent baseline of Wu et al. (2018) for policies that factorize over action dimensions.

A diagonal Gaussian (SB3's default continuous policy) is a product :math:`\pi(a|s) = \prod_k \pi_k(a_k|s)`, so its
score is a sum over dimensions, :math:`\nabla \log \pi = \sum_k \nabla \log \pi_k(a_k|s)`, and each term may have
its own baseline that depends on the state AND the other action dimensions :math:`a_{-k}`:

.. math::  \hat g = \sum_{k=1}^K \nabla_\theta \log \pi_k(a_k|s)\, \big(\hat A - b_k(s, a_{-k})\big).

It stays unbiased because, given :math:`s` and :math:`a_{-k}`, the dimension :math:`a_k` is drawn independently
and :math:`\mathbb E_{a_k}[\nabla \log \pi_k(a_k|s)] = 0`, so no correction term is needed (unlike a general
:math:`b(s, a)`, see Q-Prop in :mod:`pgvar.estimators.control_variates`). The best per-dimension baseline is close
to :math:`b_k^*(s, a_{-k}) = \mathbb E_{a_k}[\hat A \mid s, a_{-k}]` (Wu et al., Eq. 8, which also weights by the
score's squared norm); with :math:`b_k = V(s)` for every ``k`` it is the ordinary state baseline.

Tucker et al. (2018) found that on MuJoCo tasks learned state-action baselines remove little variance, because
the action term :math:`\Sigma_a` is small next to the trajectory term :math:`\Sigma_\tau`; Wu et al.'s gains are on
high-dimensional action spaces. pgvar offers it as a row to measure, not as a default.

Wu et al.'s linear version (``cathywu/rllab``, ``rllab/baselines/action_dependent_linear_feature_baseline.py``)
fits one sub-baseline per dimension on the features :math:`(s, s^2, a_{-k}, a_{-k}^2, t, t^2, t^3)` to the returns;
:func:`other_action_dimensions` builds the :math:`a_{-k}` inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pgvar._validation import check_finite, is_concrete

__all__ = ["FactorizedBaselineEstimate", "factorized_action_baseline", "other_action_dimensions"]


class FactorizedBaselineEstimate(NamedTuple):
    """What :func:`factorized_action_baseline` returns (see there)."""

    #: ``[..., K]`` detached per-dimension learning signals :math:`\hat A - b_k(s, a_{-k})`
    learning_signals: torch.Tensor
    #: scalar, mean over samples of :math:`\sum_k \log \pi_k(a_k|s)\, (\hat A - b_k)`; its gradient is the estimate
    surrogate: torch.Tensor


def factorized_action_baseline(
    log_probs: torch.Tensor,
    adv_hat: torch.Tensor,
    baselines: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
) -> FactorizedBaselineEstimate:
    r"""Per-dimension learning signals and the surrogate of Wu et al.'s factorized action-dependent baseline.

    .. math::  \ell_k = \hat A - b_k(s, a_{-k}), \qquad
               \text{surrogate} = \frac{1}{|\mathcal B|} \sum_{i \in \mathcal B} \sum_{k=1}^K
               \log \pi_k(a_{ik}|s_i)\, \ell_{ik},

    so that ``autograd.grad(surrogate)`` is the batch mean of
    :math:`\sum_k \nabla \log \pi_k(a_k|s)\,(\hat A - b_k)` (maximize it; a loss is ``-surrogate``). Unbiased
    for any ``b_k`` that does not depend on :math:`a_k` (see the module docstring); the caller must make sure
    it does not (for example by feeding :func:`other_action_dimensions`).

    Works under :func:`torch.func.vmap` (the value checks are skipped there), so per-sample gradients of the
    surrogate give the per-sample estimates.

    Gradient flow: ``learning_signals`` are detached (``adv_hat`` and ``baselines`` receive no gradient); the
    surrogate is differentiable in ``log_probs``.

    :param log_probs: ``[..., K]`` per-dimension log-probabilities :math:`\log \pi_k(a_k|s)` of the sampled
        actions, differentiable in the policy parameters (for SB3's ``DiagGaussianDistribution``:
        ``dist.distribution.log_prob(actions)`` before the sum over the last dimension)
    :param adv_hat: ``[...]`` the advantage (or return) estimate :math:`\hat A`
    :param baselines: ``[..., K]`` the baseline values :math:`b_k(s, a_{-k})`
    :param mask: bool ``[...]`` selecting the samples to average (padding); ``None``: all
    :return: :class:`FactorizedBaselineEstimate` ``(learning_signals [..., K], surrogate scalar)``

    Reference: Wu, Rajeswaran, Duan, Kumar, Bayen, Kakade, Mordatch, Abbeel (2018), "Variance Reduction for
    Policy Gradient with Action-Dependent Factorized Baselines", ICLR, arXiv:1803.07246, Eq. 5 and Sec. 3.1.

    >>> log_probs = torch.zeros(1, 2, requires_grad=True)
    >>> out = factorized_action_baseline(log_probs, torch.tensor([3.0]), torch.tensor([[1.0, 2.5]]))
    >>> out.learning_signals
    tensor([[2.0000, 0.5000]])
    >>> torch.autograd.grad(out.surrogate, log_probs)
    (tensor([[2.0000, 0.5000]]),)
    """
    for name, tensor in (("log_probs", log_probs), ("adv_hat", adv_hat), ("baselines", baselines)):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be a floating-point torch.Tensor, got {got}")
        if is_concrete(tensor):
            check_finite(name, tensor.detach())
    if log_probs.dim() < 1:
        raise ValueError(
            f"log_probs must have shape [..., K] (one entry per action dimension), got {tuple(log_probs.shape)}"
        )
    if baselines.shape != log_probs.shape:
        raise ValueError(
            f"baselines must have the shape of log_probs {tuple(log_probs.shape)} (one b_k per action dimension), "
            f"got {tuple(baselines.shape)}"
        )
    if adv_hat.shape != log_probs.shape[:-1]:
        raise ValueError(
            f"adv_hat must have shape {tuple(log_probs.shape[:-1])} (log_probs without the action dimension), "
            f"got {tuple(adv_hat.shape)}"
        )
    signals = (adv_hat.detach().unsqueeze(-1) - baselines.detach()).to(log_probs.dtype)
    per_sample = (log_probs * signals).sum(dim=-1)
    if mask is None:
        surrogate = per_sample.mean()
    else:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != adv_hat.shape:
            found = (
                f"{mask.dtype}, shape {tuple(mask.shape)}"
                if isinstance(mask, torch.Tensor)
                else type(mask).__name__
            )
            raise ValueError(
                f"mask must be a bool tensor of shape {tuple(adv_hat.shape)} (like adv_hat), got {found}"
            )
        if is_concrete(mask) and not bool(mask.any()):
            raise ValueError("mask must select at least one sample, got an all-False mask")
        surrogate = per_sample[mask].mean()
    return FactorizedBaselineEstimate(learning_signals=signals, surrogate=surrogate)


def other_action_dimensions(actions: torch.Tensor) -> torch.Tensor:
    r"""For each action dimension ``k``, the other dimensions :math:`a_{-k}`: the inputs of the ``K`` baselines.

    .. math::  \mathrm{out}[..., k, :] = (a_1, \dots, a_{k-1}, a_{k+1}, \dots, a_K)

    :param actions: ``[..., K]`` actions, ``K >= 2`` (with one dimension there is nothing to condition on)
    :return: ``[..., K, K - 1]``, differentiable in ``actions``

    >>> other_action_dimensions(torch.tensor([1.0, 2.0, 3.0]))
    tensor([[2., 3.],
            [1., 3.],
            [1., 2.]])
    """
    if not isinstance(actions, torch.Tensor) or actions.dim() < 1 or actions.shape[-1] < 2:
        got = tuple(actions.shape) if isinstance(actions, torch.Tensor) else type(actions).__name__
        raise ValueError(
            f"actions must be a tensor of shape [..., K] with K >= 2 action dimensions, got {got}"
        )
    k = actions.shape[-1]
    index = torch.tensor([[j for j in range(k) if j != i] for i in range(k)], device=actions.device)
    return actions[..., index]
