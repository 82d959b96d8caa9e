"""GradientVarianceCallback on SB3's PPO and A2C and sb3-contrib's TRPO, checked against brute-force references.

The references share nothing with the callback but the random minibatch draw: they flatten the captured buffer
with numpy as SB3's ``swap_and_flatten`` does, normalize advantages with SB3's formula, and build the per-sample
gradients with one ``evaluate_actions`` call and one ``autograd.grad`` per sample on a copy of the policy.
"""

from __future__ import annotations

import copy
import csv
import math

import gymnasium
import numpy as np
import pytest
import torch
from sb3_contrib import TRPO
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure

from pgvar._sb3_policy import detached_policy_copy, policy_log_prob
from pgvar.callbacks import GradientVarianceCallback
from pgvar.measure import trust_region_diagnostics

TINY = {"net_arch": [16]}


class CapturingCallback(GradientVarianceCallback):
    """Keeps, for every measurement, a copy of the policy, the buffer and the minibatch draw, and the values."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.captures: list[dict] = []

    def _draw_minibatches(self, n_total, batch_size):
        minibatches, n_kept = super()._draw_minibatches(n_total, batch_size)
        buffer = self.model.rollout_buffer
        observations = buffer.observations
        self._capture = {
            "policy": copy.deepcopy(self.model.policy),
            "observations": (
                {key: value.copy() for key, value in observations.items()}
                if isinstance(observations, dict)
                else observations.copy()
            ),
            "actions": buffer.actions.copy(),
            "advantages": buffer.advantages.copy(),
            "minibatches": minibatches.copy(),
            "n_kept": n_kept,
        }
        return minibatches, n_kept

    def measure_policy_gradient(self):
        values = super().measure_policy_gradient()
        self.captures.append({**self._capture, "values": values})
        return values


def dict_observation_cartpole():
    """CartPole with a Dict observation {"position": [x, theta], "velocity": [x_dot, theta_dot]}."""
    env = gymnasium.make("CartPole-v1")
    low, high = env.observation_space.low, env.observation_space.high
    space = gymnasium.spaces.Dict(
        {
            "position": gymnasium.spaces.Box(low[[0, 2]], high[[0, 2]], dtype=np.float32),
            "velocity": gymnasium.spaces.Box(low[[1, 3]], high[[1, 3]], dtype=np.float32),
        }
    )
    return gymnasium.wrappers.TransformObservation(
        env, lambda obs: {"position": obs[[0, 2]], "velocity": obs[[1, 3]]}, space
    )


def make_model(algo, env_id, n_envs=1, seed=0, **kwargs):
    if env_id == "DictCartPole":
        env, policy = make_vec_env(dict_observation_cartpole, n_envs=n_envs, seed=seed), "MultiInputPolicy"
    else:
        env, policy = make_vec_env(env_id, n_envs=n_envs, seed=seed), "MlpPolicy"
    if algo is PPO:
        kwargs = {"batch_size": 16, "n_epochs": 2, **kwargs}
    if algo is TRPO:
        kwargs = {"batch_size": 32, "n_critic_updates": 2, "cg_max_steps": 5, **kwargs}
    return algo(policy, env, n_steps=kwargs.pop("n_steps", 64), policy_kwargs=TINY, seed=seed, **kwargs)


def swap_and_flatten(array: np.ndarray) -> np.ndarray:
    """SB3's RolloutBuffer.swap_and_flatten: [n_steps, n_envs, ...] -> [n_envs * n_steps, ...], env-major."""
    return array.swapaxes(0, 1).reshape(array.shape[0] * array.shape[1], *array.shape[2:])


def sb3_normalize(advantages: torch.Tensor) -> torch.Tensor:
    if len(advantages) <= 1:
        return advantages
    return (advantages - advantages.mean()) / (advantages.std() + 1e-8)


def update_batch_size(model) -> int:
    n_total = model.n_steps * model.n_envs
    if isinstance(model, PPO):
        return min(model.batch_size, n_total)
    if isinstance(model, TRPO):
        return len(range(0, n_total, model.sub_sampling_factor))
    return n_total


def cockpit_mean_gsnr(per_sample: torch.Tensor, epsilon: float = 1e-5) -> float:
    """Cockpit's MeanGSNR of [N, P] float64 per-sample gradients: mean_j m_j^2 / (mean_i G_ij^2 - m_j^2 + eps)."""
    mean_sq = per_sample.mean(0).square()
    gsnr = mean_sq / (per_sample.square().mean(0) - mean_sq + epsilon)
    return float(torch.where(mean_sq == 0, 0.0, gsnr).mean())


def brute_force_values(model, capture, n_minibatches, theta=0.9) -> dict[str, float]:
    """The callback's pgvar/pg_grad_* and pgvar/minibatch_* values, by one backward per sample (float64 stats)."""
    policy = capture["policy"]
    batch_size = update_batch_size(model)
    if isinstance(capture["observations"], dict):
        observations = {k: torch.as_tensor(swap_and_flatten(v)) for k, v in capture["observations"].items()}
    else:
        observations = torch.as_tensor(swap_and_flatten(capture["observations"]))
    actions = torch.as_tensor(swap_and_flatten(capture["actions"]))
    advantages = torch.as_tensor(swap_and_flatten(capture["advantages"])).reshape(-1)
    minibatches = capture["minibatches"]
    assert minibatches.shape[1] == batch_size
    assert len(np.unique(minibatches)) == minibatches.size  # drawn without replacement

    # The algorithm's normalization: PPO per minibatch, TRPO over its (sub-sampled) batch, A2C optional over all.
    rows = []
    for row in minibatches:
        adv = advantages[torch.as_tensor(row)]
        rows.append(sb3_normalize(adv) if model.normalize_advantage else adv)
    kept = minibatches.reshape(-1)[: capture["n_kept"]]
    normalized = torch.cat(rows)[: capture["n_kept"]]

    params = [p for name, p in policy.named_parameters() if "value" not in name]
    grads = []
    for position, index in enumerate(kept):
        action = actions[index : index + 1]
        if model.action_space.__class__.__name__ == "Discrete":
            action = action.long().flatten()
        if isinstance(observations, dict):
            obs = {key: value[index : index + 1] for key, value in observations.items()}
        else:
            obs = observations[index : index + 1]
        _, log_prob, _ = policy.evaluate_actions(obs, action)
        loss = -(normalized[position] * log_prob).sum()
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double())
    per_sample = torch.stack(grads)  # [N, P]
    n = per_sample.shape[0]
    mean = per_sample.mean(0)
    trace = float((per_sample - mean).square().sum()) / (n - 1)
    mean_sq = float(mean.square().sum())
    var_at_batch = trace / batch_size

    if minibatches.shape[0] >= 2:
        k = min(n_minibatches, minibatches.shape[0])
        groups = [per_sample[b * batch_size : (b + 1) * batch_size] for b in range(k)]
    else:
        size = n // n_minibatches
        groups = [per_sample[b * size : (b + 1) * size] for b in range(n_minibatches)]
    minibatch_means = [g.mean(0) for g in groups]
    cosines_to_batch = [float(torch.dot(g, mean) / (g.norm() * mean.norm())) for g in minibatch_means]
    pairwise = [
        float(torch.dot(a, b) / (a.norm() * b.norm()))
        for i, a in enumerate(minibatch_means)
        for j, b in enumerate(minibatch_means)
        if i != j
    ]
    values = {
        "pgvar/pg_grad_cov_trace": trace,
        "pgvar/pg_grad_var_at_batch": var_at_batch,
        "pgvar/pg_grad_snr": mean_sq / var_at_batch,
        "pgvar/pg_grad_snr_debiased": (mean_sq - trace / n) / var_at_batch,
        "pgvar/pg_grad_norm": math.sqrt(mean_sq),
        "pgvar/pg_grad_n_samples": float(n),
        "pgvar/pg_grad_batch_size": float(batch_size),
        # McCandlish et al.'s B_simple = tr(Sigma) / |G|^2 with |G|^2 = |m|^2 - tr/N; Byrd et al.'s norm test.
        # (inf when the batch cannot tell the gradient from noise, |G|^2 estimate <= 0).
        "pgvar/noise_scale": trace / (mean_sq - trace / n) if mean_sq - trace / n > 0 else math.inf,
        "pgvar/norm_test_batch_size": trace / (theta**2 * mean_sq),
        "pgvar/mean_gsnr": cockpit_mean_gsnr(per_sample),
        "pgvar/minibatch_cosine_to_batch": float(np.mean(cosines_to_batch)),
    }
    if pairwise:
        values["pgvar/minibatch_pairwise_cosine"] = float(np.mean(pairwise))
    return values


CASES = {
    # name: (algo, env, n_envs, model kwargs, callback kwargs, expected (N, number of minibatches drawn))
    "ppo-cartpole-2envs": (PPO, "CartPole-v1", 2, {"n_steps": 32}, {}, (64, 4)),
    "ppo-dict-observations": (PPO, "DictCartPole", 1, {}, {"max_samples": 32}, (32, 2)),
    "ppo-pendulum-subsampled": (PPO, "Pendulum-v1", 1, {}, {"max_samples": 40}, (32, 2)),
    "ppo-pendulum-vmap": (PPO, "Pendulum-v1", 1, {}, {"method": "vmap", "n_minibatches": 2}, (64, 4)),
    "a2c-cartpole": (A2C, "CartPole-v1", 1, {}, {}, (64, 1)),
    "a2c-pendulum-normalized-subsampled": (
        A2C,
        "Pendulum-v1",
        1,
        {"normalize_advantage": True},
        {"max_samples": 48, "n_minibatches": 3},
        (48, 1),
    ),
    "trpo-cartpole": (TRPO, "CartPole-v1", 1, {}, {}, (64, 1)),
    "trpo-pendulum-subsampling-factor": (TRPO, "Pendulum-v1", 1, {"sub_sampling_factor": 2}, {}, (64, 2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logged_statistics_equal_brute_force(case):
    algo, env_id, n_envs, model_kwargs, callback_kwargs, (n_expected, n_drawn) = CASES[case]
    model = make_model(algo, env_id, n_envs=n_envs, **model_kwargs)
    callback = CapturingCallback(**callback_kwargs)
    model.learn(2 * model.n_steps * model.n_envs, callback=callback)

    assert len(callback.captures) == 2  # one per update
    for capture in callback.captures:
        assert capture["minibatches"].shape[0] == n_drawn
        expected = brute_force_values(model, capture, callback.n_minibatches)
        got = capture["values"]
        assert got["pgvar/pg_grad_n_samples"] == n_expected
        assert set(got) == set(expected)
        for key, value in expected.items():
            # float32 gradients vs the float64 loop; the debiased SNR and B_simple carry a difference: compare
            # them on the scale of the plug-in quantities.
            scale = abs(value)
            if key == "pgvar/pg_grad_snr_debiased":
                scale = abs(expected["pgvar/pg_grad_snr"])
            if key == "pgvar/noise_scale":
                scale = abs(value) * max(
                    1.0, abs(expected["pgvar/pg_grad_snr"] / expected["pgvar/pg_grad_snr_debiased"])
                )
            if math.isinf(value):
                assert got[key] == value, (key, got[key], value)
                continue
            assert abs(got[key] - value) <= 1e-4 * scale + 1e-6, (key, got[key], value)
    # ... and the latest measurement is what went to the logger.
    for key, value in callback.captures[-1]["values"].items():
        assert callback.last_values[key] == value


def test_pg_grad_norm_is_the_norm_of_ppos_own_loss_gradient_at_the_start_of_the_update():
    """At ratio 1 (the parameters the update starts from, old log-probs from the buffer), the mean of PPO's
    clipped-surrogate gradients over the drawn minibatches is the callback's full-batch estimate m."""
    model = make_model(PPO, "Pendulum-v1")
    callback = CapturingCallback()
    original_draw = callback._draw_minibatches

    def draw_and_keep_log_probs(n_total, batch_size):
        out = original_draw(n_total, batch_size)
        callback._capture["old_log_prob"] = model.rollout_buffer.log_probs.copy()
        return out

    callback._draw_minibatches = draw_and_keep_log_probs
    model.learn(model.n_steps, callback=callback)
    capture = callback.captures[0]
    policy = capture["policy"]
    observations = torch.as_tensor(swap_and_flatten(capture["observations"]))
    actions = torch.as_tensor(swap_and_flatten(capture["actions"]))
    advantages = torch.as_tensor(swap_and_flatten(capture["advantages"])).reshape(-1)
    old_log_prob = torch.as_tensor(swap_and_flatten(capture["old_log_prob"])).reshape(-1)
    params = [p for name, p in policy.named_parameters() if "value" not in name]
    clip_range = model.clip_range(1.0)
    grads = []
    for row in capture["minibatches"]:  # SB3 PPO.train's policy loss, line by line
        row = torch.as_tensor(row)
        _, log_prob, _ = policy.evaluate_actions(observations[row], actions[row])
        adv = sb3_normalize(advantages[row])
        ratio = torch.exp(log_prob - old_log_prob[row])
        assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5)
        policy_loss = -torch.min(adv * ratio, adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)).mean()
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(policy_loss, params)]).double())
    mean = torch.stack(grads).mean(0)
    assert capture["values"]["pgvar/pg_grad_norm"] == pytest.approx(float(mean.norm()), rel=1e-4)


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize(("algo", "max_grad_norm"), [(PPO, 14.0), (A2C, 20.0)])
def test_grad_norm_before_clip_equals_clip_grad_norm_return(algo, max_grad_norm, monkeypatch, tmp_path):
    returned: list[list[float]] = []
    original_clip = torch.nn.utils.clip_grad_norm_

    def spying_clip(parameters, max_norm, *args, **kwargs):
        norm = original_clip(parameters, max_norm, *args, **kwargs)
        returned[-1].append(float(norm))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spying_clip)
    model = make_model(algo, "CartPole-v1", max_grad_norm=max_grad_norm)
    original_train = model.train

    def train():
        returned.append([])
        original_train()

    model.train = train
    model.set_logger(configure(str(tmp_path), ["csv"]))
    callback = GradientVarianceCallback()
    n_updates = 3
    model.learn(n_updates * model.n_steps, callback=callback, log_interval=1)

    steps_per_update = 2 * 4 if algo is PPO else 1  # n_epochs * minibatches, or A2C's single step
    assert [len(r) for r in returned] == [steps_per_update] * n_updates
    # Some steps were clipped, so a norm read after clipping would differ from clip_grad_norm_'s return.
    assert max(max(r) for r in returned) > max_grad_norm
    rows = read_csv(tmp_path / "progress.csv")
    assert len(rows) == n_updates
    assert rows[0]["pgvar/grad_norm_before_clip"] == ""  # dumped before the first train()

    def check(values, norms):
        assert float(values["pgvar/grad_norm_before_clip"]) == pytest.approx(np.mean(norms), rel=1e-5)
        assert float(values["pgvar/grad_norm_before_clip_max"]) == pytest.approx(max(norms), rel=1e-5)
        assert float(values["pgvar/grad_clip_fraction"]) == np.mean(np.array(norms) > max_grad_norm)

    for row, norms in zip(rows[1:], returned[:-1]):  # update k's norms reach the dump after rollout k + 1
        check(row, norms)
    check(callback.last_values, returned[-1])  # the last update's norms: kept at on_training_end


def test_trpo_logs_no_grad_norm_before_clip_and_removes_no_hooks_it_did_not_add():
    model = make_model(TRPO, "CartPole-v1")
    callback = GradientVarianceCallback()
    model.learn(2 * model.n_steps, callback=callback)
    assert "pgvar/pg_grad_norm" in callback.last_values
    assert not any(key.startswith("pgvar/grad_norm_before_clip") for key in callback.last_values)
    assert callback._handles == []


def test_hooks_are_removed_after_training():
    model = make_model(A2C, "CartPole-v1")
    callback = GradientVarianceCallback()
    model.learn(2 * model.n_steps, callback=callback)
    assert callback._handles == []
    before = dict(callback.last_values)
    loss = sum(p.square().sum() for p in model.policy.parameters())
    loss.backward()
    model.policy.optimizer.step()
    assert callback._step_norms == [] and callback._pending_norms == {}
    assert callback.last_values == before


def test_values_reach_the_csv_logger(tmp_path):
    model = make_model(PPO, "CartPole-v1")
    model.set_logger(configure(str(tmp_path), ["csv"]))
    callback = GradientVarianceCallback()
    model.learn(2 * model.n_steps, callback=callback, log_interval=1)
    rows = read_csv(tmp_path / "progress.csv")
    assert len(rows) == 2
    last = rows[-1]
    for key in (
        "pgvar/pg_grad_cov_trace",
        "pgvar/pg_grad_var_at_batch",
        "pgvar/pg_grad_snr",
        "pgvar/pg_grad_snr_debiased",
        "pgvar/pg_grad_norm",
        "pgvar/minibatch_cosine_to_batch",
        "pgvar/minibatch_pairwise_cosine",
        "pgvar/grad_norm_before_clip",
        "pgvar/grad_norm_before_clip_max",
        "pgvar/grad_clip_fraction",
    ):
        assert math.isfinite(float(last[key])), key
    # the second row holds the second measurement, which is the callback's latest
    assert float(last["pgvar/pg_grad_cov_trace"]) == pytest.approx(
        callback.last_values["pgvar/pg_grad_cov_trace"]
    )
    assert float(last["pgvar/pg_grad_cov_trace"]) > 0


def test_every_n_updates_is_respected(tmp_path):
    model = make_model(PPO, "CartPole-v1")
    model.set_logger(configure(str(tmp_path), ["csv"]))
    callback = CapturingCallback(every_n_updates=2)
    model.learn(5 * model.n_steps, callback=callback, log_interval=1)
    rows = read_csv(tmp_path / "progress.csv")
    assert len(rows) == 5
    measured = [row["pgvar/pg_grad_cov_trace"] != "" for row in rows]
    assert measured == [True, False, True, False, True]
    # grad norms of the measured updates 1 and 3 arrive at the next rollout end (rows 2 and 4)
    clip_logged = [row.get("pgvar/grad_norm_before_clip", "") != "" for row in rows]
    assert clip_logged == [False, True, False, True, False]
    assert len(callback.captures) == 3
    assert "pgvar/grad_norm_before_clip" in callback.last_values  # update 5's, kept at training end


@pytest.mark.parametrize("algo", [PPO, TRPO])
def test_callback_does_not_change_training(algo):
    trained = []
    for callback in (None, GradientVarianceCallback()):
        model = make_model(algo, "Pendulum-v1")
        model.learn(2 * model.n_steps, callback=callback)
        trained.append({k: v.clone() for k, v in model.policy.state_dict().items()})
    assert trained[0].keys() == trained[1].keys()
    for key in trained[0]:
        assert torch.equal(trained[0][key], trained[1][key]), key


def test_same_seed_same_values():
    values = []
    for _ in range(2):
        model = make_model(PPO, "CartPole-v1")
        callback = GradientVarianceCallback(max_samples=32)
        model.learn(model.n_steps, callback=callback)
        values.append(callback.last_values)
    assert values[0] == values[1]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"every_n_updates": 0}, "every_n_updates"),
        ({"every_n_updates": 1.5}, "every_n_updates"),
        ({"every_n_updates": "2"}, "every_n_updates"),
        ({"every_n_updates": True}, "every_n_updates"),
        ({"max_samples": 1}, "max_samples"),
        ({"max_samples": -5}, "max_samples"),
        ({"n_minibatches": 0}, "n_minibatches"),
        ({"method": "exact"}, "method"),
        ({"seed": -1}, "seed"),
        ({"seed": 0.5}, "seed"),
        ({"measure_after_update": "yes"}, "measure_after_update"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, name):
    (value,) = kwargs.values()
    with pytest.raises(ValueError, match=name) as info:
        GradientVarianceCallback(**kwargs)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("algo_name", ["SAC", "DQN"])
def test_off_policy_model_is_refused_at_init_with_a_clear_error(algo_name):
    """Issue 11.8: on SAC/DQN the callback used to fail at the first rollout end with AttributeError
    ('... has no attribute rollout_buffer'); now learn() refuses it before any step, naming the model."""
    import stable_baselines3

    algo = getattr(stable_baselines3, algo_name)
    env_id = "Pendulum-v1" if algo_name == "SAC" else "CartPole-v1"
    model = algo("MlpPolicy", env_id, learning_starts=0, seed=0, device="cpu")
    with pytest.raises(TypeError, match=f"on-policy algorithm.*got {algo_name}, an off-policy algorithm"):
        model.learn(4, callback=GradientVarianceCallback())
    assert model.num_timesteps == 0


def test_norm_test_theta_option_scales_the_batch_size():
    values = []
    for theta in (0.9, 0.45):
        model = make_model(PPO, "CartPole-v1")
        callback = GradientVarianceCallback(max_samples=32, norm_test_theta=theta)
        model.learn(model.n_steps, callback=callback)
        values.append(callback.last_values["pgvar/norm_test_batch_size"])
    assert GradientVarianceCallback().norm_test_theta == 0.9  # pgvar.measure.norm_test's default
    assert values[1] == pytest.approx(4 * values[0], rel=1e-9)
    with pytest.raises(ValueError, match="norm_test_theta"):
        GradientVarianceCallback(norm_test_theta=0.0)


class RolloutKeepingCallback(GradientVarianceCallback):
    """Keeps a copy of each measured rollout's observations, actions and behaviour log-probs."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rollouts: list[dict] = []
        self.trust_values: list[dict] = []

    def _on_rollout_end(self):
        buffer = self.model.rollout_buffer
        observations = buffer.observations
        self.rollouts.append(
            {
                "observations": (
                    {key: swap_and_flatten(value).copy() for key, value in observations.items()}
                    if isinstance(observations, dict)
                    else swap_and_flatten(observations).copy()
                ),
                "actions": swap_and_flatten(buffer.actions).copy(),
                "log_probs": swap_and_flatten(buffer.log_probs).copy().reshape(-1),
            }
        )
        super()._on_rollout_end()

    def measure_trust_region(self):
        values = super().measure_trust_region()
        if values:
            self.trust_values.append(values)
        return values


@pytest.mark.parametrize(
    ("algo", "env_id"),
    [(PPO, "CartPole-v1"), (PPO, "DictCartPole"), (A2C, "Pendulum-v1"), (TRPO, "CartPole-v1")],
)
def test_trust_region_values_equal_the_library_on_log_probs_recomputed_after_learn(algo, env_id):
    model = make_model(algo, env_id, n_envs=2, n_steps=32)
    callback = RolloutKeepingCallback(max_samples=32)
    model.learn(2 * model.n_steps * model.n_envs, callback=callback)
    assert len(callback.rollouts) == 2 and len(callback.trust_values) == 2  # the last one at training end
    rollout = callback.rollouts[-1]
    if isinstance(rollout["observations"], dict):
        observations = {k: torch.as_tensor(v) for k, v in rollout["observations"].items()}
    else:
        observations = torch.as_tensor(rollout["observations"])
    model.policy.set_training_mode(False)
    with torch.no_grad():
        log_prob = policy_log_prob(model.policy, observations, torch.as_tensor(rollout["actions"]))
    clip = model.clip_range(model._current_progress_remaining) if algo is PPO else None
    expected = trust_region_diagnostics(log_prob, torch.as_tensor(rollout["log_probs"]), clip_range=clip)
    got = callback.trust_values[-1]
    assert got == pytest.approx(
        {
            "pgvar/ess": expected.effective_sample_size,
            "pgvar/max_ratio": expected.max_ratio,
            "pgvar/kl_k1": expected.kl_k1,
            "pgvar/kl_k3": expected.kl_k3,
            **({} if clip is None else {"pgvar/clip_fraction": expected.clip_fraction}),
        },
        rel=1e-9,
        abs=1e-12,
    )
    assert got["pgvar/kl_k3"] > 0  # the update moved the policy
    for key, value in got.items():
        assert callback.last_values[key] == value


@pytest.mark.parametrize("algo", [PPO, A2C, TRPO])
def test_new_keys_reach_the_csv_logger(algo, tmp_path):
    model = make_model(algo, "CartPole-v1")
    model.set_logger(configure(str(tmp_path), ["csv"]))
    model.learn(3 * model.n_steps, callback=GradientVarianceCallback(), log_interval=1)
    rows = read_csv(tmp_path / "progress.csv")
    keys = ["pgvar/noise_scale", "pgvar/norm_test_batch_size"]
    for key in keys:
        assert all(row[key] != "" for row in rows), key
    # the update of rollout k is diagnosed at the start of rollout k + 1, so it is dumped with row k + 1
    trust = ["pgvar/ess", "pgvar/max_ratio", "pgvar/kl_k1", "pgvar/kl_k3"]
    trust += ["pgvar/clip_fraction"] if algo is PPO else []
    for key in trust:
        assert [row.get(key, "") != "" for row in rows] == [False, True, True], key
        assert math.isfinite(float(rows[-1][key])), key
    assert ("pgvar/clip_fraction" in rows[-1]) == (algo is PPO)


# ------------------------------------------------------------------------- the gradient after the update
FIRST_STEP_KEYS = [
    "pg_grad_cov_trace",
    "pg_grad_var_at_batch",
    "pg_grad_snr",
    "pg_grad_snr_debiased",
    "pg_grad_norm",
    "noise_scale",
    "norm_test_batch_size",
    "mean_gsnr",
]


class AfterUpdateCallback(GradientVarianceCallback):
    """Keeps the first-step values, and a copy of the policy and the kept inputs at each after-update measurement."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first_values: list[dict] = []
        self.after: list[dict] = []

    def measure_policy_gradient(self):
        values = super().measure_policy_gradient()
        self.first_values.append(values)
        return values

    def measure_gradient_after_update(self):
        kept = self._after_update_inputs
        policy = detached_policy_copy(self.model.policy)  # deepcopy refuses the last action_dist's graph
        values = super().measure_gradient_after_update()
        if values:
            self.after.append({"policy": policy, "kept": kept, "values": values})
        return values


def loop_after_update_values(model, record, theta=0.9, epsilon=1e-5) -> dict[str, float]:
    """The after-update statistics by one backward per sample of SB3's clipped-surrogate lines (float64 stats)."""
    policy = record["policy"]
    policy.set_training_mode(False)
    (advantages, old_log_prob, actions, *observations), first_mean, batch_size = record["kept"]
    clip = model.clip_range(model._current_progress_remaining)
    # sorted by name: the order pgvar.measure.flatten gives the first-step mean
    params = [p for name, p in sorted(policy.named_parameters()) if "value" not in name]
    grads, log_probs = [], []
    for i in range(advantages.shape[0]):
        log_prob = policy_log_prob(policy, observations[0][i : i + 1], actions[i : i + 1])
        ratio = torch.exp(log_prob - old_log_prob[i])
        loss = -torch.min(advantages[i] * ratio, advantages[i] * torch.clamp(ratio, 1 - clip, 1 + clip)).sum()
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double())
        log_probs.append(log_prob.detach())
    per_sample = torch.stack(grads)
    n = per_sample.shape[0]
    mean = per_sample.mean(0)
    trace = float((per_sample - mean).square().sum()) / (n - 1)
    mean_sq = float(mean.square().sum())
    var_at_batch = trace / batch_size
    diagnostics = trust_region_diagnostics(torch.cat(log_probs), old_log_prob, clip_range=clip)
    values = {
        "pg_grad_cov_trace": trace,
        "pg_grad_var_at_batch": var_at_batch,
        "pg_grad_snr": mean_sq / var_at_batch,
        "pg_grad_snr_debiased": (mean_sq - trace / n) / var_at_batch,
        "pg_grad_norm": math.sqrt(mean_sq),
        "noise_scale": trace / (mean_sq - trace / n) if mean_sq - trace / n > 0 else math.inf,
        "norm_test_batch_size": trace / (theta**2 * mean_sq),
        "mean_gsnr": cockpit_mean_gsnr(per_sample, epsilon),
        "cosine_to_first_step": float(mean @ first_mean / (mean.norm() * first_mean.norm())),
        "ess": diagnostics.effective_sample_size,
        "max_ratio": diagnostics.max_ratio,
        "kl_k1": diagnostics.kl_k1,
        "kl_k3": diagnostics.kl_k3,
        "clip_fraction": diagnostics.clip_fraction,
    }
    return {"pgvar/after_update/" + key: value for key, value in values.items()}


def test_after_update_at_ratio_one_equals_the_first_step_measurement():
    """No update in between (learning rate 0): the clipped surrogate's gradient is -A grad log pi."""
    model = make_model(PPO, "CartPole-v1", learning_rate=0.0)
    callback = AfterUpdateCallback(max_samples=32)
    model.learn(model.n_steps, callback=callback)
    first, after = callback.first_values[0], callback.after[0]["values"]
    for key in FIRST_STEP_KEYS:
        assert after["pgvar/after_update/" + key] == pytest.approx(first["pgvar/" + key], rel=1e-5), key
    assert after["pgvar/after_update/cosine_to_first_step"] == pytest.approx(1.0, abs=1e-6)
    assert after["pgvar/after_update/ess"] == pytest.approx(1.0, abs=1e-6)
    assert after["pgvar/after_update/max_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert after["pgvar/after_update/clip_fraction"] == 0.0
    assert callback.last_values["pgvar/after_update/mean_gsnr"] == after["pgvar/after_update/mean_gsnr"]


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_after_update_statistics_equal_a_loop_reference_after_a_real_ppo_update(method):
    # a small clip range, so that the clip binds on some samples after the update
    model = make_model(PPO, "CartPole-v1", n_steps=128, learning_rate=1e-2, n_epochs=10, clip_range=0.05)
    callback = AfterUpdateCallback(max_samples=128, method=method)
    model.learn(2 * model.n_steps, callback=callback)
    assert len(callback.after) == 2  # at the next rollout start, and at training end
    for record in callback.after:
        expected = loop_after_update_values(model, record)
        got = record["values"]
        assert set(got) == set(expected)
        for key, value in expected.items():
            if math.isinf(value):  # B_simple when the gradient estimate is below its noise
                assert got[key] == value, key
                continue
            scale = abs(value)
            if key.endswith(("snr_debiased", "noise_scale")):  # a difference of two terms
                scale = max(scale, abs(expected["pgvar/after_update/pg_grad_snr"]))
            assert abs(got[key] - value) <= 1e-4 * scale + 1e-6, (key, got[key], value)
        # the ratio diagnostics are not trivial: the update moved the policy and the clip is active
        assert got["pgvar/after_update/kl_k3"] > 1e-4
        assert got["pgvar/after_update/max_ratio"] > 1.0
        assert got["pgvar/after_update/clip_fraction"] > 0.0
        assert got["pgvar/after_update/ess"] < 1.0
        assert got["pgvar/after_update/cosine_to_first_step"] < 0.999


def test_measure_after_update_off_writes_no_after_update_keys(tmp_path):
    model = make_model(PPO, "CartPole-v1")
    model.set_logger(configure(str(tmp_path), ["csv"]))
    callback = GradientVarianceCallback(max_samples=32, measure_after_update=False)
    model.learn(2 * model.n_steps, callback=callback, log_interval=1)
    assert not [key for key in callback.last_values if key.startswith("pgvar/after_update/")]
    assert "pgvar/ess" in callback.last_values and "pgvar/mean_gsnr" in callback.last_values
    on = GradientVarianceCallback(max_samples=32)
    model = make_model(PPO, "CartPole-v1")
    model.set_logger(configure(str(tmp_path / "on"), ["csv"]))
    model.learn(3 * model.n_steps, callback=on, log_interval=1)
    rows = read_csv(tmp_path / "on" / "progress.csv")
    # like the trust-region keys: the update of rollout k is measured at the start of rollout k + 1
    assert [row.get("pgvar/after_update/pg_grad_norm", "") != "" for row in rows] == [False, True, True]
