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
