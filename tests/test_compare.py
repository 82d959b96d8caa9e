"""The paired-comparison engine and the `pgvar compare` command."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pgvar import cli
from pgvar.compare import ESTIMATORS, compare_on_problem, make_problem
from pgvar.compare.fitted import FittedCritic, FittedValue
from pgvar.compare.problem_engine import _learning_signals, _problem_returns, _qprop_estimate, _score_vectors
from pgvar.estimators import discounted_returns


@pytest.mark.parametrize("name", ["tabular", "bandit", "lqr"])
def test_scores_equal_a_loop_of_autograd_calls(name):
    problem = make_problem(name)
    params = problem.initial_parameters(0)
    batch = problem.sample_episodes(params, 3, torch.Generator().manual_seed(1))
    scores = _score_vectors(problem, params, batch)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    for t, n in batch.mask.nonzero().tolist():
        logp = problem.log_prob(leaves, batch.observations[t, n], batch.actions[t, n])
        grads = torch.autograd.grad(logp, list(leaves.values()))
        expected = torch.cat([g.reshape(-1) for _, g in sorted(zip(leaves, grads))])
        torch.testing.assert_close(scores[t, n], expected)
    assert torch.all(scores[~batch.mask] == 0)


def test_reinforce_signal_matches_a_per_episode_loop():
    problem = make_problem("tabular")
    params = problem.initial_parameters(0)
    batch = problem.sample_episodes(params, 4, torch.Generator().manual_seed(2))
    scores = _score_vectors(problem, params, batch)
    signals = _learning_signals(["none"], problem, params, batch, scores, None, problem.gamma, 0.95)
    estimate = torch.einsum("tn,tnp->p", signals["none"], scores) / 4
    # Brute force: for each episode, sum_t gamma^t G_t grad log pi(a_t|s_t), with G_t by a plain loop.
    total = torch.zeros_like(estimate)
    for n in range(4):
        steps = batch.mask[:, n].nonzero().squeeze(1).tolist()
        rewards = [float(batch.rewards[t, n]) for t in steps]
        for t in steps:
            G = sum(problem.gamma ** (k - t) * rewards[k] for k in range(t, len(steps)))
            total += problem.gamma**t * G * scores[t, n]
    torch.testing.assert_close(estimate, total / 4)
    expected_returns = discounted_returns(batch.rewards, batch.terminated, batch.truncated, gamma=problem.gamma)
    assert torch.allclose(signals["none"][batch.mask], (expected_returns * problem.gamma**batch.timesteps)[batch.mask])


def test_compare_is_unbiased_and_orders_variance_on_the_bandit():
    result = compare_on_problem(
        "bandit", estimators=["none", "optimal", "exact_value"], batch_size=16, n_batches=150, seed=3
    )
    # Unbiased estimators: per-coordinate z-scores stay within a Bonferroni-style bound over P coordinates.
    bound = 4.0 + math.sqrt(2 * math.log(result.n_parameters))
    for row in result.estimators:
        assert row.bias_max_abs_z < bound, row
        assert 0.0 < row.cosine <= 1.0
    none, optimal, exact = (result.summary(n) for n in ("none", "optimal", "exact_value"))
    assert exact.variance < optimal.variance < none.variance
    assert none.variance_ratio == 1.0
    torch.testing.assert_close(exact.snr, result.exact_gradient_norm**2 / exact.variance)


def test_compare_detects_the_bias_of_a_same_batch_mean_baseline():
    """With two one-step episodes per batch, b = (G_1 + G_2) / 2 correlates with each sample:
    E[g_1 (G_1 - b)] = E[g_1 G_1] / 2, so the estimate is grad J / 2. The engine must flag it."""
    result = compare_on_problem("bandit", estimators=["mean", "exact_value"], batch_size=2, n_batches=400)
    bound = 4.0 + math.sqrt(2 * math.log(result.n_parameters))
    biased, unbiased = result.summary("mean"), result.summary("exact_value")
    assert biased.bias_max_abs_z > bound
    assert unbiased.bias_max_abs_z < bound
    assert biased.cosine > 0  # the right direction, half the length: a scale bias, not noise


def test_compare_is_reproducible_and_serializable(tmp_path):
    a = compare_on_problem("tabular", batch_size=8, n_batches=10, seed=5)
    b = compare_on_problem("tabular", batch_size=8, n_batches=10, seed=5)
    assert a.estimators == b.estimators
    assert [row.name for row in a.estimators] == list(ESTIMATORS)
    assert json.loads(json.dumps(a.to_dict()))["estimators"][0]["name"] == "none"
    with pytest.raises(KeyError, match="no estimator 'nope'"):
        a.summary("nope")


def test_batch_size_one_reports_a_zero_variance_instead_of_dividing_by_it():
    """Issue 11.8: with one one-step bandit episode per batch the same-batch mean baseline gives G - G = 0, an
    estimate of exactly 0 every time; ratios to that zero variance are inf / nan (ZeroDivisionError before)."""
    result = compare_on_problem("bandit", estimators=["mean", "none"], batch_size=1, n_batches=5)
    mean, none = result.summary("mean"), result.summary("none")
    assert mean.variance == 0.0 and mean.snr == math.inf and math.isnan(mean.variance_ratio)
    assert none.variance > 0 and none.variance_ratio == math.inf
    assert json.loads(json.dumps(result.to_dict()))["batch_size"] == 1
    # Multi-step problems work at batch size 1 as well.
    assert compare_on_problem("tabular", batch_size=1, n_batches=3).batch_size == 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(estimators=["magic"]), "estimators must be one of 'none', .*; got 'magic'"),
        (dict(estimators=[]), "estimators must name at least one estimator"),
        (dict(batch_size=0), "batch_size must be an integer > 0, got 0"),
        (dict(n_batches=1), "n_batches must be >= 2"),
        (dict(gae_lambda=1.5), "gae_lambda must be in \\[0, 1\\], got 1.5"),
    ],
)
def test_compare_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compare_on_problem("tabular", **kwargs)
    with pytest.raises(ValueError, match="problem must be one of 'tabular', 'bandit', 'lqr'; got 'chess'"):
        make_problem("chess")


def test_cli_writes_table_json_and_png(tmp_path, capsys):
    code = cli.main(["compare", "--problem", "bandit", "--n-batches", "12", "--batch-size", "8", "--output", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "optimal" in out and "exact_value" in out and "optimal_constant" not in out
    data = json.loads((tmp_path / "compare_bandit_seed0.json").read_text())
    assert data["n_batches"] == 12 and len(data["estimators"]) == len(ESTIMATORS)
    assert data["versions"]["torch"] == torch.__version__
    png = (tmp_path / "compare_bandit_seed0.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare_bandit_seed0.json", "compare_bandit_seed0.png"]


def test_cli_bad_input_exits_with_a_message_and_keeps_old_results(tmp_path, capsys):
    old = tmp_path / "compare_tabular_seed0.json"
    old.write_text("previous results")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", "--gae-lambda", "2", "--output", str(tmp_path)])
    assert exit_info.value.code == 2
    # Issue 15: the message names the flag, not the library's argument (was "gae_lambda must be in [0, 1], got 2.0").
    assert "--gae-lambda: must be in [0, 1], got '2'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["compare", "--batch-size", "0"])
    assert "must be a whole number > 0, got '0'" in capsys.readouterr().err
    assert old.read_text() == "previous results"


# ------------------------------------------------------------------------------------ real environments
def test_compare_on_env_constant_baselines_vanish_under_normalization():
    from pgvar.compare import compare_on_env

    result = compare_on_env(
        "CartPole-v1", train_steps=0, n_envs=2, n_steps=32, n_batches=3, reference_batches=2, seed=1
    )
    assert len(result.estimators) == 12
    # Normalizing subtracts the batch mean, so any constant baseline gives the same gradient.
    rows = [result.summary(b, "batch") for b in ("none", "mean", "optimal")]
    for row in rows[1:]:
        assert row.snr == pytest.approx(rows[0].snr, rel=1e-4)
        assert row.cosine == pytest.approx(rows[0].cosine, rel=1e-4)
    # Without normalization they differ, and the reference is GAE(lambda=1): every cosine is a cosine.
    assert result.summary("none", "none").snr != pytest.approx(result.summary("optimal", "none").snr, rel=1e-3)
    assert all(-1.0 <= row.cosine <= 1.0 and row.snr > 0 for row in result.estimators)
    with pytest.raises(ValueError, match="baselines must be one of 'value', 'none', 'mean', 'optimal'; got 'v'"):
        compare_on_env("CartPole-v1", baselines=["v"])
    with pytest.raises(ValueError, match="train_steps must be a whole number >= 0, got -1"):
        compare_on_env("CartPole-v1", train_steps=-1)


def test_cli_env_mode_with_a_saved_model(tmp_path, capsys):
    from stable_baselines3 import PPO as SB3PPO

    path = tmp_path / "model.zip"
    SB3PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, seed=0, device="cpu").save(path)
    args = ["compare", "--env", "CartPole-v1", "--model", str(path), "--n-envs", "2", "--n-steps", "32",
            "--n-batches", "3", "--reference-batches", "2", "--output", str(tmp_path)]
    assert cli.main(args) == 0
    assert "optimal" in capsys.readouterr().out
    data = json.loads((tmp_path / "compare_CartPole-v1_seed0.json").read_text())
    assert data["trained_steps"] == 0 and len(data["estimators"]) == 12
    assert (tmp_path / "compare_CartPole-v1_seed0.png").read_bytes().startswith(b"\x89PNG")


# ------------------------------------------------------------------------------------------------- Q-Prop
@pytest.mark.parametrize("name", ["bandit", "lqr", "tabular"])
def test_qprop_estimate_equals_autograd_of_its_surrogate(name):
    """The engine's Q-Prop estimate (per-sample scores x signal + per-sample analytic terms) equals one autograd
    pass over the batch surrogate sum_t gamma^t [signal_t log pi(a_t|s_t) + analytic surrogate_t] / N."""
    problem = make_problem(name)
    params = problem.initial_parameters(0)
    generator = torch.Generator().manual_seed(4)
    fit = problem.sample_episodes(params, 256, generator)
    value, critic = FittedValue.fit(problem, fit, problem.gamma), FittedCritic.fit(problem, fit, problem.gamma)
    batch = problem.sample_episodes(params, 6, generator)
    scores = _score_vectors(problem, params, batch)
    returns = _problem_returns(problem, params, batch, problem.gamma)
    estimate = _qprop_estimate(problem, params, batch, scores, returns, value, critic, problem.gamma)

    mask, gamma = batch.mask, problem.gamma
    discount = gamma ** batch.timesteps.double()
    adv_hat = returns - value(batch.observations, batch.timesteps)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    logp = problem.log_prob(leaves, batch.observations, batch.actions)
    if name == "tabular":
        n_actions = problem.action_space.n
        q_all = critic.all_actions(batch.observations, batch.timesteps)
        all_logp = problem.log_prob(
            leaves, batch.observations.unsqueeze(-1).expand(*mask.shape, n_actions),
            torch.arange(n_actions).expand(*mask.shape, n_actions),
        )
        probs = all_logp.exp()
        q_taken = q_all.gather(-1, batch.actions.unsqueeze(-1)).squeeze(-1)
        signal = adv_hat - (q_taken - (probs.detach() * q_all).sum(-1))
        analytic = (probs * q_all).sum(-1)
    else:
        mu = problem.mean_action(leaves, batch.observations)
        at_mean = mu.detach().clone().requires_grad_(True)
        (grad_q,) = torch.autograd.grad(critic(batch.observations, at_mean, batch.timesteps).sum(), at_mean)
        adv_bar = (grad_q * (batch.actions - mu.detach())).sum(-1)
        # conservative, cross-fitted: each half of the episodes gets the indicator of the other half's covariance
        products = (adv_hat * adv_bar * mask).detach()
        fold = torch.arange(mask.shape[-1]) * 2 // mask.shape[-1]
        other_positive = [float(products[:, fold == 1 - k].sum() > 0) for k in (0, 1)]
        eta = torch.tensor(other_positive, dtype=adv_hat.dtype)[fold]
        signal = adv_hat - eta * adv_bar
        analytic = eta * (grad_q * mu).sum(-1)
    surrogate = ((signal.detach() * logp + analytic) * discount * mask).sum() / batch.n_episodes
    grads = torch.autograd.grad(surrogate, list(leaves.values()))
    expected = torch.cat([g.reshape(-1) for _, g in sorted(zip(leaves, grads))])
    torch.testing.assert_close(estimate, expected)


@pytest.mark.parametrize("name", ["bandit", "lqr", "tabular"])
def test_qprop_with_a_fitted_critic_is_unbiased(name):
    result = compare_on_problem(name, estimators=["none", "qprop_fitted_critic"], batch_size=16, n_batches=150, seed=2)
    bound = 4.0 + math.sqrt(2 * math.log(result.n_parameters))
    assert result.summary("qprop_fitted_critic").bias_max_abs_z < bound
    # A critic from the right function class removes variance that no state baseline can (one-step bandit).
    if name == "bandit":
        assert result.summary("qprop_fitted_critic").variance_ratio < 0.5


@pytest.mark.parametrize("name", ["bandit", "tabular"])
def test_qprop_as_published_is_biased_and_fixed_eta_is_not(name):
    """The Mirage normalization trap at the gradient level: centred signal / sigma with an unscaled analytic term,
    times sigma, leans toward the critic's gradient; its bias is many standard errors, unlike eta = 1's."""
    result = compare_on_problem(
        name, estimators=["qprop_fixed_eta", "qprop_as_published"], batch_size=16, n_batches=100, seed=3
    )
    bound = 4.0 + math.sqrt(2 * math.log(result.n_parameters))
    assert result.summary("qprop_fixed_eta").bias_max_abs_z < bound
    assert result.summary("qprop_as_published").bias_max_abs_z > bound


def test_qprop_needs_a_mean_action_on_continuous_problems():
    problem = make_problem("bandit")

    class NoMean:  # the protocol without the optional mean_action
        def __getattr__(self, item):
            if item == "mean_action":
                raise AttributeError(item)
            return getattr(problem, item)

    with pytest.raises(ValueError, match="'qprop_fitted_critic' needs mean_action"):
        compare_on_problem(NoMean(), estimators=["qprop_fitted_critic"], n_batches=2)


# ------------------------------------------------------------------------------- the suite's added rows
@pytest.mark.parametrize(
    "name, rows",
    [
        ("bandit", ["gae1_fitted_value", "qprop_adaptive_eta", "qprop_consistent", "factorized_baseline"]),
        ("lqr", ["gae1_fitted_value", "qprop_adaptive_eta", "horizon_value"]),
        ("tabular", ["gae1_fitted_value", "all_action"]),
    ],
)
def test_added_rows_are_unbiased_on_exact_problems(name, rows):
    """Acceptance of the variance suite: every unbiased row has |bias z| < 4 on the exact problems (the GAE(0.95)
    horizon-aware row on the LQR too: with the fitted values nearly exact its lambda bias is below the noise)."""
    result = compare_on_problem(name, estimators=["none", *rows, "qprop_as_published"], batch_size=16,
                                n_batches=120, seed=5)  # fmt: skip
    for row in rows:
        assert result.summary(row).bias_max_abs_z < 4.0, result.summary(row)
    assert result.summary("qprop_as_published").bias_max_abs_z >= 4.0  # flagged biased


def test_problem_specific_rows_are_refused_where_they_do_not_apply():
    from pgvar.compare import applicable_problem_estimators

    assert "all_action" in applicable_problem_estimators(make_problem("tabular"))
    assert "factorized_baseline" not in applicable_problem_estimators(make_problem("lqr"))  # one action dimension
    assert "horizon_value" not in applicable_problem_estimators(make_problem("tabular"))  # no fixed horizon
    for problem, row, match in [
        ("bandit", "all_action", "Discrete"),
        ("tabular", "horizon_value", "finite-horizon"),
        ("lqr", "factorized_baseline", ">= 2 dimensions"),
    ]:
        with pytest.raises(ValueError, match=match):
            compare_on_problem(problem, estimators=[row], n_batches=2)


def test_horizon_aware_fit_is_the_least_squares_solution_of_its_loss():
    """L-BFGS on horizon_aware_value_loss with linear heads reaches the normal equations' solution."""
    from pgvar.compare.fitted import FittedHorizonValue, value_features
    from pgvar.estimators import horizon_aware_value_targets, time_to_go_factor

    problem = make_problem("lqr")
    params = problem.initial_parameters(0)
    batch = problem.sample_episodes(params, 200, torch.Generator().manual_seed(0))
    fitted = FittedHorizonValue.fit(problem, batch, problem.gamma)
    phi = value_features(batch.observations, batch.timesteps, None, None)[batch.mask]
    f = time_to_go_factor(batch.timesteps[batch.mask], horizon=problem.horizon, gamma=problem.gamma, dtype=phi.dtype)
    design = torch.cat([phi, f.unsqueeze(-1) * phi], dim=-1)
    targets = horizon_aware_value_targets(
        batch.rewards, batch.terminated, batch.truncated, batch.timesteps, horizon=problem.horizon, gamma=problem.gamma
    )[batch.mask]
    solution = torch.linalg.lstsq(design, targets.unsqueeze(-1)).solution.squeeze(-1)
    predicted = fitted(batch.observations, batch.timesteps)[batch.mask]
    torch.testing.assert_close(predicted, design @ solution, rtol=1e-4, atol=1e-4 * float(targets.abs().max()))


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1", "HalfCheetah-v5"])
def test_env_rows_reduce_to_the_learned_value_row_with_zero_critic_and_baselines(env_id):
    """Q-Prop (eta = 1) and the all-action CV with Q_w = 0, and the factorized baseline with b_k = 0, are the
    GAE(lambda) row exactly; every row gives a finite estimate of the actor's size."""
    from stable_baselines3.common.env_util import make_vec_env

    from pgvar import PPO
    from pgvar.compare import EnvEstimators, applicable_env_estimators
    from pgvar.rollouts import collect_rollout

    env = make_vec_env(env_id, n_envs=2, seed=0)
    model = PPO("MlpPolicy", env, seed=0, device="cpu", n_steps=16, batch_size=32)
    rows = [r for r in applicable_env_estimators(model.policy.action_space, env_id) if r != "mc_value"]
    obs = env.reset()
    fit = []
    for _ in range(2):
        batch, obs = collect_rollout(model.policy, env, 16, obs)
        fit.append(batch)
    prepared = EnvEstimators(model, env_id, rows, fit, fit_steps=5)
    batch, _ = collect_rollout(model.policy, env, 16, obs)
    estimates = prepared.estimates(batch)
    size = sum(p.numel() for p in prepared.actor.params)
    for row, value in estimates.items():
        assert value.shape == (size,) and bool(value.isfinite().all()), row
    for network in (prepared.critic, prepared.factorized):
        if network is not None:
            torch.nn.init.zeros_(network.net[-1].weight)
            torch.nn.init.zeros_(network.net[-1].bias)
    zeroed = prepared.estimates(batch)
    equal_to_value = ["all_action"] if env_id == "CartPole-v1" else ["qprop_fixed_eta"]
    if env_id == "HalfCheetah-v5":
        equal_to_value.append("factorized_baseline")
    for row in equal_to_value:
        torch.testing.assert_close(zeroed[row], zeroed["value"], rtol=1e-5, atol=1e-7)
    # without a critic, the consistent normalization times sigma is the centred GAE signal
    assert not torch.allclose(zeroed["qprop_consistent"], zeroed["value"])


def test_sample_problem_estimates_are_the_compare_batches():
    """The suite's sampler and compare_on_problem see the same batches: same variances."""
    from pgvar.compare import estimator_metrics, sample_problem_estimates

    paired = sample_problem_estimates("bandit", ["none", "exact_value"], batch_size=8, n_batches=6, seed=2)
    result = compare_on_problem("bandit", estimators=["none", "exact_value"], batch_size=8, n_batches=6, seed=2)
    for row in ("none", "exact_value"):
        metrics = estimator_metrics(paired.estimates[row], paired.reference, exact=True, batch_size=8)
        assert metrics["variance"] == pytest.approx(result.summary(row).variance)
        assert metrics["bias_max_abs_z"] == pytest.approx(result.summary(row).bias_max_abs_z)
    torch.testing.assert_close(paired.time_one("none"), paired.estimates["none"][0])
