"""Constant baselines and advantage normalization against brute force."""

from __future__ import annotations

import pytest
import torch

from pgvar.estimators import batch_mean_baseline, normalize_advantages, optimal_constant_baseline


def _scores_and_returns(n=500, p=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, p, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, p, dtype=torch.float64)
    returns = 5.0 + 0.5 * (scores**2).sum(-1) + torch.randn(n, generator=g, dtype=torch.float64)
    return scores, returns


def _second_moment(scores, returns, b):
    return ((scores * (returns - b).unsqueeze(-1)) ** 2).sum(-1).mean()


def test_optimal_constant_minimizes_second_moment_with_greensmith_identity():
    scores, returns = _scores_and_returns()
    sq = (scores**2).sum(-1)
    b_star = optimal_constant_baseline(returns, sq)
    best = _second_moment(scores, returns, b_star)
    # The empirical identity E||g(G-b)||^2 = E||g(G-b*)||^2 + E||g||^2 (b-b*)^2 holds exactly.
    for b in torch.linspace(-10, 20, 31, dtype=torch.float64):
        lhs = _second_moment(scores, returns, b)
        torch.testing.assert_close(lhs, best + sq.mean() * (b - b_star) ** 2)
        assert lhs >= best - 1e-12
    # ... and b* differs from the plain mean here (the weights correlate with the returns).
    assert abs(float(b_star - returns.mean())) > 0.1


def test_per_coordinate_optimal_baseline_minimizes_each_coordinate():
    scores, returns = _scores_and_returns(seed=1)
    b = optimal_constant_baseline(returns, scores**2)
    assert b.shape == (scores.shape[1],)
    for k in range(scores.shape[1]):
        def coordinate_moment(value, k=k):
            return ((scores[:, k] * (returns - value)) ** 2).mean()
        assert coordinate_moment(b[k]) <= coordinate_moment(b[k] + 1e-3)
        assert coordinate_moment(b[k]) <= coordinate_moment(b[k] - 1e-3)


def test_baselines_respect_masks_and_time_major_shapes():
    returns = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    mask = returns < 5
    assert batch_mean_baseline(returns, mask) == returns[mask].mean()
    weights = torch.rand(3, 4, dtype=torch.float64)
    expected = (weights[mask] * returns[mask]).sum() / weights[mask].sum()
    torch.testing.assert_close(optimal_constant_baseline(returns, weights, mask), expected)
    assert optimal_constant_baseline(returns, torch.zeros(3, 4, dtype=torch.float64)) == 0.0


def test_baseline_bad_input():
    with pytest.raises(ValueError, match="score_sq_norms must have the shape of returns"):
        optimal_constant_baseline(torch.ones(4), torch.ones(3))
    with pytest.raises(ValueError, match="score_sq_norms must be >= 0"):
        optimal_constant_baseline(torch.ones(2), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="returns must be finite"):
        batch_mean_baseline(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="mask must select at least one sample"):
        batch_mean_baseline(torch.ones(3), torch.zeros(3, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_normalization_matches_sb3_formula(dtype):
    adv = torch.randn(64, 4, dtype=dtype) * 3 + 2
    out = normalize_advantages(adv, "batch")
    torch.testing.assert_close(out, (adv - adv.mean()) / (adv.std() + 1e-8))
    assert out.dtype == dtype
    torch.testing.assert_close(normalize_advantages(adv, "none"), adv)
    assert normalize_advantages(adv, "none") is not adv


def test_minibatch_normalization_normalizes_each_minibatch():
    adv = torch.randn(10, 3, dtype=torch.float64) * 5
    perm = torch.randperm(30)
    groups = [perm[:8], perm[8:16], perm[16:29], perm[29:]]  # the last minibatch has one element
    out = normalize_advantages(adv, "minibatch", minibatch_indices=groups).reshape(-1)
    flat = adv.reshape(-1)
    for group in groups[:3]:
        torch.testing.assert_close(out[group], (flat[group] - flat[group].mean()) / (flat[group].std() + 1e-8))
    assert out[groups[3]] == flat[groups[3]]  # a batch of one is left unchanged, never NaN
    assert torch.isfinite(normalize_advantages(torch.tensor([3.0]), "batch")).all()


def test_normalization_with_mask_leaves_padding_alone():
    adv = torch.randn(6, 2, dtype=torch.float64)
    mask = torch.ones(6, 2, dtype=torch.bool)
    mask[4:, 1] = False
    out = normalize_advantages(adv, "batch", mask=mask)
    torch.testing.assert_close(out[mask], (adv[mask] - adv[mask].mean()) / (adv[mask].std() + 1e-8))
    assert torch.equal(out[~mask], adv[~mask])


def test_normalization_bad_input():
    with pytest.raises(ValueError, match="mode must be one of 'minibatch', 'batch', 'none'; got 'global'"):
        normalize_advantages(torch.ones(3), "global")
    with pytest.raises(ValueError, match="minibatch_indices is only allowed with mode='minibatch'"):
        normalize_advantages(torch.ones(3), "batch", minibatch_indices=[torch.arange(3)])
    with pytest.raises(ValueError, match="advantages must be finite"):
        normalize_advantages(torch.tensor([1.0, float("inf")]))


# ------------------------------------------------------------------------- issue 11.4: silent wrong results
def test_an_integer_mask_is_a_type_error_not_indices():
    """``batch_mean_baseline([1, 2, 6, 100], mask=[1, 1, 1, 0])`` used to index elements 1 and 0: 1.75, not 3."""
    returns = torch.tensor([1.0, 2.0, 6.0, 100.0])
    int_mask = torch.tensor([1, 1, 1, 0])
    for call in (
        lambda m: batch_mean_baseline(returns, m),
        lambda m: optimal_constant_baseline(returns, torch.ones(4), m),
        lambda m: normalize_advantages(returns, "batch", mask=m),
    ):
        for bad in (int_mask, int_mask.double(), int_mask.to(torch.uint8)):
            with pytest.raises(TypeError, match=r"mask must be a bool tensor .*pass mask.bool\(\)"):
                call(bad)
    assert batch_mean_baseline(returns, int_mask.bool()) == 3.0
    assert optimal_constant_baseline(returns, torch.ones(4), int_mask.bool()) == 3.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_advantages_with_zero_spread_stay_finite(dtype):
    """eps = 1e-8 is 0 in float16, so std + eps was 0 and (A - mean) / 0 NaN."""
    out = normalize_advantages(torch.full((6,), 3.0, dtype=dtype))
    assert out.dtype == dtype
    assert torch.equal(out, torch.zeros(6, dtype=dtype))
    spread = normalize_advantages(torch.tensor([1.0, 2.0, 3.0], dtype=dtype))
    torch.testing.assert_close(spread, torch.tensor([-1.0, 0.0, 1.0], dtype=dtype))


@pytest.mark.parametrize(
    "eps,message",
    [
        (-1.0, r"eps must be a number > 0, got -1.0"),
        (0.0, r"eps must be a number > 0, got 0.0"),
        (float("nan"), r"eps must be a number > 0"),
        (float("inf"), r"eps must be a finite number > 0"),
        ("1e-8", r"eps must be a number > 0"),
        (1e-50, r"eps must be a number > 0 that torch.float32 can represent"),
    ],
)
def test_eps_is_validated(eps, message):
    with pytest.raises(ValueError, match=message):
        normalize_advantages(torch.tensor([1.0, 2.0, 3.0]), eps=eps)


# ----------------------------------------------------------------------------- one dispatch, one vocabulary
def test_constant_baseline_dispatches_to_the_named_baseline():
    from pgvar.estimators import CONSTANT_BASELINES, constant_baseline

    returns = torch.tensor([[1.0, 2.0], [6.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False]])
    sq_norms = torch.tensor([[1.0, 0.5], [2.0, 3.0]], dtype=torch.float64)
    assert CONSTANT_BASELINES == ("none", "mean", "optimal")
    none = constant_baseline("none", returns, mask)
    assert none.dtype == torch.float64 and none.shape == () and float(none) == 0.0
    torch.testing.assert_close(constant_baseline("mean", returns, mask), batch_mean_baseline(returns, mask))
    torch.testing.assert_close(
        constant_baseline("optimal", returns, mask, score_sq_norms=sq_norms),
        optimal_constant_baseline(returns, sq_norms, mask),
    )


def test_constant_baseline_bad_input():
    from pgvar.estimators import constant_baseline

    returns = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="kind must be one of 'none', 'mean', 'optimal'; got 'batch_mean'"):
        constant_baseline("batch_mean", returns)
    with pytest.raises(ValueError, match="score_sq_norms must be given for kind='optimal'"):
        constant_baseline("optimal", returns)
    with pytest.raises(ValueError, match="returns must be finite"):
        constant_baseline("none", torch.tensor([1.0, float("nan")]))


def test_buffer_and_engines_share_the_constructor_vocabulary():
    """The baseline option, the buffer, both comparison engines and the CLI use the same words."""
    from pgvar.algos import BASELINES
    from pgvar.compare import ENV_BASELINES, ENV_ESTIMATORS, ESTIMATORS
    from pgvar.estimators import CONSTANT_BASELINES

    assert set(BASELINES) == {"value", "horizon", *CONSTANT_BASELINES}
    # The environment engine compares the baselines it can compute at any fixed policy; the horizon-aware value
    # needs a fitted second head and is the environment engine's "horizon_value" estimator row instead.
    assert set(ENV_BASELINES) == set(BASELINES) - {"horizon"}
    assert "horizon_value" in ENV_ESTIMATORS
    assert set(CONSTANT_BASELINES) <= set(ESTIMATORS)
    assert not {"batch_mean", "optimal_constant"} & set(ESTIMATORS)
