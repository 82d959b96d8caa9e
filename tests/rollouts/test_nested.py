"""pgvar.rollouts.nested (sample_nested_rollouts): state save/restore, the continuations' bookkeeping, and bad input."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from pgvar import PPO
from pgvar.rollouts import restore_state, sample_nested_rollouts, snapshot_state


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "CartPole-v1", "HalfCheetah-v5"])
def test_restore_replays_the_same_transition(env_id):
    env = gym.make(env_id)
    env.reset(seed=0)
    for _ in range(5):
        env.step(env.action_space.sample())
    snapshot = snapshot_state(env)
    action = env.action_space.sample()
    first = env.unwrapped.step(action)[:2]
    for _ in range(3):  # move away, then come back
        env.unwrapped.step(env.action_space.sample())
    restore_state(env, snapshot)
    again = env.unwrapped.step(action)[:2]
    np.testing.assert_allclose(again[0], first[0], rtol=1e-6, atol=1e-8)
    assert again[1] == pytest.approx(first[1], rel=1e-6, abs=1e-8)


def test_samples_have_the_decomposition_shapes_and_respect_the_horizon():
    model = PPO("MlpPolicy", "Pendulum-v1", seed=0, device="cpu", n_steps=64, batch_size=32)
    samples = sample_nested_rollouts(model.policy, "Pendulum-v1", 6, horizon=7, n_parallel=4, seed=3)
    n_params = sum(p.numel() for name, p in model.policy.named_parameters() if "value" not in name)
    assert samples.scores.shape == samples.fresh_scores.shape == (6, n_params)
    assert samples.returns.shape == (6, 2) and samples.fresh_returns.shape == (6,)
    assert samples.baselines["value"].shape == (6,) and samples.baselines["mc_value"].shape == (6, 3)
    assert samples.continuation_steps.shape == (6, 6)
    # Pendulum never terminates: every continuation runs the horizon, or to the time limit of 200 steps.
    expected = torch.clamp(200 - samples.timesteps, max=7)
    assert torch.equal(samples.continuation_steps, expected[:, None].expand(6, 6))
    assert not torch.equal(samples.returns[:, 0], samples.returns[:, 1])  # independent continuations
    # Pendulum's rewards lie in [-16.27, 0]: a discounted sum of at most 7 of them is bounded accordingly.
    assert (samples.returns <= 0).all() and (samples.returns >= -16.3 * 7).all()
    # The scores are those of the policy's log-probabilities: autograd at one state, sorted-name order.
    names = sorted(name for name, _ in model.policy.named_parameters() if "value" not in name)
    params = dict(model.policy.named_parameters())
    log_prob = model.policy.get_distribution(samples.observations[2:3]).log_prob(samples.actions[2:3]).sum()
    grads = torch.autograd.grad(log_prob, [params[name] for name in names])
    expected = torch.cat([g.reshape(-1) for g in grads]).to(torch.float64)
    torch.testing.assert_close(samples.scores[2], expected, rtol=1e-5, atol=1e-6)
    result = samples.decomposition()
    assert result.n_states == 6 and result.state_baseline == "mc_value"
    assert result.trajectory >= 0


def test_same_seed_same_samples():
    model = PPO("MlpPolicy", "CartPole-v1", seed=0, device="cpu", n_steps=64, batch_size=32)
    a = sample_nested_rollouts(model.policy, "CartPole-v1", 4, horizon=20, seed=5)
    b = sample_nested_rollouts(model.policy, "CartPole-v1", 4, horizon=20, seed=5)
    assert torch.equal(a.returns, b.returns) and torch.equal(a.scores, b.scores)
    # CartPole terminates: some continuations stop before the horizon, none runs past it.
    assert (a.continuation_steps <= 20).all()


def test_bad_input():
    model = PPO("MlpPolicy", "CartPole-v1", seed=0, device="cpu", n_steps=64, batch_size=32)
    with pytest.raises(ValueError, match="n_states must be an integer > 0, got 0"):
        sample_nested_rollouts(model.policy, "CartPole-v1", 0)
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\], got 1.5"):
        sample_nested_rollouts(model.policy, "CartPole-v1", 4, gamma=1.5)
    with pytest.raises(ValueError, match="critic .* needs Box actions"):
        sample_nested_rollouts(model.policy, "CartPole-v1", 4, critic=lambda o, a: o.sum(1))
    with pytest.raises(ValueError, match="horizon must be an integer > 0"):
        sample_nested_rollouts(model.policy, "CartPole-v1", 4, horizon=0)


def test_an_env_without_a_restorable_state_is_rejected_early():
    class Opaque(gym.Env):
        observation_space = gym.spaces.Box(-1, 1, (2,))
        action_space = gym.spaces.Discrete(2)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return np.zeros(2, dtype=np.float32), {}

        def step(self, action):
            return np.zeros(2, dtype=np.float32), 0.0, False, False, {}

    with pytest.raises(ValueError, match="cannot save and restore the simulator state of Opaque"):
        snapshot_state(Opaque())


def test_monte_carlo_values_by_state_restore():
    """gamma = 0: the value is the first reward (CartPole: 1); with gamma > 0 it is deterministic given the seed."""
    from stable_baselines3 import PPO as SB3PPO
    from stable_baselines3.common.env_util import make_vec_env

    from pgvar.rollouts import collect_rollout, monte_carlo_values

    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = SB3PPO("MlpPolicy", env, seed=0, device="cpu")
    batch, _ = collect_rollout(model.policy, env, 5, env.reset(), record_states=True)
    states = [s for row in batch.states for s in row]
    obs, steps = batch.observations.flatten(0, 1), batch.timesteps.flatten()
    zero = monte_carlo_values(model.policy, "CartPole-v1", states, obs, steps, gamma=0.0, n_rollouts=2, horizon=5)
    assert torch.equal(zero, torch.ones(10, dtype=torch.float64))
    kwargs = dict(gamma=0.9, n_rollouts=3, horizon=4, seed=1)
    a = monte_carlo_values(model.policy, "CartPole-v1", states, obs, steps, **kwargs)
    b = monte_carlo_values(model.policy, "CartPole-v1", states, obs, steps, **kwargs)
    assert torch.equal(a, b) and bool(a.isfinite().all()) and not torch.equal(a, zero)
    with pytest.raises(ValueError, match="one entry per state"):
        monte_carlo_values(model.policy, "CartPole-v1", states[:3], obs, steps)
    with pytest.raises(ValueError, match="n_rollouts"):
        monte_carlo_values(model.policy, "CartPole-v1", states, obs, steps, n_rollouts=0)
