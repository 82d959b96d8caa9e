"""The drop-in claim: with default estimator arguments pgvar's algorithms train to the SAME parameters as
stable-baselines3's PPO / A2C and sb3-contrib's TRPO, bit for bit (``torch.equal``), on data with terminations,
time-limit truncations (bootstrapped by SB3 inside the reward) and several updates."""

from __future__ import annotations

import numpy as np
import pytest
import sb3_contrib
import stable_baselines3
import torch
from stable_baselines3.common.callbacks import BaseCallback

from pgvar.algos import A2C, PPO, TRPO, EstimatorDictRolloutBuffer, EstimatorRolloutBuffer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# Tiny rollouts and few epochs: a run is a few updates on a few hundred steps.
SETTINGS = {
    "PPO": (stable_baselines3.PPO, PPO, {"n_steps": 32, "batch_size": 16, "n_epochs": 2}),
    "A2C": (stable_baselines3.A2C, A2C, {"n_steps": 16}),
    "TRPO": (sb3_contrib.TRPO, TRPO, {"n_steps": 32, "batch_size": 32, "n_critic_updates": 2, "cg_max_steps": 5}),
}
# Episode limits shorter than the rollout: CartPole also terminates (pole falls), Pendulum only truncates.
EPISODE_LIMITS = {"CartPole-v1": 12, "Pendulum-v1": 10}
N_ROLLOUTS = 4


class EpisodeEndCounter(BaseCallback):
    """Counts terminations and time-limit truncations seen during learn()."""

    def __init__(self) -> None:
        super().__init__()
        self.terminations = 0
        self.truncations = 0

    def _on_step(self) -> bool:
        for done, info in zip(self.locals["dones"], self.locals["infos"]):
            if done:
                if info.get("TimeLimit.truncated", False):
                    self.truncations += 1
                else:
                    self.terminations += 1
        return True


def train_pair(make_env, algo: str, env_id: str, n_envs: int, seed: int = 3, **extra):
    reference_class, pgvar_class, settings = SETTINGS[algo]
    models, counters = [], []
    for cls, cls_extra in ((reference_class, extra.get("reference", {})), (pgvar_class, extra.get("pgvar", {}))):
        env = make_env(env_id, n_envs, EPISODE_LIMITS.get(env_id, 15), dict_obs=extra.get("dict_obs", False))
        policy = "MultiInputPolicy" if extra.get("dict_obs") else "MlpPolicy"
        model = cls(policy, env, seed=seed, **settings, **cls_extra)
        counter = EpisodeEndCounter()
        model.learn(N_ROLLOUTS * settings["n_steps"] * n_envs, callback=counter)
        models.append(model)
        counters.append(counter)
    return models, counters


def assert_bitwise_equal(reference, model) -> None:
    ref_state, state = reference.policy.state_dict(), model.policy.state_dict()
    assert list(ref_state) == list(state)
    for name in ref_state:
        assert torch.equal(ref_state[name], state[name]), f"parameter {name} differs from SB3's"
    # The optimizer state (Adam moments / RMSprop square averages) too: every update was the same.
    for ref_group, group in zip(reference.policy.optimizer.state_dict()["state"].values(),
                                model.policy.optimizer.state_dict()["state"].values()):
        for key in ref_group:
            assert torch.equal(torch.as_tensor(ref_group[key]), torch.as_tensor(group[key]))
    assert reference.num_timesteps == model.num_timesteps
    assert reference._n_updates == model._n_updates


@pytest.mark.parametrize("n_envs", [1, 4])
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
@pytest.mark.parametrize("algo", ["PPO", "A2C", "TRPO"])
def test_default_arguments_train_bitwise_like_sb3(make_short_env, algo, env_id, n_envs):
    (reference, model), (_, counter) = train_pair(make_short_env, algo, env_id, n_envs)
    assert type(model.rollout_buffer) is EstimatorRolloutBuffer  # pgvar's estimators really ran
    assert counter.truncations > 0, "the data must contain time-limit truncations"
    if env_id == "CartPole-v1":
        assert counter.terminations > 0, "the data must contain terminations"
    # The last rollout's returns and advantages (flattened by get(), same layout in both).
    np.testing.assert_array_equal(reference.rollout_buffer.advantages, model.rollout_buffer.advantages)
    np.testing.assert_array_equal(reference.rollout_buffer.returns, model.rollout_buffer.returns)
    assert_bitwise_equal(reference, model)


@pytest.mark.parametrize(
    ("algo", "reference_kwargs", "pgvar_kwargs"),
    [
        ("PPO", {"normalize_advantage": False}, {"normalize_advantage": "none"}),
        ("PPO", {"normalize_advantage": True}, {"normalize_advantage": "minibatch", "baseline": "value"}),
        ("A2C", {"normalize_advantage": True}, {"normalize_advantage": "minibatch"}),
        ("TRPO", {"normalize_advantage": False}, {"normalize_advantage": False}),
        # Other discounts: the float32 rounding of gamma * gae_lambda must match SB3's too.
        ("PPO", {"gamma": 0.97, "gae_lambda": 0.9}, {"gamma": 0.97, "gae_lambda": 0.9}),
        ("A2C", {"gamma": 0.9, "gae_lambda": 0.8}, {"gamma": 0.9, "gae_lambda": 0.8}),
    ],
)
def test_sb3_flags_named_modes_and_other_discounts_match_sb3(make_short_env, algo, reference_kwargs, pgvar_kwargs):
    (reference, model), _ = train_pair(
        make_short_env, algo, "CartPole-v1", 2, reference=reference_kwargs, pgvar=pgvar_kwargs
    )
    assert_bitwise_equal(reference, model)


def test_dict_observations_use_the_dict_buffer_and_match_sb3(make_short_env):
    (reference, model), _ = train_pair(make_short_env, "PPO", "CartPole-v1", 2, dict_obs=True)
    assert type(model.rollout_buffer) is EstimatorDictRolloutBuffer
    assert_bitwise_equal(reference, model)
