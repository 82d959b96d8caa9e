"""Measuring the variance of policy-gradient estimators
====================================================

Measure the variance of policy-gradient estimators against the exact gradient, then on an SB3 policy.

1. On a random tabular MDP whose gradient is known exactly (pgvar.problems.TabularMDP): per-episode gradients
   of four learning signals, their covariance trace, SNR (plain and debiased) and cosine to the true gradient,
   with a check that each estimate is within a few standard errors of it.
2. Across independent batches: the variance of the batch estimate measured directly, compared with what a
   single batch predicts (tr Cov / N), and the cosines of Ilyas et al. (2020).
3. On a plain stable-baselines3 policy (no training): the squared-norm trick gives the covariance trace of the
   per-sample gradients at about the cost of one backward, and agrees with vmap.

The docs include its functions (docs/guide/measuring.md).

::

    python examples/measure_policy_gradient.py                         # about 10 s
    PGVAR_EXAMPLE_SMOKE=1 python examples/measure_policy_gradient.py   # the small version the tests run
"""

from __future__ import annotations

import os
import time

import torch

from pgvar.estimators import batch_mean_baseline, discounted_returns, gae_advantages
from pgvar.measure import (
    estimate_statistics,
    flatten,
    flatten_per_sample,
    gradient_statistics,
    gradient_statistics_from_norms,
    gradient_statistics_streaming,
    per_sample_gradients,
)
from pgvar.problems import EpisodeBatch, GaussianBandit, TabularMDP

SMOKE = os.environ.get("PGVAR_EXAMPLE_SMOKE", "0") not in ("", "0")


def learning_signals(mdp: TabularMDP, params: dict, batch: EpisodeBatch) -> dict[str, torch.Tensor]:
    """Four [T, N] learning signals for the same batch, from plain returns to GAE with the exact V."""
    mask = batch.mask.double()
    values = mdp.exact_state_values(params, batch.observations) * mask
    next_values = mdp.exact_state_values(params, batch.next_observations) * mask
    returns = discounted_returns(
        batch.rewards, batch.terminated, batch.truncated, next_values, gamma=mdp.gamma
    )
    return {
        "G (no baseline)": returns,
        "G - batch mean": returns - batch_mean_baseline(returns, mask=batch.mask),
        "G - V (exact V)": returns - values,
        "GAE(0.9), exact V": gae_advantages(
            batch.rewards,
            values,
            next_values,
            batch.terminated,
            batch.truncated,
            gamma=mdp.gamma,
            gae_lambda=0.9,
        ),
    }


def per_episode_gradients(
    mdp: TabularMDP, params: dict, batch: EpisodeBatch, signal: torch.Tensor
) -> torch.Tensor:
    """[N, P]: episode i's estimate sum_t gamma^t grad log pi(a_t|s_t) signal_t (the signal is held fixed)."""
    discounts = mdp.gamma ** batch.timesteps.double()
    weights = (discounts * signal * batch.mask).detach()

    def episode_surrogate(
        p: dict, observations: torch.Tensor, actions: torch.Tensor, w: torch.Tensor
    ) -> torch.Tensor:
        return (mdp.log_prob(p, observations, actions) * w).sum()

    # vmap over episodes: each input is episode-major [N, T].
    grads = per_sample_gradients(
        episode_surrogate, params, (batch.observations.T, batch.actions.T, weights.T)
    )
    return flatten_per_sample(grads)


def measure_on_tabular_mdp() -> None:
    n_episodes = 150 if SMOKE else 2000
    mdp = TabularMDP(n_states=5, n_actions=3, gamma=0.9, seed=0)
    params = mdp.initial_parameters(seed=1)
    exact = flatten(mdp.exact_policy_gradient(params))
    batch = mdp.sample_episodes(params, n_episodes, generator=torch.Generator().manual_seed(0))

    print(f"{'signal':>20} {'|mean|':>8} {'tr Cov':>9} {'SNR':>7} {'SNR-1':>7} {'cos':>6} {'max|z|':>6}")
    for name, signal in learning_signals(mdp, params, batch).items():
        grads = per_episode_gradients(mdp, params, batch, signal)
        stats = gradient_statistics(grads, reference=exact)
        standard_errors = grads.std(dim=0) / n_episodes**0.5
        max_z = float(((stats.mean - exact).abs() / standard_errors).max())
        print(
            f"{name:>20} {stats.mean_norm:8.4f} {stats.covariance_trace:9.3f} {stats.snr:7.2f} "
            f"{stats.snr_debiased:7.2f} {stats.cosine_to_reference:6.3f} {max_z:6.2f}"
        )
        # Unbiased (the batch mean up to 1/N): every coordinate within 5 standard errors of the exact gradient.
        assert max_z < 5.0, (name, max_z)
    print(f"{'exact':>20} {float(exact.norm()):8.4f}")


def measure_across_batches() -> None:
    n_batches, n_episodes = (6, 50) if SMOKE else (20, 100)
    mdp = TabularMDP(n_states=5, n_actions=3, gamma=0.9, seed=0)
    params = mdp.initial_parameters(seed=1)
    exact = flatten(mdp.exact_policy_gradient(params))
    generator = torch.Generator().manual_seed(1)

    estimates, predicted = [], []
    for _ in range(n_batches):
        batch = mdp.sample_episodes(params, n_episodes, generator=generator)
        advantages = learning_signals(mdp, params, batch)["G - V (exact V)"]
        grads = per_episode_gradients(mdp, params, batch, advantages)  # [N, P]
        estimates.append(grads.mean(dim=0))  # this batch's gradient estimate
        predicted.append(gradient_statistics(grads).variance_of_mean)  # tr Cov / N, from this batch alone

    across = estimate_statistics(torch.stack(estimates), reference=exact)
    print(f"{n_batches} batches of {n_episodes} episodes:")
    print(f"  variance of the batch estimate, across batches: {across.variance_trace:.4f}")
    print(f"  tr Cov / N predicted by single batches (mean):  {sum(predicted) / n_batches:.4f}")
    print(
        f"  pairwise cosine of the estimates {across.pairwise_cosine:.3f}; cosine to the exact gradient "
        f"{across.cosine_to_reference:.3f} +- {across.cosine_to_reference_se:.3f}"
    )
    print(f"  bias of the mean estimate: max |z| over {exact.numel()} coordinates = {across.max_abs_z:.2f}")
    assert across.max_abs_z is not None and across.max_abs_z < 5.0


def measure_sb3_policy() -> None:
    from stable_baselines3.common.policies import ActorCriticPolicy

    n_samples = 256 if SMOKE else 2048
    bandit = GaussianBandit(obs_dim=4, action_dim=2, seed=0)
    policy = ActorCriticPolicy(
        bandit.observation_space, bandit.action_space, lambda _: 3e-4, net_arch=[64, 64]
    )
    contexts = bandit.context_mean + torch.randn(
        n_samples, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    observations = contexts.float()
    with torch.no_grad():
        actions, values, _ = policy(observations)
    advantages = (bandit.reward(contexts, actions.double()) - values.squeeze(-1).double()).float()

    def loss_fn(pol, obs, act, adv):  # a SUM over samples of -log pi(a|s) * A
        return -(pol.evaluate_actions(obs, act)[1] * adv).sum()

    actor = lambda name: "value" not in name  # noqa: E731  (the critic's parameters are held fixed)
    inputs = (observations, actions, advantages)

    start = time.perf_counter()
    fast = gradient_statistics_from_norms(policy, loss_fn, inputs, params=actor)
    fast_seconds = time.perf_counter() - start
    start = time.perf_counter()
    full = gradient_statistics_streaming(policy, loss_fn, inputs, params=actor)
    full_seconds = time.perf_counter() - start

    print(f"sb3 policy, {n_samples} samples, {fast.mean.numel()} actor parameters:")
    print(
        f"  norms trick: tr Cov = {fast.covariance_trace:.4f}  SNR = {fast.snr:.3f}  ({fast_seconds * 1e3:.0f} ms)"
    )
    print(
        f"  vmap(grad):  tr Cov = {full.covariance_trace:.4f}  SNR = {full.snr:.3f}  ({full_seconds * 1e3:.0f} ms)"
    )
    assert abs(fast.covariance_trace - full.covariance_trace) <= 1e-3 * full.covariance_trace
    torch.testing.assert_close(fast.mean, full.mean, rtol=1e-4, atol=1e-6)


def main() -> None:
    torch.manual_seed(0)
    measure_on_tabular_mdp()
    measure_across_batches()
    measure_sb3_policy()


if __name__ == "__main__":
    main()
