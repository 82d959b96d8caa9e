"""Q-Prop and all-action control variates: formulas against loop references, autograd and cross-function identities.

The statistical checks against exact policy gradients (unbiasedness, the per-sample eta bias, the normalization
identity) are in ``tests/problems/test_qprop_unbiasedness.py``.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch.func import jacrev

from pgvar.estimators import (
    QPROP_ETA_RULES,
    QPROP_ETA_SCOPES,
    QPROP_NORMALIZATION_MODES,
    all_action_control_variate,
    gae_advantages,
    normalize_advantages,
    qprop_action_variance,
    qprop_control_variate,
    qprop_correction_surrogate,
    qprop_eta,
    qprop_learning_signal,
    qprop_normalize,
)

F64 = torch.float64


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Critic(torch.nn.Module):
    """A small nonlinear critic Q_w(s, a) (tanh MLP on the concatenation)."""

    def __init__(self, obs_dim: int, action_dim: int, dtype: torch.dtype = F64):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(obs_dim + action_dim, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        ).to(dtype)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, actions], dim=-1)).squeeze(-1)


class GaussianPolicyMean(torch.nn.Module):
    """A small nonlinear policy mean mu_theta(s) with a state-independent log_std (SB3's layout)."""

    def __init__(self, obs_dim: int, action_dim: int, dtype: torch.dtype = F64):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(obs_dim, 8), torch.nn.Tanh(), torch.nn.Linear(8, action_dim)
        ).to(dtype)
        self.log_std = torch.nn.Parameter(torch.full((action_dim,), -0.3, dtype=dtype))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return torch.distributions.Normal(self(obs), self.log_std.exp()).log_prob(actions).sum(-1)


def critic_grad_at(critic: torch.nn.Module, obs: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    leaf = means.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(obs, leaf).sum(), leaf)
    return grad


def flat_grad(objective: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(objective, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


# ------------------------------------------------------------------------------------------------ A_bar
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_control_variate_is_the_directional_derivative_of_the_critic(dtype):
    """A_bar = d/de Q_w(s, mu + e (a - mu)) at e = 0, by central finite differences of a float64 copy of the critic."""
    torch.manual_seed(1)
    T, N, obs_dim, action_dim = 3, 4, 2, 3
    critic = Critic(obs_dim, action_dim, dtype)
    obs = torch.randn(T, N, obs_dim, dtype=dtype)
    means = torch.randn(T, N, action_dim, dtype=dtype)
    actions = means + torch.randn(T, N, action_dim, dtype=dtype)
    adv_bar = qprop_control_variate(critic_grad_at(critic, obs, means), actions, means)
    assert adv_bar.shape == (T, N) and adv_bar.dtype == dtype

    critic64 = copy.deepcopy(critic).double()
    obs64, means64, direction = obs.double(), means.double(), (actions - means).double()
    step = 1e-6
    with torch.no_grad():
        plus, minus = critic64(obs64, means64 + step * direction), critic64(obs64, means64 - step * direction)
    directional = (plus - minus) / (2 * step)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-8
    torch.testing.assert_close(adv_bar.double(), directional, rtol=tolerance, atol=tolerance)
    assert float(directional.abs().max()) > 0.05  # not a degenerate comparison


def test_control_variate_of_a_linear_critic_is_its_advantage_and_is_detached():
    slope = torch.tensor([[1.5, -0.5]], dtype=F64).requires_grad_(True)
    means = torch.tensor([[0.2, 0.1]], dtype=F64, requires_grad=True)
    actions = torch.tensor([[1.0, -1.0]], dtype=F64, requires_grad=True)
    adv_bar = qprop_control_variate(slope, actions, means)
    assert not adv_bar.requires_grad
    expected = (slope * actions).sum(-1) - (slope * means).sum(-1)  # Q(s, a) - Q(s, mu) for Q = slope . a
    torch.testing.assert_close(adv_bar, expected.detach())


@pytest.mark.parametrize("std_shape", ["per_state", "shared"])
def test_action_variance_matches_the_sampled_variance_of_the_control_variate(std_shape):
    n_draws, n_states, action_dim = 200_000, 3, 2
    grad_q = torch.randn(n_states, action_dim, dtype=F64, generator=generator(2))
    std = torch.rand(n_states, action_dim, dtype=F64, generator=generator(3)) + 0.2
    if std_shape == "shared":
        std = std[0]
    variance = qprop_action_variance(grad_q, std)
    assert variance.shape == (n_states,)
    means = torch.randn(n_states, action_dim, dtype=F64)
    actions = means + std * torch.randn(n_draws, n_states, action_dim, dtype=F64, generator=generator(4))
    adv_bar = qprop_control_variate(grad_q.expand_as(actions), actions, means.expand_as(actions))
    sampled = adv_bar.var(0)
    # The sample variance of a Gaussian has standard error var * sqrt(2 / (n - 1)).
    assert bool(((sampled - variance).abs() < 5 * variance * math.sqrt(2 / (n_draws - 1))).all()), (
        sampled,
        variance,
    )
    torch.testing.assert_close(
        adv_bar.mean(0),
        torch.zeros(n_states, dtype=F64),
        atol=5 * float(variance.max().sqrt()) / math.sqrt(n_draws),
        rtol=0,
    )


# ------------------------------------------------------------------------------------------------ eta
def reference_eta(adv_hat, adv_bar, rule, scope, variance, mask, folds=None):
    """One float at a time; ``crossfit`` uses the other folds (default: halves of the last dimension)."""
    flat_hat, flat_bar = adv_hat.reshape(-1).tolist(), adv_bar.reshape(-1).tolist()
    flat_var = variance.reshape(-1).tolist()
    keep = [True] * len(flat_hat) if mask is None else mask.reshape(-1).tolist()
    if folds is None:
        n_env = adv_hat.shape[-1]
        folds = torch.tensor([[n * 2 // n_env for n in range(n_env)]] * adv_hat.shape[0])
    flat_fold = folds.reshape(-1).tolist()

    def means(indices):
        kept = [i for i in indices if keep[i]]
        return sum(flat_hat[i] * flat_bar[i] for i in kept) / len(kept), sum(flat_var[i] for i in kept) / len(kept)

    batch_cov, batch_var = means(range(len(flat_hat)))
    out = []
    for j, (h, b, v) in enumerate(zip(flat_hat, flat_bar, flat_var)):
        if scope == "sample":
            cov, var = h * b, v
        elif scope == "batch":
            cov, var = batch_cov, batch_var
        else:
            cov, var = means([i for i in range(len(flat_hat)) if flat_fold[i] != flat_fold[j]])
        if rule == "fixed":
            out.append(1.0)
        elif rule == "conservative":
            out.append(1.0 if cov > 0 else 0.0)
        elif rule == "aggressive":
            out.append(float((cov > 0) - (cov < 0)))
        else:
            out.append(cov / var if var > 0 else 0.0)
    return torch.tensor(out, dtype=adv_hat.dtype).reshape(adv_hat.shape)


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("rule,scope", list(itertools.product(QPROP_ETA_RULES, QPROP_ETA_SCOPES)))
def test_eta_rules_match_loop_reference(rule, scope, use_mask):
    T, N = 5, 3
    adv_hat = torch.randn(T, N, dtype=F64, generator=generator(5))
    adv_bar = torch.randn(T, N, dtype=F64, generator=generator(6)) + 0.3 * adv_hat
    variance = torch.rand(T, N, dtype=F64, generator=generator(7))
    variance[0, 0] = 0.0  # a state where the critic is flat: adaptive eta 0 there
    mask = None
    if use_mask:
        mask = torch.ones(T, N, dtype=torch.bool)
        mask[3:, 1] = False
    eta = qprop_eta(adv_hat, adv_bar, rule, scope, action_variance=variance, mask=mask)
    torch.testing.assert_close(eta, reference_eta(adv_hat, adv_bar, rule, scope, variance, mask))
    assert not eta.requires_grad
    if scope == "batch":
        assert bool((eta == eta.reshape(-1)[0]).all())


@pytest.mark.parametrize("rule", QPROP_ETA_RULES)
def test_crossfit_eta_with_explicit_folds_matches_loop_reference(rule):
    T, N = 6, 1  # one environment: the default folds are time halves; explicit folds here are three
    adv_hat = torch.randn(T, N, dtype=F64, generator=generator(15))
    adv_bar = torch.randn(T, N, dtype=F64, generator=generator(16)) + 0.3 * adv_hat
    variance = torch.rand(T, N, dtype=F64, generator=generator(17))
    folds = torch.tensor([[0], [1], [2], [0], [1], [2]])
    eta = qprop_eta(adv_hat, adv_bar, rule, "crossfit", action_variance=variance, folds=folds)
    torch.testing.assert_close(eta, reference_eta(adv_hat, adv_bar, rule, "crossfit", variance, None, folds))
    default = qprop_eta(adv_hat, adv_bar, rule, "crossfit", action_variance=variance)
    time_halves = torch.tensor([[0], [0], [0], [1], [1], [1]])
    torch.testing.assert_close(default, reference_eta(adv_hat, adv_bar, rule, "crossfit", variance, None, time_halves))


def test_crossfit_eta_rejects_bad_folds():
    adv = torch.randn(4, 2)
    with pytest.raises(TypeError, match="folds must be an integer tensor"):
        qprop_eta(adv, adv, "conservative", "crossfit", folds=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="K >= 2 folds"):
        qprop_eta(adv, adv, "conservative", "crossfit", folds=torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="folds is used by scope='crossfit' only"):
        qprop_eta(adv, adv, "conservative", "batch", folds=torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 samples"):
        qprop_eta(torch.randn(1, 1), torch.randn(1, 1), "conservative", "crossfit")
    mask = torch.tensor([[True, False]] * 4)  # every real sample in fold 0: nothing to cross-fit from
    with pytest.raises(ValueError, match="real samples in at least two folds"):
        qprop_eta(adv, adv, "conservative", "crossfit", mask=mask)


def _zero_covariance_qprop_estimates(rule: str, scope: str, n_batches: int, batch_size: int) -> torch.Tensor:
    """Q-Prop estimates of grad J in (mu, log sigma) on a problem where E[A_hat A_bar] = 0 exactly.

    a ~ N(m0, 1) at mu = m0, sigma = 1; reward (a - m0)^2, V = 1, critic Q_w(a) = a. With x = a - mu:
    A_hat = x^2 - 1, A_bar = x (grad_a Q = 1), scores (x, x^2 - 1), correction eta * (1, 0). The exact
    gradient of J = sigma^2 + (mu - m0)^2 is (0, 2).
    """
    x = torch.randn(n_batches, batch_size, dtype=F64, generator=generator(2024))
    adv_hat, adv_bar = x**2 - 1, x
    estimates = []
    for b in range(n_batches):
        # Var_a(A_bar | s) = (grad_a Q)^2 sigma^2 = 1
        eta = qprop_eta(adv_hat[b], adv_bar[b], rule, scope, action_variance=torch.ones_like(x[b]))
        signal = adv_hat[b] - eta * adv_bar[b]
        mu_part = (x[b] * signal).mean() + eta.mean()
        log_sigma_part = ((x[b] ** 2 - 1) * signal).mean()
        estimates.append(torch.stack([mu_part, log_sigma_part]))
    return torch.stack(estimates)


def _max_bias_z(estimates: torch.Tensor, exact: torch.Tensor) -> float:
    standard_error = estimates.std(0) / math.sqrt(estimates.shape[0])
    return float(((estimates.mean(0) - exact).abs() / standard_error).max())


@pytest.mark.parametrize("rule", ["conservative", "aggressive"])
def test_batch_scope_eta_is_biased_where_the_covariance_is_zero(rule):
    """The old default (eta from the batch it weights) is biased by O(1/sqrt N): z grows with the batch count."""
    estimates = _zero_covariance_qprop_estimates(rule, "batch", n_batches=3000, batch_size=64)
    assert _max_bias_z(estimates, torch.tensor([0.0, 2.0], dtype=F64)) > 6
    # about 15% (conservative) / 35% (aggressive) of one batch's standard deviation
    relative = float((estimates[:, 1].mean() - 2.0).abs() / estimates[:, 1].std())
    assert (0.08 < relative < 0.25) if rule == "conservative" else (0.25 < relative < 0.5), relative


@pytest.mark.parametrize("rule", ["conservative", "aggressive", "adaptive", "fixed"])
def test_crossfit_eta_is_unbiased_where_the_covariance_is_zero(rule):
    estimates = _zero_covariance_qprop_estimates(rule, "crossfit", n_batches=3000, batch_size=64)
    assert _max_bias_z(estimates, torch.tensor([0.0, 2.0], dtype=F64)) < 4


def test_batch_eta_with_mask_ignores_padding():
    adv_hat = torch.tensor([1.0, 1.0, 100.0])
    adv_bar = torch.tensor([1.0, 1.0, -100.0])
    mask = torch.tensor([True, True, False])
    assert qprop_eta(adv_hat, adv_bar, "conservative", "batch").tolist() == [0.0, 0.0, 0.0]
    assert qprop_eta(adv_hat, adv_bar, "conservative", "batch", mask=mask).tolist() == [1.0, 1.0, 1.0]


def test_eta_is_detached_and_keeps_dtype():
    adv_hat = torch.randn(4, 2, requires_grad=True)
    adv_bar = torch.randn(4, 2, requires_grad=True)
    for rule in ("fixed", "conservative", "aggressive"):
        eta = qprop_eta(adv_hat, adv_bar, rule, "batch")
        assert not eta.requires_grad and eta.dtype == torch.float32 and eta.shape == (4, 2)


# ------------------------------------------------------------------------------------------------ surrogate
def test_correction_surrogate_gradient_is_eta_grad_q_times_jacobian_of_mean():
    """autograd of the surrogate == (1/N) sum_i eta_i J_mu(s_i)^T grad_a Q_w(s_i, mu_i), one sample at a time."""
    torch.manual_seed(3)
    n, obs_dim, action_dim = 6, 3, 2
    policy, critic = GaussianPolicyMean(obs_dim, action_dim), Critic(obs_dim, action_dim)
    critic.requires_grad_(False)  # frozen critic
    obs = torch.randn(n, obs_dim, dtype=F64)
    eta = torch.rand(n, dtype=F64).requires_grad_(True)  # must be treated as a constant
    params = list(policy.parameters())
    surrogate = qprop_correction_surrogate(critic(obs, policy(obs)), eta)
    actual = flat_grad(surrogate, params)

    names = [name for name, _ in policy.named_parameters()]
    expected = torch.zeros_like(actual)
    for i in range(n):
        grad_q = critic_grad_at(critic, obs[i : i + 1], policy(obs[i : i + 1]))[0]  # [d_a]
        jacobians = jacrev(lambda p, o=obs[i]: torch.func.functional_call(policy, p, (o,)), argnums=0)(
            dict(policy.named_parameters())
        )
        expected += (
            float(eta.detach()[i])
            * torch.cat([torch.tensordot(grad_q, jacobians[name], dims=1).reshape(-1) for name in names])
            / n
        )
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    assert torch.autograd.grad(surrogate, eta, allow_unused=True)[0] is None  # eta is detached


def test_correction_surrogate_mask_averages_over_real_samples():
    q = torch.tensor([[1.0, 2.0], [3.0, 50.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    surrogate = qprop_correction_surrogate(q, 2.0, mask=mask)
    torch.testing.assert_close(surrogate, torch.tensor(4.0))  # 2 * (1 + 2 + 3) / 3
    (grad,) = torch.autograd.grad(surrogate, q)
    torch.testing.assert_close(grad, torch.tensor([[2 / 3, 2 / 3], [2 / 3, 0.0]]))


# ------------------------------------------------------------------------------------------------ identities
def qprop_gradient(policy, critic, obs, actions, adv_hat, eta_rule, normalization="none"):
    """The full Q-Prop gradient of a batch: score term with the learning signal plus the correction surrogate."""
    means = policy(obs)
    grad_q = critic_grad_at(critic, obs, means)
    adv_bar = qprop_control_variate(grad_q, actions, means)
    eta = (
        qprop_eta(adv_hat, adv_bar, eta_rule, "batch")
        if isinstance(eta_rule, str)
        else torch.full_like(adv_hat, eta_rule)
    )
    signal, eta = qprop_normalize(qprop_learning_signal(adv_hat, adv_bar, eta), eta, normalization)
    objective = (policy.log_prob(obs, actions) * signal).mean() + qprop_correction_surrogate(
        critic(obs, means), eta
    )
    return flat_grad(objective, list(policy.parameters()))


@pytest.fixture
def gaussian_batch():
    torch.manual_seed(4)
    T, N, obs_dim, action_dim = 6, 2, 3, 2
    policy, critic = GaussianPolicyMean(obs_dim, action_dim), Critic(obs_dim, action_dim)
    critic.requires_grad_(False)
    obs = torch.randn(T, N, obs_dim, dtype=F64)
    with torch.no_grad():
        actions = policy(obs) + policy.log_std.exp() * torch.randn(T, N, action_dim, dtype=F64)
    rewards = torch.randn(T, N, dtype=F64)
    values, next_values = torch.randn(T, N, dtype=F64), torch.randn(T, N, dtype=F64)
    terminated = torch.zeros(T, N, dtype=torch.bool)
    terminated[-1] = True
    adv_gae = gae_advantages(rewards, values, next_values, terminated, None, gamma=0.99, gae_lambda=0.95)
    return policy, critic, obs, actions, adv_gae


def test_qprop_with_eta_zero_is_the_plain_gae_estimator(gaussian_batch):
    policy, critic, obs, actions, adv_gae = gaussian_batch
    plain = flat_grad((policy.log_prob(obs, actions) * adv_gae).mean(), list(policy.parameters()))
    torch.testing.assert_close(
        qprop_gradient(policy, critic, obs, actions, adv_gae, 0.0), plain, rtol=1e-12, atol=1e-14
    )
    # ... also normalized: eta = 0 in any normalization mode equals plain normalized advantages.
    normalized = normalize_advantages(adv_gae, "batch")
    plain_normalized = flat_grad(
        (policy.log_prob(obs, actions) * normalized).mean(), list(policy.parameters())
    )
    for mode in ("consistent", "as_published"):
        torch.testing.assert_close(
            qprop_gradient(policy, critic, obs, actions, adv_gae, 0.0, mode),
            plain_normalized,
            rtol=1e-12,
            atol=1e-14,
        )
    assert float(plain.norm()) > 1e-3  # not a degenerate comparison


def test_consistent_normalization_divides_the_whole_centred_estimator_by_sigma(gaussian_batch):
    """consistent == (1/sigma) * unnormalized with a centred signal, exactly; as_published is not."""
    policy, critic, obs, actions, adv_gae = gaussian_batch
    means = policy(obs)
    adv_bar = qprop_control_variate(critic_grad_at(critic, obs, means), actions, means)
    signal = qprop_learning_signal(adv_gae, adv_bar, 1.0)
    sigma = float(signal.std()) + 1e-8
    params = list(policy.parameters())
    log_probs = policy.log_prob(obs, actions)
    centred = flat_grad(
        (log_probs * (signal - signal.mean())).mean() + qprop_correction_surrogate(critic(obs, means), 1.0),
        params,
    )
    grads = {}
    for mode in ("consistent", "as_published"):
        normalized, eta = qprop_normalize(signal, 1.0, mode)
        grads[mode] = flat_grad(
            (log_probs * normalized).mean() + qprop_correction_surrogate(critic(obs, means), eta), params
        )
    torch.testing.assert_close(grads["consistent"], centred / sigma, rtol=1e-10, atol=1e-14)
    assert float((grads["as_published"] - centred / sigma).norm()) > 1e-3 * float(grads["consistent"].norm())


@pytest.mark.parametrize("use_mask", [False, True])
def test_normalize_modes_match_normalize_advantages(use_mask):
    signal = torch.randn(7, 3, dtype=F64, generator=generator(8)) * 5 + 2
    eta = torch.rand(7, 3, dtype=F64, generator=generator(9))
    mask = None
    if use_mask:
        mask = torch.ones(7, 3, dtype=torch.bool)
        mask[5:, 0] = False
    selected = signal if mask is None else signal[mask]
    sigma = float(selected.std()) + 1e-8
    expected_signal = normalize_advantages(signal, "batch", mask=mask)
    published = qprop_normalize(signal, eta, "as_published", mask=mask)
    consistent = qprop_normalize(signal, eta, "consistent", mask=mask)
    none = qprop_normalize(signal, eta, "none", mask=mask)
    torch.testing.assert_close(published.learning_signal, expected_signal)
    torch.testing.assert_close(consistent.learning_signal, expected_signal)
    torch.testing.assert_close(published.eta, eta)
    torch.testing.assert_close(consistent.eta, eta / sigma)
    torch.testing.assert_close(none.learning_signal, signal)
    torch.testing.assert_close(none.eta, eta)
    if mask is not None:
        torch.testing.assert_close(published.learning_signal[~mask], signal[~mask])


def test_normalize_with_fixed_std_and_edge_cases():
    signal = torch.tensor([1.0, 3.0, 5.0], dtype=F64)
    fixed = qprop_normalize(signal, torch.tensor(2.0, dtype=F64), "consistent", signal_std=4.0)
    torch.testing.assert_close(fixed.learning_signal, torch.tensor([-0.5, 0.0, 0.5], dtype=F64))
    torch.testing.assert_close(fixed.eta, torch.tensor(0.5, dtype=F64))
    single = qprop_normalize(torch.tensor([3.0]), 2.0, "consistent")  # one element: left alone (no 0/0)
    assert single.learning_signal.tolist() == [3.0] and float(single.eta) == 2.0
    leaf = signal.clone().requires_grad_(True)
    out = qprop_normalize(leaf, 1.0, "as_published")
    assert not out.learning_signal.requires_grad and not out.eta.requires_grad


# ------------------------------------------------------------------------------------------------ all-action
def test_all_action_control_variate_matches_loop_reference_and_autograd():
    torch.manual_seed(5)
    T, N, A = 3, 2, 4
    logits = torch.randn(T, N, A, dtype=F64, requires_grad=True)
    q = torch.randn(T, N, A, dtype=F64, requires_grad=True)  # the critic: must get no gradient
    actions = torch.randint(0, A, (T, N))
    adv_hat = torch.randn(T, N, dtype=F64)
    out = all_action_control_variate(q, logits, actions, adv_hat, from_logits=True)
    from_probs = all_action_control_variate(q, torch.softmax(logits, -1), actions, adv_hat)
    torch.testing.assert_close(out.learning_signal, from_probs.learning_signal)
    torch.testing.assert_close(out.surrogate, from_probs.surrogate)
    assert not out.learning_signal.requires_grad

    probs = torch.softmax(logits.detach(), -1)
    expected_signal = torch.zeros(T, N, dtype=F64)
    expected_grad = torch.zeros(T, N, A, dtype=F64)
    for t, n in itertools.product(range(T), range(N)):
        p, qv = probs[t, n].tolist(), q[t, n].tolist()
        mean_q = sum(pi * qa for pi, qa in zip(p, qv))
        expected_signal[t, n] = float(adv_hat[t, n]) - (qv[int(actions[t, n])] - mean_q)
        for j in range(A):  # d/dlogit_j sum_a pi_a Q_a = pi_j (Q_j - E_pi Q), averaged over the T N samples
            expected_grad[t, n, j] = p[j] * (qv[j] - mean_q) / (T * N)
    torch.testing.assert_close(out.learning_signal, expected_signal)
    grad_logits, grad_q = torch.autograd.grad(out.surrogate, [logits, q], allow_unused=True)
    torch.testing.assert_close(grad_logits, expected_grad)
    assert grad_q is None


def test_all_action_estimator_is_exact_in_expectation_over_the_action():
    """sum_a pi(a) [g(a) l(a)] + grad surrogate == sum_a pi(a) g(a) A_hat(a), for any critic (enumerated exactly)."""
    A = 5
    logits = torch.randn(A, dtype=F64, generator=generator(10)).requires_grad_(True)
    adv_table = torch.randn(A, dtype=F64, generator=generator(11))
    critic = torch.randn(A, dtype=F64, generator=generator(12)) * 4
    probs = torch.softmax(logits, -1).detach()
    all_actions = torch.arange(A)
    out = all_action_control_variate(
        critic.expand(A, A), logits.expand(A, A), all_actions, adv_table, from_logits=True
    )
    log_probs = torch.log_softmax(logits, -1)
    estimator = (probs * log_probs * out.learning_signal).sum() + out.surrogate
    plain = (probs * log_probs * adv_table).sum()
    torch.testing.assert_close(
        torch.autograd.grad(estimator, logits, retain_graph=True)[0],
        torch.autograd.grad(plain, logits)[0],
        rtol=1e-12,
        atol=1e-14,
    )


# ------------------------------------------------------------------------------------------------ bad input
def _t(*shape, dtype=F64):
    return torch.zeros(*shape, dtype=dtype)


BAD_INPUTS = [
    (
        lambda: qprop_eta(_t(3), _t(3), "optimistic"),
        r"rule must be one of 'fixed', 'conservative'.*'optimistic'",
    ),
    (
        lambda: qprop_eta(_t(3), _t(3), "fixed", "episode"),
        r"scope must be one of 'crossfit', 'batch', 'sample'; got 'episode'",
    ),
    (lambda: qprop_eta(_t(3), _t(4)), r"adv_bar must have the shape of adv_hat \(3,\), got \(4,\)"),
    (lambda: qprop_eta(_t(3), _t(3), "adaptive"), r"action_variance is required by rule='adaptive'"),
    (
        lambda: qprop_eta(_t(3), _t(3), "adaptive", action_variance=-torch.ones(3, dtype=F64)),
        r"action_variance must be >= 0",
    ),
    (
        lambda: qprop_eta(torch.tensor([1.0, math.nan]), _t(2, dtype=torch.float32)),
        r"adv_hat must be finite, got nan",
    ),
    (
        lambda: qprop_eta(_t(2), _t(2), mask=torch.zeros(2, dtype=torch.bool)),
        r"mask must select at least one sample",
    ),
    (
        lambda: qprop_normalize(_t(3), 1.0, "minibatch"),
        r"mode must be one of 'consistent', 'as_published', 'none'; got 'minibatch'",
    ),
    (
        lambda: qprop_normalize(_t(3), _t(2), "consistent"),
        r"eta must be a scalar or have the shape of learning_signal \(3,\), got shape \(2,\)",
    ),
    (lambda: qprop_normalize(_t(3), 1.0, signal_std=0.0), r"signal_std must be a number > 0, got 0.0"),
    (lambda: qprop_normalize(_t(3), 1.0, eps=-1.0), r"eps must be a number >= 0, got -1.0"),
    (
        lambda: qprop_control_variate(_t(4, 2), _t(4, 3), _t(4, 3)),
        r"grad_q_at_mean must have the shape of actions \(4, 3\), got \(4, 2\)",
    ),
    (
        lambda: qprop_control_variate(_t(4, 1), torch.zeros(4, 1, dtype=torch.long), _t(4, 1)),
        r"continuous \(Box\) actions.*for Discrete actions use all_action_control_variate",
    ),
    (lambda: qprop_control_variate(_t(4), _t(4), _t(4)[0]), r"mean_actions must have a trailing action axis"),
    (
        lambda: qprop_action_variance(_t(4, 2), _t(3)),
        r"std must broadcast to the shape of grad_q_at_mean \(4, 2\), got shape \(3,\)",
    ),
    (lambda: qprop_action_variance(_t(4, 2), -torch.ones(2, dtype=F64)), r"std must be >= 0"),
    (
        lambda: qprop_learning_signal(_t(3), _t(3, 1), 1.0),
        r"adv_bar must have the shape of adv_hat \(3,\), got \(3, 1\)",
    ),
    (
        lambda: qprop_correction_surrogate(_t(4, 1), _t(4)),
        r"eta must be a scalar or have the shape of q_at_policy_mean \(4, 1\)",
    ),
    (lambda: qprop_correction_surrogate(_t(4), "1"), r"eta must be a number or a tensor"),
    (
        lambda: qprop_correction_surrogate(torch.zeros(4, dtype=torch.long), 1.0),
        r"q_at_policy_mean must be a floating-point tensor",
    ),
    (
        lambda: all_action_control_variate(_t(2, 3), _t(2, 3), _t(2), _t(2)),
        r"actions must be an integer tensor of Discrete.*use qprop_control_variate",
    ),
    (
        lambda: all_action_control_variate(_t(2, 3), _t(2, 3), torch.tensor([0, 3]), _t(2), from_logits=True),
        r"actions must be indices in \[0, 3\)",
    ),
    (
        lambda: all_action_control_variate(_t(2, 3), _t(2, 4), torch.tensor([0, 1]), _t(2)),
        r"probs_or_logits must have the shape of q_values \(2, 3\), got \(2, 4\)",
    ),
    (
        lambda: all_action_control_variate(_t(2, 3), _t(2, 3), torch.tensor([0, 1, 2]), _t(3)),
        r"q_values must have shape actions.shape \+ \(A,\)",
    ),
    (
        lambda: all_action_control_variate(_t(2, 3), _t(2, 3), torch.tensor([0, 1]), _t(2)),
        r"probs_or_logits must hold probabilities.*pass from_logits=True",
    ),
    (
        lambda: all_action_control_variate(_t(2, 3), _t(2, 3), torch.tensor([0, 1]), _t(3), from_logits=True),
        r"adv_hat must have the shape of actions \(2,\), got \(3,\)",
    ),
]


@pytest.mark.parametrize("call,message", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_input_raises_value_error_naming_argument_value_and_allowed(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_constants_list_the_allowed_names():
    assert QPROP_ETA_RULES == ("fixed", "conservative", "aggressive", "adaptive")
    assert QPROP_ETA_SCOPES == ("crossfit", "batch", "sample")
    assert QPROP_NORMALIZATION_MODES == ("consistent", "as_published", "none")


def test_every_mask_argument_is_bool_only():
    x = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    for mask in (torch.tensor([1, 1, 0]), torch.tensor([1.0, 1.0, 0.0])):
        for call in (
            lambda m: qprop_eta(x, x, "conservative", mask=m),
            lambda m: qprop_correction_surrogate(x, 1.0, mask=m),
            lambda m: qprop_normalize(x, 1.0, mask=m),
            lambda m: all_action_control_variate(
                torch.zeros(3, 2, dtype=F64), torch.zeros(3, 2, dtype=F64), torch.tensor([0, 1, 0]), x,
                from_logits=True, mask=m,
            ),
        ):
            with pytest.raises(TypeError, match=r"mask must be a bool tensor.*pass mask.bool\(\)"):
                call(mask)
