"""baseline="horizon": the horizon-aware value V(s, t) = V0(s) + f(T - t) r_bar(s) of Tucker et al. (2018, Sec. 6)
on PPO, A2C and TRPO. The values GAE uses are checked against a loop reference in test_buffers.py."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.policies import ActorCriticPolicy
from torch import nn

from pgvar import A2C, PPO, TRPO, QPropPPO
from pgvar._sb3_policy import actor_parameter_names
from pgvar.algos.horizon_value import HorizonValueNet
from pgvar.checkpoint import ExactCheckpointCallback, load_checkpoint
from pgvar.estimators import horizon_aware_values

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SMALL = {"seed": 0, "device": "cpu", "policy_kwargs": {"net_arch": [16]}}
HORIZON = 10
CONSTANT_ENV = "pgvar-test/ConstantRewardUntilTimeLimit-v0"


class ConstantRewardUntilTimeLimit(gym.Env):
    """Reward 1 at every step, one constant observation, the episode ends (terminates) after ``HORIZON`` steps.

    The return-to-go ``G_t = (1 - gamma^(T - t)) / (1 - gamma)`` depends on ``t`` only, which the observation does
    not show: a state value ``V(s)`` is a constant and cannot fit it; ``V0 = 0, r_bar = 1`` fits it exactly.
    """

    observation_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.zeros(1, np.float32), 1.0, self.t >= HORIZON, False, {}


if CONSTANT_ENV not in gym.registry:
    gym.register(CONSTANT_ENV, entry_point=ConstantRewardUntilTimeLimit, max_episode_steps=HORIZON)


def test_the_horizon_aware_value_is_exact_where_a_state_value_cannot_be():
    losses = {}
    for baseline in ("value", "horizon"):
        model = PPO("MlpPolicy", CONSTANT_ENV, n_steps=50, batch_size=50, n_epochs=10, learning_rate=3e-3, gamma=0.9,
                    gae_lambda=1.0, baseline=baseline, **SMALL)  # fmt: skip
        model.learn(1500)
        losses[baseline] = model.logger.name_to_value["train/value_loss"]
    returns = (1 - 0.9 ** (HORIZON - np.arange(HORIZON))) / (1 - 0.9)
    assert losses["value"] == pytest.approx(returns.var(), rel=0.05)  # the best constant: the variance of G_t
    assert losses["horizon"] < 1e-3 * losses["value"]
    value_net = model.policy.value_net
    assert model.horizon_time_limit == HORIZON  # read from the env's spec
    with torch.no_grad():
        latent = model.policy.mlp_extractor.forward_critic(torch.zeros(1, 1))
        v0, r_bar = value_net.heads(latent)
    assert float(v0) == pytest.approx(0.0, abs=0.05) and float(r_bar) == pytest.approx(1.0, abs=0.01)


def test_value_net_uses_the_step_indices_it_is_given():
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=16, baseline="horizon", **SMALL)
    value_net = model.policy.value_net
    assert isinstance(value_net, HorizonValueNet) and value_net.horizon == 500
    torch.nn.init.normal_(value_net.r_bar.weight)
    obs = torch.randn(4, 4)
    timesteps = torch.tensor([0, 1, 250, 499])
    with torch.no_grad():
        latent = model.policy.mlp_extractor.forward_critic(obs)
        v0, r_bar = value_net.heads(latent)
        plain = model.policy.predict_values(obs)
        with value_net.at_timesteps(timesteps):
            aware = model.policy.predict_values(obs)
    torch.testing.assert_close(plain, v0)  # without step indices: the state part V0
    expected = horizon_aware_values(v0, r_bar, timesteps.reshape(4, 1), horizon=500, gamma=model.gamma)
    torch.testing.assert_close(aware, expected)
    assert value_net.timesteps is None  # the block restored it
    with value_net.at_timesteps(timesteps[:3]), pytest.raises(RuntimeError, match="step indices for 3 rows"):
        model.policy.predict_values(obs)


@pytest.mark.parametrize(
    ("algo_class", "env_id", "extra"),
    [
        (PPO, "CartPole-v1", {"batch_size": 32, "n_epochs": 2}),
        (A2C, "CartPole-v1", {}),
        (TRPO, "Pendulum-v1", {"batch_size": 32, "n_critic_updates": 2, "cg_max_steps": 5}),
        (PPO, "Pendulum-v1", {"batch_size": 32, "n_epochs": 2}),
    ],
)
def test_each_algorithm_learns_with_the_horizon_aware_value(algo_class, env_id, extra):
    env = make_vec_env(env_id, n_envs=2, seed=0, env_kwargs={"max_episode_steps": 40})
    model = algo_class("MlpPolicy", env, n_steps=64, baseline="horizon", **SMALL, **extra)
    r_bar = model.policy.value_net.r_bar
    assert not torch.any(r_bar.weight)  # starts as the plain value
    assert not any("r_bar" in name for name in actor_parameter_names(model.policy))  # and TRPO leaves it out
    assert any(param is r_bar.weight for group in model.policy.optimizer.param_groups for param in group["params"])
    model.learn(384)
    assert model.horizon_time_limit == 40
    assert torch.any(r_bar.weight)  # trained by the policy's optimizer
    assert np.isfinite(model.logger.name_to_value["train/value_loss"])
    assert model.policy.value_net.timesteps is None  # cleared after train()
    assert model._horizon_timesteps.shape == (2,) and (model._horizon_timesteps < 40).all()


def test_dict_observations(make_short_env):
    env = make_short_env("Pendulum-v1", 2, 10, dict_obs=True)
    model = PPO("MultiInputPolicy", env, n_steps=16, batch_size=16, n_epochs=1, baseline="horizon",
                horizon_time_limit=13, **SMALL)  # fmt: skip
    model.learn(64)
    assert model.rollout_buffer.final_observations  # dict final observations were stacked and evaluated
    assert np.isfinite(model.rollout_buffer.values).all()


def test_save_load_round_trip_keeps_the_head_and_the_step_counts(tmp_path, make_short_env):
    model = PPO("MlpPolicy", make_short_env("CartPole-v1", 2, 30), n_steps=16, batch_size=16, n_epochs=1,
                baseline="horizon", **SMALL)  # fmt: skip
    model.learn(48)
    model.save(tmp_path / "model.zip")
    for allow_pickle in (True, False):
        loaded = PPO.load(tmp_path / "model.zip", allow_pickle=allow_pickle)
        assert loaded.baseline == "horizon" and loaded.horizon_time_limit == 30
        assert isinstance(loaded.policy.value_net, HorizonValueNet)
        np.testing.assert_array_equal(loaded._horizon_timesteps, model._horizon_timesteps)
        state = model.policy.state_dict()
        assert {"value_net.v0.weight", "value_net.r_bar.weight"} <= set(state)
        for key, value in loaded.policy.state_dict().items():
            assert torch.equal(value, state[key]), key
        saved_optimizer = model.policy.optimizer.state_dict()["state"]
        loaded_optimizer = loaded.policy.optimizer.state_dict()["state"]
        assert saved_optimizer.keys() == loaded_optimizer.keys()
        assert len(saved_optimizer) == sum(1 for _ in model.policy.parameters())  # r_bar included
        for index, moments in saved_optimizer.items():
            assert moments.keys() == loaded_optimizer[index].keys()
            for name, value in moments.items():
                assert torch.equal(loaded_optimizer[index][name], value), (index, name)
    loaded.set_env(make_short_env("CartPole-v1", 2, 30))
    loaded.learn(32)  # and it trains on
    with pytest.raises(ValueError, match=r"baseline='value' cannot be chosen at load for a model saved with "
                                         r"baseline='horizon'"):  # fmt: skip
        PPO.load(tmp_path / "model.zip", baseline="value")
    PPO("MlpPolicy", "CartPole-v1", **SMALL).save(tmp_path / "plain.zip")
    with pytest.raises(ValueError, match=r"baseline='horizon' cannot be chosen at load"):
        PPO.load(tmp_path / "plain.zip", baseline="horizon")
    assert PPO.load(tmp_path / "plain.zip", baseline="mean").baseline == "mean"  # the others still can


def test_exact_resume_restores_the_step_counts(tmp_path):
    def make_env():
        return make_vec_env("CartPole-v1", n_envs=2, seed=7, env_kwargs={"max_episode_steps": 25})

    def make_model():
        return PPO("MlpPolicy", make_env(), n_steps=16, batch_size=16, n_epochs=2, baseline="horizon", **SMALL)

    total = 8 * 16 * 2
    uninterrupted = make_model()
    uninterrupted.learn(total)
    interrupted = make_model()
    interrupted.learn(total // 2, callback=ExactCheckpointCallback(32, tmp_path / "run.ckpt"))
    del interrupted
    torch.manual_seed(123)
    resumed = load_checkpoint(tmp_path / "run.ckpt", env=make_env())
    assert resumed.num_timesteps == total // 2 - 32
    assert resumed._horizon_timesteps.any()  # mid-episode: the counts matter
    resumed.learn(total - resumed.num_timesteps, reset_num_timesteps=False)
    np.testing.assert_array_equal(resumed._horizon_timesteps, uninterrupted._horizon_timesteps)
    for key, value in uninterrupted.policy.state_dict().items():
        assert torch.equal(resumed.policy.state_dict()[key], value), key


class _SequentialValuePolicy(ActorCriticPolicy):
    def _build(self, lr_schedule):
        super()._build(lr_schedule)
        self.value_net = nn.Sequential(nn.Linear(self.mlp_extractor.latent_dim_vf, 1))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: PPO("MlpPolicy", "NoSuchEnv-v0", baseline="horizon", horizon_time_limit=0),
         r"horizon_time_limit must be an integer > 0, got 0"),
        (lambda: PPO("MlpPolicy", "NoSuchEnv-v0", baseline="horizon", horizon_time_limit=2.5),
         r"horizon_time_limit must be an integer > 0, got 2.5"),
        (lambda: A2C("MlpPolicy", "NoSuchEnv-v0", horizon_time_limit=100),
         r"horizon_time_limit=100 is the time limit of baseline='horizon' .* baseline='value'"),
        (lambda: TRPO("MlpPolicy", make_vec_env(ConstantRewardUntilTimeLimit), baseline="horizon"),
         r"baseline='horizon' needs the environment's time limit T, and env.spec.max_episode_steps is None"),
        (lambda: PPO(_SequentialValuePolicy, "CartPole-v1", baseline="horizon"),
         r"baseline='horizon' .* value_net is nn.Linear\(latent, 1\), got _SequentialValuePolicy"),
        (lambda: QPropPPO("MlpPolicy", "Pendulum-v1", baseline="horizon"),
         r"baseline='horizon' is supported by pgvar's PPO, A2C and TRPO, not by QPropPPO"),
    ],
    ids=["zero", "fraction", "other-baseline", "no-time-limit", "custom-value-net", "qprop"],
)
def test_bad_input_is_refused_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_time_limit_shorter_than_the_episodes_is_refused_when_the_rollout_is_seen():
    model = A2C("MlpPolicy", CONSTANT_ENV, n_steps=16, baseline="horizon", horizon_time_limit=4, **SMALL)
    with pytest.raises(ValueError, match=r"timesteps must satisfy t \+ 1 <= horizon = 4"):
        model.learn(16)
