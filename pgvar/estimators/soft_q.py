"""Entropy/KL-regularized policy gradients and soft Q-learning, and the identity that makes them one method.

Schulman, Chen, Abbeel (2017), "Equivalence Between Policy Gradients and Soft Q-Learning", arXiv:1704.06440.
The return is regularized by the KL divergence to a reference policy :math:`\\bar\\pi` (a uniform
:math:`\\bar\\pi` is the usual entropy bonus up to the constant :math:`\\tau \\log |A|`):

.. math::  \\eta(\\pi) = \\mathbb{E}\\Big[\\sum_{t \\ge 0} \\gamma^t \\big(r_t - \\tau\\, \\mathrm{KL}_t\\big)\\Big],
           \\qquad \\mathrm{KL}_t = \\mathrm{KL}\\big(\\pi(\\cdot|s_t) \\,\\|\\, \\bar\\pi(\\cdot|s_t)\\big).

A Q-function defines a Boltzmann policy and a soft value (paper, Sec. 2 and 3),

.. math::  \\pi_Q(a|s) = \\bar\\pi(a|s)\\, e^{(Q(s,a) - V_Q(s))/\\tau}, \\qquad
           V_Q(s) = \\tau \\log \\mathbb{E}_{a \\sim \\bar\\pi}\\big[e^{Q(s,a)/\\tau}\\big],

so that :math:`Q = V_Q + \\tau \\log(\\pi_Q / \\bar\\pi)`. With the n-step KL-regularized advantage
:math:`\\Delta_t` (:func:`kl_regularized_n_step_advantages`), actions sampled on-policy and every target held
constant, the gradient of the n-step soft-Q regression loss equals :math:`\\tau` times the gradient of an
entropy-regularized actor-critic loss whose value term has the coefficient :math:`1/\\tau` (paper, Sec. 4):

.. math::  \\mathbb{E}_{a_t \\sim \\pi}\\Big[\\nabla \\tfrac12 \\big(Q(s_t,a_t) - \\hat Q_t\\big)^2\\Big]
           = \\tau\\, \\mathbb{E}_{a_t \\sim \\pi}\\Big[\\nabla\\Big(-\\Delta_t \\log \\pi(a_t|s_t)
             + \\tau\\, \\mathrm{KL}_t + \\tfrac{1}{\\tau} \\tfrac12 \\big(V(s_t) - (V(s_t) + \\Delta_t)\\big)^2\\Big)\\Big],

with :math:`\\hat Q_t = V(s_t) + \\tau \\mathrm{KL}_t + \\Delta_t` (:func:`soft_q_targets`). Per sample, the two
gradients differ by :math:`\\tau^2 [(\\ell(a) - \\mathrm{KL}) \\nabla\\log\\pi(a) - \\nabla \\mathrm{KL}] +
\\tau (\\ell(a) - \\mathrm{KL}) \\nabla V` with :math:`\\ell = \\log(\\pi/\\bar\\pi)`, a term of mean zero over
:math:`a \\sim \\pi` that does not involve :math:`\\Delta` at all. So the identity holds for ANY constant
:math:`\\Delta(s, a)`, and with the actions enumerated (``actions=None``) it holds to round-off
(``tests/estimators/test_soft_q.py`` and ``docs/guide/soft_q.md`` prove it numerically).

Equation numbers: the paper's arXiv v4 has the bandit identity in Sec. 2 and the n-step identity in Sec. 4;
the docstrings cite sections because the equation numbers could not be checked against the PDF here.

Tensors with an action axis are ``[*, A]``; sequences are time-major ``[T, N]`` like SB3's rollout buffer.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from pgvar._validation import (
    as_tensor,
    check_action_tensor,
    check_finite,
    check_float_tensor,
    check_log_normalized,
    check_mask,
    check_nonnegative,
    check_positive,
    check_reference_log_probs,
    check_shape,
    check_time_major,
    check_unit_interval,
    check_zero_one_flags,
    is_concrete,
    working_dtype,
)
from pgvar.estimators.returns import gae_advantages

__all__ = [
    "EntropyRegularizedPGLoss",
    "boltzmann_log_probs",
    "entropy_regularized_pg_loss",
    "kl_regularized_n_step_advantages",
    "kl_to_reference",
    "soft_q_loss",
    "soft_q_targets",
    "soft_value",
]


def soft_value(q_values: torch.Tensor, tau: float, ref_log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """Soft (log-sum-exp) state value of a Q-function: the value of its Boltzmann policy.

    It is the KL-regularized value of the Boltzmann policy :math:`\\pi_Q` when ``Q`` is that policy's soft
    Q-function, :math:`V_Q = \\mathbb{E}_{\\pi_Q}[Q] - \\tau\\, \\mathrm{KL}(\\pi_Q \\| \\bar\\pi)`; it tends to
    :math:`\\max_a Q` as :math:`\\tau \\to 0`.

    .. math::  V_Q(s) = \\tau \\log \\sum_a \\bar\\pi(a|s)\\, e^{Q(s,a)/\\tau}
               \\quad (= \\tau\\, \\mathrm{logsumexp}_a(Q/\\tau) - \\tau \\log |A| \\text{ for uniform } \\bar\\pi)

    Differentiable in ``q_values`` (its gradient is :math:`\\pi_Q`). Reference: Schulman, Chen, Abbeel 2017,
    arXiv:1704.06440, Sec. 2 (bandit) and Sec. 3 (MDP).

    :param q_values: ``[*, A]`` action values
    :param tau: temperature :math:`\\tau > 0` (same units as rewards)
    :param ref_log_probs: ``log pi_ref`` broadcastable to ``[*, A]`` (normalized, finite); ``None`` = uniform
    :return: ``[*]`` soft values

    >>> q = torch.tensor([[0.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    >>> soft_value(q, tau=1.0)  # log((1 + e) / 2) and 2
    tensor([0.6201, 2.0000], dtype=torch.float64)
    """
    tau = float(check_positive("tau", tau))
    q_values = check_action_tensor("q_values", q_values)
    ref = (
        None if ref_log_probs is None else check_reference_log_probs("ref_log_probs", ref_log_probs, q_values)
    )
    scaled = q_values / tau
    if ref is None:
        return tau * (torch.logsumexp(scaled, dim=-1) - math.log(q_values.shape[-1]))
    return tau * torch.logsumexp(scaled + ref, dim=-1)


def boltzmann_log_probs(
    q_values: torch.Tensor, tau: float, ref_log_probs: torch.Tensor | None = None
) -> torch.Tensor:
    """Log-probabilities of the Boltzmann policy of a Q-function, relative to a reference policy.

    The policy soft Q-learning acts with; with :math:`V_Q` from :func:`soft_value` it gives the
    parametrization :math:`Q = V_Q + \\tau \\log(\\pi_Q/\\bar\\pi)` that the equivalence rests on.

    .. math::  \\log \\pi_Q(a|s) = \\log \\bar\\pi(a|s) + \\frac{Q(s,a) - V_Q(s)}{\\tau}
               = \\mathrm{log\\_softmax}_a\\big(Q(s,\\cdot)/\\tau + \\log\\bar\\pi(\\cdot|s)\\big)

    Differentiable in ``q_values``. Reference: Schulman, Chen, Abbeel 2017, arXiv:1704.06440, Sec. 2-3.

    :param q_values: ``[*, A]`` action values
    :param tau: temperature :math:`\\tau > 0`
    :param ref_log_probs: ``log pi_ref`` broadcastable to ``[*, A]``; ``None`` = uniform
    :return: ``[*, A]`` log-probabilities (each row's ``exp`` sums to 1)

    >>> q = torch.tensor([0.0, 1.0], dtype=torch.float64)
    >>> boltzmann_log_probs(q, tau=1.0).exp()
    tensor([0.2689, 0.7311], dtype=torch.float64)
    >>> ref = torch.tensor([0.9, 0.1], dtype=torch.float64).log()
    >>> boltzmann_log_probs(q, tau=1.0, ref_log_probs=ref).exp()  # 0.9 : 0.1 e
    tensor([0.7680, 0.2320], dtype=torch.float64)
    """
    tau = float(check_positive("tau", tau))
    q_values = check_action_tensor("q_values", q_values)
    ref = (
        None if ref_log_probs is None else check_reference_log_probs("ref_log_probs", ref_log_probs, q_values)
    )
    logits = q_values / tau if ref is None else q_values / tau + ref
    return torch.log_softmax(logits, dim=-1)


def kl_to_reference(log_probs: torch.Tensor, ref_log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """KL divergence of a categorical policy from the reference policy, per state.

    .. math::  \\mathrm{KL}(s) = \\sum_a \\pi(a|s) \\big(\\log \\pi(a|s) - \\log \\bar\\pi(a|s)\\big)
               \\quad (= \\log|A| - H(\\pi(\\cdot|s)) \\text{ for uniform } \\bar\\pi)

    Differentiable in ``log_probs``; :math:`\\nabla \\mathrm{KL} = \\mathbb{E}_\\pi[\\nabla\\log\\pi \\cdot
    \\log(\\pi/\\bar\\pi)]`. Actions with probability 0 contribute 0. Reference: Schulman, Chen, Abbeel 2017,
    arXiv:1704.06440, Sec. 3 (the regularizer of the return).

    :param log_probs: ``[*, A]`` log-probabilities of the policy: ``logsumexp`` over the actions must be 0
        (within a tolerance of the dtype), so logits or probabilities raise ``ValueError``
    :param ref_log_probs: ``log pi_ref`` broadcastable to ``[*, A]``; ``None`` = uniform
    :return: ``[*]`` KL divergences (>= 0)

    >>> lp = torch.tensor([0.5, 0.5], dtype=torch.float64).log()
    >>> kl_to_reference(lp)
    tensor(0., dtype=torch.float64)
    >>> kl_to_reference(torch.tensor([1.0, 0.0], dtype=torch.float64).log())  # log 2
    tensor(0.6931, dtype=torch.float64)
    """
    log_probs = check_log_normalized("log_probs", check_action_tensor("log_probs", log_probs))
    ref = (
        None if ref_log_probs is None else check_reference_log_probs("ref_log_probs", ref_log_probs, log_probs)
    )
    dtype = log_probs.dtype
    log_p = log_probs.to(working_dtype(dtype))  # 16-bit floats: the terms and their sum in float32
    probs = log_p.exp()
    ref_term = -math.log(log_p.shape[-1]) if ref is None else ref.to(log_p.dtype)
    # xlogy-style: 0 * (-inf) terms are 0.
    log_ratio = torch.where(probs > 0, log_p - ref_term, torch.zeros_like(log_p))
    return (probs * log_ratio).sum(dim=-1).to(dtype)


def kl_regularized_n_step_advantages(
    rewards: torch.Tensor,
    kls: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor | None = None,
    *,
    gamma: float,
    tau: float,
    n_step: int | None = None,
    gae_lambda: float = 1.0,
) -> torch.Tensor:
    """n-step advantage of the KL-regularized return: the learning signal of both entropy-regularized PG and
    n-step soft Q-learning.

    With the one-step KL-regularized TD error (only ``terminated`` zeroes the bootstrap)

    .. math::  \\delta_t = r_t - \\tau\\,\\mathrm{KL}_t + \\gamma (1 - \\mathrm{terminated}_t) V(s_{t+1}) - V(s_t),

    .. math::  \\Delta_t = \\sum_{d=0}^{n-1} (\\gamma\\lambda)^d \\Big[\\prod_{j<d} (1 - \\mathrm{done}_{t+j})\\Big]
               \\delta_{t+d},

    where ``done = terminated or truncated`` cuts the sum and the rollout end cuts it too (terms beyond ``T``
    are 0, so the last steps use fewer than ``n`` terms and bootstrap from ``next_values``, like SB3's A2C).
    With ``gae_lambda = 1`` it telescopes to
    :math:`\\Delta_t = \\sum_{d<k} \\gamma^d (r_{t+d} - \\tau \\mathrm{KL}_{t+d}) + \\gamma^k V(s_{t+k}) - V(s_t)`
    (``k`` steps kept), the paper's :math:`\\Delta_t` (Schulman, Chen, Abbeel 2017, arXiv:1704.06440,
    Sec. 4); ``gae_lambda < 1`` gives the KL-regularized GAE truncated at ``n`` steps (Schulman et al. 2016,
    arXiv:1506.02438, Eq. 16, on the regularized reward). The first step's ``KL_t`` is inside ``delta_t``
    because the soft Q-function excludes it: :math:`\\hat Q_t = V(s_t) + \\tau \\mathrm{KL}_t + \\Delta_t`.
    With ``n_step=None`` (or ``n_step >= T``) it is :func:`~pgvar.estimators.gae_advantages` of the regularized
    reward :math:`r - \\tau\\,\\mathrm{KL}`, and is computed by it.

    No gradient flows through the result: every input is detached (targets are constants in both losses).

    :param rewards: ``[T, N]`` rewards
    :param kls: ``[T, N]`` :math:`\\mathrm{KL}(\\pi(\\cdot|s_t) \\| \\bar\\pi)` (:func:`kl_to_reference`)
    :param values: ``[T, N]`` :math:`V(s_t)`
    :param next_values: ``[T, N]`` :math:`V(s_{t+1})` of the TRUE next observation (the final observation at a
        truncation; ignored where ``terminated``)
    :param terminated: ``[T, N]`` bool/0-1, true at the step whose next state is terminal (no bootstrap)
    :param truncated: ``[T, N]`` bool/0-1 or ``None``, true where the episode was cut (bootstrap, cut the sum)
    :param gamma: discount in [0, 1]
    :param tau: temperature :math:`\\tau > 0`
    :param n_step: number of TD errors summed (``None``: up to the end of the rollout)
    :param gae_lambda: trace decay in [0, 1]; 1 gives the plain n-step sum
    :return: ``[T, N]`` advantages :math:`\\Delta_t` (detached)

    >>> r = torch.tensor([[1.0], [1.0], [1.0]], dtype=torch.float64)
    >>> zero = torch.zeros(3, 1, dtype=torch.float64)
    >>> term = torch.tensor([[False], [False], [True]])
    >>> kl_regularized_n_step_advantages(r, zero + 0.5, zero, zero, term, gamma=0.5, tau=1.0, n_step=2)
    tensor([[0.7500],
            [0.7500],
            [0.5000]], dtype=torch.float64)
    """
    rewards = check_time_major("rewards", rewards)
    shape = rewards.shape
    kls, values, next_values = (
        check_float_tensor(name, check_shape(name, tensor, shape), "[T, N]", finite=False)
        for name, tensor in (("kls", kls), ("values", values), ("next_values", next_values))
    )
    gamma = check_unit_interval("gamma", gamma)
    gae_lambda = check_unit_interval("gae_lambda", gae_lambda)
    tau = float(check_positive("tau", tau))
    n_steps = shape[0]
    if n_step is not None:
        n_step = int(check_positive("n_step", n_step, integer=True))
    rewards = rewards.detach()
    kls = kls.detach().to(rewards.dtype)
    values = values.detach().to(rewards.dtype)
    next_values = next_values.detach().to(rewards.dtype)
    check_finite("rewards", rewards)
    check_finite("kls", kls)
    check_finite("values", values)
    not_terminated = 1.0 - check_zero_one_flags("terminated", terminated, rewards)
    not_done = not_terminated * (1.0 - check_zero_one_flags("truncated", truncated, rewards))
    # A terminal next state has no value: zero it rather than multiply, so a non-finite placeholder is harmless.
    bootstrap = torch.where(not_terminated > 0, next_values, torch.zeros_like(next_values))
    check_finite("next_values (where not terminated)", bootstrap)
    if n_step is None or n_step >= n_steps:
        # No truncation inside the rollout: this is GAE(lambda) on the KL-regularized reward r - tau KL.
        return gae_advantages(
            rewards - tau * kls,
            values,
            bootstrap,
            1.0 - not_terminated,
            1.0 - not_done,
            gamma=gamma,
            gae_lambda=gae_lambda,
        )
    deltas = rewards - tau * kls + gamma * bootstrap - values
    decay = gamma * gae_lambda
    # Truncated at n terms: add the shifted TD errors, carrying the product of (1 - done) along the window.
    advantages = deltas.clone()
    weight = torch.ones_like(deltas)
    for d in range(1, n_step):
        weight = weight[: n_steps - d] * decay * not_done[d - 1 : n_steps - 1]
        advantages[: n_steps - d] += weight * deltas[d:]
    return advantages


def soft_q_targets(
    values: torch.Tensor, kls: torch.Tensor, advantages: torch.Tensor, *, tau: float
) -> torch.Tensor:
    """n-step soft-Q regression targets :math:`\\hat Q_t` from the KL-regularized advantages.

    .. math::  \\hat Q_t = V(s_t) + \\tau\\,\\mathrm{KL}_t + \\Delta_t
               = r_t + \\sum_{d=1}^{n-1} \\gamma^d (r_{t+d} - \\tau \\mathrm{KL}_{t+d}) + \\gamma^n V(s_{t+n})

    (the second form for ``gae_lambda = 1`` and no episode end in the window). The soft Q-function excludes the
    first KL term, so the target does too (Schulman, Chen, Abbeel 2017, arXiv:1704.06440, Sec. 4).
    Detached: the target is a constant of the regression.

    :param values: ``[*]`` :math:`V(s_t)`
    :param kls: ``[*]`` :math:`\\mathrm{KL}_t`
    :param advantages: ``[*]`` :math:`\\Delta_t`, or ``[*, A]`` (one per action, for enumerated actions)
    :param tau: temperature :math:`\\tau > 0`
    :return: targets with the shape of ``advantages`` (detached)

    >>> soft_q_targets(torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([2.0]), tau=0.1)
    tensor([3.0500])
    """
    tau = float(check_positive("tau", tau))
    values = as_tensor("values", values)
    kls = check_shape("kls", kls, values.shape, like="values")
    advantages = as_tensor("advantages", advantages)
    base = (values + tau * kls).detach()
    if advantages.dim() == values.dim() + 1:
        check_shape("advantages", advantages, (*values.shape, advantages.shape[-1]))
        base = base.unsqueeze(-1)
    else:
        check_shape("advantages", advantages, values.shape)
    return base + advantages.detach()


def _masked_mean(terms: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return terms.mean()
    weights = mask.to(terms.dtype)
    return (terms * weights).sum() / weights.sum()


def _check_actions(actions: torch.Tensor, shape: torch.Size, n_actions: int) -> torch.Tensor:
    actions = as_tensor("actions", actions, f" of integer action indices with shape {tuple(shape)}")
    if actions.dtype.is_floating_point or actions.dtype == torch.bool:
        raise ValueError(
            f"actions must be an integer tensor of action indices with shape {tuple(shape)}, got {actions.dtype}"
        )
    check_shape("actions", actions, shape)
    if is_concrete(actions) and actions.numel() > 0:
        low, high = int(actions.min()), int(actions.max())
        if low < 0 or high >= n_actions:
            raise ValueError(f"actions must be in [0, {n_actions - 1}], got values in [{low}, {high}]")
    return actions


def _action_weights(action_weights: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    weights = check_shape("action_weights", action_weights, shape).detach()
    if is_concrete(weights):
        tol = 1e-9 if weights.dtype == torch.float64 else 1e-4
        if bool((weights < 0).any()) or not bool(((weights.sum(-1) - 1).abs() <= tol).all()):
            raise ValueError(
                "action_weights must be a probability distribution over the last axis (the on-policy "
                f"pi(a|s) the expectation is taken over): nonnegative rows summing to 1 (tolerance {tol:g})"
            )
    return weights


class EntropyRegularizedPGLoss(NamedTuple):
    """The entropy-regularized actor-critic loss and its parts (scalars, differentiable).

    ``loss = policy_loss + tau * kl_loss + value_coef * value_loss``.
    """

    loss: torch.Tensor
    """The total, to call ``backward()`` on."""
    policy_loss: torch.Tensor
    """Mean of :math:`-\\Delta_t \\log \\pi(a_t|s_t)` (score-function term, baseline V inside Delta)."""
    kl_loss: torch.Tensor
    """Mean of :math:`\\mathrm{KL}(\\pi(\\cdot|s_t) \\| \\bar\\pi)` (analytic regularizer gradient)."""
    value_loss: torch.Tensor
    """Mean of :math:`\\tfrac12 (V(s_t) - (V(s_t) + \\Delta_t))^2` with the target held constant."""


def entropy_regularized_pg_loss(
    log_probs: torch.Tensor,
    values: torch.Tensor,
    actions: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    tau: float,
    ref_log_probs: torch.Tensor | None = None,
    value_coef: float | None = None,
    action_weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> EntropyRegularizedPGLoss:
    """Entropy/KL-regularized actor-critic loss: the policy gradient that n-step soft Q-learning follows.

    Its gradient is an estimate of :math:`-\\nabla \\eta` (the regularized return) plus the gradient of a value
    regression to :math:`V + \\Delta`; ``tau`` times it equals the soft-Q gradient in expectation over
    on-policy actions (module docstring; Schulman, Chen, Abbeel 2017, arXiv:1704.06440, Sec. 4, which
    says the value error has the coefficient :math:`\\tau^{-1}` relative to the policy gradient, hence the
    default ``value_coef = 1/tau``).

    .. math::  L = \\underbrace{-\\Delta_t \\log \\pi(a_t|s_t)}_{\\texttt{policy\\_loss}}
               + \\tau \\underbrace{\\mathrm{KL}_t}_{\\texttt{kl\\_loss}}
               + c_V \\underbrace{\\tfrac12 \\big(V(s_t) - (V(s_t) + \\Delta_t)\\big)^2}_{\\texttt{value\\_loss}},
               \\qquad c_V = 1/\\tau \\text{ by default}

    averaged over the (masked) entries. With ``actions=None`` the expectation over the action is
    enumerated instead of sampled: each entry contributes
    :math:`\\sum_a w_a [-\\Delta(a) \\log\\pi(a) + c_V \\tfrac12 \\Delta(a)^2\\text{-term}] + \\tau\\,\\mathrm{KL}`
    with constant weights :math:`w = \\pi(\\cdot|s)` (or ``action_weights``).

    Gradient flow: through ``log_probs`` (score term and KL) and ``values`` (value term only). ``advantages``
    and the value target :math:`V + \\Delta` are detached here; the baseline enters only through
    :math:`\\Delta` (compute it with :func:`kl_regularized_n_step_advantages`).

    Note: SB3's A2C writes the value term as ``vf_coef * mean((V - R)**2)``, without the 1/2:
    ``vf_coef = value_coef / 2``.

    :param log_probs: ``[*, A]`` log-probabilities of the policy at the states (differentiable)
    :param values: ``[*]`` state values :math:`V(s_t)` (differentiable)
    :param actions: ``[*]`` integer actions taken, or ``None`` to enumerate all actions
    :param advantages: ``[*]`` :math:`\\Delta_t` for the taken actions, or ``[*, A]`` when ``actions is None``
    :param tau: temperature :math:`\\tau > 0`
    :param ref_log_probs: ``log pi_ref`` broadcastable to ``[*, A]``; ``None`` = uniform (entropy bonus)
    :param value_coef: coefficient :math:`c_V` of ``value_loss``; ``None`` = ``1/tau`` (the equivalent one)
    :param action_weights: ``[*, A]`` probabilities to enumerate with (default ``exp(log_probs)``, detached)
    :param mask: ``[*]`` bool, the entries to average over (``None`` = all)
    :return: :class:`EntropyRegularizedPGLoss` ``(loss, policy_loss, kl_loss, value_loss)``

    >>> log_probs = torch.tensor([[0.25, 0.75]], dtype=torch.float64).log().requires_grad_()
    >>> out = entropy_regularized_pg_loss(log_probs, torch.zeros(1, dtype=torch.float64), torch.tensor([1]),
    ...                                   torch.tensor([2.0], dtype=torch.float64), tau=0.5)
    >>> [round(float(x.detach()), 4) for x in out]  # policy -2 log 0.75; value 0.5 * 2**2; loss p + kl/2 + 2 v
    [4.6408, 0.5754, 0.1308, 2.0]
    """
    tau = float(check_positive("tau", tau))
    log_probs = check_action_tensor("log_probs", log_probs)
    lead, n_actions = log_probs.shape[:-1], log_probs.shape[-1]
    values = check_shape("values", values, lead, like="log_probs without the action axis")
    mask = check_mask("mask", mask, lead)
    value_coef = 1.0 / tau if value_coef is None else check_nonnegative("value_coef", value_coef)
    kls = kl_to_reference(log_probs, ref_log_probs)
    advantages = as_tensor("advantages", advantages).detach().to(log_probs.dtype)
    value_targets_base = values.detach()
    if actions is not None:
        if action_weights is not None:
            raise ValueError("action_weights is only used when actions is None (enumerated actions)")
        actions = _check_actions(actions, lead, n_actions)
        check_shape("advantages", advantages, lead)
        taken_log_probs = log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        policy_terms = -advantages * taken_log_probs
        value_terms = 0.5 * (values - (value_targets_base + advantages)) ** 2
    else:
        check_shape("advantages", advantages, log_probs.shape)
        if action_weights is None:
            weights = log_probs.detach().exp()
        else:
            weights = _action_weights(action_weights, log_probs.shape).to(log_probs.dtype)
        policy_terms = -(weights * advantages * log_probs).sum(-1)
        value_errors = values.unsqueeze(-1) - (value_targets_base.unsqueeze(-1) + advantages)
        value_terms = (weights * 0.5 * value_errors**2).sum(-1)
    policy_loss = _masked_mean(policy_terms, mask)
    kl_loss = _masked_mean(kls, mask)
    value_loss = _masked_mean(value_terms, mask)
    loss = policy_loss + tau * kl_loss + value_coef * value_loss
    return EntropyRegularizedPGLoss(loss, policy_loss, kl_loss, value_loss)


def soft_q_loss(
    q_values: torch.Tensor,
    actions: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    action_weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """n-step soft Q-learning loss: squared error of :math:`Q(s_t, a_t)` to a constant target.

    With on-policy (Boltzmann) actions and :math:`\\hat Q_t` from :func:`soft_q_targets`, its gradient equals
    ``tau`` times the gradient of :func:`entropy_regularized_pg_loss` (with ``value_coef = 1/tau``) in
    expectation over the actions, and exactly when the actions are enumerated (Schulman, Chen, Abbeel 2017,
    arXiv:1704.06440, Sec. 4; the module docstring gives the per-sample difference).

    .. math::  L = \\tfrac12 \\big(Q(s_t, a_t) - \\hat Q_t\\big)^2
               \\quad\\text{or, enumerated,}\\quad \\sum_a w_a\\, \\tfrac12 \\big(Q(s_t, a) - \\hat Q_t(a)\\big)^2

    averaged over the (masked) entries. Gradient flow: through ``q_values`` only; ``targets`` and
    ``action_weights`` are detached here (the stop-gradient the equivalence needs).

    :param q_values: ``[*, A]`` action values (differentiable)
    :param actions: ``[*]`` integer actions taken, or ``None`` to enumerate all actions
    :param targets: ``[*]`` :math:`\\hat Q_t`, or ``[*, A]`` (one per action) when ``actions is None``
    :param action_weights: ``[*, A]`` the on-policy probabilities :math:`\\pi_Q(a|s)` to enumerate with
        (required when ``actions is None``; e.g. ``boltzmann_log_probs(q, tau).exp()``)
    :param mask: ``[*]`` bool, the entries to average over (``None`` = all)
    :return: scalar loss

    >>> q = torch.tensor([[1.0, 3.0]], requires_grad=True)
    >>> soft_q_loss(q, torch.tensor([1]), torch.tensor([2.0]))
    tensor(0.5000, grad_fn=<MeanBackward0>)
    """
    q_values = check_action_tensor("q_values", q_values)
    lead, n_actions = q_values.shape[:-1], q_values.shape[-1]
    mask = check_mask("mask", mask, lead)
    targets = as_tensor("targets", targets).detach().to(q_values.dtype)
    if actions is not None:
        if action_weights is not None:
            raise ValueError("action_weights is only used when actions is None (enumerated actions)")
        actions = _check_actions(actions, lead, n_actions)
        check_shape("targets", targets, lead)
        taken_q = q_values.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        terms = 0.5 * (taken_q - targets) ** 2
    else:
        if action_weights is None:
            raise ValueError(
                "action_weights is required when actions is None: pass the on-policy probabilities pi_Q(a|s) "
                "of shape [*, A] to take the expectation over the actions with"
            )
        check_shape("targets", targets, q_values.shape)
        weights = _action_weights(action_weights, q_values.shape).to(q_values.dtype)
        terms = (weights * 0.5 * (q_values - targets) ** 2).sum(-1)
    return _masked_mean(terms, mask)
