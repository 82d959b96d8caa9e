"""The contract every exact-gradient problem follows.

A problem is a real ``gymnasium.Env`` (so SB3 can train on it) that also knows, in closed form or by exact
linear algebra, the gradient of its expected discounted return

.. math::  J(\\theta) = \\mathbb{E}_{\\pi_\\theta}\\Big[\\sum_{t \\ge 0} \\gamma^t r_t\\Big]

with respect to the parameters ``theta`` of a fixed policy family. It also samples whole episodes in a
vectorized way (torch, no Python loop over episodes), returning them time-major ``[T, N]`` like SB3's rollout
buffer, and evaluates ``log pi(a|s)`` as a differentiable function of the parameters. The comparison engine
(:mod:`pgvar.compare`) and the unbiasedness tests use only this contract.

Parameters are a ``dict[str, torch.Tensor]`` (float64 by default), so that :func:`torch.func.functional_call`
style per-sample gradients apply unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import gymnasium as gym
import torch

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class EpisodeBatch:
    """``N`` independent episodes, time-major and padded to the longest one.

    :param observations: ``[T, N, *obs_shape]`` (long for discrete states, float otherwise)
    :param actions: ``[T, N, *action_shape]`` (long for discrete actions)
    :param rewards: ``[T, N]`` raw rewards; 0 on padding
    :param next_observations: ``[T, N, *obs_shape]``: the true next state, also at the last step of an episode
    :param terminated: ``[T, N]`` bool, true at the step whose next state is terminal (no bootstrap)
    :param truncated: ``[T, N]`` bool, true at the step where the episode was cut (bootstrap from
        ``next_observations``)
    :param mask: ``[T, N]`` bool, true on real steps, false on padding after the episode ended
    :param timesteps: ``[T, N]`` long, the time index ``t`` within the episode (the discount ``gamma ** t``
        of the policy-gradient theorem uses it)
    """

    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_observations: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    mask: torch.Tensor
    timesteps: torch.Tensor

    @property
    def n_episodes(self) -> int:
        return int(self.rewards.shape[1])

    @property
    def horizon(self) -> int:
        return int(self.rewards.shape[0])


@runtime_checkable
class ExactGradientProblem(Protocol):
    """What :mod:`pgvar.compare` and the tests need from a problem (see the module docstring).

    Plain attributes satisfy the read-only properties below.
    """

    gamma: float

    @property
    def observation_space(self) -> gym.spaces.Space:
        """The gymnasium observation space (``Discrete``: states are indices; the fitted values are tabular)."""
        ...

    @property
    def action_space(self) -> gym.spaces.Space:
        """The gymnasium action space (``Discrete`` or ``Box``)."""
        ...

    @property
    def horizon(self) -> int | None:
        """The fixed number of steps of every episode when the values depend on the time step (a finite-horizon
        problem), ``None`` when they do not."""
        ...

    def initial_parameters(self, seed: int | None = None) -> Params:
        """Policy parameters to evaluate at (seeded; float64)."""
        ...

    def exact_return(self, params: Params) -> torch.Tensor:
        """``J(theta)`` exactly, as a scalar that autograd can differentiate."""
        ...

    def exact_policy_gradient(self, params: Params) -> Params:
        """``grad_theta J(theta)`` exactly, one tensor per parameter."""
        ...

    def exact_state_values(self, params: Params, observations: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``V^pi(s_t)`` exactly for each ``[T, N]`` entry (time-dependent problems use ``timesteps``)."""
        ...

    def sample_episodes(self, params: Params, n_episodes: int, generator: torch.Generator) -> EpisodeBatch:
        """``n_episodes`` independent episodes under ``pi_theta``, vectorized."""
        ...

    def log_prob(self, params: Params, observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``log pi_theta(a|s)`` for a batch of any leading shape, differentiable in ``params``."""
        ...


@runtime_checkable
class GaussianPolicyProblem(ExactGradientProblem, Protocol):
    """A problem whose policy is Gaussian with a differentiable mean action (continuous actions).

    Q-Prop's Taylor control variate expands the critic around the mean action, so the comparison engine's Q-Prop
    rows need ``mean_action`` on problems with continuous actions.
    """

    def mean_action(self, params: Params, observations: torch.Tensor) -> torch.Tensor:
        """``mu_theta(s)`` for a batch of observations of any leading shape, differentiable in ``params``."""
        ...


def check_parameters(params: Params, shapes: dict[str, tuple[int, ...]]) -> Params:
    """Return ``params`` or raise ``ValueError`` naming the missing, extra or misshapen entry.

    :param params: the policy parameters, one tensor per name
    :param shapes: the expected shape of each entry

    >>> check_parameters({"logits": torch.zeros(2, 3)}, {"logits": (2, 3)})["logits"].shape
    torch.Size([2, 3])
    >>> check_parameters({"logits": torch.zeros(3)}, {"logits": (2, 3)})
    Traceback (most recent call last):
    ...
    ValueError: params['logits'] must be a floating-point tensor of shape (2, 3), got shape (3,)
    """
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict with keys {sorted(shapes)}, got {type(params).__name__}")
    if set(params) != set(shapes):
        raise ValueError(f"params must have exactly the keys {sorted(shapes)}, got {sorted(params)}")
    for name, shape in shapes.items():
        value = params[name]
        is_tensor = isinstance(value, torch.Tensor)
        if not is_tensor or not value.is_floating_point() or tuple(value.shape) != tuple(shape):
            got = f"shape {tuple(value.shape)}" if is_tensor else type(value).__name__
            if is_tensor and not value.is_floating_point():
                got = f"dtype {value.dtype}"
            raise ValueError(
                f"params[{name!r}] must be a floating-point tensor of shape {tuple(shape)}, got {got}"
            )
    return params
