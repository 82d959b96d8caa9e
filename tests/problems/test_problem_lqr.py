"""LinearQuadraticRegulator: the adjoint gradient, the value recursion and step() against the model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pgvar.estimators import discounted_returns
from pgvar.problems import LinearQuadraticRegulator


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine (20x slower under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


SHAPES = [(2, 1, 10, 1.0), (2, 1, 10, 0.9), (3, 2, 1, 0.5), (1, 3, 7, 0.0), (4, 2, 15, 0.97)]


@pytest.mark.parametrize(("state_dim", "action_dim", "horizon", "gamma"), SHAPES)
def test_adjoint_gradient_matches_autograd_of_the_forward_cost(state_dim, action_dim, horizon, gamma):
    lqr = LinearQuadraticRegulator(state_dim, action_dim, horizon, gamma, seed=horizon)
    params = lqr.initial_parameters(seed=3)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    autograd = dict(zip(leaves, torch.autograd.grad(lqr.exact_return(leaves), list(leaves.values()))))
    adjoint = lqr.exact_policy_gradient(params)
    for name in params:
        torch.testing.assert_close(adjoint[name], autograd[name], rtol=1e-10, atol=1e-10)
    # central differences of the forward cost, on the gain and on log_std
    step = 1e-6
    for name in params:
        index = (0,) * params[name].dim()
        up = {k: v.clone() for k, v in params.items()}
        down = {k: v.clone() for k, v in params.items()}
        up[name][index] += step
        down[name][index] -= step
        difference = (lqr.exact_return(up) - lqr.exact_return(down)) / (2 * step)
        torch.testing.assert_close(adjoint[name][index], difference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 0.8])
def test_backward_values_agree_with_the_forward_return(gamma):
    """E[V_0(x_0)] = -(tr(P_0 (S_0 + m_0 m_0^T)) + c_0) equals the forward-propagated J."""
    lqr = LinearQuadraticRegulator(state_dim=3, action_dim=2, horizon=8, gamma=gamma, seed=1)
    params = lqr.initial_parameters(seed=2)
    matrices, constants = lqr.value_matrices(params)
    second_moment = lqr.initial_cov + torch.outer(lqr.initial_mean, lqr.initial_mean)
    backward = -((matrices[0] * second_moment).sum() + constants[0])
    torch.testing.assert_close(backward, lqr.exact_return(params), rtol=1e-12, atol=1e-12)
    assert torch.equal(matrices[-1], torch.zeros(3, 3, dtype=torch.float64)) and float(constants[-1]) == 0.0


def test_state_value_is_the_policy_average_of_the_action_value():
    """V_t(x) = E_{u ~ N(Kx, Sigma)} Q_t(x, u) = Q_t(x, Kx) - tr((R + gamma B^T P_{t+1} B) Sigma)."""
    lqr = LinearQuadraticRegulator(state_dim=2, action_dim=2, horizon=5, gamma=0.9, seed=0)
    params = lqr.initial_parameters(seed=1)
    matrices, _ = lqr.value_matrices(params)
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(lqr.horizon, 4, 2, generator=generator, dtype=torch.float64)
    timesteps = torch.arange(lqr.horizon).unsqueeze(1).expand(-1, 4)
    mean_actions = states @ params["gain"].T
    curvature = lqr.control_cost + lqr.gamma * lqr.control.T @ matrices[1:] @ lqr.control  # [H, du, du]
    spread = (torch.diagonal(curvature, dim1=-2, dim2=-1) * torch.exp(2 * params["log_std"])).sum(-1)
    expected = lqr.exact_action_values(params, states, mean_actions, timesteps) - spread[:, None]
    torch.testing.assert_close(
        lqr.exact_state_values(params, states, timesteps), expected, rtol=1e-12, atol=1e-12
    )
    # value at the horizon is 0, and out-of-range times are rejected
    assert bool((lqr.exact_state_values(params, states[0], torch.full((4,), lqr.horizon)) == 0).all())
    with pytest.raises(ValueError, match="timesteps"):
        lqr.exact_state_values(params, states[0], torch.full((4,), lqr.horizon + 1))
    with pytest.raises(ValueError, match="timesteps"):
        lqr.exact_action_values(params, states[0], mean_actions[0], torch.full((4,), lqr.horizon))


def test_monte_carlo_returns_to_go_match_the_time_dependent_values():
    """mean_n (G_t - V_t(x_t)) = 0 at every t (Bonferroni over t): the values are indexed by the right time."""
    lqr = LinearQuadraticRegulator(state_dim=2, action_dim=1, horizon=10, gamma=0.95, seed=0)
    params = lqr.initial_parameters(seed=1)
    batch = lqr.sample_episodes(params, 10_000, torch.Generator().manual_seed(0))
    returns = discounted_returns(batch.rewards, batch.terminated, batch.truncated, gamma=lqr.gamma)
    residual = returns - lqr.exact_state_values(params, batch.observations, batch.timesteps)
    z = residual.mean(1) / (residual.std(1) / math.sqrt(batch.n_episodes))
    assert float(z.abs().max()) < 4.0, z
    # a one-step shift of the time index is caught by the same check
    shifted = returns - lqr.exact_state_values(
        params, batch.observations, (batch.timesteps + 1).clamp_max(lqr.horizon)
    )
    z_shifted = shifted.mean(1) / (shifted.std(1) / math.sqrt(batch.n_episodes))
    assert float(z_shifted.abs().max()) > 8.0


def test_episodes_terminate_at_the_horizon_in_both_paths():
    lqr = LinearQuadraticRegulator(horizon=4, seed=0, observe_time=True)
    params = lqr.initial_parameters(seed=0)
    batch = lqr.sample_episodes(params, 8, torch.Generator().manual_seed(0))
    assert batch.horizon == 4
    assert bool(batch.terminated[-1].all()) and not bool(batch.terminated[:-1].any())
    assert not bool(batch.truncated.any()) and bool(batch.mask.all())
    times = torch.arange(4, dtype=torch.float64)[:, None] / 4
    assert torch.equal(batch.observations[..., -1], times.expand(4, 8))
    assert torch.equal(batch.next_observations[..., -1], (times + 0.25).expand(4, 8))
    assert torch.equal(batch.next_observations[:-1], batch.observations[1:])

    observation, _ = lqr.reset(seed=0)
    flags = []
    for t in range(4):
        assert observation[-1] == t / 4
        observation, _, terminated, truncated, _ = lqr.step(np.zeros(1))
        flags.append((terminated, truncated))
    assert flags == [(False, False)] * 3 + [(True, False)]
    with pytest.raises(RuntimeError, match="reset"):
        lqr.step(np.zeros(1))


def test_env_step_follows_the_linear_dynamics():
    """From a fixed (x, u): reward is exactly the model's, next state ~ N(Ax + Bu, W) (mean and covariance)."""
    lqr = LinearQuadraticRegulator(state_dim=2, action_dim=1, horizon=10, seed=0)
    state, action = np.array([0.7, -1.2]), np.array([30.0])  # a large, unclipped action
    lqr.reset(seed=0)
    next_states = []
    for _ in range(3_000):
        lqr.reset(options={"state": state, "timestep": 3})
        next_state, reward, terminated, truncated, _ = lqr.step(action)
        assert not terminated and not truncated
        assert math.isclose(
            reward, float(lqr.reward(torch.as_tensor(state), torch.as_tensor(action))), rel_tol=1e-12
        )
        next_states.append(next_state)
    next_states = np.asarray(next_states)
    mean = lqr.dynamics.numpy() @ state + lqr.control.numpy() @ action
    noise_cov = lqr.noise_cov.numpy()
    z = (next_states.mean(0) - mean) / np.sqrt(np.diag(noise_cov) / len(next_states))
    assert np.abs(z).max() < 4.0, z
    np.testing.assert_allclose(np.cov(next_states.T), noise_cov, rtol=0.15, atol=0.1 * noise_cov.max())
    with pytest.raises(ValueError, match="timestep"):
        lqr.reset(options={"timestep": 10})
