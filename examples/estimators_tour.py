"""A tour of the estimators
========================

A tour of pgvar.estimators: returns, GAE, TD(lambda), baselines and advantage normalization.

Every section checks what it shows (an identity, a closed-form value or SB3's own numbers), so this script fails
if an estimator is wrong. The docs include its functions (docs/guide/returns.md, baselines.md, normalization.md).

::

    python examples/estimators_tour.py                         # about 5 s
    PGVAR_EXAMPLE_SMOKE=1 python examples/estimators_tour.py   # the small version the tests run
"""

from __future__ import annotations

import os

import numpy as np
import torch

from pgvar.estimators import (
    batch_mean_baseline,
    discounted_returns,
    gae_advantages,
    normalize_advantages,
    optimal_constant_baseline,
    td_lambda_returns,
)

SMOKE = os.environ.get("PGVAR_EXAMPLE_SMOKE", "0") not in ("", "0")


def random_rollout(T: int, N: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random float64 rollout with terminations, truncations and consistent next values."""
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randn(T, N, generator=generator, dtype=torch.float64)
    values = torch.randn(T, N, generator=generator, dtype=torch.float64)
    ends = torch.rand(T, N, generator=generator)
    terminated = ends < 0.1
    truncated = (ends >= 0.1) & (ends < 0.2)
    # V(s_{t+1}): the next row's value inside an episode; after the last row and at a truncation, the value
    # of an observation that is not in `values` (the next rollout's first state, the final observation).
    next_values = torch.cat([values[1:], torch.randn(1, N, generator=generator, dtype=torch.float64)])
    final_observation_values = torch.randn(T, N, generator=generator, dtype=torch.float64)
    next_values = torch.where(truncated, final_observation_values, next_values)
    return dict(
        rewards=rewards, values=values, next_values=next_values, terminated=terminated, truncated=truncated
    )


def tour_returns() -> None:
    rollout = random_rollout(T=50, N=4)
    rewards, values, next_values = rollout["rewards"], rollout["values"], rollout["next_values"]
    terminated, truncated = rollout["terminated"], rollout["truncated"]
    gamma = 0.99

    returns = discounted_returns(rewards, terminated, truncated, next_values, gamma=gamma)
    advantages = gae_advantages(
        rewards, values, next_values, terminated, truncated, gamma=gamma, gae_lambda=0.95
    )
    targets = td_lambda_returns(
        rewards, values, next_values, terminated, truncated, gamma=gamma, gae_lambda=0.95
    )

    # TD(lambda) returns are GAE advantages plus the values they were computed with.
    torch.testing.assert_close(targets, advantages + values)
    # lambda = 1: the advantage is the bootstrapped return minus the baseline V(s_t).
    gae_one = gae_advantages(rewards, values, next_values, terminated, truncated, gamma=gamma, gae_lambda=1.0)
    torch.testing.assert_close(gae_one, returns - values)
    # lambda = 0: the advantage is the one-step TD error.
    gae_zero = gae_advantages(
        rewards, values, next_values, terminated, truncated, gamma=gamma, gae_lambda=0.0
    )
    td_errors = rewards + gamma * (~terminated) * next_values - values
    torch.testing.assert_close(gae_zero, td_errors)
    print(f"returns: G[0] = {[round(g, 4) for g in returns[0].tolist()]}")
    print("returns: TD(lambda) = GAE + V, GAE(1) = G - V and GAE(0) = TD error all hold")


def tour_terminated_vs_truncated() -> None:
    rewards = torch.ones(3, 1)
    next_values = torch.tensor([[0.0], [0.0], [10.0]])  # V(final observation) = 10 at the last step
    end = torch.tensor([[False], [False], [True]])
    never = torch.zeros_like(end)
    gamma = 0.9

    terminated_returns = discounted_returns(rewards, end, never, next_values, gamma=gamma)
    truncated_returns = discounted_returns(rewards, never, end, next_values, gamma=gamma)
    print(
        f"terminated: G = {[round(g, 4) for g in terminated_returns.squeeze(1).tolist()]}"
    )  # [2.71, 1.9, 1.0]
    print(
        f"truncated:  G = {[round(g, 4) for g in truncated_returns.squeeze(1).tolist()]}"
    )  # [10.0, 10.0, 10.0]
    torch.testing.assert_close(terminated_returns.squeeze(1), torch.tensor([1 + 0.9 + 0.81, 1.9, 1.0]))
    torch.testing.assert_close(truncated_returns[-1], torch.tensor([1.0 + gamma * 10.0]))


def tour_sb3_buffer() -> None:
    from gymnasium import spaces
    from stable_baselines3.common.buffers import RolloutBuffer

    T, N, gamma, gae_lambda = 16, 2, 0.99, 0.95
    rng = np.random.default_rng(0)
    buffer = RolloutBuffer(T, spaces.Box(-1, 1, (3,)), spaces.Discrete(2), "cpu", gae_lambda, gamma, N)
    for _ in range(T):
        buffer.add(
            rng.normal(size=(N, 3)).astype(np.float32),
            rng.integers(0, 2, size=(N, 1)),
            rng.normal(size=N).astype(
                np.float32
            ),  # SB3 has already added gamma * V(final obs) at truncations
            rng.random(N) < 0.2,  # episode_starts
            torch.as_tensor(rng.normal(size=N), dtype=torch.float32),
            torch.zeros(N),
        )
    last_values = torch.as_tensor(rng.normal(size=N), dtype=torch.float32)
    dones = rng.random(N) < 0.2
    buffer.compute_returns_and_advantage(last_values=last_values, dones=dones)

    # The same numbers from pgvar: next values and "terminated" are the buffer's arrays shifted by one row.
    rewards = torch.as_tensor(buffer.rewards)
    values = torch.as_tensor(buffer.values)
    next_values = torch.cat([values[1:], last_values[None]])
    terminated = torch.cat(
        [torch.as_tensor(buffer.episode_starts[1:]), torch.as_tensor(dones[None], dtype=torch.float32)]
    )
    advantages = gae_advantages(
        rewards, values, next_values, terminated, None, gamma=gamma, gae_lambda=gae_lambda
    )

    torch.testing.assert_close(advantages, torch.as_tensor(buffer.advantages))
    torch.testing.assert_close(advantages + values, torch.as_tensor(buffer.returns))
    print(
        f"sb3: pgvar's GAE equals RolloutBuffer.advantages (max abs difference "
        f"{(advantages - torch.as_tensor(buffer.advantages)).abs().max():.1e})"
    )


def gaussian_bandit_samples(n_samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores and rewards of a one-step Gaussian bandit with a known gradient.

    Policy a ~ N(mu, sigma^2) with parameters (mu, log sigma); reward r(a) = 10 - (a - 3)^2, so that
    J = 10 - (mu - 3)^2 - sigma^2 and grad J = (-2 (mu - 3), -2 sigma^2) exactly.
    Returns the [n, 2] scores grad log pi(a), the [n] rewards and the exact gradient.
    """
    mu, sigma = 1.0, 0.5
    generator = torch.Generator().manual_seed(seed)
    actions = mu + sigma * torch.randn(n_samples, generator=generator, dtype=torch.float64)
    noise = (actions - mu) / sigma
    scores = torch.stack(
        [noise / sigma, noise**2 - 1.0], dim=1
    )  # d/dmu and d/dlog(sigma) of log N(a; mu, sigma)
    rewards = 10.0 - (actions - 3.0) ** 2
    exact_gradient = torch.tensor([-2.0 * (mu - 3.0), -2.0 * sigma**2], dtype=torch.float64)
    return scores, rewards, exact_gradient


def tour_baselines() -> None:
    n_samples = 2_000 if SMOKE else 200_000
    scores, rewards, exact_gradient = gaussian_bandit_samples(n_samples)
    returns = rewards[None, :]  # time-major [T=1, N=n_samples]: one step of n parallel bandits
    score_sq_norms = scores.pow(2).sum(dim=1)[None, :]

    baselines = {
        "none": torch.zeros((), dtype=torch.float64),
        "batch mean": batch_mean_baseline(returns),
        "optimal constant": optimal_constant_baseline(returns, score_sq_norms),
    }
    for name, baseline in baselines.items():
        per_sample = scores * (rewards - baseline)[:, None]  # one gradient estimate per sample, [n, 2]
        mean = per_sample.mean(dim=0)
        trace_cov = per_sample.var(dim=0).sum()
        standard_error = (per_sample.var(dim=0) / n_samples).sqrt()
        gradient = [round(g, 3) for g in mean.tolist()]
        print(
            f"baseline {name:>16}: b = {float(baseline):6.3f}  gradient = {gradient}  tr Cov = {trace_cov:8.2f}"
        )
        # Any constant baseline is unbiased (up to the O(1/N) of reusing the batch): within 5 standard errors.
        assert ((mean - exact_gradient).abs() <= 5 * standard_error + 1e-12).all(), (
            name,
            mean,
            exact_gradient,
        )

    # Greensmith et al. (2004): E||g(b)||^2 = E||g(b*)||^2 + E[||s||^2] (b - b*)^2, exactly, also in-sample.
    b_star = baselines["optimal constant"]
    for b in (0.0, 2.0, float(b_star) + 1.0):
        second_moment = (score_sq_norms * (returns - b) ** 2).mean()
        optimal_second_moment = (score_sq_norms * (returns - b_star) ** 2).mean()
        torch.testing.assert_close(
            second_moment, optimal_second_moment + score_sq_norms.mean() * (b - b_star) ** 2
        )
    print(f"baselines: Greensmith identity holds around b* = {float(b_star):.3f}")

    # Per-coordinate variant: one optimal constant per parameter, b*_k = E[g_k^2 G] / E[g_k^2].
    per_coordinate = optimal_constant_baseline(returns, scores.pow(2)[None, :, :])
    print(f"baselines: per-coordinate b* = {[round(b, 3) for b in per_coordinate.tolist()]}")
    assert per_coordinate.shape == (2,)


def tour_normalization() -> None:
    generator = torch.Generator().manual_seed(0)
    advantages = 5.0 + 3.0 * torch.randn(64, 4, generator=generator, dtype=torch.float64)
    scores = torch.randn(64, 4, 3, generator=generator, dtype=torch.float64)  # grad log pi per sample, P = 3

    normalized = normalize_advantages(advantages, mode="batch")
    print(f"normalization: mean {normalized.mean():.2e}, std {normalized.std():.4f}")
    torch.testing.assert_close(normalized.mean(), torch.zeros((), dtype=torch.float64))

    # The gradient with normalized advantages is the batch-mean-baseline gradient scaled by 1 / std.
    gradient_normalized = (scores * normalized[..., None]).mean(dim=(0, 1))
    centred = advantages - batch_mean_baseline(advantages)
    gradient_mean_baseline = (scores * centred[..., None]).mean(dim=(0, 1))
    torch.testing.assert_close(gradient_normalized, gradient_mean_baseline / (advantages.std() + 1e-8))

    # Per minibatch (SB3 PPO's default): each minibatch gets its own mean and scale.
    flat_indices = torch.randperm(advantages.numel(), generator=generator)
    minibatches = list(flat_indices.split(64))
    per_minibatch = normalize_advantages(advantages, mode="minibatch", minibatch_indices=minibatches)
    for indices in minibatches:
        values = per_minibatch.reshape(-1)[indices]
        torch.testing.assert_close(values.mean(), torch.zeros((), dtype=torch.float64))
    untouched = normalize_advantages(advantages, mode="none")
    torch.testing.assert_close(untouched, advantages)
    print(f"normalization: {len(minibatches)} minibatches, each centred and scaled on its own")


def main() -> None:
    torch.manual_seed(0)
    tour_returns()
    tour_terminated_vs_truncated()
    tour_sb3_buffer()
    tour_baselines()
    tour_normalization()


if __name__ == "__main__":
    main()
