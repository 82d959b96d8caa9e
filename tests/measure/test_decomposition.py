"""variance_decomposition against exact values on a problem whose every term has a closed form.

The problem: s ~ N(0, 1), a ~ N(theta_0 + theta_1 s, sigma^2) (score g = (a - mu) / sigma^2 [1, s]), a return
R = Q(s, a) + nu(s) eps with Q quadratic in a and nu^2 polynomial in s. Every term of the decomposition is then the
expectation of a polynomial in two standard normals, which Gauss-Hermite quadrature gives exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pgvar.measure import VarianceDecomposition, variance_decomposition

THETA = (0.3, -0.5)
SIGMA = 0.7
C = (1.0, 0.5, -0.8, 0.6)  # Q(s, a) = c0 + c1 s + c2 a + c3 a^2


def mean_of(s):
    return THETA[0] + THETA[1] * s


def q_value(s, a):
    return C[0] + C[1] * s + C[2] * a + C[3] * a**2


def noise_sd(s):
    return (0.5 + 0.3 * s**2) ** 0.5


def state_value(s):
    mu = mean_of(s)
    return C[0] + C[1] * s + C[2] * mu + C[3] * (mu**2 + SIGMA**2)


def taylor_q(s, a):
    """Q-Prop's control variate: the first-order expansion of Q around the policy mean."""
    mu = mean_of(s)
    return q_value(s, mu) + (C[2] + 2 * C[3] * mu) * (a - mu)


def score(s, a):
    factor = (a - mean_of(s)) / SIGMA**2
    return np.stack([factor, factor * s], axis=-1)


def exact_terms() -> dict[str, float]:
    nodes, weights = np.polynomial.hermite_e.hermegauss(30)  # exact for polynomials of degree < 60
    weights = weights / weights.sum()
    z_s, z_a = np.meshgrid(nodes, nodes, indexing="ij")
    w = np.outer(weights, weights)
    s = z_s
    a = mean_of(s) + SIGMA * z_a
    g = score(s, a)
    sq = (g**2).sum(-1)
    q = q_value(s, a)
    terms = {"trajectory": float((w * noise_sd(s) ** 2 * sq).sum())}
    for name, b in (("none", 0.0 * s), ("value", state_value(s)), ("taylor", taylor_q(s, a))):
        second = (w * (q - b) ** 2 * sq).sum()
        inner = (weights[None, :, None] * ((q - b)[..., None] * g)).sum(axis=1)  # E_a[(Q - b) g] per state
        terms[f"action/{name}"] = float(second - (weights * (inner**2).sum(-1)).sum())
    inner_q = (weights[None, :, None] * (q[..., None] * g)).sum(axis=1)
    terms["state_bound"] = float((weights * (inner_q**2).sum(-1)).sum())
    terms["grad_sq_norm"] = float((((w[..., None] * q[..., None] * g).sum(axis=(0, 1))) ** 2).sum())
    return terms


def nested_samples(n_states: int, seed: int):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=n_states)
    a = mean_of(s) + SIGMA * rng.normal(size=n_states)
    a_fresh = mean_of(s) + SIGMA * rng.normal(size=n_states)
    returns = q_value(s, a)[:, None] + noise_sd(s)[:, None] * rng.normal(size=(n_states, 2))
    fresh_returns = q_value(s, a_fresh) + noise_sd(s) * rng.normal(size=n_states)
    # A Monte Carlo state baseline: three independent noisy draws of V(s) per state.
    mc_value = state_value(s)[:, None] + 2.0 * rng.normal(size=(n_states, 3))
    taylor = np.stack([taylor_q(s, a), taylor_q(s, a), taylor_q(s, a_fresh)], axis=1)
    t = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    return dict(
        scores=t(score(s, a)),
        returns=t(returns),
        fresh_scores=t(score(s, a_fresh)),
        fresh_returns=t(fresh_returns),
        baselines={"value": t(state_value(s)), "mc_value": t(mc_value), "taylor": t(taylor)},
    )


def test_estimates_match_the_exact_terms_within_standard_errors():
    exact = exact_terms()
    data = nested_samples(40_000, seed=0)
    result = variance_decomposition(**data, state_baseline="value")
    assert isinstance(result, VarianceDecomposition) and result.n_states == 40_000
    checks = [("trajectory", result.trajectory, result.trajectory_se, exact["trajectory"]),
              ("state_bound", result.state_bound, result.state_bound_se, exact["state_bound"])]  # fmt: skip
    for name, exact_name in (("none", "none"), ("value", "value"), ("mc_value", "value"), ("taylor", "taylor")):
        checks.append((f"action/{name}", result.action[name], result.action_se[name], exact[f"action/{exact_name}"]))
    for name, estimate, se, truth in checks:
        assert se > 0
        assert abs(estimate - truth) < 4 * se, f"{name}: {estimate:.4f} vs exact {truth:.4f} (se {se:.4f})"
        assert se < 0.1 * abs(truth), f"{name}: the check is too weak (se {se:.4f}, exact {truth:.4f})"
    # What the terms say on this problem: the state baseline removes most of the action term (26.7 -> 7.2); the
    # Taylor control variate, exact up to Q's quadratic part, removes only a little more (-> 5.3).
    assert exact["action/none"] > 3 * exact["action/value"]
    assert 0.5 * exact["action/value"] < exact["action/taylor"] < exact["action/value"]


def test_terms_add_up_to_the_variance_of_the_estimator():
    """Sigma_tau + Sigma_a^V + (state bound - ||grad J||^2) = tr Cov of (R - V(s)) g, sampled directly."""
    exact = exact_terms()
    rng = np.random.default_rng(1)
    s = rng.normal(size=400_000)
    a = mean_of(s) + SIGMA * rng.normal(size=s.size)
    ret = q_value(s, a) + noise_sd(s) * rng.normal(size=s.size)
    g_hat = (ret - state_value(s))[:, None] * score(s, a)
    total = g_hat.var(axis=0, ddof=1).sum()
    predicted = exact["trajectory"] + exact["action/value"] + exact["state_bound"] - exact["grad_sq_norm"]
    # the trace's standard error from the per-sample squared deviations
    dev = ((g_hat - g_hat.mean(0)) ** 2).sum(1)
    assert abs(total - predicted) < 4 * dev.std() / np.sqrt(s.size)
    assert exact["grad_sq_norm"] == pytest.approx(float((g_hat.mean(0) ** 2).sum()), rel=0.05)


def test_dependent_continuations_are_visible():
    """Feeding the same return twice (not two independent continuations) zeroes the trajectory term: the
    estimator really uses the pair, so a sampler that reuses a continuation is caught by this number."""
    data = nested_samples(2000, seed=2)
    data["returns"] = data["returns"][:, :1].expand(-1, 2)
    result = variance_decomposition(**data)
    assert result.trajectory == 0.0
    assert result.state_baseline == "value"  # the first baseline given
    assert result.total("value") == pytest.approx(result.trajectory + result.action["value"] + result.state_bound)
    assert set(result.as_dict()["action"]) == {"none", "value", "mc_value", "taylor"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(scores=d["scores"][:, 0]), "scores must be"),
        (lambda d: d.update(fresh_scores=d["fresh_scores"][:-1]), "fresh_scores must have the shape"),
        (lambda d: d.update(returns=d["returns"][:, 0]), "returns must be"),
        (lambda d: d.update(fresh_returns=d["fresh_returns"][:-1]), "fresh_returns must be"),
        (lambda d: d["baselines"].update(bad=torch.zeros(5, 2)), r"baselines\['bad'\] must be"),
        (lambda d: d["baselines"].update(none=torch.zeros(10)), 'must not contain "none"'),
        (lambda d: d["returns"].__setitem__((3, 1), float("nan")), "returns must be finite"),
        (lambda d: d.update(state_baseline="nope"), "state_baseline must be one of"),
    ],
)
def test_bad_input(change, message):
    data = nested_samples(10, seed=3)
    change(data)
    with pytest.raises(ValueError, match=message):
        variance_decomposition(**data)
