"""GaussianBandit: closed forms against quadrature, and the Greensmith identity for constant baselines.

Population quantities come from :meth:`GaussianBandit.exact_expectation` (Gauss-Hermite, exact for the
polynomials involved); sample quantities from sample_episodes. The identity

    tr Var(b) = tr Var(b*) + E||g||^2 (b - b*)^2,   b* = E[||g||^2 r] / E[||g||^2]

is exact in the population, and exact algebraically for the empirical second moments with b* computed on the
same samples.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import grad, vmap

from pgvar.estimators import batch_mean_baseline, optimal_constant_baseline
from pgvar.problems import GaussianBandit


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine (20x slower under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=["quadratic", "linear"])
def bandit(request):
    return GaussianBandit(obs_dim=2, action_dim=2, reward=request.param, seed=0)


def flat(params):
    return torch.cat([params[k].reshape(-1) for k in sorted(params)])


def scores(bandit, params, observations, actions):
    """Per-sample grad log pi(a|s), flattened: ``[M, P]``."""
    per_sample = vmap(grad(bandit.log_prob), in_dims=(None, 0, 0))(params, observations, actions)
    return torch.cat([per_sample[k].reshape(observations.shape[0], -1) for k in sorted(per_sample)], dim=-1)


def test_closed_form_return_matches_quadrature_exactly(bandit):
    params = bandit.initial_parameters(seed=1)
    quadrature = bandit.exact_expectation(params, bandit.reward)
    torch.testing.assert_close(bandit.exact_return(params), quadrature, rtol=1e-12, atol=1e-12)
    # more nodes change nothing: the quadrature is exact for these polynomials
    torch.testing.assert_close(bandit.exact_expectation(params, bandit.reward, points_per_dim=7), quadrature)


def test_exact_gradient_equals_the_population_score_function_expectation(bandit):
    """grad J (autograd of the closed form) == E[grad log pi(a|s) r(s, a)] (quadrature, no autograd of J)."""
    params = bandit.initial_parameters(seed=2)
    expected = bandit.exact_expectation(
        params, lambda s, a: scores(bandit, params, s, a) * bandit.reward(s, a)[:, None]
    )
    torch.testing.assert_close(flat(bandit.exact_policy_gradient(params)), expected, rtol=1e-10, atol=1e-10)


def test_state_values_are_the_conditional_expected_reward(bandit):
    """E[(r - V(s)) h(s)] = 0 for h in {1, s_i, s_i s_j} (exact), and V(s) averages to J."""
    params = bandit.initial_parameters(seed=1)

    def residual_moments(s, a):
        residual = (bandit.reward(s, a) - bandit.exact_state_values(params, s))[:, None]
        features = torch.cat(
            [torch.ones_like(s[:, :1]), s, (s[:, :, None] * s[:, None, :]).reshape(len(s), -1)], 1
        )
        return residual * features

    torch.testing.assert_close(
        bandit.exact_expectation(params, residual_moments),
        torch.zeros(7, dtype=torch.float64),
        rtol=0,
        atol=1e-10,
    )
    assert torch.equal(
        bandit.exact_action_values(params, torch.ones(2), torch.zeros(2)),
        bandit.reward(torch.ones(2), torch.zeros(2)),
    )


def test_linear_reward_does_not_depend_on_the_policy_spread():
    bandit = GaussianBandit(obs_dim=3, action_dim=2, reward="linear", seed=4)
    gradient = bandit.exact_policy_gradient(bandit.initial_parameters(seed=0))
    assert torch.equal(gradient["log_std"], torch.zeros(2, dtype=torch.float64))
    assert float(gradient["weight"].abs().max()) > 0.1


def population_moments(bandit, params):
    """E||g||^2, E[||g||^2 r], E[||g||^2 r^2] and grad J, all exact."""

    def moments(s, a):
        sq_norms = scores(bandit, params, s, a).square().sum(-1)
        r = bandit.reward(s, a)
        return torch.stack([sq_norms, sq_norms * r, sq_norms * r * r], dim=-1)

    e_g2, e_g2r, e_g2r2 = bandit.exact_expectation(params, moments)
    return e_g2, e_g2r, e_g2r2, flat(bandit.exact_policy_gradient(params))


def population_trace_variance(moments, baseline: float) -> torch.Tensor:
    """tr Var[g (r - b)] = E[||g||^2 (r - b)^2] - ||grad J||^2 (the mean is grad J for every constant b)."""
    e_g2, e_g2r, e_g2r2, gradient = moments
    return e_g2r2 - 2 * baseline * e_g2r + baseline**2 * e_g2 - gradient.square().sum()


def test_greensmith_identity_and_variance_ordering_in_the_population(bandit):
    params = bandit.initial_parameters(seed=1)
    moments = population_moments(bandit, params)
    e_g2, e_g2r = moments[0], moments[1]
    optimal = e_g2r / e_g2
    mean_return = bandit.exact_return(params)
    var_optimal = population_trace_variance(moments, optimal)
    for b in (0.0, float(mean_return), float(optimal) + 1.3):
        identity_rhs = var_optimal + e_g2 * (b - optimal) ** 2
        torch.testing.assert_close(
            population_trace_variance(moments, b), identity_rhs, rtol=1e-10, atol=1e-10
        )
    assert var_optimal < population_trace_variance(moments, float(mean_return))
    assert var_optimal < population_trace_variance(moments, 0.0)
    # and the direct quadrature of the variance agrees with the moment formula (degree-8 integrand, 5 nodes)
    gradient = moments[3]
    direct = bandit.exact_expectation(
        params,
        lambda s, a: (
            (scores(bandit, params, s, a) * (bandit.reward(s, a) - optimal)[:, None] - gradient)
            .square()
            .sum(-1)
        ),
    )
    torch.testing.assert_close(direct, var_optimal, rtol=1e-10, atol=1e-10)


def test_greensmith_identity_is_exact_for_the_empirical_distribution(bandit):
    """With b* from optimal_constant_baseline on the same samples, the second-moment identity is algebraic."""
    params = bandit.initial_parameters(seed=1)
    batch = bandit.sample_episodes(params, 5_000, torch.Generator().manual_seed(0))
    g = scores(bandit, params, batch.observations[0], batch.actions[0])
    r = batch.rewards[0]
    sq_norms = g.square().sum(-1)
    optimal = optimal_constant_baseline(r, sq_norms)

    def second_moment(b):
        return (g * (r - b)[:, None]).square().sum(-1).mean()

    for b in (0.0, float(batch_mean_baseline(r)), float(optimal) - 2.0):
        torch.testing.assert_close(
            second_moment(b) - second_moment(optimal),
            sq_norms.mean() * (b - optimal) ** 2,
            rtol=1e-9,
            atol=1e-9,
        )
        assert second_moment(optimal) <= second_moment(b)
    # the per-coordinate variant: b*_k minimizes each coordinate's second moment, by E[g_k^2] (b - b*_k)^2
    per_coordinate = optimal_constant_baseline(r, g.square())
    b = float(batch_mean_baseline(r))
    lhs = (g.square() * ((r - b).square()[:, None] - (r[:, None] - per_coordinate).square())).mean(0)
    torch.testing.assert_close(lhs, g.square().mean(0) * (b - per_coordinate) ** 2, rtol=1e-9, atol=1e-9)


def test_sample_variances_match_the_population_and_keep_the_order():
    """Empirical tr Cov of g (r - b), b from separate batches, within 4 SE of the exact population value.

    The quadratic reward is used: there the gaps between the baselines are many standard errors wide, so the
    empirical ordering optimal <= batch mean <= none is a real check, not a coin flip.
    """
    bandit = GaussianBandit(obs_dim=2, action_dim=2, reward="quadratic", seed=0)
    params = bandit.initial_parameters(seed=1)
    moments = population_moments(bandit, params)
    side = bandit.sample_episodes(params, 5_000, torch.Generator().manual_seed(1))
    side_scores = scores(bandit, params, side.observations[0], side.actions[0])
    baselines = {
        "none": 0.0,
        "batch_mean": float(batch_mean_baseline(side.rewards[0])),
        "optimal": float(optimal_constant_baseline(side.rewards[0], side_scores.square().sum(-1))),
    }
    batch = bandit.sample_episodes(params, 20_000, torch.Generator().manual_seed(2))
    g = scores(bandit, params, batch.observations[0], batch.actions[0])
    r = batch.rewards[0]
    empirical = {}
    for name, b in baselines.items():
        estimates = g * (r - b)[:, None]
        centred_sq = (estimates - estimates.mean(0)).square().sum(-1)
        empirical[name] = float(centred_sq.mean())
        standard_error = float(centred_sq.std() / math.sqrt(len(centred_sq)))
        population = float(population_trace_variance(moments, b))
        assert abs(empirical[name] - population) < 4 * standard_error, (name, empirical[name], population)
    assert empirical["optimal"] < empirical["batch_mean"] < empirical["none"], empirical


def test_env_step_pays_the_model_reward_for_the_unclipped_action(bandit):
    bandit.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        context = rng.standard_normal(2)
        action = 50.0 * rng.standard_normal(2)  # far outside any reasonable range: never clipped
        observation, _ = bandit.reset(options={"context": context})
        assert np.array_equal(observation, context)
        next_observation, reward, terminated, truncated, _ = bandit.step(action)
        assert terminated and not truncated
        assert np.array_equal(next_observation, context)
        assert reward == float(bandit.reward(torch.as_tensor(context), torch.as_tensor(action)))


def test_env_contexts_follow_the_context_distribution(bandit):
    contexts = np.array([bandit.reset(seed=seed)[0] for seed in range(2_000)])
    z = (contexts.mean(0) - bandit.context_mean.numpy()) / (1.0 / math.sqrt(len(contexts)))
    assert np.abs(z).max() < 4.0
    assert np.abs(np.cov(contexts.T) - np.eye(2)).max() < 0.15
