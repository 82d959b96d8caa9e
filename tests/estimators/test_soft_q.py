"""Soft-Q equivalence (Schulman, Chen, Abbeel 2017): the soft-Q gradient equals tau times the entropy-regularized
policy gradient with value coefficient 1/tau.

What is proven here:

* exactly (float64 round-off) when the expectation over the action at the step whose gradient is taken is
  enumerated: on a contextual bandit (n = 1) and on a random :class:`~pgvar.problems.TabularMDP` with n-step
  advantages, where the continuation after the enumerated action enters through its exact conditional
  expectation (computed by linear algebra). The per-sample difference of the two gradients does not involve
  Delta at all, so the identity also holds for an arbitrary constant Delta table (tested too);
* within sampling error when the actions are sampled (whole episodes of the TabularMDP, n-step advantages from
  :func:`kl_regularized_n_step_advantages`): the mean per-episode difference is within k standard errors of 0
  while the per-episode differences are far from 0, and each gradient's mean matches its exact expectation;
* that the test can fail: removing a stop-gradient, or using a value coefficient other than 1/tau, breaks it.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pgvar.estimators.returns import gae_advantages
from pgvar.estimators.soft_q import (
    boltzmann_log_probs,
    entropy_regularized_pg_loss,
    kl_regularized_n_step_advantages,
    kl_to_reference,
    soft_q_loss,
    soft_q_targets,
    soft_value,
)
from pgvar.problems.tabular import TabularMDP

F64 = torch.float64
TAUS = [0.05, 0.5, 2.0]
REFS = ["uniform", "fixed", "per_state"]


def make_ref(kind: str, n_states: int, n_actions: int, seed: int = 0) -> torch.Tensor | None:
    """``None`` (uniform), one reference distribution for all states ``[A]``, or one per state ``[S, A]``."""
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return None
    if kind == "fixed":
        return torch.log_softmax(torch.randn(n_actions, generator=g, dtype=F64), -1)
    return torch.log_softmax(torch.randn(n_states, n_actions, generator=g, dtype=F64), -1)


def ref_rows(ref: torch.Tensor | None, states: torch.Tensor) -> torch.Tensor | None:
    """The reference log-probabilities at the given states (``[*, A]`` for a per-state reference)."""
    if ref is None or ref.dim() == 1:
        return ref
    return ref[states]


def soft_q_side(q, actions, deltas, tau, ref):
    """soft_q_loss with targets V + tau KL + Delta and (when enumerating) the Boltzmann weights."""
    log_pi = boltzmann_log_probs(q, tau, ref)
    values = soft_value(q, tau, ref)
    kls = kl_to_reference(log_pi, ref)
    targets = soft_q_targets(values, kls, deltas, tau=tau)
    weights = log_pi.exp() if actions is None else None
    return soft_q_loss(q, actions, targets, action_weights=weights)


def pg_side(log_pi, values, actions, deltas, tau, ref, value_coef=None):
    return entropy_regularized_pg_loss(
        log_pi, values, actions, deltas, tau=tau, ref_log_probs=ref, value_coef=value_coef
    )


def grads(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])


def assert_equal_to_roundoff(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = float(expected.abs().max())
    assert scale > 1e-6, "degenerate check: the gradient is zero"
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12 * scale)


# ------------------------------------------------------------------------------------------------ soft value
@pytest.mark.parametrize("ref_kind", REFS)
@pytest.mark.parametrize("tau", TAUS)
def test_soft_value_and_boltzmann_policy_match_their_definitions(tau, ref_kind):
    S, A = 4, 3
    q = torch.randn(S, A, dtype=F64, generator=torch.Generator().manual_seed(1)) * 3
    ref = make_ref(ref_kind, S, A)
    ref_probs = torch.full((S, A), 1.0 / A, dtype=F64) if ref is None else ref.exp().expand(S, A)
    values = soft_value(q, tau, ref)
    log_pi = boltzmann_log_probs(q, tau, ref)
    for s in range(S):  # brute force, one float at a time
        partition = sum(float(ref_probs[s, a]) * math.exp(float(q[s, a]) / tau) for a in range(A))
        assert values[s].item() == pytest.approx(tau * math.log(partition), rel=1e-12, abs=1e-12)
        for a in range(A):
            expected = float(ref_probs[s, a]) * math.exp(float(q[s, a]) / tau) / partition
            assert log_pi[s, a].exp().item() == pytest.approx(expected, rel=1e-12)
    # Q = V + tau log(pi / pi_ref), and V = E_pi[Q] - tau KL(pi || pi_ref).
    torch.testing.assert_close(values[:, None] + tau * (log_pi - ref_probs.log()), q, rtol=1e-12, atol=1e-12)
    kls = kl_to_reference(log_pi, ref)
    torch.testing.assert_close((log_pi.exp() * q).sum(-1) - tau * kls, values, rtol=1e-12, atol=1e-12)


def test_soft_value_gradient_is_the_boltzmann_policy_and_tends_to_the_max():
    q = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    ref = make_ref("fixed", 5, 4)
    (grad,) = torch.autograd.grad(soft_value(q, 0.3, ref).sum(), q)
    torch.testing.assert_close(grad, boltzmann_log_probs(q, 0.3, ref).exp(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(soft_value(q.detach(), 1e-4), q.detach().max(-1).values, rtol=0, atol=2e-3)


def test_uniform_reference_is_an_entropy_bonus_up_to_a_constant():
    log_pi = torch.log_softmax(torch.randn(6, 5, dtype=F64, generator=torch.Generator().manual_seed(3)), -1)
    entropy = -(log_pi.exp() * log_pi).sum(-1)
    uniform = torch.full((5,), -math.log(5), dtype=F64)
    torch.testing.assert_close(kl_to_reference(log_pi), math.log(5) - entropy, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        kl_to_reference(log_pi, uniform), kl_to_reference(log_pi), rtol=1e-12, atol=1e-12
    )
    q = torch.randn(6, 5, dtype=F64)
    torch.testing.assert_close(soft_value(q, 0.7, uniform), soft_value(q, 0.7), rtol=1e-12, atol=1e-12)


def test_kl_ignores_actions_with_zero_probability():
    log_pi = torch.tensor([0.0, -math.inf], dtype=F64)
    ref = torch.tensor([0.25, 0.75], dtype=F64).log()
    assert kl_to_reference(log_pi, ref).item() == pytest.approx(math.log(4.0))


# ------------------------------------------------------------------------------- n-step KL-regularized Delta
def reference_n_step_advantages(rewards, kls, values, next_values, terminated, truncated, gamma, tau, n, lam):
    """One float at a time: lam = 1 uses the telescoped form sum gamma^d (r - tau KL) + gamma^k V - V,
    lam < 1 the explicit sum of (gamma lam)^d delta_{t+d}."""
    T, N = rewards.shape
    n = T if n is None else n
    out = torch.zeros(T, N, dtype=F64)
    for i, t in itertools.product(range(N), range(T)):
        if lam == 1.0:
            total, discount, k = 0.0, 1.0, t
            while True:
                total += discount * (float(rewards[k, i]) - tau * float(kls[k, i]))
                discount *= gamma
                if bool(terminated[k, i]):
                    break
                if bool(truncated[k, i]) or k == T - 1 or k - t + 1 == n:
                    total += discount * float(next_values[k, i])
                    break
                k += 1
            out[t, i] = total - float(values[t, i])
        else:
            total = 0.0
            for d in range(min(n, T - t)):
                k = t + d
                bootstrap = 0.0 if bool(terminated[k, i]) else gamma * float(next_values[k, i])
                delta = float(rewards[k, i]) - tau * float(kls[k, i]) + bootstrap - float(values[k, i])
                total += (gamma * lam) ** d * delta
                if bool(terminated[k, i]) or bool(truncated[k, i]):
                    break
            out[t, i] = total
    return out


def make_sequence(T, N, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    rewards, kls, values, final = (torch.randn(T, N, generator=g, dtype=F64) for _ in range(4))
    kls = kls.abs()
    u = torch.rand(T, N, generator=g)
    terminated = u < 0.15
    truncated = (u > 0.85) & ~terminated
    next_values = torch.cat([values[1:], final[-1:]])
    done = terminated | truncated
    next_values[done] = final[done]
    next_values[terminated] = float("nan")  # never read: terminal states have no value
    return [x.to(dtype) for x in (rewards, kls, values, next_values)] + [terminated, truncated]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T,N", [(1, 1), (3, 2), (40, 3)])
def test_n_step_advantages_match_the_loop_reference(T, N, dtype):
    rewards, kls, values, next_values, terminated, truncated = make_sequence(T, N, dtype, seed=T + N)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    for gamma, tau, n, lam in itertools.product([0.0, 0.9, 1.0], [0.1, 1.0], [1, 2, 5, None], [1.0, 0.7]):
        adv = kl_regularized_n_step_advantages(
            rewards,
            kls,
            values,
            next_values,
            terminated,
            truncated,
            gamma=gamma,
            tau=tau,
            n_step=n,
            gae_lambda=lam,
        )
        assert adv.dtype == dtype and adv.shape == (T, N) and not adv.requires_grad
        expected = reference_n_step_advantages(
            rewards.double(),
            kls.double(),
            values.double(),
            next_values.double(),
            terminated,
            truncated,
            gamma,
            tau,
            n,
            lam,
        )
        torch.testing.assert_close(adv.double(), expected, **tol)


def test_untruncated_advantages_are_gae_on_the_kl_regularized_reward():
    rewards, kls, values, next_values, terminated, truncated = make_sequence(30, 4, F64, seed=7)
    next_values = torch.nan_to_num(next_values, nan=0.0)
    adv = kl_regularized_n_step_advantages(
        rewards, kls, values, next_values, terminated, truncated, gamma=0.95, tau=0.3, gae_lambda=0.9
    )
    gae = gae_advantages(
        rewards - 0.3 * kls, values, next_values, terminated, truncated, gamma=0.95, gae_lambda=0.9
    )
    torch.testing.assert_close(adv, gae, rtol=1e-12, atol=1e-12)
    long_window = kl_regularized_n_step_advantages(
        rewards,
        kls,
        values,
        next_values,
        terminated,
        truncated,
        gamma=0.95,
        tau=0.3,
        n_step=29,
        gae_lambda=0.9,
    )
    torch.testing.assert_close(long_window[1:], adv[1:], rtol=1e-12, atol=1e-12)  # t = 0 misses one term


def test_soft_q_target_is_the_n_step_soft_backup():
    """Q_hat = V + tau KL + Delta = r_t + sum_{d>=1} gamma^d (r - tau KL) + gamma^n V(s_{t+n}): no first KL."""
    T, N, gamma, tau, n = 6, 2, 0.9, 0.4, 3
    g = torch.Generator().manual_seed(5)
    rewards, kls, values = (
        torch.randn(T, N, generator=g, dtype=F64),
        torch.rand(T, N, dtype=F64),
        torch.randn(T, N, dtype=F64),
    )
    last = torch.randn(1, N, dtype=F64)
    next_values = torch.cat([values[1:], last])
    no_end = torch.zeros(T, N, dtype=torch.bool)
    adv = kl_regularized_n_step_advantages(
        rewards, kls, values, next_values, no_end, gamma=gamma, tau=tau, n_step=n
    )
    targets = soft_q_targets(values, kls, adv, tau=tau)
    all_values = torch.cat([values, last])
    for t in range(T - n + 1):
        expected = rewards[t] + sum(gamma**d * (rewards[t + d] - tau * kls[t + d]) for d in range(1, n))
        expected = expected + gamma**n * all_values[t + n]
        torch.testing.assert_close(targets[t], expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------- exact identity: bandit (n = 1)
def bandit_problem(S=5, A=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    rewards, q_init = torch.randn(S, A, generator=g, dtype=F64), torch.randn(S, A, generator=g, dtype=F64)
    return rewards, q_init


@pytest.mark.parametrize("ref_kind", REFS)
@pytest.mark.parametrize("tau", TAUS)
def test_exact_identity_on_a_bandit_with_a_q_table(tau, ref_kind):
    """theta = Q table; pi and V derived from Q. Delta(s, a) = r(s, a) - tau KL(s) - V(s) (one step, then end)."""
    rewards, q_init = bandit_problem()
    S, A = rewards.shape
    ref = make_ref(ref_kind, S, A)
    q = q_init.clone().requires_grad_()
    log_pi, values = boltzmann_log_probs(q, tau, ref), soft_value(q, tau, ref)
    kls = kl_to_reference(log_pi, ref)
    deltas = (rewards - tau * kls[:, None] - values[:, None]).detach()
    grad_q = grads(soft_q_side(q, None, deltas, tau, ref), [q])
    grad_pg = grads(pg_side(log_pi, values, None, deltas, tau, ref).loss, [q])
    assert_equal_to_roundoff(grad_q, tau * grad_pg)


@pytest.mark.parametrize("ref_kind", REFS)
@pytest.mark.parametrize("tau", TAUS)
def test_exact_identity_with_an_actor_critic_parametrization(tau, ref_kind):
    """theta = (logits, v): the PG side uses them directly, the soft-Q side Q = v + tau log(pi / pi_ref)."""
    rewards, q_init = bandit_problem(seed=1)
    S, A = rewards.shape
    ref = make_ref(ref_kind, S, A)
    ref_full = torch.full((S, A), -math.log(A), dtype=F64) if ref is None else ref.expand(S, A)
    logits = q_init.clone().requires_grad_()
    v = torch.randn(S, dtype=F64).requires_grad_()
    log_pi = torch.log_softmax(logits, -1)
    q = v[:, None] + tau * (log_pi - ref_full)
    # A consistent parametrization: the soft value of Q is v.
    torch.testing.assert_close(soft_value(q, tau, ref), v, rtol=1e-12, atol=1e-12)
    kls = kl_to_reference(log_pi, ref)
    deltas = (rewards - tau * kls[:, None] - v[:, None]).detach()
    grad_q = grads(soft_q_side(q, None, deltas, tau, ref), [logits, v])
    grad_pg = grads(pg_side(log_pi, v, None, deltas, tau, ref).loss, [logits, v])
    assert_equal_to_roundoff(grad_q, tau * grad_pg)


@pytest.mark.parametrize("tau", TAUS)
def test_exact_identity_with_a_neural_q_function_and_any_constant_delta(tau):
    """The per-sample difference does not involve Delta, so any constant Delta table works (here random)."""
    S, A = 6, 3
    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Linear(S, 8), torch.nn.Tanh(), torch.nn.Linear(8, A)).double()
    ref = make_ref("per_state", S, A)
    q = net(torch.eye(S, dtype=F64)) * 2
    deltas = torch.randn(S, A, dtype=F64) * 3
    params = list(net.parameters())
    grad_q = grads(soft_q_side(q, None, deltas, tau, ref), params)
    log_pi, values = boltzmann_log_probs(q, tau, ref), soft_value(q, tau, ref)
    grad_pg = grads(pg_side(log_pi, values, None, deltas, tau, ref).loss, params)
    assert_equal_to_roundoff(grad_q, tau * grad_pg)


# ------------------------------------------------------------------------------- exact identity: tabular MDP
def exact_n_step_deltas(mdp: TabularMDP, q: torch.Tensor, tau: float, ref, n: int, gae_lambda: float = 1.0):
    """E[Delta_t | s_t = s, a_t = a] for every (s, a) and window length k = 0..n, by dynamic programming.

    D_0 = 0;  D_k(s, a) = r(s, a) - tau KL(s) - V(s) + gamma (1 - beta) P V (s, a) + gamma lam (1 - beta) P E_{k-1}
    with E_k(s) = sum_a pi(a|s) D_k(s, a). Everything is detached (constants of both losses).
    """
    with torch.no_grad():
        log_pi, values = boltzmann_log_probs(q, tau, ref), soft_value(q, tau, ref)
        pi, kls = log_pi.exp(), kl_to_reference(log_pi, ref)
        cont = mdp.gamma * (1.0 - mdp.termination_probs)  # [S, A]
        one_step = (
            mdp.reward_table - tau * kls[:, None] - values[:, None] + cont * (mdp.transition_probs @ values)
        )
        tables = [torch.zeros_like(q)]
        for _ in range(n):
            expected_next = (pi * tables[-1]).sum(-1)  # E_{k-1}(s')
            tables.append(one_step + gae_lambda * cont * (mdp.transition_probs @ expected_next))
        return tables  # tables[k] = D_k


MDP_CASES = [(0.5, 1, "uniform"), (0.05, 2, "fixed"), (2.0, 3, "per_state"), (0.5, 5, "per_state")]


@pytest.mark.parametrize("tau,n,ref_kind", MDP_CASES)
def test_exact_n_step_identity_on_a_tabular_mdp(tau, n, ref_kind):
    """Every state, every action enumerated at the step whose gradient is taken; the continuation's Delta is its
    exact conditional expectation under the current Boltzmann policy."""
    mdp = TabularMDP(n_states=5, n_actions=3, gamma=0.9, termination_prob=0.2, seed=3)
    ref = make_ref(ref_kind, mdp.n_states, mdp.n_actions, seed=1)
    q = (torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(6)) * 2).requires_grad_()
    deltas = exact_n_step_deltas(mdp, q, tau, ref, n)[n]
    grad_q = grads(soft_q_side(q, None, deltas, tau, ref), [q])
    log_pi, values = boltzmann_log_probs(q, tau, ref), soft_value(q, tau, ref)
    grad_pg = grads(pg_side(log_pi, values, None, deltas, tau, ref).loss, [q])
    assert_equal_to_roundoff(grad_q, tau * grad_pg)


# ------------------------------------------------------------------------------- the test can fail
def test_identity_breaks_without_the_stop_gradients_or_with_another_value_coefficient():
    mdp = TabularMDP(n_states=5, n_actions=3, gamma=0.9, termination_prob=0.2, seed=3)
    tau, n = 0.5, 2
    ref = make_ref("fixed", 5, 3)
    q = (torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(6)) * 2).requires_grad_()
    deltas = exact_n_step_deltas(mdp, q, tau, ref, n)[n]
    log_pi, values = boltzmann_log_probs(q, tau, ref), soft_value(q, tau, ref)
    kls = kl_to_reference(log_pi, ref)
    pi = log_pi.exp()
    reference = tau * grads(pg_side(log_pi, values, None, deltas, tau, ref).loss, [q])
    assert_equal_to_roundoff(grads(soft_q_side(q, None, deltas, tau, ref), [q]), reference)

    def relative_gap(loss):
        return float((grads(loss, [q]) - reference).norm() / reference.norm())

    # (1) the soft-Q target V + tau KL + Delta left differentiable
    live_targets = values[:, None] + tau * kls[:, None] + deltas
    assert relative_gap((pi.detach() * 0.5 * (q - live_targets) ** 2).sum(-1).mean()) > 1e-2
    # (2) the expectation weights pi(a|s) left differentiable: the gradient of the expectation, not its expectation
    targets = soft_q_targets(values, kls, deltas, tau=tau)
    assert relative_gap((pi * 0.5 * (q - targets) ** 2).sum(-1).mean()) > 1e-2
    # (3) the value regression target V + Delta left differentiable: the value term then has no gradient
    pg = pg_side(log_pi, values, None, deltas, tau, ref)
    live_value_loss = (pi.detach() * 0.5 * (values[:, None] - (values[:, None] + deltas)) ** 2).sum(-1).mean()
    assert relative_gap(tau * (pg.policy_loss + tau * pg.kl_loss + live_value_loss / tau)) > 1e-2
    # (4) Delta computed from live values (the baseline differentiated through)
    live_deltas = deltas + values.detach()[:, None] - values[:, None]
    live_policy = -(pi.detach() * live_deltas * log_pi).sum(-1).mean()
    assert relative_gap(tau * (live_policy + tau * pg.kl_loss + pg.value_loss / tau)) > 1e-2
    # (5) SB3's usual value coefficient instead of 1/tau
    assert relative_gap(tau * pg_side(log_pi, values, None, deltas, tau, ref, value_coef=0.5).loss) > 1e-2


# ------------------------------------------------------------------------------- sampled actions
def per_episode_gradients(q_table, batch, tau, ref, n, gamma, gae_lambda):
    """Per-episode gradients [N, S*A] of both losses (summed over the episode's steps), by giving every (t, n)
    entry its own leaf copy of the Q row it reads and summing the copies' gradients per episode."""
    obs, actions, mask = batch.observations, batch.actions, batch.mask
    T, N = obs.shape
    S, A = q_table.shape
    q = q_table.detach()[obs].clone().requires_grad_()  # [T, N, A]: one leaf row per entry
    ref_here = ref_rows(ref, obs)
    log_pi, values = boltzmann_log_probs(q, tau, ref_here), soft_value(q, tau, ref_here)
    kls = kl_to_reference(log_pi, ref_here)
    with torch.no_grad():
        next_q = q_table[batch.next_observations]
        next_values = soft_value(next_q, tau, ref_rows(ref, batch.next_observations))
    deltas = kl_regularized_n_step_advantages(
        batch.rewards,
        kls,
        values,
        next_values,
        batch.terminated,
        batch.truncated,
        gamma=gamma,
        tau=tau,
        n_step=n,
        gae_lambda=gae_lambda,
    )
    count = float(mask.sum())
    targets = soft_q_targets(values, kls, deltas, tau=tau)
    loss_q = soft_q_loss(q, actions, targets, mask=mask) * count
    loss_pg = entropy_regularized_pg_loss(
        log_pi, values, actions, deltas, tau=tau, ref_log_probs=ref_here, mask=mask
    )
    out = []
    for loss in (loss_q, tau * loss_pg.loss * count):
        (row_grads,) = torch.autograd.grad(loss, q, retain_graph=True)  # [T, N, A]
        flat_index = (torch.arange(N)[None, :] * S + obs).reshape(-1)  # episode-major (episode, state) slot
        per_episode = torch.zeros(N * S, A, dtype=F64).index_add_(0, flat_index, row_grads.reshape(-1, A))
        out.append(per_episode.reshape(N, S * A))
    return out


def exact_expected_episode_gradients(mdp, q_table, tau, ref, n, gae_lambda):
    """E[sum_t grad loss_t] over episodes of the time-limited MDP: sum_t sum_s P(s_t = s, alive) sum_a pi(a|s)
    grad loss(s, a, D_{k_t}(s, a)), with k_t = min(n, H - t) (the time limit cuts the window)."""
    H = mdp.max_episode_steps
    log_pi = boltzmann_log_probs(q_table, tau, ref)
    pi = log_pi.exp().detach()
    continuation = torch.einsum("sa,sa,sat->st", pi, 1.0 - mdp.termination_probs, mdp.transition_probs)
    occupancy = [mdp.initial_state_probs]
    for _ in range(H - 1):
        occupancy.append(occupancy[-1] @ continuation)
    occupancy = torch.stack(occupancy)  # [H, S]
    tables = exact_n_step_deltas(mdp, q_table, tau, ref, n, gae_lambda)
    windows = torch.clamp(H - torch.arange(H), max=n)
    deltas = torch.stack([tables[int(k)] for k in windows])  # [H, S, A]
    S, A = q_table.shape
    q = q_table.detach().expand(H, S, A).clone().requires_grad_()  # one leaf copy per (t, s)
    ref_here = ref if ref is None or ref.dim() == 1 else ref.expand(H, S, A)
    log_pi, values = boltzmann_log_probs(q, tau, ref_here), soft_value(q, tau, ref_here)
    loss_q = soft_q_side(q, None, deltas, tau, ref_here)
    loss_pg = tau * pg_side(log_pi, values, None, deltas, tau, ref_here).loss
    out = []
    for loss in (loss_q, loss_pg):
        (entry_grads,) = torch.autograd.grad(loss * H * S, q, retain_graph=True)  # undo the mean over (t, s)
        out.append((occupancy[:, :, None] * entry_grads).sum(0).reshape(-1))
    return out


SAMPLED_CASES = [(0.5, 1, "uniform", 1.0), (0.2, 3, "per_state", 1.0), (1.0, 2, "fixed", 0.8)]


@pytest.mark.parametrize("tau,n,ref_kind,gae_lambda", SAMPLED_CASES)
def test_sampled_identity_holds_in_expectation_only(tau, n, ref_kind, gae_lambda):
    mdp = TabularMDP(n_states=4, n_actions=3, gamma=0.9, termination_prob=0.3, seed=11)
    ref = make_ref(ref_kind, mdp.n_states, mdp.n_actions, seed=2)
    # Logits Q / tau of order 1: with a near-deterministic policy the zero-mean difference tau (l(a) - KL) grad V
    # has heavy tails (l(a) = log(pi / pi_ref) of a rare action is huge), and a sample mean converges slowly.
    q_table = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(12)) * 1.5 * tau
    log_pi = boltzmann_log_probs(q_table, tau, ref)
    assert float(log_pi.exp().min()) > 1e-3
    batch = mdp.sample_episodes({"logits": log_pi}, 6000, torch.Generator().manual_seed(13))
    grad_q, grad_pg = per_episode_gradients(q_table, batch, tau, ref, n, mdp.gamma, gae_lambda)
    k = 4.5  # per coordinate; 12 coordinates, so a false alarm has probability < 1e-4
    n_eps = grad_q.shape[0]

    def z_scores(samples, target):
        se = samples.std(0) / math.sqrt(n_eps)
        return (samples.mean(0) - target) / se.clamp_min(1e-300)

    diff = grad_q - grad_pg
    assert z_scores(diff, torch.zeros(12, dtype=F64)).abs().max() < k
    # ... while each episode's two gradients really differ (zero-mean terms, not zero terms).
    assert float(diff.norm(dim=1).mean()) > 0.05 * float(grad_q.norm(dim=1).mean())
    # Both sampled gradients are unbiased for the exact expected gradient, and the two exact ones coincide.
    exact_q, exact_pg = exact_expected_episode_gradients(mdp, q_table, tau, ref, n, gae_lambda)
    assert_equal_to_roundoff(exact_q, exact_pg)
    assert z_scores(grad_q, exact_q).abs().max() < k
    assert z_scores(grad_pg, exact_pg).abs().max() < k


def test_losses_work_under_torch_func_per_sample_gradients():
    """vmap(grad) (pgvar.measure's route) gives the same per-sample gradients as separate backward passes."""
    from torch.func import grad, vmap

    tau = 0.4
    ref = make_ref("fixed", 1, 3)
    q_rows = torch.randn(7, 3, dtype=F64, generator=torch.Generator().manual_seed(9))
    actions = torch.tensor([0, 1, 2, 1, 0, 2, 1])
    deltas = torch.randn(7, dtype=F64)

    def loss_of(q_row, action, delta):
        q = q_row[None]
        log_pi, values = boltzmann_log_probs(q, tau, ref), soft_value(q, tau, ref)
        kls = kl_to_reference(log_pi, ref)
        return (
            soft_q_loss(q, action[None], soft_q_targets(values, kls, delta[None], tau=tau))
            + pg_side(log_pi, values, action[None], delta[None], tau, ref).loss
        )

    batched = vmap(grad(loss_of))(q_rows, actions, deltas)
    for i in range(7):
        row = q_rows[i].clone().requires_grad_()
        (expected,) = torch.autograd.grad(loss_of(row, actions[i], deltas[i]), row)
        torch.testing.assert_close(batched[i], expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_value_errors():
    q = torch.zeros(2, 3, dtype=F64)
    for tau in (0.0, -1.0, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="tau"):
            soft_value(q, tau)
        with pytest.raises(ValueError, match="tau"):
            boltzmann_log_probs(q, tau)
    bad_refs = {  # what the message must say
        "probability distribution": torch.log(torch.tensor([0.5, 0.5, 1.0], dtype=F64)),  # sums to 2
        "probability > 0": torch.log(torch.tensor([0.5, 0.5, 0.0], dtype=F64)),
        "finite": torch.tensor([0.0, float("nan"), 0.0], dtype=F64),
        "3 actions": torch.log(torch.tensor([0.5, 0.5], dtype=F64)),
    }
    for why, ref in bad_refs.items():
        with pytest.raises(ValueError, match="ref_log_probs") as info:
            soft_value(q, 1.0, ref)
        assert why in str(info.value)
        with pytest.raises(ValueError, match="ref_log_probs"):
            kl_to_reference(torch.log_softmax(q, -1), ref)
    with pytest.raises(ValueError, match="ref_log_probs"):
        boltzmann_log_probs(q, 1.0, [0.2, 0.3, 0.5])  # probabilities, not a tensor of log-probabilities
    log_pi = torch.log_softmax(q, -1)
    values, deltas = torch.zeros(2, dtype=F64), torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="action_weights is required"):
        soft_q_loss(q, None, deltas)
    with pytest.raises(ValueError, match="action_weights"):
        soft_q_loss(q, None, deltas, action_weights=torch.ones(2, 3, dtype=F64))
    with pytest.raises(ValueError, match="actions must be in"):
        soft_q_loss(q, torch.tensor([0, 3]), torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="actions must be an integer"):
        soft_q_loss(q, torch.tensor([0.0, 1.0]), torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="advantages"):
        entropy_regularized_pg_loss(log_pi, values, None, torch.zeros(2, dtype=F64), tau=1.0)
    with pytest.raises(ValueError, match="value_coef"):
        entropy_regularized_pg_loss(log_pi, values, None, deltas, tau=1.0, value_coef=-1.0)
    with pytest.raises(ValueError, match="mask"):
        entropy_regularized_pg_loss(
            log_pi, values, None, deltas, tau=1.0, mask=torch.zeros(2, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="tau"):
        entropy_regularized_pg_loss(log_pi, values, None, deltas, tau=0.0)
    r = torch.zeros(4, 2, dtype=F64)
    no_end = torch.zeros(4, 2, dtype=torch.bool)
    for kwargs, name in [
        (dict(gamma=1.5, tau=1.0), "gamma"),
        (dict(gamma=0.9, tau=-0.1), "tau"),
        (dict(gamma=0.9, tau=1.0, n_step=0), "n_step"),
        (dict(gamma=0.9, tau=1.0, gae_lambda=2.0), "gae_lambda"),
    ]:
        with pytest.raises(ValueError, match=name):
            kl_regularized_n_step_advantages(r, r, r, r, no_end, **kwargs)
    with pytest.raises(ValueError, match="kls"):
        kl_regularized_n_step_advantages(r, r[:3], r, r, no_end, gamma=0.9, tau=1.0)
    with pytest.raises(ValueError, match="rewards"):
        kl_regularized_n_step_advantages(r + float("nan"), r, r, r, no_end, gamma=0.9, tau=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_logits_or_probabilities_as_log_probs_raise(dtype):
    """Both used to be accepted silently (a KL of 28.6 from logits, 6.1 from probabilities)."""
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.0, 0.5, 0.3]], dtype=dtype)
    probs = torch.softmax(logits, -1)
    values, advantages, actions = torch.zeros(2, dtype=dtype), torch.ones(2, dtype=dtype), torch.tensor([0, 1])
    for wrong, what in ((logits, "logits"), (probs, "probabilities")):
        with pytest.raises(ValueError, match=r"log_probs must be the log of a probability distribution") as info:
            kl_to_reference(wrong)
        assert "logsumexp" in str(info.value) and "log_softmax" in str(info.value), what
        with pytest.raises(ValueError, match=r"log_probs must be the log of a probability distribution"):
            entropy_regularized_pg_loss(wrong, values, actions, advantages, tau=0.5)
    # log-probabilities with zero-probability actions (-inf) are fine, and so is float32 round-off
    masked = torch.log_softmax(logits.masked_fill(torch.tensor([[False, False, True]] * 2), -math.inf), -1)
    assert bool(torch.isfinite(kl_to_reference(masked)).all())
    entropy_regularized_pg_loss(torch.log_softmax(logits, -1), values, actions, advantages, tau=0.5)


def test_every_mask_argument_is_bool_only():
    log_pi = torch.log_softmax(torch.zeros(3, 2, dtype=F64), -1)
    q, actions, zeros = torch.zeros(3, 2, dtype=F64), torch.tensor([0, 1, 0]), torch.zeros(3, dtype=F64)
    for mask in (torch.tensor([1, 1, 0]), torch.tensor([1.0, 1.0, 0.0])):
        with pytest.raises(TypeError, match="mask must be a bool tensor"):
            entropy_regularized_pg_loss(log_pi, zeros, actions, zeros, tau=1.0, mask=mask)
        with pytest.raises(TypeError, match="mask must be a bool tensor"):
            soft_q_loss(q, actions, zeros, mask=mask)
