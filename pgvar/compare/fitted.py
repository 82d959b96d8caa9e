"""Linear value functions and critics fitted by ridge regression on Monte Carlo returns (the problem engine's
``gae_fitted_value`` and Q-Prop rows fit them on a batch of their own, independent of the batches they score)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pgvar.estimators import discounted_returns
from pgvar.problems import ExactGradientProblem
from pgvar.problems.base import EpisodeBatch

__all__ = ["FittedCritic", "FittedValue", "value_features"]


def value_features(
    observations: torch.Tensor, timesteps: torch.Tensor, n_states: int | None, horizon: int | None
) -> torch.Tensor:
    """Features for a least-squares value fit: one-hot states, or a quadratic in continuous observations,
    times a one-hot of the time step on finite-horizon problems (whose values depend on time).

    :param observations: ``[T, N]`` state indices (``n_states`` given) or ``[T, N, *obs_shape]`` observations
    :param timesteps: ``[T, N]`` time index within the episode
    :param n_states: number of discrete states, or ``None`` for continuous observations
    :param horizon: the problem's fixed horizon, or ``None`` when values do not depend on time
    :return: ``[T, N, F]`` float64
    """
    if n_states is not None:
        features = torch.nn.functional.one_hot(observations.long(), n_states).to(torch.float64)
    else:
        x = observations.to(torch.float64).reshape(*observations.shape[:2], -1)
        rows, cols = torch.triu_indices(x.shape[-1], x.shape[-1])
        features = torch.cat([torch.ones_like(x[..., :1]), x, x[..., rows] * x[..., cols]], dim=-1)
    if horizon is not None:
        time = torch.nn.functional.one_hot(timesteps.clamp(max=horizon - 1), horizon).to(torch.float64)
        features = (time.unsqueeze(-1) * features.unsqueeze(-2)).flatten(-2)
    return features


def _ridge(features: torch.Tensor, targets: torch.Tensor, ridge: float) -> torch.Tensor:
    gram = features.T @ features + ridge * len(features) * torch.eye(features.shape[1], dtype=features.dtype)
    return torch.linalg.solve(gram, features.T @ targets)


def _n(space: object) -> int | None:
    """``space.n`` of a ``Discrete`` space, ``None`` for a continuous one."""
    n = getattr(space, "n", None)
    return None if n is None else int(n)


@dataclass
class FittedValue:
    """A linear value function ``V(s) = phi(s, t) . w`` fitted by ridge regression on Monte Carlo returns."""

    weights: torch.Tensor
    n_states: int | None
    horizon: int | None

    @classmethod
    def fit(cls, problem: ExactGradientProblem, batch: EpisodeBatch, gamma: float, ridge: float = 1e-6) -> FittedValue:
        """Fit on the discounted returns of ``batch`` (episodes of ``problem`` under the policy)."""
        n_states, horizon = _n(problem.observation_space), getattr(problem, "horizon", None)
        returns = discounted_returns(batch.rewards, batch.terminated, batch.truncated, gamma=gamma)
        phi = value_features(batch.observations, batch.timesteps, n_states, horizon)[batch.mask]
        return cls(_ridge(phi, returns[batch.mask], ridge), n_states, horizon)

    def __call__(self, observations: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return value_features(observations, timesteps, self.n_states, self.horizon) @ self.weights


@dataclass
class FittedCritic:
    """A linear critic ``Q_w(s, a) = psi(s, a, t) . w`` fitted by ridge regression on Monte Carlo returns: tabular
    in ``(s, a)`` for discrete problems, quadratic in ``(s, a)`` for continuous ones (exact for a linear-Gaussian
    policy on a quadratic reward), times a one-hot of the time step on finite-horizon problems."""

    weights: torch.Tensor
    n_states: int | None
    n_actions: int | None
    horizon: int | None

    @classmethod
    def fit(cls, problem: ExactGradientProblem, batch: EpisodeBatch, gamma: float, ridge: float = 1e-6) -> FittedCritic:
        """Fit on the discounted returns of ``batch`` (episodes of ``problem`` under the policy)."""
        critic = cls(
            torch.empty(0), _n(problem.observation_space), _n(problem.action_space), getattr(problem, "horizon", None)
        )
        returns = discounted_returns(batch.rewards, batch.terminated, batch.truncated, gamma=gamma)
        psi = critic.features(batch.observations, batch.actions, batch.timesteps)[batch.mask]
        critic.weights = _ridge(psi, returns[batch.mask], ridge)
        return critic

    def features(self, observations: torch.Tensor, actions: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``[T, N, F]`` features of the state-action pairs."""
        if self.n_actions is not None:
            assert self.n_states is not None
            pairs = observations.long() * self.n_actions + actions.long()
            return value_features(pairs, timesteps, self.n_states * self.n_actions, self.horizon)
        lead = observations.shape[:2]
        joint = torch.cat([observations.reshape(*lead, -1), actions.reshape(*lead, -1)], dim=-1)
        return value_features(joint, timesteps, None, self.horizon)

    def __call__(self, observations: torch.Tensor, actions: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.features(observations, actions, timesteps) @ self.weights

    def all_actions(self, observations: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``Q_w(s, a)`` for every discrete action: ``[T, N, A]``."""
        assert self.n_actions is not None
        return torch.stack(
            [self(observations, torch.full_like(observations, a), timesteps) for a in range(self.n_actions)], -1
        )
