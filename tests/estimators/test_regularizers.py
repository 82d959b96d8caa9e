"""Regularizers toward a reference policy: exact values against enumeration / quadrature / torch.distributions,
unbiasedness of the sample estimators within k standard errors computed from the samples, the cap projection
against a plain water-filling loop, and the argument checks.
"""

from __future__ import annotations

import math

import pytest
import torch

from pgvar._validation import check_cap, check_nonnegative
from pgvar.estimators import (
    DIVERGENCES,
    KL_ESTIMATORS,
    capped_log_probs,
    categorical_divergence,
    chi2_sample_estimate,
    diagonal_gaussian_divergence,
    discriminator_logistic_loss,
    kl_sample_estimate,
    kl_to_reference,
    occupancy_divergence_estimate,
    occupancy_penalty_rewards,
    odds_ratio_cap_penalty,
)

F64 = torch.float64
K_SE = 4.5  # a handful of comparisons per test: |z| < 4.5 fails by chance with probability < 1e-4


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_log_probs(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.log_softmax(scale * torch.randn(*shape, generator=gen(seed), dtype=F64), -1)


def z_score(samples: torch.Tensor, expected: float) -> float:
    standard_error = float(samples.std()) / math.sqrt(samples.numel())
    return (float(samples.mean()) - expected) / standard_error


# ------------------------------------------------------------------------------------------- KL estimators
def test_k1_and_k3_are_unbiased_and_k2_is_not_by_enumeration():
    log_p, log_q = random_log_probs((4, 6), 0, scale=1.5), random_log_probs((4, 6), 1, scale=1.5)
    p = log_p.exp()
    exact = kl_to_reference(log_p, log_q)
    for estimator in KL_ESTIMATORS:
        mean = (p * kl_sample_estimate(log_p, log_q.expand_as(log_p), estimator)).sum(-1)
        if estimator == "k2":
            assert float((mean - exact).abs().min()) > 1e-3  # biased at every state
        else:
            torch.testing.assert_close(mean, exact, rtol=1e-12, atol=1e-12)
    assert bool((kl_sample_estimate(log_p, log_q.expand_as(log_p), "k3") >= 0).all())
    assert bool((kl_sample_estimate(log_p, log_q.expand_as(log_p), "k1") < 0).any())


def test_kl_estimators_on_gaussian_samples_within_k_standard_errors():
    """a ~ N(m1, s1^2) in 2-D (time-major [T, N, d]); k1, k3 unbiased for the closed-form KL; k3 has less variance."""
    mean, log_std = torch.tensor([0.3, -0.2], dtype=F64), torch.tensor([-0.1, 0.2], dtype=F64)
    ref_mean, ref_log_std = torch.tensor([0.0, 0.1], dtype=F64), torch.tensor([0.0, 0.1], dtype=F64)
    p = torch.distributions.Normal(mean, log_std.exp())
    q = torch.distributions.Normal(ref_mean, ref_log_std.exp())
    actions = mean + log_std.exp() * torch.randn(400, 500, 2, generator=gen(3), dtype=F64)
    log_p, log_q = p.log_prob(actions).sum(-1), q.log_prob(actions).sum(-1)
    exact = float(diagonal_gaussian_divergence(mean, log_std, ref_mean, ref_log_std, "kl"))
    k1, k3 = kl_sample_estimate(log_p, log_q, "k1"), kl_sample_estimate(log_p, log_q, "k3")
    assert k1.shape == (400, 500)
    assert abs(z_score(k1, exact)) < K_SE and abs(z_score(k3, exact)) < K_SE
    assert float(k3.var()) < 0.5 * float(k1.var())  # Schulman's point, for nearby distributions
    # the test has power: k2's bias is visible at this sample size
    far = kl_sample_estimate(log_p, q.log_prob(actions + 1.0).sum(-1), "k2")
    far_exact = float(diagonal_gaussian_divergence(mean, log_std, ref_mean - 1.0, ref_log_std, "kl"))
    assert abs(z_score(far, far_exact)) > 10


# ------------------------------------------------------------------------------------------- chi^2
def test_chi2_sample_estimate_is_unbiased_by_enumeration_and_monte_carlo():
    log_p, log_q = random_log_probs((5,), 4), random_log_probs((5,), 5)
    p = log_p.exp()
    exact = categorical_divergence(log_p, log_q, "chi2")
    torch.testing.assert_close((p * chi2_sample_estimate(log_p, log_q)).sum(), exact, rtol=1e-12, atol=1e-12)
    # Monte Carlo with a Gaussian policy narrower than the reference (finite variance: s1^2 < 1.5 s2^2)
    mean, log_std = torch.tensor([0.4], dtype=F64), torch.tensor([-0.2], dtype=F64)
    zero = torch.zeros(1, dtype=F64)
    actions = mean + log_std.exp() * torch.randn(200_000, 1, generator=gen(6), dtype=F64)
    log_pa = torch.distributions.Normal(mean, log_std.exp()).log_prob(actions).sum(-1)
    log_qa = torch.distributions.Normal(zero, 1.0).log_prob(actions).sum(-1)
    estimates = chi2_sample_estimate(log_pa, log_qa)
    exact_gauss = float(diagonal_gaussian_divergence(mean, log_std, zero, zero, "chi2"))
    assert exact_gauss > 0.1 and abs(z_score(estimates, exact_gauss)) < K_SE
    assert abs(z_score(estimates, 1.05 * exact_gauss)) > K_SE  # power: a 5% error is detected


def test_categorical_divergences_against_their_definitions():
    log_p, log_q = random_log_probs((3, 2, 5), 7), random_log_probs((3, 2, 5), 8)
    p, q = log_p.exp(), log_q.exp()
    expected = {
        "kl": (p * (log_p - log_q)).sum(-1),
        "chi2": ((p - q) ** 2 / q).sum(-1),
        "sqrt_chi2": ((p - q) ** 2 / q).sum(-1).sqrt(),
        "tv": 0.5 * (p - q).abs().sum(-1),
    }
    for name in DIVERGENCES:
        torch.testing.assert_close(
            categorical_divergence(log_p, log_q, name), expected[name], rtol=1e-10, atol=1e-12
        )
    # zero-probability actions of p contribute nothing; identical distributions give 0
    with_zero = torch.tensor([0.5, 0.5, 0.0], dtype=F64).log()
    uniform = torch.full((3,), 1 / 3, dtype=F64).log()
    assert float(categorical_divergence(with_zero, uniform, "chi2")) == pytest.approx(0.5)
    assert float(categorical_divergence(with_zero, uniform, "kl")) == pytest.approx(math.log(1.5))
    for name in DIVERGENCES:
        assert float(categorical_divergence(uniform, uniform, name)) == pytest.approx(0.0, abs=1e-7)


def test_gaussian_kl_matches_torch_distributions():
    shape = (4, 3)
    mean, ref_mean = (
        torch.randn(*shape, generator=gen(9), dtype=F64),
        torch.randn(*shape, generator=gen(10), dtype=F64),
    )
    log_std, ref_log_std = (
        0.3 * torch.randn(*shape, generator=gen(11), dtype=F64),
        0.3 * torch.randn(3, generator=gen(12), dtype=F64),
    )
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, log_std.exp()),
        torch.distributions.Normal(ref_mean, ref_log_std.exp()),
    ).sum(-1)
    torch.testing.assert_close(
        diagonal_gaussian_divergence(mean, log_std, ref_mean, ref_log_std, "kl"),
        expected,
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("m1,s1,m2,s2", [(0.5, 0.8, 0.0, 1.0), (-1.0, 1.3, 0.2, 1.0), (0.0, 0.5, 0.3, 0.6)])
def test_gaussian_chi2_matches_quadrature(m1, s1, m2, s2):
    """1 + chi^2 = int p^2 / q dx on a fine grid (trapezoid, float64); 2-D factorizes into the product."""
    x = torch.linspace(-30, 30, 600_001, dtype=F64)
    p = torch.distributions.Normal(torch.tensor(m1, dtype=F64), torch.tensor(s1, dtype=F64)).log_prob(x)
    q = torch.distributions.Normal(torch.tensor(m2, dtype=F64), torch.tensor(s2, dtype=F64)).log_prob(x)
    integral = float(torch.trapezoid(torch.exp(2 * p - q), x))
    t = lambda v: torch.tensor([v], dtype=F64)  # noqa: E731
    chi2 = float(diagonal_gaussian_divergence(t(m1), t(math.log(s1)), t(m2), t(math.log(s2)), "chi2"))
    assert chi2 == pytest.approx(integral - 1, rel=1e-8)
    pair = lambda a, b: torch.tensor([a, b], dtype=F64)  # noqa: E731
    two_d = diagonal_gaussian_divergence(  # second coordinate: p = q, so it contributes the factor 1
        pair(m1, m2), pair(math.log(s1), 0.0), pair(m2, m2), pair(math.log(s2), 0.0), "chi2"
    )
    assert float(two_d) == pytest.approx(chi2, rel=1e-12)
    sqrt = diagonal_gaussian_divergence(t(m1), t(math.log(s1)), t(m2), t(math.log(s2)), "sqrt_chi2")
    assert float(sqrt) == pytest.approx(math.sqrt(chi2))


def test_gaussian_chi2_is_inf_exactly_when_the_policy_is_sqrt2_wider_with_clean_gradients():
    zero = torch.zeros(2, dtype=F64)
    log_std = torch.tensor([0.0, 0.5 * math.log(2.0) - 1e-3], dtype=F64, requires_grad=True)  # just finite
    finite = diagonal_gaussian_divergence(zero, log_std.detach(), zero, zero, "chi2")
    assert math.isfinite(float(finite))
    wide = torch.tensor([0.0, 0.5 * math.log(2.0) + 1e-3], dtype=F64, requires_grad=True)
    value = diagonal_gaussian_divergence(zero + 0.1, wide, zero, zero, "chi2")
    assert float(value.detach()) == math.inf
    (grad,) = torch.autograd.grad(value, wide)
    assert bool(torch.isfinite(grad).all())
    assert float(diagonal_gaussian_divergence(zero, wide.detach(), zero, zero, "sqrt_chi2")) == math.inf


# ------------------------------------------------------------------------------------------- the cap
def water_filling_loop(p: torch.Tensor, q: torch.Tensor, cap: float) -> torch.Tensor:
    """The readable twin: cap, hand the excess to the uncapped actions in proportion to p, repeat."""
    pi = p.clone()
    capped = torch.zeros_like(p, dtype=torch.bool)
    for _ in range(len(p) + 1):
        over = pi > cap * q + 1e-15
        if not bool(over.any()):
            break
        capped |= over
        free = 1.0 - (cap * q)[capped].sum()
        pi = torch.where(capped, cap * q, p * free / p[~capped].sum())
    return pi


@pytest.mark.parametrize("cap", [1.0, 1.2, 2.0, 5.0, 100.0])
def test_capped_policy_equals_water_filling_and_satisfies_the_cap(cap):
    log_p, log_q = random_log_probs((20, 7), 13, scale=2.0), random_log_probs((7,), 14)
    capped = capped_log_probs(log_p, log_q, cap).exp()
    assert capped.shape == (20, 7)
    torch.testing.assert_close(capped.sum(-1), torch.ones(20, dtype=F64), rtol=0, atol=1e-12)
    assert bool((capped <= cap * log_q.exp() * (1 + 1e-12)).all())
    for row in range(20):
        torch.testing.assert_close(
            capped[row], water_filling_loop(log_p[row].exp(), log_q.exp(), cap), rtol=1e-10, atol=1e-13
        )
    if cap == 1.0:
        torch.testing.assert_close(capped, log_q.exp().expand_as(capped), rtol=1e-10, atol=1e-13)
    if cap == 100.0:  # no action is near its cap: the policy is unchanged
        torch.testing.assert_close(capped, log_p.exp(), rtol=1e-12, atol=1e-14)


def test_capped_policy_is_the_kl_projection_onto_the_cap_set():
    """No feasible policy is KL-closer to p: random feasible mixtures toward the projection only lose."""
    log_p, log_q, cap = random_log_probs((6,), 15, scale=2.0), random_log_probs((6,), 16), 1.5
    projected = capped_log_probs(log_p, log_q, cap)
    best = float(kl_to_reference(projected, log_p))
    for seed in range(200):
        other = capped_log_probs(random_log_probs((6,), 100 + seed, scale=3.0), log_q, cap)
        for w in (0.1, 0.5, 1.0):  # the feasible set is convex
            mix = torch.log((1 - w) * projected.exp() + w * other.exp())
            assert float(kl_to_reference(mix, log_p)) >= best - 1e-12


def test_capped_policy_is_differentiable():
    logits = torch.randn(3, 5, generator=gen(17), dtype=F64, requires_grad=True)
    ref = random_log_probs((5,), 18)
    assert torch.autograd.gradcheck(lambda z: capped_log_probs(z, ref, 1.4), (logits,))


def test_odds_ratio_penalty_is_zero_exactly_on_the_cap_set():
    log_q = random_log_probs((6,), 19)
    log_p = random_log_probs((6,), 20, scale=2.0)
    cap = 1.5
    penalty = odds_ratio_cap_penalty(log_p, log_q, cap)
    violated = log_p > log_q + math.log(cap)
    assert (
        bool(violated.any()) and bool((penalty[violated] > 0).all()) and bool((penalty[~violated] == 0).all())
    )
    projected = capped_log_probs(log_p, log_q, cap)
    assert float(odds_ratio_cap_penalty(projected, log_q, cap).max()) < 1e-12
    expected = (log_p.exp() * (log_p - log_q - math.log(cap)).clamp_min(0)).sum()
    torch.testing.assert_close((log_p.exp() * penalty).sum(), expected)


# ------------------------------------------------------------------------------------------- occupancy
def test_discriminator_optimum_is_the_log_density_ratio():
    """Population logistic loss over a tabular d: the gradient vanishes at d* = log(mu_pi / mu_ref) and only there."""
    mu_pi, mu_ref = random_log_probs((8,), 21).exp(), random_log_probs((8,), 22).exp()

    def population_loss(d: torch.Tensor) -> torch.Tensor:  # weighted means == expectations under mu
        return (mu_pi * torch.nn.functional.softplus(-d)).sum() + (
            mu_ref * torch.nn.functional.softplus(d)
        ).sum()

    d_star = (mu_pi / mu_ref).log().requires_grad_(True)
    (grad,) = torch.autograd.grad(population_loss(d_star), d_star)
    assert float(grad.abs().max()) < 1e-14
    shifted = (d_star.detach() + 0.1).requires_grad_(True)
    assert float(torch.autograd.grad(population_loss(shifted), shifted)[0].abs().max()) > 1e-3
    # the sample loss is the population loss's unbiased estimate: equal class sizes, samples drawn from mu
    states_pi = torch.multinomial(mu_pi, 200_000, replacement=True, generator=gen(23))
    states_ref = torch.multinomial(mu_ref, 200_000, replacement=True, generator=gen(24))
    d = d_star.detach()
    sample = discriminator_logistic_loss(d[states_pi], d[states_ref])
    per_sample = torch.nn.functional.softplus(-d[states_pi]) + torch.nn.functional.softplus(d[states_ref])
    assert abs(z_score(per_sample, float(population_loss(d)))) < K_SE
    torch.testing.assert_close(sample, per_sample.mean())


def test_occupancy_penalties_follow_orpo_and_their_expectations_are_the_divergences():
    log_mu, log_ref = random_log_probs((10,), 25), random_log_probs((10,), 26)
    mu = log_mu.exp()
    d = (log_mu - log_ref).requires_grad_(True)
    exact = {name: float(categorical_divergence(log_mu, log_ref, name)) for name in DIVERGENCES}
    coef = 0.3
    # tv: E_mu[sign(mu - ref)], not the TV itself (only its gradient is that of 2 TV: see the MDP tests)
    tv_value = float((mu * torch.sign(mu - log_ref.exp())).sum())
    expected_per_step = {"kl": exact["kl"], "chi2": exact["chi2"], "tv": tv_value}
    for name, value in expected_per_step.items():
        rewards = occupancy_penalty_rewards(d, name, coef)
        assert not rewards.requires_grad
        assert float((mu * rewards).sum()) == pytest.approx(-coef * value, rel=1e-10)
    torch.testing.assert_close(occupancy_penalty_rewards(d, "kl", coef), -coef * d.detach())
    # sqrt_chi2 with no trimming and the occupancy as the batch: E[penalty] = -coef * chi2 / sqrt(mean chi2 term)
    batch = torch.multinomial(mu, 100_000, replacement=True, generator=gen(27))
    rewards = occupancy_penalty_rewards(d[batch], "sqrt_chi2", coef, trim_fraction=0.0)
    assert abs(z_score(rewards, -coef * math.sqrt(exact["chi2"]))) < K_SE


def test_sqrt_chi2_trimming_and_masking():
    d = torch.tensor([[0.0, 1.0], [2.0, -1.0], [9.0, 0.5]], dtype=F64)
    chi2_terms = torch.expm1(d)
    # 6 values, trim 0.2 -> one from each end
    ordered = chi2_terms.reshape(-1).sort().values
    scale = ordered[1:-1].mean().sqrt()
    torch.testing.assert_close(
        occupancy_penalty_rewards(d, "sqrt_chi2", 1.0, trim_fraction=0.2), -chi2_terms / scale
    )
    # default 1% of 6 values trims nothing (ORPO's [0:-0] slice would be empty)
    torch.testing.assert_close(
        occupancy_penalty_rewards(d, "sqrt_chi2", 1.0), -chi2_terms / chi2_terms.mean().sqrt()
    )
    mask = torch.tensor([[True, True], [True, True], [False, True]])
    masked = occupancy_penalty_rewards(d, "sqrt_chi2", 1.0, trim_fraction=0.0, mask=mask)
    assert float(masked[2, 0]) == 0.0
    torch.testing.assert_close(masked[mask], -chi2_terms[mask] / chi2_terms[mask].mean().sqrt())
    # a non-positive trimmed mean falls back to the unscaled chi2 reward (ORPO)
    negative = torch.tensor([-1.0, -2.0])
    torch.testing.assert_close(occupancy_penalty_rewards(negative, "sqrt_chi2", 1.0), -torch.expm1(negative))


# ------------------------------------------------------------------------------------------- bad input
def test_argument_checks_name_argument_value_and_allowed():
    lp = torch.zeros(3)
    with pytest.raises(ValueError, match=r"estimator must be one of 'k1', 'k2', 'k3'; got 'k4'"):
        kl_sample_estimate(lp, lp, "k4")
    with pytest.raises(
        ValueError, match=r"divergence must be one of 'kl', 'chi2', 'sqrt_chi2', 'tv'; got 'js'"
    ):
        occupancy_penalty_rewards(lp, "js", 1.0)
    with pytest.raises(ValueError, match=r"divergence must be one of 'kl', 'chi2', 'sqrt_chi2'; got 'tv'"):
        diagonal_gaussian_divergence(lp, lp, lp, lp, "tv")
    with pytest.raises(ValueError, match=r"coef must be a number >= 0, got -0.5"):
        occupancy_penalty_rewards(lp, "kl", -0.5)
    with pytest.raises(ValueError, match=r"cap must be a finite number >= 1 .*got 0.9"):
        capped_log_probs(lp, torch.full((3,), -math.log(3)), 0.9)
    with pytest.raises(ValueError, match=r"cap must be a finite number >= 1 .*got inf"):
        odds_ratio_cap_penalty(lp, lp, math.inf)
    with pytest.raises(
        ValueError, match=r"ref_log_probs must have shape \(3,\) \(like log_probs\), got \(2,\)"
    ):
        chi2_sample_estimate(lp, torch.zeros(2))
    with pytest.raises(ValueError, match=r"trim_fraction must be in \[0, 0.5\), got 0.5"):
        occupancy_penalty_rewards(lp, "sqrt_chi2", 1.0, trim_fraction=0.5)
    with pytest.raises(ValueError, match=r"ref_log_probs must be the log of a probability distribution"):
        categorical_divergence(torch.full((3,), -math.log(3)), torch.zeros(3), "tv")
    assert check_nonnegative("coef", 0) == 0.0 and check_cap("cap", 1) == 1.0
    with pytest.raises(ValueError, match="coef must be a number >= 0, got True"):
        check_nonnegative("coef", True)  # type: ignore[arg-type]


def test_full_distributions_must_be_log_normalized_for_every_divergence():
    """log_probs of categorical_divergence is a whole distribution: logits raise for every divergence (not only the
    KL, which goes through kl_to_reference), as does a logits reference of capped_log_probs."""
    logits, ref = torch.tensor([2.0, 0.0, -1.0]), torch.full((3,), -math.log(3))
    for divergence in DIVERGENCES:
        with pytest.raises(ValueError, match=r"log_probs must be the log of a probability distribution"):
            categorical_divergence(logits, ref, divergence)
    with pytest.raises(ValueError, match=r"ref_log_probs must be the log of a probability distribution"):
        capped_log_probs(logits, logits, 2.0)
    with pytest.raises(ValueError, match=r"ref_log_probs must be a torch.Tensor or a numpy array .* got NoneType"):
        categorical_divergence(torch.log_softmax(logits, -1), None)  # type: ignore[arg-type]
    # sampled-action log-probabilities are one entry of a distribution each: not normalized, not checked
    torch.testing.assert_close(kl_sample_estimate(logits, logits), torch.zeros(3))


def test_tensor_arguments_follow_the_estimator_input_rule():
    """Shared checks (pgvar._validation): types, floating point, finite parameters, bool masks, non-empty."""
    lp = torch.zeros(3)
    with pytest.raises(ValueError, match=r"log_probs must be a torch.Tensor or a numpy array .*got list"):
        chi2_sample_estimate([0.0, 0.0, 0.0], lp)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ref_log_probs must be a floating-point tensor .*got dtype torch.int64"):
        odds_ratio_cap_penalty(lp, torch.zeros(3, dtype=torch.long), 2.0)
    with pytest.raises(ValueError, match=r"log_std must be finite, got nan"):
        diagonal_gaussian_divergence(lp, torch.full((3,), math.nan), lp, lp)
    with pytest.raises(ValueError, match=r"mean must be a floating-point tensor of shape \[\*, d\].*got shape \(\)"):
        diagonal_gaussian_divergence(torch.tensor(0.0), lp, lp, lp)
    with pytest.raises(TypeError, match=r"mask must be a bool tensor"):
        occupancy_penalty_rewards(lp, "sqrt_chi2", 1.0, mask=torch.ones(3))
    with pytest.raises(ValueError, match=r"mask must select at least one sample"):
        occupancy_penalty_rewards(lp, "kl", 1.0, mask=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"reference_logits must be a non-empty floating-point tensor, got shape \(0,\)"):
        discriminator_logistic_loss(lp, torch.zeros(0))
    with pytest.raises(ValueError, match=r"discriminator_logits must be finite"):
        occupancy_penalty_rewards(torch.tensor([0.0, math.inf]), "kl", 1.0)


def test_16_bit_inputs_are_computed_in_float32():
    """k3 = e^x - 1 - x cancels: float16 arithmetic loses 5-12% of it at log ratios of 1e-2 and 3e-3."""
    lp = torch.full((3,), -1.0, dtype=torch.float16)
    ref = lp + torch.tensor([1e-2, -1e-2, 3e-3], dtype=torch.float16)  # the exact float16 inputs
    exact = kl_sample_estimate(lp.double(), ref.double())
    got = kl_sample_estimate(lp, ref)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), exact, rtol=2e-3, atol=0.0)
    # the exact KL of 50 near-uniform actions sums 50 small terms: about 0.6% off in float16 arithmetic
    policy = torch.log_softmax(0.05 * torch.randn(64, 50, generator=gen(0)), -1).half()
    uniform = torch.full((50,), -math.log(50), dtype=torch.float16)
    exact = (policy.double().exp() * (policy.double() - uniform.double())).sum(-1)  # of the float16 inputs
    for got in (categorical_divergence(policy, uniform, "kl"), kl_to_reference(policy, uniform)):
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.double(), exact, rtol=2e-3, atol=0.0)


def test_capped_policy_backward_is_finite_at_ties_and_exact_fills():
    """At the reference (every ratio tied) and where the capped mass is exactly 1, no NaN leaks into the gradient."""
    ref = torch.full((1, 30), -math.log(30), dtype=F64)
    for logits in (ref.clone(), torch.cat([torch.zeros(1, 10), torch.full((1, 20), -5.0)], -1).to(F64)):
        leaf = logits.requires_grad_(True)
        out = capped_log_probs(leaf, ref[0], 3.0)  # 10 arms x 3/30 fill the mass exactly
        (grad,) = torch.autograd.grad((out.exp() * torch.arange(30, dtype=F64)).sum(), leaf)
        assert bool(torch.isfinite(grad).all())


def test_occupancy_divergence_estimate_at_exact_logits_is_each_divergence():
    """Weighted by mu_pi (the expectation of the sample mean over x ~ mu_pi), the estimate at d = log(mu_pi / mu_ref)
    is KL, chi2 and TV exactly; sqrt_chi2 is the root of the chi2 estimate; sample means are unbiased."""
    log_mu, log_ref = random_log_probs((10,), 27), random_log_probs((10,), 28)
    mu = log_mu.exp()
    d = log_mu - log_ref
    for name in ("kl", "chi2", "tv"):
        exact = float(categorical_divergence(log_mu, log_ref, name))
        # the estimator is a mean of per-sample terms f(d); evaluate each term on one-sample inputs, weight by mu
        terms = torch.stack([occupancy_divergence_estimate(d[i : i + 1], name) for i in range(10)])
        assert float((mu * terms).sum()) == pytest.approx(exact, rel=1e-10), name
    states = torch.multinomial(mu, 100_000, replacement=True, generator=gen(29))
    chi2 = float(categorical_divergence(log_mu, log_ref, "chi2"))
    sample = float(occupancy_divergence_estimate(d[states], "chi2"))
    assert abs(z_score(torch.expm1(d[states]), chi2)) < K_SE
    assert float(occupancy_divergence_estimate(d[states], "sqrt_chi2")) == pytest.approx(math.sqrt(sample), rel=1e-12)
    masked = occupancy_divergence_estimate(torch.stack([d[0], torch.tensor(50.0, dtype=d.dtype)]), "kl",
                                           mask=torch.tensor([True, False]))  # fmt: skip
    assert float(masked) == pytest.approx(float(d[0]))
    with pytest.raises(ValueError, match="divergence"):
        occupancy_divergence_estimate(d, "hellinger")
    with pytest.raises(ValueError, match="at least one"):
        occupancy_divergence_estimate(d[:2], "kl", mask=torch.tensor([False, False]))
