"""TabularMDP: the exact solution against independent references, and step()/sample_episodes against the kernel."""

from __future__ import annotations

import math

import pytest
import torch

from pgvar.problems import TabularMDP


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine (20x slower under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def z_threshold(n_cells: int, family_alpha: float = 1e-3) -> float:
    per_cell = family_alpha / (2 * n_cells)
    return max(
        4.0,
        math.sqrt(2.0) * float(torch.special.erfinv(torch.tensor(1.0 - 2.0 * per_cell, dtype=torch.float64))),
    )


@pytest.mark.parametrize("gamma", [0.0, 0.7, 1.0])
def test_exact_solution_against_the_power_series(gamma):
    """J = sum_t gamma^t rho0^T P_pi^t r_pi (a sum over 1500 steps) and the Bellman equations hold."""
    mdp = TabularMDP(n_states=6, n_actions=4, gamma=gamma, termination_prob=0.05, seed=5)
    params = mdp.initial_parameters(seed=2)
    probs = mdp.policy_probs(params)
    continuation = torch.einsum("sa,sa,sat->st", probs, 1 - mdp.termination_probs, mdp.transition_probs)
    reward_pi = (probs * mdp.reward_table).sum(-1)
    distribution, series, visitation = (
        mdp.initial_state_probs.clone(),
        torch.zeros((), dtype=torch.float64),
        0.0,
    )
    for t in range(1500):
        series = series + gamma**t * distribution @ reward_pi
        visitation = visitation + gamma**t * distribution
        distribution = distribution @ continuation
    torch.testing.assert_close(mdp.exact_return(params), series, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mdp.exact_discounted_visitation(params), visitation, rtol=1e-10, atol=1e-12)

    values, q_values = mdp.exact_state_values(params), mdp.exact_q_values(params)
    torch.testing.assert_close(values, (probs * q_values).sum(-1), rtol=1e-12, atol=1e-12)
    bellman = mdp.reward_table + gamma * (1 - mdp.termination_probs) * torch.einsum(
        "sat,t->sa", mdp.transition_probs, values
    )
    torch.testing.assert_close(q_values, bellman, rtol=1e-12, atol=1e-12)


def test_gradient_accepts_logits_or_dict_and_is_shift_invariant():
    mdp = TabularMDP(seed=1)
    params = mdp.initial_parameters(seed=3)
    from_dict = mdp.exact_policy_gradient(params)["logits"]
    from_tensor = mdp.exact_policy_gradient(params["logits"])["logits"]
    assert torch.equal(from_dict, from_tensor)
    torch.testing.assert_close(
        from_dict.sum(-1), torch.zeros(mdp.n_states, dtype=torch.float64), rtol=0, atol=1e-12
    )
    shifted = params["logits"] + torch.arange(mdp.n_states, dtype=torch.float64)[:, None]  # same policy
    torch.testing.assert_close(
        mdp.exact_policy_gradient(shifted)["logits"], from_dict, rtol=1e-10, atol=1e-12
    )


def test_log_prob_matches_torch_categorical():
    mdp = TabularMDP(n_states=4, n_actions=3, seed=2)
    params = mdp.initial_parameters(seed=0)
    states = torch.tensor([[0, 1, 2], [3, 3, 0]])
    actions = torch.tensor([[2, 0, 1], [1, 2, 0]])
    expected = torch.distributions.Categorical(logits=params["logits"][states]).log_prob(actions)
    torch.testing.assert_close(mdp.log_prob(params, states, actions), expected)


def test_sample_actions_follow_the_policy():
    mdp = TabularMDP(n_states=3, n_actions=4, seed=0)
    params = mdp.initial_parameters(seed=1)
    n = 20_000
    states = torch.full((n,), 2)
    actions = mdp.sample_actions(params, states, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(actions, minlength=4).double() / n
    probs = mdp.policy_probs(params)[2]
    z = (frequencies - probs) / torch.sqrt(probs * (1 - probs) / n)
    assert float(z.abs().max()) < z_threshold(4)


def _kernel_z_scores(mdp, states, actions, next_states, terminated, rewards):
    """Per (s, a, s') z-scores of next-state frequencies and per (s, a) termination frequencies against the kernel."""
    S, A = mdp.n_states, mdp.n_actions
    pair = states * A + actions
    visits = torch.bincount(pair, minlength=S * A).double().reshape(S, A)
    assert bool((visits >= 30).all()), "every (s, a) needs visits for the check to mean anything"
    counts = torch.bincount(pair * S + next_states, minlength=S * A * S).double().reshape(S, A, S)
    expected = mdp.transition_probs
    z_next = (counts / visits[..., None] - expected) / torch.sqrt(
        expected * (1 - expected) / visits[..., None]
    )
    ends = torch.bincount(pair, weights=terminated.double(), minlength=S * A).reshape(S, A)
    beta = mdp.termination_probs
    z_end = (ends / visits - beta) / torch.sqrt(beta * (1 - beta) / visits)
    torch.testing.assert_close(rewards, mdp.reward_table[states, actions], rtol=0, atol=0)
    return torch.cat([z_next.reshape(-1), z_end.reshape(-1)])


def test_sample_episodes_transitions_follow_the_kernel():
    mdp = TabularMDP(n_states=4, n_actions=2, gamma=0.9, termination_prob=0.1, seed=3)
    params = {"logits": torch.zeros(4, 2, dtype=torch.float64)}  # uniform: every (s, a) is visited
    batch = mdp.sample_episodes(params, 3_000, torch.Generator().manual_seed(0))
    m = batch.mask
    z = _kernel_z_scores(
        mdp,
        batch.observations[m],
        batch.actions[m],
        batch.next_observations[m],
        batch.terminated[m],
        batch.rewards[m],
    )
    assert float(z.abs().max()) < z_threshold(z.numel()), z
    # the next observation of a step is the observation of the following step while the episode runs
    running = m[1:] & m[:-1]
    assert torch.equal(batch.next_observations[:-1][running], batch.observations[1:][running])


def test_env_step_transitions_follow_the_kernel():
    """step() from every (s, a), restarted with reset(options={"state": s}), against the same kernel."""
    mdp = TabularMDP(n_states=4, n_actions=2, gamma=0.9, termination_prob=0.1, seed=3)
    repeats = 500
    records = []
    mdp.reset(seed=0)
    for s in range(mdp.n_states):
        for a in range(mdp.n_actions):
            for _ in range(repeats):
                assert mdp.reset(options={"state": s})[0] == s
                next_state, reward, terminated, truncated, _ = mdp.step(a)
                assert not truncated
                records.append((s, a, next_state, terminated, reward))
    states, actions, next_states, terminated = (torch.tensor([r[i] for r in records]) for i in range(4))
    rewards = torch.tensor([r[4] for r in records], dtype=torch.float64)
    z = _kernel_z_scores(mdp, states, actions, next_states, terminated, rewards)
    assert float(z.abs().max()) < z_threshold(z.numel()), z


def test_truncation_is_negligible_by_default_and_consistent_when_forced():
    mdp = TabularMDP(n_states=5, n_actions=3, gamma=0.9, termination_prob=0.1, seed=0)
    params = mdp.initial_parameters(seed=1)
    assert (1 - mdp.termination_prob) ** mdp.max_episode_steps <= 1e-10
    assert float(mdp.truncation_probability(params)) < 1e-10
    batch = mdp.sample_episodes(params, 2_000, torch.Generator().manual_seed(0))
    assert not bool(batch.truncated.any())

    short = TabularMDP(n_states=5, n_actions=3, gamma=0.9, termination_prob=0.1, seed=0, max_episode_steps=3)
    probability = float(short.truncation_probability(params))
    n = 20_000
    batch = short.sample_episodes(params, n, torch.Generator().manual_seed(1))
    assert batch.horizon == 3
    fraction = float(batch.truncated[-1].double().mean())
    assert abs(fraction - probability) < 4 * math.sqrt(probability * (1 - probability) / n)
    assert not bool(batch.truncated[:-1].any()) and not bool((batch.truncated & batch.terminated).any())
    # the env truncates at the same step
    short.reset(seed=0)
    truncated_seen = False
    for _ in range(200):
        short.reset()
        for t in range(3):
            _, _, terminated, truncated, _ = short.step(0)
            assert truncated == (t == 2 and not terminated)
            if terminated or truncated:
                break
        truncated_seen |= truncated
    assert truncated_seen


def test_reset_rejects_a_bad_state_and_step_a_bad_action():
    mdp = TabularMDP(n_states=3, n_actions=2)
    with pytest.raises(ValueError, match="state"):
        mdp.reset(options={"state": 3})
    mdp.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        mdp.step(2)


@pytest.mark.parametrize("termination_prob", [1e-300, 1e-6, 2e-4])
def test_a_vanishing_termination_prob_is_refused_instead_of_hanging(termination_prob):
    """``TabularMDP(termination_prob=1e-300)`` made ``sample_episodes`` loop for about 2e301 steps."""
    with pytest.raises(ValueError, match=r"termination_prob must be in \[0.00023, 1\] when max_episode_steps is None"):
        TabularMDP(termination_prob=termination_prob)
    mdp = TabularMDP(termination_prob=termination_prob, max_episode_steps=4)  # explicit time limit: allowed
    batch = mdp.sample_episodes(mdp.initial_parameters(seed=0), 8, torch.Generator().manual_seed(0))
    assert batch.horizon == 4


def test_the_smallest_allowed_termination_prob_keeps_the_time_limit_bounded():
    mdp = TabularMDP(termination_prob=2.31e-4)
    assert mdp.max_episode_steps <= 100_000
    assert (1 - mdp.termination_prob) ** mdp.max_episode_steps <= 1e-10
