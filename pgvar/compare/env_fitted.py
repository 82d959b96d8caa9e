r"""Small networks the environment engine fits on batches of their own: a critic :math:`Q_w(s, a)` (Q-Prop, the
all-action control variate), a horizon-aware value :math:`V(s, t)` (Tucker et al. 2018, Sec. 6) and Wu et al.'s
per-dimension baselines :math:`b_k(s, a_{-k})`.

Each is a 64-64 tanh MLP on standardized inputs with a standardized target, fitted once at a fixed policy on
batches independent of the batches it then scores (the engine's reference batches), with a seeded random stream:

- :class:`EnvCritic` regresses the return-to-go (bootstrapped from the policy's learned V where a rollout is cut)
  on :math:`(s, a)` (Box) or on :math:`s` with one output per action, read at the action taken (Discrete), by Adam;
- :class:`EnvHorizonValue` minimizes :func:`pgvar.estimators.horizon_aware_value_loss` by L-BFGS (the Mirage
  code's optimizer) on the targets of :func:`pgvar.estimators.horizon_aware_value_targets`;
- :class:`EnvFactorizedBaseline` regresses the GAE advantage on :math:`(s, a_{-k}, \mathrm{onehot}(k))`, one
  network shared by the ``K`` dimensions (the inputs never contain :math:`a_k`, so the estimate stays unbiased).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pgvar.compare.fitted import fit_horizon_aware_heads
from pgvar.estimators import (
    discounted_returns,
    gae_advantages,
    horizon_aware_value_targets,
    horizon_aware_values,
    horizon_episode_flags,
    other_action_dimensions,
)
from pgvar.rollouts import RolloutBatch

__all__ = ["EnvCritic", "EnvFactorizedBaseline", "EnvHorizonValue", "bootstrapped_returns"]


def bootstrapped_returns(batch: RolloutBatch, gamma: float) -> torch.Tensor:
    """``[T, N]`` discounted returns-to-go, bootstrapped from the learned V at truncations and the rollout's end."""
    return discounted_returns(batch.rewards, batch.terminated, batch.truncated, batch.next_values, gamma=gamma)


def _mlp(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, n_out))


def _flat_obs(observations: torch.Tensor) -> torch.Tensor:
    return observations.reshape(observations.shape[0], -1).float()


class _Scaler(nn.Module):
    """Standardizes inputs (per feature) and rescales outputs (one scale), from the fitting data."""

    mean: torch.Tensor
    std: torch.Tensor
    scale: torch.Tensor

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("mean", inputs.mean(0))
        self.register_buffer("std", inputs.std(0).clamp_min(1e-6))
        self.register_buffer("scale", targets.std().clamp_min(1e-6) if targets is not None else torch.ones(()))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return (inputs - self.mean) / self.std


def _fit_adam(
    net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, predict, *, steps: int, seed: int, lr: float = 1e-3
) -> None:
    """Minimize the mean squared error of ``predict(net, inputs[idx])`` against ``targets[idx]`` over minibatches."""
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    n = inputs.shape[0]
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(n, (min(512, n),), generator=generator)
            loss = (predict(net, inputs[idx], idx) - targets[idx]).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def _stack(batches: Sequence[RolloutBatch], field: str) -> torch.Tensor:
    return torch.cat([getattr(b, field).flatten(0, 1) for b in batches])


class EnvCritic(nn.Module):
    """:math:`Q_w(s, a)`: an MLP on :math:`(s, a)` (Box actions) or on :math:`s` with one output per action
    (Discrete), fitted to the return-to-go (see the module docstring).

    :param obs_dim: flattened observation size
    :param action_dim: Box action size, or the number of Discrete actions
    :param discrete: whether the actions are Discrete
    """

    def __init__(self, obs_dim: int, action_dim: int, discrete: bool) -> None:
        super().__init__()
        self.discrete = discrete
        self.net = _mlp(obs_dim + (0 if discrete else action_dim), action_dim if discrete else 1)
        self.scaler: _Scaler | None = None

    @classmethod
    def fit(
        cls, batches: Sequence[RolloutBatch], gamma: float, *, discrete: bool, n_actions: int | None, seed: int,
        steps: int = 1000,
    ) -> EnvCritic:  # fmt: skip
        """Fit on ``batches`` (collected at the fixed policy)."""
        obs = _flat_obs(_stack(batches, "observations"))
        actions = _stack(batches, "actions")
        targets = torch.cat([bootstrapped_returns(b, gamma).flatten() for b in batches]).float()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if discrete:
                assert n_actions is not None
                critic = cls(obs.shape[1], n_actions, True)
                inputs = obs
                taken = actions.long().flatten()
            else:
                critic = cls(obs.shape[1], actions.shape[-1], False)
                inputs = torch.cat([obs, actions.float()], dim=1)
                taken = None
            critic.scaler = _Scaler(inputs, targets)
            scaled_targets = targets / critic.scaler.scale

            def predict(net: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
                assert critic.scaler is not None
                out = critic.net(critic.scaler(x))
                return out.gather(1, taken[idx].unsqueeze(1)).squeeze(1) if taken is not None else out.squeeze(1)

            _fit_adam(critic, inputs, scaled_targets, predict, steps=steps, seed=seed)
        critic.requires_grad_(False)
        return critic

    def forward(self, observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``[B]`` :math:`Q_w(s, a)` for Box actions (differentiable in ``actions``)."""
        assert self.scaler is not None and not self.discrete
        x = torch.cat([_flat_obs(observations), actions.float()], dim=1)
        return self.net(self.scaler(x)).squeeze(1) * self.scaler.scale

    def all_actions(self, observations: torch.Tensor) -> torch.Tensor:
        """``[B, A]`` :math:`Q_w(s, \\cdot)` for Discrete actions."""
        assert self.scaler is not None and self.discrete
        return self.net(self.scaler(_flat_obs(observations))) * self.scaler.scale


class _TwoHeads(nn.Module):
    def __init__(self, obs_dim: int) -> None:
        super().__init__()
        self.net = _mlp(obs_dim, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(x)
        return out[:, 0], out[:, 1]


class EnvHorizonValue(nn.Module):
    """The horizon-aware value :math:`V(s, t) = V_0(s) + \\frac{1 - \\gamma^{T - t}}{1 - \\gamma} \\bar r(s)` with
    two heads on one 64-64 torso, fitted by L-BFGS on :func:`pgvar.estimators.horizon_aware_value_loss`.

    :param obs_dim: flattened observation size
    :param horizon: the environment's time limit ``T``
    :param gamma: discount factor
    """

    def __init__(self, obs_dim: int, horizon: int, gamma: float) -> None:
        super().__init__()
        self.heads = _TwoHeads(obs_dim)
        self.horizon, self.gamma = horizon, gamma
        self.scaler: _Scaler | None = None

    @classmethod
    def fit(
        cls, batches: Sequence[RolloutBatch], *, horizon: int, gamma: float, seed: int, max_iter: int = 100
    ) -> EnvHorizonValue:
        """Fit on ``batches``: targets are the discounted returns that end at the horizon (bootstrapped from the
        learned V where a rollout is cut before it)."""
        targets = []
        for b in batches:
            assert b.timesteps is not None
            targets.append(
                horizon_aware_value_targets(
                    b.rewards, b.terminated, b.truncated, b.timesteps, horizon=horizon, gamma=gamma,
                    next_values=b.next_values,
                ).flatten()
            )  # fmt: skip
        target = torch.cat(targets).float()
        obs = _flat_obs(_stack(batches, "observations"))
        steps = _stack(batches, "timesteps")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            value = cls(obs.shape[1], horizon, gamma)
            value.scaler = _Scaler(obs, target)
            fit_horizon_aware_heads(
                value.heads, value.scaler(obs), steps, target / value.scaler.scale, horizon=horizon, gamma=gamma,
                max_iter=max_iter,
            )  # fmt: skip
        value.requires_grad_(False)
        return value

    def forward(self, observations: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``[B]`` values at step ``timesteps`` (clamped to the horizon)."""
        assert self.scaler is not None
        v0, r_bar = self.heads(self.scaler(_flat_obs(observations)))
        steps = timesteps.clamp(0, self.horizon)
        return horizon_aware_values(v0, r_bar, steps, horizon=self.horizon, gamma=self.gamma) * self.scaler.scale

    def advantages(self, batch: RolloutBatch, gae_lambda: float) -> torch.Tensor:
        """``[T, N]`` GAE(lambda) with this value, the end at the horizon a termination
        (:func:`pgvar.estimators.horizon_episode_flags`)."""
        assert batch.timesteps is not None and batch.next_observations is not None
        shape = batch.rewards.shape
        values = self(batch.observations.flatten(0, 1), batch.timesteps.flatten()).reshape(shape)
        next_values = self(batch.next_observations.flatten(0, 1), batch.timesteps.flatten() + 1).reshape(shape)
        terminated, truncated = horizon_episode_flags(
            batch.terminated, batch.truncated, batch.timesteps.clamp(max=self.horizon - 1), horizon=self.horizon
        )
        return gae_advantages(
            batch.rewards, values, next_values, terminated, truncated, gamma=self.gamma, gae_lambda=gae_lambda
        )


class EnvFactorizedBaseline(nn.Module):
    """Wu et al.'s per-dimension baselines :math:`b_k(s, a_{-k})`: one MLP on :math:`(s, a_{-k}, \\mathrm{onehot}(k))`,
    fitted to the GAE advantage.

    :param obs_dim: flattened observation size
    :param action_dim: ``K >= 2``
    """

    def __init__(self, obs_dim: int, action_dim: int) -> None:
        super().__init__()
        self.action_dim = action_dim
        self.net = _mlp(obs_dim + 2 * action_dim - 1, 1)
        self.scaler: _Scaler | None = None

    def _inputs(self, observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``[B, K, F]``: :math:`(s, a_{-k}, \\mathrm{onehot}(k))` for every ``k``."""
        obs = _flat_obs(observations)
        k = self.action_dim
        others = other_action_dimensions(actions.float())  # [B, K, K - 1]
        onehot = torch.eye(k).expand(obs.shape[0], k, k)
        return torch.cat([obs.unsqueeze(1).expand(-1, k, -1), others, onehot], dim=-1)

    @classmethod
    def fit(
        cls, batches: Sequence[RolloutBatch], *, gamma: float, gae_lambda: float, seed: int, steps: int = 1000
    ) -> EnvFactorizedBaseline:
        """Fit on ``batches``: regress the GAE(lambda) advantage of each step on every :math:`(s, a_{-k}, k)`."""
        obs = _flat_obs(_stack(batches, "observations"))
        actions = _stack(batches, "actions").float()
        advantages = torch.cat(
            [
                gae_advantages(
                    b.rewards, b.values, b.next_values, b.terminated, b.truncated, gamma=gamma, gae_lambda=gae_lambda
                ).flatten()
                for b in batches
            ]
        ).float()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            baseline = cls(obs.shape[1], actions.shape[1])
            inputs = baseline._inputs(obs, actions)  # [B, K, F]
            baseline.scaler = _Scaler(inputs.flatten(0, 1), advantages)
            targets = advantages / baseline.scaler.scale

            # Every (step, k) pair regresses the step's advantage: b_k(s, a_-k) ~ E[A | s, a_-k].
            def predict_pairs(net: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
                assert baseline.scaler is not None
                return baseline.net(baseline.scaler(x)).squeeze(-1)

            _fit_adam(
                baseline, inputs, targets.unsqueeze(1).expand(-1, actions.shape[1]), predict_pairs, steps=steps,
                seed=seed,
            )  # fmt: skip
        baseline.requires_grad_(False)
        return baseline

    def forward(self, observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` baseline values."""
        assert self.scaler is not None
        return self.net(self.scaler(self._inputs(observations, actions))).squeeze(-1) * self.scaler.scale
