"""Every problem honours the ExactGradientProblem contract and is a valid gymnasium env.

Exact gradient == central finite differences of exact_return == autograd of exact_return; sample_episodes
returns well-formed time-major batches whose Monte Carlo return matches exact_return; env.step() driven by
the same policy gives the same return; check_env passes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from pgvar.estimators import discounted_returns
from pgvar.problems import (
    ExactGradientProblem,
    GaussianBandit,
    GoodhartBandit,
    LinearQuadraticRegulator,
    RewardHackingMDP,
    TabularMDP,
)

# check_env warns about the deliberately unbounded Box spaces (rewards use the unclipped action).
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*Box (action|observation) space:UserWarning", "ignore:.*For Box action spaces:UserWarning"
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine (20x slower under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


FACTORIES = {
    "tabular": lambda: TabularMDP(n_states=5, n_actions=3, gamma=0.9, seed=0),
    "tabular-undiscounted": lambda: TabularMDP(
        n_states=4, n_actions=2, gamma=1.0, termination_prob=0.3, seed=3
    ),
    "bandit-quadratic": lambda: GaussianBandit(obs_dim=2, action_dim=2, reward="quadratic", seed=0),
    "bandit-linear": lambda: GaussianBandit(obs_dim=3, action_dim=1, reward="linear", seed=1),
    "lqr-discounted": lambda: LinearQuadraticRegulator(
        state_dim=2, action_dim=1, horizon=10, gamma=0.9, seed=0
    ),
    "lqr-undiscounted": lambda: LinearQuadraticRegulator(
        state_dim=3, action_dim=2, horizon=6, gamma=1.0, seed=2
    ),
    "lqr-time-feature": lambda: LinearQuadraticRegulator(horizon=4, gamma=0.95, seed=4, observe_time=True),
    "goodhart-bandit": lambda: GoodhartBandit(n_arms=6, error="student_t", seed=0),
    "reward-hacking": lambda: RewardHackingMDP(n_cells=4, n_tomatoes=1, gamma=0.9, termination_prob=0.1),
}


@pytest.fixture(params=sorted(FACTORIES))
def problem(request):
    return FACTORIES[request.param]()


def central_differences(problem, params, step: float = 1e-5) -> dict[str, torch.Tensor]:
    """d exact_return / d theta_k by (J(theta + h e_k) - J(theta - h e_k)) / 2h, coordinate by coordinate."""
    out = {}
    for name, value in params.items():
        grad = torch.zeros_like(value)
        for index in np.ndindex(*value.shape):
            shifted_up = {k: v.clone() for k, v in params.items()}
            shifted_down = {k: v.clone() for k, v in params.items()}
            shifted_up[name][index] += step
            shifted_down[name][index] -= step
            grad[index] = (problem.exact_return(shifted_up) - problem.exact_return(shifted_down)) / (2 * step)
        out[name] = grad
    return out


def autograd_gradient(problem, params) -> dict[str, torch.Tensor]:
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    grads = torch.autograd.grad(problem.exact_return(leaves), list(leaves.values()))
    return dict(zip(leaves, grads))


def test_is_an_exact_gradient_problem_and_a_gymnasium_env(problem):
    assert isinstance(problem, ExactGradientProblem)
    check_env(problem, skip_render_check=True)


@pytest.mark.parametrize("seed", [1, 2])
def test_exact_gradient_matches_finite_differences_and_autograd(problem, seed):
    params = problem.initial_parameters(seed=seed)
    exact = problem.exact_policy_gradient(params)
    differences = central_differences(problem, params)
    autograd = autograd_gradient(problem, params)
    scale = max(float(g.abs().max()) for g in exact.values())
    assert scale > 1e-2, "initial_parameters should not be a stationary point"
    for name in params:
        assert exact[name].shape == params[name].shape and exact[name].dtype == torch.float64
        torch.testing.assert_close(exact[name], differences[name], rtol=0, atol=1e-6 * max(scale, 1.0))
        torch.testing.assert_close(exact[name], autograd[name], rtol=1e-10, atol=1e-10 * max(scale, 1.0))


def test_finite_difference_check_has_power(problem):
    """The same comparison rejects a gradient with one coordinate perturbed by 1%."""
    params = problem.initial_parameters(seed=1)
    exact = problem.exact_policy_gradient(params)
    name = max(exact, key=lambda k: float(exact[k].abs().max()))
    wrong = exact[name].clone()
    flat_index = int(wrong.abs().argmax())
    wrong.view(-1)[flat_index] *= 1.01
    scale = max(float(g.abs().max()) for g in exact.values())
    with pytest.raises(AssertionError):
        torch.testing.assert_close(
            wrong, central_differences(problem, params)[name], rtol=0, atol=1e-6 * max(scale, 1.0)
        )


def test_initial_parameters_are_seeded_float64(problem):
    a, b, c = (
        problem.initial_parameters(seed=5),
        problem.initial_parameters(seed=5),
        problem.initial_parameters(seed=6),
    )
    assert all(v.dtype == torch.float64 for v in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_episode_batch_is_well_formed(problem):
    params = problem.initial_parameters(seed=1)
    batch = problem.sample_episodes(params, 257, torch.Generator().manual_seed(0))
    T, N = batch.rewards.shape
    assert (batch.n_episodes, batch.horizon) == (N, T) and N == 257
    obs_shape = problem.observation_space.shape
    assert batch.observations.shape == (T, N, *obs_shape) == batch.next_observations.shape
    assert batch.actions.shape == (T, N, *problem.action_space.shape)
    for flags in (batch.terminated, batch.truncated, batch.mask):
        assert flags.dtype == torch.bool and flags.shape == (T, N)
    assert batch.rewards.dtype == torch.float64 and batch.timesteps.dtype == torch.long
    assert torch.equal(batch.timesteps, torch.arange(T).unsqueeze(1).expand(T, N))
    # the mask is a prefix; each episode ends exactly once, at its last real step
    mask = batch.mask.long()
    assert bool((mask[1:] <= mask[:-1]).all()) and bool(batch.mask[0].all())
    lengths = mask.sum(0)
    ends = batch.terminated | batch.truncated
    assert torch.equal(ends.long().sum(0), torch.ones(N, dtype=torch.long))
    assert torch.equal(ends.long().argmax(0), lengths - 1)
    assert not bool((batch.terminated & batch.truncated).any())
    assert bool((batch.rewards[~batch.mask] == 0).all())
    # every real observation lies in the observation space
    real_obs = batch.observations[batch.mask].numpy()
    real_next = batch.next_observations[batch.mask].numpy()
    for row in np.concatenate([real_obs[:50], real_next[:50]]):
        assert problem.observation_space.contains(row.astype(problem.observation_space.dtype))


def test_sampling_is_deterministic_given_the_generator(problem):
    params = problem.initial_parameters(seed=1)
    first = problem.sample_episodes(params, 64, torch.Generator().manual_seed(3))
    second = problem.sample_episodes(params, 64, torch.Generator().manual_seed(3))
    third = problem.sample_episodes(params, 64, torch.Generator().manual_seed(4))
    assert torch.equal(first.rewards, second.rewards) and torch.equal(first.actions, second.actions)
    assert not torch.equal(first.rewards, third.rewards) or first.rewards.shape != third.rewards.shape


def test_log_prob_is_differentiable_and_normalized_shape(problem):
    params = {k: v.clone().requires_grad_(True) for k, v in problem.initial_parameters(seed=1).items()}
    batch = problem.sample_episodes(problem.initial_parameters(seed=1), 16, torch.Generator().manual_seed(0))
    log_probs = problem.log_prob(params, batch.observations, batch.actions)
    assert log_probs.shape == batch.rewards.shape and log_probs.dtype == torch.float64
    assert bool(torch.isfinite(log_probs).all())
    grads = torch.autograd.grad((log_probs * batch.mask).sum(), list(params.values()))
    assert any(float(g.abs().max()) > 0 for g in grads)


def _monte_carlo_return(problem, batch) -> tuple[float, float]:
    returns = discounted_returns(batch.rewards, batch.terminated, batch.truncated, gamma=problem.gamma)[0]
    return float(returns.mean()), float(returns.std() / math.sqrt(returns.numel()))


def test_sample_episodes_return_matches_exact_return(problem):
    params = problem.initial_parameters(seed=1)
    batch = problem.sample_episodes(params, 20_000, torch.Generator().manual_seed(1))
    mean, standard_error = _monte_carlo_return(problem, batch)
    exact = float(problem.exact_return(params))
    assert abs(mean - exact) < 4 * standard_error, (mean, exact, standard_error)


def _play_env_episodes(problem, params, n_episodes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Discounted returns and lengths of episodes played through reset()/step() with the problem's own policy."""
    generator = torch.Generator().manual_seed(seed)
    returns, lengths = np.zeros(n_episodes), np.zeros(n_episodes)
    observation, _ = problem.reset(seed=seed)
    for episode in range(n_episodes):
        discount, done = 1.0, False
        while not done:
            action = problem.sample_actions(
                params, torch.as_tensor(np.asarray(observation)), generator
            ).numpy()
            observation, reward, terminated, truncated, _ = problem.step(
                int(action) if action.ndim == 0 else action
            )
            returns[episode] += discount * reward
            lengths[episode] += 1
            discount *= problem.gamma
            done = terminated or truncated
        observation, _ = problem.reset()
    return returns, lengths


def test_env_step_agrees_with_exact_return_and_sample_episodes(problem):
    """gymnasium reset()/step() follow the same model as sample_episodes and the exact solution."""
    params = problem.initial_parameters(seed=1)
    returns, lengths_env = _play_env_episodes(problem, params, 800, seed=7)
    exact = float(problem.exact_return(params))
    standard_error = returns.std(ddof=1) / math.sqrt(len(returns))
    assert abs(returns.mean() - exact) < 4 * standard_error, (returns.mean(), exact, standard_error)

    batch = problem.sample_episodes(params, 4_000, torch.Generator().manual_seed(2))
    lengths_batch = batch.mask.sum(0).double().numpy()
    difference = lengths_env.mean() - lengths_batch.mean()
    standard_error = math.sqrt(
        lengths_env.var(ddof=1) / len(lengths_env) + lengths_batch.var(ddof=1) / len(lengths_batch)
    )
    if standard_error == 0.0:  # fixed-length episodes (bandit, LQR): the lengths must be identical
        assert difference == 0.0 and lengths_env.min() == lengths_batch.min()
    else:
        assert abs(difference) < 4 * standard_error, (
            lengths_env.mean(),
            lengths_batch.mean(),
            standard_error,
        )


@pytest.mark.parametrize(
    ("factory", "argument"),
    [
        (lambda: TabularMDP(gamma=1.5), "gamma"),
        (lambda: TabularMDP(gamma=-0.1), "gamma"),
        (lambda: TabularMDP(n_states=0), "n_states"),
        (lambda: TabularMDP(n_actions=-2), "n_actions"),
        (lambda: TabularMDP(n_states=2.5), "n_states"),
        (lambda: TabularMDP(termination_prob=0.0), "termination_prob"),
        (lambda: TabularMDP(termination_prob=1.2), "termination_prob"),
        (lambda: TabularMDP(max_episode_steps=0), "max_episode_steps"),
        (lambda: GaussianBandit(obs_dim=0), "obs_dim"),
        (lambda: GaussianBandit(action_dim=-1), "action_dim"),
        (lambda: GaussianBandit(reward="cubic"), "reward"),
        (lambda: LinearQuadraticRegulator(gamma=1.01), "gamma"),
        (lambda: LinearQuadraticRegulator(state_dim=0), "state_dim"),
        (lambda: LinearQuadraticRegulator(action_dim=0), "action_dim"),
        (lambda: LinearQuadraticRegulator(horizon=0), "horizon"),
    ],
)
def test_bad_constructor_input_raises_value_error_naming_the_argument(factory, argument):
    with pytest.raises(ValueError, match=argument):
        factory()


def test_bad_params_raise_value_error_naming_the_entry(problem):
    params = problem.initial_parameters(seed=1)
    name = sorted(params)[0]
    bad = dict(params)
    bad[name] = torch.zeros(7, 7, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match=name):
        problem.exact_return(bad)
    with pytest.raises(ValueError, match="keys"):
        problem.exact_policy_gradient({k: v for k, v in params.items() if k != name})
    with pytest.raises(ValueError, match="n_episodes"):
        problem.sample_episodes(params, 0, torch.Generator().manual_seed(0))


def test_step_before_reset_raises():
    for env in (TabularMDP(), GaussianBandit(), LinearQuadraticRegulator()):
        with pytest.raises(RuntimeError, match="reset"):
            env.step(env.action_space.sample())
