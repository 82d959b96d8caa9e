"""GradientStatistics / EstimateStatistics against brute-force formulas, streaming against materialized."""

from __future__ import annotations

import math

import pytest
import torch

from pgvar.measure import (
    GradientStatistics,
    estimate_statistics,
    flatten,
    flatten_per_sample,
    gradient_statistics,
    gradient_statistics_streaming,
    pairwise_cosine,
    per_sample_gradients,
)
from tests.measure.conftest import is_actor_param, pg_loss, sb3_pg_loss


def brute_force(g: torch.Tensor) -> dict[str, float]:
    g = g.double()
    n = g.shape[0]
    mean = g.mean(0)
    trace = float(torch.cov(g.T).trace())  # unbiased, N - 1
    mean_sq = float(mean @ mean)
    return {
        "trace": trace,
        "var_mean": trace / n,
        "snr": mean_sq / (trace / n),
        "mean_norm": math.sqrt(mean_sq),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "p"), [(2, 3), (50, 7), (3000, 4)])
def test_gradient_statistics_matches_brute_force(n, p, dtype):
    torch.manual_seed(n + p)
    g = (torch.randn(n, p) * torch.linspace(0.5, 3.0, p) + torch.linspace(-1.0, 2.0, p)).to(dtype)
    stats = gradient_statistics(g)
    want = brute_force(g)
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    assert stats.n == n
    assert math.isclose(stats.covariance_trace, want["trace"], rel_tol=rtol)
    assert math.isclose(stats.variance_of_mean, want["var_mean"], rel_tol=rtol)
    assert math.isclose(stats.snr, want["snr"], rel_tol=rtol)
    assert math.isclose(
        stats.snr_debiased,
        (want["snr"] * want["var_mean"] - want["var_mean"]) / want["var_mean"],
        rel_tol=rtol * 10,
        abs_tol=rtol,
    )
    assert math.isclose(stats.mean_norm, want["mean_norm"], rel_tol=rtol)
    torch.testing.assert_close(stats.mean, g.double().mean(0), rtol=rtol, atol=rtol)
    assert stats.mean.dtype == torch.float64
    # the identity in formulas.md section 6: tr Cov = N/(N-1) (mean ||G_i||^2 - ||m||^2)
    raw = float(g.double().square().sum(1).mean()) - stats.mean_norm**2
    assert math.isclose(
        stats.covariance_trace, n / (n - 1) * raw, rel_tol=1e-6 if dtype == torch.float32 else 1e-10
    )


def test_trace_is_accurate_when_the_mean_dominates():
    # ||m||^2 / tr Cov = 1e8: the raw difference of second moments would cancel in float32; centring does not
    torch.manual_seed(0)
    g = torch.full((1000, 3), 1e4, dtype=torch.float64) + torch.randn(1000, 3, dtype=torch.float64)
    want = brute_force(g)["trace"]
    assert math.isclose(gradient_statistics(g.float()).covariance_trace, want, rel_tol=2e-3)


def test_dict_input_equals_flattened_input(gaussian_batch):
    policy, inputs = gaussian_batch
    grads = per_sample_gradients(policy, pg_loss, inputs)
    from_dict = gradient_statistics(grads)
    from_matrix = gradient_statistics(flatten_per_sample(grads))
    assert from_dict.covariance_trace == pytest.approx(from_matrix.covariance_trace, rel=1e-13)
    torch.testing.assert_close(from_dict.mean, from_matrix.mean, rtol=1e-13, atol=1e-15)


def test_cosine_to_reference_and_dict_reference(gaussian_batch):
    policy, inputs = gaussian_batch
    grads = per_sample_gradients(policy, pg_loss, inputs)
    reference = {name: torch.randn_like(value[0]) for name, value in grads.items()}
    stats = gradient_statistics(grads, reference=reference)
    ref = flatten(reference).double()
    want = float(stats.mean @ ref / (stats.mean.norm() * ref.norm()))
    assert stats.cosine_to_reference == pytest.approx(want, rel=1e-12)
    assert stats.cosine_to(ref) == pytest.approx(want, rel=1e-12)
    assert stats.cosine_to(stats.mean * 3.0) == pytest.approx(1.0, rel=1e-12)
    assert gradient_statistics(grads).cosine_to_reference is None


@pytest.mark.parametrize(
    "chunking", [{"chunk_size": 1}, {"chunk_size": 5}, {"chunk_size": 1000}, {"max_memory_bytes": 5000}, {}]
)
def test_streaming_equals_materialized_module_style(gaussian_batch, chunking):
    policy, inputs = gaussian_batch
    want = gradient_statistics(per_sample_gradients(policy, pg_loss, inputs))
    got = gradient_statistics_streaming(policy, pg_loss, inputs, **chunking)
    assert got.n == want.n
    assert got.covariance_trace == pytest.approx(want.covariance_trace, rel=1e-12)
    assert got.snr == pytest.approx(want.snr, rel=1e-12)
    assert got.snr_debiased == pytest.approx(want.snr_debiased, rel=1e-11, abs=1e-12)
    torch.testing.assert_close(got.mean, want.mean, rtol=1e-12, atol=1e-14)


def test_streaming_equals_materialized_functional_style_float32():
    torch.manual_seed(2)
    params = {"w": torch.randn(4, 3), "b": torch.randn(4)}
    x = torch.randn(101, 3)
    y = torch.randn(101, 4)

    def fn(p, xi, yi):
        return ((torch.tanh(p["w"] @ xi + p["b"]) - yi) ** 2).sum()

    want = gradient_statistics(per_sample_gradients(fn, params, (x, y)))
    got = gradient_statistics_streaming(fn, params, (x, y), chunk_size=16)
    assert got.covariance_trace == pytest.approx(want.covariance_trace, rel=1e-6)
    torch.testing.assert_close(got.mean, want.mean, rtol=1e-6, atol=1e-7)


def test_streaming_on_sb3_policy_matches_materialized(sb3_batch):
    policy, inputs = sb3_batch
    want = gradient_statistics(per_sample_gradients(policy, sb3_pg_loss, inputs, params=is_actor_param))
    got = gradient_statistics_streaming(policy, sb3_pg_loss, inputs, params=is_actor_param, chunk_size=20)
    assert got.covariance_trace == pytest.approx(want.covariance_trace, rel=1e-5)
    assert got.snr == pytest.approx(want.snr, rel=1e-4)


def test_debiased_snr_is_unbiased_and_plug_in_snr_is_not():
    """Gaussian per-sample gradients with known mean g and covariance Sigma: E[SNR_debiased] ~ ||g||^2 / (tr Sigma / N)."""
    torch.manual_seed(5)
    repeats, n, p = 800, 64, 6
    sigma_diag = torch.linspace(0.5, 2.0, p, dtype=torch.float64)  # Sigma = diag(sigma_diag)
    true_snr = 2.0
    direction = torch.linspace(1.0, -0.5, p, dtype=torch.float64)
    g = direction / direction.norm() * math.sqrt(true_snr * float(sigma_diag.sum()) / n)
    samples = g + torch.randn(repeats, n, p, dtype=torch.float64) * sigma_diag.sqrt()
    stats = [gradient_statistics(samples[r]) for r in range(repeats)]
    debiased = torch.tensor([s.snr_debiased for s in stats], dtype=torch.float64)
    plug_in = torch.tensor([s.snr for s in stats], dtype=torch.float64)
    se = float(debiased.std()) / math.sqrt(repeats)
    assert abs(float(debiased.mean()) - true_snr) < 4 * se
    assert abs(float(plug_in.mean()) - (true_snr + 1.0)) < 4 * se  # plug-in SNR ~ true SNR + 1
    assert float(plug_in.mean()) - true_snr > 10 * se
    # the trace is unbiased for tr Sigma and the mean for g
    traces = torch.tensor([s.covariance_trace for s in stats], dtype=torch.float64)
    assert abs(float(traces.mean()) - float(sigma_diag.sum())) < 4 * float(traces.std()) / math.sqrt(repeats)


def test_zero_covariance_gives_inf_or_nan_snr():
    same = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    assert gradient_statistics(same).covariance_trace == 0.0
    assert gradient_statistics(same).snr == math.inf
    assert math.isnan(gradient_statistics(torch.zeros(3, 2)).snr)


# ------------------------------------------------------------------------------------------ repeats
def pairwise_cosine_loop(e: torch.Tensor) -> float:
    e = e.double()
    k = e.shape[0]
    total = 0.0
    for i in range(k):
        for j in range(k):
            if i != j:
                total += float(e[i] @ e[j] / (e[i].norm() * e[j].norm()))
    return total / (k * (k - 1))


@pytest.mark.parametrize("k", [2, 3, 10])
def test_pairwise_cosine_matches_double_loop(k):
    torch.manual_seed(k)
    e = torch.randn(k, 9) + 0.7
    assert float(pairwise_cosine(e)) == pytest.approx(pairwise_cosine_loop(e), rel=1e-12)
    named = {"a": e[:, :4].reshape(k, 2, 2), "b": e[:, 4:]}
    assert float(pairwise_cosine(named)) == pytest.approx(pairwise_cosine_loop(e), rel=1e-12)


def test_estimate_statistics_matches_brute_force():
    torch.manual_seed(7)
    k, p = 10, 5
    reference = torch.linspace(-1.0, 1.0, p, dtype=torch.float64)
    estimates = (
        reference
        + 0.3
        + torch.randn(k, p, dtype=torch.float64) * torch.linspace(0.1, 1.0, p, dtype=torch.float64)
    )
    s = estimate_statistics(estimates, reference=reference)
    mean = estimates.mean(0)
    assert s.k == k
    torch.testing.assert_close(s.mean, mean)
    assert s.mean_norm == pytest.approx(float(mean.norm()), rel=1e-12)
    assert s.variance_trace == pytest.approx(float(torch.cov(estimates.T).trace()), rel=1e-12)
    assert s.pairwise_cosine == pytest.approx(pairwise_cosine_loop(estimates), rel=1e-12)
    cos = torch.tensor(
        [float(e @ reference / (e.norm() * reference.norm())) for e in estimates], dtype=torch.float64
    )
    assert s.cosine_to_reference == pytest.approx(float(cos.mean()), rel=1e-12)
    assert s.cosine_to_reference_se == pytest.approx(float(cos.std()) / math.sqrt(k), rel=1e-10)
    se = torch.tensor([float(estimates[:, j].std()) / math.sqrt(k) for j in range(p)], dtype=torch.float64)
    torch.testing.assert_close(s.bias, mean - reference)
    torch.testing.assert_close(s.bias_se, se)
    assert s.max_abs_z == pytest.approx(
        max(abs(float(mean[j] - reference[j])) / float(se[j]) for j in range(p)), rel=1e-12
    )
    assert s.bias_norm == pytest.approx(float((mean - reference).norm()), rel=1e-12)
    no_ref = estimate_statistics(estimates)
    assert no_ref.bias is None and no_ref.max_abs_z is None and no_ref.cosine_to_reference is None


def test_max_abs_z_flags_a_biased_estimator_and_not_an_unbiased_one():
    torch.manual_seed(8)
    k, p = 400, 4
    truth = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    unbiased = truth + torch.randn(k, p, dtype=torch.float64)
    biased = unbiased + torch.tensor([0.0, 0.0, 0.4, 0.0], dtype=torch.float64)
    assert estimate_statistics(unbiased, reference=truth).max_abs_z < 4.0
    assert estimate_statistics(biased, reference=truth).max_abs_z > 6.0


def test_zero_standard_error_coordinates():
    e = torch.tensor([[1.0, 2.0], [1.0, 3.0]])
    s = estimate_statistics(e, reference=torch.tensor([1.0, 2.5]))
    assert s.max_abs_z == 0.0  # coordinate 0: no spread and no bias
    assert estimate_statistics(e, reference=torch.tensor([0.0, 2.5])).max_abs_z == math.inf


# ------------------------------------------------------------------------------------------------ errors
def test_bad_input_is_rejected(gaussian_batch):
    with pytest.raises(
        ValueError,
        match=r"per_sample_grads must hold at least N = 2 samples to estimate a covariance.*got N = 1",
    ):
        gradient_statistics(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"per_sample_grads must have shape \[N, P\]"):
        gradient_statistics(torch.zeros(4, 3, 2))
    with pytest.raises(
        ValueError, match=r"per_sample_grads must map every name to a \[N, \*shape\] tensor with the same N"
    ):
        gradient_statistics({"a": torch.zeros(4, 2), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"reference must be a \[P\] tensor with P = 3"):
        gradient_statistics(torch.randn(4, 3), reference=torch.zeros(4))
    with pytest.raises(ValueError, match=r"reference must be a \[P\] tensor with P = 3"):
        gradient_statistics(torch.randn(4, 3)).cosine_to(torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"estimates must hold at least K = 2 repeats"):
        estimate_statistics(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"estimates must be a \[K, P\] tensor"):
        estimate_statistics(torch.zeros(3))
    with pytest.raises(ValueError, match=r"estimates must hold at least K = 2 rows"):
        pairwise_cosine(torch.zeros(1, 3))
    policy, (obs, act, adv) = gaussian_batch
    with pytest.raises(ValueError, match=r"inputs must hold at least N = 2 samples"):
        gradient_statistics_streaming(policy, pg_loss, (obs[:1], act[:1], adv[:1]))
    with pytest.raises(ValueError, match=r"inputs must have a batch size N >= 1"):
        gradient_statistics_streaming(policy, pg_loss, (obs[:0], act[:0], adv[:0]))


def test_results_are_frozen():
    stats = gradient_statistics(torch.randn(3, 2))
    assert isinstance(stats, GradientStatistics)
    with pytest.raises(AttributeError):
        stats.snr = 0.0  # type: ignore[misc]
