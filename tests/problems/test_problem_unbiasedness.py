"""REINFORCE with any state baseline is unbiased on every exact-gradient problem (and a biased one is caught).

The per-episode estimate is

    X_i = sum_t gamma^t * grad log pi(a_t|s_t) * (G_t - b_t),   G_t = discounted return-to-go,

and its sample mean over N independent episodes must lie within a Bonferroni-aware number of standard errors
(computed from the same samples, per coordinate) of the exact gradient. Baselines: none, the batch mean and the
Greensmith optimal constant computed on a SEPARATE batch (so they are constants independent of the episodes they
are applied to), and the exact V^pi(s_t). The power check uses the action-dependent b = (Q^pi(s, a) + V^pi(s)) / 2,
whose estimate has mean grad J / 2, and asserts it is rejected.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch.func import grad, vmap

from pgvar.estimators import batch_mean_baseline, discounted_returns, optimal_constant_baseline
from pgvar.problems import EpisodeBatch, GaussianBandit, LinearQuadraticRegulator, TabularMDP

# name -> (problem factory, episodes in the estimate batch)
PROBLEMS: dict[str, tuple[Callable[[], object], int]] = {
    "tabular": (lambda: TabularMDP(n_states=5, n_actions=3, gamma=0.9, termination_prob=0.2, seed=0), 20_000),
    "bandit-quadratic": (lambda: GaussianBandit(obs_dim=2, action_dim=2, reward="quadratic", seed=0), 20_000),
    "bandit-linear": (lambda: GaussianBandit(obs_dim=2, action_dim=2, reward="linear", seed=1), 20_000),
    "lqr-discounted": (
        lambda: LinearQuadraticRegulator(state_dim=2, action_dim=1, horizon=10, gamma=0.9, seed=0),
        20_000,
    ),
    "lqr-undiscounted": (
        lambda: LinearQuadraticRegulator(state_dim=3, action_dim=2, horizon=6, gamma=1.0, seed=2),
        20_000,
    ),
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine (20x slower under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


FAMILY_ALPHA = 1e-3  # family-wise false-alarm rate of one max-|z| check


def bonferroni_threshold(n_coordinates: int, family_alpha: float = FAMILY_ALPHA) -> float:
    """The |z| level that P independent coordinates all stay under with probability 1 - alpha (at least 4)."""
    per_coordinate = family_alpha / (2 * n_coordinates)
    z = (
        math.sqrt(2.0)
        * torch.special.erfinv(torch.tensor(1.0 - 2.0 * per_coordinate, dtype=torch.float64)).item()
    )
    return max(4.0, z)


def flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([params[name].reshape(-1) for name in sorted(params)])


def per_step_scores(problem, params, batch: EpisodeBatch) -> torch.Tensor:
    """grad_theta log pi(a_t|s_t) at every real step (0 on padding), flattened over parameters: ``[T, N, P]``.

    One vmap over the real steps only (padding can be most of a ``[T, N]`` batch).
    """
    mask = batch.mask
    scores = vmap(grad(problem.log_prob), in_dims=(None, 0, 0))(
        params, batch.observations[mask], batch.actions[mask]
    )
    flat_scores = torch.cat([scores[name].reshape(int(mask.sum()), -1) for name in sorted(scores)], dim=-1)
    out = torch.zeros(*mask.shape, flat_scores.shape[-1], dtype=flat_scores.dtype)
    out[mask] = flat_scores
    return out


def returns_of(problem, batch: EpisodeBatch) -> torch.Tensor:
    return discounted_returns(batch.rewards, batch.terminated, batch.truncated, gamma=problem.gamma)


def per_episode_estimates(
    problem, batch: EpisodeBatch, scores: torch.Tensor, baselines: torch.Tensor
) -> torch.Tensor:
    """X_i = sum_t gamma^t g_t (G_t - b_t) over real steps, ``[N, P]``."""
    weights = (problem.gamma**batch.timesteps) * (returns_of(problem, batch) - baselines) * batch.mask
    return torch.einsum("tn,tnp->np", weights, scores)


def max_abs_z(estimates: torch.Tensor, exact: torch.Tensor) -> tuple[float, torch.Tensor]:
    mean = estimates.mean(0)
    standard_error = estimates.std(0) / math.sqrt(estimates.shape[0])
    z = (mean - exact) / standard_error
    return float(z.abs().max()), z


@pytest.fixture(scope="module", params=sorted(PROBLEMS))
def setting(request):
    """One problem, its parameters, an estimate batch, a separate baseline batch and the per-baseline estimates."""
    factory, n_episodes = PROBLEMS[request.param]
    problem = factory()
    params = problem.initial_parameters(seed=1)
    batch = problem.sample_episodes(params, n_episodes, torch.Generator().manual_seed(11))
    baseline_batch = problem.sample_episodes(params, n_episodes // 4, torch.Generator().manual_seed(22))

    scores = per_step_scores(problem, params, batch)
    baseline_scores = per_step_scores(problem, params, baseline_batch)
    baseline_returns = returns_of(problem, baseline_batch)
    mean_b = batch_mean_baseline(baseline_returns, baseline_batch.mask)
    optimal_b = optimal_constant_baseline(
        baseline_returns, baseline_scores.square().sum(-1), baseline_batch.mask
    )

    with torch.no_grad():
        state_values = problem.exact_state_values(params, batch.observations, batch.timesteps)
        action_values = problem.exact_action_values(
            params, batch.observations, batch.actions, batch.timesteps
        )
    zeros = torch.zeros_like(batch.rewards)
    baselines = {
        "none": zeros,
        "batch_mean_separate": zeros + mean_b,
        "optimal_constant_separate": zeros + optimal_b,
        "exact_state_value": state_values * batch.mask,
        "biased_action_dependent": 0.5 * (action_values + state_values) * batch.mask,
    }
    estimates = {name: per_episode_estimates(problem, batch, scores, b) for name, b in baselines.items()}
    exact = flat(problem.exact_policy_gradient(params))
    return request.param, problem, exact, estimates


@pytest.mark.parametrize(
    "baseline", ["none", "batch_mean_separate", "optimal_constant_separate", "exact_state_value"]
)
def test_reinforce_with_state_baseline_is_unbiased(setting, baseline):
    name, _, exact, estimates = setting
    worst, z = max_abs_z(estimates[baseline], exact)
    threshold = bonferroni_threshold(exact.numel())
    assert worst < threshold, f"{name}/{baseline}: max |z| = {worst:.2f} >= {threshold:.2f}; z = {z}"


def test_action_dependent_baseline_is_detected_as_biased(setting):
    """Power: b = (Q + V) / 2 halves the expected gradient; the same check must reject it."""
    name, _, exact, estimates = setting
    worst, z = max_abs_z(estimates["biased_action_dependent"], exact)
    assert worst > 2 * bonferroni_threshold(exact.numel()), f"{name}: biased baseline not detected, z = {z}"
    # ... and it is biased the way the algebra says: its mean is grad J / 2 (within the same error bars).
    halved_worst, halved_z = max_abs_z(estimates["biased_action_dependent"], 0.5 * exact)
    assert halved_worst < bonferroni_threshold(exact.numel()), f"{name}: z against grad/2 = {halved_z}"


def test_state_value_baseline_reduces_variance(setting):
    """Sanity of the exact V^pi: as a baseline it beats no baseline (tr Cov of the per-episode estimate)."""
    name, _, _, estimates = setting
    trace = {k: float(v.var(0).sum()) for k, v in estimates.items()}
    assert trace["exact_state_value"] < trace["none"], f"{name}: {trace}"


def test_threshold_is_bonferroni_aware():
    assert bonferroni_threshold(1) == 4.0
    assert 4.0 < bonferroni_threshold(10_000) < 6.0
