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

from pgvar._validation import (
    as_tensor,
    check_float_tensor,
    check_mask,
    check_same_shape,
    check_shape,
    working_dtype,
)

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
    log_probs = check_float_tensor("log_probs", log_probs, "[..., K]")
    adv_hat = check_float_tensor("adv_hat", adv_hat, "[...]")
    baselines = check_float_tensor("baselines", baselines, "[..., K]")
    if log_probs.dim() < 1:
        raise ValueError(
            f"log_probs must have shape [..., K] (one entry per action dimension), got {tuple(log_probs.shape)}"
        )
    check_same_shape("baselines", baselines, "log_probs", log_probs)
    check_shape("adv_hat", adv_hat, log_probs.shape[:-1], like="log_probs without the action dimension")
    mask = check_mask("mask", mask, adv_hat.shape)
    signals = (adv_hat.detach().unsqueeze(-1) - baselines.detach()).to(log_probs.dtype)
    compute = working_dtype(log_probs.dtype)  # 16-bit floats: products, sums and mean in float32
    per_sample = (log_probs.to(compute) * signals.to(compute)).sum(dim=-1)
    surrogate = per_sample.mean() if mask is None else per_sample[mask].mean()
    return FactorizedBaselineEstimate(learning_signals=signals, surrogate=surrogate.to(log_probs.dtype))


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
    actions = as_tensor("actions", actions, " of shape [..., K]")
    if actions.dim() < 1 or actions.shape[-1] < 2:
        raise ValueError(
            f"actions must be a tensor of shape [..., K] with K >= 2 action dimensions, got {tuple(actions.shape)}"
        )
    k = actions.shape[-1]
    index = torch.tensor([[j for j in range(k) if j != i] for i in range(k)], device=actions.device)
    return actions[..., index]
