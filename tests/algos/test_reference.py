"""Regularization toward a frozen reference policy (``ref_*`` options, :mod:`pgvar.algos.reference`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

from pgvar import A2C, PPO, TRPO
from pgvar.algos.reference import ADAPTIVE_INITIAL_COEF, ReferenceRegularizer, exact_policy_divergence
from pgvar.problems import GoodhartBandit

pytestmark = pytest.mark.usefixtures("torch_single_thread")

N_ARMS = 4


def bandit() -> GoodhartBandit:
    return GoodhartBandit(n_arms=N_ARMS, error="gaussian", seed=3)


def policy_logits(model, observation=0) -> th.Tensor:
    """Normalized log-probabilities ``[K]`` of the model's policy at the bandit's single observation."""
    obs, _ = model.policy.obs_to_tensor(np.array([observation]))
    with th.no_grad():
        return model.policy.get_distribution(obs).distribution.logits[0].double()


def uniform_policy(model):
    """A copy of the model's policy whose logits are all 0 (the bandit's uniform reference)."""
    other = A2C("MlpPolicy", bandit(), seed=7)
    with th.no_grad():
        other.policy.action_net.weight.zero_()
        other.policy.action_net.bias.zero_()
    return other.policy


class RolloutCapture(BaseCallback):
    """Copies the buffer (after GAE) and the policy's logits at the end of each rollout."""

    def __init__(self) -> None:
        super().__init__()
        self.rollouts: list[dict[str, np.ndarray]] = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        buffer = self.model.rollout_buffer
        self.rollouts.append(
            {
                "rewards": buffer.rewards.copy(),
                "actions": buffer.actions.copy(),
                "log_probs": buffer.log_probs.copy(),
                "advantages": buffer.advantages.copy(),
                "logits": policy_logits(self.model).numpy(),
            }
        )


# ------------------------------------------------------------------------------------------ reward placement
def test_k1_reward_penalty_is_the_formula():
    """advantages = r - coef * (log pi(a) - log pi_ref(a)) on one-step episodes (baseline='none'), 2 envs."""
    coef, n_steps, n_envs = 0.7, 32, 2
    reference = A2C("MlpPolicy", bandit(), seed=1).policy
    env = make_vec_env(bandit, n_envs=n_envs, seed=0)
    model = A2C("MlpPolicy", env, n_steps=n_steps, seed=0, baseline="none", ref_policy=reference, ref_coef=coef)
    capture = RolloutCapture()
    model.learn(n_steps * n_envs, callback=capture)
    rollout = capture.rollouts[0]
    obs, _ = reference.obs_to_tensor(np.zeros(n_steps * n_envs, dtype=np.int64))
    with th.no_grad():
        ref_log_probs = reference.get_distribution(obs).log_prob(th.as_tensor(rollout["actions"]).long().flatten())
    k1 = rollout["log_probs"] - ref_log_probs.numpy().reshape(n_steps, n_envs)
    np.testing.assert_allclose(rollout["advantages"], rollout["rewards"] - coef * k1, rtol=1e-5, atol=1e-6)
    assert model.logger.name_to_value["pgvar/ref_coef"] == coef
    assert model.logger.name_to_value["pgvar/ref_kl"] == pytest.approx(float(k1.mean()), abs=1e-6)


def test_k1_reward_policy_gradient_is_unbiased_for_the_kl_regularized_objective():
    """The score-function gradient A2C forms from the penalized rewards, in logit space, averaged over a rollout,
    equals the exact gradient of E[r] - coef * KL(pi || pi_ref) within k standard errors."""
    coef, n = 0.5, 8_000
    model = A2C("MlpPolicy", bandit(), n_steps=n, seed=0, baseline="none", ref_coef=coef)
    # a policy away from the uniform reference, so that the KL term has a non-zero gradient
    with th.no_grad():
        model.policy.action_net.bias.copy_(th.tensor([1.5, -1.0, 0.5, 0.0]))
    model.ref_policy, model._ref_policy_source = "policy", uniform_policy(model)
    model._setup_reference()
    capture = RolloutCapture()
    model.learn(n, callback=capture)
    rollout = capture.rollouts[0]
    log_probs = th.as_tensor(rollout["logits"])
    probs = log_probs.exp()
    actions = th.as_tensor(rollout["actions"][:, 0]).long().flatten()
    advantages = th.as_tensor(rollout["advantages"][:, 0]).double()
    # per-sample d/dlogits of A * log pi(a) = A * (onehot(a) - pi)
    samples = advantages[:, None] * (th.nn.functional.one_hot(actions, N_ARMS).double() - probs)
    mean, stderr = samples.mean(0), samples.std(0) / math.sqrt(n)
    exact = bandit().exact_regularized_gradient({"logits": log_probs[None]}, coef=coef)["logits"][0]
    assert th.all((mean - exact).abs() <= 4.5 * stderr), (mean, exact, stderr)
    # and the penalty matters: without it the exact gradient is far off
    unregularized = bandit().exact_regularized_gradient({"logits": log_probs[None]}, coef=0.0)["logits"][0]
    assert th.any((mean - unregularized).abs() > 8 * stderr)


def test_coef_zero_trains_bitwise_like_no_reference():
    kwargs = dict(n_steps=32, batch_size=16, n_epochs=2, seed=0)
    plain = PPO("MlpPolicy", bandit(), **kwargs)
    plain.learn(128)
    off = PPO("MlpPolicy", bandit(), ref_policy="initial", ref_coef=0.0, **kwargs)
    off.learn(128)
    for (name, a), (_, b) in zip(plain.policy.state_dict().items(), off.policy.state_dict().items()):
        assert th.equal(a, b), name
    assert "pgvar/ref_kl" in off.logger.name_to_value


@pytest.mark.parametrize("placement", ["reward", "loss"])
def test_large_coefficient_stays_near_the_reference(placement):
    kwargs = dict(n_steps=64, batch_size=32, n_epochs=4, learning_rate=3e-3, seed=0)

    def final_kl(coef):
        model = PPO("MlpPolicy", bandit(), ref_policy="initial", ref_coef=coef, ref_placement=placement, **kwargs)
        start = policy_logits(model)
        model.learn(1024)
        end = policy_logits(model)
        return float((end.exp() * (end - start)).sum())

    free, held = final_kl(0.0), final_kl(20.0)
    assert free > 0.02
    assert held < free / 5


# ------------------------------------------------------------------------------------------ loss placement
@pytest.mark.parametrize(("regularizer", "estimator"), [("kl", "exact"), ("sqrt_chi2", "exact"), ("kl", "k3")])
def test_loss_term_adds_the_gradient_of_coef_times_the_mean_divergence(regularizer, estimator):
    model = PPO("MlpPolicy", bandit(), n_steps=16, batch_size=16, seed=0)
    policy = model.policy
    reference = uniform_policy(model)
    coef = 0.3
    regularizer_obj = ReferenceRegularizer(
        reference, regularizer=regularizer, coef=coef, adaptive_target=None, horizon=1.0, estimator=estimator,
        placement="loss", cap=2.0,
    )
    obs, _ = policy.obs_to_tensor(np.zeros(8, dtype=np.int64))
    actions = th.tensor([0, 1, 2, 3, 0, 1, 1, 2])
    advantages = th.linspace(-1.0, 1.0, 8)

    def grads(loss):
        policy.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in policy.parameters() if p.grad is not None]

    _, log_prob, _ = regularizer_obj.wrap_evaluate_actions(policy)(obs, actions)
    injected = grads(-(advantages * log_prob).mean())
    _, log_prob, _ = policy.evaluate_actions(obs, actions)
    if estimator == "k3":
        ref_log_prob = reference.get_distribution(obs).log_prob(actions).detach()
        term = (th.exp(ref_log_prob - log_prob) - 1 - (ref_log_prob - log_prob)).mean()
    else:
        term = exact_policy_divergence(
            policy.get_distribution(obs), reference.get_distribution(obs), regularizer, 2.0
        ).mean()
    direct = grads(-(advantages * log_prob).mean() + coef * term)
    for a, b in zip(injected, direct):
        th.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------ adaptive
def test_adaptive_coefficient_follows_the_controller_formula_and_moves_toward_the_target():
    target, horizon, n_steps = 0.5, 100, 20
    model = A2C(
        "MlpPolicy", bandit(), n_steps=n_steps, seed=0, ref_policy="initial", ref_coef="adaptive",
        ref_target=target, ref_horizon=horizon,
    )
    assert model.reference_regularizer.coef == ADAPTIVE_INITIAL_COEF
    model.learn(n_steps)
    kl = model.reference_regularizer.stats["kl"]
    error = float(np.clip(kl / target - 1, -0.2, 0.2))
    assert model.reference_regularizer.coef == pytest.approx(ADAPTIVE_INITIAL_COEF * (1 + error * n_steps / horizon))
    model.learn(10 * n_steps)  # the KL stays far below the target: the coefficient keeps falling
    assert model.reference_regularizer.coef < ADAPTIVE_INITIAL_COEF * 0.96**5  # at most -4% per rollout
    assert model.ref_coef_value == model.reference_regularizer.coef


def test_adaptive_coefficient_grows_when_the_divergence_exceeds_the_target():
    model = A2C(
        "MlpPolicy", bandit(), n_steps=20, seed=0, ref_policy="initial", ref_coef="adaptive", ref_target=1e-6,
        ref_horizon=100, ref_regularizer="odds_ratio_cap", ref_cap=1.0,
    )
    with th.no_grad():  # move away from the initial policy, so that the hinge is positive
        model.policy.action_net.bias.add_(th.tensor([3.0, 0.0, 0.0, 0.0]))
    model.learn(100)
    assert model.reference_regularizer.coef > ADAPTIVE_INITIAL_COEF


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(ref_coef=-0.1), "ref_coef"),
        (dict(ref_coef="auto"), "ref_coef"),
        (dict(ref_coef="adaptive"), "ref_target"),
        (dict(ref_coef=0.1, ref_target=1.0), "ref_target"),
        (dict(ref_regularizer="tv"), "ref_regularizer"),
        (dict(ref_placement="advantage"), "ref_placement"),
        (dict(ref_estimator="k2"), "ref_estimator"),
        (dict(ref_estimator="k3"), "ref_estimator"),
        (dict(ref_placement="loss", ref_estimator="k1"), "ref_estimator"),
        (dict(ref_placement="loss", ref_estimator="k3", ref_regularizer="chi2"), "ref_estimator"),
        (dict(ref_regularizer="sqrt_chi2"), "sqrt_chi2"),
        (dict(ref_regularizer="odds_ratio_cap", ref_cap=0.5), "ref_cap"),
        (dict(ref_horizon=0), "ref_horizon"),
    ],
)
def test_bad_options_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PPO("MlpPolicy", bandit(), n_steps=16, batch_size=16, ref_policy="initial", **kwargs)


def test_reference_in_other_spaces_is_refused():
    other = A2C("MlpPolicy", GoodhartBandit(n_arms=N_ARMS + 1, seed=0)).policy
    with pytest.raises(ValueError, match="action_space"):
        A2C("MlpPolicy", bandit(), ref_policy=other)
    with pytest.raises(ValueError, match="ref_policy"):
        A2C("MlpPolicy", bandit(), ref_policy=3.0)


def test_trpo_refuses_the_loss_placement_and_takes_the_reward_one():
    with pytest.raises(ValueError, match="ref_placement='loss'"):
        TRPO("MlpPolicy", bandit(), n_steps=16, batch_size=16, ref_policy="initial", ref_placement="loss")
    model = TRPO("MlpPolicy", bandit(), n_steps=16, batch_size=16, seed=0, ref_policy="initial")
    model.learn(32)
    assert "pgvar/ref_kl" in model.logger.name_to_value


def test_exact_estimator_refused_for_a_distribution_without_closed_form():
    with pytest.raises(ValueError, match="odds_ratio_cap"):
        PPO(
            "MlpPolicy", "Pendulum-v1", n_steps=16, batch_size=16, ref_policy="initial", ref_placement="loss",
            ref_regularizer="odds_ratio_cap",
        )


# ------------------------------------------------------------------------------------------ save / load
def test_save_load_round_trips_the_options_and_the_frozen_reference(tmp_path):
    reference = A2C("MlpPolicy", bandit(), seed=5).policy
    model = PPO(
        "MlpPolicy", bandit(), n_steps=16, batch_size=16, seed=0, ref_policy=reference, ref_coef="adaptive",
        ref_target=0.3, ref_placement="loss", ref_regularizer="chi2",
    )
    model.learn(32)
    model.save(tmp_path / "model.zip")
    loaded = PPO.load(tmp_path / "model.zip", env=bandit())
    for name in ("ref_policy", "ref_regularizer", "ref_coef", "ref_target", "ref_placement", "ref_estimator"):
        assert getattr(loaded, name) == getattr(model, name), name
    assert loaded.reference_regularizer.coef == model.reference_regularizer.coef
    saved = model.reference_regularizer.reference.state_dict()
    restored = loaded.reference_regularizer.reference.state_dict()
    assert saved.keys() == restored.keys()
    for key in saved:
        assert th.equal(saved[key], restored[key]), key
    assert not any(p.requires_grad for p in loaded.reference_regularizer.reference.parameters())
    # the reference is not the trained policy, and loading did not replace it by the loaded policy
    assert not th.equal(restored["action_net.weight"], loaded.policy.state_dict()["action_net.weight"])
    loaded.learn(16)


def test_path_reference_and_initial_reference_after_load(tmp_path):
    source = A2C("MlpPolicy", bandit(), seed=2)
    source.save(tmp_path / "ref.zip")
    model = A2C("MlpPolicy", bandit(), seed=0, ref_policy=str(tmp_path / "ref.zip"))
    for a, b in zip(source.policy.parameters(), model.reference_regularizer.reference.parameters()):
        assert th.equal(a, b)
    initial = A2C("MlpPolicy", bandit(), n_steps=8, seed=0, ref_policy="initial", learning_rate=0.1)
    start = {k: v.clone() for k, v in initial.policy.state_dict().items()}
    initial.learn(64)
    initial.save(tmp_path / "initial.zip")
    loaded = A2C.load(tmp_path / "initial.zip")
    for key, value in loaded.reference_regularizer.reference.state_dict().items():
        assert th.equal(value, start[key]), key


@pytest.mark.parametrize("regularizer", ["kl", "sqrt_chi2"])
def test_exact_loss_term_on_a_diagonal_gaussian_policy(regularizer):
    model = PPO(
        "MlpPolicy", "Pendulum-v1", n_steps=32, batch_size=16, n_epochs=2, seed=0, ref_policy="initial",
        ref_placement="loss", ref_regularizer=regularizer, ref_coef=1.0,
    )
    model.learn(64)
    value = model.logger.name_to_value[f"pgvar/ref_{regularizer}"]
    assert math.isfinite(value) and value >= 0
    assert all(th.isfinite(p).all() for p in model.policy.parameters())


# ------------------------------------------------------------------------------------------ Q-Prop classes
def _qprop(cls, env=None, **kwargs):
    from pgvar import QPropPPO

    options = dict(n_steps=32, seed=0, qprop_warmup_steps=16, qprop_buffer_size=1000, batch_size=16)
    if cls is QPropPPO:
        options["n_epochs"] = 2
    return cls("MlpPolicy", bandit() if env is None else env, **{**options, **kwargs})


@pytest.mark.parametrize("measure", ["action", "state_action"])
@pytest.mark.parametrize("cls_name", ["QPropPPO", "QPropTRPO"])
def test_qprop_reward_penalty_reaches_the_rollout_and_the_critic_replay(cls_name, measure):
    """The buffer's advantages see r - penalty, and so do the critic's replay rewards of the same transitions."""
    import pgvar

    coef = 0.7
    model = _qprop(
        getattr(pgvar, cls_name), ref_policy="initial", ref_coef=coef, ref_measure=measure, baseline="none",
        normalize_advantage=False, qprop_warmup_steps=10_000,  # no critic update: the signal is A-hat itself
    )
    capture = RolloutCapture()
    model.learn(64, callback=capture)
    regularizer = model.reference_regularizer
    penalty = regularizer.last_penalty.numpy()
    assert np.abs(penalty).max() > 0
    rollout = capture.rollouts[-1]
    np.testing.assert_allclose(rollout["advantages"], rollout["rewards"] - penalty, rtol=1e-5, atol=1e-6)
    replay = model.qprop_critic.replay_buffer
    np.testing.assert_allclose(replay.rewards[32:64], rollout["rewards"] - penalty, rtol=1e-5, atol=1e-6)
    key = "pgvar/ref_kl" if measure == "action" else "pgvar/ref_occupancy_kl"
    assert key in model.logger.name_to_value
    assert model.logger.name_to_value["pgvar/ref_coef"] == coef


def test_qprop_without_reference_keeps_the_environment_rewards_in_the_replay():
    from pgvar import QPropPPO

    model = _qprop(QPropPPO)
    capture = RolloutCapture()
    model.learn(32, callback=capture)
    np.testing.assert_array_equal(model.qprop_critic.replay_buffer.rewards[:32], capture.rollouts[0]["rewards"])


def test_qprop_ppo_loss_placement_and_save_load(tmp_path):
    from pgvar import QPropPPO, QPropTRPO

    model = _qprop(QPropPPO, ref_policy="initial", ref_placement="loss", ref_regularizer="chi2", ref_coef=20.0,
                   learning_rate=3e-3)  # fmt: skip
    start = policy_logits(model)
    capture = RolloutCapture()
    model.learn(128, callback=capture)
    assert "pgvar/ref_chi2" in model.logger.name_to_value
    assert model.reference_regularizer.last_penalty is None  # nothing in the rewards, nor in the replay
    np.testing.assert_array_equal(model.qprop_critic.replay_buffer.rewards[96:128], capture.rollouts[-1]["rewards"])
    free = _qprop(QPropPPO, learning_rate=3e-3)
    free.learn(128)

    def kl_from_start(m):
        end = policy_logits(m)
        return float((end.exp() * (end - start)).sum())

    assert kl_from_start(model) < kl_from_start(free) / 2
    model.save(tmp_path / "qprop.zip")
    loaded = QPropPPO.load(tmp_path / "qprop.zip", env=bandit())
    for name in ("ref_policy", "ref_regularizer", "ref_coef", "ref_placement", "ref_estimator", "ref_measure"):
        assert getattr(loaded, name) == getattr(model, name), name
    for key, value in model.reference_regularizer.reference.state_dict().items():
        assert th.equal(value, loaded.reference_regularizer.reference.state_dict()[key]), key
    loaded.learn(32)
    with pytest.raises(ValueError, match="ref_placement='loss'"):
        _qprop(QPropTRPO, ref_policy="initial", ref_placement="loss")
    with pytest.raises(TypeError, match="ref_polcy"):
        _qprop(QPropTRPO, ref_polcy="initial")
    with pytest.raises(ValueError, match="action_space"):
        _qprop(QPropTRPO, ref_policy=A2C("MlpPolicy", GoodhartBandit(n_arms=N_ARMS + 1, seed=0)).policy)
