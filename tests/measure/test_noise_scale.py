"""Noise scale, norm test and mean GSNR: against plain loops over explicit per-sample gradients (and Cockpit's
formulas, written with its mean-loss scaling), and against exact values for Gaussian per-sample gradients."""

from __future__ import annotations

import math

import pytest
import torch

from pgvar.measure import (
    GradientStatistics,
    gradient_noise_scale,
    gradient_noise_scale_two_batch,
    gradient_statistics,
    gradient_statistics_from_sq_norms,
    mean_gsnr,
    norm_test,
    per_coordinate_gsnr,
    unflatten,
)

K_SE = 4.0  # standard errors allowed in the exact-distribution checks


def random_grads(n: int = 40, p: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=g, dtype=torch.float64) * 2.0 + torch.linspace(
        -1, 1, p, dtype=torch.float64
    )


def loop_trace_and_mean(grads: torch.Tensor) -> tuple[float, torch.Tensor]:
    n = grads.shape[0]
    mean = torch.zeros(grads.shape[1], dtype=grads.dtype)
    for i in range(n):
        mean += grads[i] / n
    trace = sum(float(((grads[i] - mean) ** 2).sum()) for i in range(n)) / (n - 1)
    return trace, mean


def gaussian_grads(mu: torch.Tensor, std: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Per-sample gradients ``G ~ N(mu, diag(std^2))`` of shape ``shape + (P,)``."""
    g = torch.Generator().manual_seed(seed)
    return mu + std * torch.randn(*shape, mu.numel(), generator=g, dtype=torch.float64)


MU = torch.tensor([0.5, -0.3, 0.0, 0.2, 1.0], dtype=torch.float64)
STD = torch.tensor([1.0, 2.0, 0.5, 1.5, 3.0], dtype=torch.float64)


# ------------------------------------------------------------------------------------------- noise scale
def test_noise_scale_matches_loop_over_per_sample_gradients():
    grads = random_grads()
    trace, mean = loop_trace_and_mean(grads)
    n = grads.shape[0]
    grad_sq = float(mean @ mean) - trace / n
    ns = gradient_noise_scale(gradient_statistics(grads))
    assert ns.covariance_trace == pytest.approx(trace, rel=1e-12)
    assert ns.grad_sq_norm == pytest.approx(grad_sq, rel=1e-12)
    assert ns.b_simple == pytest.approx(trace / grad_sq, rel=1e-12)
    assert ns.b_simple_plugin == pytest.approx(trace / float(mean @ mean), rel=1e-12)


def test_noise_scale_is_batch_size_over_snr():
    """B_simple = N / SNR_debiased, and the plug-in = N / SNR (formulas.md section 8)."""
    stats = gradient_statistics(random_grads(seed=3))
    ns = gradient_noise_scale(stats)
    assert ns.b_simple == pytest.approx(stats.n / stats.snr_debiased, rel=1e-12)
    assert ns.b_simple_plugin == pytest.approx(stats.n / stats.snr, rel=1e-12)


def test_noise_scale_from_sq_norms_and_dict_agree_with_materialized():
    grads = random_grads(seed=1)
    like = {"b": (3,), "a": (2, 2)}
    as_dict = unflatten(grads, like)
    full = gradient_statistics(grads)
    from_dict = gradient_statistics(as_dict)
    from_norms = gradient_statistics_from_sq_norms((grads**2).sum(1), grads.mean(0), reference=grads[0])
    from_norms_dict = gradient_statistics_from_sq_norms((grads**2).sum(1), unflatten(grads.mean(0), like))
    for stats in (from_dict, from_norms, from_norms_dict):
        assert isinstance(stats, GradientStatistics)
        assert stats.covariance_trace == pytest.approx(full.covariance_trace, rel=1e-10)
        assert gradient_noise_scale(stats).b_simple == pytest.approx(
            gradient_noise_scale(full).b_simple, rel=1e-9
        )
    assert from_norms.cosine_to_reference == pytest.approx(full.cosine_to(grads[0]), rel=1e-12)


def test_noise_scale_signs_and_edge_cases():
    # The mean is pure noise: the unbiased |G|^2 estimate is <= 0, the batch cannot resolve it -> inf.
    grads = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    ns = gradient_noise_scale(gradient_statistics(grads))
    assert ns.grad_sq_norm < 0 and ns.b_simple == math.inf and ns.b_simple_plugin == math.inf
    # No noise at all: B_simple = 0.
    same = torch.tensor([[1.0, 2.0]] * 3, dtype=torch.float64)
    assert gradient_noise_scale(gradient_statistics(same)).b_simple == 0.0
    # Zero gradients and zero noise: undefined.
    assert math.isnan(gradient_noise_scale(gradient_statistics(torch.zeros(3, 2))).b_simple)


def test_noise_scale_parts_are_unbiased_for_gaussian_gradients():
    """E[tr_hat] = tr Sigma and E[|m|^2 - tr_hat / N] = |mu|^2 exactly; the ratio of averages is B_simple."""
    n, repeats = 16, 4000
    grads = gaussian_grads(MU, STD, (repeats, n), seed=5)
    traces, grad_sqs = [], []
    for batch in grads:
        ns = gradient_noise_scale(gradient_statistics(batch))
        traces.append(ns.covariance_trace)
        grad_sqs.append(ns.grad_sq_norm)
    true_trace, true_grad_sq = float((STD**2).sum()), float(MU @ MU)
    for values, truth in ((traces, true_trace), (grad_sqs, true_grad_sq)):
        values_t = torch.tensor(values)
        se = float(values_t.std()) / math.sqrt(repeats)
        assert abs(float(values_t.mean()) - truth) < K_SE * se, (float(values_t.mean()), truth, se)
    # The plug-in |m|^2 is biased up by tr / N: the plug-in noise scale is far too small at this SNR.
    plugin = torch.tensor([float(b.mean(0) @ b.mean(0)) for b in grads])
    assert float(plugin.mean()) - true_grad_sq > 10 * float(plugin.std()) / math.sqrt(repeats)
    b_ratio_of_averages = sum(traces) / sum(grad_sqs)
    assert b_ratio_of_averages == pytest.approx(true_trace / true_grad_sq, rel=0.1)


def test_two_batch_estimator_with_single_samples_equals_per_sample_route():
    """Small batches of one sample (B_s = 1) and the full batch (B_b = N) give gradient_noise_scale exactly."""
    grads = random_grads(n=25, seed=2)
    n = grads.shape[0]
    two = gradient_noise_scale_two_batch(
        (grads**2).sum(1), grads.mean(0).square().sum(), small_batch_size=1, big_batch_size=n
    )
    one = gradient_noise_scale(gradient_statistics(grads))
    assert two.covariance_trace == pytest.approx(one.covariance_trace, rel=1e-10)
    assert two.grad_sq_norm == pytest.approx(one.grad_sq_norm, rel=1e-10)
    assert two.b_simple == pytest.approx(one.b_simple, rel=1e-9)
    assert two.b_simple_plugin is None


def test_two_batch_estimator_is_unbiased_for_gaussian_gradients():
    """gpt-neox's estimates from |G_small|^2, |G_big|^2 (independent batches) are unbiased for tr and |G|^2."""
    small, big, repeats = 4, 32, 3000
    g_small = gaussian_grads(MU, STD, (repeats, small), seed=7).mean(1)
    g_big = gaussian_grads(MU, STD, (repeats, big), seed=8).mean(1)
    estimates = [
        gradient_noise_scale_two_batch(float(s @ s), float(b @ b), small_batch_size=small, big_batch_size=big)
        for s, b in zip(g_small, g_big)
    ]
    for field, truth in (("covariance_trace", float((STD**2).sum())), ("grad_sq_norm", float(MU @ MU))):
        values = torch.tensor([getattr(e, field) for e in estimates])
        se = float(values.std()) / math.sqrt(repeats)
        assert abs(float(values.mean()) - truth) < K_SE * se, (field, float(values.mean()), truth, se)
    # Averaging the norms first (tensor arguments) is the ratio of averages.
    pooled = gradient_noise_scale_two_batch(
        g_small.square().sum(1), g_big.square().sum(1), small_batch_size=small, big_batch_size=big
    )
    mean_trace = sum(e.covariance_trace for e in estimates) / repeats
    assert pooled.covariance_trace == pytest.approx(mean_trace, rel=1e-9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"small_batch_size": 4, "big_batch_size": 4}, "big_batch_size must be larger"),
        ({"small_batch_size": 0, "big_batch_size": 4}, "small_batch_size"),
        ({"small_batch_size": 2.5, "big_batch_size": 4}, "small_batch_size"),
    ],
)
def test_two_batch_rejects_bad_batch_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gradient_noise_scale_two_batch(1.0, 0.5, **kwargs)


def test_two_batch_rejects_negative_norms():
    with pytest.raises(ValueError, match="small_sq_norms must be >= 0"):
        gradient_noise_scale_two_batch(torch.tensor([-1.0]), 0.5, small_batch_size=1, big_batch_size=2)


def test_statistics_arguments_are_checked():
    with pytest.raises(ValueError, match="statistics must be a pgvar.measure.GradientStatistics"):
        gradient_noise_scale(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="sq_norms must be >= 0"):
        gradient_statistics_from_sq_norms(torch.tensor([1.0, -1.0]), torch.zeros(2))
    with pytest.raises(ValueError, match="at least N = 2"):
        gradient_statistics_from_sq_norms(torch.tensor([1.0]), torch.zeros(2))
    with pytest.raises(ValueError, match="mean must be a \\[P\\] tensor"):
        gradient_statistics_from_sq_norms(torch.ones(3), torch.zeros(2, 2))


# --------------------------------------------------------------------------------------------- norm test
def cockpit_norm_test(grads: torch.Tensor, theta: float) -> tuple[float, float, float]:
    """Cockpit's NormTest on the mean loss: BackPACK's per-sample gradients are ``G_i / N``."""
    n = grads.shape[0]
    batch_grad = grads / n
    batch_l2_squared = (batch_grad**2).sum(1)
    grad = batch_grad.sum(0)
    grad_l2_squared = float(grad @ grad)
    var_l1 = (1 / (n - 1)) * (n**2 * float(batch_l2_squared.sum()) - n * grad_l2_squared)
    # Cockpit's own sanity check: the l1 norm of the sample variance (Byrd et al. Eq. 3.6).
    var_l1_direct = float((((n * batch_grad - grad) ** 2).sum(0) / (n - 1)).abs().sum())
    theta_max = math.sqrt(var_l1 / n / grad_l2_squared)
    return theta_max, var_l1 / theta**2 / grad_l2_squared, var_l1_direct / var_l1


@pytest.mark.parametrize("theta", [0.5, 0.9])
def test_norm_test_matches_cockpit(theta):
    grads = random_grads(n=30, seed=4)
    theta_max, batch_size, consistency = cockpit_norm_test(grads, theta)
    assert consistency == pytest.approx(1.0, rel=1e-12)
    result = norm_test(gradient_statistics(grads), theta=theta)
    assert result.theta_max == pytest.approx(theta_max, rel=1e-10)
    assert result.batch_size == pytest.approx(batch_size, rel=1e-10)
    assert result.passes == (theta_max <= theta)
    assert result.theta == theta


def test_norm_test_at_theta_max_asks_for_the_batch_it_has():
    stats = gradient_statistics(random_grads(n=30, seed=6))
    first = norm_test(stats)
    at_max = norm_test(stats, theta=first.theta_max)
    assert at_max.batch_size == pytest.approx(stats.n, rel=1e-10)
    assert norm_test(stats, theta=1.0).batch_size == pytest.approx(
        gradient_noise_scale(stats).b_simple_plugin
    )
    assert not norm_test(stats, theta=0.5 * first.theta_max).passes


def test_norm_test_rejects_bad_theta():
    stats = gradient_statistics(random_grads())
    with pytest.raises(ValueError, match="theta"):
        norm_test(stats, theta=0.0)


# ------------------------------------------------------------------------------------------------- GSNR
def cockpit_mean_gsnr(grads: torch.Tensor, epsilon: float) -> float:
    """Cockpit's MeanGSNR on the mean loss (BackPACK's SumGradSquared of G_i / N)."""
    n = grads.shape[0]
    batch_grad = grads / n
    grad_squared = batch_grad.sum(0) ** 2
    sum_grad_squared = (batch_grad**2).sum(0)
    return float((grad_squared / (n * sum_grad_squared - grad_squared + epsilon)).mean())


def loop_gsnr(grads: torch.Tensor, epsilon: float) -> float:
    """Liu et al.'s definition coordinate by coordinate: mean^2 / (plug-in variance + epsilon)."""
    n, p = grads.shape
    total = 0.0
    for j in range(p):
        column = [float(grads[i, j]) for i in range(n)]
        mean = sum(column) / n
        variance = sum((x - mean) ** 2 for x in column) / n
        total += mean**2 / (variance + epsilon)
    return total / p


@pytest.mark.parametrize("epsilon", [0.0, 1e-5, 0.3])
def test_mean_gsnr_matches_cockpit_and_loop(epsilon):
    grads = random_grads(n=20, seed=9)
    value = mean_gsnr(grads, epsilon=epsilon)
    assert value == pytest.approx(cockpit_mean_gsnr(grads, epsilon), rel=1e-10)
    assert value == pytest.approx(loop_gsnr(grads, epsilon), rel=1e-10)
    assert mean_gsnr(unflatten(grads, {"x": (3,), "y": (4,)}), epsilon=epsilon) == pytest.approx(
        value, rel=1e-12
    )


def test_mean_gsnr_default_epsilon_is_cockpits():
    grads = random_grads(n=20, seed=9)
    assert mean_gsnr(grads) == pytest.approx(cockpit_mean_gsnr(grads, 1e-5), rel=1e-12)


def test_gsnr_epsilon_handling():
    # Column 0: constant 2 (zero variance): 4 / epsilon. Column 1: all zeros: 0 (not nan), also at epsilon = 0.
    grads = torch.tensor([[2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    per = per_coordinate_gsnr(grads.mean(0), (grads**2).mean(0), epsilon=1e-2)
    assert per.tolist() == pytest.approx([400.0, 0.0])
    assert per_coordinate_gsnr(grads.mean(0), (grads**2).mean(0), epsilon=0.0)[1] == 0.0
    with pytest.raises(ValueError, match="epsilon"):
        mean_gsnr(grads, epsilon=-1.0)
    with pytest.raises(ValueError, match="second_moment must have the shape of mean"):
        per_coordinate_gsnr(torch.zeros(2), torch.zeros(3))


def test_mean_gsnr_is_exact_in_expectation_for_gaussian_gradients():
    """For Gaussian samples m_j and the plug-in variance v_j are independent, v_j ~ s_j^2 chi2_{N-1} / N, so
    E[m_j^2 / v_j] = (mu_j^2 + s_j^2 / N) * N / (s_j^2 (N - 3)) exactly (epsilon = 0)."""
    n, repeats = 50, 2000
    grads = gaussian_grads(MU, STD, (repeats, n), seed=11)
    values = torch.tensor([mean_gsnr(batch, epsilon=0.0) for batch in grads])
    expected = float(((MU**2 + STD**2 / n) * n / (STD**2 * (n - 3))).mean())
    population = float((MU**2 / STD**2).mean())
    se = float(values.std()) / math.sqrt(repeats)
    assert abs(float(values.mean()) - expected) < K_SE * se, (float(values.mean()), expected, se)
    assert abs(expected - population) > K_SE * se  # the check can tell the finite-N bias apart
