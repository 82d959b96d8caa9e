"""pgvar.rollouts.shared_batch: the shared-batch collector reproduces SB3's rollouts, with raw rewards."""

from __future__ import annotations

import torch

from pgvar.estimators import gae_advantages
from pgvar.rollouts import collect_rollout


def test_rollout_and_gae_reproduce_sb3_collect_rollouts_with_truncations():
    """Same policy, same seeds: our raw-reward rollout + gae_advantages equals SB3's buffer, where SB3 folds
    the truncation bootstrap into the reward. Pendulum's 200-step time limit truncates inside the rollout."""
    import numpy as np
    from stable_baselines3 import PPO as SB3PPO
    from stable_baselines3.common.env_util import make_vec_env

    n_steps = 250
    model = SB3PPO("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2, seed=3), n_steps=n_steps, batch_size=50, seed=3, device="cpu")
    model._setup_learn(n_steps * 2, callback=None)
    torch.manual_seed(11)
    from stable_baselines3.common.callbacks import CallbackList

    callback = CallbackList([])
    callback.init_callback(model)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=n_steps)
    expected = model.rollout_buffer.advantages.copy()

    env = make_vec_env("Pendulum-v1", n_envs=2, seed=3)
    torch.manual_seed(11)
    batch, _ = collect_rollout(model.policy, env, n_steps, env.reset())
    assert batch.truncated.any() and not batch.terminated.any()
    adv = gae_advantages(
        batch.rewards, batch.values, batch.next_values, batch.terminated, batch.truncated,
        gamma=model.gamma, gae_lambda=model.gae_lambda,
    )
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_timesteps_and_next_observations_follow_the_episodes_across_batches():
    import numpy as np
    from stable_baselines3 import PPO as SB3PPO
    from stable_baselines3.common.env_util import make_vec_env

    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = SB3PPO("MlpPolicy", env, seed=0, device="cpu")
    first, obs = collect_rollout(model.policy, env, 60, env.reset())
    second, _ = collect_rollout(model.policy, env, 60, obs)
    for batch in (first, second):
        done = batch.terminated | batch.truncated
        assert done.any()
        # t counts steps within the episode: +1 after a step, 0 after an episode end
        expected = torch.where(done[:-1], torch.zeros_like(batch.timesteps[1:]), batch.timesteps[:-1] + 1)
        assert torch.equal(batch.timesteps[1:], expected)
        # the next observation is the following row's, except at an episode end (the final observation there)
        same = ~done[:-1]
        assert torch.equal(batch.next_observations[:-1][same], batch.observations[1:][same])
        assert not torch.equal(batch.next_observations[:-1][done[:-1]], batch.observations[1:][done[:-1]])
    # the second batch continues the episodes of the first (read from the envs' time limits)
    last_done = first.terminated[-1] | first.truncated[-1]
    assert torch.equal(second.timesteps[0], torch.where(last_done, 0, first.timesteps[-1] + 1))
    assert first.states is None and np.all(first.timesteps.numpy() >= 0)


def test_recorded_states_replay_the_batch():
    """Restoring the state saved before step t and taking the batch's action there gives the batch's reward and
    next observation (Pendulum's dynamics are deterministic)."""
    import gymnasium as gym
    import numpy as np
    from stable_baselines3 import PPO as SB3PPO
    from stable_baselines3.common.env_util import make_vec_env

    from pgvar._sb3_policy import env_actions
    from pgvar.rollouts import restore_state

    env = make_vec_env("Pendulum-v1", n_envs=2, seed=1)
    model = SB3PPO("MlpPolicy", env, seed=1, device="cpu")
    batch, _ = collect_rollout(model.policy, env, 8, env.reset(), record_states=True)
    assert batch.states is not None and len(batch.states) == 8 and len(batch.states[0]) == 2
    replay = gym.make("Pendulum-v1")
    replay.reset(seed=5)
    for t, n in [(0, 0), (3, 1), (7, 0)]:
        restore_state(replay, batch.states[t][n])
        obs, reward, *_ = replay.step(env_actions(replay.action_space, batch.actions[t, n].numpy()))
        np.testing.assert_allclose(reward, batch.rewards[t, n].item(), rtol=1e-5)
        np.testing.assert_allclose(obs, batch.next_observations[t, n].numpy(), rtol=1e-5, atol=1e-6)
