"""Real environments and SB3's machinery (VecNormalize, several envs, SubprocVecEnv, callbacks, progress bar,
TensorBoard) with tiny budgets: everything runs and the parameters stay finite."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, CheckpointCallback, EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import SubprocVecEnv, VecNormalize

from pgvar.algos import A2C, BASELINES, PPO, TRPO

pytestmark = [
    pytest.mark.usefixtures("torch_single_thread"),
    # Constant baselines with normalization are legitimate (if redundant) combinations to exercise here.
    pytest.mark.filterwarnings("ignore:baseline=.* is the same estimator as baseline='none'"),
]

TINY = {
    PPO: {"n_steps": 32, "batch_size": 32, "n_epochs": 1},
    A2C: {"n_steps": 32},
    TRPO: {"n_steps": 32, "batch_size": 32, "n_critic_updates": 1, "cg_max_steps": 3},
}
ALGOS = [PPO, A2C, TRPO]


def tiny(algo_class, env, **kwargs):
    return algo_class("MlpPolicy", env, seed=0, policy_kwargs={"net_arch": [16]}, **{**TINY[algo_class], **kwargs})


def assert_finite_parameters(model) -> None:
    for name, parameter in model.policy.state_dict().items():
        assert torch.isfinite(parameter).all(), name


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1", "HalfCheetah-v5"])
@pytest.mark.parametrize("algo_class", ALGOS)
def test_learns_on_real_environments(algo_class, env_id):
    model = tiny(algo_class, env_id, baseline="optimal" if env_id == "HalfCheetah-v5" else "value")
    model.learn(96)
    assert model.num_timesteps == 96
    assert_finite_parameters(model)


@pytest.mark.parametrize("algo_class", ALGOS)
def test_vec_normalize_with_several_envs(algo_class):
    env = VecNormalize(make_vec_env("Pendulum-v1", n_envs=3, seed=0, env_kwargs={"max_episode_steps": 20}))
    extra = {} if algo_class is A2C else {"batch_size": 48}
    model = tiny(algo_class, env, n_steps=16, baseline="mean", normalize_advantage="batch", **extra)
    model.learn(96)
    assert model.get_vec_normalize_env() is env and env.obs_rms.count > 96
    assert_finite_parameters(model)


def test_subprocess_vec_env():
    # "fork" starts in a fraction of the time of SB3's default "forkserver" (which re-imports torch).
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0, vec_env_cls=SubprocVecEnv,
                       vec_env_kwargs={"start_method": "fork"})
    try:
        model = tiny(PPO, env, n_steps=16, batch_size=32, baseline="optimal")
        model.learn(64)
        assert model.num_timesteps == 64
    finally:
        env.close()


class StopAfter(BaseCallback):
    def __init__(self, n_calls: int) -> None:
        super().__init__()
        self.limit = n_calls
        self.rollout_ends = 0

    def _on_rollout_end(self) -> None:
        self.rollout_ends += 1

    def _on_step(self) -> bool:
        return self.n_calls < self.limit


@pytest.mark.filterwarnings("ignore:rich is experimental")
def test_callbacks_progress_bar_and_tensorboard(tmp_path):
    eval_env = make_vec_env("CartPole-v1", n_envs=1, seed=1)
    stopper = StopAfter(n_calls=80)
    callbacks = CallbackList([
        CheckpointCallback(save_freq=32, save_path=str(tmp_path / "checkpoints")),
        EvalCallback(eval_env, eval_freq=32, n_eval_episodes=1, log_path=str(tmp_path / "eval")),
        stopper,
    ])
    model = tiny(PPO, "CartPole-v1", baseline="mean", tensorboard_log=str(tmp_path / "tb"))
    model.learn(10_000, callback=callbacks, progress_bar=True)
    assert model.num_timesteps == 80  # the callback stopped learn() early
    assert stopper.rollout_ends == 2
    checkpoints = sorted((tmp_path / "checkpoints").glob("*.zip"))
    assert checkpoints and PPO.load(checkpoints[-1]).baseline == "mean"
    assert (tmp_path / "eval" / "evaluations.npz").exists()
    event_files = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert event_files and event_files[0].parent.name == "PPO_1"


@pytest.mark.parametrize(
    ("baseline", "normalize_advantage"), list(itertools.product(BASELINES, ["minibatch", "batch", "none"]))
)
@pytest.mark.parametrize("algo_class", ALGOS)
def test_every_baseline_and_normalization_runs(algo_class, baseline, normalize_advantage):
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0, env_kwargs={"max_episode_steps": 20})
    model = tiny(algo_class, env, n_steps=16, baseline=baseline, normalize_advantage=normalize_advantage)
    model.learn(64)
    assert_finite_parameters(model)
    advantages = model.rollout_buffer.advantages
    assert np.isfinite(advantages).all()
    if normalize_advantage == "batch":
        assert abs(advantages.mean()) < 1e-5 and abs(advantages.std(ddof=1) - 1) < 1e-4


@pytest.mark.parametrize("env_name", ["IdentityEnvMultiDiscrete", "IdentityEnvMultiBinary", "IdentityEnv"])
def test_optimal_baseline_on_every_discrete_action_space(env_name):
    from stable_baselines3.common import envs

    env_class = getattr(envs, env_name)
    env = make_vec_env(lambda: env_class(dim=3, ep_length=10) if env_name != "IdentityEnv" else env_class(3, ep_length=10),
                       n_envs=2)
    model = tiny(A2C, env, n_steps=8, baseline="optimal")
    model.learn(32)
    assert model.rollout_buffer.constant_baseline is not None
    assert_finite_parameters(model)


def test_dict_observations_with_the_optimal_baseline(make_short_env):
    env = make_short_env("Pendulum-v1", 2, 10, dict_obs=True)
    model = PPO("MultiInputPolicy", env, seed=0, n_steps=16, batch_size=32, n_epochs=1, baseline="optimal",
                normalize_advantage="none", policy_kwargs={"net_arch": [8]})
    model.learn(64)
    assert model.rollout_buffer.constant_baseline is not None
    assert_finite_parameters(model)
