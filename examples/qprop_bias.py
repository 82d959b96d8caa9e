"""Q-Prop's two traps, against exact gradients
===========================================

Q-Prop's two traps, measured against exact gradients: per-sample eta and the normalization mismatch.

1. eta rules on a 1-D Gaussian bandit built to expose the bias of the per-sample eta (the official code's
   ``adapt1``/``adapt2``): the policy mean sits away from the optimum and the critic's slope has the wrong sign.
   The estimate of each rule is compared with the exact gradient (bias, max ``|z|``, covariance trace).
2. The normalization trap (Tucker et al. 2018): with the learning signal divided by its std sigma but the analytic
   term not, the update is (1/sigma) grad J + (1 - 1/sigma) E[eta grad_a Q grad mu]. For growing reward scales
   (so growing sigma), the cosine of each mode's expected update to grad J, with an imperfect critic.
3. Variance: covariance trace of per-sample Q-Prop estimates on a quadratic bandit with an exact, a perturbed and
   a random critic, for the fixed and the batch-adaptive eta, next to the plain estimator; and the all-action
   control variate on a tabular MDP.

docs/guide/qprop.md quotes the numbers of the full run.

::

    python examples/qprop_bias.py                         # full run, about 30 s on one core
    PGVAR_EXAMPLE_SMOKE=1 python examples/qprop_bias.py   # the small version the tests run
"""

from __future__ import annotations

import math
import os

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
from pgvar.problems import GaussianBandit, TabularMDP

SMOKE = os.environ.get("PGVAR_EXAMPLE_SMOKE", "0") not in ("", "0")
F64 = torch.float64


# ------------------------------------------------------------------------------------------------ helpers
def policy_mean(params: dict[str, torch.Tensor], states: torch.Tensor) -> torch.Tensor:
    """The GaussianBandit policy's mean, mu_theta(s) = W s + b."""
    return states @ params["weight"].T + params["bias"]


def grad_q_at_mean(critic, states: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """grad_a Q_w(s, a) at a = mu(s) (the critic is a plain function of tensors: nothing to freeze)."""
    leaf = means.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(states, leaf).sum(), leaf)
    return grad


def qprop_per_sample(bandit, params, critic, states, actions, signal, eta) -> torch.Tensor:
    """[N, P]: grad_theta of log pi(a|s) * signal + eta * Q_w(s, mu_theta(s)) for each sample (vmap)."""

    def sample_objective(p, s, a, signal_i, eta_i):
        return bandit.log_prob(p, s, a) * signal_i + qprop_correction_surrogate(
            critic(s, policy_mean(p, s)), eta_i
        )

    return flatten_per_sample(per_sample_gradients(sample_objective, params, (states, actions, signal, eta)))


def random_quadratic_critic(obs_dim: int, action_dim: int, seed: int, scale: float):
    """Q_w(s, a) = v.a + a^T M a + s^T C a with random coefficients: unrelated to the true Q."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(action_dim, generator=g, dtype=F64)
    root = torch.randn(action_dim, action_dim, generator=g, dtype=F64)
    m = (root + root.T) / 2
    c = torch.randn(obs_dim, action_dim, generator=g, dtype=F64)
    return lambda s, a: scale * (a @ v + ((a @ m) * a).sum(-1) + ((s @ c) * a).sum(-1))


def z_max(estimates: torch.Tensor, exact: torch.Tensor) -> float:
    standard_error = estimates.std(0) / math.sqrt(estimates.shape[0])
    return float(((estimates.mean(0) - exact) / standard_error).abs().max())


# ------------------------------------------------------------------------------------------------ 1. eta
def eta_bias_table() -> dict[tuple[str, str], float]:
    """The 1-D bandit of tests/problems/test_qprop_unbiasedness.py::test_per_sample_eta_is_biased_and_batch_eta_is_not."""
    n = 20_000 if SMOKE else 400_000
    bandit = GaussianBandit(obs_dim=1, action_dim=1, reward="quadratic", seed=0)
    params = {
        "weight": torch.zeros(1, 1, dtype=F64),
        "bias": torch.full((1,), 0.5, dtype=F64),
        "log_std": torch.zeros(1, dtype=F64),
    }
    batch = bandit.sample_episodes(params, n, torch.Generator().manual_seed(5))
    states, actions = batch.observations[0], batch.actions[0]
    adv_hat = batch.rewards[0] - bandit.exact_state_values(params, states)
    exact = flatten(bandit.exact_policy_gradient(params))  # order: bias, log_std, weight

    def critic(s, a):  # slope +3; the true slope of Q at mu is about -0.5
        return 3.0 * a.sum(-1)

    means = policy_mean(params, states)
    grad_q = grad_q_at_mean(critic, states, means)
    adv_bar = qprop_control_variate(grad_q, actions, means)
    variance = qprop_action_variance(grad_q, params["log_std"].exp())
    print(f"1. eta rules, 1-D bandit, critic slope +3 (true about -0.5), N = {n} samples")
    print(f"   exact gradient (bias, log_std, weight) = {[round(x, 4) for x in exact.tolist()]}")
    print(
        f"   {'rule/scope':>20} {'mean eta':>8} {'bias (bias, log_std, weight)':>32} {'|bias|/|grad|':>13} {'max|z|':>7} {'tr Cov':>8}"
    )
    z_by_rule = {}
    rows = [("fixed", "sample")] + [
        (r, s) for r in ("conservative", "aggressive", "adaptive") for s in ("sample", "batch")
    ]
    for rule, scope in rows:
        eta = qprop_eta(adv_hat, adv_bar, rule, scope, action_variance=variance)
        signal = qprop_learning_signal(adv_hat, adv_bar, eta)
        estimates = qprop_per_sample(bandit, params, critic, states, actions, signal, eta)
        bias = estimates.mean(0) - exact
        z_by_rule[rule, scope] = z_max(estimates, exact)
        print(
            f"   {rule + '/' + scope:>20} {float(eta.mean()):8.3f} {str([round(x, 4) for x in bias.tolist()]):>32} "
            f"{float(bias.norm() / exact.norm()):13.3f} {z_by_rule[rule, scope]:7.1f} {float(estimates.var(0).sum()):8.3f}"
        )
    plain = flatten_per_sample(
        per_sample_gradients(
            lambda p, s, a, w: bandit.log_prob(p, s, a) * w, params, (states, actions, adv_hat)
        )
    )
    print(
        f"   {'plain (r - V)':>20} {'':8} {'':32} {'':13} {z_max(plain, exact):7.1f} {float(plain.var(0).sum()):8.3f}"
    )
    return z_by_rule


# ------------------------------------------------------------------------------------------------ 2. normalization
def normalization_trap() -> None:
    n = 20_000 if SMOKE else 100_000
    bandit = GaussianBandit(obs_dim=2, action_dim=2, reward="quadratic", seed=0)
    params = bandit.initial_parameters(seed=1)
    exact_unit = flatten(bandit.exact_policy_gradient(params))
    perturbation = random_quadratic_critic(2, 2, seed=30, scale=0.5)

    def critic_unit(s, a):  # an imperfect critic: the true Q (= r) plus a random quadratic error
        return bandit.reward(s, a) + perturbation(s, a)

    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    at_mean = bandit.exact_expectation(leaves, lambda s, a: critic_unit(s, policy_mean(leaves, s)))
    grads = torch.autograd.grad(at_mean, list(leaves.values()), allow_unused=True)
    c_unit = flatten({k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)})
    batch = bandit.sample_episodes(params, n, torch.Generator().manual_seed(10))
    states, actions = batch.observations[0], batch.actions[0]
    means = policy_mean(params, states)
    adv_bar_unit = qprop_control_variate(grad_q_at_mean(critic_unit, states, means), actions, means)
    adv_hat_unit = batch.rewards[0] - bandit.exact_state_values(params, states)

    def cosine(x, y):
        return float(x @ y / (x.norm() * y.norm()))

    print(f"\n2. normalization trap, 2-D quadratic bandit, critic = true Q + random quadratic error, N = {n}")
    print(
        f"   cos(E[eta grad_a Q grad mu], grad J) = {cosine(c_unit, exact_unit):.3f} (the critic's own gradient)"
    )
    print(
        f"   {'reward scale':>12} {'sigma':>8} {'|E pub|/|grad J/sigma|':>22} {'critic share':>12} "
        f"{'cos pub (exact)':>15} {'cos pub (sampled)':>17} {'cos consistent (sampled)':>24} {'max|z| identity':>15}"
    )
    for scale in (1.0, 10.0, 100.0):
        exact, c_term = scale * exact_unit, scale * c_unit  # rewards and critic scale together
        signal = qprop_learning_signal(scale * adv_hat_unit, scale * adv_bar_unit, 1.0)
        sigma = float(signal.std()) + 1e-8
        expected_published = (exact - c_term) / sigma + c_term  # formulas.md 4.3
        share = float(((1 - 1 / sigma) * c_term).norm() / expected_published.norm())
        sampled = {}
        for mode in ("as_published", "consistent"):
            normalized, eta = qprop_normalize(signal, torch.ones_like(signal), mode)
            sampled[mode] = qprop_per_sample(
                bandit, params, lambda s, a, k=scale: k * critic_unit(s, a), states, actions, normalized, eta
            )
        shrink = (
            1 - 1 / n
        )  # the batch-mean centring (sigma is the batch's own: the identity holds up to O(1/N))
        identity_z = z_max(sampled["as_published"], shrink * (exact - c_term) / sigma + c_term)
        print(
            f"   {scale:12g} {sigma:8.2f} {float(expected_published.norm() / (exact / sigma).norm()):22.2f} "
            f"{share:12.3f} {cosine(expected_published, exact):15.3f} "
            f"{cosine(sampled['as_published'].mean(0), exact):17.3f} "
            f"{cosine(sampled['consistent'].mean(0), exact):24.3f} {identity_z:15.2f}"
        )


# ------------------------------------------------------------------------------------------------ 3. variance
def variance_table() -> None:
    n = 20_000 if SMOKE else 100_000
    bandit = GaussianBandit(obs_dim=2, action_dim=2, reward="quadratic", seed=0)
    params = bandit.initial_parameters(seed=1)
    exact = flatten(bandit.exact_policy_gradient(params))
    batch = bandit.sample_episodes(params, n, torch.Generator().manual_seed(11))
    states, actions = batch.observations[0], batch.actions[0]
    adv_hat = batch.rewards[0] - bandit.exact_state_values(params, states)
    perturbation = random_quadratic_critic(2, 2, seed=30, scale=0.5)
    critics = {
        "exact Q": lambda s, a: bandit.reward(s, a),
        "Q + error": lambda s, a: bandit.reward(s, a) + perturbation(s, a),
        "random": random_quadratic_critic(2, 2, seed=31, scale=2.0),
    }
    plain = flatten_per_sample(
        per_sample_gradients(
            lambda p, s, a, w: bandit.log_prob(p, s, a) * w, params, (states, actions, adv_hat)
        )
    )
    print(f"\n3a. covariance trace of per-sample estimates, 2-D quadratic bandit, A_hat = r - V(s), N = {n}")
    print(f"   {'critic':>10} {'eta':>18} {'mean eta':>8} {'tr Cov':>9} {'vs plain':>8} {'max|z|':>7}")
    print(
        f"   {'(none)':>10} {'plain':>18} {'':8} {float(plain.var(0).sum()):9.3f} {1.0:8.3f} {z_max(plain, exact):7.2f}"
    )
    for name, critic in critics.items():
        means = policy_mean(params, states)
        grad_q = grad_q_at_mean(critic, states, means)
        adv_bar = qprop_control_variate(grad_q, actions, means)
        variance = qprop_action_variance(grad_q, params["log_std"].exp())
        for rule, scope in (("fixed", "sample"), ("conservative", "batch"), ("adaptive", "batch")):
            eta = qprop_eta(adv_hat, adv_bar, rule, scope, action_variance=variance)
            signal = qprop_learning_signal(adv_hat, adv_bar, eta)
            estimates = qprop_per_sample(bandit, params, critic, states, actions, signal, eta)
            trace = float(estimates.var(0).sum())
            print(
                f"   {name:>10} {rule + '/' + scope:>18} {float(eta.mean()):8.3f} {trace:9.3f} "
                f"{trace / float(plain.var(0).sum()):8.3f} {z_max(estimates, exact):7.2f}"
            )


def all_action_table() -> None:
    n = 5_000 if SMOKE else 50_000
    mdp = TabularMDP(n_states=5, n_actions=3, gamma=0.9, termination_prob=0.2, seed=0)
    params = mdp.initial_parameters(seed=1)
    exact = flatten(mdp.exact_policy_gradient(params))
    batch = mdp.sample_episodes(params, n, torch.Generator().manual_seed(7))
    returns = discounted_returns(batch.rewards, batch.terminated, batch.truncated, gamma=mdp.gamma)
    mask = batch.mask
    states, actions = batch.observations[mask], batch.actions[mask]
    episode = torch.arange(n).expand(mask.shape)[mask]
    discounts = (mdp.gamma ** batch.timesteps.to(F64))[mask]
    adv_hat = returns[mask] - mdp.exact_state_values(params, states)

    def step_objective(p, s, a, q_row, adv_t, discount_t):
        log_probs = torch.log_softmax(p["logits"], dim=-1)
        row = torch.index_select(log_probs, 0, s.reshape(1))[0]
        out = all_action_control_variate(q_row, row, a, adv_t, from_logits=True)
        return discount_t * (row.gather(0, a.reshape(1))[0] * out.learning_signal + out.surrogate)

    critics = {
        "none (G - V)": torch.zeros(mdp.n_states, mdp.n_actions, dtype=F64),
        "exact Q": mdp.exact_q_values(params),
        "random Q": 3.0
        * torch.randn(mdp.n_states, mdp.n_actions, generator=torch.Generator().manual_seed(8), dtype=F64),
    }
    print(
        f"\n3b. all-action control variate, TabularMDP(5 states, 3 actions), A_hat = G_t - V(s_t), {n} episodes"
    )
    print(f"   {'critic':>14} {'tr Cov per episode':>18} {'max|z|':>7}")
    for name, q_table in critics.items():
        per_step = flatten_per_sample(
            per_sample_gradients(
                step_objective, params, (states, actions, q_table[states], adv_hat, discounts)
            )
        )
        per_episode = torch.zeros(n, per_step.shape[1], dtype=F64).index_add_(0, episode, per_step)
        print(f"   {name:>14} {float(per_episode.var(0).sum()):18.4f} {z_max(per_episode, exact):7.2f}")


def main() -> None:
    torch.manual_seed(0)
    z = eta_bias_table()
    assert z["conservative", "sample"] > 10 and z["conservative", "batch"] < 5, z
    normalization_trap()
    variance_table()
    all_action_table()


if __name__ == "__main__":
    main()
