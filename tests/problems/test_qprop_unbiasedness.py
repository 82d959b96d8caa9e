"""Q-Prop and the all-action control variate against exact policy gradients.

Each check computes per-sample (per-episode) gradient estimates by autograd through the estimator functions
themselves (``vmap(grad)`` via :func:`pgvar.measure.per_sample_gradients`: the score term weighted by the
learning signal plus :func:`qprop_correction_surrogate`), and compares their sample mean with the exact gradient
of the problem within a Bonferroni-aware number of standard errors computed from the same samples.

What is proven here:

* Q-Prop with a fixed or batch-scoped eta is unbiased for ARBITRARY (bad) critics, on a Gaussian bandit and on an
  LQR (multi-step, discounted, Monte Carlo advantages);
* with the exact critic of a bandit whose reward is linear in the action, the learning signal is exactly 0 and
  every per-sample estimate equals grad_theta V(s): only the state's variance is left;
* the per-sample (as published) conservative and aggressive eta are biased on a bandit built to expose it,
  while the batch-scoped eta on the same samples is not;
* on a tabular MDP the all-action control variate is unbiased for any critic, and with the exact Q it removes
  the action's variance (the residual is exactly 0 with A_hat = Q - V);
* ``as_published`` normalization has expectation (1 - 1/N)/sigma (grad J - C) + C, C = E[eta grad_a Q grad mu]
  (formulas.md 4.3), and ``consistent`` has (1/sigma) grad J (up to the same 1/N); the first is far from the
  second.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from pgvar.estimators import (
    all_action_control_variate,
    discounted_returns,
    qprop_action_variance,
    qprop_control_variate,
    qprop_correction_surrogate,
    qprop_eta,
    qprop_learning_signal,
    qprop_normalize,
)
from pgvar.measure import flatten, flatten_per_sample, per_sample_gradients
from pgvar.problems import GaussianBandit, LinearQuadraticRegulator, TabularMDP

F64 = torch.float64
N_SAMPLES = 20_000
FAMILY_ALPHA = 1e-3  # family-wise false-alarm rate of one max-|z| check


def bonferroni_threshold(n_coordinates: int, family_alpha: float = FAMILY_ALPHA) -> float:
    """The |z| level that P independent coordinates all stay under with probability 1 - alpha (at least 4)."""
    per_coordinate = family_alpha / (2 * n_coordinates)
    z = math.sqrt(2.0) * torch.special.erfinv(torch.tensor(1.0 - 2.0 * per_coordinate, dtype=F64)).item()
    return max(4.0, z)


def z_scores(estimates: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Per-coordinate (mean - expected) / standard error of the mean, ``[P]``."""
    standard_error = estimates.std(0) / math.sqrt(estimates.shape[0])
    return (estimates.mean(0) - expected) / standard_error


def assert_unbiased(estimates: torch.Tensor, expected: torch.Tensor, label: str) -> None:
    z = z_scores(estimates, expected)
    threshold = bonferroni_threshold(expected.numel())
    assert float(z.abs().max()) < threshold, (
        f"{label}: max |z| = {float(z.abs().max()):.2f} >= {threshold:.2f}; z = {z}"
    )


# ------------------------------------------------------------------------------------------------ critics
class QuadraticCritic:
    """A fixed (frozen, arbitrary) critic Q_w(x, a) = c + u.x + v.a + a^T M a + x^T C a, x = state features.

    Its coefficients are random: it has nothing to do with the true Q. ``time_slope`` adds t * (v2 . a) for
    time-dependent problems (x then carries t as its last entry).
    """

    def __init__(
        self, state_dim: int, action_dim: int, seed: int, scale: float = 1.0, time_dependent: bool = False
    ):
        g = torch.Generator().manual_seed(seed)
        self.state_dim = state_dim
        self.time_dependent = time_dependent
        self.u = scale * torch.randn(state_dim, generator=g, dtype=F64)
        self.v = scale * torch.randn(action_dim, generator=g, dtype=F64)
        root = torch.randn(action_dim, action_dim, generator=g, dtype=F64)
        self.m = scale * (root + root.T) / 2
        self.c = scale * torch.randn(state_dim, action_dim, generator=g, dtype=F64)
        self.v_time = scale * torch.randn(action_dim, generator=g, dtype=F64)

    def __call__(
        self, states: torch.Tensor, actions: torch.Tensor, times: torch.Tensor | None = None
    ) -> torch.Tensor:
        value = states @ self.u + actions @ self.v + ((actions @ self.m) * actions).sum(-1)
        value = value + ((states @ self.c) * actions).sum(-1)
        if self.time_dependent:
            assert times is not None
            value = value + times * (actions @ self.v_time)
        return value


def grad_q_at(
    critic: Callable[..., torch.Tensor], states: torch.Tensor, means: torch.Tensor, *extra
) -> torch.Tensor:
    """grad_a Q_w(s, a) at a = mu(s), for a batch (the critic is a plain function: nothing to freeze)."""
    leaf = means.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(states, leaf, *extra).sum(), leaf)
    return grad


# ------------------------------------------------------------------------------------------------ bandit
def bandit_mean(params: dict[str, torch.Tensor], states: torch.Tensor) -> torch.Tensor:
    """mu_theta(s) = W s + b: the GaussianBandit policy's mean (its documented parametrization)."""
    return states @ params["weight"].T + params["bias"]


def bandit_estimates(
    bandit: GaussianBandit,
    params: dict[str, torch.Tensor],
    critic: Callable[..., torch.Tensor],
    states: torch.Tensor,
    actions: torch.Tensor,
    signal: torch.Tensor,
    eta: torch.Tensor,
) -> torch.Tensor:
    """Per-sample Q-Prop estimates [N, P]: grad_theta [log pi(a|s) signal + eta Q_w(s, mu_theta(s))], critic frozen."""

    def sample_objective(p, s, a, signal_i, eta_i):
        return bandit.log_prob(p, s, a) * signal_i + qprop_correction_surrogate(
            critic(s, bandit_mean(p, s)), eta_i
        )

    grads = per_sample_gradients(sample_objective, params, (states, actions, signal, eta))
    return flatten_per_sample(grads)


@pytest.fixture(scope="module")
def bandit_setting():
    bandit = GaussianBandit(obs_dim=2, action_dim=2, reward="quadratic", seed=0)
    params = bandit.initial_parameters(seed=1)
    batch = bandit.sample_episodes(params, N_SAMPLES, torch.Generator().manual_seed(3))
    states, actions = batch.observations[0], batch.actions[0]
    adv_hat = batch.rewards[0] - bandit.exact_state_values(params, states)
    exact = flatten(bandit.exact_policy_gradient(params))
    return bandit, params, states, actions, adv_hat, exact


BANDIT_ETAS = [("fixed", "sample"), ("conservative", "batch"), ("aggressive", "batch"), ("adaptive", "batch")]


@pytest.mark.parametrize(
    "critic_seed,critic_scale", [(10, 1.0), (11, 5.0)], ids=["random-quadratic", "large-bad"]
)
@pytest.mark.parametrize("rule,scope", BANDIT_ETAS)
def test_qprop_is_unbiased_on_bandit_for_arbitrary_critic(
    bandit_setting, critic_seed, critic_scale, rule, scope
):
    bandit, params, states, actions, adv_hat, exact = bandit_setting
    critic = QuadraticCritic(2, 2, seed=critic_seed, scale=critic_scale)
    means = bandit_mean(params, states)
    grad_q = grad_q_at(critic, states, means)
    adv_bar = qprop_control_variate(grad_q, actions, means)
    variance = qprop_action_variance(grad_q, params["log_std"].exp())
    eta = qprop_eta(adv_hat, adv_bar, rule, scope, action_variance=variance)
    signal = qprop_learning_signal(adv_hat, adv_bar, eta)
    estimates = bandit_estimates(bandit, params, critic, states, actions, signal, eta)
    assert_unbiased(estimates, exact, f"bandit {rule}/{scope} critic {critic_seed}")


def test_exact_linear_critic_leaves_only_the_state_variance():
    """Reward linear in a, exact critic Q = r: A_bar = A exactly, the signal is 0, and X_i = grad_theta V(s_i)."""
    bandit = GaussianBandit(obs_dim=2, action_dim=2, reward="linear", seed=1)
    params = bandit.initial_parameters(seed=2)
    batch = bandit.sample_episodes(params, 2_000, torch.Generator().manual_seed(4))
    states, actions = batch.observations[0], batch.actions[0]
    adv_hat = batch.rewards[0] - bandit.exact_state_values(params, states)

    def critic(s, a):
        return bandit.exact_action_values(params, s, a)

    means = bandit_mean(params, states)
    adv_bar = qprop_control_variate(grad_q_at(critic, states, means), actions, means)
    eta = qprop_eta(adv_hat, adv_bar, "fixed")
    signal = qprop_learning_signal(adv_hat, adv_bar, eta)
    scale = float(adv_hat.abs().max())
    assert scale > 1.0
    assert float(signal.abs().max()) < 1e-12 * scale, (
        "the learning signal must vanish with the exact linear critic"
    )

    estimates = bandit_estimates(bandit, params, critic, states, actions, signal, eta)
    state_only = flatten_per_sample(
        per_sample_gradients(lambda p, s: bandit.exact_state_values(p, s), params, states)
    )
    torch.testing.assert_close(estimates, state_only, rtol=1e-10, atol=1e-10)
    plain = flatten_per_sample(
        per_sample_gradients(
            lambda p, s, a, w: bandit.log_prob(p, s, a) * w, params, (states, actions, adv_hat)
        )
    )
    # The plain estimator carries the action variance on top: far larger covariance trace.
    assert float(estimates.var(0).sum()) < 0.5 * float(plain.var(0).sum())
    assert_unbiased(estimates, flatten(bandit.exact_policy_gradient(params)), "exact linear critic")


def test_per_sample_eta_is_biased_and_batch_eta_is_not():
    """A 1-D bandit away from its optimum and a critic whose slope has the wrong sign.

    mu = b = 0.5 while the reward peaks near a = 0.1 + 0.64 s (true slope at mu about -0.5); the critic
    Q_w = 3 a says +3. Then sign(A_hat A_bar) depends on whether |a - mu| is small or large, so the per-sample
    eta = 1[A_hat A_bar > 0] correlates with g A_bar (strongly in the log_std coordinate, where the analytic term
    is 0): bias = -E_s[Cov_a(eta, g A_bar)] != 0. The batch covariance is negative, so the batch eta is a constant.
    """
    bandit = GaussianBandit(obs_dim=1, action_dim=1, reward="quadratic", seed=0)
    params = {
        "weight": torch.zeros(1, 1, dtype=F64),
        "bias": torch.full((1,), 0.5, dtype=F64),
        "log_std": torch.zeros(1, dtype=F64),
    }
    batch = bandit.sample_episodes(params, N_SAMPLES, torch.Generator().manual_seed(5))
    states, actions = batch.observations[0], batch.actions[0]
    adv_hat = batch.rewards[0] - bandit.exact_state_values(params, states)
    exact = flatten(bandit.exact_policy_gradient(params))

    def critic(s, a):
        return 3.0 * a.sum(-1)

    means = bandit_mean(params, states)
    adv_bar = qprop_control_variate(grad_q_at(critic, states, means), actions, means)
    threshold = bonferroni_threshold(exact.numel())
    z = {}
    for rule in ("conservative", "aggressive"):
        for scope in ("sample", "batch"):
            eta = qprop_eta(adv_hat, adv_bar, rule, scope)
            signal = qprop_learning_signal(adv_hat, adv_bar, eta)
            estimates = bandit_estimates(bandit, params, critic, states, actions, signal, eta)
            z[rule, scope] = z_scores(estimates, exact)
    for rule in ("conservative", "aggressive"):
        assert float(z[rule, "sample"].abs().max()) > 3 * threshold, (
            f"{rule}/sample bias vanished: z = {z[rule, 'sample']}"
        )
        assert float(z[rule, "batch"].abs().max()) < threshold, f"{rule}/batch biased: z = {z[rule, 'batch']}"


# ------------------------------------------------------------------------------------------------ LQR
@pytest.mark.parametrize(
    "rule,scope", [("fixed", "sample"), ("conservative", "batch"), ("adaptive", "batch")]
)
def test_qprop_is_unbiased_on_lqr_for_arbitrary_critic(rule, scope):
    """Multi-step: X_i = sum_t gamma^t [g_t (A_hat_t - eta A_bar_t) + eta grad_a Q_w grad mu], A_hat = G_t - V_t."""
    lqr = LinearQuadraticRegulator(state_dim=2, action_dim=1, horizon=5, gamma=0.9, seed=0)
    params = lqr.initial_parameters(seed=1)
    batch = lqr.sample_episodes(params, N_SAMPLES, torch.Generator().manual_seed(6))
    returns = discounted_returns(batch.rewards, batch.terminated, batch.truncated, gamma=lqr.gamma)
    adv_hat = returns - lqr.exact_state_values(params, batch.observations, batch.timesteps)
    critic = QuadraticCritic(2, 1, seed=20, scale=2.0, time_dependent=True)
    times = batch.timesteps.to(F64)

    def policy_mean(p, x):
        return x @ p["gain"].T

    means = policy_mean(params, batch.observations)
    grad_q = grad_q_at(critic, batch.observations, means, times)
    adv_bar = qprop_control_variate(grad_q, batch.actions, means)
    variance = qprop_action_variance(grad_q, params["log_std"].exp())
    eta = qprop_eta(adv_hat, adv_bar, rule, scope, action_variance=variance)
    signal = qprop_learning_signal(adv_hat, adv_bar, eta)
    discounts = lqr.gamma**times

    def step_objective(p, x, u, t, signal_t, eta_t, discount_t):
        correction = qprop_correction_surrogate(critic(x, policy_mean(p, x), t), eta_t)
        return discount_t * (lqr.log_prob(p, x, u) * signal_t + correction)

    flat_inputs = [
        batch.observations.reshape(-1, 2),
        batch.actions.reshape(-1, 1),
        times.reshape(-1),
        signal.reshape(-1),
        eta.reshape(-1),
        discounts.reshape(-1),
    ]
    per_step = flatten_per_sample(per_sample_gradients(step_objective, params, flat_inputs))
    per_episode = per_step.reshape(lqr.horizon, N_SAMPLES, -1).sum(0)
    assert_unbiased(per_episode, flatten(lqr.exact_policy_gradient(params)), f"lqr {rule}/{scope}")


# ------------------------------------------------------------------------------------------------ tabular
@pytest.fixture(scope="module")
def tabular_setting():
    mdp = TabularMDP(n_states=5, n_actions=3, gamma=0.9, termination_prob=0.2, seed=0)
    params = mdp.initial_parameters(seed=1)
    batch = mdp.sample_episodes(params, N_SAMPLES, torch.Generator().manual_seed(7))
    returns = discounted_returns(batch.rewards, batch.terminated, batch.truncated, gamma=mdp.gamma)
    mask = batch.mask
    states, actions = batch.observations[mask], batch.actions[mask]
    episode = torch.arange(N_SAMPLES).expand(mask.shape)[mask]
    discounts = (mdp.gamma ** batch.timesteps.to(F64))[mask]
    adv_mc = returns[mask] - mdp.exact_state_values(params, states)
    return mdp, params, states, actions, episode, discounts, adv_mc


def tabular_per_step(mdp, params, states, actions, q_rows, adv_hat, discounts):
    """Per-step gradients [M, P] of gamma^t [log pi(a|s) l + sum_a pi(a|s) Q_w(s, a)] (Q_w frozen)."""

    def step_objective(p, s, a, q_row, adv_t, discount_t):
        log_probs = torch.log_softmax(p["logits"], dim=-1)
        row = torch.index_select(log_probs, 0, s.reshape(1))[0]  # vmap-friendly log pi(.|s)
        out = all_action_control_variate(q_row, row, a, adv_t, from_logits=True)
        return discount_t * (row.gather(0, a.reshape(1))[0] * out.learning_signal + out.surrogate)

    inputs = (states, actions, q_rows, adv_hat, discounts)
    return flatten_per_sample(per_sample_gradients(step_objective, params, inputs))


@pytest.mark.parametrize("critic", ["exact", "random"])
def test_all_action_control_variate_is_unbiased_on_tabular_mdp(tabular_setting, critic):
    mdp, params, states, actions, episode, discounts, adv_mc = tabular_setting
    if critic == "exact":
        q_table = mdp.exact_q_values(params)
    else:
        q_table = 3.0 * torch.randn(
            mdp.n_states, mdp.n_actions, generator=torch.Generator().manual_seed(8), dtype=F64
        )
    per_step = tabular_per_step(mdp, params, states, actions, q_table[states], adv_mc, discounts)
    per_episode = torch.zeros(N_SAMPLES, per_step.shape[1], dtype=F64).index_add_(0, episode, per_step)
    assert_unbiased(per_episode, flatten(mdp.exact_policy_gradient(params)), f"all-action, {critic} critic")


def test_all_action_control_variate_with_exact_q_removes_the_action_variance(tabular_setting):
    """A_hat = Q(s, a) - V(s): the residual is exactly 0 and each step's estimate depends on the state only."""
    mdp, params, states, actions, episode, discounts, adv_mc = tabular_setting
    q_table = mdp.exact_q_values(params)
    values = mdp.exact_state_values(params)
    adv_exact = q_table[states, actions] - values[states]
    out = all_action_control_variate(q_table[states], mdp.policy_probs(params)[states], actions, adv_exact)
    assert float(adv_exact.abs().max()) > 0.1
    assert float(out.learning_signal.abs().max()) < 1e-12

    per_step = tabular_per_step(
        mdp, params, states, actions, q_table[states], adv_exact, torch.ones_like(discounts)
    )
    probs = mdp.policy_probs(params)
    state_only = torch.zeros(mdp.n_states, mdp.n_states, mdp.n_actions, dtype=F64)  # [s, grad rows, actions]
    rows = torch.arange(mdp.n_states)
    state_only[rows, rows] = probs * (q_table - values[:, None])  # grad_logits sum_a pi(a|s) Q(s, a)
    torch.testing.assert_close(per_step, state_only.reshape(mdp.n_states, -1)[states], rtol=1e-10, atol=1e-12)

    # With Monte Carlo advantages the action part is gone too, not the trajectory noise: less variance than G - V.
    with_cv = tabular_per_step(mdp, params, states, actions, q_table[states], adv_mc, discounts)
    plain = tabular_per_step(
        mdp, params, states, actions, torch.zeros_like(q_table[states]), adv_mc, discounts
    )
    assert float(with_cv.var(0).sum()) < float(plain.var(0).sum())


# ------------------------------------------------------------------------------------------------ normalization
def test_as_published_normalization_mixes_in_the_critic_gradient():
    """E[as_published] = (1 - 1/N)/sigma (grad J - C) + C with C = E[eta grad_a Q grad mu]; consistent: C / sigma.

    sigma is fixed (from an independent batch), so both identities are exact in expectation; the reward is scaled
    by 10 (sigma well above 1, as with MuJoCo rewards) and the critic is arbitrary.
    """
    reward_scale = 10.0
    bandit = GaussianBandit(obs_dim=2, action_dim=2, reward="quadratic", seed=0)
    params = bandit.initial_parameters(seed=1)
    critic = QuadraticCritic(2, 2, seed=30, scale=reward_scale)

    def signal_of(batch):
        states, actions = batch.observations[0], batch.actions[0]
        adv_hat = reward_scale * (batch.rewards[0] - bandit.exact_state_values(params, states))
        means = bandit_mean(params, states)
        adv_bar = qprop_control_variate(grad_q_at(critic, states, means), actions, means)
        return states, actions, qprop_learning_signal(adv_hat, adv_bar, 1.0)

    _, _, independent_signal = signal_of(
        bandit.sample_episodes(params, N_SAMPLES, torch.Generator().manual_seed(9))
    )
    sigma = float(independent_signal.std())
    assert sigma > 5.0

    states, actions, signal = signal_of(
        bandit.sample_episodes(params, N_SAMPLES, torch.Generator().manual_seed(10))
    )
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    critic_at_mean = bandit.exact_expectation(leaves, lambda s, a: critic(s, bandit_mean(leaves, s)))
    c_grads = torch.autograd.grad(critic_at_mean, list(leaves.values()), allow_unused=True)
    c_term = flatten(
        {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), c_grads)}
    )
    exact = reward_scale * flatten(bandit.exact_policy_gradient(params))
    shrink = 1.0 - 1.0 / N_SAMPLES  # the batch-mean centring
    expected = {
        "as_published": shrink / sigma * (exact - c_term) + c_term,
        "consistent": (shrink * (exact - c_term) + c_term) / sigma,
    }
    eta = torch.ones_like(signal)
    estimates = {}
    for mode, target in expected.items():
        normalized, eta_used = qprop_normalize(signal, eta, mode, signal_std=sigma)
        estimates[mode] = bandit_estimates(bandit, params, critic, states, actions, normalized, eta_used)
        assert_unbiased(estimates[mode], target, f"{mode} normalization")
    # Power: the as-published update is not the (scaled) policy gradient.
    z = z_scores(estimates["as_published"], exact / sigma)
    assert float(z.abs().max()) > 3 * bonferroni_threshold(exact.numel()), (
        f"as_published looks unbiased: z = {z}"
    )
