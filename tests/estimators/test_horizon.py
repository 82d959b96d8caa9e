"""The horizon-aware value function (Tucker et al. 2018, Sec. 6): the time-to-go factor against a plain sum, exact
values on a constant-reward chain with a time limit (which a state-only value cannot fit), and the episode-end
conventions (the end at the horizon terminates; earlier truncations and the rollout's end bootstrap)."""

from __future__ import annotations

import itertools

import pytest
import torch

from pgvar.estimators import (
    discounted_returns,
    horizon_aware_value_loss,
    horizon_aware_value_targets,
    horizon_aware_values,
    horizon_episode_flags,
    time_to_go_factor,
)

GAMMAS = [0.0, 0.5, 0.99, 1.0 - 1e-9, 1.0]


@pytest.mark.parametrize("gamma, horizon", list(itertools.product(GAMMAS, [1, 3, 200])))
def test_time_to_go_factor_is_the_discounted_count_of_rewards_left(gamma, horizon):
    t = torch.arange(horizon + 1)
    expected = torch.tensor(
        [sum(gamma**k for k in range(horizon - int(step))) for step in t], dtype=torch.float64
    )
    got = time_to_go_factor(t, horizon=horizon, gamma=gamma, dtype=torch.float64)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12), (got - expected).abs().max()
    assert got[-1] == 0.0


def test_time_to_go_factor_gamma_one_and_dtypes():
    t = torch.tensor([[0, 1], [2, 3]])
    assert time_to_go_factor(t, horizon=3, gamma=1.0).tolist() == [[3.0, 2.0], [1.0, 0.0]]
    assert time_to_go_factor(t, horizon=3, gamma=0.9).dtype == torch.get_default_dtype()
    assert time_to_go_factor(t.double(), horizon=3, gamma=0.9).dtype == torch.float64
    # Continuous at gamma -> 1 (no cancellation in 1 - gamma^k).
    near = time_to_go_factor(torch.tensor([0]), horizon=1000, gamma=1 - 1e-12, dtype=torch.float64)
    assert float(near) == pytest.approx(1000.0, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"timesteps": torch.tensor([4]), "horizon": 3, "gamma": 0.9}, "timesteps must lie in"),
        ({"timesteps": torch.tensor([-1]), "horizon": 3, "gamma": 0.9}, "timesteps must lie in"),
        ({"timesteps": torch.tensor([0]), "horizon": 0, "gamma": 0.9}, "horizon"),
        ({"timesteps": torch.tensor([0]), "horizon": 3, "gamma": 1.5}, "gamma"),
        ({"timesteps": torch.tensor([True]), "horizon": 3, "gamma": 0.9}, "bool"),
    ],
)
def test_time_to_go_factor_rejects_bad_arguments(kwargs, match):
    timesteps = kwargs.pop("timesteps")
    with pytest.raises(ValueError, match=match):
        time_to_go_factor(timesteps, **kwargs)


# ------------------------------------------------------------------------------ the constant-reward chain
def constant_reward_chain(
    state_rewards: torch.Tensor, horizon: int, n_envs: int, length: int, dtype: torch.dtype, seed: int = 0
) -> dict[str, torch.Tensor]:
    """``N`` envs of a chain whose state never changes and pays ``c_s`` per step, cut at the time limit.

    Each env starts at a random step of a random episode (like a rollout in the middle of training); at
    ``t + 1 = horizon`` the episode is truncated and a new one starts in a random state. Time-major ``[L, N]``.
    """
    g = torch.Generator().manual_seed(seed)
    n_states = state_rewards.numel()
    state = torch.randint(n_states, (n_envs,), generator=g)
    t = torch.randint(horizon, (n_envs,), generator=g)
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("states", "timesteps", "rewards", "truncated")}
    for _ in range(length):
        rows["states"].append(state.clone())
        rows["timesteps"].append(t.clone())
        rows["rewards"].append(state_rewards[state].to(dtype))
        ends = t + 1 == horizon
        rows["truncated"].append(ends.clone())
        t = torch.where(ends, torch.zeros_like(t), t + 1)
        state = torch.where(ends, torch.randint(n_states, (n_envs,), generator=g), state)
    out = {k: torch.stack(v) for k, v in rows.items()}
    out["terminated"] = torch.zeros_like(out["truncated"])
    out["next_timesteps"] = out["timesteps"] + 1
    return out


@pytest.mark.parametrize("gamma", [0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_horizon_aware_value_is_exact_on_constant_reward_chain(gamma, dtype):
    """V0 = 0, r_bar = c_s is the true finite-horizon value: its targets (MC and TD(lambda)) reproduce it."""
    horizon = 7
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    chain = constant_reward_chain(c, horizon, n_envs=5, length=23, dtype=dtype)
    states, t = chain["states"], chain["timesteps"]
    true_values = (c[states] * time_to_go_factor(t, horizon=horizon, gamma=gamma, dtype=torch.float64)).to(
        dtype
    )
    zeros = torch.zeros(states.shape, dtype=dtype)
    r_bar = c[states].to(dtype)
    values = horizon_aware_values(zeros, r_bar, t, horizon=horizon, gamma=gamma)
    assert values.shape == (23, 5) and values.dtype == dtype
    assert torch.allclose(values, true_values)
    # The successor keeps its state (or is reset at the horizon, where the value is never used).
    next_values = horizon_aware_values(zeros, r_bar, chain["next_timesteps"], horizon=horizon, gamma=gamma)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    mc = horizon_aware_value_targets(
        chain["rewards"], chain["terminated"], chain["truncated"], t,
        horizon=horizon, gamma=gamma, next_values=next_values,
    )  # fmt: skip
    assert torch.allclose(mc, true_values, rtol=rtol, atol=rtol)
    td = horizon_aware_value_targets(
        chain["rewards"], chain["terminated"], chain["truncated"], t,
        horizon=horizon, gamma=gamma, next_values=next_values, values=values, gae_lambda=0.95,
    )  # fmt: skip
    assert torch.allclose(td, true_values, rtol=rtol, atol=rtol)
    loss = horizon_aware_value_loss(zeros, r_bar, mc, t, horizon=horizon, gamma=gamma)
    assert float(loss) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("gamma", [0.9, 1.0])
def test_least_squares_recovers_the_heads_and_a_state_only_value_cannot_fit(gamma):
    """Regressing on the targets: V0(s) + f(t) r_bar(s) fits exactly (V0 = 0, r_bar = c); V(s) leaves the
    spread of the return over the time left as error (the variance Tucker et al.'s method removes)."""
    horizon, n_states = 10, 3
    c = torch.tensor([1.0, 3.0, -1.0], dtype=torch.float64)
    chain = constant_reward_chain(c, horizon, n_envs=16, length=40, dtype=torch.float64, seed=1)
    states, t = chain["states"].reshape(-1), chain["timesteps"]
    # Complete the rollout's last row with the true next values, then regress (one-hot features per state).
    next_values = c[chain["states"]] * time_to_go_factor(
        chain["next_timesteps"], horizon=horizon, gamma=gamma, dtype=torch.float64
    )
    targets = horizon_aware_value_targets(
        chain["rewards"], chain["terminated"], chain["truncated"], t,
        horizon=horizon, gamma=gamma, next_values=next_values,
    ).reshape(-1)  # fmt: skip
    one_hot = torch.nn.functional.one_hot(states, n_states).double()
    factor = time_to_go_factor(t.reshape(-1), horizon=horizon, gamma=gamma, dtype=torch.float64)
    features = torch.cat([one_hot, one_hot * factor.unsqueeze(1)], dim=1)
    heads = torch.linalg.lstsq(features, targets.unsqueeze(1)).solution.squeeze(1)
    assert torch.allclose(heads[:n_states], torch.zeros(n_states, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(heads[n_states:], c, atol=1e-8)
    v0, r_bar = heads[:n_states][states], heads[n_states:][states]
    assert (
        float(horizon_aware_value_loss(v0, r_bar, targets, t.reshape(-1), horizon=horizon, gamma=gamma))
        < 1e-14
    )
    state_only = torch.linalg.lstsq(one_hot, targets.unsqueeze(1)).solution.squeeze(1)
    residual = float((one_hot @ state_only - targets).square().mean())
    assert residual > 0.1 * float(targets.var()), residual


def test_loss_gradient_weights_r_bar_by_the_time_left():
    t = torch.tensor([0, 2, 3])
    v0 = torch.zeros(3, requires_grad=True)
    r_bar = torch.zeros(3, requires_grad=True)
    targets = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    loss = horizon_aware_value_loss(v0, r_bar, targets, t, horizon=4, gamma=1.0)
    g_v0, g_r_bar = torch.autograd.grad(loss, [v0, r_bar])
    factor = torch.tensor([4.0, 2.0, 1.0])
    assert torch.allclose(g_v0, -2 * targets.detach() / 3)
    assert torch.allclose(g_r_bar, factor * g_v0)
    assert targets.grad is None  # targets are detached
    mask = torch.tensor([True, False, True])
    masked = horizon_aware_value_loss(v0, r_bar, targets, t, horizon=4, gamma=1.0, mask=mask)
    assert float(masked.detach()) == pytest.approx((1.0 + 9.0) / 2)


# -------------------------------------------------------------------------------- episode-end conventions
def reference_targets(rewards, terminated, truncated, timesteps, next_values, horizon, gamma):
    """Plain loop: the end at the horizon has no tail; terminations none; other cuts and the last row bootstrap."""
    steps, envs = rewards.shape
    out = torch.zeros_like(rewards)
    for n in range(envs):
        following = 0.0
        for s in reversed(range(steps)):
            if int(timesteps[s, n]) + 1 == horizon or bool(terminated[s, n]):
                tail = 0.0
            elif bool(truncated[s, n]) or s == steps - 1:
                tail = float(next_values[s, n])
            else:
                tail = following
            following = float(rewards[s, n]) + gamma * tail
            out[s, n] = following
    return out


@pytest.mark.parametrize("gamma", [0.0, 0.8, 1.0])
def test_targets_match_the_loop_reference_with_all_kinds_of_episode_ends(gamma):
    """Columns: ends at the horizon; terminates early; truncated before the horizon; cut by the rollout."""
    horizon = 4
    t = torch.tensor([[0, 0, 0, 1], [1, 1, 1, 2], [2, 0, 2, 3], [3, 1, 0, 0], [0, 2, 1, 1]])
    terminated = torch.zeros(5, 4, dtype=torch.bool)
    truncated = torch.zeros(5, 4, dtype=torch.bool)
    terminated[1, 1] = True  # env 1 terminates at t = 1
    truncated[3, 0] = True  # env 0 reaches the horizon (t = 3)
    truncated[2, 2] = True  # env 2 is cut at t = 2 < horizon - 1: bootstrap
    truncated[2, 3] = True  # env 3 reaches the horizon at t = 3
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 4, generator=g, dtype=torch.float64)
    next_values = torch.randn(5, 4, generator=g, dtype=torch.float64)
    got = horizon_aware_value_targets(
        rewards, terminated, truncated, t, horizon=horizon, gamma=gamma, next_values=next_values
    )
    expected = reference_targets(rewards, terminated, truncated, t, next_values, horizon, gamma)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    # The value at the horizon is never read: garbage there changes nothing ...
    at_horizon = t + 1 == horizon
    poisoned = torch.where(at_horizon, torch.full_like(next_values, 1e6), next_values)
    again = horizon_aware_value_targets(
        rewards, terminated, truncated, t, horizon=horizon, gamma=gamma, next_values=poisoned
    )
    assert torch.equal(again, got)
    # ... whereas the plain (horizon-unaware) convention bootstraps there.
    if gamma > 0:
        plain = discounted_returns(rewards, terminated, truncated, poisoned, gamma=gamma)
        assert float((plain - got).abs().max()) > 1e3


def test_episode_flags_move_the_horizon_end_to_terminated():
    t = torch.tensor([[0, 2], [1, 0]])
    term = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    trunc = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    new_term, new_trunc = horizon_episode_flags(term, trunc, t, horizon=3)
    assert new_term.tolist() == [[False, True], [False, True]]
    assert new_trunc.tolist() == [[False, False], [True, False]]
    assert new_term.dtype == torch.bool


@pytest.mark.parametrize(
    "timesteps, truncated, match",
    [
        (torch.tensor([[3]]), torch.tensor([[True]]), "t \\+ 1 <= horizon"),
        (torch.tensor([[2]]), torch.tensor([[False]]), "reaches the horizon"),
    ],
)
def test_episode_flags_reject_inconsistent_horizons(timesteps, truncated, match):
    with pytest.raises(ValueError, match=match):
        horizon_episode_flags(torch.zeros(1, 1, dtype=torch.bool), truncated, timesteps, horizon=3)


def test_targets_and_values_reject_bad_arguments():
    r = torch.ones(2, 1)
    no = torch.zeros(2, 1, dtype=torch.bool)
    t = torch.tensor([[0], [1]])
    with pytest.raises(ValueError, match="values and next_values must both be given"):
        horizon_aware_value_targets(r, no, no, t, horizon=5, gamma=0.9, gae_lambda=0.9)
    with pytest.raises(ValueError, match="r_bar must have shape"):
        horizon_aware_values(torch.zeros(2), torch.zeros(3), torch.zeros(2), horizon=3, gamma=0.9)
    with pytest.raises(ValueError, match="v0 must be a floating-point"):
        horizon_aware_values(
            torch.zeros(2, dtype=torch.long), torch.zeros(2), torch.zeros(2), horizon=3, gamma=0.9
        )
    with pytest.raises(ValueError, match="mask must select at least one sample"):
        horizon_aware_value_loss(
            torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), horizon=3, gamma=0.9,
            mask=torch.zeros(2, dtype=torch.bool),
        )  # fmt: skip
    with pytest.raises(ValueError, match="terminated must be a \\[T, N\\] tensor"):
        horizon_episode_flags(torch.zeros(3, dtype=torch.bool), None, torch.zeros(3), horizon=3)


def test_an_integer_mask_is_a_type_error_not_indices():
    zeros = torch.zeros(3)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        horizon_aware_value_loss(
            zeros, zeros, zeros, torch.arange(3), horizon=3, gamma=0.9, mask=torch.tensor([1, 0, 1])
        )


def test_the_float16_loss_squares_in_float32():
    # One error of 256: its square 65536 overflows float16 (max 65504), the mean 16384 does not.
    v0 = torch.tensor([256.0, 0.0, 0.0, 0.0], dtype=torch.float16, requires_grad=True)
    zeros = torch.zeros(4, dtype=torch.float16)
    loss = horizon_aware_value_loss(v0, zeros, zeros, torch.arange(4), horizon=4, gamma=0.9)
    assert loss.dtype == torch.float16
    assert float(loss.detach()) == 16384.0
    (grad,) = torch.autograd.grad(loss, v0)
    assert grad.tolist() == [128.0, 0.0, 0.0, 0.0]


def test_values_take_numpy_heads_and_step_indices_under_vmap():
    np = pytest.importorskip("numpy")
    v0, r_bar = np.zeros(3), np.full(3, 2.0)
    out = horizon_aware_values(v0, r_bar, np.array([0, 1, 2]), horizon=3, gamma=0.5)
    assert out.dtype == torch.float64
    assert out.tolist() == [3.5, 3.0, 2.0]
    # The range check reads values: skipped inside torch.func transforms (batched step indices).
    steps = torch.tensor([[0, 1, 2], [2, 1, 0]])
    batched = torch.vmap(
        lambda t: horizon_aware_values(torch.zeros(3), torch.ones(3), t, horizon=3, gamma=1.0)
    )
    assert batched(steps).tolist() == [[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]]


@pytest.mark.parametrize(
    "call",
    [
        lambda: time_to_go_factor([0, 1], horizon=3, gamma=0.9),
        lambda: horizon_aware_values([0.0], torch.zeros(1), torch.zeros(1), horizon=3, gamma=0.9),
        lambda: horizon_episode_flags([[False]], None, torch.zeros(1, 1), horizon=3),
    ],
)
def test_other_types_raise_value_error_naming_torch_and_numpy(call):
    with pytest.raises(ValueError, match="must be a torch.Tensor or a numpy array"):
        call()
