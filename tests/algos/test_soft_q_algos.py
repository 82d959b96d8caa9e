"""EntropyPG and SoftQ: drop-in SB3 behaviour, a train() step against a plain-loop reference, and the
equivalence at the level of the algorithms (same seed, same states, same network):

* enumerated actions: SoftQ's first update equals EntropyPG's (gradients tau times EntropyPG's; with SGD and
  learning rates in the ratio 1/tau, the same new parameters);
* sampled actions: the per-sample gradients differ by zero-mean terms: their mean difference is within k
  standard errors of 0 while each difference is far from 0.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

from pgvar.algos.soft_q import EntropyPG, SoftQ, SoftQPolicy
from pgvar.estimators.soft_q import boltzmann_log_probs, kl_to_reference
from pgvar.problems.tabular import TabularMDP

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TAU = 0.3
REF = (0.35, 0.65)
# (EntropyPG policy, SoftQ policy, policy_kwargs): the same network read two ways.
PAIRS = {
    "q-network": ("SoftQMlpPolicy", "MlpPolicy", dict(net_arch=[16])),
    "actor-critic": ("MlpPolicy", "ActorCriticMlpPolicy", dict(net_arch=dict(pi=[16], vf=[16]))),
}


def sgd_pair(pair: str, lr: float = 0.05, n_envs: int = 2, n_steps: int = 4, seed: int = 3):
    """EntropyPG and SoftQ with the same seed and network, plain SGD with learning rates lr and lr / tau, so that
    tau-times-larger gradients give the same step."""
    pg_policy, q_policy, net = PAIRS[pair]
    common = dict(n_steps=n_steps, gamma=0.9, tau=TAU, ref_policy=REF, n_step=1, max_grad_norm=1e9, seed=seed)
    kwargs = dict(net, optimizer_class=th.optim.SGD)
    pg = EntropyPG(
        pg_policy,
        make_vec_env("CartPole-v1", n_envs=n_envs, seed=seed),
        learning_rate=lr,
        policy_kwargs=dict(kwargs),
        **common,
    )
    sq = SoftQ(
        q_policy,
        make_vec_env("CartPole-v1", n_envs=n_envs, seed=seed),
        learning_rate=lr / TAU,
        policy_kwargs=dict(kwargs),
        **common,
    )
    for model in (pg, sq):
        # SB3's output-layer gain 0.01 starts Q near 0, i.e. pi = pi_ref, where the per-sample difference of the
        # two gradients vanishes (l(a) = log(pi / pi_ref) = KL = 0): move away from it, identically in both.
        output_layer = (
            model.policy.q_net[-1] if isinstance(model.policy, SoftQPolicy) else model.policy.action_net
        )
        with th.no_grad():
            output_layer.weight.mul_(50.0)
    return pg, sq


def collect_one_rollout(model) -> None:
    th.manual_seed(123)  # the same action draws for both models
    _, callback = model._setup_learn(model.n_steps * model.n_envs, None)
    callback.on_training_start(locals(), globals())
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=model.n_steps)


def flat_params(model) -> th.Tensor:
    return th.cat([p.detach().reshape(-1) for p in model.policy.parameters()])


def flat_grads(model) -> th.Tensor:
    return th.cat([p.grad.reshape(-1) for p in model.policy.parameters()])


def one_step_delta_table(model, observations: th.Tensor) -> th.Tensor:
    """Delta(s, a) = r(s, a) - tau KL(s) + gamma (1 - terminated) V(s') - V(s) for EVERY action, by resetting a
    CartPole to each state and stepping it with each action (CartPole is deterministic)."""
    env = gym.make("CartPole-v1").unwrapped
    env.reset(seed=0)
    states = observations.cpu().numpy().astype(np.float64)
    n_states, n_actions = states.shape[0], int(model.action_space.n)
    rewards = np.zeros((n_states, n_actions))
    terminated = np.zeros((n_states, n_actions))
    next_obs = np.zeros((n_states, n_actions, states.shape[1]), dtype=np.float32)
    for i in range(n_states):
        for a in range(n_actions):
            env.state, env.steps_beyond_terminated = states[i].copy(), None
            next_obs[i, a], rewards[i, a], terminated[i, a], _, _ = env.step(a)
    with th.no_grad():
        here = model.soft_outputs(observations)
        after = model.soft_outputs(th.as_tensor(next_obs.reshape(-1, states.shape[1])))
        kls = kl_to_reference(here.log_probs, th.tensor(REF).log())
    next_values = after.values.reshape(n_states, n_actions)
    not_terminated = th.as_tensor(1.0 - terminated, dtype=th.float32)
    deltas = (
        th.as_tensor(rewards, dtype=th.float32)
        - TAU * kls[:, None]
        + model.gamma * not_terminated * next_values
    )
    return deltas - here.values[:, None]


def rollout_observations(model) -> th.Tensor:
    return th.as_tensor(model.rollout_buffer.observations.reshape(-1, 4))


@pytest.mark.parametrize("pair", list(PAIRS))
def test_first_updates_coincide_when_the_actions_are_enumerated(pair):
    pg, sq = sgd_pair(pair)
    th.testing.assert_close(flat_params(pg), flat_params(sq), rtol=0, atol=0)  # same seed, same network
    collect_one_rollout(pg)
    collect_one_rollout(sq)
    # Same states:
    np.testing.assert_array_equal(pg.rollout_buffer.observations, sq.rollout_buffer.observations)
    observations = rollout_observations(pg)
    deltas = one_step_delta_table(pg, observations)
    th.testing.assert_close(one_step_delta_table(sq, observations), deltas)
    for model in (pg, sq):
        model.policy.optimizer.zero_grad()
        loss, _ = model.compute_loss(observations, None, deltas)
        loss.backward()
    grad_pg, grad_q = flat_grads(pg), flat_grads(sq)
    scale = float(grad_q.abs().max())
    assert scale > 1e-4
    th.testing.assert_close(grad_q, TAU * grad_pg, rtol=1e-4, atol=1e-6 * scale)
    pg.policy.optimizer.step()
    sq.policy.optimizer.step()
    th.testing.assert_close(flat_params(sq), flat_params(pg), rtol=1e-5, atol=1e-6)


def test_sampled_updates_agree_only_in_expectation():
    """Per-sample gradient differences are zero-mean over a ~ pi(.|s) but not zero (the differing terms
    tau^2 [(l(a) - KL) grad log pi(a) - grad KL] + tau (l(a) - KL) grad V do not involve Delta)."""
    pg, sq = sgd_pair("q-network", n_envs=2, n_steps=6)
    collect_one_rollout(pg)
    observations = rollout_observations(pg)  # 12 states
    deltas = one_step_delta_table(pg, observations)
    with th.no_grad():
        probs = pg.soft_outputs(observations).log_probs.exp()
    per_state = 24
    generator = th.Generator().manual_seed(0)
    actions = th.multinomial(probs, per_state, replacement=True, generator=generator)  # [12, 24], a ~ pi(.|s)
    differences, q_grads = [], []
    for i in range(observations.shape[0]):
        for a in actions[i].tolist():
            sample = []
            for model in (pg, sq):
                model.policy.optimizer.zero_grad()
                loss, _ = model.compute_loss(observations[i : i + 1], th.tensor([a]), deltas[i : i + 1, a])
                loss.backward()
                sample.append(flat_grads(model).clone())
            q_grads.append(sample[1])
            differences.append(sample[1] - TAU * sample[0])
    differences, q_grads = th.stack(differences).double(), th.stack(q_grads).double()
    mean, se = differences.mean(0), differences.std(0) / math.sqrt(differences.shape[0])
    varying = se > 0
    assert int(varying.sum()) > 50
    assert float((mean[varying] / se[varying]).abs().max()) < 4.5  # 130 coordinates: false alarm < 1e-3
    # ... while the per-sample differences are far above the float32 round-off of the enumerated check (~1e-6).
    assert float(differences.norm(dim=1).mean()) > 0.02 * float(q_grads.norm(dim=1).mean())


# ------------------------------------------------------------------------------------------ train() vs a loop
class RecordRollout(BaseCallback):
    """Records the raw transitions (before SB3 folds the truncation bootstrap into the reward) and, at the end
    of the rollout (before train()), the loop-reference gradient."""

    def __init__(self, reference_gradient):
        super().__init__()
        self.reference_gradient = reference_gradient
        self.steps = []

    def _on_step(self) -> bool:
        infos = self.locals["infos"]
        self.steps.append(
            dict(
                obs=np.array(self.model._last_obs).copy(),
                actions=np.array(self.locals["actions"]).copy(),
                rewards=np.array(self.locals["rewards"], dtype=np.float64).copy(),
                dones=np.array(self.locals["dones"]).copy(),
                truncated=np.array([info.get("TimeLimit.truncated", False) for info in infos]),
                next_obs=np.array(
                    [
                        info["terminal_observation"] if done else obs
                        for info, done, obs in zip(infos, self.locals["dones"], self.locals["new_obs"])
                    ]
                ),
            )
        )
        return True

    def _on_rollout_end(self) -> None:
        self.params_before = [p.detach().clone() for p in self.model.policy.parameters()]
        self.buffer_advantages = self.model.rollout_buffer.advantages.copy()  # what callbacks see
        self.expected, self.expected_advantages = self.reference_gradient(self.model, self.steps)


def loop_reference_gradient(model, steps):
    """The training loss written with plain loops over time and envs, differentiated by autograd."""
    T, N = len(steps), len(steps[0]["rewards"])
    ref = th.tensor(model.ref_policy or [1.0 / model.action_space.n] * model.action_space.n).log()
    tau, gamma, n = model.tau, model.gamma, model.n_step or T

    def outputs(obs):
        out = model.soft_outputs(th.as_tensor(np.asarray(obs)).reshape(-1, 1))
        kl = (out.log_probs.exp() * (out.log_probs - ref)).sum(-1)
        return out, kl

    now = [outputs(step["obs"]) for step in steps]
    with th.no_grad():
        next_values = [outputs(step["next_obs"])[0].values for step in steps]
    total = 0.0
    advantages = np.zeros((T, N))
    for t in range(T):
        out, kl = now[t]
        for i in range(N):
            advantage = 0.0
            for d in range(min(n, T - t)):  # Delta_t = sum_d gamma^d delta_{t+d}, cut at episode ends
                step, k = steps[t + d], t + d
                terminated = bool(step["dones"][i]) and not bool(step["truncated"][i])
                bootstrap = 0.0 if terminated else gamma * float(next_values[k][i])
                delta = (
                    float(step["rewards"][i])
                    - tau * float(now[k][1][i].detach())
                    + bootstrap
                    - float(now[k][0].values[i].detach())
                )
                advantage += gamma**d * delta
                if bool(step["dones"][i]):
                    break
            advantages[t, i] = advantage
            a = int(steps[t]["actions"][i])
            if isinstance(model, SoftQ):
                target = float(out.values[i].detach()) + tau * float(kl[i].detach()) + advantage
                total = total + 0.5 * (out.q_values[i, a] - target) ** 2
            else:
                value_target = float(out.values[i].detach()) + advantage
                total = total - advantage * out.log_probs[i, a] + tau * kl[i]
                total = total + model.vf_coef * (out.values[i] - value_target) ** 2
    loss = total / (T * N)
    return th.autograd.grad(loss, list(model.policy.parameters())), advantages


@pytest.mark.parametrize(
    "cls,n_step,buffer_class",
    [(EntropyPG, None, None), (EntropyPG, 2, RolloutBuffer), (SoftQ, None, None), (SoftQ, 3, None)],
)
def test_train_step_matches_a_loop_reference_with_terminations_and_truncations(cls, n_step, buffer_class):
    """A TabularMDP with a 3-step time limit: terminations and truncations inside an 8-step rollout. SB3 adds
    gamma V(final obs) to truncated rewards; the reference instead bootstraps explicitly from the raw data.
    With pgvar's buffer the KL-regularized advantages are in the buffer at on_rollout_end (callbacks see them);
    with a caller's ``rollout_buffer_class`` (SB3's) train() computes them itself."""
    env = make_vec_env(
        TabularMDP,
        n_envs=3,
        seed=1,
        env_kwargs=dict(n_states=4, n_actions=3, termination_prob=0.3, max_episode_steps=3),
    )
    model = cls(
        "MlpPolicy",
        env,
        n_steps=8,
        gamma=0.9,
        tau=0.5,
        n_step=n_step,
        ref_policy=(0.2, 0.3, 0.5),
        learning_rate=1.0,
        max_grad_norm=1e9,
        seed=2,
        rollout_buffer_class=buffer_class,
        policy_kwargs=dict(
            optimizer_class=th.optim.SGD, net_arch=[8] if cls is SoftQ else dict(pi=[8], vf=[8])
        ),
    )
    recorder = RecordRollout(loop_reference_gradient)
    model.learn(8 * 3, callback=recorder)
    if buffer_class is None:
        np.testing.assert_allclose(
            recorder.buffer_advantages, recorder.expected_advantages, rtol=1e-5, atol=1e-5
        )
    else:  # SB3's own buffer holds SB3's GAE at on_rollout_end, not the KL-regularized signal
        assert not np.allclose(recorder.buffer_advantages, recorder.expected_advantages, atol=1e-3)
    dones = np.array([s["dones"] for s in recorder.steps])
    truncated = np.array([s["truncated"] for s in recorder.steps])
    assert truncated.any() and (dones & ~truncated).any(), "the rollout must hold both kinds of episode end"
    for before, after, expected in zip(recorder.params_before, model.policy.parameters(), recorder.expected):
        # SGD with learning rate 1: the step is the gradient.
        th.testing.assert_close(before - after.detach(), expected, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ SB3 drop-in
class CountCalls(BaseCallback):
    def __init__(self):
        super().__init__()
        self.n_steps = self.n_rollouts = 0

    def _on_step(self) -> bool:
        self.n_steps += 1
        return True

    def _on_rollout_end(self) -> None:
        self.n_rollouts += 1


@pytest.mark.parametrize("cls", [EntropyPG, SoftQ])
def test_learn_callbacks_logger_save_load_and_predict(cls, tmp_path):
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    model = cls("MlpPolicy", env, n_steps=4, tau=0.2, ref_policy=[0.4, 0.6], n_step=3, seed=0)
    counter = CountCalls()
    model.learn(48, callback=counter)
    assert counter.n_steps == 24 and counter.n_rollouts == 6 and model.num_timesteps == 48
    logged = model.logger.name_to_value
    for key in ("train/loss", "train/kl_to_reference", "train/entropy_loss", "train/explained_variance"):
        assert key in logged and math.isfinite(logged[key])
    observations = np.stack([env.observation_space.sample() for _ in range(16)])
    actions, _ = model.predict(observations, deterministic=True)
    model.save(tmp_path / "model")
    loaded = cls.load(tmp_path / "model", env=env)
    assert (loaded.tau, loaded.ref_policy, loaded.n_step) == (0.2, (0.4, 0.6), 3)
    np.testing.assert_array_equal(loaded.predict(observations, deterministic=True)[0], actions)
    loaded.learn(16)  # and it trains on


def test_soft_q_acts_with_the_boltzmann_policy_of_its_q_network():
    model = SoftQ("MlpPolicy", "CartPole-v1", tau=0.05, ref_policy=REF, seed=0)
    assert isinstance(model.policy, SoftQPolicy)
    observations = th.randn(32, 4)
    with th.no_grad():
        q_values = model.policy.q_values(observations) * 100  # make the policy far from uniform
        model.policy.q_net[-1].weight.mul_(100)
        model.policy.q_net[-1].bias.mul_(100)
        expected = boltzmann_log_probs(q_values, 0.05, th.tensor(REF).log()).exp()
        probs = model.policy.get_distribution(observations).distribution.probs
    th.testing.assert_close(probs, expected, rtol=1e-4, atol=1e-6)
    assert float(expected.max(-1).values.mean()) > 0.9  # not a trivial (uniform) comparison


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("cls", [EntropyPG, SoftQ])
def test_bad_arguments_raise_value_errors_at_construction(cls):
    with pytest.raises(ValueError, match=r"Discrete action spaces.*Box"):
        cls("MlpPolicy", "Pendulum-v1")
    with pytest.raises(ValueError, match=r"Discrete action spaces.*MultiDiscrete"):
        cls("MlpPolicy", _multi_discrete_env())
    for tau in (0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="tau"):
            cls("MlpPolicy", "CartPole-v1", tau=tau)
    for ref, why in [
        ((0.5, 0.6), "sum to 1"),
        ((0.2, 0.3, 0.5), "2 actions"),
        ((1.0, 0.0), "> 0"),
        ([[0.5, 0.5]], "2 actions"),
        ("peaked", "uniform"),
    ]:
        with pytest.raises(ValueError, match="ref_policy") as info:
            cls("MlpPolicy", "CartPole-v1", ref_policy=ref)
        assert why in str(info.value)
    with pytest.raises(ValueError, match="n_step"):
        cls("MlpPolicy", "CartPole-v1", n_step=0)
    with pytest.raises(ValueError, match="use_sde"):
        cls("MlpPolicy", "CartPole-v1", use_sde=True)
    with pytest.raises(ValueError, match="gamma"):
        cls("MlpPolicy", "CartPole-v1", gamma=1.5)
    with pytest.raises(ValueError, match="policy_kwargs"):
        cls("SoftQMlpPolicy", "CartPole-v1", tau=0.5, policy_kwargs=dict(tau=0.1))


def _multi_discrete_env():
    class MultiDiscreteActions(gym.ActionWrapper):
        def __init__(self, env):
            super().__init__(env)
            self.action_space = gym.spaces.MultiDiscrete([2, 2])

        def action(self, action):
            return int(action[0])

    return MultiDiscreteActions(gym.make("CartPole-v1"))


def test_entropy_pg_rejects_a_bad_value_coefficient():
    with pytest.raises(ValueError, match="vf_coef"):
        EntropyPG("MlpPolicy", "CartPole-v1", vf_coef=-1.0)
    assert EntropyPG("MlpPolicy", "CartPole-v1", tau=0.25).vf_coef == pytest.approx(2.0)  # 1 / (2 tau)


@pytest.mark.parametrize("cls", [EntropyPG, SoftQ])
def test_dict_observations_and_truncations(cls, make_short_env):
    """MultiInputPolicy on Dict observations (the dict buffer and the dict branch of the rollout tensors)."""
    env = make_short_env("CartPole-v1", n_envs=2, max_episode_steps=5, dict_obs=True, seed=0)
    model = cls("MultiInputPolicy", env, n_steps=8, tau=0.1, seed=0)
    model.learn(64)
    assert (
        type(model.rollout_buffer).__name__ == "KLRegularizedDictRolloutBuffer"
        and model.rollout_buffer.signal_ready
    )
    assert math.isfinite(model.logger.name_to_value["train/loss"])
