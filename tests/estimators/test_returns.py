"""Returns and advantages against plain-loop references, cross-function identities and SB3's own buffer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pgvar._testing.reference import (
    reference_discounted_returns,
    reference_gae_advantages,
    reference_lambda_return,
)
from pgvar.estimators import discounted_returns, gae_advantages, td_lambda_returns

PATTERNS = ["none", "terminated", "truncated", "both"]


def make_rollout(T: int, N: int, pattern: str, dtype: torch.dtype, seed: int = 0):
    """Random rewards and values with episode ends; next_values[t] = values[t+1] except at episode ends."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(T, N, generator=g, dtype=torch.float64).to(dtype)
    values = torch.randn(T, N, generator=g, dtype=torch.float64).to(dtype)
    final_values = torch.randn(T, N, generator=g, dtype=torch.float64).to(dtype)  # V(final observation)
    u = torch.rand(T, N, generator=g)
    terminated = (u < 0.15) if pattern in ("terminated", "both") else torch.zeros(T, N, dtype=torch.bool)
    truncated = ((u > 0.85) if pattern in ("truncated", "both") else torch.zeros(T, N, dtype=torch.bool)) & ~terminated
    next_values = torch.empty_like(values)
    next_values[:-1] = values[1:]
    next_values[-1] = final_values[-1]
    done = terminated | truncated
    next_values[done] = final_values[done]
    return rewards, values, next_values, terminated, truncated


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("N", [1, 4])
@pytest.mark.parametrize("T", [1, 3, 200])
def test_estimators_match_loop_references(T, N, pattern, dtype):
    rewards, values, next_values, terminated, truncated = make_rollout(T, N, pattern, dtype, seed=T * 10 + N)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for gamma, lam in itertools.product([0.0, 0.9, 1.0], [0.0, 0.7, 1.0]):
        adv = gae_advantages(rewards, values, next_values, terminated, truncated, gamma=gamma, gae_lambda=lam)
        assert adv.dtype == dtype and adv.shape == (T, N)
        expected = reference_gae_advantages(rewards, values, next_values, terminated, truncated, gamma, lam)
        torch.testing.assert_close(adv.double(), expected, **tol)
        ret = discounted_returns(rewards, terminated, truncated, next_values, gamma=gamma)
        expected = reference_discounted_returns(rewards, terminated, truncated, next_values, gamma)
        torch.testing.assert_close(ret.double(), expected, **tol)
    # The forward view of TD(lambda) is O(T^2): check it on a smaller grid.
    for gamma, lam in [(0.9, 0.7), (1.0, 0.5)]:
        lam_ret = td_lambda_returns(rewards, values, next_values, terminated, truncated, gamma=gamma, gae_lambda=lam)
        expected = reference_lambda_return(rewards, values, next_values, terminated, truncated, gamma, lam)
        torch.testing.assert_close(lam_ret.double(), expected, **tol)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_gae_lambda_one_plus_values_is_bootstrapped_return(pattern):
    rewards, values, next_values, terminated, truncated = make_rollout(50, 3, pattern, torch.float64)
    adv = gae_advantages(rewards, values, next_values, terminated, truncated, gamma=0.97, gae_lambda=1.0)
    ret = discounted_returns(rewards, terminated, truncated, next_values, gamma=0.97)
    torch.testing.assert_close(adv + values, ret)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_gae_lambda_zero_is_td_error_and_td_lambda_is_gae_plus_values(pattern):
    rewards, values, next_values, terminated, truncated = make_rollout(40, 2, pattern, torch.float64)
    adv0 = gae_advantages(rewards, values, next_values, terminated, truncated, gamma=0.9, gae_lambda=0.0)
    td_error = rewards + 0.9 * (~terminated).double() * next_values - values
    torch.testing.assert_close(adv0, td_error)
    adv = gae_advantages(rewards, values, next_values, terminated, truncated, gamma=0.9, gae_lambda=0.8)
    lam = td_lambda_returns(rewards, values, next_values, terminated, truncated, gamma=0.9, gae_lambda=0.8)
    torch.testing.assert_close(lam, adv + values)


def test_truncation_bootstraps_but_termination_does_not():
    rewards = torch.ones(2, 2, dtype=torch.float64)
    next_values = torch.full((2, 2), 10.0, dtype=torch.float64)
    ends = torch.tensor([[True, True], [False, False]])
    no = torch.zeros(2, 2, dtype=torch.bool)
    terminated_ret = discounted_returns(rewards, ends, no, next_values, gamma=0.5)
    truncated_ret = discounted_returns(rewards, no, ends, next_values, gamma=0.5)
    assert torch.equal(terminated_ret[0], torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert torch.equal(truncated_ret[0], torch.tensor([6.0, 6.0], dtype=torch.float64))
    # The last row goes on past the rollout: bootstrapped from next_values in both cases.
    assert torch.equal(terminated_ret[1], torch.tensor([6.0, 6.0], dtype=torch.float64))


def test_gradient_path_matches_fast_path_and_autograd_is_correct():
    rewards, values, next_values, terminated, truncated = make_rollout(30, 3, "both", torch.float64)
    fast = gae_advantages(rewards, values, next_values, terminated, truncated, gamma=0.95, gae_lambda=0.9)
    values_leaf = values.clone().requires_grad_(True)
    slow = gae_advantages(rewards, values_leaf, next_values, terminated, truncated, gamma=0.95, gae_lambda=0.9)
    assert torch.equal(fast, slow.detach())
    # Autograd through the recursion against finite differences, in every tensor input.
    r8, v8, nv8 = (x[:8].clone().requires_grad_(True) for x in (rewards, values, next_values))
    assert torch.autograd.gradcheck(
        lambda r, v, nv: gae_advantages(r, v, nv, terminated[:8], truncated[:8], gamma=0.95, gae_lambda=0.9),
        (r8, v8, nv8),
    )
    assert torch.autograd.gradcheck(
        lambda r, nv: discounted_returns(r, terminated[:8], truncated[:8], nv, gamma=0.95), (r8, nv8)
    )


@pytest.mark.parametrize("gamma,gae_lambda", [(0.99, 0.95), (1.0, 1.0), (0.9, 0.0)])
def test_reproduces_sb3_rollout_buffer_bit_for_bit(gamma, gae_lambda):
    from gymnasium import spaces
    from stable_baselines3.common.buffers import RolloutBuffer

    T, N = 64, 4
    rng = np.random.default_rng(1)
    buf = RolloutBuffer(T, spaces.Box(-1, 1, (2,)), spaces.Discrete(2), gamma=gamma, gae_lambda=gae_lambda, n_envs=N)
    buf.rewards[:] = rng.normal(size=(T, N)).astype(np.float32)
    buf.values[:] = rng.normal(size=(T, N)).astype(np.float32)
    buf.episode_starts[:] = (rng.random((T, N)) < 0.1).astype(np.float32)
    buf.full = True
    last_values = torch.tensor(rng.normal(size=N).astype(np.float32))
    dones = np.array([1.0, 0.0, 1.0, 0.0], dtype=np.float32)
    buf.compute_returns_and_advantage(last_values, dones)
    # SB3's storage convention: the truncation bootstrap is already in the reward; every end is "terminated".
    values = torch.from_numpy(buf.values)
    next_values = torch.cat([values[1:], last_values[None]])
    terminated = torch.cat([torch.from_numpy(buf.episode_starts[1:]), torch.from_numpy(dones)[None]])
    rewards = torch.from_numpy(buf.rewards)
    adv = gae_advantages(rewards, values, next_values, terminated, gamma=gamma, gae_lambda=gae_lambda)
    assert torch.equal(adv, torch.from_numpy(buf.advantages))
    lam = td_lambda_returns(rewards, values, next_values, terminated, gamma=gamma, gae_lambda=gae_lambda)
    assert torch.equal(lam, torch.from_numpy(buf.returns))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(gamma=1.5), "gamma must be in \\[0, 1\\], got 1.5"),
        (dict(gamma=-0.1), "gamma must be in \\[0, 1\\]"),
        (dict(gamma=float("nan")), "gamma must be in \\[0, 1\\]"),
        (dict(gae_lambda=2.0), "gae_lambda must be in \\[0, 1\\], got 2.0"),
        (dict(gamma="high"), "gamma must be a number"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, match):
    rewards, values, next_values, terminated, truncated = make_rollout(5, 2, "both", torch.float32)
    args = dict(gamma=0.99, gae_lambda=0.95) | kwargs
    with pytest.raises(ValueError, match=match):
        gae_advantages(rewards, values, next_values, terminated, truncated, **args)


def test_bad_tensors_raise_naming_the_argument():
    rewards, values, next_values, terminated, truncated = make_rollout(5, 2, "both", torch.float32)
    kw = dict(gamma=0.9, gae_lambda=0.9)
    bad = rewards.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"rewards must be finite, got nan at index \(3, 1\)"):
        gae_advantages(bad, values, next_values, terminated, truncated, **kw)
    with pytest.raises(ValueError, match="values must have shape \\(5, 2\\)"):
        gae_advantages(rewards, values[:4], next_values, terminated, truncated, **kw)
    with pytest.raises(ValueError, match="rewards must be time-major with shape \\[T, N\\]"):
        discounted_returns(rewards[:, 0], terminated[:, 0], gamma=0.9)
    with pytest.raises(ValueError, match="rewards must be a floating-point tensor"):
        discounted_returns(torch.ones(3, 2, dtype=torch.long), terminated[:3], gamma=0.9)
    with pytest.raises(ValueError, match="terminated must hold only 0/1"):
        discounted_returns(rewards, torch.full((5, 2), 2.0), gamma=0.9)
    with pytest.raises(ValueError, match="next_values must have the dtype of rewards"):
        gae_advantages(rewards, values, next_values.double(), terminated, truncated, **kw)
    inf_values = values.clone()
    inf_values[0, 0] = float("inf")
    with pytest.raises(ValueError, match="values must be finite"):
        gae_advantages(rewards, inf_values, next_values, terminated, truncated, **kw)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["numpy-loop", "autograd"])
@pytest.mark.parametrize("fn", ["discounted_returns", "gae_advantages", "td_lambda_returns"])
def test_overflow_in_a_later_episode_leaves_earlier_episodes_finite(fn, requires_grad):
    """A later episode whose return overflows to inf must not turn an earlier, finished one into NaN (0 * inf)."""
    big = torch.finfo(torch.float32).max / 2
    rewards = torch.tensor([[1.0], [1.0], [big], [big], [big]], requires_grad=requires_grad)
    terminated = torch.tensor([[0.0], [1.0], [0.0], [0.0], [0.0]])
    zeros = torch.zeros(5, 1)
    if fn == "discounted_returns":
        out = discounted_returns(rewards, terminated, gamma=1.0)
    else:
        call = gae_advantages if fn == "gae_advantages" else td_lambda_returns
        out = call(rewards, zeros, zeros, terminated, gamma=1.0, gae_lambda=1.0)
    assert out[:2, 0].tolist() == [2.0, 1.0]  # the first episode, as if alone
    assert bool(torch.isinf(out[2]).all())  # the overflow itself stays visible (3 x max/2)
    if requires_grad:
        (grad,) = torch.autograd.grad(out[:2].sum(), rewards)
        assert grad[:, 0].tolist() == [1.0, 2.0, 0.0, 0.0, 0.0]


def test_a_zero_discount_cuts_every_step_even_after_an_overflow():
    big = torch.finfo(torch.float64).max
    rewards = torch.tensor([[1.0], [big], [big]], dtype=torch.float64)
    out = discounted_returns(rewards, torch.zeros(3, 1), gamma=0.0)
    assert torch.equal(out, rewards)
