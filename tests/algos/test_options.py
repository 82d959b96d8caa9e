"""Constructor contract: SB3's arguments unchanged, new arguments validated at construction."""

from __future__ import annotations

import inspect

import gymnasium as gym
import pytest
import sb3_contrib
import stable_baselines3
import torch
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

from pgvar.algos import A2C, PPO, TRPO, EstimatorRolloutBuffer
from pgvar.algos.reference import REFERENCE_OPTIONS

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PAIRS = [(PPO, stable_baselines3.PPO), (A2C, stable_baselines3.A2C), (TRPO, sb3_contrib.TRPO)]
SMALL = {"n_steps": 8, "policy_kwargs": {"net_arch": [8]}}


@pytest.mark.parametrize(("pgvar_class", "sb3_class"), PAIRS)
def test_every_sb3_argument_keeps_its_name_position_and_default(pgvar_class, sb3_class):
    ours = inspect.signature(pgvar_class.__init__).parameters
    theirs = inspect.signature(sb3_class.__init__).parameters
    assert list(ours)[: len(theirs)] == list(theirs)  # positional calls keep working
    for name, parameter in theirs.items():
        assert ours[name].default == parameter.default, name
        assert ours[name].kind == parameter.kind, name
    new = {name: p for name, p in ours.items() if name not in theirs}
    reference = {"ref_policy", "ref_regularizer", "ref_coef", "ref_target", "ref_estimator", "ref_placement",
                 "ref_cap", "ref_horizon", "ref_measure", "ref_env", "ref_rollout_steps", "ref_rollout_every",
                 "ref_discriminator_kwargs"}
    assert reference == set(REFERENCE_OPTIONS)  # the names QPropPPO / QPropTRPO pass on
    assert set(new) == {"baseline", "horizon_time_limit", *reference}
    assert new["baseline"].default == "value" and new["baseline"].kind is inspect.Parameter.KEYWORD_ONLY
    assert new["horizon_time_limit"].default is None
    assert new["horizon_time_limit"].kind is inspect.Parameter.KEYWORD_ONLY
    assert new["ref_policy"].default is None  # the reference regularizer is off by default
    assert all(new[name].kind is inspect.Parameter.KEYWORD_ONLY for name in reference)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"baseline": "median"}, r"baseline must be one of 'value', 'none', 'mean', 'optimal', 'horizon'; got 'median'"),
        ({"baseline": None}, r"baseline must be one of .*; got None"),
        ({"normalize_advantage": "per-batch"}, r"normalize_advantage must be one of True, False, 'minibatch', "
                                               r"'batch', 'none'; got 'per-batch'"),
        ({"gamma": 1.5}, r"gamma must be in \[0, 1\], got 1.5"),
        ({"gamma": -0.1}, r"gamma must be in \[0, 1\], got -0.1"),
        ({"gamma": float("nan")}, r"gamma must be in \[0, 1\], got nan"),
        ({"gae_lambda": 1.01}, r"gae_lambda must be in \[0, 1\], got 1.01"),
        ({"gae_lambda": "0.9x"}, r"gae_lambda must be a number in \[0, 1\], got '0.9x'"),
    ],
)
@pytest.mark.parametrize("algo_class", [PPO, A2C, TRPO])
def test_bad_arguments_raise_before_anything_is_built(algo_class, kwargs, message):
    # The env id does not exist: the ValueError proves the check runs before the env is made.
    with pytest.raises(ValueError, match=message):
        algo_class("MlpPolicy", "NoSuchEnv-v0", **kwargs)


@pytest.mark.parametrize(
    ("algo_class", "argument", "mode", "sb3_flag"),
    [
        (PPO, None, "minibatch", True),
        (PPO, False, "none", False),
        (PPO, "batch", "batch", False),
        (A2C, None, "none", False),
        (A2C, True, "minibatch", True),
        (TRPO, None, "minibatch", True),
        (TRPO, "none", "none", False),
    ],
)
def test_normalize_advantage_modes_and_the_sb3_flag(algo_class, argument, mode, sb3_flag):
    kwargs = {} if argument is None else {"normalize_advantage": argument}
    if algo_class is not A2C:
        kwargs["batch_size"] = 8
    model = algo_class("MlpPolicy", "CartPole-v1", **SMALL, **kwargs)
    assert model.advantage_normalization == mode
    assert model.normalize_advantage is sb3_flag  # what SB3's train() reads: per-minibatch normalization
    assert model.rollout_buffer.normalize_batch is (mode == "batch")
    assert model.baseline == "value" and model.rollout_buffer.baseline == "value"


class ItemFeatures(BaseFeaturesExtractor):
    """A features extractor with a non-Linear parameter and Python control flow on tensor values: torch.func
    cannot vmap it, so per-sample score norms are impossible."""

    def __init__(self, observation_space: gym.spaces.Box) -> None:
        super().__init__(observation_space, features_dim=observation_space.shape[0])
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return observations * self.scale if float(observations.abs().max()) < 1e6 else observations


def test_optimal_baseline_rejects_a_policy_it_cannot_handle_at_construction():
    policy_kwargs = {"features_extractor_class": ItemFeatures, "net_arch": [8]}
    with pytest.raises(ValueError, match=r"baseline='optimal' needs per-sample gradients .* ActorCriticPolicy"):
        PPO("MlpPolicy", "Pendulum-v1", n_steps=8, batch_size=8, baseline="optimal", normalize_advantage="none",
            policy_kwargs=policy_kwargs)
    # The same policy is fine with the other baselines.
    PPO("MlpPolicy", "Pendulum-v1", n_steps=8, batch_size=8, baseline="mean", normalize_advantage="none",
        policy_kwargs=policy_kwargs)


class UsersOwnBuffer(RolloutBuffer):
    pass


class UsersEstimatorBuffer(EstimatorRolloutBuffer):
    pass


def test_rollout_buffer_class_argument():
    # SB3's own classes are swapped for the estimator buffers; what the user passed is kept (and saved).
    model = PPO("MlpPolicy", "CartPole-v1", rollout_buffer_class=RolloutBuffer, batch_size=8, **SMALL)
    assert type(model.rollout_buffer) is EstimatorRolloutBuffer and model.rollout_buffer_class is RolloutBuffer
    model = PPO("MlpPolicy", "CartPole-v1", batch_size=8, **SMALL)
    assert model.rollout_buffer_class is None and model.rollout_buffer_kwargs == {}
    # A subclass of the estimator buffer gets the options.
    model = PPO("MlpPolicy", "CartPole-v1", rollout_buffer_class=UsersEstimatorBuffer, baseline="mean",
                normalize_advantage="none", batch_size=8, **SMALL)
    assert type(model.rollout_buffer) is UsersEstimatorBuffer and model.rollout_buffer.baseline == "mean"
    # A foreign buffer computes SB3's GAE itself: fine with the defaults, an error when an option would be lost.
    model = PPO("MlpPolicy", "CartPole-v1", rollout_buffer_class=UsersOwnBuffer, batch_size=8, **SMALL)
    assert type(model.rollout_buffer) is UsersOwnBuffer
    with pytest.raises(ValueError, match=r"rollout_buffer_class=UsersOwnBuffer computes its own advantages"):
        PPO("MlpPolicy", "CartPole-v1", rollout_buffer_class=UsersOwnBuffer, normalize_advantage="batch",
            batch_size=8, **SMALL)


@pytest.mark.parametrize("baseline", ["mean", "optimal"])
@pytest.mark.parametrize("normalize_advantage", ["minibatch", "batch"])
def test_a_constant_baseline_under_normalization_warns_that_it_cancels(baseline, normalize_advantage):
    with pytest.warns(UserWarning, match=f"baseline='{baseline}' with normalize_advantage='{normalize_advantage}' "
                                         "is the same estimator as baseline='none'"):
        PPO("MlpPolicy", "CartPole-v1", baseline=baseline, normalize_advantage=normalize_advantage,
            batch_size=8, **SMALL)


def test_the_warning_is_true_constant_baselines_cancel_under_minibatch_normalization(recwarn):
    """(G - b) - mean(G - b) = G - mean(G): "mean" trains like "none" up to float rounding. Without normalization
    the two differ, so the comparison can fail."""
    def train(baseline, normalize_advantage):
        model = PPO("MlpPolicy", "CartPole-v1", seed=2, n_steps=32, batch_size=16, n_epochs=2, baseline=baseline,
                    normalize_advantage=normalize_advantage, policy_kwargs={"net_arch": [8]})
        return torch.nn.utils.parameters_to_vector(model.learn(64).policy.parameters()).detach()

    torch.testing.assert_close(train("mean", "minibatch"), train("none", "minibatch"), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(train("mean", "none"), train("none", "none"), rtol=1e-4, atol=1e-5)
