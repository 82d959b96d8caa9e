"""RewardHackingMDP (and ReferenceRegularizedMDP): exact occupancy measures against Monte Carlo, exact divergences
and their gradients against finite differences, the gradient that a reward penalty gives against the gradient of
the divergence it stands for (ORPO's factors, k1 vs k3), sampled regularized policy gradients against the exact
one within k standard errors, and gradient ascent against the exact regularized optima.
"""

from __future__ import annotations

import math

import pytest
import torch

from pgvar.estimators import (
    DIVERGENCES,
    categorical_divergence,
    discounted_returns,
    kl_sample_estimate,
    occupancy_penalty_rewards,
)
from pgvar.problems import MEASURES, RewardHackingMDP
from tests.problems.test_problem_goodhart import natural_gradient_ascent

F64 = torch.float64
K_SE = 4.5


@pytest.fixture(scope="module")
def mdp() -> RewardHackingMDP:
    return RewardHackingMDP(n_cells=5, n_tomatoes=2, gamma=0.9, termination_prob=0.1)


def test_the_proxy_is_hacked_and_the_truth_is_not(mdp):
    ref = mdp.reference_log_probs
    greedy = mdp.kl_regularized_optimum(0.01)
    assert float(mdp.exact_proxy_return(greedy)) > float(mdp.exact_proxy_return(ref))
    assert float(mdp.exact_true_return(greedy)) < 0.01 * float(mdp.exact_true_return(ref))
    bucket_mass = float(mdp.exact_state_occupancy(greedy)[mdp.bucket_cell])
    assert bucket_mass > 0.8
    torch.testing.assert_close(mdp.exact_proxy_return(ref), mdp.exact_return(ref))  # proxy == env reward


def test_occupancy_measures_match_monte_carlo_discounted_visits(mdp):
    params = mdp.initial_parameters(seed=2)
    batch = mdp.sample_episodes(params, 4000, torch.Generator().manual_seed(0))
    discount = (mdp.gamma ** batch.timesteps.to(F64)) * batch.mask
    onehot = torch.nn.functional.one_hot(batch.observations * mdp.n_actions + batch.actions, 5 * 3).to(F64)
    visits = (discount[..., None] * onehot).sum(0) / mdp.effective_horizon  # [N, S * A], mean = mu(s, a)
    exact = mdp.exact_state_action_occupancy(params).reshape(-1)
    z = (visits.mean(0) - exact) / (visits.std(0) / math.sqrt(visits.shape[0]))
    assert float(z.abs().max()) < K_SE, z
    torch.testing.assert_close(exact.sum(), torch.tensor(1.0, dtype=F64))
    torch.testing.assert_close(mdp.exact_state_occupancy(params), exact.reshape(5, 3).sum(-1))
    # true return through the gymnasium API (info["true_reward"]) within k SE
    mdp.reset(seed=1)
    probs = mdp.policy_probs(params).numpy()
    rng = torch.Generator().manual_seed(1)
    returns = []
    for _ in range(1500):
        state, _ = mdp.reset()
        total, discount_t, done = 0.0, 1.0, False
        while not done:
            action = int(torch.multinomial(torch.as_tensor(probs[state]), 1, generator=rng))
            state, _, terminated, truncated, info = mdp.step(action)
            total += discount_t * info["true_reward"]
            discount_t *= mdp.gamma
            done = terminated or truncated
        returns.append(total)
    sample = torch.tensor(returns, dtype=F64)
    assert abs(float(sample.mean() - mdp.exact_true_return(params))) < K_SE * float(sample.std()) / math.sqrt(
        1500
    )


def central_differences(function, logits: torch.Tensor, step: float = 1e-6) -> torch.Tensor:
    grad = torch.zeros_like(logits)
    for index in range(logits.numel()):
        shift = torch.zeros_like(logits).reshape(-1)
        shift[index] = step
        shift = shift.reshape(logits.shape)
        grad.view(-1)[index] = (function(logits + shift) - function(logits - shift)) / (2 * step)
    return grad


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_regularized_gradient_matches_finite_differences(mdp, divergence, measure):
    logits = mdp.initial_parameters(seed=3)["logits"]
    exact = mdp.exact_regularized_gradient(logits, 0.7, divergence, measure)["logits"]
    numeric = central_differences(
        lambda z: mdp.exact_regularized_objective(z, 0.7, divergence, measure), logits
    )
    torch.testing.assert_close(exact, numeric, rtol=1e-6, atol=1e-7)
    # and it is not the unregularized gradient (the penalty matters at this point)
    assert float((exact - mdp.exact_policy_gradient(logits)["logits"]).abs().max()) > 1e-3


def test_capped_regularized_gradient_matches_finite_differences(mdp):
    logits = 2.0 * mdp.initial_parameters(seed=4)["logits"]
    exact = mdp.exact_regularized_gradient(logits, 0.3, "kl", "action", cap=1.8)["logits"]
    numeric = central_differences(
        lambda z: mdp.exact_regularized_objective(z, 0.3, "kl", "action", cap=1.8), logits
    )
    torch.testing.assert_close(exact, numeric, rtol=1e-6, atol=1e-7)
    capped = mdp.policy_log_probs(logits, cap=1.8).exp()
    assert bool((capped <= 1.8 * mdp.reference_probs + 1e-12).all())


# ------------------------------------------------------------------------ a penalty in the reward vs its objective
@pytest.mark.parametrize("measure", ["state", "state_action"])
@pytest.mark.parametrize("divergence,factor", [("kl", 1.0), ("chi2", 0.5), ("sqrt_chi2", 1.0), ("tv", 2.0)])
def test_orpo_penalty_in_the_reward_gives_the_gradient_of_factor_times_the_divergence(
    mdp, divergence, factor, measure
):
    """Penalty rewards from exact discriminator logits d = log(mu_pi / mu_ref), held fixed by the policy-gradient
    theorem, give exactly the gradient of J - coef * H * factor * D (the factors of occupancy_penalty_rewards)."""
    logits, coef = mdp.initial_parameters(seed=5)["logits"], 0.4
    if measure == "state":
        d = (mdp.exact_state_occupancy(logits) / mdp.reference_state_occupancy()).log()[:, None].expand(5, 3)
    else:
        d = (mdp.exact_state_action_occupancy(logits) / mdp.reference_state_action_occupancy()).log()
    if divergence == "sqrt_chi2":  # the exact chi2 in place of the batch's trimmed mean
        chi2 = float(mdp.exact_divergence(logits, "chi2", measure))
        penalty = occupancy_penalty_rewards(d, "chi2", coef / math.sqrt(chi2))
    else:
        penalty = occupancy_penalty_rewards(d, divergence, coef)
    from_reward = mdp.exact_policy_gradient_for_rewards(logits, mdp.reward_table + penalty)["logits"]
    exact = mdp.exact_regularized_gradient(logits, coef * factor, divergence, measure)["logits"]
    torch.testing.assert_close(from_reward, exact, rtol=1e-9, atol=1e-11)


def test_k1_in_the_reward_is_the_kl_regularized_gradient_and_k3_k2_are_not(mdp):
    logits, coef = mdp.initial_parameters(seed=6)["logits"], 0.5
    log_pi = mdp.policy_log_probs(logits)
    exact = mdp.exact_regularized_gradient(logits, coef, "kl", "action")["logits"]
    gaps = {}
    for estimator in ("k1", "k2", "k3"):
        penalty = coef * kl_sample_estimate(
            log_pi, mdp.reference_log_probs, estimator
        )  # one value per (s, a)
        from_reward = mdp.exact_policy_gradient_for_rewards(logits, mdp.reward_table - penalty)["logits"]
        gaps[estimator] = float((from_reward - exact).abs().max())
    assert gaps["k1"] < 1e-10
    assert gaps["k3"] > 1e-2 and gaps["k2"] > 1e-2, gaps


def test_sampled_policy_gradient_with_k1_penalty_is_unbiased_and_with_k3_is_biased():
    """REINFORCE on whole episodes with r - coef * k(s_t, a_t): the per-episode gradient sum_t gamma^t G_t grad log pi,
    averaged, is within k SE of the exact gradient of J - coef H KL for k1, and many SE away for k3."""
    mdp = RewardHackingMDP(n_cells=4, n_tomatoes=1, gamma=0.8, termination_prob=0.2)
    logits, coef = mdp.initial_parameters(seed=7)["logits"], 1.0
    exact = mdp.exact_regularized_gradient(logits, coef, "kl", "action")["logits"].reshape(-1)
    batch = mdp.sample_episodes(logits, 60_000, torch.Generator().manual_seed(8))
    log_pi = mdp.log_prob({"logits": logits}, batch.observations, batch.actions)
    log_ref = mdp.reference_log_probs[batch.observations, batch.actions]
    probs = mdp.policy_probs(logits)
    onehot = torch.nn.functional.one_hot(batch.actions, 3).to(F64)
    scores = onehot - probs[batch.observations]  # d log pi(a|s) / d logits[s, :], [T, N, A]
    z = {}
    for estimator in ("k1", "k3"):
        rewards = (batch.rewards - coef * kl_sample_estimate(log_pi, log_ref, estimator)) * batch.mask
        returns = discounted_returns(rewards, batch.terminated, batch.truncated, gamma=mdp.gamma)
        weight = (mdp.gamma ** batch.timesteps.to(F64)) * returns * batch.mask  # [T, N]
        per_step = weight[..., None] * scores  # [T, N, A] -> scatter into [N, S * A]
        index = (batch.observations[..., None] * 3 + torch.arange(3)).expand_as(per_step)
        grads = torch.zeros(batch.n_episodes, 12, dtype=F64)
        grads.scatter_add_(
            1,
            index.permute(1, 0, 2).reshape(batch.n_episodes, -1),
            per_step.permute(1, 0, 2).reshape(batch.n_episodes, -1),
        )
        standard_error = grads.std(0) / math.sqrt(batch.n_episodes)
        z[estimator] = float(((grads.mean(0) - exact) / standard_error.clamp_min(1e-12)).abs().max())
    assert z["k1"] < K_SE and z["k3"] > 8, z


# ------------------------------------------------------------------------ convergence to the exact optima
def test_gradient_ascent_converges_to_the_soft_optimum_and_to_the_cap_optimum(mdp):
    coef = 0.5
    logits = natural_gradient_ascent(mdp, mdp.reference_log_probs, 300, 0.5, coef=coef)
    optimum = mdp.kl_regularized_optimum(coef)
    torch.testing.assert_close(mdp.policy_log_probs(logits), optimum, rtol=0, atol=1e-8)
    gradient_at_optimum = mdp.exact_regularized_gradient(optimum, coef)["logits"]
    assert float(gradient_at_optimum.abs().max()) < 1e-10

    cap = 1.5
    logits = natural_gradient_ascent(mdp, mdp.reference_log_probs, 400, 0.5, cap=cap)
    best = mdp.cap_optimum(cap)
    value = float(mdp.exact_proxy_return(logits, cap=cap))
    assert value == pytest.approx(float(mdp.exact_proxy_return(best.log())), abs=1e-6)
    for seed in range(20):  # no capped policy does better than the cap optimum
        other = 3 * mdp.initial_parameters(seed=100 + seed)["logits"]
        assert (
            float(mdp.exact_proxy_return(other, cap=cap)) <= float(mdp.exact_proxy_return(best.log())) + 1e-12
        )


@pytest.mark.parametrize("divergence,measure", [("kl", "state"), ("kl", "state_action"), ("chi2", "state")])
def test_occupancy_regularized_ascent_reaches_the_same_stationary_optimum_from_different_starts(
    mdp, divergence, measure
):
    """No closed form: the objective is concave in the occupancy measure, so every start must reach the same value,
    with a vanishing gradient, at least as good as the reference and the action-KL optimum of the same coefficient.

    Not covered (found while writing this test): chi2 on (s, a) from seed 0 stalls at a lower value than from
    seed 1 (a start that almost never leaves the bucket's side: the logits of nearly unvisited cells barely move),
    and sqrt_chi2 on (s, a) reaches one value from both starts, but its logit gradient stays ~0.5 on entries of
    near-zero occupancy within 300 steps. A solver in occupancy space would settle both; it is left open."""
    coef = 0.5
    values = []
    for seed in (0, 1):
        start = mdp.initial_parameters(seed=seed)["logits"]
        logits = natural_gradient_ascent(
            mdp, start, 400, 0.2, coef=coef, divergence=divergence, measure=measure
        )
        values.append(float(mdp.exact_regularized_objective(logits, coef, divergence, measure)))
        grad = mdp.exact_regularized_gradient(logits, coef, divergence, measure)["logits"]
        assert float(grad.abs().max()) < 1e-6
    assert values[0] == pytest.approx(values[1], abs=1e-8)
    for other in (mdp.reference_log_probs, mdp.kl_regularized_optimum(coef)):
        assert values[0] >= float(mdp.exact_regularized_objective(other, coef, divergence, measure)) - 1e-10


def test_exact_divergences_agree_with_their_definitions(mdp):
    logits = mdp.initial_parameters(seed=9)["logits"]
    log_pi = mdp.policy_log_probs(logits)
    mu_s = mdp.exact_state_occupancy(logits)
    per_state = categorical_divergence(log_pi, mdp.reference_log_probs, "kl")
    torch.testing.assert_close(mdp.exact_divergence(logits, "kl", "action"), mu_s @ per_state)
    mu, ref = mdp.exact_state_action_occupancy(logits), mdp.reference_state_action_occupancy()
    torch.testing.assert_close(
        mdp.exact_divergence(logits, "tv", "state_action"), 0.5 * (mu - ref).abs().sum()
    )
    # the chain rule of the KL: KL(mu(s, a) || ref(s, a)) = KL(mu(s) || ref(s)) + E_mu(s)[KL(pi || ref)]
    torch.testing.assert_close(
        mdp.exact_divergence(logits, "kl", "state_action"),
        mdp.exact_divergence(logits, "kl", "state") + mdp.exact_divergence(logits, "kl", "action"),
    )
    for name in DIVERGENCES:
        for measure in MEASURES:
            assert float(mdp.exact_divergence(mdp.reference_log_probs, name, measure)) == pytest.approx(
                0, abs=1e-7
            )


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_cells must be an integer >= 3"):
        RewardHackingMDP(n_cells=2)
    with pytest.raises(ValueError, match=r"n_tomatoes must be in \[1, n_cells - 2\]"):
        RewardHackingMDP(n_cells=4, n_tomatoes=3)
    with pytest.raises(ValueError, match=r"safe_prob must be in \(1/3, 1\)"):
        RewardHackingMDP(safe_prob=1.0)
    with pytest.raises(ValueError, match="start_cell must be an integer in"):
        RewardHackingMDP(start_cell=9)
    mdp = RewardHackingMDP()
    with pytest.raises(ValueError, match="coef must be > 0 for the KL-regularized optimum"):
        mdp.kl_regularized_optimum(0.0)
    with pytest.raises(
        ValueError, match=r"divergence must be one of 'kl', 'chi2', 'sqrt_chi2', 'tv'; got 'js'"
    ):
        mdp.exact_divergence(mdp.reference_log_probs, "js")
