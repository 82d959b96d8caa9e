"""What every pgvar algorithm checks that SB3 does not: hyperparameters, ``total_timesteps``, finite observations
and rewards (with the env index and the step), and the user's ``rollout_buffer_class`` (pgvar/algos/_checks.py,
OnPolicyEstimatorMixin._estimator_buffer_class)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import stable_baselines3
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.vec_env import DummyVecEnv

from pgvar.algos import (
    A2C,
    PPO,
    TRPO,
    EntropyPG,
    EstimatorDictRolloutBuffer,
    QPropDictRolloutBuffer,
    QPropPPO,
    QPropTRPO,
    SoftQ,
)
from pgvar.algos._checks import SB3_ARGUMENT_RULES, check_sb3_arguments
from tests.algos.conftest import DictObservation

pytestmark = pytest.mark.usefixtures("torch_single_thread")

ALL_CLASSES = [PPO, A2C, TRPO, QPropPPO, QPropTRPO, EntropyPG, SoftQ]
SMALL = {"n_steps": 8, "policy_kwargs": {"net_arch": [8]}}
QPROP_SMALL = {"qprop_buffer_size": 64, "qprop_warmup_steps": 0}


def small_kwargs(cls) -> dict:
    kwargs = dict(SMALL)
    if cls in (PPO, TRPO, QPropPPO, QPropTRPO):
        kwargs["batch_size"] = 8
    if cls in (QPropPPO, QPropTRPO):
        kwargs.update(QPROP_SMALL)
    return kwargs


def env_id(cls) -> str:
    return "Pendulum-v1" if cls in (QPropPPO, QPropTRPO) else "CartPole-v1"


# ---------------------------------------------------------------------------------------- 11.4: hyperparameters
# (argument, bad value, message); each class is given the arguments it takes.
BAD_VALUES = [
    ("clip_range", -0.2, r"clip_range must be a number > 0 or a schedule .*, got -0.2"),
    ("clip_range", 0, r"clip_range must be a number > 0 or a schedule .*, got 0"),
    ("learning_rate", -3e-4, r"learning_rate must be a number > 0 or a schedule .*, got -0.0003"),
    ("learning_rate", float("nan"), r"learning_rate must be a number > 0 or a schedule .*, got nan"),
    ("n_steps", 0, r"n_steps must be an integer >= 1, got 0"),
    ("n_steps", 8.5, r"n_steps must be an integer >= 1, got 8.5"),
    ("batch_size", 0, r"batch_size must be an integer >= 1, got 0"),
    ("batch_size", -64, r"batch_size must be an integer >= 1, got -64"),
    ("n_epochs", 0, r"n_epochs must be an integer >= 1, got 0"),
    ("ent_coef", -0.01, r"ent_coef must be a number >= 0, got -0.01"),
    ("vf_coef", -0.5, r"vf_coef must be a number >= 0, got -0.5"),
    ("max_grad_norm", 0.0, r"max_grad_norm must be a number > 0 .*, got 0.0"),
    ("max_grad_norm", -1, r"max_grad_norm must be a number > 0 .*, got -1"),
    ("target_kl", -0.01, r"target_kl must be a number > 0 or None, got -0.01"),
    ("cg_max_steps", 0, r"cg_max_steps must be an integer >= 1, got 0"),
    ("line_search_shrinking_factor", 1.5, r"line_search_shrinking_factor must be a number in \(0, 1\), got 1.5"),
    ("n_critic_updates", 0, r"n_critic_updates must be an integer >= 1, got 0"),
]
TAKES = {
    PPO: {"learning_rate", "n_steps", "batch_size", "n_epochs", "clip_range", "ent_coef", "vf_coef",
          "max_grad_norm", "target_kl"},
    A2C: {"learning_rate", "n_steps", "ent_coef", "vf_coef", "max_grad_norm"},
    TRPO: {"learning_rate", "n_steps", "batch_size", "target_kl", "cg_max_steps", "line_search_shrinking_factor",
           "n_critic_updates"},
    EntropyPG: {"learning_rate", "n_steps", "ent_coef", "vf_coef", "max_grad_norm"},
    SoftQ: {"learning_rate", "n_steps", "max_grad_norm"},
}
TAKES[QPropPPO], TAKES[QPropTRPO] = TAKES[PPO], TAKES[TRPO]
CASES = [(cls, *case) for cls in ALL_CLASSES for case in BAD_VALUES if case[0] in TAKES[cls]]


@pytest.mark.parametrize(("cls", "argument", "value", "message"), CASES,
                         ids=[f"{c[0].__name__}-{c[1]}={c[2]}" for c in CASES])
def test_a_bad_sb3_hyperparameter_raises_at_construction(cls, argument, value, message):
    # The env id does not exist: the ValueError proves the check runs before anything is built.
    with pytest.raises(ValueError, match=message):
        cls("MlpPolicy", "NoSuchEnv-v0", **{argument: value})


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_sb3_defaults_schedules_and_edge_values_are_accepted(cls):
    kwargs = small_kwargs(cls)
    schedule = lambda progress: 1e-3 * progress  # noqa: E731
    extra = {"learning_rate": schedule, "clip_range": schedule, "max_grad_norm": float("inf"), "ent_coef": 0,
             "vf_coef": 0.0, "target_kl": None if cls in (PPO, QPropPPO) else 0.05}
    kwargs.update({key: value for key, value in extra.items() if key in TAKES[cls]})
    cls("MlpPolicy", env_id(cls), **kwargs)


def test_every_rule_names_an_argument_of_sb3():
    import inspect

    import sb3_contrib

    names = set()
    for sb3_class in (stable_baselines3.PPO, stable_baselines3.A2C, sb3_contrib.TRPO):
        names |= set(inspect.signature(sb3_class.__init__).parameters)
    assert set(SB3_ARGUMENT_RULES) <= names
    with pytest.raises(KeyError):  # a typo in a class's call is a bug, not a silently skipped check
        check_sb3_arguments(n_step=3)


@pytest.mark.parametrize("cls", [PPO, EntropyPG, QPropTRPO])
@pytest.mark.parametrize("total_timesteps", [-5, -1, 2.5, float("nan"), float("inf"), True, "100"])
def test_learn_rejects_a_bad_total_timesteps(cls, total_timesteps):
    model = cls("MlpPolicy", env_id(cls), **small_kwargs(cls))
    with pytest.raises(ValueError, match=r"total_timesteps must be a whole number >= 0, got "):
        model.learn(total_timesteps)
    assert model.num_timesteps == 0


def test_learn_accepts_zero_and_whole_floats_like_sb3():
    model = PPO("MlpPolicy", "CartPole-v1", **small_kwargs(PPO))
    model.learn(0)  # SB3 allows it: sets the run up, trains nothing
    assert model.num_timesteps == 0
    model.learn(1e1)  # ``1e5``-style floats are common in SB3 scripts
    assert model.num_timesteps == 16


# ---------------------------------------------------------------------------------- 11.5: non-finite observations
class NonFiniteObservation(gym.Wrapper):
    """Returns ``value`` in element ``index`` of the observation of its ``at_step``-th ``step()`` (0-based, counted
    over episodes), or of its first ``reset()`` when ``at_step is None``."""

    def __init__(self, env: gym.Env, at_step: int | None, index: int = 1, value: float = np.nan,
                 key: str | None = None, truncate: bool = False) -> None:
        super().__init__(env)
        self.at_step, self.index, self.value, self.key, self.truncate = at_step, index, value, key, truncate
        self.steps = 0
        self.resets = 0

    def _spoil(self, observation):
        observation = {k: v.copy() for k, v in observation.items()} if self.key else observation.copy()
        target = observation[self.key] if self.key else observation
        target[self.index] = self.value
        return observation

    def reset(self, **kwargs):
        observation, info = self.env.reset(**kwargs)
        self.resets += 1
        if self.at_step is None and self.resets == 1:
            observation = self._spoil(observation)
        return observation, info

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        if self.steps == self.at_step:
            observation = self._spoil(observation)
            truncated = truncated or self.truncate
        self.steps += 1
        return observation, reward, terminated, truncated, info


class NonFiniteReward(gym.Wrapper):
    def __init__(self, env: gym.Env, at_step: int) -> None:
        super().__init__(env)
        self.at_step, self.steps = at_step, 0

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        if self.steps == self.at_step:
            reward = np.nan
        self.steps += 1
        return observation, reward, terminated, truncated, info


def two_envs(env_id: str, wrap, dict_obs: bool = False) -> DummyVecEnv:
    """Two envs; only env 1 is wrapped by ``wrap``."""

    def make(wrapped: bool):
        def thunk():
            env = gym.make(env_id)
            if dict_obs:
                env = DictObservation(env)
            return wrap(env) if wrapped else env

        return thunk

    return DummyVecEnv([make(False), make(True)])


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_a_nan_observation_raises_at_its_step_naming_env_and_step(cls):
    env = two_envs(env_id(cls), lambda e: NonFiniteObservation(e, at_step=3, index=1))
    model = cls("MlpPolicy", env, seed=0, **small_kwargs(cls))
    with pytest.raises(ValueError, match=r"env 1 returned a non-finite observation \(nan at index \(1,\)\) at step 3 "
                                         r"of the rollout \(0-based; n_steps=8, n_envs=2\)"):
        model.learn(16)
    assert model.num_timesteps == 4 * 2  # caught at the step it happened, before the policy saw it


@pytest.mark.parametrize("cls", [PPO, SoftQ])
def test_a_nan_observation_from_reset_raises_at_learn(cls):
    env = two_envs(env_id(cls), lambda e: NonFiniteObservation(e, at_step=None, value=np.inf))
    model = cls("MlpPolicy", env, **small_kwargs(cls))
    with pytest.raises(ValueError, match=r"env 1 returned a non-finite observation \(inf at index \(1,\)\) from "
                                         r"reset\(\) at the start of learn\(\)"):
        model.learn(16)


@pytest.mark.parametrize("cls", [PPO, EntropyPG])
def test_a_nan_in_a_dict_observation_names_the_key(cls):
    env = two_envs("CartPole-v1", lambda e: NonFiniteObservation(e, at_step=2, index=0, key="tail"), dict_obs=True)
    model = cls("MultiInputPolicy", env, **small_kwargs(cls))
    with pytest.raises(ValueError, match=r"env 1 returned a non-finite observation \(nan at key 'tail', index "
                                         r"\(0,\)\) at step 2 of the rollout"):
        model.learn(16)


def test_a_nan_final_observation_of_a_truncated_episode_is_caught():
    # The VecEnv resets env 1 and keeps the bad observation in infos[1]["terminal_observation"], which SB3
    # bootstraps from.
    env = two_envs("CartPole-v1", lambda e: NonFiniteObservation(e, at_step=5, truncate=True))
    model = PPO("MlpPolicy", env, **small_kwargs(PPO))
    with pytest.raises(ValueError, match=r"env 1 returned a non-finite final observation of an episode "
                                         r"\(infos\[1\]\['terminal_observation'\]: nan at index \(1,\)\) at step 5"):
        model.learn(16)


@pytest.mark.parametrize("cls", [EntropyPG, SoftQ, PPO])
def test_a_nan_reward_names_env_and_step_for_every_class(cls):
    env = two_envs("CartPole-v1", lambda e: NonFiniteReward(e, at_step=3))
    model = cls("MlpPolicy", env, **small_kwargs(cls))
    with pytest.raises(ValueError, match=r"env 1 returned a non-finite reward \(nan\) at step 3 of the rollout "
                                         r"\(0-based; n_steps=8, n_envs=2\)"):
        model.learn(16)


# -------------------------------------------------------------------------------- 11.9: rollout_buffer_class
@pytest.mark.parametrize("cls", [PPO, A2C, TRPO, QPropPPO])
def test_dict_rollout_buffer_on_a_box_space_fails_as_in_sb3(cls):
    with pytest.raises(AssertionError, match="DictRolloutBuffer must be used with Dict obs space only"):
        stable_baselines3.PPO("MlpPolicy", "Pendulum-v1", rollout_buffer_class=DictRolloutBuffer)
    with pytest.raises(AssertionError, match="DictRolloutBuffer must be used with Dict obs space only"):
        cls("MlpPolicy", "Pendulum-v1", rollout_buffer_class=DictRolloutBuffer, **small_kwargs(cls))


def test_rollout_buffer_on_a_dict_space_fails_as_in_sb3():
    env = two_envs("CartPole-v1", lambda e: e, dict_obs=True)
    with pytest.raises(Exception) as sb3_error:
        stable_baselines3.PPO("MultiInputPolicy", env, rollout_buffer_class=RolloutBuffer, n_steps=8, batch_size=8)
    with pytest.raises(type(sb3_error.value)):
        PPO("MultiInputPolicy", env, rollout_buffer_class=RolloutBuffer, **small_kwargs(PPO))


@pytest.mark.parametrize(("cls", "expected"), [(PPO, EstimatorDictRolloutBuffer), (QPropPPO, QPropDictRolloutBuffer)])
def test_dict_rollout_buffer_on_a_dict_space_gets_the_estimator_buffer(cls, expected):
    env = DummyVecEnv([lambda: DictObservation(gym.make("Pendulum-v1"))])
    model = cls("MultiInputPolicy", env, rollout_buffer_class=DictRolloutBuffer, **small_kwargs(cls))
    assert type(model.rollout_buffer) is expected and model.rollout_buffer_class is DictRolloutBuffer


def test_a_buffer_factory_is_used_as_is_with_the_default_estimator():
    built = []

    def factory(*args, **kwargs):
        built.append(RolloutBuffer(*args, **kwargs))
        return built[-1]

    model = PPO("MlpPolicy", "CartPole-v1", rollout_buffer_class=factory, **small_kwargs(PPO))
    assert model.rollout_buffer is built[0]
    with pytest.raises(ValueError, match=r"rollout_buffer_class=factory computes its own advantages, so "
                                         r"baseline='mean'"):
        PPO("MlpPolicy", "CartPole-v1", rollout_buffer_class=factory, baseline="mean", normalize_advantage="none",
            **small_kwargs(PPO))
