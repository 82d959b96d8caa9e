"""Occupancy-measure regularization (``ref_measure="state"`` / ``"state_action"``, :mod:`pgvar.algos.occupancy`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

from pgvar import A2C, PPO
from pgvar.algos.occupancy import OccupancyDiscriminator, check_discriminator_kwargs
from pgvar.estimators import occupancy_divergence_estimate, occupancy_penalty_rewards
from pgvar.problems import GoodhartBandit, RewardHackingMDP

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def bandit() -> GoodhartBandit:
    return GoodhartBandit(n_arms=4, error="gaussian", seed=3)


def set_tabular_policy(policy, log_probs: th.Tensor) -> None:
    """A policy built with ``net_arch=[]`` on one-hot observations: ``pi(.|s) = softmax(log_probs[s])``."""
    with th.no_grad():
        policy.action_net.weight.copy_(log_probs.T.float())
        policy.action_net.bias.zero_()


class StatsPerRollout(BaseCallback):
    """The regularizer's statistics and a copy of the buffer (after GAE) at the end of each rollout."""

    def __init__(self) -> None:
        super().__init__()
        self.stats: list[dict[str, float]] = []
        self.buffers: list[dict[str, np.ndarray]] = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        model: Any = self.model
        self.stats.append(dict(model.reference_regularizer.stats))
        buffer = model.rollout_buffer
        self.buffers.append(
            {key: getattr(buffer, key).copy() for key in ("observations", "actions", "rewards", "advantages")}
        )


# ------------------------------------------------------------------------------------- discriminator estimate
def _plugin_standard_error(p: th.Tensor, q: th.Tensor, divergence: str, n: int) -> float:
    """Delta-method standard error of the plug-in divergence from n samples of p and n of q (what a tabular
    discriminator at its optimum computes): KL: Var_p(log r)/n + chi2/n; chi2: Var_p(2 r)/n + Var_q(r^2)/n, r = p/q."""
    keep = p > 0
    p, q = p[keep], q[keep]
    r = p / q
    if divergence == "kl":
        var_p = float((p * r.log() ** 2).sum() - (p * r.log()).sum() ** 2)
        var_q = float((p * r).sum() - 1.0)  # Var_q(r) = chi2
    else:
        var_p = float((p * (2 * r) ** 2).sum() - (p * 2 * r).sum() ** 2)
        var_q = float((p * r**3).sum() - (p * r).sum() ** 2)  # Var_q(r^2) = E_p[r^3] - E_p[r]^2
    return math.sqrt((var_p + var_q) / n)


@pytest.mark.parametrize(
    ("measure", "net_arch", "learning_rate"),
    [("state", [], 0.05), ("state_action", [64], 0.01)],  # linear on one-hot states: the tabular discriminator
)
def test_discriminator_estimate_approaches_the_exact_occupancy_divergence(measure, net_arch, learning_rate):
    """On the reward-hacking MDP (gamma=1: the rollouts' undiscounted occupancy), trained on n samples of the exact
    occupancy measures of a policy and of the reference, the estimate is within 4 plug-in standard errors of the
    exact divergence (KL; also chi2 on states)."""
    th.manual_seed(0)
    mdp = RewardHackingMDP(gamma=1.0)
    policy = mdp.kl_regularized_optimum(0.5)  # visits the bucket: a large divergence, mass on rare states
    if measure == "state":
        p, q = mdp.exact_state_occupancy(policy), mdp.reference_state_occupancy()
    else:
        p = mdp.exact_state_action_occupancy(policy).reshape(-1)
        q = mdp.reference_state_action_occupancy().reshape(-1)
    n, n_actions = 20_000, mdp.n_actions
    generator = th.Generator().manual_seed(1)
    samples_p = th.multinomial(p.clamp_min(0), n, replacement=True, generator=generator)
    samples_q = th.multinomial(q, n, replacement=True, generator=generator)
    options = check_discriminator_kwargs(
        {"net_arch": net_arch, "n_epochs": 100, "batch_size": 2000, "learning_rate": learning_rate}
    )
    discriminator = OccupancyDiscriminator(
        spaces.Discrete(mdp.n_states), None if measure == "state" else spaces.Discrete(n_actions), **options
    )

    def features(x: th.Tensor) -> th.Tensor:
        if measure == "state":
            return discriminator.features(x[:, None], None)
        return discriminator.features((x // n_actions)[:, None], (x % n_actions)[:, None])

    stats = discriminator.train_step(features(samples_p), features(samples_q))
    logits = discriminator.clipped_logits(features(samples_p))
    # chi2 only on states: on state-action pairs its plug-in standard error exceeds the value (rare pairs)
    for divergence in ("kl", "chi2") if measure == "state" else ("kl",):
        exact = float(mdp.exact_divergence(policy, divergence, measure))
        estimate = float(occupancy_divergence_estimate(logits, divergence))
        tolerance = 4 * _plugin_standard_error(p, q, divergence, n)
        assert abs(estimate - exact) < tolerance, (divergence, estimate, exact, tolerance)
    assert 0.5 < stats.accuracy < 1.0


def test_the_logged_estimate_orders_policies_by_their_exact_occupancy_divergence():
    """PPO with a frozen learning rate (the policy stays the given table) on the reward-hacking MDP: the mean logged
    state-KL estimate orders the reference itself, a mild and a hacking policy as their exact divergences do."""
    mdp = RewardHackingMDP(gamma=1.0)
    reference = PPO("MlpPolicy", mdp, policy_kwargs={"net_arch": []}, seed=0).policy
    set_tabular_policy(reference, mdp.reference_log_probs)
    policies = [mdp.reference_log_probs, mdp.kl_regularized_optimum(0.5), mdp.kl_regularized_optimum(0.1)]
    exact, estimated = [], []
    for log_probs in policies:
        model = PPO(
            "MlpPolicy", RewardHackingMDP(gamma=1.0), policy_kwargs={"net_arch": []}, learning_rate=lambda _: 0.0,
            n_steps=512, batch_size=512, n_epochs=1, seed=0, ref_policy=reference, ref_measure="state", ref_coef=0.0,
        )
        set_tabular_policy(model.policy, log_probs)
        record = StatsPerRollout()
        model.learn(4 * 512, callback=record)
        estimated.append(np.mean([stats["occupancy_kl"] for stats in record.stats[1:]]))
        exact.append(float(mdp.exact_divergence(log_probs, "kl", "state")))
    assert exact[0] < 1e-12 < exact[1] < exact[2]
    assert estimated[0] < estimated[1] < estimated[2], (exact, estimated)
    assert abs(estimated[0]) < 0.1 and estimated[2] > 2.0


# --------------------------------------------------------------------------------------------- the penalty
@pytest.mark.parametrize("regularizer", ["chi2", "sqrt_chi2", "tv", "kl"])
def test_the_discriminator_penalty_reaches_the_buffer(regularizer):
    """advantages = r - (-occupancy_penalty_rewards(d(s, a))) on one-step episodes (baseline='none'), with d the
    clipped logits of the model's discriminator after its step on this rollout."""
    coef, n_steps, n_envs = 0.7, 32, 2
    env = make_vec_env(bandit, n_envs=n_envs, seed=0)
    model = A2C(
        "MlpPolicy", env, n_steps=n_steps, seed=0, baseline="none", ref_policy="initial", ref_coef=coef,
        ref_measure="state_action", ref_regularizer=regularizer, ref_rollout_steps=48,
    )
    record = StatsPerRollout()
    model.learn(2 * n_steps * n_envs, callback=record)
    occupancy = model.reference_regularizer.occupancy
    assert occupancy.measure == "state_action"
    # the discriminator has not moved since the last rollout's penalty (A2C's train() does not touch it)
    buffer = record.buffers[-1]
    discriminator = occupancy.discriminator
    features = discriminator.features(
        th.as_tensor(buffer["observations"]).reshape(-1, 1), th.as_tensor(buffer["actions"]).reshape(-1, 1)
    )
    logits = discriminator.clipped_logits(features).double().reshape(n_steps, n_envs)
    penalty = -occupancy_penalty_rewards(logits, regularizer, coef).numpy()
    assert np.abs(penalty).max() > 0
    np.testing.assert_allclose(buffer["advantages"], buffer["rewards"] - penalty, rtol=1e-5, atol=1e-6)
    logged = model.logger.name_to_value
    assert logged["pgvar/ref_coef"] == coef
    assert 0.0 <= logged["pgvar/ref_discriminator_accuracy"] <= 1.0
    assert logged[f"pgvar/ref_occupancy_{regularizer}"] == pytest.approx(
        float(occupancy_divergence_estimate(logits, regularizer))
    )


def test_reference_rollouts_follow_the_budget_options():
    model = A2C(
        "MlpPolicy", bandit(), n_steps=8, seed=0, ref_policy="initial", ref_measure="state", ref_rollout_steps=5,
        ref_rollout_every=3,
    )
    rollouts = model.reference_regularizer.occupancy.rollouts
    collected = []
    original = rollouts.collect

    def counting_collect(n_transitions):
        observations, actions = original(n_transitions)
        collected.append(len(actions))
        return observations, actions

    rollouts.collect = counting_collect
    model.learn(7 * 8)  # 7 rollouts: reference samples at rollouts 1, 4 and 7
    assert collected == [5, 5, 5]
    default = A2C("MlpPolicy", make_vec_env(bandit, n_envs=2), n_steps=8, ref_policy="initial", ref_measure="state")
    assert default.reference_regularizer.occupancy.rollout_steps == 16


def test_ppo_with_the_state_measure_trains_on_cartpole():
    model = PPO(
        "MlpPolicy", "CartPole-v1", n_steps=128, batch_size=64, n_epochs=2, seed=0, ref_policy="initial",
        ref_measure="state", ref_regularizer="sqrt_chi2", ref_coef=0.05,
        ref_discriminator_kwargs={"net_arch": [32, 32], "n_epochs": 2},
    )
    start = [p.detach().clone() for p in model.policy.parameters()]
    record = StatsPerRollout()
    model.learn(384, callback=record)
    assert len(record.stats) == 3
    logged = model.logger.name_to_value
    for key in ("pgvar/ref_occupancy_sqrt_chi2", "pgvar/ref_discriminator_accuracy", "pgvar/ref_coef"):
        assert math.isfinite(logged[key]), key
    assert all(th.isfinite(p).all() for p in model.policy.parameters())
    assert any(not th.equal(a, b) for a, b in zip(start, model.policy.parameters()))
    # the reference acted in its own copy of the environment
    assert model.reference_regularizer.occupancy.rollouts.env is not model.get_env()


def test_adaptive_coefficient_follows_the_occupancy_estimate():
    model = A2C(
        "MlpPolicy", bandit(), n_steps=16, seed=0, ref_policy="initial", ref_measure="state_action",
        ref_coef="adaptive", ref_target=1e-9, ref_horizon=100,
    )
    with th.no_grad():  # far from the initial policy: the discriminator sees a divergence above the tiny target
        model.policy.action_net.bias.add_(th.tensor([4.0, 0.0, 0.0, 0.0]))
    model.learn(4 * 16)
    assert model.reference_regularizer.controlled == "occupancy_kl"
    assert model.reference_regularizer.coef > 0.2


# --------------------------------------------------------------------------------------------- save / load
def test_save_load_round_trips_the_discriminator_and_the_options(tmp_path):
    model = PPO(
        "MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64, n_epochs=1, seed=0, ref_policy="initial",
        ref_measure="state_action", ref_regularizer="tv", ref_rollout_every=2,
        ref_discriminator_kwargs={"net_arch": [16], "learning_rate": 3e-3},
    )
    model.learn(128)
    model.save(tmp_path / "model.zip")
    loaded = PPO.load(tmp_path / "model.zip", env=make_vec_env("CartPole-v1", n_envs=1))
    for name in ("ref_measure", "ref_regularizer", "ref_rollout_every", "ref_rollout_steps", "ref_discriminator_kwargs"):
        assert getattr(loaded, name) == getattr(model, name), name
    saved, restored = model.reference_regularizer.occupancy, loaded.reference_regularizer.occupancy
    assert restored.measure == "state_action" and restored.rollout_every == 2
    for key, value in saved.discriminator.state_dict().items():
        assert th.equal(value, restored.discriminator.state_dict()[key]), key
    saved_opt, restored_opt = saved.discriminator.optimizer.state_dict(), restored.discriminator.optimizer.state_dict()
    assert saved_opt["param_groups"][0]["lr"] == restored_opt["param_groups"][0]["lr"] == 3e-3
    for index, state in saved_opt["state"].items():
        assert th.equal(state["exp_avg"], restored_opt["state"][index]["exp_avg"])
    loaded.learn(64)
    # loaded without an environment: the reference environment is built when training starts
    bare = PPO.load(tmp_path / "model.zip")
    assert bare.reference_regularizer.occupancy.rollouts.env is None
    bare.set_env(make_vec_env("CartPole-v1", n_envs=1))
    bare.learn(64)
    assert bare.reference_regularizer.occupancy.rollouts.env is not None


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(ref_measure="trajectory"), "ref_measure"),
        (dict(ref_regularizer="tv"), "only available for an occupancy measure"),
        (dict(ref_measure="state", ref_regularizer="odds_ratio_cap"), "ref_regularizer"),
        (dict(ref_measure="state", ref_placement="loss"), "ref_placement"),
        (dict(ref_measure="state", ref_estimator="k1"), "ref_estimator"),
        (dict(ref_measure="state", ref_coef=-1.0), "ref_coef"),
        (dict(ref_measure="state", ref_cap=0.5), "ref_cap"),
        (dict(ref_measure="state", ref_rollout_steps=0), "ref_rollout_steps"),
        (dict(ref_measure="state", ref_rollout_every=1.5), "ref_rollout_every"),
        (dict(ref_measure="state", ref_discriminator_kwargs={"width": 3}), "ref_discriminator_kwargs"),
        (dict(ref_measure="state", ref_discriminator_kwargs={"net_arch": [0]}), "net_arch"),
        (dict(ref_measure="state", ref_discriminator_kwargs={"n_epochs": 0}), "n_epochs"),
    ],
)
def test_bad_occupancy_options_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PPO("MlpPolicy", bandit(), n_steps=16, batch_size=16, ref_policy="initial", **kwargs)


def test_reference_env_in_other_spaces_is_refused():
    with pytest.raises(ValueError, match="ref_env"):
        A2C("MlpPolicy", bandit(), ref_policy="initial", ref_measure="state", ref_env=GoodhartBandit(n_arms=5, seed=0))
    model = A2C("MlpPolicy", bandit(), n_steps=8, ref_policy="initial", ref_measure="state", ref_env=bandit())
    model.learn(8)
    assert "pgvar/ref_occupancy_kl" in model.logger.name_to_value
