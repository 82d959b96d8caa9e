"""Exact resume: a run interrupted, checkpointed and continued in a fresh state equals the uninterrupted run."""

from __future__ import annotations

import random
import zipfile

import numpy as np
import pytest
import torch
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import SubprocVecEnv, VecNormalize

from pgvar import PPO, QPropTRPO
from pgvar.checkpoint import ExactCheckpointCallback, load_checkpoint, save_checkpoint

N_STEPS = 32


def make_env(env_id: str, n_envs: int, seed: int, normalize: bool = False):
    env = make_vec_env(env_id, n_envs=n_envs, seed=seed)
    return VecNormalize(env) if normalize else env


def make_model(cls, env, **kwargs):
    options = {"n_steps": N_STEPS, "seed": 0, "device": "cpu", "policy_kwargs": {"net_arch": [16]}}
    if cls is PPO:
        options.update(batch_size=N_STEPS, n_epochs=2)
    if cls is QPropTRPO:
        options.update(qprop_warmup_steps=N_STEPS, qprop_critic_batch_size=16, qprop_critic_net_arch=[16],
                       batch_size=N_STEPS)  # fmt: skip
    options.update(kwargs)
    return cls("MlpPolicy", env, **options)


def scramble_global_randomness() -> None:
    torch.manual_seed(12345)
    np.random.seed(54321)  # noqa: NPY002 (the global stream SB3 shuffles with)
    random.seed(999)


def assert_same_model(a, b) -> None:
    assert a.num_timesteps == b.num_timesteps
    for key, value in a.policy.state_dict().items():
        assert torch.equal(b.policy.state_dict()[key], value), key
    if hasattr(a, "critic"):
        for key, value in a.critic.state_dict().items():
            assert torch.equal(b.critic.state_dict()[key], value), key


CASES = [
    pytest.param(PPO, "CartPole-v1", 2, False, 8, id="PPO-CartPole"),
    pytest.param(PPO, "Pendulum-v1", 2, True, 8, id="PPO-Pendulum-VecNormalize"),
    pytest.param(QPropTRPO, "Pendulum-v1", 1, False, 8, id="QPropTRPO-Pendulum"),
    pytest.param(PPO, "HalfCheetah-v5", 1, False, 4, id="PPO-HalfCheetah"),
]


@pytest.mark.parametrize("cls,env_id,n_envs,normalize,n_rollouts", CASES)
def test_resumed_run_equals_uninterrupted_run(tmp_path, cls, env_id, n_envs, normalize, n_rollouts):
    total = n_rollouts * N_STEPS * n_envs
    uninterrupted = make_model(cls, make_env(env_id, n_envs, 7, normalize))
    uninterrupted.learn(total)

    # The interrupted run: checkpoints every rollout, stops after half of the steps (the process "dies").
    path = tmp_path / "run.ckpt"
    interrupted = make_model(cls, make_env(env_id, n_envs, 7, normalize))
    interrupted.learn(total // 2, callback=ExactCheckpointCallback(N_STEPS * n_envs, path))
    del interrupted
    scramble_global_randomness()

    # A fresh env with another seed: everything that matters comes from the checkpoint.
    resumed = load_checkpoint(path, env=make_env(env_id, n_envs, 1234, normalize))
    assert resumed.num_timesteps == total // 2 - N_STEPS * n_envs  # the last rollout boundary it saw
    resumed.learn(total - resumed.num_timesteps, reset_num_timesteps=False)
    assert_same_model(uninterrupted, resumed)
    if normalize:
        np.testing.assert_array_equal(uninterrupted.env.obs_rms.mean, resumed.env.obs_rms.mean)
        np.testing.assert_array_equal(uninterrupted.env.ret_rms.var, resumed.env.ret_rms.var)


def test_plain_save_load_is_not_exact(tmp_path):
    """The control: model.save / load alone loses the RNG and env states, so the runs differ."""
    total = 6 * N_STEPS * 2
    uninterrupted = make_model(PPO, make_env("CartPole-v1", 2, 7))
    uninterrupted.learn(total)
    interrupted = make_model(PPO, make_env("CartPole-v1", 2, 7))
    interrupted.learn(total // 2)
    interrupted.save(tmp_path / "model")
    scramble_global_randomness()
    resumed = PPO.load(tmp_path / "model.zip", env=make_env("CartPole-v1", 2, 1234))
    resumed.learn(total - resumed.num_timesteps, reset_num_timesteps=False)
    assert any(
        not torch.equal(value, resumed.policy.state_dict()[key])
        for key, value in uninterrupted.policy.state_dict().items()
    )


def test_checkpoint_holds_no_pickle_outside_the_model(tmp_path):
    model = make_model(PPO, make_env("CartPole-v1", 1, 0))
    model.learn(N_STEPS)
    save_checkpoint(model, tmp_path / "c.ckpt")
    with zipfile.ZipFile(tmp_path / "c.ckpt") as archive:
        assert set(archive.namelist()) == {"state.json", "arrays.npz", "model.zip"}
        with archive.open("arrays.npz") as file:
            np.load(file, allow_pickle=False)  # would raise on an object array


def test_bad_input(tmp_path):
    model = make_model(PPO, make_env("CartPole-v1", 1, 0))
    with pytest.raises(ValueError, match="save_freq must be"):
        ExactCheckpointCallback(0, tmp_path / "c.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="is not a pgvar checkpoint"):
        load_checkpoint(tmp_path / "junk.ckpt", env=make_env("CartPole-v1", 1, 0))
    model.learn(N_STEPS)
    save_checkpoint(model, tmp_path / "c.ckpt")
    with pytest.raises(ValueError, match="env does not match the checkpoint"):
        load_checkpoint(tmp_path / "c.ckpt", env=make_env("CartPole-v1", 2, 0))
    subproc = make_vec_env("CartPole-v1", n_envs=2, vec_env_cls=SubprocVecEnv)
    try:
        with pytest.raises(ValueError, match="must be a DummyVecEnv"):
            save_checkpoint(make_model(PPO, subproc), tmp_path / "s.ckpt")
    finally:
        subproc.close()


def test_restores_mid_episode_simulator_state_and_wrapper_counters(tmp_path):
    """The classic-control state, the TimeLimit counter and the Monitor's episode come back mid-episode."""
    env = make_env("Pendulum-v1", 1, 3)
    model = make_model(PPO, env)
    model.learn(N_STEPS + 5)  # an episode of 200 steps is running
    save_checkpoint(model, tmp_path / "c.ckpt")
    saved_state = env.envs[0].unwrapped.state.copy()
    saved_elapsed = env.envs[0].get_wrapper_attr("_elapsed_steps")
    saved_rewards = list(env.envs[0].get_wrapper_attr("rewards"))
    assert 0 < saved_elapsed < 200 and len(saved_rewards) == saved_elapsed
    fresh = make_env("Pendulum-v1", 1, 99)
    fresh.reset()
    load_checkpoint(tmp_path / "c.ckpt", env=fresh)
    np.testing.assert_array_equal(fresh.envs[0].unwrapped.state, saved_state)
    assert fresh.envs[0].get_wrapper_attr("_elapsed_steps") == saved_elapsed
    assert fresh.envs[0].get_wrapper_attr("rewards") == saved_rewards
