r"""The horizon-aware value function of Tucker et al. (2018, Sec. 6): a state value that knows the time left.

MuJoCo tasks end at a time limit ``T`` (1000 steps), so the value of a state depends on how many rewards are
left. A state-only :math:`V(s)` cannot represent that and its error shows up as variance of the advantage.
Tucker et al. parameterize

.. math::  V(s, t) = V_0(s) + \frac{1 - \gamma^{T - t}}{1 - \gamma}\, \bar r(s)

with two heads on one network, :math:`V_0(s)` and a per-state average reward :math:`\bar r(s)`, and ``t`` the
step index within the episode (0 at reset). With a constant reward ``c`` it is exact (:math:`V_0 = 0,
\bar r = c`); in general it is a better-shaped function class, not the true value. It was the one method of the
paper that improved learning (TRPO, 5 seeds, 5M steps: HalfCheetah 2030 -> 2864, Walker2d 2761 -> 3226,
Humanoid 738 -> 830; formulas.md section 7).

Functions: :func:`time_to_go_factor` (the factor), :func:`horizon_aware_values` (the value from the two heads),
:func:`horizon_episode_flags` (the episode-end convention), :func:`horizon_aware_value_targets` (regression
targets) and :func:`horizon_aware_value_loss` (the regression loss that trains both heads).

**How the Mirage code fits it** (``brain-research/mirage-rl-trpo``, ``main.py`` and ``models.py``, flag
``--use-disc-avg-v``): ``models.Value`` is a 64-64 tanh torso with two linear heads, ``value_head`` (:math:`V_0`)
and ``disc_avg_value_head`` (:math:`\bar r`); ``compute_values`` returns
``state_value + discounted_time_left * disc_avg_state_value`` with
``discounted_time_left = (1 - gamma ** (max_time - t)) / (1 - gamma)``, ``t`` the in-episode step index and
``max_time`` = 1000 (so the factor is 1 at the last step). Both heads are trained jointly, through the sum,
by regressing it on the discounted Monte Carlo return (``(values - targets) ** 2`` mean, plus an L2 penalty 1e-3 on
the weights, 25 L-BFGS iterations per batch, or Adam), and the same values enter GAE. Episodes end at the time
limit with ``mask = 0`` (gym's ``TimeLimit`` sets ``done``), so the return is never bootstrapped there. An
earlier revision of ``main.py`` had only the :math:`\bar r` head (``discounted_time_left * value_net(states)``);
``models.TimeValue`` also feeds the factor as an input.

Where pgvar differs: (1) rollouts can be cut mid-episode (SB3's ``n_steps``); there the target is bootstrapped
from the horizon-aware value of the next state :math:`V(s_{t+1}, t+1)` (the Mirage batches hold whole episodes
only). (2) Only the end AT the horizon counts as a termination (:func:`horizon_episode_flags`); another
truncation still bootstraps, as in :mod:`pgvar.estimators.returns`. (3) The loss is the plain mean squared
error (SB3's ``F.mse_loss``); add weight decay in the optimizer. (4) ``gamma = 1`` is allowed (factor ``T - t``).
"""

from __future__ import annotations

import math

import torch

from pgvar._validation import (
    as_tensor,
    check_float_tensor,
    check_mask,
    check_positive,
    check_shape,
    check_unit_interval,
    check_zero_one_flags,
    is_concrete,
    working_dtype,
)
from pgvar.estimators.returns import discounted_returns, td_lambda_returns

__all__ = [
    "horizon_aware_value_loss",
    "horizon_aware_value_targets",
    "horizon_aware_values",
    "horizon_episode_flags",
    "time_to_go_factor",
]


def time_to_go_factor(
    timesteps: torch.Tensor, *, horizon: int, gamma: float, dtype: torch.dtype | None = None
) -> torch.Tensor:
    r"""The discounted number of rewards left, :math:`\sum_{k=0}^{T-t-1} \gamma^k`, at step ``t`` of a horizon ``T``.

    .. math::  f(t) = \frac{1 - \gamma^{T - t}}{1 - \gamma} \quad (\gamma < 1), \qquad f(t) = T - t \quad (\gamma = 1)

    Computed as ``-expm1((T - t) * log(gamma)) / (1 - gamma)`` so that ``gamma`` near 1 loses no precision
    (and it tends continuously to ``T - t``); ``gamma = 0`` gives 1 for ``t < T`` and 0 at ``t = T``.

    :param timesteps: step index ``t`` within the episode (0 at reset), integer or float tensor of any shape,
        each ``0 <= t <= T``
    :param horizon: the time limit ``T`` (integer > 0)
    :param gamma: discount factor in ``[0, 1]``
    :param dtype: floating dtype of the result (``None``: ``timesteps``' dtype if floating, else the default)
    :return: tensor of ``timesteps``' shape

    Reference: Tucker et al. (2018), "The Mirage of Action-Dependent Baselines in Reinforcement Learning",
    arXiv:1802.10031, Sec. 6.

    >>> time_to_go_factor(torch.tensor([0, 1, 2, 3]), horizon=3, gamma=0.5)
    tensor([1.7500, 1.5000, 1.0000, 0.0000])
    >>> time_to_go_factor(torch.tensor([0, 2]), horizon=3, gamma=1.0)
    tensor([3., 1.])
    """
    horizon = int(check_positive("horizon", horizon, integer=True))
    gamma = check_unit_interval("gamma", gamma)
    timesteps = _check_timesteps(timesteps)
    if dtype is None:
        dtype = timesteps.dtype if timesteps.is_floating_point() else torch.get_default_dtype()
    if timesteps.numel() and is_concrete(timesteps) and bool(((timesteps < 0) | (timesteps > horizon)).any()):
        raise ValueError(
            f"timesteps must lie in [0, horizon = {horizon}], got values in "
            f"[{timesteps.min().item()}, {timesteps.max().item()}]"
        )
    steps_left = horizon - timesteps.to(torch.float64)
    if gamma == 1.0:
        factor = steps_left
    elif gamma == 0.0:
        factor = (steps_left > 0).to(torch.float64)
    else:
        factor = -torch.expm1(steps_left * math.log(gamma)) / (1.0 - gamma)
    return factor.to(dtype)


def horizon_aware_values(
    v0: torch.Tensor, r_bar: torch.Tensor, timesteps: torch.Tensor, *, horizon: int, gamma: float
) -> torch.Tensor:
    r"""The horizon-aware value :math:`V(s, t) = V_0(s) + f(t)\, \bar r(s)` from its two heads.

    .. math::  V(s_t, t) = V_0(s_t) + \frac{1 - \gamma^{T - t}}{1 - \gamma}\, \bar r(s_t)

    with :math:`f` from :func:`time_to_go_factor`. Use it wherever a state value enters (GAE's ``values``, and
    ``next_values`` at ``t + 1`` where a return is bootstrapped). At ``t = T`` the value is :math:`V_0(s)`, which
    the true finite-horizon value (0) does not need: :func:`horizon_episode_flags` makes the end at the horizon
    a termination, so that value is never used.

    Gradient flow: differentiable in ``v0`` and ``r_bar``.

    :param v0: ``[...]`` the :math:`V_0(s)` head
    :param r_bar: ``[...]`` the average-reward head :math:`\bar r(s)`, same shape
    :param timesteps: ``[...]`` step index ``t`` within the episode, same shape, ``0 <= t <= T``
    :param horizon: the time limit ``T`` (integer > 0)
    :param gamma: discount factor in ``[0, 1]``
    :return: ``[...]`` values, ``v0``'s dtype

    Reference: Tucker et al. (2018), arXiv:1802.10031, Sec. 6.

    >>> v0, r_bar = torch.zeros(3), torch.full((3,), 2.0)
    >>> horizon_aware_values(v0, r_bar, torch.tensor([0, 1, 2]), horizon=3, gamma=0.5)  # 2 * (1.75, 1.5, 1)
    tensor([3.5000, 3.0000, 2.0000])
    """
    v0, r_bar, timesteps = _check_heads(v0, r_bar, timesteps)
    dtype = torch.promote_types(v0.dtype, r_bar.dtype)
    return _values(v0, r_bar, timesteps, horizon, gamma, working_dtype(dtype)).to(dtype)


def horizon_episode_flags(
    terminated: torch.Tensor,
    truncated: torch.Tensor | None,
    timesteps: torch.Tensor,
    *,
    horizon: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Episode-end flags for a horizon-aware value: the end at the horizon is a termination, not a truncation.

    A value that knows the time left treats the time limit as part of the problem: after step ``t = T - 1`` no
    reward is left, the true value is 0, and nothing is bootstrapped (the Mirage code's ``mask = 0`` at the
    time limit). So ``terminated`` is set where ``t + 1 = T`` and that step's truncation flag is cleared; every
    other truncation (an earlier cut) keeps bootstrapping, as in :mod:`pgvar.estimators.returns`.

    :param terminated: ``[T, N]`` bool or 0/1
    :param truncated: ``[T, N]`` bool or 0/1, or ``None`` (never)
    :param timesteps: ``[T, N]`` step index ``t`` within the episode; ``t + 1 <= horizon`` everywhere
    :param horizon: the time limit (integer > 0)
    :return: ``(terminated, truncated)`` as bool ``[T, N]`` tensors

    :raises ValueError: if a step has ``t + 1 > horizon``, or reaches the horizon without ending the episode
        (``t + 1 = horizon`` but neither flag set: the environment's time limit is not ``horizon``)

    >>> term, trunc = horizon_episode_flags(
    ...     torch.tensor([[False], [False]]), torch.tensor([[False], [True]]), torch.tensor([[0], [1]]), horizon=2
    ... )
    >>> term.squeeze(1).tolist(), trunc.squeeze(1).tolist()
    ([False, True], [False, False])
    """
    horizon = int(check_positive("horizon", horizon, integer=True))
    terminated = as_tensor("terminated", terminated, " of shape [T, N] (bool or 0/1 flags)")
    if terminated.dim() != 2:
        raise ValueError(
            f"terminated must be a [T, N] tensor of bool or 0/1 flags, got shape {tuple(terminated.shape)}"
        )
    like = torch.zeros(terminated.shape, dtype=torch.bool, device=terminated.device)
    term = check_zero_one_flags("terminated", terminated, like, like_name="terminated")
    trunc = check_zero_one_flags("truncated", truncated, like, like_name="terminated")
    timesteps = _check_timesteps(timesteps, term.shape, like="terminated")
    concrete = is_concrete(timesteps) and is_concrete(term) and is_concrete(trunc)
    if timesteps.numel() and concrete and bool((timesteps + 1 > horizon).any()):
        raise ValueError(
            f"timesteps must satisfy t + 1 <= horizon = {horizon} (the last step of an episode has t = horizon - 1), "
            f"got t = {timesteps.max().item()}"
        )
    at_horizon = timesteps + 1 == horizon
    unflagged = at_horizon & ~(term | trunc)
    if concrete and bool(unflagged.any()):
        index = tuple(unflagged.nonzero()[0].tolist())
        raise ValueError(
            f"the step at index {index} reaches the horizon (t + 1 = {horizon}) but neither terminated nor "
            "truncated ends the episode there: pass the environment's time limit as horizon"
        )
    return term | at_horizon, trunc & ~at_horizon


def horizon_aware_value_targets(
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor | None,
    timesteps: torch.Tensor,
    *,
    horizon: int,
    gamma: float,
    next_values: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    gae_lambda: float = 1.0,
) -> torch.Tensor:
    r"""Regression targets for the horizon-aware value: finite-horizon returns, ending at the horizon.

    With the flags of :func:`horizon_episode_flags` (the end at ``T`` terminates), ``gae_lambda = 1`` and no
    ``values`` give the discounted return of the Mirage code (:func:`~pgvar.estimators.discounted_returns`),

    .. math::  G_t = \sum_{k=0}^{T_{\mathrm{end}} - t - 1} \gamma^k r_{t+k}
               \; [+\, \gamma^{T_{\mathrm{end}} - t} V(s_{T_{\mathrm{end}}}, T_{\mathrm{end}})
               \text{ at a cut before the horizon}],

    and ``gae_lambda < 1`` (or given ``values``) the TD(lambda) targets
    :func:`~pgvar.estimators.td_lambda_returns` (GAE + V, SB3's value targets). ``values`` and ``next_values``
    are horizon-aware values (:func:`horizon_aware_values` at ``t`` and at ``t + 1``); ``next_values`` is used
    only where a return is bootstrapped (a truncation before the horizon, and the rollout's last row), never at
    the horizon. Regress :math:`V_0 + f \bar r` on these with :func:`horizon_aware_value_loss`.

    :param rewards: ``[T, N]`` rewards
    :param terminated: ``[T, N]`` bool or 0/1
    :param truncated: ``[T, N]`` bool or 0/1, or ``None``
    :param timesteps: ``[T, N]`` step index within the episode
    :param horizon: the time limit (integer > 0)
    :param gamma: discount factor in ``[0, 1]``
    :param next_values: ``[T, N]`` horizon-aware :math:`V(s_{t+1}, t + 1)`; ``None`` means 0 (complete episodes)
    :param values: ``[T, N]`` horizon-aware :math:`V(s_t, t)`; needed when ``gae_lambda < 1``
    :param gae_lambda: trace decay in ``[0, 1]``
    :return: ``[T, N]`` targets (as differentiable as the inputs; detach them before regressing)

    >>> r = torch.ones(3, 1); t = torch.arange(3).unsqueeze(1)
    >>> no = torch.zeros(3, 1, dtype=torch.bool); cut = torch.tensor([[False], [False], [True]])
    >>> horizon_aware_value_targets(r, no, cut, t, horizon=3, gamma=0.5).squeeze(1)  # = time_to_go_factor
    tensor([1.7500, 1.5000, 1.0000])
    """
    term, trunc = horizon_episode_flags(terminated, truncated, timesteps, horizon=horizon)
    gae_lambda = check_unit_interval("gae_lambda", gae_lambda)
    if values is None and gae_lambda == 1.0:
        return discounted_returns(rewards, term, trunc, next_values, gamma=gamma)
    if values is None or next_values is None:
        raise ValueError(
            f"values and next_values must both be given for TD(lambda) targets (gae_lambda = {gae_lambda}), "
            f"got values={'None' if values is None else 'a tensor'}, "
            f"next_values={'None' if next_values is None else 'a tensor'}"
        )
    return td_lambda_returns(rewards, values, next_values, term, trunc, gamma=gamma, gae_lambda=gae_lambda)


def horizon_aware_value_loss(
    v0: torch.Tensor,
    r_bar: torch.Tensor,
    targets: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    horizon: int,
    gamma: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Mean squared error of the horizon-aware value against its targets; trains both heads jointly.

    .. math::  L = \frac{1}{|\mathcal B|} \sum_{i \in \mathcal B}
               \Big(V_0(s_i) + f(t_i)\, \bar r(s_i) - \hat G_i\Big)^2

    As in the Mirage code, the two heads get no separate targets: the gradient reaches :math:`V_0` with weight
    1 and :math:`\bar r` with weight :math:`f(t)`, so :math:`\bar r` is identified by how the return changes
    with the time left.

    Gradient flow: differentiable in ``v0`` and ``r_bar``; ``targets`` is detached here.

    :param v0: ``[...]`` the :math:`V_0(s)` head
    :param r_bar: ``[...]`` the :math:`\bar r(s)` head
    :param targets: ``[...]`` regression targets, e.g. :func:`horizon_aware_value_targets`
    :param timesteps: ``[...]`` step index within the episode
    :param horizon: the time limit (integer > 0)
    :param gamma: discount factor in ``[0, 1]``
    :param mask: bool ``[...]`` selecting the samples to average (padding); ``None``: all
    :return: scalar loss

    >>> t = torch.tensor([0, 1]); v0 = torch.zeros(2, requires_grad=True); r_bar = torch.ones(2)
    >>> horizon_aware_value_loss(v0, r_bar, torch.tensor([2.0, 1.0]), t, horizon=2, gamma=1.0)
    tensor(0., grad_fn=<MeanBackward0>)
    """
    v0, r_bar, timesteps = _check_heads(v0, r_bar, timesteps)
    targets = check_shape("targets", check_float_tensor("targets", targets), v0.shape, like="v0")
    mask = check_mask("mask", mask, v0.shape)
    dtype = torch.promote_types(torch.promote_types(v0.dtype, r_bar.dtype), targets.dtype)
    compute = working_dtype(dtype)  # 16-bit floats in float32: a squared error over 65504 is inf in float16
    values = _values(v0, r_bar, timesteps, horizon, gamma, compute)
    errors = (values - targets.detach().to(compute)).square()
    loss = errors.mean() if mask is None else errors[mask].mean()
    return loss.to(dtype)


def _check_timesteps(timesteps: object, shape: torch.Size | None = None, like: str = "") -> torch.Tensor:
    """``timesteps`` as a tensor of step indices (integer or float, not bool), of ``shape`` (``like``'s) if given."""
    tensor = as_tensor("timesteps", timesteps, " of step indices (integer or float)")
    if shape is not None:
        check_shape("timesteps", tensor, shape, like=like)
    if tensor.dtype == torch.bool:
        raise ValueError("timesteps must hold step indices (integer or float), got dtype torch.bool")
    return tensor


def _check_heads(
    v0: object, r_bar: object, timesteps: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two heads (floating point, finite, one shape) and the step indices of that shape, as tensors."""
    v0 = check_float_tensor("v0", v0)
    r_bar = check_shape("r_bar", check_float_tensor("r_bar", r_bar), v0.shape, like="v0")
    return v0, r_bar, _check_timesteps(timesteps, v0.shape, like="v0")


def _values(
    v0: torch.Tensor,
    r_bar: torch.Tensor,
    timesteps: torch.Tensor,
    horizon: int,
    gamma: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    r""":math:`V_0 + f(t)\, \bar r` computed in ``dtype`` (arguments checked by :func:`_check_heads`)."""
    factor = time_to_go_factor(timesteps, horizon=horizon, gamma=gamma, dtype=dtype)
    return v0.to(dtype) + factor * r_bar.to(dtype)
