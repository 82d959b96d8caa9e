"""Returns and advantages: discounted returns, GAE(lambda) and TD(lambda) returns.

All functions take time-major ``[T, N]`` tensors (``T`` steps of ``N`` parallel environments), like SB3's
``RolloutBuffer``, and keep the two ways an episode can end apart:

* ``terminated[t]``: the state after step ``t`` is terminal. Nothing is bootstrapped: its value is 0.
* ``truncated[t]``: the episode was cut after step ``t`` (a time limit) although the state is not terminal. The
  return is bootstrapped from ``next_values[t] = V(s_{t+1})``, the value of the *final observation*, and the
  lambda-trace is cut because the next row belongs to a new episode.

``next_values[t]`` is always the value of the true successor of step ``t`` (at a truncation, the final
observation that a VecEnv keeps in ``info["terminal_observation"]``), so no convention about "shifted" values is
needed. At ``t = T - 1`` an episode that goes on past the rollout is bootstrapped from ``next_values[T - 1]``.

Gradient flow: the outputs are differentiable in every input; callers that use them as targets detach them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from pgvar._validation import (
    as_tensor,
    check_finite,
    check_shape,
    check_time_major,
    check_unit_interval,
    check_zero_one_flags,
    working_dtype,
)

__all__ = ["discounted_returns", "gae_advantages", "td_lambda_returns"]


class _Inputs(NamedTuple):
    """Validated inputs, every tensor in the working dtype (float32 for 16-bit floats); ``dtype`` is the input's."""

    rewards: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    gamma: float
    tensors: dict[str, torch.Tensor]  # the value tensors that were given (not None)
    dtype: torch.dtype


def _validated_inputs(
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor | None,
    gamma: float,
    **value_tensors: torch.Tensor | None,
) -> _Inputs:
    rewards = check_time_major("rewards", rewards)
    check_finite("rewards", rewards)
    gamma = check_unit_interval("gamma", gamma)
    compute_dtype = working_dtype(rewards.dtype)
    values: dict[str, torch.Tensor] = {}
    for name, tensor in value_tensors.items():
        if tensor is not None:
            tensor = check_shape(name, tensor, rewards.shape)
            if tensor.dtype != rewards.dtype:
                raise ValueError(f"{name} must have the dtype of rewards ({rewards.dtype}), got {tensor.dtype}")
            check_finite(name, tensor)
            values[name] = tensor.to(compute_dtype)
    dtype = rewards.dtype
    rewards = rewards.to(compute_dtype)
    term = check_zero_one_flags("terminated", terminated, rewards)
    trunc = check_zero_one_flags("truncated", truncated, rewards)
    return _Inputs(rewards, term, trunc, gamma, values, dtype)


def _reverse_linear_recursion(base: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Solve ``y[t] = base[t] + coef[t] * y[t + 1]`` backwards from ``y[T] = 0``, vectorized over envs.

    The recursion is sequential in time. Each step is a multiply then an add (never a fused multiply-add), the
    association of SB3's numpy loop, so SB3's advantages are reproduced bit for bit. When no gradient is needed
    and the tensors are float32/float64 on the CPU, the loop runs on zero-copy numpy views of the same memory:
    one numpy call costs about a third of a torch call, which is what makes the loop faster than SB3's own.

    Where ``coef[t] == 0`` the trace is cut and ``y[t] = base[t]`` exactly, even if ``y[t + 1]`` overflowed to
    inf in a later episode (``0 * inf`` would be NaN).
    """
    cut = coef == 0
    if (
        not (base.requires_grad or coef.requires_grad)
        and base.device.type == "cpu"
        and base.dtype in (torch.float32, torch.float64)
    ):
        out = torch.empty_like(base)
        b, c, o = base.detach().numpy(), coef.detach().numpy(), out.numpy()
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is legitimate; it is handled below
            o[-1] = b[-1]
            for t in range(base.shape[0] - 2, -1, -1):
                np.multiply(c[t], o[t + 1], out=o[t])
                o[t] += b[t]
            if not np.isfinite(o).all():
                # Rare (an overflow): redo with the cuts as a mask, so that 0 * inf does not leak into earlier
                # episodes. The fast loop above has no mask because a masked add costs about 30% more.
                carry, product = ~cut.numpy(), np.empty_like(o[-1])
                np.copyto(o, b)
                for t in range(base.shape[0] - 2, -1, -1):
                    np.multiply(c[t], o[t + 1], out=product)
                    np.add(o[t], product, out=o[t], where=carry[t])
        return out
    base_rows, coef_rows, cut_rows = base.unbind(0), coef.unbind(0), cut.unbind(0)
    rows = [base_rows[-1]]
    for t in range(base.shape[0] - 2, -1, -1):
        rows.append(base_rows[t] + coef_rows[t] * torch.where(cut_rows[t], 0.0, rows[-1]))
    return torch.stack(rows[::-1])


def discounted_returns(
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor | None = None,
    next_values: torch.Tensor | None = None,
    *,
    gamma: float,
) -> torch.Tensor:
    r"""Discounted return-to-go of every step, bootstrapped at truncations and at the end of the rollout.

    The Monte Carlo signal of REINFORCE (Williams, 1992). Unbiased for :math:`Q^\pi(s_t, a_t)` when episodes are
    complete (or bootstrapped from the true value); its variance is what baselines reduce.

    .. math::

        G_t = r_t + \gamma (1 - \mathrm{term}_t)
              \begin{cases} V(s_{t+1}) & \text{if } \mathrm{trunc}_t \text{ or } t = T - 1 \\
                            G_{t+1} & \text{otherwise} \end{cases}

    :param rewards: ``[T, N]`` rewards, floating point (float16 and bfloat16 are computed in float32)
    :param terminated: ``[T, N]`` bool or 0/1: the successor of step ``t`` is terminal
    :param truncated: ``[T, N]`` bool or 0/1: the episode was cut after step ``t``; ``None`` means never
    :param next_values: ``[T, N]`` values of the true successor states, used only where the return is
        bootstrapped; ``None`` means 0 (plain Monte Carlo over complete episodes)
    :param gamma: discount factor in ``[0, 1]``
    :return: ``[T, N]`` returns :math:`G_t`

    Reference: Sutton & Barto, *Reinforcement Learning: An Introduction* (2nd ed., 2018), Eq. 3.8.

    >>> r = torch.tensor([[1.0], [1.0], [1.0]])
    >>> done = torch.tensor([[False], [False], [True]])
    >>> discounted_returns(r, done, gamma=0.5).squeeze(1)
    tensor([1.7500, 1.5000, 1.0000])
    """
    rewards, term, trunc, gamma, tensors, dtype = _validated_inputs(
        rewards, terminated, truncated, gamma, next_values=next_values
    )
    next_values = tensors.get("next_values")
    done = torch.clamp(term + trunc, max=1.0)
    # Where the return is bootstrapped instead of continued: truncations and the rollout's last row.
    bootstrap = trunc.clone()
    bootstrap[-1] = 1.0 - term[-1]
    tail = torch.zeros_like(rewards) if next_values is None else next_values * bootstrap
    base = rewards + gamma * (1.0 - term) * tail
    coef = gamma * (1.0 - done)
    return _reverse_linear_recursion(base, coef).to(dtype)


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor | None = None,
    *,
    gamma: float,
    gae_lambda: float,
) -> torch.Tensor:
    r"""Generalized advantage estimates GAE(:math:`\gamma, \lambda`).

    A state baseline :math:`V` plus an exponentially weighted sum of TD errors: ``gae_lambda`` trades bias
    (small lambda, trusts ``V``) against variance (lambda = 1 gives :math:`G_t - V(s_t)`, unbiased for any ``V``).

    .. math::

        \delta_t = r_t + \gamma (1 - \mathrm{term}_t) V(s_{t+1}) - V(s_t), \qquad
        A_t = \delta_t + \gamma \lambda (1 - \mathrm{done}_t) A_{t+1}, \quad A_T = 0,

    with :math:`\mathrm{done} = \mathrm{term} \lor \mathrm{trunc}`: a truncation cuts the trace but keeps the
    bootstrap from the final observation's value. With SB3's storage convention (the truncation bootstrap folded
    into the reward, ``next_values[t] = values[t + 1]`` and ``terminated[t] = episode_starts[t + 1]``) this
    returns SB3's ``RolloutBuffer.compute_returns_and_advantage`` advantages bit for bit.

    :param rewards: ``[T, N]`` rewards
    :param values: ``[T, N]`` :math:`V(s_t)`
    :param next_values: ``[T, N]`` :math:`V(s_{t+1})` of the true successor (the final observation at a
        truncation; anything at a termination, where it is multiplied by 0)
    :param terminated: ``[T, N]`` bool or 0/1
    :param truncated: ``[T, N]`` bool or 0/1; ``None`` means never
    :param gamma: discount factor in ``[0, 1]``
    :param gae_lambda: trace decay in ``[0, 1]``
    :return: ``[T, N]`` advantages :math:`A_t`

    Note: the paper writes :math:`\delta_t = r_t + \gamma V(s_{t+1}) - V(s_t)` for infinite horizons; the
    ``terminated``/``done`` factors are how episode ends enter (as in SB3 and TorchRL).

    Reference: Schulman, Moritz, Levine, Jordan, Abbeel (2016), "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation", arXiv:1506.02438, Eq. 16.

    >>> r = torch.ones(3, 1); v = torch.zeros(3, 1); done = torch.tensor([[0.0], [0.0], [1.0]])
    >>> gae_advantages(r, v, v, done, gamma=1.0, gae_lambda=0.5).squeeze(1)
    tensor([1.7500, 1.5000, 1.0000])
    """
    rewards, term, trunc, gamma, tensors, dtype = _validated_inputs(
        rewards, terminated, truncated, gamma, values=values, next_values=next_values
    )
    values, next_values = tensors["values"], tensors["next_values"]
    gae_lambda = check_unit_interval("gae_lambda", gae_lambda)
    done = torch.clamp(term + trunc, max=1.0)
    # Same association as SB3's numpy loop, so that its numbers are reproduced exactly.
    deltas = rewards + gamma * next_values * (1.0 - term) - values
    coef = gamma * gae_lambda * (1.0 - done)
    return _reverse_linear_recursion(deltas, coef).to(dtype)


def td_lambda_returns(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor | None = None,
    *,
    gamma: float,
    gae_lambda: float,
) -> torch.Tensor:
    r"""TD(:math:`\lambda`) returns, the value-function targets that go with GAE.

    .. math::

        R^\lambda_t = A^{\mathrm{GAE}(\gamma,\lambda)}_t + V(s_t)
                    = r_t + \gamma (1 - \mathrm{term}_t)\big[(1 - \lambda') V(s_{t+1}) + \lambda' R^\lambda_{t+1}\big],
        \quad \lambda' = \lambda (1 - \mathrm{trunc}_t)

    lambda = 1 gives the bootstrapped discounted return (:func:`discounted_returns`), lambda = 0 the one-step
    target :math:`r_t + \gamma V(s_{t+1})`. Arguments as in :func:`gae_advantages`.

    Reference: Sutton & Barto (2018), Eq. 12.3; Schulman et al. (2016), arXiv:1506.02438, Sec. 5.

    >>> r = torch.ones(2, 1); v = torch.full((2, 1), 0.5); done = torch.tensor([[0.0], [1.0]])
    >>> td_lambda_returns(r, v, v, done, gamma=1.0, gae_lambda=0.0).squeeze(1)
    tensor([1.5000, 1.0000])
    """
    return gae_advantages(
        rewards, values, next_values, terminated, truncated, gamma=gamma, gae_lambda=gae_lambda
    ) + as_tensor("values", values)
