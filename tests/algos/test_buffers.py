"""Returns and advantages inside a real learn(): every baseline x normalization against a plain-loop reference
built from the RAW environment data (raw rewards, terminations, truncations and the final observations' values),
not from SB3's folded storage, so the storage-convention conversion is tested too (SB3's test_gae.py pattern).

For ``baseline="horizon"`` the reference also counts each environment's in-episode step ``t`` itself and evaluates
the horizon-aware value ``V0(s) + (1 - gamma^(T - t)) / (1 - gamma) r_bar(s)`` row by row from the two heads; the
end at the time limit ``T`` is a termination."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback

from pgvar._sb3_policy import is_actor_parameter
from pgvar.algos import A2C, BASELINES, PPO, TRPO, EstimatorRolloutBuffer

pytestmark = [
    pytest.mark.usefixtures("torch_single_thread"),
    # Constant baselines with normalization are legitimate (if redundant) combinations to exercise here.
    pytest.mark.filterwarnings("ignore:baseline=.* is the same estimator as baseline='none'"),
]


class RawRolloutRecorder(BaseCallback):
    """Records the raw transitions of each rollout and checks the buffer against a loop reference at its end."""

    def __init__(self) -> None:
        super().__init__()
        self.checked_rollouts = 0
        self.last_reference_baseline: float | None = None

    def _on_training_start(self) -> None:
        self.counts = np.zeros(self.model.n_envs, dtype=np.int64)  # in-episode step index (baseline="horizon")

    def _on_rollout_start(self) -> None:
        self.raw_rewards, self.terminated, self.truncated, self.final_values = [], [], [], []
        self.timesteps, self.observations = [], []

    def value(self, observation, t: int | None) -> float:
        """V(s) of one observation through SB3's predict_values, or for baseline="horizon" the loop reference
        V0(s) + (1 - gamma^(T - t)) / (1 - gamma) r_bar(s) from the two heads."""
        policy = self.model.policy
        obs = policy.obs_to_tensor(observation)[0]
        with torch.no_grad():
            if t is None:
                return float(policy.predict_values(obs))
            latent = policy.mlp_extractor.forward_critic(policy.extract_features(obs, policy.vf_features_extractor))
            v0, r_bar = float(policy.value_net.v0(latent)), float(policy.value_net.r_bar(latent))
        gamma, horizon = self.model.gamma, self.model.horizon_time_limit
        factor = (1 - gamma ** (horizon - t)) / (1 - gamma) if gamma < 1 else horizon - t
        return v0 + factor * r_bar

    def _on_step(self) -> bool:
        # on_step runs before SB3 adds gamma * V(final obs) to the rewards array in place: copy it now.
        rewards, dones, infos = self.locals["rewards"], self.locals["dones"], self.locals["infos"]
        horizon = self.model.baseline == "horizon"
        self.raw_rewards.append(np.array(rewards, dtype=np.float64))
        truncated = np.array([bool(d and info.get("TimeLimit.truncated", False)) for d, info in zip(dones, infos)])
        at_horizon = self.counts + 1 == self.model.horizon_time_limit if horizon else np.zeros_like(truncated)
        self.truncated.append(truncated & ~at_horizon)
        self.terminated.append((np.asarray(dones, dtype=bool) & ~truncated) | at_horizon)
        self.timesteps.append(self.counts.copy())
        self.observations.append(self.locals["obs_tensor"].cpu().numpy().copy())
        final_values = np.zeros(len(dones))
        for i, info in enumerate(infos):
            if truncated[i] and not at_horizon[i]:
                final_values[i] = self.value(info["terminal_observation"], self.counts[i] + 1 if horizon else None)
        self.final_values.append(final_values)
        self.counts = np.where(dones, 0, self.counts + 1)
        return True

    def _on_rollout_end(self) -> None:
        model, buffer = self.model, self.model.rollout_buffer
        rewards, term, trunc = np.array(self.raw_rewards), np.array(self.terminated), np.array(self.truncated)
        final_values, values = np.array(self.final_values), buffer.values.astype(np.float64)
        if model.baseline == "horizon":  # the buffer's values and t against the loop reference
            timesteps, observations = np.array(self.timesteps), self.observations
            np.testing.assert_array_equal(buffer.timesteps, timesteps)
            np.testing.assert_array_equal(model._horizon_timesteps, self.counts)
            reference = [[self.value(obs[i], t[i]) for i in range(len(t))] for obs, t in zip(observations, timesteps)]
            np.testing.assert_allclose(values, reference, rtol=1e-5, atol=1e-5)
            new_obs = self.locals["new_obs"]
            last_values = np.array([self.value(new_obs[i], self.counts[i]) for i in range(len(self.counts))])
        else:
            last_values = self.locals["values"].detach().cpu().numpy().astype(np.float64).reshape(-1)
        gamma, lam = model.gamma, model.gae_lambda
        steps, n_envs = rewards.shape

        pg_returns, gae = np.zeros((steps, n_envs)), np.zeros((steps, n_envs))
        for i in range(n_envs):
            for t in reversed(range(steps)):
                if term[t, i]:
                    next_value, next_return, next_gae = 0.0, 0.0, 0.0
                elif trunc[t, i]:
                    next_value, next_return, next_gae = final_values[t, i], final_values[t, i], 0.0
                elif t == steps - 1:
                    next_value, next_return, next_gae = last_values[i], last_values[i], 0.0
                else:
                    next_value, next_return, next_gae = values[t + 1, i], pg_returns[t + 1, i], gae[t + 1, i]
                pg_returns[t, i] = rewards[t, i] + gamma * next_return
                gae[t, i] = rewards[t, i] + gamma * next_value - values[t, i] + gamma * lam * next_gae

        np.testing.assert_allclose(buffer.returns, gae + values, rtol=1e-5, atol=1e-5)  # value targets: TD(lambda)
        if model.baseline in ("value", "horizon"):
            advantages, baseline = gae, None
        else:
            if model.baseline == "optimal":
                sq_norms = score_sq_norms_by_loop(model)
                baseline = (sq_norms * pg_returns).sum() / sq_norms.sum()
                self.last_sq_norms = sq_norms
            else:
                baseline = 0.0 if model.baseline == "none" else pg_returns.mean()
            advantages = pg_returns - baseline
        if model.advantage_normalization == "batch":
            advantages = (advantages - advantages.mean()) / (advantages.std(ddof=1) + 1e-8)
        np.testing.assert_allclose(buffer.advantages, advantages, rtol=1e-4, atol=1e-4)
        self.last_reference_baseline = baseline
        self.last_pg_returns = pg_returns
        self.checked_rollouts += 1


def score_sq_norms_by_loop(model) -> np.ndarray:
    """||grad_theta log pi(a|s)||^2 over the actor's parameters, one backward per sample."""
    buffer, policy = model.rollout_buffer, model.policy
    steps, n_envs = buffer.actions.shape[:2]
    out = np.zeros((steps, n_envs))
    for t in range(steps):
        for i in range(n_envs):
            obs = torch.as_tensor(buffer.observations[t, i : i + 1])
            action = torch.as_tensor(buffer.actions[t, i : i + 1]).float()
            if isinstance(model.action_space, spaces.Discrete):
                action = action.long().flatten()
            policy.zero_grad()
            policy.get_distribution(obs).log_prob(action).sum().backward()
            out[t, i] = sum(
                float(p.grad.double().square().sum())
                for name, p in policy.named_parameters()
                if is_actor_parameter(name) and p.grad is not None
            )
    policy.zero_grad()
    return out


def learn_and_check(algo_class, env, **kwargs):
    model = algo_class("MlpPolicy", env, seed=1, policy_kwargs={"net_arch": [16]}, **kwargs)
    recorder = RawRolloutRecorder()
    model.learn(2 * model.n_steps * env.num_envs, callback=recorder)
    assert recorder.checked_rollouts == 2
    return model, recorder


@pytest.mark.parametrize("normalize_advantage", ["none", "batch"])
@pytest.mark.parametrize("baseline", BASELINES)
def test_every_baseline_matches_the_loop_reference(make_short_env, baseline, normalize_advantage):
    env = make_short_env("CartPole-v1", 2, 12)
    model, recorder = learn_and_check(
        PPO, env, n_steps=24, batch_size=16, n_epochs=1, baseline=baseline, normalize_advantage=normalize_advantage
    )
    assert isinstance(model.rollout_buffer, EstimatorRolloutBuffer)
    # "batch" is done once in the buffer, so SB3's per-minibatch normalization in train() is off.
    assert model.normalize_advantage is False
    if baseline in ("value", "horizon"):
        assert "pgvar/constant_baseline" not in model.logger.name_to_value
    else:
        assert model.logger.name_to_value["pgvar/constant_baseline"] == pytest.approx(
            recorder.last_reference_baseline, rel=1e-4, abs=1e-4
        )


@pytest.mark.parametrize("algo_class", [A2C, TRPO])
@pytest.mark.parametrize("baseline", BASELINES)
def test_continuous_actions_and_other_algorithms(make_short_env, algo_class, baseline):
    """Gaussian policy (log_std needs the per-sample route of the score norms), A2C's lambda = 1, TRPO."""
    env = make_short_env("Pendulum-v1", 2, 10)
    extra = {"batch_size": 16, "n_critic_updates": 1, "cg_max_steps": 3} if algo_class is TRPO else {}
    learn_and_check(algo_class, env, n_steps=16, gamma=0.9, baseline=baseline, **extra)


def test_optimal_baseline_with_discrete_observations(make_short_env):
    """One-hot observations (FrozenLake): the preprocessing runs outside the differentiated function."""
    env = make_short_env("FrozenLake-v1", 2, 8)
    learn_and_check(A2C, env, n_steps=16, baseline="optimal")


def test_optimal_baseline_with_state_dependent_exploration(make_short_env):
    """gSDE: the policy's variance depends on the state features and on a log_std matrix."""
    env = make_short_env("Pendulum-v1", 2, 10)
    learn_and_check(PPO, env, n_steps=16, batch_size=16, n_epochs=1, use_sde=True, baseline="optimal")


def test_optimal_baseline_minimizes_the_gradient_variance_among_constants(make_short_env):
    """b* = E[||g||^2 G] / E[||g||^2] is the argmin of sum_i ||g_i (G_i - b)||^2 over constants b: moving the
    buffer's b in either direction increases it (an independent check of the value the buffer used)."""
    env = make_short_env("CartPole-v1", 2, 12)
    model, recorder = learn_and_check(PPO, env, n_steps=24, batch_size=16, n_epochs=1, baseline="optimal")
    sq_norms, pg_returns = recorder.last_sq_norms, recorder.last_pg_returns
    b_buffer = model.rollout_buffer.constant_baseline

    def second_moment(b: float) -> float:
        return float((sq_norms * (pg_returns - b) ** 2).sum())

    for delta in (-1.0, -0.01, 0.01, 1.0):
        assert second_moment(b_buffer) < second_moment(b_buffer + delta)
    # and it is not just any value: it differs from the plain mean return here
    assert abs(b_buffer - pg_returns.mean()) > 1e-3


def test_non_finite_reward_names_the_env_and_the_step(make_short_env):
    import gymnasium as gym

    class NanRewardAtStep(gym.Wrapper):
        def __init__(self, env, step):
            super().__init__(env)
            self.bad_step, self.count = step, 0

        def step(self, action):
            obs, reward, terminated, truncated, info = self.env.step(action)
            self.count += 1
            return obs, (float("nan") if self.count == self.bad_step else reward), terminated, truncated, info

    from stable_baselines3.common.vec_env import DummyVecEnv

    env = DummyVecEnv(
        [lambda: gym.make("CartPole-v1")] * 2 + [lambda: NanRewardAtStep(gym.make("CartPole-v1"), 6)]
    )
    model = A2C("MlpPolicy", env, n_steps=8, seed=0, policy_kwargs={"net_arch": [8]})
    with pytest.raises(ValueError, match=r"env 2 returned a non-finite reward \(nan\) at step 5 of the rollout"):
        model.learn(64)


def test_standalone_buffer_needs_a_score_function_for_the_optimal_baseline():
    buffer = EstimatorRolloutBuffer(
        4, spaces.Box(-1, 1, (3,)), spaces.Discrete(2), device="cpu", n_envs=1, baseline="optimal"
    )
    buffer.full = True
    with pytest.raises(ValueError, match="score_sq_norms_fn"):
        buffer.compute_returns_and_advantage(torch.zeros(1), np.zeros(1, dtype=bool))
    with pytest.raises(ValueError, match="baseline must be one of"):
        EstimatorRolloutBuffer(4, spaces.Box(-1, 1, (3,)), spaces.Discrete(2), baseline="median")


@pytest.mark.parametrize("algo_class", [PPO, A2C, TRPO])
def test_horizon_value_bootstraps_a_truncation_before_the_horizon(make_short_env, algo_class):
    """horizon_time_limit above the env's own limit: its cuts are truncations before T, bootstrapped from
    V(s', t + 1) of the final observation (checked by the loop reference), not terminations."""
    env = make_short_env("Pendulum-v1", 2, 10)
    extra = {"batch_size": 16, "n_critic_updates": 1, "cg_max_steps": 3} if algo_class is TRPO else {}
    model, _ = learn_and_check(
        algo_class, env, n_steps=16, gamma=0.9, baseline="horizon", horizon_time_limit=13, **extra
    )
    assert model.horizon_time_limit == 13
    assert model.rollout_buffer.final_observations  # the last rollout had cuts before the horizon
