"""Property-based tests (hypothesis) of the estimators over random rewards, values and episode-end patterns.

Each property is an identity or invariant that must hold for every input, not only for the grids of the other
test files: GAE(lambda = 1) + V is the bootstrapped return, TD(lambda) = GAE + V = the forward-view lambda-return,
normalization moments, float32 against float64, finite output for finite input, episodes that do not leak into
each other (even when a later one overflows), and masked-out entries that do not matter.

Deterministic (``derandomize=True``, no example database), so CI cannot flake; about 60 examples per property.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pgvar._testing.reference import reference_gae_advantages, reference_lambda_return
from pgvar.estimators import (
    batch_mean_baseline,
    discounted_returns,
    gae_advantages,
    normalize_advantages,
    optimal_constant_baseline,
    qprop_correction_surrogate,
    qprop_normalize,
    td_lambda_returns,
)

EXAMPLES = 60
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
F64 = torch.float64


def _floats(bound: float) -> st.SearchStrategy[float]:
    return st.floats(-bound, bound, allow_nan=False, allow_infinity=False)


@st.composite
def rollouts(draw, max_t: int = 20, max_n: int = 3, bound: float = 10.0, min_t: int = 1) -> dict[str, torch.Tensor]:
    """A float64 ``[T, N]`` rollout with terminations and truncations anywhere, and consistent values.

    ``next_values[t] = values[t + 1]`` inside an episode (what makes GAE(1) + V telescope to the return); at an
    episode end and at ``t = T - 1`` it is the value of a final observation, drawn independently.
    """
    t_len, n_envs = draw(st.integers(min_t, max_t)), draw(st.integers(1, max_n))
    shape = (t_len, n_envs)
    rewards = draw(arrays(np.float64, shape, elements=_floats(bound)))
    values = draw(arrays(np.float64, shape, elements=_floats(bound)))
    final_values = draw(arrays(np.float64, shape, elements=_floats(bound)))
    terminated = draw(arrays(np.bool_, shape))
    truncated = draw(arrays(np.bool_, shape)) & ~terminated
    next_values = np.empty_like(values)
    next_values[:-1] = values[1:]
    next_values[-1] = final_values[-1]
    done = terminated | truncated
    next_values[done] = final_values[done]
    return {
        "rewards": torch.from_numpy(rewards),
        "values": torch.from_numpy(values),
        "next_values": torch.from_numpy(next_values),
        "terminated": torch.from_numpy(terminated),
        "truncated": torch.from_numpy(truncated),
    }


unit = st.floats(0.0, 1.0)


def _gae(r: dict[str, torch.Tensor], gamma: float, lam: float, fn=gae_advantages) -> torch.Tensor:
    return fn(
        r["rewards"], r["values"], r["next_values"], r["terminated"], r["truncated"], gamma=gamma, gae_lambda=lam
    )


# ------------------------------------------------------------------------------------ returns and advantages
@PROPERTY
@given(rollouts(), unit)
def test_gae_with_lambda_one_plus_values_is_the_bootstrapped_return(r, gamma):
    returns = discounted_returns(r["rewards"], r["terminated"], r["truncated"], r["next_values"], gamma=gamma)
    torch.testing.assert_close(_gae(r, gamma, 1.0) + r["values"], returns, rtol=1e-10, atol=1e-10)


@PROPERTY
@given(rollouts(max_t=12), unit, unit)
def test_td_lambda_is_gae_plus_values_and_the_forward_view_lambda_return(r, gamma, lam):
    td = _gae(r, gamma, lam, td_lambda_returns)
    assert torch.equal(td, _gae(r, gamma, lam) + r["values"])
    forward = reference_lambda_return(
        r["rewards"], r["values"], r["next_values"], r["terminated"], r["truncated"], gamma, lam
    )
    torch.testing.assert_close(td, forward, rtol=1e-9, atol=1e-9)


@PROPERTY
@given(rollouts(), unit, unit)
def test_gae_equals_its_plain_loop_twin(r, gamma, lam):
    loop = reference_gae_advantages(
        r["rewards"], r["values"], r["next_values"], r["terminated"], r["truncated"], gamma, lam
    )
    torch.testing.assert_close(_gae(r, gamma, lam), loop, rtol=1e-10, atol=1e-10)


@PROPERTY
@given(rollouts(bound=100.0), unit, unit)
def test_float32_agrees_with_float64(r, gamma, lam):
    r32 = {k: v.float() if v.is_floating_point() else v for k, v in r.items()}
    scale = r["rewards"].shape[0] * 100.0  # |returns| <= T * max |r| (+ a value)
    for fn in (gae_advantages, td_lambda_returns):
        out32 = _gae(r32, gamma, lam, fn)
        assert out32.dtype == torch.float32
        torch.testing.assert_close(out32.double(), _gae(r, gamma, lam, fn), rtol=1e-5, atol=1e-6 * scale)
    ret32 = discounted_returns(r32["rewards"], r32["terminated"], r32["truncated"], r32["next_values"], gamma=gamma)
    ret64 = discounted_returns(r["rewards"], r["terminated"], r["truncated"], r["next_values"], gamma=gamma)
    torch.testing.assert_close(ret32.double(), ret64, rtol=1e-5, atol=1e-6 * scale)


@PROPERTY
@given(rollouts(max_t=30, bound=1e6), unit, unit, st.sampled_from([torch.float16, torch.float32, F64]))
def test_finite_input_gives_finite_output(r, gamma, lam, dtype):
    """No NaN or inf from finite input whose returns are representable (|r| <= 1e6, T <= 30; float16: scaled)."""
    if dtype == torch.float16:  # returns must fit in float16 (max 65504)
        r = {k: v / 1e6 if v.is_floating_point() else v for k, v in r.items()}
    r = {k: v.to(dtype) if v.is_floating_point() else v for k, v in r.items()}
    outputs = [
        _gae(r, gamma, lam),
        _gae(r, gamma, lam, td_lambda_returns),
        discounted_returns(r["rewards"], r["terminated"], r["truncated"], r["next_values"], gamma=gamma),
        normalize_advantages(r["rewards"]),
    ]
    for out in outputs:
        assert out.dtype == dtype
        assert bool(torch.isfinite(out).all())


@PROPERTY
@given(rollouts(max_t=15, max_n=1, min_t=2), unit, unit, st.data())
def test_an_episode_does_not_depend_on_later_ones_even_when_they_overflow(r, gamma, lam, data):
    """Rows up to an episode end are unchanged when everything after it is replaced, by values up to float32's
    maximum (a later return of inf once gave NaN in earlier episodes through ``0 * inf``)."""
    t_len = r["rewards"].shape[0]
    end = data.draw(st.integers(0, t_len - 2), label="episode end")
    r32 = {k: v.float() if v.is_floating_point() else v.clone() for k, v in r.items()}
    how = "terminated" if data.draw(st.booleans(), label="terminated (else truncated)") else "truncated"
    r32["terminated"][end] = how == "terminated"
    r32["truncated"][end] = how == "truncated"
    biggest = float(torch.finfo(torch.float32).max)
    extreme = st.floats(-biggest, biggest, allow_nan=False, width=32)
    changed = dict(r32)
    for key in ("rewards", "values", "next_values"):
        tail = data.draw(st.lists(extreme, min_size=t_len - end - 1, max_size=t_len - end - 1), label=key)
        changed[key] = torch.cat([r32[key][: end + 1], torch.tensor(tail).reshape(-1, 1)])
    for fn in (gae_advantages, td_lambda_returns):
        assert torch.equal(_gae(changed, gamma, lam, fn)[: end + 1], _gae(r32, gamma, lam, fn)[: end + 1])
    returns = [
        discounted_returns(x["rewards"], x["terminated"], x["truncated"], x["next_values"], gamma=gamma)
        for x in (r32, changed)
    ]
    assert torch.equal(returns[0][: end + 1], returns[1][: end + 1])


# ------------------------------------------------------------------------------------ normalization
advantages_1d = st.integers(2, 200).flatmap(lambda n: arrays(np.float64, n, elements=_floats(1e3)))


@PROPERTY
@given(advantages_1d)
def test_normalized_advantages_have_mean_zero_and_std_one(values):
    adv = torch.from_numpy(values)
    spread = float(adv.std())
    assume(spread > 1e-3)
    out = normalize_advantages(adv, "batch")
    torch.testing.assert_close(out.mean(), torch.tensor(0.0, dtype=F64), rtol=0, atol=1e-9)
    torch.testing.assert_close(out.std(), torch.tensor(spread / (spread + 1e-8), dtype=F64), rtol=1e-9, atol=0)
    assert abs(float(out.std()) - 1.0) < 1e-5


@PROPERTY
@given(advantages_1d, st.integers(1, 5), st.randoms(use_true_random=False))
def test_minibatch_normalization_has_the_moments_per_minibatch(values, n_minibatches, rng):
    adv = torch.from_numpy(values)
    order = list(range(adv.numel()))
    rng.shuffle(order)
    # SB3's minibatches are never empty: with fewer samples than minibatches, some minibatches drop out
    groups = [torch.tensor(order[i::n_minibatches], dtype=torch.long) for i in range(min(n_minibatches, len(order)))]
    out = normalize_advantages(adv, "minibatch", minibatch_indices=groups)
    for group in groups:
        spread = float(adv[group].std()) if group.numel() > 1 else 0.0
        if group.numel() == 1:
            assert torch.equal(out[group], adv[group])  # a one-element minibatch is left alone
        elif spread > 1e-3:
            assert abs(float(out[group].mean())) < 1e-9
            assert abs(float(out[group].std()) - 1.0) < 1e-5


@PROPERTY
@given(advantages_1d)
def test_float32_normalization_agrees_with_float64(values):
    adv = torch.from_numpy(values)
    assume(float(adv.std()) > 1e-2)
    out32 = normalize_advantages(adv.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), normalize_advantages(adv), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ masks
masked_batches = st.integers(1, 50).flatmap(
    lambda n: st.tuples(
        arrays(np.float64, n, elements=_floats(1e3)),  # values
        arrays(np.float64, n, elements=_floats(1e3)),  # what masked-out entries are replaced by
        arrays(np.float64, n, elements=st.floats(0.0, 10.0)),  # squared score norms
        arrays(np.bool_, n),  # mask
    )
)


@PROPERTY
@given(masked_batches)
def test_masked_out_entries_do_not_affect_the_result(batch):
    values, noise, weights, mask = (torch.from_numpy(a) for a in batch)
    assume(bool(mask.any()))
    replaced = torch.where(mask, values, noise)
    assert torch.equal(batch_mean_baseline(replaced, mask), batch_mean_baseline(values, mask))
    assert torch.equal(batch_mean_baseline(values, mask), batch_mean_baseline(values[mask]))
    assert torch.equal(
        optimal_constant_baseline(replaced, weights, mask), optimal_constant_baseline(values, weights, mask)
    )
    out = normalize_advantages(replaced, "batch", mask=mask)
    assert torch.equal(out[mask], normalize_advantages(values, "batch", mask=mask)[mask])
    assert torch.equal(out[~mask], replaced[~mask])  # padding is returned unchanged
    assert torch.equal(out[mask], normalize_advantages(values[mask], "batch"))
    signal = qprop_normalize(replaced, 1.0, "consistent", mask=mask)
    reference = qprop_normalize(values, 1.0, "consistent", mask=mask)
    assert torch.equal(signal.learning_signal[mask], reference.learning_signal[mask])
    assert torch.equal(signal.eta, reference.eta)
    torch.testing.assert_close(
        qprop_correction_surrogate(replaced, 1.0, mask=mask), qprop_correction_surrogate(values[mask], 1.0)
    )
    assert torch.equal(
        qprop_correction_surrogate(replaced, 1.0, mask=mask), qprop_correction_surrogate(values, 1.0, mask=mask)
    )
