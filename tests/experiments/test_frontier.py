"""The exact frontier and the k1 / k3 gradient-variance measurement of ``pgvar frontier``."""

from __future__ import annotations

import pytest

from pgvar.experiments import exact_frontier, kl_gradient_variance
from pgvar.problems import RewardHackingMDP


def test_k1_in_the_reward_is_unbiased_and_k3_in_the_loss_is_not():
    """A sampled test with standard errors computed from the samples (pgvar.measure.estimate_statistics)."""
    mdp = RewardHackingMDP()
    # a policy off the reference: the KL optimum, where the exact gradient of J - coef H KL is zero
    stats = kl_gradient_variance(mdp, mdp.kl_regularized_optimum(0.6), coef=0.6, n_episodes=6000, seed=1)
    assert stats["k1_reward"]["max_abs_z"] < 4.5
    assert stats["k3_loss"]["max_abs_z"] > 6.0
    for entry in stats.values():
        assert entry["variance_trace"] > 0 and 0 < entry["variance_trace_se"] < entry["variance_trace"]
        assert entry["penalty_variance_trace"] <= entry["variance_trace"] * 10


def test_exact_points_are_the_problems_optima():
    result = exact_frontier("reward_hacking", smoke=True, variance_episodes=50)
    mdp = RewardHackingMDP()
    kl_points = [p for p in result["points"] if p["family"] == "kl"]
    assert kl_points and all(p["problem"] == "reward_hacking" for p in kl_points)
    for point in kl_points:
        optimum = mdp.kl_regularized_optimum(point["parameter"])
        assert point["true_return"] == pytest.approx(float(mdp.exact_true_return(optimum)), rel=1e-9, abs=1e-9)
        assert point["kl"] == pytest.approx(float(mdp.exact_divergence(optimum, "kl", "action")), abs=1e-9)
    for point in (p for p in result["points"] if p["family"] == "odds_ratio_cap"):
        probs = mdp.cap_optimum(point["parameter"])
        assert point["proxy_return"] == pytest.approx(float(mdp.exact_proxy_return(probs.clamp_min(1e-300).log())))
    stopped = [p for p in result["points"] if p["family"] == "early_stopping"]
    budgets = result["settings"]["kl_budgets"]
    assert [p["kl"] >= b for p, b in zip(stopped, budgets)] == [True] * len(stopped)
    assert {p["family"] for p in result["points"]} == {"reference", "kl", "odds_ratio_cap", "early_stopping",
                                                        "om_sqrt_chi2"}  # fmt: skip


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"problem": "nope"}, "problem must be one of"),
    ({"caps": [0.5]}, "caps must be"),
    ({"kl_coefs": [-1.0]}, "kl_coefs must be"),
    ({"problem": "goodhart", "om_coefs": [0.1]}, "om_coefs applies to problem='reward_hacking' only"),
    ({"kl_budgets": []}, "kl_budgets must hold at least one"),
])  # fmt: skip
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        exact_frontier(**{"smoke": True, **kwargs})
