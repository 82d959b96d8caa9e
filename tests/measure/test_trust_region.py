"""Trust-region diagnostics: hand-computed values, SB3's own formulas, and a Monte Carlo check on two Gaussians
(exact KL and exact limit of the normalized effective sample size)."""

from __future__ import annotations

import math

import pytest
import torch

from pgvar.measure import (
    KL_ESTIMATORS,
    TrustRegionDiagnostics,
    behaviour_kl,
    clip_fraction,
    clipped_surrogate_loss,
    effective_sample_size,
    max_importance_ratio,
    trust_region_diagnostics,
)

K_SE = 4.0


def test_hand_computed_values():
    ratios = torch.tensor([0.5, 1.0, 2.0, 1.25], dtype=torch.float64)
    new, old = ratios.log() - 1.0, torch.full((4,), -1.0, dtype=torch.float64)  # only the difference matters
    # ESS: (sum w)^2 / sum w^2 = 4.75^2 / (0.25 + 1 + 4 + 1.5625) = 22.5625 / 6.8125
    assert float(effective_sample_size(new, old, normalized=False)) == pytest.approx(22.5625 / 6.8125)
    assert float(effective_sample_size(new, old)) == pytest.approx(22.5625 / 6.8125 / 4)
    assert float(max_importance_ratio(new, old)) == pytest.approx(2.0)
    logs = ratios.log()
    assert float(behaviour_kl(new, old, estimator="k1")) == pytest.approx(float(-logs.mean()))
    assert float(behaviour_kl(new, old, estimator="k3")) == pytest.approx(float((ratios - 1 - logs).mean()))
    # |w - 1| > 0.2: 0.5, 2.0, 1.25 (strict inequality: 1.2 would not count)
    assert float(clip_fraction(new, old, clip_range=0.2)) == pytest.approx(0.75)
    assert float(clip_fraction(new, old, clip_range=0.25 + 1e-9)) == pytest.approx(0.5)


def test_matches_sb3_ppo_formulas():
    """SB3's PPO.train: approx_kl = mean((ratio - 1) - log_ratio), clip_fraction = mean(|ratio - 1| > clip)."""
    g = torch.Generator().manual_seed(0)
    old = torch.randn(64, generator=g)
    new = old + 0.3 * torch.randn(64, generator=g)
    log_ratio = new - old
    ratio = torch.exp(log_ratio)
    sb3_kl = torch.mean((ratio - 1) - log_ratio)
    sb3_clip = torch.mean((torch.abs(ratio - 1) > 0.2).float())
    assert float(behaviour_kl(new, old)) == pytest.approx(float(sb3_kl), rel=1e-5)
    assert float(clip_fraction(new, old, clip_range=0.2)) == pytest.approx(float(sb3_clip))


def test_diagnostics_bundle_agrees_with_the_functions():
    g = torch.Generator().manual_seed(1)
    old = torch.randn(5, 7, generator=g, dtype=torch.float64)
    new = old + 0.2 * torch.randn(5, 7, generator=g, dtype=torch.float64)
    d = trust_region_diagnostics(new, old, clip_range=0.1)
    assert isinstance(d, TrustRegionDiagnostics) and d.n == 35
    assert d.effective_sample_size == pytest.approx(float(effective_sample_size(new, old)))
    assert d.max_ratio == pytest.approx(float(max_importance_ratio(new, old)))
    assert d.kl_k1 == pytest.approx(float(behaviour_kl(new, old, estimator="k1")))
    assert d.kl_k3 == pytest.approx(float(behaviour_kl(new, old, estimator="k3")))
    assert d.clip_fraction == pytest.approx(float(clip_fraction(new, old, clip_range=0.1)))
    assert trust_region_diagnostics(new, old).clip_fraction is None
    assert KL_ESTIMATORS == ("k1", "k3")


def test_identical_policies():
    lp = torch.randn(10)
    d = trust_region_diagnostics(lp, lp.clone(), clip_range=0.2)
    assert (d.effective_sample_size, d.max_ratio, d.kl_k1, d.kl_k3, d.clip_fraction) == pytest.approx(
        (1.0, 1.0, 0.0, 0.0, 0.0)
    )


def test_ess_is_stable_for_extreme_ratios():
    """Log-space: ratios of e^800 overflow a direct (sum w)^2 / sum w^2, not the logsumexp form."""
    new = torch.tensor([800.0, 800.0, 0.0, -900.0], dtype=torch.float64)
    old = torch.zeros(4, dtype=torch.float64)
    assert float(effective_sample_size(new, old, normalized=False)) == pytest.approx(2.0)
    # A sample the new policy gives probability 0 has w = 0: it counts as no sample.
    new_zero = torch.tensor([0.0, 0.0, -math.inf], dtype=torch.float64)
    assert (
        float(effective_sample_size(new_zero, torch.zeros(3, dtype=torch.float64), normalized=False)) == 2.0
    )


def test_detached_and_float64():
    new = torch.zeros(3, requires_grad=True)
    for value in (
        effective_sample_size(new, torch.zeros(3)),
        behaviour_kl(new, torch.zeros(3)),
        clip_fraction(new, torch.zeros(3), clip_range=0.2),
        max_importance_ratio(new, torch.zeros(3)),
    ):
        assert value.dtype == torch.float64 and not value.requires_grad and value.dim() == 0


def gaussian_log_prob(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return -0.5 * ((x - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)


def test_monte_carlo_against_exact_gaussian_values():
    """mu = N(0, 1) samples, pi = N(0.3, 0.9^2): k1 and k3 are unbiased for KL(mu || pi); the normalized ESS
    tends to 1 / E_mu[w^2] (closed form; E_mu[w^4] is finite, so its estimate has a finite variance)."""
    m0, s0, m1, s1 = 0.0, 1.0, 0.3, 0.9
    exact_kl = math.log(s1 / s0) + (s0**2 + (m0 - m1) ** 2) / (2 * s1**2) - 0.5
    second_moment = (
        s0**2 / (s1 * math.sqrt(2 * s0**2 - s1**2)) * math.exp((m1 - m0) ** 2 / (2 * s0**2 - s1**2))
    )
    repeats, n = 40, 5000
    g = torch.Generator().manual_seed(3)
    samples = m0 + s0 * torch.randn(repeats, n, generator=g, dtype=torch.float64)
    old, new = gaussian_log_prob(samples, m0, s0), gaussian_log_prob(samples, m1, s1)
    for estimator in ("k1", "k3"):
        values = torch.stack([behaviour_kl(new[r], old[r], estimator=estimator) for r in range(repeats)])
        se = float(values.std()) / math.sqrt(repeats)
        assert abs(float(values.mean()) - exact_kl) < K_SE * se, (
            estimator,
            float(values.mean()),
            exact_kl,
            se,
        )
    ess = torch.stack([effective_sample_size(new[r], old[r]) for r in range(repeats)])
    se = float(ess.std()) / math.sqrt(repeats)
    # The ratio estimator's O(1/n) bias is far below the tolerance at n = 5000.
    assert abs(float(ess.mean()) - 1 / second_moment) < K_SE * se + 1e-3, (
        float(ess.mean()),
        1 / second_moment,
    )
    # k3 is nonnegative sample by sample; k1 is not.
    per_sample_k3 = torch.expm1(new - old) - (new - old)
    assert bool((per_sample_k3 >= 0).all()) and bool(((old - new) < 0).any())


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: behaviour_kl(torch.zeros(3), torch.zeros(4)), "behaviour_log_prob must have the shape"),
        (lambda: behaviour_kl(torch.zeros(3), torch.zeros(3), estimator="k2"), "estimator must be one of"),
        (lambda: clip_fraction(torch.zeros(3), torch.zeros(3), clip_range=0.0), "clip_range"),
        (lambda: effective_sample_size(torch.zeros(0), torch.zeros(0)), "at least one sample"),
        (lambda: max_importance_ratio(torch.zeros(2, dtype=torch.long), torch.zeros(2)), "floating-point"),
        (lambda: behaviour_kl(torch.tensor([math.nan]), torch.zeros(1)), "log_prob must be finite"),
        (
            lambda: behaviour_kl(torch.zeros(1), torch.tensor([-math.inf])),
            "behaviour_log_prob must be finite",
        ),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------------- clipped surrogate
def sb3_ppo_policy_loss(log_prob, old_log_prob, advantages, clip_range):
    """SB3's ``PPO.train`` lines, per sample (before the minibatch mean)."""
    ratio = torch.exp(log_prob - old_log_prob)
    policy_loss_1 = advantages * ratio
    policy_loss_2 = advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return -torch.min(policy_loss_1, policy_loss_2)


@pytest.mark.parametrize("clip_range", [0.2, 0.05, None])
def test_clipped_surrogate_loss_values_and_gradient_match_autograd_of_sb3s_formula(clip_range):
    torch.manual_seed(0)
    old = torch.randn(200, dtype=torch.float64) - 1.0
    log_prob = (old + 0.4 * torch.randn(200, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(200, dtype=torch.float64)
    loss = clipped_surrogate_loss(log_prob, old, adv, clip_range=clip_range)
    (grad,) = torch.autograd.grad(loss.sum(), log_prob)
    ratio = (log_prob - old).exp().detach()
    if clip_range is None:
        torch.testing.assert_close(loss, -(ratio * adv), rtol=1e-14, atol=0)
        torch.testing.assert_close(grad, -(ratio * adv), rtol=1e-14, atol=0)
        return
    expected = sb3_ppo_policy_loss(log_prob, old, adv, clip_range)
    torch.testing.assert_close(loss, expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), log_prob)[0], rtol=1e-14, atol=0)
    # the closed form: -A w where the unclipped branch is the minimum, 0 where the clip binds
    binds = ((adv > 0) & (ratio > 1 + clip_range)) | ((adv < 0) & (ratio < 1 - clip_range))
    assert 0 < int(binds.sum()) < 200
    torch.testing.assert_close(grad, torch.where(binds, 0.0, -adv * ratio), rtol=1e-14, atol=0)


def test_clipped_surrogate_loss_at_ratio_one_is_the_policy_gradient_term():
    log_prob = torch.randn(50, dtype=torch.float64, requires_grad=True)
    adv = torch.randn(50, dtype=torch.float64)
    loss = clipped_surrogate_loss(log_prob, log_prob.detach(), adv, clip_range=0.2)
    (grad,) = torch.autograd.grad(loss.sum(), log_prob)
    torch.testing.assert_close(loss, -adv, rtol=0, atol=0)
    torch.testing.assert_close(grad, -adv, rtol=0, atol=0)  # = d/d log_prob of -A log pi


def test_clipped_surrogate_loss_gradient_flows_only_through_log_prob():
    log_prob, old, adv = (torch.randn(5, requires_grad=True) for _ in range(3))
    clipped_surrogate_loss(log_prob, old, adv, clip_range=0.2).sum().backward()
    assert log_prob.grad is not None and old.grad is None and adv.grad is None


def test_clipped_surrogate_loss_rejects_bad_input():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="clip_range must be"):
        clipped_surrogate_loss(x, x, x, clip_range=-0.2)
    with pytest.raises(ValueError, match=r"advantages must have the shape of log_prob \(3,\), got \(2,\)"):
        clipped_surrogate_loss(x, x, torch.zeros(2), clip_range=0.2)
    with pytest.raises(ValueError, match="behaviour_log_prob must be a floating-point tensor"):
        clipped_surrogate_loss(x, torch.zeros(3, dtype=torch.long), x, clip_range=0.2)
    with pytest.raises(ValueError, match="advantages"):
        clipped_surrogate_loss(x, x, torch.tensor([0.0, math.nan, 0.0]), clip_range=0.2)
