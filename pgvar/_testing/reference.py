"""Plain-loop reference implementations: one float at a time, written for reading, not speed.

Each mirrors a vectorized estimator in :mod:`pgvar.estimators`; the tests assert that both agree over grids of
gamma, lambda, horizons, env counts and termination/truncation patterns.
"""

from __future__ import annotations

import torch


def reference_discounted_returns(rewards, terminated, truncated, next_values, gamma):
    T, N = rewards.shape
    out = torch.zeros(T, N, dtype=torch.float64)
    for n in range(N):
        following = 0.0
        for t in reversed(range(T)):
            if bool(terminated[t, n]):
                following = 0.0
            elif bool(truncated[t, n]) or t == T - 1:
                following = 0.0 if next_values is None else float(next_values[t, n])
            following = float(rewards[t, n]) + gamma * following
            out[t, n] = following
    return out


def reference_gae_advantages(rewards, values, next_values, terminated, truncated, gamma, gae_lambda):
    T, N = rewards.shape
    out = torch.zeros(T, N, dtype=torch.float64)
    for n in range(N):
        running = 0.0
        for t in reversed(range(T)):
            episode_goes_on = not (bool(terminated[t, n]) or bool(truncated[t, n]))
            bootstrap = 0.0 if bool(terminated[t, n]) else gamma * float(next_values[t, n])
            delta = float(rewards[t, n]) + bootstrap - float(values[t, n])
            running = delta + (gamma * gae_lambda * running if episode_goes_on and t < T - 1 else 0.0)
            out[t, n] = running
    return out


def reference_lambda_return(rewards, values, next_values, terminated, truncated, gamma, gae_lambda):
    """TD(lambda) return from its forward-view definition: a weighted mix of n-step returns."""
    T, N = rewards.shape
    out = torch.zeros(T, N, dtype=torch.float64)
    for n in range(N):
        for t in range(T):
            # Walk forward, building n-step returns until the episode or the rollout ends.
            total, weight_left, discount, partial = 0.0, 1.0, 1.0, 0.0
            k = t
            while True:
                partial += discount * float(rewards[k, n])
                ends = bool(terminated[k, n]) or bool(truncated[k, n]) or k == T - 1
                bootstrap = 0.0 if bool(terminated[k, n]) else float(next_values[k, n])
                n_step = partial + discount * gamma * bootstrap
                if ends:
                    total += weight_left * n_step
                    break
                total += weight_left * (1.0 - gae_lambda) * n_step
                weight_left *= gae_lambda
                discount *= gamma
                k += 1
            out[t, n] = total
    return out
