"""Shared pieces for the pgvar.measure tests: small networks, SB3 policies on real gymnasium spaces, losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn


class GaussianMLP(nn.Module):
    """A tiny SB3-like Gaussian policy: MLP mean, state-independent ``log_std`` registered FIRST (as SB3 does)."""

    def __init__(self, obs_dim: int = 3, act_dim: int = 2, hidden: int = 5) -> None:
        super().__init__()
        self.log_std = nn.Parameter(torch.linspace(-0.5, 0.3, act_dim))
        self.body = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, act_dim)

    def log_prob(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        mean = self.head(self.body(obs))
        z = (act - mean) / self.log_std.exp()
        return (-0.5 * z**2 - self.log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return self.log_prob(obs, act)


def pg_loss(policy: GaussianMLP, obs: torch.Tensor, act: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """``-sum_i log pi(a_i|s_i) A_i``: the policy-gradient surrogate, a sum of per-sample terms."""
    return -(policy.log_prob(obs, act) * adv).sum()


def sb3_pg_loss(policy: nn.Module, obs: torch.Tensor, act: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    return -(policy.evaluate_actions(obs, act)[1] * adv).sum()


def is_actor_param(name: str) -> bool:
    return not name.startswith(("value_net", "mlp_extractor.value_net"))


@pytest.fixture
def gaussian_batch() -> tuple[GaussianMLP, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    torch.manual_seed(1)
    policy = GaussianMLP().double()
    n = 12
    obs = torch.randn(n, 3, dtype=torch.float64)
    act = torch.randn(n, 2, dtype=torch.float64)
    adv = torch.randn(n, dtype=torch.float64) + 0.5
    return policy, (obs, act, adv)


def make_sb3_batch(env_id: str, n: int, seed: int = 0):
    """An SB3 ``ActorCriticPolicy`` on ``env_id``'s spaces, with observations, sampled actions, advantages."""
    import gymnasium as gym
    from stable_baselines3.common.policies import ActorCriticPolicy

    torch.manual_seed(seed)
    env = gym.make(env_id)
    env.observation_space.seed(seed)
    policy = ActorCriticPolicy(env.observation_space, env.action_space, lr_schedule=lambda _: 3e-4)
    obs = torch.as_tensor(np.stack([env.observation_space.sample() for _ in range(n)]), dtype=torch.float32)
    env.close()
    with torch.no_grad():
        act = policy.get_distribution(obs).sample()
    adv = torch.randn(n) + 0.3
    return policy, (obs, act, adv)


@pytest.fixture(params=["Pendulum-v1", "CartPole-v1"], ids=["box-diag-gaussian", "discrete-categorical"])
def sb3_batch(request):
    return make_sb3_batch(request.param, n=64)
