r"""Action-dependent control variates: Q-Prop (continuous actions) and the all-action estimator (discrete actions).

A control variate :math:`\phi(s, a)` subtracted from the advantage is unbiased only together with its analytic
expectation, which is added back:

.. math::

    \nabla_\theta J = \mathbb{E}\big[g\,(\hat A - \phi(s, a))\big]
        + \mathbb{E}_s\big[\nabla_\theta \mathbb{E}_{a \sim \pi_\theta(\cdot|s)}[\phi(s, a)]\big],
    \qquad g = \nabla_\theta \log \pi_\theta(a|s).

- **Q-Prop** (Gu et al. 2017, arXiv:1611.02247, Eq. 8-9) takes the first-order Taylor expansion of an
  off-policy critic :math:`Q_w` around the policy mean, :math:`\bar A = \nabla_a Q_w(s, \mu(s)) \cdot
  (a - \mu(s))`, whose expectation term is the deterministic-policy (DDPG-style) gradient
  :math:`\nabla_a Q_w(s, \mu) \nabla_\theta \mu`. Functions: :func:`qprop_control_variate`,
  :func:`qprop_action_variance`, :func:`~pgvar.estimators.qprop_eta` (in :mod:`pgvar.estimators.qprop_eta`), :func:`qprop_learning_signal`,
  :func:`qprop_correction_surrogate`, :func:`qprop_normalize`.
- **All-action** (discrete actions): :math:`\phi = Q_w(s, a) - \sum_{a'} \pi(a'|s) Q_w(s, a')`, whose expectation
  term :math:`\sum_a \nabla_\theta \pi(a|s) Q_w(s, a)` is an exact sum: :func:`all_action_control_variate`.

Two traps, both measured in ``docs/guide/qprop.md`` (``examples/qprop_bias.py``):

1. The weight :math:`\eta` must not depend on the sampled action. The published conservative and aggressive
   rules use the single-sample product :math:`\hat A_t \bar A_t` (``scope="sample"``), which makes the estimator
   biased by :math:`-\mathbb{E}_s[\operatorname{Cov}_a(\eta, g \bar A)]`. Estimating the covariance from the
   whole batch that :math:`\eta` then weights (``scope="batch"``) is still biased: where the covariance is near 0,
   the indicator or sign of the batch's own estimate follows its noise, and the bias is :math:`O(1/\sqrt N)`
   (about 15% (conservative) and 35% (aggressive) of one batch's standard deviation, at every batch size).
   ``scope="crossfit"`` (the default) computes :math:`\eta` for each fold of the batch from the other folds only,
   so :math:`\eta` is independent of the samples it weights and the estimator is unbiased.
2. Normalizing the learning signal by its standard deviation :math:`\sigma` but not the analytic term
   (``qprop_normalize(..., mode="as_published")``) changes the expectation to
   :math:`\sigma^{-1} \nabla J + (1 - \sigma^{-1})\, \mathbb{E}[\eta \nabla_a Q_w \nabla_\theta \mu]`
   (Tucker et al. 2018, arXiv:1802.10031); ``mode="consistent"`` divides :math:`\eta` by the same :math:`\sigma`.

Gradient flow (every function): the learning signals, control variates and weights :math:`\eta` are returned
detached, like advantages; only the two surrogates (:func:`qprop_correction_surrogate` and the ``surrogate`` of
:func:`all_action_control_variate`) carry a graph, to the policy parameters :math:`\theta`. The critic enters
them as a constant: the caller freezes its parameters (the surrogates detach the tensors they are given for
:math:`\eta` and the all-action ``q_values``, but cannot see inside a critic network evaluated at
:math:`\mu_\theta(s)`). The functions run inside :func:`torch.func.vmap` (value checks are skipped there), so
:func:`pgvar.measure.per_sample_gradients` can differentiate them per sample.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np
import torch

from pgvar._validation import (
    as_tensor,
    check_choice,
    check_finite,
    check_float_tensor,
    check_mask,
    check_nonnegative,
    check_positive,
    check_same_shape,
    is_concrete,
    working_dtype,
)

__all__ = [
    "QPROP_NORMALIZATION_MODES",
    "AllActionControlVariate",
    "QPropNormalized",
    "all_action_control_variate",
    "qprop_action_variance",
    "qprop_control_variate",
    "qprop_correction_surrogate",
    "qprop_learning_signal",
    "qprop_normalize",
]

#: Normalization of the Q-Prop learning signal (:func:`qprop_normalize`).
QPROP_NORMALIZATION_MODES = ("consistent", "as_published", "none")


class QPropNormalized(NamedTuple):
    """What :func:`qprop_normalize` returns: the signal for the score term and the :math:`\\eta` for the correction."""

    #: the (centred and scaled) learning signal, the weight of :math:`\nabla_\theta \log \pi(a|s)`
    learning_signal: torch.Tensor
    #: the weight to pass to :func:`qprop_correction_surrogate`
    eta: torch.Tensor


class AllActionControlVariate(NamedTuple):
    """What :func:`all_action_control_variate` returns (see there)."""

    #: ``[...]`` detached residual :math:`\hat A - (Q_w(s, a) - \sum_{a'} \pi(a'|s) Q_w(s, a'))`
    learning_signal: torch.Tensor
    #: scalar, mean over samples of :math:`\sum_a \pi_\theta(a|s) Q_w(s, a)` (gradient to the policy only)
    surrogate: torch.Tensor


# ------------------------------------------------------------------------------------------------ helpers
def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum()


def _check_eta(eta: torch.Tensor | float, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """``eta`` as a detached tensor of ``like``'s dtype: a scalar or a tensor of ``like``'s shape."""
    if isinstance(eta, (bool, np.bool_)) or not isinstance(eta, (numbers.Real, torch.Tensor, np.ndarray)):
        raise ValueError(
            f"eta must be a number or a tensor of shape {tuple(like.shape)}, got {type(eta).__name__}"
        )
    eta_tensor = torch.as_tensor(eta, dtype=like.dtype, device=like.device)
    if eta_tensor.dim() != 0 and eta_tensor.shape != like.shape:
        raise ValueError(
            f"eta must be a scalar or have the shape of {like_name} {tuple(like.shape)}, "
            f"got shape {tuple(eta_tensor.shape)}"
        )
    if is_concrete(eta_tensor):
        check_finite("eta", eta_tensor)
    return eta_tensor.detach()


def _check_box_actions(name: str, tensor: object) -> torch.Tensor:
    tensor = as_tensor(name, tensor, " of continuous (Box) actions [..., d_a]")
    if not tensor.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor of continuous (Box) actions [..., d_a], got dtype "
            f"{tensor.dtype}; for Discrete actions use all_action_control_variate"
        )
    tensor = check_float_tensor(name, tensor, "[..., d_a]")
    if tensor.dim() < 1 or tensor.shape[-1] < 1:
        raise ValueError(
            f"{name} must have a trailing action axis [..., d_a] with d_a >= 1 (keep it for d_a = 1), "
            f"got shape {tuple(tensor.shape)}"
        )
    return tensor


# ------------------------------------------------------------------------------------------------ Q-Prop
def qprop_control_variate(
    grad_q_at_mean: torch.Tensor, actions: torch.Tensor, mean_actions: torch.Tensor
) -> torch.Tensor:
    r"""The Q-Prop control variate :math:`\bar A`: the critic's first-order Taylor advantage around the policy mean.

    It is the part of the advantage that a critic linearized at :math:`\mu(s)` predicts; subtracting
    :math:`\eta \bar A` from :math:`\hat A` removes that part of the action variance, and
    :func:`qprop_correction_surrogate` adds its expectation back, so the pair is unbiased for any critic (with
    an :math:`\eta` that does not depend on the action, see :func:`qprop_eta`).

    .. math::

        \bar A(s, a) = \nabla_a Q_w(s, a)\big|_{a = \mu_\theta(s)} \cdot \big(a - \mu_\theta(s)\big),
        \qquad \mathbb{E}_{a \sim \pi(\cdot|s)}[\bar A(s, a)] = 0 .

    Compute ``grad_q_at_mean`` with the critic at the mean action, e.g.
    ``mean = mu.detach().requires_grad_(); (grad_q,) = torch.autograd.grad(critic(obs, mean).sum(), mean)``
    (the official code's ``tf.gradients(qvals, action0)``).

    Gradient flow: the result is detached from all three inputs. :math:`\bar A` weighs the score term like an
    advantage; the gradient through :math:`\mu_\theta` comes from :func:`qprop_correction_surrogate`.

    :param grad_q_at_mean: :math:`\nabla_a Q_w(s, a)|_{a = \mu(s)}`, shape ``[..., d_a]`` (e.g. ``[T, N, d_a]``)
    :param actions: the sampled actions :math:`a`, ``[..., d_a]`` (float: continuous ``Box`` actions only)
    :param mean_actions: the policy means :math:`\mu_\theta(s)`, ``[..., d_a]``
    :return: :math:`\bar A`, shape ``[...]``, detached

    Reference: Gu, Lillicrap, Ghahramani, Turner, Levine (2017), "Q-Prop: Sample-Efficient Policy Gradient with
    an Off-Policy Critic", ICLR, arXiv:1611.02247, Eq. 8 (:math:`\bar A_w`); official code
    ``continuous_mlp_q_function.py::get_cv_sym`` (rllabplusplus).

    >>> grad_q = torch.tensor([[1.0, -2.0]])
    >>> qprop_control_variate(grad_q, torch.tensor([[0.5, 1.0]]), torch.tensor([[0.0, 0.5]]))  # 0.5 - 1.0
    tensor([-0.5000])
    """
    grad_q_at_mean = check_float_tensor("grad_q_at_mean", grad_q_at_mean, "[..., d_a]")
    actions = _check_box_actions("actions", actions)
    mean_actions = _check_box_actions("mean_actions", mean_actions)
    check_same_shape("grad_q_at_mean", grad_q_at_mean, "actions", actions)
    check_same_shape("mean_actions", mean_actions, "actions", actions)
    return ((actions.detach() - mean_actions.detach()) * grad_q_at_mean.detach()).sum(-1)


def qprop_action_variance(grad_q_at_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    r"""The exact conditional variance of :math:`\bar A` under a diagonal Gaussian policy.

    The denominator of the fully adaptive :math:`\eta^*(s) = \operatorname{Cov}_a(\hat A, \bar A) /
    \operatorname{Var}_a(\bar A)`; no sampling is needed because :math:`\bar A` is linear in the action.

    .. math::

        \operatorname{Var}_{a \sim \mathcal{N}(\mu, \Sigma)}\big[\bar A(s, a)\big]
            = \nabla_a Q_w^\top \Sigma\, \nabla_a Q_w = \sum_k (\partial_{a_k} Q_w)^2 \sigma_k^2,
        \qquad \Sigma = \operatorname{diag}(\sigma^2).

    Gradient flow: detached.

    :param grad_q_at_mean: :math:`\nabla_a Q_w(s, \mu(s))`, ``[..., d_a]``
    :param std: the policy's standard deviations :math:`\sigma`, ``[..., d_a]`` or broadcastable to it (e.g.
        ``[d_a]``, the state-independent ``exp(log_std)`` of SB3), all ``>= 0``
    :return: ``[...]``, detached

    Reference: Gu et al. (2017), arXiv:1611.02247, Eq. 12 (:math:`\operatorname{Var}_a(\bar A_w)`).

    >>> qprop_action_variance(torch.tensor([[1.0, -2.0]]), torch.tensor([0.5, 0.1]))  # 0.25 + 0.04
    tensor([0.2900])
    """
    grad_q_at_mean = check_float_tensor("grad_q_at_mean", grad_q_at_mean, "[..., d_a]")
    std = check_float_tensor("std", std, "[..., d_a]")
    if grad_q_at_mean.dim() < 1:
        raise ValueError(
            f"grad_q_at_mean must have a trailing action axis [..., d_a], got shape {tuple(grad_q_at_mean.shape)}"
        )
    try:
        shape = torch.broadcast_shapes(std.shape, grad_q_at_mean.shape)
    except RuntimeError:
        shape = None
    if shape != grad_q_at_mean.shape:
        raise ValueError(
            f"std must broadcast to the shape of grad_q_at_mean {tuple(grad_q_at_mean.shape)}, "
            f"got shape {tuple(std.shape)}"
        )
    if is_concrete(std) and bool((std < 0).any()):
        raise ValueError(f"std must be >= 0 (standard deviations), got a minimum of {float(std.min())}")
    return (grad_q_at_mean.detach().square() * std.detach().square()).sum(-1)


def qprop_learning_signal(
    adv_hat: torch.Tensor, adv_bar: torch.Tensor, eta: torch.Tensor | float
) -> torch.Tensor:
    r"""The Q-Prop learning signal :math:`\ell = \hat A - \eta \bar A`, the weight of the score term.

    .. math::

        \nabla_\theta J = \mathbb{E}\big[\nabla_\theta \log \pi_\theta(a|s)\, \ell\big]
            + \mathbb{E}\big[\eta\, \nabla_a Q_w(s, \mu_\theta(s)) \nabla_\theta \mu_\theta(s)\big]

    The second term is :func:`qprop_correction_surrogate`. With :math:`\eta = 0` the signal is :math:`\hat A`:
    Q-Prop reduces to the plain estimator. Normalize it with :func:`qprop_normalize`, not
    :func:`~pgvar.estimators.normalize_advantages`, so that :math:`\eta` is scaled consistently.

    Gradient flow: detached.

    :param adv_hat: :math:`\hat A`, any shape (e.g. ``[T, N]``)
    :param adv_bar: :math:`\bar A` (:func:`qprop_control_variate`), the shape of ``adv_hat``
    :param eta: :math:`\eta` (:func:`qprop_eta`): a number or a tensor of ``adv_hat``'s shape
    :return: :math:`\ell`, the shape of ``adv_hat``, detached

    Reference: Gu et al. (2017), arXiv:1611.02247, Eq. 9 and Algorithm 1, step 12; official code
    ``advantages -= etas * advantages_bar`` (``rllab/sampler/base.py``).

    >>> qprop_learning_signal(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0]), torch.tensor([1.0, 0.0]))
    tensor([ 0.5000, -2.0000])
    """
    adv_hat = check_float_tensor("adv_hat", adv_hat)
    adv_bar = check_float_tensor("adv_bar", adv_bar)
    check_same_shape("adv_bar", adv_bar, "adv_hat", adv_hat)
    eta_tensor = _check_eta(eta, adv_hat, "adv_hat")
    return adv_hat.detach() - eta_tensor * adv_bar.detach()


def qprop_correction_surrogate(
    q_at_policy_mean: torch.Tensor, eta: torch.Tensor | float, *, mask: torch.Tensor | None = None
) -> torch.Tensor:
    r"""The Q-Prop analytic ("correction") term as a surrogate: the batch mean of :math:`\eta\, Q_w(s, \mu_\theta(s))`.

    Its gradient with respect to the policy parameters, the critic frozen and :math:`\eta` held constant, is the
    expectation that the control variate :math:`\eta \bar A` took out of the score term:

    .. math::

        \nabla_\theta \Big[\frac1N \sum_i \eta_i\, Q_w\big(s_i, \mu_\theta(s_i)\big)\Big]
            = \frac1N \sum_i \eta_i\, \nabla_a Q_w(s_i, a)\big|_{a = \mu_\theta(s_i)} \nabla_\theta \mu_\theta(s_i)
            \;\approx\; \mathbb{E}\big[\eta\, \nabla_a Q_w \nabla_\theta \mu_\theta\big].

    It is an objective (ascend it): add it to the score-function objective
    :math:`\frac1N \sum_i \log \pi_\theta(a_i|s_i)\, \ell_i` averaged over the **same** samples, or subtract it
    from a loss, as the official code does (``surr_loss -= mean(e_qval * eta)``). In PPO/TRPO it is added
    outside the ratio clipping. Its value has no meaning; only its gradient does.

    Gradient flow: ``eta`` is detached here. ``q_at_policy_mean`` must be :math:`Q_w(s, \mu_\theta(s))` evaluated
    with the critic's parameters frozen (e.g. ``requires_grad_(False)`` or ``torch.func.functional_call`` with
    detached parameters) and :math:`\mu_\theta(s)` **not** detached: the gradient flows only through the action
    input of the critic into the policy. This function cannot check that (it sees only the result).

    :param q_at_policy_mean: :math:`Q_w(s, \mu_\theta(s))`, any shape ``[...]`` (e.g. ``[T, N]``; squeeze a
        critic's trailing output axis of size 1)
    :param eta: a number or a tensor of the same shape (:func:`qprop_eta`, or the ``eta`` returned by
        :func:`qprop_normalize`)
    :param mask: bool tensor of that shape: average over the ``True`` samples only (padding); ``None``: all
    :return: a scalar tensor differentiable in :math:`\theta`

    Reference: Gu et al. (2017), arXiv:1611.02247, Eq. 8-9 (second term) and Algorithm 1, step 13; official code
    ``sandbox/rocky/tf/algos/npo.py::init_opt``.

    >>> theta = torch.tensor([0.5], requires_grad=True)
    >>> states = torch.tensor([1.0, 2.0])
    >>> q_at_mean = -(states * theta - 1.0) ** 2  # critic Q_w(s, a) = -(a - 1)^2, mean mu = theta * s
    >>> surrogate = qprop_correction_surrogate(q_at_mean, 1.0)
    >>> torch.autograd.grad(surrogate, theta)  # mean of -2 (mu - 1) * s = (1 + 0) / 2
    (tensor([0.5000]),)
    """
    q_at_policy_mean = check_float_tensor("q_at_policy_mean", q_at_policy_mean)
    eta_tensor = _check_eta(eta, q_at_policy_mean, "q_at_policy_mean")
    mask = check_mask("mask", mask, q_at_policy_mean.shape)
    return _masked_mean(eta_tensor * q_at_policy_mean, mask)


def qprop_normalize(
    learning_signal: torch.Tensor,
    eta: torch.Tensor | float,
    mode: str = "consistent",
    *,
    mask: torch.Tensor | None = None,
    signal_std: float | torch.Tensor | None = None,
    eps: float = 1e-8,
) -> QPropNormalized:
    r"""Centre and scale the Q-Prop learning signal, and scale :math:`\eta` consistently (or as published).

    Normalizing the learning signal :math:`\ell = \hat A - \eta \bar A` divides the score term by :math:`\sigma`;
    the analytic term must be divided too, or the estimator changes:

    .. math::

        \tilde\ell_i = \frac{\ell_i - \bar\ell}{\sigma}, \qquad
        \mathbb{E}\Big[g \tilde\ell + \tilde\eta\, \nabla_a Q_w \nabla_\theta \mu\Big] =
        \begin{cases}
            \frac{1}{\sigma}\, \nabla_\theta J
                & \texttt{consistent}: \tilde\eta = \eta / \sigma \\
            \frac{1}{\sigma}\, \nabla_\theta J
                + \big(1 - \frac{1}{\sigma}\big)\, \mathbb{E}[\eta\, \nabla_a Q_w \nabla_\theta \mu]
                & \texttt{as\_published}: \tilde\eta = \eta
        \end{cases}

    for a fixed :math:`\sigma` and state-independent :math:`\eta` (the batch-mean centring multiplies the score
    part by :math:`1 - 1/N`). ``as_published`` is the official Q-Prop code, whose centred and scaled
    signal meets an unscaled analytic term: with advantages of scale :math:`\sigma \gg 1` (MuJoCo) the update is
    mostly the DDPG-style critic gradient. ``consistent`` is the fix of Tucker et al. (``etas /= adv_std``);
    ``"none"`` returns both unchanged.

    :math:`\bar\ell` is the (masked) batch mean and :math:`\sigma = s_\ell + \epsilon` the Bessel-corrected
    standard deviation plus ``eps``, exactly as :func:`~pgvar.estimators.normalize_advantages` ``(mode="batch")``
    computes it (call this function per minibatch to normalize per minibatch). A batch of one element is left
    unchanged (:math:`\sigma = 1`). Pass ``signal_std`` to divide by a fixed :math:`\sigma` instead (from an
    independent batch, or a running estimate): then the identity above holds exactly in expectation.

    Gradient flow: both outputs are detached.

    :param learning_signal: :math:`\ell` from :func:`qprop_learning_signal`, any shape (e.g. ``[T, N]``)
    :param eta: a number or a tensor of ``learning_signal``'s shape
    :param mode: ``"consistent"``, ``"as_published"`` or ``"none"``
    :param mask: bool tensor of ``learning_signal``'s shape: statistics over ``True`` entries only; the others
        are returned unchanged (padding)
    :param signal_std: a fixed :math:`\sigma > 0` to divide by (``eps`` is not added); ``None``: the batch std
    :param eps: added to the batch standard deviation
    :return: :class:`QPropNormalized` ``(learning_signal, eta)``; ``eta`` is a tensor (a scalar tensor if a
        number was given)

    Reference: Gu et al. (2017), arXiv:1611.02247, Algorithm 1, step 12 ("compute and center the learning
    signals"; the code also divides by the std, ``center_adv``); Tucker, Bhupatiraju, Gu, Turner, Ghahramani,
    Levine (2018), "The Mirage of Action-Dependent Baselines in Reinforcement Learning", ICML,
    arXiv:1802.10031, Sec. 5 (and their ``qprop_unbias`` flag).

    >>> signal, eta = torch.tensor([1.0, 3.0, 5.0]), torch.tensor(1.0)
    >>> qprop_normalize(signal, eta, "as_published")  # std 2: the analytic term keeps eta = 1
    QPropNormalized(learning_signal=tensor([-1.,  0.,  1.]), eta=tensor(1.))
    >>> qprop_normalize(signal, eta, "consistent").eta  # ... or is divided by the same std
    tensor(0.5000)
    """
    check_choice("mode", mode, QPROP_NORMALIZATION_MODES)
    learning_signal = check_float_tensor("learning_signal", learning_signal)
    eta_tensor = _check_eta(eta, learning_signal, "learning_signal")
    mask = check_mask("mask", mask, learning_signal.shape)
    eps = check_nonnegative("eps", eps)
    signal = learning_signal.detach().to(working_dtype(learning_signal.dtype))  # 16-bit floats: in float32
    if signal_std is not None:
        if isinstance(signal_std, torch.Tensor):
            if signal_std.numel() != 1:
                raise ValueError(
                    f"signal_std must be a number or a one-element tensor, got shape {tuple(signal_std.shape)}"
                )
            signal_std = float(signal_std)
        check_positive("signal_std", signal_std)
    if mode == "none":
        return QPropNormalized(learning_signal.detach().clone(), eta_tensor.clone())
    selected = signal if mask is None else signal[mask]
    if (
        selected.numel() <= 1 and signal_std is None
    ):  # (A - mean) / std is 0 / 0; normalize_advantages skips it too
        return QPropNormalized(learning_signal.detach().clone(), eta_tensor.clone())
    scale = torch.as_tensor(
        signal_std if signal_std is not None else selected.std() + eps,
        dtype=signal.dtype,
        device=signal.device,
    )
    normalized = (signal - selected.mean()) / scale
    if mask is not None:
        normalized = torch.where(mask, normalized, signal)
    dtype = learning_signal.dtype
    eta_out = (eta_tensor.to(scale.dtype) / scale).to(dtype) if mode == "consistent" else eta_tensor.clone()
    return QPropNormalized(normalized.to(dtype), eta_out)


# ------------------------------------------------------------------------------------------------ discrete
def all_action_control_variate(
    q_values: torch.Tensor,
    probs_or_logits: torch.Tensor,
    actions: torch.Tensor,
    adv_hat: torch.Tensor,
    *,
    from_logits: bool = False,
    mask: torch.Tensor | None = None,
) -> AllActionControlVariate:
    r"""The exact control variate of a discrete policy: the critic's advantage, with its expectation summed over actions.

    With finitely many actions the expectation of :math:`g\, Q_w(s, a)` needs no Taylor expansion: it is the sum
    :math:`\sum_a \nabla_\theta \pi_\theta(a|s) Q_w(s, a)`. So, for **any** critic :math:`Q_w`,

    .. math::

        \nabla_\theta J = \mathbb{E}_s\Big[\sum_a \nabla_\theta \pi_\theta(a|s)\, Q_w(s, a)\Big]
            + \mathbb{E}\Big[g\, \Big(\hat A - \big(Q_w(s, a) - \textstyle\sum_{a'} \pi_\theta(a'|s) Q_w(s, a')\big)\Big)\Big],

    and with :math:`Q_w = Q^\pi` the residual :math:`\hat A - (Q^\pi(s, a) - V^\pi(s))` has conditional mean 0
    given :math:`(s, a)`: the action's contribution to the variance vanishes (it is exactly 0 when
    :math:`\hat A = Q^\pi(s, a) - V^\pi(s)`). The estimator is the gradient of
    ``(log_probs * learning_signal).mean() + surrogate``.

    Gradient flow: ``learning_signal`` is detached; ``surrogate`` is differentiable in ``probs_or_logits`` (the
    policy) only: ``q_values`` is detached (the critic is frozen).

    :param q_values: :math:`Q_w(s, \cdot)`, ``[..., A]`` (e.g. ``[T, N, A]``)
    :param probs_or_logits: :math:`\pi_\theta(\cdot|s)` (``from_logits=False``: probabilities summing to 1) or
        its logits (``from_logits=True``), ``[..., A]``, differentiable in :math:`\theta`
    :param actions: the sampled actions, integer tensor ``[...]`` (``Discrete`` actions only)
    :param adv_hat: :math:`\hat A`, ``[...]``
    :param from_logits: whether ``probs_or_logits`` holds logits (softmax is applied)
    :param mask: bool ``[...]``: the surrogate averages over ``True`` samples only (padding); ``None``: all
    :return: :class:`AllActionControlVariate` ``(learning_signal [...], surrogate scalar)``

    Reference: Sutton, McAllester, Singh, Mansour (2000), "Policy Gradient Methods for Reinforcement Learning with
    Function Approximation", NIPS, Theorem 1 (the all-actions form); Asadi et al. (2017), "Mean Actor Critic",
    arXiv:1709.00503; Ciosek and Whiteson (2018), "Expected Policy Gradients", arXiv:1706.05374; the discrete
    counterpart of Gu et al. (2017), arXiv:1611.02247, Eq. 6.

    >>> q = torch.tensor([[1.0, 3.0]])
    >>> logits = torch.zeros(1, 2, requires_grad=True)  # pi = (1/2, 1/2): E_pi[Q] = 2
    >>> out = all_action_control_variate(q, logits, torch.tensor([1]), torch.tensor([1.0]), from_logits=True)
    >>> out.learning_signal  # 1 - (3 - 2)
    tensor([0.])
    >>> torch.autograd.grad(out.surrogate, logits)  # pi (Q - E_pi Q)
    (tensor([[-0.5000,  0.5000]]),)
    """
    q_values = check_float_tensor("q_values", q_values, "[..., A]")
    actions = as_tensor("actions", actions, " of Discrete action indices [...]")
    if actions.is_floating_point():
        raise ValueError(
            f"actions must be an integer tensor of Discrete action indices [...], got dtype {actions.dtype}; "
            "for continuous (Box) actions use qprop_control_variate"
        )
    if actions.dtype == torch.bool:
        raise ValueError(f"actions must be an integer tensor of Discrete action indices [...], got {actions.dtype}")
    if q_values.dim() < 1 or q_values.shape[:-1] != actions.shape:
        raise ValueError(
            f"q_values must have shape actions.shape + (A,) = {tuple(actions.shape)} + (A,), got "
            f"{tuple(q_values.shape)}"
        )
    n_actions = q_values.shape[-1]
    probs_or_logits = check_float_tensor("probs_or_logits", probs_or_logits, "[..., A]")
    check_same_shape("probs_or_logits", probs_or_logits, "q_values", q_values)
    adv_hat = check_float_tensor("adv_hat", adv_hat)
    check_same_shape("adv_hat", adv_hat, "actions", actions)
    mask = check_mask("mask", mask, actions.shape)
    if is_concrete(actions) and actions.numel() > 0 and bool(((actions < 0) | (actions >= n_actions)).any()):
        raise ValueError(
            f"actions must be indices in [0, {n_actions}) (A = q_values.shape[-1]), got values in "
            f"[{int(actions.min())}, {int(actions.max())}]"
        )
    if from_logits:
        probs = torch.softmax(probs_or_logits, dim=-1)
    else:
        probs = probs_or_logits
        if is_concrete(probs) and probs.numel() > 0:
            tol = 1e-9 if probs.dtype == torch.float64 else 1e-5
            total = probs.detach().sum(-1)
            if bool((probs < 0).any()) or not bool(((total - 1).abs() <= tol * n_actions).all()):
                raise ValueError(
                    "probs_or_logits must hold probabilities (>= 0, summing to 1 over the last axis) when "
                    f"from_logits=False, got sums in [{float(total.min()):.6g}, {float(total.max()):.6g}] and a "
                    f"minimum entry {float(probs.min()):.6g}; pass from_logits=True for logits"
                )
    critic = q_values.detach()
    expected_q = (probs.detach() * critic).sum(-1)
    taken_q = critic.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    learning_signal = adv_hat.detach() - (taken_q - expected_q)
    surrogate = _masked_mean((probs * critic).sum(-1), mask)
    return AllActionControlVariate(learning_signal, surrogate)
