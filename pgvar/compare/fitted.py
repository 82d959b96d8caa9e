"""Linear value functions, critics and baselines fitted on Monte Carlo returns (the problem engine's
``gae_fitted_value``, ``horizon_value``, Q-Prop and ``factorized_baseline`` rows fit them on a batch of their own,
independent of the batches they score): ridge regression, and L-BFGS on
:func:`pgvar.estimators.horizon_aware_value_loss` for the horizon-aware value."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pgvar.estimators import (
    discounted_returns,
    horizon_aware_value_loss,
    horizon_aware_value_targets,
    horizon_aware_values,
    other_action_dimensions,
)
from pgvar.problems import ExactGradientProblem
from pgvar.problems.base import EpisodeBatch

__all__ = [
    "FittedCritic",
    "FittedFactorizedBaseline",
    "FittedHorizonValue",
    "FittedValue",
    "fit_horizon_aware_heads",
    "value_features",
]


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


def fit_horizon_aware_heads(
    heads: torch.nn.Module,
    observations: torch.Tensor,
    timesteps: torch.Tensor,
    targets: torch.Tensor,
    *,
    horizon: int,
    gamma: float,
    max_iter: int = 100,
) -> torch.nn.Module:
    """Fit a module ``heads(observations) -> (v0, r_bar)`` by minimizing
    :func:`pgvar.estimators.horizon_aware_value_loss` with L-BFGS (the Mirage code's optimizer), in place.

    :param heads: returns the two heads :math:`V_0(s)` and :math:`\\bar r(s)`, each ``[B]``
    :param observations: ``[B, ...]`` the inputs of ``heads``
    :param timesteps: ``[B]`` step index within the episode
    :param targets: ``[B]`` regression targets (:func:`pgvar.estimators.horizon_aware_value_targets`)
    :param horizon: the time limit ``T``
    :param gamma: discount factor
    :param max_iter: L-BFGS iterations
    :return: ``heads``, fitted
    """
    optimizer = torch.optim.LBFGS(heads.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")
    targets = targets.detach()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        v0, r_bar = heads(observations)
        loss = horizon_aware_value_loss(v0, r_bar, targets, timesteps, horizon=horizon, gamma=gamma)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return heads


class _LinearHeads(torch.nn.Module):
    """Two linear heads on fixed features: ``(phi . w0, phi . w1)``."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.weights = torch.nn.Parameter(torch.zeros(2, n_features, dtype=torch.float64))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = features @ self.weights.T
        return out[..., 0], out[..., 1]


@dataclass
class FittedHorizonValue:
    """The horizon-aware value of Tucker et al. (2018, Sec. 6), :math:`V(s, t) = V_0(s) + f(t)\\, \\bar r(s)`, with
    both heads linear in the state features (one-hot states, or a quadratic in continuous observations, without
    the time step), fitted by minimizing :func:`pgvar.estimators.horizon_aware_value_loss` on Monte Carlo returns.
    Finite-horizon problems only (``problem.horizon`` is not ``None``)."""

    heads: _LinearHeads
    n_states: int | None
    horizon: int
    gamma: float

    @classmethod
    def fit(cls, problem: ExactGradientProblem, batch: EpisodeBatch, gamma: float) -> FittedHorizonValue:
        """Fit on the returns of ``batch`` (whole episodes of ``problem`` under the policy)."""
        horizon = getattr(problem, "horizon", None)
        if horizon is None:
            raise ValueError(
                f"the horizon-aware value needs a finite-horizon problem, {type(problem).__name__} has horizon None"
            )
        n_states = _n(problem.observation_space)
        targets = horizon_aware_value_targets(
            batch.rewards, batch.terminated, batch.truncated, batch.timesteps, horizon=horizon, gamma=gamma
        )
        phi = value_features(batch.observations, batch.timesteps, n_states, None)[batch.mask]
        heads = _LinearHeads(phi.shape[-1])
        fit_horizon_aware_heads(
            heads, phi, batch.timesteps[batch.mask], targets[batch.mask], horizon=horizon, gamma=gamma
        )
        return cls(heads, n_states, int(horizon), gamma)

    def __call__(self, observations: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            v0, r_bar = self.heads(value_features(observations, timesteps, self.n_states, None))
        steps = timesteps.clamp(max=self.horizon)
        return horizon_aware_values(v0, r_bar, steps, horizon=self.horizon, gamma=self.gamma)


@dataclass
class FittedFactorizedBaseline:
    """Wu et al.'s (2018) per-dimension baselines :math:`b_k(s, a_{-k})`, each linear in a quadratic of
    :math:`(s, a_{-k})` (times a one-hot of the time step on finite-horizon problems), fitted by ridge regression on
    Monte Carlo returns (the features of their linear version, ``action_dependent_linear_feature_baseline.py``,
    without the time polynomial). Box actions with at least two dimensions."""

    weights: torch.Tensor  # [K, F]
    horizon: int | None

    @classmethod
    def fit(
        cls, problem: ExactGradientProblem, batch: EpisodeBatch, gamma: float, ridge: float = 1e-6
    ) -> FittedFactorizedBaseline:
        """Fit on the discounted returns of ``batch``."""
        if _n(problem.action_space) is not None or batch.actions.dim() < 3 or batch.actions.shape[-1] < 2:
            raise ValueError(
                "the factorized action-dependent baseline needs Box actions with at least two dimensions, "
                f"{type(problem).__name__} has {problem.action_space}"
            )
        horizon = getattr(problem, "horizon", None)
        returns = discounted_returns(batch.rewards, batch.terminated, batch.truncated, gamma=gamma)[batch.mask]
        fitted = cls(torch.empty(0), horizon)
        features = fitted.features(batch.observations, batch.actions, batch.timesteps)[batch.mask]  # [B, K, F]
        fitted.weights = torch.stack(
            [_ridge(features[:, k], returns, ridge) for k in range(features.shape[1])]
        )
        return fitted

    def features(self, observations: torch.Tensor, actions: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``[T, N, K, F]``: the features of :math:`(s, a_{-k})` for every action dimension ``k``."""
        lead = observations.shape[:2]
        others = other_action_dimensions(actions.to(torch.float64))  # [T, N, K, K - 1]
        n_dims = others.shape[-2]
        obs = observations.reshape(*lead, 1, -1).to(torch.float64).expand(*lead, n_dims, -1)
        joint = torch.cat([obs, others], dim=-1).flatten(1, 2)  # [T, N * K, D]
        steps = timesteps.unsqueeze(-1).expand(*lead, n_dims).flatten(1, 2)
        return value_features(joint, steps, None, self.horizon).unflatten(1, (lead[1], n_dims))

    def __call__(self, observations: torch.Tensor, actions: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``[T, N, K]`` baseline values :math:`b_k(s, a_{-k})`."""
        return (self.features(observations, actions, timesteps) * self.weights).sum(-1)
