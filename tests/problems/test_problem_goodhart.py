"""GoodhartBandit: the closed-form KL optimum and the quantilizer are the exact optima (first-order conditions,
no better feasible policy, gradient ascent converges to them), the exact gradient of the regularized objective
matches its closed form, and the environment pays what the exact quantities say (Monte Carlo within k SE).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pgvar.estimators import capped_log_probs, kl_to_reference
from pgvar.problems import ERROR_DISTRIBUTIONS, GoodhartBandit

F64 = torch.float64


@pytest.fixture(params=ERROR_DISTRIBUTIONS)
def bandit(request) -> GoodhartBandit:
    return GoodhartBandit(n_arms=40, error=request.param, seed=3)


def test_draws_are_seeded_and_heavy_tails_are_heavy():
    a, b = GoodhartBandit(n_arms=50, seed=1), GoodhartBandit(n_arms=50, seed=1)
    torch.testing.assert_close(a.proxy_rewards, b.proxy_rewards)
    assert not torch.equal(a.proxy_rewards, GoodhartBandit(n_arms=50, seed=2).proxy_rewards)
    # the same true rewards under every error family (drawn first from the seed)
    heavy = {e: GoodhartBandit(n_arms=20_000, error=e, seed=0) for e in ERROR_DISTRIBUTIONS}
    torch.testing.assert_close(heavy["gaussian"].true_rewards, heavy["pareto"].true_rewards)
    largest = {e: float((p.proxy_rewards - p.true_rewards).abs().max()) for e, p in heavy.items()}
    assert largest["gaussian"] < 6 < 30 < largest["student_t"] and largest["pareto"] > 100, largest


def test_kl_optimum_closed_form_gradient_and_first_order_condition(bandit):
    beta = 0.7
    logits = bandit.initial_parameters(seed=1)["logits"]
    probs = torch.softmax(logits[0], -1)
    g = bandit.proxy_rewards - beta * (probs.log() - bandit.reference_log_probs[0])
    closed_form = probs * (g - probs @ g)
    autograd = bandit.exact_regularized_gradient(logits, coef=beta, divergence="kl", measure="action")[
        "logits"
    ]
    torch.testing.assert_close(autograd[0], closed_form, rtol=1e-10, atol=1e-12)
    optimum = bandit.kl_optimum(beta)
    torch.testing.assert_close(optimum, bandit.kl_regularized_optimum(beta)[0].exp(), rtol=1e-12, atol=1e-14)
    at_optimum = bandit.exact_regularized_gradient(optimum.log()[None], coef=beta)["logits"]
    assert float(at_optimum.abs().max()) < 1e-12
    value = float(bandit.exact_regularized_objective(optimum.log()[None], coef=beta))
    for seed in range(20):  # the objective is strictly concave in pi: every other policy is worse
        other = torch.log_softmax(
            torch.randn(1, 40, generator=torch.Generator().manual_seed(seed), dtype=F64), -1
        )
        mix = torch.log(0.9 * optimum + 0.1 * other.exp())
        assert float(bandit.exact_regularized_objective(mix, coef=beta)) < value


def test_quantilizer_is_the_best_capped_policy(bandit):
    cap = 4.0
    q = bandit.quantilizer(cap)
    ref = bandit.reference_probs[0]
    assert float(q.sum()) == pytest.approx(1.0) and bool((q <= cap * ref + 1e-15).all())
    assert int((q > 0).sum()) == 10  # 40 arms, cap 4: the best 10 arms by proxy reward
    best = torch.argsort(bandit.proxy_rewards, descending=True)[:10]
    assert set(best.tolist()) == set(torch.nonzero(q).flatten().tolist())
    point = bandit.evaluate(q)
    assert float(point.kl) == pytest.approx(math.log(cap))
    for seed in range(50):
        logits = 3 * torch.randn(40, generator=torch.Generator().manual_seed(seed), dtype=F64)
        other = capped_log_probs(logits, bandit.reference_log_probs[0], cap).exp()
        assert float(other @ bandit.proxy_rewards) <= float(point.proxy_utility) + 1e-12
    # fractional fill: cap 3 on 40 arms -> 13 full arms and one with the remaining 1/40 of mass
    q3 = bandit.quantilizer(3.0)
    assert int((q3 > 0).sum()) == 14 and float(q3.min()) == 0.0


def natural_gradient_ascent(
    problem, logits: torch.Tensor, steps: int, lr: float, backtrack: bool = False, **objective
) -> torch.Tensor:
    """Ascend ``exact_regularized_gradient`` preconditioned by the visitation d(s) pi(a|s) (Kakade's natural gradient
    of a tabular softmax: the step is lr times an advantage). Entries whose probability underflowed to 0 stay put.
    With ``backtrack``, a step that does not increase the objective is retried with half the step size (and the
    step size grows back by 1.5 after a success), so the ascent is monotone whatever the curvature.
    """
    logits = problem._logits(logits).clone()
    value = float(problem.exact_regularized_objective(logits, **objective)) if backtrack else 0.0
    for _ in range(steps):
        grad = problem.exact_regularized_gradient(logits, **objective)["logits"]
        weight = problem.effective_horizon * problem.exact_state_action_occupancy(
            logits, objective.get("cap")
        )
        direction = torch.where(weight > 0, grad / weight, torch.zeros_like(grad))
        if not backtrack:
            logits += lr * direction
            continue
        while lr > 1e-12:
            candidate = logits + lr * direction
            new_value = float(problem.exact_regularized_objective(candidate, **objective))
            if new_value >= value:
                logits, value, lr = candidate, new_value, 1.5 * lr
                break
            lr /= 2
    return logits


def test_gradient_ascent_converges_to_the_kl_optimum_and_to_the_quantilizer():
    bandit = GoodhartBandit(n_arms=30, error="student_t", seed=5)
    beta = 2.0
    logits = natural_gradient_ascent(bandit, bandit.reference_log_probs, 60, 0.5 / beta, coef=beta)
    torch.testing.assert_close(torch.softmax(logits[0], -1), bandit.kl_optimum(beta), rtol=0, atol=1e-12)

    cap = 3.5  # the policy is the capped softmax: feasible at every step of the ascent
    logits = natural_gradient_ascent(bandit, bandit.reference_log_probs, 200, 1.0, cap=cap)
    capped = bandit.policy_log_probs(logits, cap=cap).exp()[0]
    assert bool((capped <= cap * bandit.reference_probs[0] + 1e-12).all())
    torch.testing.assert_close(capped, bandit.quantilizer(cap), rtol=0, atol=1e-10)


def test_kl_optimum_with_kl_hits_the_budget():
    bandit = GoodhartBandit(n_arms=200, error="pareto", seed=0)
    for budget in (0.1, math.log(5), 3.0):
        probs = bandit.kl_optimum_with_kl(budget)
        assert float(kl_to_reference(probs.log(), bandit.reference_log_probs[0])) == pytest.approx(
            budget, abs=1e-8
        )
    with pytest.raises(ValueError, match="kl must be in"):
        bandit.kl_optimum_with_kl(math.log(200) + 1)


def test_environment_pays_proxy_and_reports_true_reward():
    bandit = GoodhartBandit(n_arms=5, error="gaussian", seed=2)
    logits = bandit.initial_parameters(seed=3)["logits"]
    probs = torch.softmax(logits[0], -1).numpy()
    bandit.reset(seed=0)
    rng = np.random.default_rng(0)
    proxy, true = [], []
    for _ in range(20_000):
        bandit.reset()
        _, reward, terminated, truncated, info = bandit.step(int(rng.choice(5, p=probs)))
        assert terminated and not truncated
        proxy.append(reward)
        true.append(info["true_reward"])
    for samples, exact in (
        (proxy, bandit.exact_proxy_return(logits)),
        (true, bandit.exact_true_return(logits)),
    ):
        samples_t = torch.tensor(samples, dtype=F64)
        assert abs(float(samples_t.mean() - exact)) < 4.5 * float(samples_t.std()) / math.sqrt(len(samples))


def test_bad_arguments():
    with pytest.raises(
        ValueError, match=r"error must be one of 'gaussian', 'student_t', 'pareto'; got 'cauchy'"
    ):
        GoodhartBandit(error="cauchy")
    with pytest.raises(ValueError, match="n_arms must be an integer >= 2, got 1"):
        GoodhartBandit(n_arms=1)
    with pytest.raises(ValueError, match="tail_index must be a number > 0, got -1"):
        GoodhartBandit(error="student_t", tail_index=-1)
    bandit = GoodhartBandit(n_arms=5)
    with pytest.raises(ValueError, match="cap must be a finite number >= 1"):
        bandit.quantilizer(0.5)
    with pytest.raises(ValueError, match="coef must be a number >= 0, got -1"):
        bandit.exact_regularized_objective(bandit.reference_log_probs, coef=-1)
    with pytest.raises(
        ValueError, match=r"measure must be one of 'action', 'state', 'state_action'; got 'trajectory'"
    ):
        bandit.exact_divergence(bandit.reference_log_probs, "kl", "trajectory")
