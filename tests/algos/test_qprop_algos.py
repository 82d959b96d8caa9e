"""QPropPPO and QPropTRPO: smoke training, parity with the plain algorithms when eta = 0, the critic's replay data
and TD targets, the control variate and the analytic term against independent computations, the two
normalizations, save/load/resume, bad input."""

from __future__ import annotations

import copy
import math
import zipfile

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import ReplayBufferSamples
from stable_baselines3.common.vec_env import VecNormalize

from pgvar.algos import PPO, TRPO, QPropDictRolloutBuffer, QPropRolloutBuffer
from pgvar.algos._critic_step import td_targets
from pgvar.algos.qprop import QPropPPO, QPropTRPO

pytestmark = pytest.mark.usefixtures("torch_single_thread")

N_STEPS = 64
POLICY = {"policy_kwargs": {"net_arch": [16]}}
ALGO_SETTINGS = {
    QPropPPO: {"batch_size": 32, "n_epochs": 2},
    QPropTRPO: {"batch_size": 32, "n_critic_updates": 2, "cg_max_steps": 5},
}
PLAIN_OF = {QPropPPO: PPO, QPropTRPO: TRPO}
# A small critic that starts training after the first rollout, so the control variate is on from the second.
QPROP_SMALL = {"qprop_critic_net_arch": [16, 16], "qprop_warmup_steps": N_STEPS, "qprop_buffer_size": 5_000}


def make_model(cls, env, *, seed: int = 0, policy: str = "MlpPolicy", **kwargs):
    settings = {"n_steps": N_STEPS, "seed": seed, **POLICY, **ALGO_SETTINGS[cls], **QPROP_SMALL}
    settings.update(kwargs)
    return cls(policy, env, **settings)


class TransitionRecorder(gym.Wrapper):
    """Records (obs, action sent to the env, reward, next obs, terminated, truncated) of every step."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.transitions: list[tuple] = []
        self._obs = None

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._obs = obs
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.transitions.append((self._obs, np.array(action), float(reward), obs, terminated, truncated))
        self._obs = obs
        return obs, reward, terminated, truncated, info


def recorded_env(env_id: str, n_envs: int, max_episode_steps: int):
    return make_vec_env(
        env_id, n_envs=n_envs, seed=1, env_kwargs={"max_episode_steps": max_episode_steps},
        wrapper_class=TransitionRecorder,
    )  # fmt: skip


def zero_critic_frozen(model) -> None:
    """Q_w = 0 everywhere, and it stays 0 (Adam with learning rate 0): grad_a Q = 0, so A_bar = 0 and the
    analytic term has zero gradient. The critic still trains (draws from the replay buffer every iteration)."""
    with torch.no_grad():
        for param in model.critic.parameters():
            param.zero_()
    model.critic_target.load_state_dict(model.critic.state_dict())
    model.qprop_critic_learning_rate = 0.0  # (the optimizer's group takes it at every critic step)


def assert_same_training(reference, model) -> None:
    ref_state, state = reference.policy.state_dict(), model.policy.state_dict()
    assert list(ref_state) == list(state)
    for name in ref_state:
        assert torch.equal(ref_state[name], state[name]), f"policy parameter {name} differs"
    for ref_group, group in zip(
        reference.policy.optimizer.state_dict()["state"].values(), model.policy.optimizer.state_dict()["state"].values()
    ):
        for key in ref_group:
            assert torch.equal(torch.as_tensor(ref_group[key]), torch.as_tensor(group[key]))
    assert (reference.num_timesteps, reference._n_updates) == (model.num_timesteps, model._n_updates)


# ----------------------------------------------------------------------------------------------------- smoke
@pytest.mark.parametrize(
    ("cls", "env_id", "options"),
    [
        (QPropPPO, "Pendulum-v1", {}),
        (QPropTRPO, "Pendulum-v1", {"qprop_eta_scope": "sample", "qprop_normalization": "as_published"}),
        (QPropPPO, "HalfCheetah-v5", {"qprop_eta": "fixed"}),
        (QPropTRPO, "HalfCheetah-v5", {"qprop_eta": "adaptive", "normalize_advantage": "batch"}),
        (QPropPPO, "CartPole-v1", {"qprop_eta": "fixed"}),
        (QPropTRPO, "CartPole-v1", {"qprop_eta": "aggressive", "qprop_eta_scope": "sample"}),
    ],
)
def test_trains_uses_the_control_variate_and_logs(cls, env_id, options):
    model = make_model(cls, make_vec_env(env_id, n_envs=2, seed=0), **options)
    assert isinstance(model.rollout_buffer, QPropRolloutBuffer)
    n_rollouts = 4
    model.learn(n_rollouts * N_STEPS * 2)
    # The replay holds every step; the critic trained once per collected step from the first rollout on.
    assert model.replay_buffer.size() * model.replay_buffer.n_envs == n_rollouts * N_STEPS * 2
    assert model.critic_n_updates == n_rollouts * N_STEPS * 2
    logged = model.logger.name_to_value
    for key in ("pgvar/qprop_eta_mean", "pgvar/signal_var_before", "pgvar/signal_var_after",
                "pgvar/qprop_critic_loss", "pgvar/qprop_critic_explained_variance"):  # fmt: skip
        assert key in logged and math.isfinite(logged[key]), key
    if options.get("qprop_eta") == "fixed":
        assert logged["pgvar/qprop_eta_mean"] == 1.0
        assert logged["pgvar/signal_var_after"] != logged["pgvar/signal_var_before"]
    for param in model.policy.parameters():
        assert torch.isfinite(param).all()
    obs = model.get_env().reset()
    model.predict(obs, deterministic=True)


def test_dict_observations_use_the_dict_buffers(make_short_env):
    model = make_model(QPropPPO, make_short_env("Pendulum-v1", 2, 10, dict_obs=True), qprop_eta="fixed",
                       policy="MultiInputPolicy")  # fmt: skip
    assert isinstance(model.rollout_buffer, QPropDictRolloutBuffer)
    model.learn(3 * N_STEPS * 2)
    assert model.critic_n_updates > 0
    assert set(model.replay_buffer.observations) == {"head", "tail"}
    assert math.isfinite(model.logger.name_to_value["pgvar/qprop_critic_loss"])


# ---------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize(
    ("cls", "env_id", "kwargs"),
    [
        (QPropPPO, "Pendulum-v1", {}),
        (QPropPPO, "CartPole-v1", {"normalize_advantage": "batch"}),
        (QPropTRPO, "Pendulum-v1", {}),
        (QPropTRPO, "CartPole-v1", {"normalize_advantage": False}),
    ],
)
def test_with_eta_times_critic_zero_the_update_is_the_plain_algorithms(make_short_env, cls, env_id, kwargs):
    """A zero critic (kept at zero) with eta = 1: A_bar = 0 and the analytic term's gradient is exactly 0, so
    QPropPPO / QPropTRPO must train bit for bit like pgvar.PPO / pgvar.TRPO, while the critic machinery (replay
    feed, critic steps on its own random streams, analytic term in every minibatch) runs."""
    limit = 12 if env_id == "CartPole-v1" else 10
    settings = {"n_steps": 32, "seed": 3, **POLICY, **{k: v for k, v in ALGO_SETTINGS[cls].items()}, **kwargs}
    reference = PLAIN_OF[cls]("MlpPolicy", make_short_env(env_id, 2, limit), **settings)
    reference.learn(4 * 32 * 2)  # (build and train one model at a time: both draw from the global seeded streams)
    model = cls(
        "MlpPolicy", make_short_env(env_id, 2, limit), **settings,
        qprop_eta="fixed", qprop_critic_net_arch=[8], qprop_warmup_steps=32,
    )  # fmt: skip
    zero_critic_frozen(model)
    calls = []
    original = model._qprop_correction

    def counting_correction(*args, **kw):
        result = original(*args, **kw)
        calls.append(result is not None)
        return result

    model._qprop_correction = counting_correction
    model.learn(4 * 32 * 2)
    assert model.critic_n_updates == 4 * 32 * 2 and any(calls)  # the Q-Prop path really ran
    assert model.logger.name_to_value["pgvar/qprop_eta_mean"] == 1.0
    assert_same_training(reference, model)


def test_before_the_warmup_it_is_the_plain_algorithm(make_short_env):
    reference = PPO("MlpPolicy", make_short_env("Pendulum-v1", 2, 10), n_steps=32, seed=5, **POLICY,
                    **ALGO_SETTINGS[QPropPPO])  # fmt: skip
    reference.learn(3 * 64)
    model = QPropPPO("MlpPolicy", make_short_env("Pendulum-v1", 2, 10), n_steps=32, seed=5, **POLICY,
                     **ALGO_SETTINGS[QPropPPO], qprop_eta="fixed", qprop_warmup_steps=10_000)  # fmt: skip
    model.learn(3 * 64)
    assert model.critic_n_updates == 0
    assert model.logger.name_to_value["pgvar/qprop_eta_mean"] == 0.0
    assert_same_training(reference, model)


# ------------------------------------------------------------------------------------ replay data, TD targets
@pytest.mark.parametrize(("env_id", "limit", "vec_normalize"), [("Pendulum-v1", 5, False), ("CartPole-v1", 12, False),
                                                                 ("Pendulum-v1", 7, True)])  # fmt: skip
def test_replay_has_raw_rewards_true_next_observations_and_truncation_flags(env_id, limit, vec_normalize):
    venv = recorded_env(env_id, 2, limit)
    # clip_obs large: the final observation comes back through unnormalize_obs, exact only without clipping
    env = VecNormalize(venv, gamma=0.99, clip_obs=1e6) if vec_normalize else venv
    model = make_model(QPropPPO, env, n_steps=32, qprop_warmup_steps=10_000)
    model.learn(32 * 2)
    replay, rollout = model.replay_buffer, model.rollout_buffer
    assert replay.pos == 32
    records = venv.get_attr("transitions")
    n_truncated = n_terminated = 0
    for env_index in range(2):
        assert len(records[env_index]) == 32
        for step, (obs, action, reward, next_obs, terminated, truncated) in enumerate(records[env_index]):
            np.testing.assert_allclose(replay.observations[step, env_index], obs, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(replay.next_observations[step, env_index], next_obs, rtol=1e-5, atol=1e-5)
            assert replay.rewards[step, env_index] == np.float32(reward)  # the environment's reward, unnormalized
            assert replay.dones[step, env_index] == float(terminated or truncated)
            assert replay.timeouts[step, env_index] == float(truncated and not terminated)
            stored_action = replay.actions[step, env_index]
            if env_id == "Pendulum-v1":  # the unclipped Gaussian sample; the env got it clipped
                np.testing.assert_allclose(np.clip(stored_action, -2.0, 2.0), action, rtol=1e-6)
            else:
                assert stored_action[0] == action
            n_truncated += truncated and not terminated
            n_terminated += terminated
            if truncated and not terminated and not vec_normalize:
                # SB3's rollout buffer has r + gamma * V(final obs) here; the critic must not train on that.
                assert rollout.rewards[step, env_index] != replay.rewards[step, env_index]
    assert n_truncated > 0
    if env_id == "CartPole-v1":
        assert n_terminated > 0

    # TD targets of every stored transition against a hand computation.
    rows = slice(0, 32)
    samples = ReplayBufferSamples(
        *(replay.to_torch(a) for a in (
            replay.observations[rows].reshape(64, -1), replay.actions[rows].reshape(64, -1),
            replay.next_observations[rows].reshape(64, -1),
            (replay.dones[rows] * (1 - replay.timeouts[rows])).reshape(64, 1), replay.rewards[rows].reshape(64, 1),
        ))
    )  # fmt: skip
    if vec_normalize:  # the critic sees what the policy sees: VecNormalize-d observations and rewards
        return
    with torch.no_grad():
        distribution = model.policy.get_distribution(samples.next_observations).distribution
        discounts = model.gamma * (1 - samples.dones)
        if env_id == "Pendulum-v1":
            next_q = model.critic_target(samples.next_observations, distribution.mean)[0]
            targets = td_targets(samples.rewards, discounts, next_q)
        else:
            all_q = model.critic_target(samples.next_observations)
            targets = td_targets(samples.rewards, discounts, all_q, distribution.probs)
            next_q = (distribution.probs * all_q).sum(1, keepdim=True)
    terminated = torch.tensor([r[4] for env_records in zip(*records) for r in env_records], dtype=torch.float32)
    rewards = torch.tensor([r[2] for env_records in zip(*records) for r in env_records], dtype=torch.float32)
    expected = rewards + 0.99 * (1 - terminated) * next_q.flatten()
    torch.testing.assert_close(targets.flatten(), expected)
    truncated = torch.tensor([r[5] and not r[4] for env_records in zip(*records) for r in env_records])
    assert (targets.flatten()[truncated] != rewards[truncated]).all()  # truncations bootstrap
    assert torch.equal(targets.flatten()[terminated.bool()], rewards[terminated.bool()])  # terminations do not


class LearnedFeatures(BaseFeaturesExtractor):
    """A features extractor with parameters: the critic then trains it and recomputes features every step."""

    def __init__(self, observation_space: gym.spaces.Box, features_dim: int = 8) -> None:
        super().__init__(observation_space, features_dim)
        self.linear = torch.nn.Linear(int(np.prod(observation_space.shape)), features_dim)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(observations.flatten(1)))


@pytest.mark.parametrize(
    ("env_id", "features"), [("Pendulum-v1", "flatten"), ("Pendulum-v1", "learned"), ("CartPole-v1", "flatten")]
)
def test_one_critic_step_is_adam_on_the_td_error_then_polyak(make_short_env, env_id, features):
    policy_kwargs = {"net_arch": [16]}
    if features == "learned":
        policy_kwargs["features_extractor_class"] = LearnedFeatures
    model = make_model(QPropTRPO, make_short_env(env_id, 2, 10), qprop_critic_tau=0.25, qprop_critic_batch_size=16,
                       policy_kwargs=policy_kwargs)  # fmt: skip
    assert model.qprop_critic.features_are_fixed is (features == "flatten")
    assert model.qprop_critic.by_hand is (features == "flatten")
    model.learn(2 * N_STEPS * 2)
    model.qprop_critic_updates_per_step = 1 / (N_STEPS * 2)  # exactly one TD step
    critic, target = copy.deepcopy(model.critic), copy.deepcopy(model.critic_target)
    optimizer = torch.optim.Adam(critic.parameters(), lr=model.qprop_critic_learning_rate)
    optimizer.load_state_dict(copy.deepcopy(model.critic.optimizer.state_dict()))  # (state tensors are shared)
    random_state = copy.deepcopy(model.qprop_critic.random_state)
    global_state = np.random.get_state()  # noqa: NPY002 (SB3's buffers draw from the legacy global state)
    model._train_critic()
    assert np.random.get_state()[1].tolist() == global_state[1].tolist()  # SB3's stream is untouched  # noqa: NPY002
    # Reference: the same draw (same private stream), plain forward passes, TD target by hand.
    saved = np.random.get_state()  # noqa: NPY002 (SB3's buffers draw from the legacy global state)
    np.random.set_state(random_state)  # noqa: NPY002 (SB3's buffers draw from the legacy global state)
    samples = model.replay_buffer.sample(16)
    np.random.set_state(saved)  # noqa: NPY002 (SB3's buffers draw from the legacy global state)
    with torch.no_grad():
        distribution = model.policy.get_distribution(samples.next_observations).distribution
        if env_id == "CartPole-v1":
            next_q = (distribution.probs * target(samples.next_observations)).sum(1, keepdim=True)
        else:
            next_q = target(samples.next_observations, distribution.mean)[0]
        y = samples.rewards + 0.99 * (1 - samples.dones) * next_q
    if env_id == "CartPole-v1":
        q = critic(samples.observations).gather(1, samples.actions.long())
    else:
        q = critic(samples.observations, samples.actions)[0]
    loss = ((q - y) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        for param, target_param in zip(critic.parameters(), target.parameters()):
            target_param.mul_(0.75).add_(0.25 * param)
    for name, value in critic.state_dict().items():
        torch.testing.assert_close(model.critic.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    for name, value in target.state_dict().items():
        torch.testing.assert_close(model.critic_target.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    if features == "learned":  # the critic's own features extractor is trained by the TD step too
        before = model.critic_target.features_extractor.linear.weight  # (target: 0.75 old + 0.25 new)
        assert not torch.equal(model.critic.features_extractor.linear.weight, before)
        assert model.critic.features_extractor is not model.policy.features_extractor


# ---------------------------------------------------------------------------------- control variate and terms
def capture_prepared_rollout(model):
    """Run one more learn() iteration, capturing A_hat before and the buffer's signal and eta after the control
    variate was applied; the policy step is skipped."""
    captured = {}
    prepare = model._prepare_qprop_rollout

    def spy_prepare():
        captured["adv_hat"] = model.rollout_buffer.advantages.copy()
        captured["critic"] = copy.deepcopy(model.critic)  # the critic of the control variate (it trains later)
        prepare()
        captured["signal"] = model.rollout_buffer.advantages.copy()
        captured["etas"] = model.rollout_buffer.qprop_etas.copy()
        captured["observations"] = model.rollout_buffer.observations.copy()
        captured["actions"] = model.rollout_buffer.actions.copy()

    model._prepare_qprop_rollout = spy_prepare
    def skip_policy_step():
        captured["critic_frozen"] = not any(p.requires_grad for p in model.critic.parameters())
        captured["data"] = next(model.rollout_buffer.get(None))

    model._train_policy = skip_policy_step
    model.learn(N_STEPS * model.n_envs, reset_num_timesteps=False)
    return captured


def test_learning_signal_is_a_hat_minus_the_taylor_term_by_finite_differences(make_short_env):
    """A_bar(s, a) = d/de Q_w(s, mu + e (a - mu)) at e = 0, by central differences in float64, for every step of
    a [T, N] rollout (checks the time-major alignment of the rollout and the control variate too)."""
    model = make_model(QPropPPO, make_short_env("Pendulum-v1", 2, 10), qprop_eta="fixed")
    model.learn(2 * N_STEPS * 2)
    captured = capture_prepared_rollout(model)
    obs = torch.as_tensor(captured["observations"]).reshape(-1, 3).double()
    actions = torch.as_tensor(captured["actions"]).reshape(-1, 1).double()
    # Q_w in float64: SB3's critic casts observations to float32, so evaluate its MLP on [obs, a] directly.
    q_mlp = copy.deepcopy(captured["critic"].q_networks[0]).double()
    with torch.no_grad():
        mean = model.policy.get_distribution(obs.float()).distribution.mean.double()
        step = 1e-5
        direction = actions - mean
        a_bar = (q_mlp(torch.cat([obs, mean + step * direction], 1)) - q_mlp(torch.cat([obs, mean - step * direction], 1))) / (2 * step)
    expected = captured["adv_hat"] - a_bar.reshape(N_STEPS, 2).numpy()
    np.testing.assert_allclose(captured["signal"], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert np.all(captured["etas"] == 1.0)
    assert captured["critic_frozen"]  # during the policy step
    assert np.abs(captured["signal"] - captured["adv_hat"]).max() > 1e-3  # the control variate did something


def test_discrete_learning_signal_is_a_hat_minus_q_minus_its_policy_mean(make_short_env):
    model = make_model(QPropPPO, make_short_env("CartPole-v1", 2, 12), qprop_eta="fixed")
    model.learn(2 * N_STEPS * 2)
    captured = capture_prepared_rollout(model)
    obs = torch.as_tensor(captured["observations"]).reshape(-1, 4)
    actions = torch.as_tensor(captured["actions"]).reshape(-1).long()
    with torch.no_grad():
        q = captured["critic"](obs).double()
        probs = model.policy.get_distribution(obs).distribution.probs.double()
    loop = np.array([float(q[i, actions[i]] - sum(probs[i, a] * q[i, a] for a in range(2))) for i in range(len(q))])
    expected = captured["adv_hat"] - loop.reshape(N_STEPS, 2)
    np.testing.assert_allclose(captured["signal"], expected, rtol=1e-5, atol=1e-5)


def actor_parameters(model):
    return [p for name, p in model.policy.named_parameters() if "value" not in name and p.requires_grad]


def test_analytic_term_gradient_is_eta_grad_a_q_times_grad_theta_mu(make_short_env):
    model = make_model(QPropPPO, make_short_env("HalfCheetah-v5", 1, 20), qprop_eta="fixed",
                       qprop_warmup_steps=32)  # fmt: skip
    model.learn(2 * N_STEPS)
    assert model._qprop_cv_active
    generator = torch.Generator().manual_seed(0)
    obs = torch.as_tensor(model.rollout_buffer.observations.reshape(-1, 17)).float()[:40]
    etas = torch.rand(40, generator=generator) * 2 - 0.5
    params = actor_parameters(model)
    model.critic.requires_grad_(False)  # as QPropMixin.train does around the policy step
    correction = model._qprop_correction(obs, torch.zeros(40, 6), etas)
    grads = torch.autograd.grad(correction, params, allow_unused=True)
    # Reference: grad_a Q at the (detached) mean, then the vector-Jacobian product with d mu / d theta.
    mean = model.policy.get_distribution(obs).distribution.mean
    mean_leaf = mean.detach().requires_grad_(True)
    (grad_q,) = torch.autograd.grad(model.critic(obs, mean_leaf)[0].sum(), mean_leaf)
    reference = torch.autograd.grad(mean, params, grad_outputs=etas[:, None] * grad_q / 40, allow_unused=True)
    model.critic.requires_grad_(True)
    for got, want in zip(grads, reference):
        if want is None:  # log_std: the analytic term does not depend on the spread
            assert got is None or torch.count_nonzero(got) == 0
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert any(w is not None and torch.count_nonzero(w) > 0 for w in reference)


def test_discrete_analytic_term_gradient_is_eta_sum_grad_pi_q(make_short_env):
    """Reference by the score-function identity, enumerating the two actions: sum_a pi (grad log pi) Q."""
    model = make_model(QPropPPO, make_short_env("CartPole-v1", 1, 30), qprop_eta="fixed", qprop_warmup_steps=32)
    model.learn(2 * N_STEPS)
    obs = torch.as_tensor(model.rollout_buffer.observations.reshape(-1, 4))[:40]
    etas = torch.rand(40, generator=torch.Generator().manual_seed(1))
    params = actor_parameters(model)
    model.critic.requires_grad_(False)
    correction = model._qprop_correction(obs, torch.zeros(40, dtype=torch.long), etas)
    grads = torch.autograd.grad(correction, params)
    with torch.no_grad():
        q = model.critic(obs)
    model.critic.requires_grad_(True)
    reference = [torch.zeros_like(p) for p in params]
    for action in range(2):
        log_prob = model.policy.get_distribution(obs).log_prob(torch.full((40,), action))
        weights = (etas * log_prob.exp().detach() * q[:, action]) / 40
        for total, part in zip(reference, torch.autograd.grad((weights * log_prob).sum(), params)):
            total += part
    for got, want in zip(grads, reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_consistent_and_as_published_differ_by_the_unscaled_critic_gradient(make_short_env):
    """formulas.md 4.3: with the signal normalized by sigma, the as-published objective has the analytic term with
    eta, the consistent one with eta / sigma: their gradients differ by exactly (1 - 1/sigma) grad(analytic term)."""
    model = make_model(QPropTRPO, make_short_env("Pendulum-v1", 2, 10), qprop_eta="fixed")
    model.learn(2 * N_STEPS * 2)
    captured = capture_prepared_rollout(model)
    data = captured["data"]
    signal = data.advantages
    sigma = float(signal.std()) + 1e-8
    assert sigma > 2  # Pendulum's advantages: the two modes really differ
    params = actor_parameters(model)
    model.critic.requires_grad_(False)
    gradients, normalized = {}, {}
    for mode in ("consistent", "as_published"):
        model.qprop_normalization = mode
        advantages, etas = model._qprop_minibatch_signal(data, normalize=True)
        normalized[mode] = (advantages, etas)
        log_prob = model.policy.get_distribution(data.observations).log_prob(data.actions)
        objective = (advantages * log_prob).mean() + model._qprop_correction(data.observations, data.actions, etas)
        gradients[mode] = torch.cat([g.flatten() for g in torch.autograd.grad(objective, params)])
    analytic = torch.autograd.grad(model._qprop_correction(data.observations, data.actions, data.qprop_etas), params,
                                   allow_unused=True)  # fmt: skip
    model.critic.requires_grad_(True)
    analytic = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(analytic, params)])
    torch.testing.assert_close(normalized["consistent"][0], normalized["as_published"][0])  # same signal
    torch.testing.assert_close(normalized["consistent"][0], (signal - signal.mean()) / sigma)
    torch.testing.assert_close(normalized["as_published"][1], data.qprop_etas)
    torch.testing.assert_close(normalized["consistent"][1], data.qprop_etas / sigma)
    torch.testing.assert_close(
        gradients["as_published"] - gradients["consistent"], (1 - 1 / sigma) * analytic, rtol=1e-4, atol=1e-6
    )
    assert analytic.norm() > 1e-3


def test_qprop_normalization_none_normalizes_nothing(make_short_env):
    model = make_model(QPropPPO, make_short_env("Pendulum-v1", 2, 10), qprop_eta="fixed",
                       qprop_normalization="none")  # fmt: skip
    model.learn(2 * N_STEPS * 2)
    data = capture_prepared_rollout(model)["data"]
    advantages, etas = model._qprop_minibatch_signal(data, normalize=True)
    assert torch.equal(advantages, data.advantages) and torch.equal(etas, data.qprop_etas)


# --------------------------------------------------------------------------------------------- save / load
def test_save_load_round_trip_and_resume(tmp_path, make_short_env):
    env = make_short_env("Pendulum-v1", 2, 10)
    model = make_model(QPropPPO, env, qprop_eta="aggressive", qprop_normalization="as_published",
                       qprop_critic_tau=0.01)  # fmt: skip
    model.learn(3 * N_STEPS * 2)
    model.save(tmp_path / "qprop")
    model.save_replay_buffer(tmp_path / "replay")
    with zipfile.ZipFile(tmp_path / "qprop.zip") as archive:
        assert {"critic.pth", "critic_target.pth", "critic.optimizer.pth"} <= set(archive.namelist())
    loaded = QPropPPO.load(tmp_path / "qprop.zip", env=env)
    for name in ("qprop_eta", "qprop_eta_scope", "qprop_normalization", "qprop_critic_net_arch", "qprop_critic_tau",
                 "qprop_warmup_steps", "critic_n_updates"):  # fmt: skip
        assert getattr(loaded, name) == getattr(model, name), name
    for module in ("critic", "critic_target", "policy"):
        for key, value in getattr(model, module).state_dict().items():
            assert torch.equal(getattr(loaded, module).state_dict()[key], value), (module, key)
    saved_state, loaded_state = model.critic.optimizer.state_dict(), loaded.critic.optimizer.state_dict()
    for index, state in saved_state["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(loaded_state["state"][index][key]), torch.as_tensor(value))
    assert loaded.replay_buffer.size() == 0  # not in the zip
    loaded.load_replay_buffer(tmp_path / "replay.npz")
    for field in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        np.testing.assert_array_equal(getattr(loaded.replay_buffer, field), getattr(model.replay_buffer, field))
    assert loaded.replay_buffer.pos == model.replay_buffer.pos
    # The replay minibatch stream continues where the saved model left it (not reseeded by load()).
    saved_stream, loaded_stream = model.qprop_critic.random_state, loaded.qprop_critic.random_state
    assert saved_stream[0] == loaded_stream[0] and saved_stream[2:] == loaded_stream[2:]
    np.testing.assert_array_equal(saved_stream[1], loaded_stream[1])
    # Resume: the control variate is on at once, the critic keeps training from its saved state.
    critic_before = copy.deepcopy(loaded.critic.state_dict())
    loaded.learn(2 * N_STEPS * 2, reset_num_timesteps=False)
    assert loaded.num_timesteps == model.num_timesteps + 2 * N_STEPS * 2
    assert loaded.critic_n_updates == model.critic_n_updates + 2 * N_STEPS * 2
    assert any(not torch.equal(critic_before[k], v) for k, v in loaded.critic.state_dict().items())
    # Adam continued from the loaded state: its step counters count every critic update, before and after.
    for state in loaded.critic.optimizer.state_dict()["state"].values():
        assert float(state["step"]) == loaded.critic_n_updates
    assert all(p.grad is None for p in loaded.critic.parameters())  # no stale gradients kept on the critic
    assert loaded.replay_buffer.size() * 2 == 5 * N_STEPS * 2
    assert math.isfinite(loaded.logger.name_to_value["pgvar/qprop_critic_explained_variance"])


def test_load_replay_buffer_rejects_a_mismatch(tmp_path, make_short_env):
    model = make_model(QPropPPO, make_short_env("Pendulum-v1", 2, 10))
    model.learn(N_STEPS * 2)
    model.save_replay_buffer(tmp_path / "replay.npz")
    other = make_model(QPropPPO, make_short_env("Pendulum-v1", 1, 10))
    with pytest.raises(ValueError, match="n_envs=2"):
        other.load_replay_buffer(tmp_path / "replay.npz")


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"qprop_eta": "sometimes"}, "qprop_eta must be one of 'fixed', 'conservative', 'aggressive', 'adaptive'; got 'sometimes'"),
        ({"qprop_eta_scope": "episode"}, "qprop_eta_scope must be one of 'crossfit', 'batch', 'sample'; got 'episode'"),
        ({"qprop_normalization": "both"}, "qprop_normalization must be one of 'consistent', 'as_published', 'none'"),
        ({"qprop_critic_net_arch": [64, 0]}, r"qprop_critic_net_arch must be .*integers > 0.*\[64, 0\]"),
        ({"qprop_critic_net_arch": "100"}, "qprop_critic_net_arch must be .* got '100'"),
        ({"qprop_critic_learning_rate": 0.0}, "qprop_critic_learning_rate must be a number > 0, got 0.0"),
        ({"qprop_critic_batch_size": 0}, "qprop_critic_batch_size must be an integer > 0, got 0"),
        ({"qprop_critic_batch_size": 2.5}, "qprop_critic_batch_size must be an integer > 0, got 2.5"),
        ({"qprop_critic_updates_per_step": -1}, "qprop_critic_updates_per_step must be a number > 0, got -1"),
        ({"qprop_critic_updates_per_step": float("inf")}, "qprop_critic_updates_per_step must be a finite number > 0, got inf"),
        ({"qprop_critic_tau": 0.0}, r"qprop_critic_tau must be a number in \(0, 1\].*got 0.0"),
        ({"qprop_critic_tau": 1.5}, r"qprop_critic_tau must be a number in \(0, 1\].*got 1.5"),
        ({"qprop_buffer_size": 0}, "qprop_buffer_size must be an integer > 0, got 0"),
        ({"qprop_warmup_steps": -1}, "qprop_warmup_steps must be an integer >= 0.*got -1"),
        ({"qprop_warmup_steps": 1.5}, "qprop_warmup_steps must be an integer >= 0.*got 1.5"),
    ],
)
@pytest.mark.parametrize("cls", [QPropPPO, QPropTRPO])
def test_bad_arguments_raise_naming_argument_value_and_allowed(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls("MlpPolicy", "Pendulum-v1", **kwargs)


class MultiDiscreteActions(gym.Env):
    observation_space = gym.spaces.Box(-1, 1, (2,))
    action_space = gym.spaces.MultiDiscrete([2, 3])

    def reset(self, *, seed=None, options=None):
        return np.zeros(2, dtype=np.float32), {}

    def step(self, action):
        return np.zeros(2, dtype=np.float32), 0.0, False, False, {}


def test_action_space_specific_options_and_unsupported_spaces_raise():
    with pytest.raises(ValueError, match="qprop_eta='adaptive' is for Box action spaces only.*Discrete"):
        QPropPPO("MlpPolicy", "CartPole-v1", qprop_eta="adaptive")
    with pytest.raises(ValueError, match="does not support use_sde=True"):
        QPropTRPO("MlpPolicy", "Pendulum-v1", use_sde=True)
    with pytest.raises(ValueError, match="supports Box actions .* and Discrete actions.*MultiDiscrete"):
        QPropPPO("MlpPolicy", MultiDiscreteActions())
    QPropPPO("MlpPolicy", "Pendulum-v1", qprop_eta="adaptive", n_steps=16, batch_size=16, qprop_buffer_size=100)


def test_a_rollout_buffer_that_cannot_carry_eta_is_refused():
    class OwnBuffer(RolloutBuffer):
        pass

    with pytest.raises(ValueError, match="rollout_buffer_class=OwnBuffer cannot carry the Q-Prop weights"):
        QPropPPO("MlpPolicy", "Pendulum-v1", rollout_buffer_class=OwnBuffer)
    model = QPropPPO("MlpPolicy", "Pendulum-v1", rollout_buffer_class=QPropRolloutBuffer, n_steps=16, batch_size=16,
                     qprop_buffer_size=100)  # fmt: skip
    assert type(model.rollout_buffer) is QPropRolloutBuffer


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "CartPole-v1"])
def test_ppo_reuses_the_evaluated_distribution_for_the_same_analytic_term(make_short_env, env_id):
    """QPropPPO takes mu_theta(s) from the distribution evaluate_actions just built (no second actor pass): the
    analytic term and its gradient must equal those of a fresh forward pass, in every minibatch."""
    model = make_model(QPropPPO, make_short_env(env_id, 2, 10), qprop_eta="fixed")
    model.learn(2 * N_STEPS * 2)
    original, checked = model._qprop_correction, []

    def compare(observations, actions, etas, distribution=None):
        assert distribution is model.policy.action_dist
        params = actor_parameters(model)
        reused = original(observations, actions, etas, distribution)  # first: a fresh pass rebuilds action_dist
        fresh = original(observations, actions, etas)
        torch.testing.assert_close(reused, fresh)
        for a, b in zip(torch.autograd.grad(reused, params, retain_graph=True, allow_unused=True),
                        torch.autograd.grad(fresh, params, retain_graph=True, allow_unused=True)):  # fmt: skip
            assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-5, atol=1e-7)
        checked.append(True)
        return reused

    model._qprop_correction = compare
    model.learn(N_STEPS * 2, reset_num_timesteps=False)
    assert len(checked) == model.n_epochs * (N_STEPS * 2) // model.batch_size


def test_critic_learning_rate_follows_the_attribute_after_load(tmp_path, make_short_env):
    env = make_short_env("Pendulum-v1", 2, 10)
    model = make_model(QPropTRPO, env)
    model.learn(2 * N_STEPS * 2)
    model.save(tmp_path / "qprop")
    loaded = QPropTRPO.load(tmp_path / "qprop.zip", env=env, custom_objects={"qprop_critic_learning_rate": 1e-5})
    assert loaded.critic.optimizer.param_groups[0]["lr"] == model.qprop_critic_learning_rate  # the saved state
    loaded.learn(N_STEPS * 2, reset_num_timesteps=False)
    assert loaded.critic.optimizer.param_groups[0]["lr"] == 1e-5
