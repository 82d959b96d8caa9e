"""Wu et al.'s factorized action-dependent baseline: the surrogate's gradient against a per-sample loop, and on the
Gaussian bandit (exact gradient) unbiasedness within a Bonferroni-aware number of standard errors, a variance
reduction over the exact state value, and a baseline that peeks at its own dimension caught as biased."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, vmap

from pgvar.estimators import factorized_action_baseline, other_action_dimensions
from pgvar.problems import GaussianBandit
from tests.problems.test_problem_unbiasedness import bonferroni_threshold

N_SAMPLES = 20_000


def per_dimension_log_probs(
    params: dict[str, torch.Tensor], s: torch.Tensor, a: torch.Tensor
) -> torch.Tensor:
    """log N(a_k; (W s + b)_k, sigma_k^2) for each action dimension k: ``[..., K]`` (the bandit's log_prob summed)."""
    mean = s @ params["weight"].T + params["bias"]
    z = (a - mean) * torch.exp(-params["log_std"])
    return -0.5 * z.square() - params["log_std"] - 0.5 * math.log(2 * math.pi)


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[name].reshape(grads[name].shape[0], -1) for name in sorted(grads)], dim=1)


def per_sample_estimates(params, s, a, adv, baselines) -> torch.Tensor:
    """``[N, P]``: per-sample gradients of the one-sample surrogate = sum_k grad log pi_k (A - b_k)."""

    def surrogate(p, si, ai, advi, bi):
        log_probs = per_dimension_log_probs(p, si, ai).unsqueeze(0)
        return factorized_action_baseline(log_probs, advi.reshape(1), bi.unsqueeze(0)).surrogate

    return flat(vmap(grad(surrogate), in_dims=(None, 0, 0, 0, 0))(params, s, a, adv, baselines))


@pytest.fixture(scope="module")
def bandit_setting():
    bandit = GaussianBandit(obs_dim=2, action_dim=3, reward="quadratic", seed=0)
    params = bandit.initial_parameters(seed=1)
    batch = bandit.sample_episodes(params, N_SAMPLES, torch.Generator().manual_seed(11))
    s, a, r = batch.observations[0], batch.actions[0], batch.rewards[0]
    k = bandit.action_dim
    with torch.no_grad():
        mu, sigma = bandit.mean_action(params, s), params["log_std"].exp()
        hessian = bandit.reward_hessian
        # b*_k(s, a_-k) = E_{a_k}[r | s, a_-k]: put a_k at its mean, subtract H_kk sigma_k^2 (r is quadratic in a_k).
        conditional = torch.stack(
            [
                bandit.reward(s, torch.where(torch.arange(k) == j, mu, a)) - hessian[j, j] * sigma[j] ** 2
                for j in range(k)
            ],
            dim=-1,
        )
        state_value = bandit.exact_state_values(params, s).unsqueeze(-1).expand(-1, k)
        # Any function of (s, a_-k) is a valid baseline, however poor.
        arbitrary = 5.0 * other_action_dimensions(a).square().sum(-1) + s.sum(-1, keepdim=True)
        # Peeks at its own dimension a_k: not a valid baseline (its estimate is biased).
        peeking = 0.5 * (r.unsqueeze(-1) + conditional)
    exact = torch.cat([bandit.exact_policy_gradient(params)[n].reshape(-1) for n in sorted(params)])
    baselines = {
        "conditional_expectation": conditional,
        "state_value": state_value,
        "arbitrary_other_dims": arbitrary,
        "peeking": peeking,
    }
    estimates = {name: per_sample_estimates(params, s, a, r, b) for name, b in baselines.items()}
    return exact, estimates


def max_abs_z(estimates: torch.Tensor, exact: torch.Tensor) -> float:
    standard_error = estimates.std(0) / math.sqrt(estimates.shape[0])
    return float(((estimates.mean(0) - exact) / standard_error).abs().max())


@pytest.mark.parametrize("baseline", ["conditional_expectation", "state_value", "arbitrary_other_dims"])
def test_factorized_baseline_is_unbiased_on_the_gaussian_bandit(bandit_setting, baseline):
    exact, estimates = bandit_setting
    worst = max_abs_z(estimates[baseline], exact)
    assert worst < bonferroni_threshold(exact.numel()), f"{baseline}: max |z| = {worst:.2f}"


def test_a_baseline_that_depends_on_its_own_dimension_is_caught(bandit_setting):
    exact, estimates = bandit_setting
    assert max_abs_z(estimates["peeking"], exact) > 2 * bonferroni_threshold(exact.numel())


def test_conditional_expectation_baseline_reduces_variance_against_the_state_value(bandit_setting):
    """b_k = E[r | s, a_-k] removes the other dimensions' noise from each term: here about a third of tr Var."""
    _, estimates = bandit_setting
    factorized, state = estimates["conditional_expectation"], estimates["state_value"]
    trace_f, trace_v = float(factorized.var(0).sum()), float(state.var(0).sum())
    # Paired comparison: the per-sample difference of squared deviations, with its standard error.
    dev_f = (factorized - factorized.mean(0)).square().sum(1)
    dev_v = (state - state.mean(0)).square().sum(1)
    difference = dev_v - dev_f
    se = float(difference.std()) / math.sqrt(difference.numel())
    assert float(difference.mean()) > 4 * se, (trace_f, trace_v, se)
    assert trace_f < 0.8 * trace_v, (trace_f, trace_v)


def test_surrogate_gradient_is_the_per_sample_loop():
    g = torch.Generator().manual_seed(0)
    n, k, p = 6, 3, 4
    theta = torch.randn(p, k, generator=g, dtype=torch.float64, requires_grad=True)
    features = torch.randn(n, p, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    baselines = torch.randn(n, k, generator=g, dtype=torch.float64)
    log_probs = torch.tanh(features @ theta)  # any differentiable [N, K] "log-probabilities"
    out = factorized_action_baseline(log_probs, adv, baselines)
    (got,) = torch.autograd.grad(out.surrogate, theta)
    expected = torch.zeros_like(theta)
    for i in range(n):
        for j in range(k):
            (score,) = torch.autograd.grad(torch.tanh(features[i] @ theta[:, j]), theta)
            expected += score * (adv[i] - baselines[i, j]) / n
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(out.learning_signals, adv.unsqueeze(-1) - baselines)
    assert not out.learning_signals.requires_grad


def test_same_baseline_for_every_dimension_is_the_state_baseline_estimator():
    """b_k = V(s) for all k reduces to grad log pi(a|s) (A - V): the summed log-prob times one signal."""
    g = torch.Generator().manual_seed(1)
    log_probs = torch.randn(4, 5, 3, generator=g, requires_grad=True)
    adv, values = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    out = factorized_action_baseline(log_probs, adv, values.unsqueeze(-1).expand(-1, -1, 3))
    reference = (log_probs.sum(-1) * (adv - values)).mean()
    (got,) = torch.autograd.grad(out.surrogate, log_probs)
    (expected,) = torch.autograd.grad(reference, log_probs)
    assert torch.allclose(got, expected)


def test_mask_averages_over_real_samples_only():
    log_probs = torch.ones(2, 3, 2, requires_grad=True)
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = factorized_action_baseline(log_probs, adv, torch.zeros(2, 3, 2), mask=mask)
    assert float(out.surrogate.detach()) == pytest.approx(2 * (1.0 + 2.0 + 4.0) / 3)


def test_other_action_dimensions():
    actions = torch.arange(24.0).reshape(2, 3, 4)
    out = other_action_dimensions(actions)
    assert out.shape == (2, 3, 4, 3)
    for k in range(4):
        keep = [j for j in range(4) if j != k]
        assert torch.equal(out[..., k, :], actions[..., keep])


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: factorized_action_baseline(torch.zeros(3, 2), torch.zeros(3), torch.zeros(3, 3)),
            "baselines must",
        ),
        (
            lambda: factorized_action_baseline(torch.zeros(3, 2), torch.zeros(2), torch.zeros(3, 2)),
            "adv_hat must",
        ),
        (
            lambda: factorized_action_baseline(
                torch.zeros(3, 2), torch.zeros(3), torch.zeros(3, 2), mask=torch.zeros(3, dtype=torch.bool)
            ),
            "at least one sample",
        ),
        (
            lambda: factorized_action_baseline(
                torch.zeros(3, 2), torch.tensor([0.0, math.nan, 0.0]), torch.zeros(3, 2)
            ),
            "adv_hat must be finite",
        ),
        (lambda: other_action_dimensions(torch.zeros(3, 1)), "K >= 2"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_an_integer_mask_is_a_type_error_not_indices():
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        factorized_action_baseline(
            torch.zeros(3, 2), torch.zeros(3), torch.zeros(3, 2), mask=torch.tensor([1, 0, 1])
        )


def test_the_float16_surrogate_is_summed_in_float32():
    # The first sample's term -200 * 200 * 2 = -80000 overflows float16 (max 65504); the mean -20000 does not.
    log_probs = torch.zeros(4, 2, dtype=torch.float16)
    log_probs[0] = -200.0
    adv_hat = torch.tensor([200.0, 0.0, 0.0, 0.0], dtype=torch.float16)
    out = factorized_action_baseline(log_probs, adv_hat, torch.zeros(4, 2, dtype=torch.float16))
    assert out.surrogate.dtype == out.learning_signals.dtype == torch.float16
    assert float(out.surrogate) == -20000.0


def test_numpy_inputs_and_other_types():
    np = pytest.importorskip("numpy")
    out = factorized_action_baseline(np.zeros((1, 2)), np.array([3.0]), np.array([[1.0, 2.5]]))
    assert out.learning_signals.tolist() == [[2.0, 0.5]]
    assert other_action_dimensions(np.array([1, 2, 3])).tolist() == [[2, 3], [1, 3], [1, 2]]
    with pytest.raises(ValueError, match="must be a torch.Tensor or a numpy array"):
        other_action_dimensions([1.0, 2.0])
    with pytest.raises(ValueError, match="must be a torch.Tensor or a numpy array"):
        factorized_action_baseline([[0.0, 0.0]], torch.zeros(1), torch.zeros(1, 2))
