"""The estimator layer's input rule (package docstring of ``pgvar.estimators``), applied to every public function.

Numpy arrays are accepted wherever a tensor is (converted with ``torch.as_tensor``); float16 and bfloat16 work
(computed in float32 where precision matters, returned in the input's dtype); anything else is a ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import pgvar.estimators as E

F64 = torch.float64


def _rollout() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(6, 3, generator=g, dtype=F64)
    values = torch.randn(6, 3, generator=g, dtype=F64)
    next_values = torch.randn(6, 3, generator=g, dtype=F64)
    terminated = torch.zeros(6, 3, dtype=torch.bool)
    terminated[2, 0] = terminated[5, 1] = True
    truncated = torch.zeros(6, 3, dtype=torch.bool)
    truncated[3, 2] = True
    return dict(rewards=rewards, values=values, next_values=next_values, terminated=terminated, truncated=truncated)


def _cases() -> dict[str, tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]:
    """name -> (function, float64 positional args, keyword args); every tensor argument is a float64/int/bool tensor."""
    r = _rollout()
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(8, generator=g, dtype=F64)
    bar = torch.randn(8, generator=g, dtype=F64)
    q = torch.randn(4, 3, generator=g, dtype=F64)
    log_pi = torch.log_softmax(torch.randn(4, 3, generator=g, dtype=F64), -1)
    actions = torch.tensor([0, 2, 1, 2])
    mask = torch.tensor([True, True, False, True])
    grad_q, acts, means = (torch.randn(8, 2, generator=g, dtype=F64) for _ in range(3))
    kls = torch.rand(6, 3, generator=g, dtype=F64)
    gae_kw = dict(gamma=0.9, gae_lambda=0.8)
    steps = torch.arange(6).unsqueeze(1).expand(6, 3)
    ref_pi = torch.log_softmax(torch.randn(4, 3, generator=g, dtype=F64), -1)
    sampled, ref_sampled = log_pi[:, 0], ref_pi[:, 0]  # log-probabilities of one sampled action per state
    logits_pi, logits_ref = torch.randn(6, 3, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    return {
        "discounted_returns": (
            E.discounted_returns, (r["rewards"], r["terminated"], r["truncated"], r["next_values"]), dict(gamma=0.9)
        ),
        "gae_advantages": (
            E.gae_advantages,
            (r["rewards"], r["values"], r["next_values"], r["terminated"], r["truncated"]),
            gae_kw,
        ),
        "td_lambda_returns": (
            E.td_lambda_returns,
            (r["rewards"], r["values"], r["next_values"], r["terminated"], r["truncated"]),
            gae_kw,
        ),
        "normalize_advantages": (E.normalize_advantages, (adv,), dict(mask=torch.arange(8) < 6)),
        "batch_mean_baseline": (E.batch_mean_baseline, (adv, torch.arange(8) < 5), {}),
        "constant_baseline": (E.constant_baseline, ("optimal", adv), dict(score_sq_norms=bar.abs())),
        "optimal_constant_baseline": (E.optimal_constant_baseline, (adv, bar.abs()), {}),
        "qprop_control_variate": (E.qprop_control_variate, (grad_q, acts, means), {}),
        "qprop_action_variance": (E.qprop_action_variance, (grad_q, means.abs()), {}),
        "qprop_eta": (E.qprop_eta, (adv, bar, "conservative", "batch"), {}),
        "qprop_learning_signal": (E.qprop_learning_signal, (adv, bar, 0.5), {}),
        "qprop_correction_surrogate": (E.qprop_correction_surrogate, (adv, 1.0), {}),
        "qprop_normalize": (E.qprop_normalize, (adv, 1.0), {}),
        "all_action_control_variate": (
            E.all_action_control_variate, (q, log_pi.exp(), actions, adv[:4]), dict(mask=mask)
        ),
        "soft_value": (E.soft_value, (q,), dict(tau=0.5)),
        "boltzmann_log_probs": (E.boltzmann_log_probs, (q,), dict(tau=0.5, ref_log_probs=log_pi[0])),
        "kl_to_reference": (E.kl_to_reference, (log_pi,), {}),
        "kl_regularized_n_step_advantages": (
            E.kl_regularized_n_step_advantages,
            (r["rewards"], kls, r["values"], r["next_values"], r["terminated"], r["truncated"]),
            dict(gamma=0.9, tau=0.5, n_step=2),
        ),
        "soft_q_targets": (E.soft_q_targets, (adv[:4], adv[4:], bar[:4]), dict(tau=0.5)),
        "entropy_regularized_pg_loss": (
            E.entropy_regularized_pg_loss, (log_pi, adv[:4], actions, bar[:4]), dict(tau=0.5, mask=mask)
        ),
        "soft_q_loss": (E.soft_q_loss, (q, actions, adv[:4]), dict(mask=mask)),
        "horizon_aware_values": (
            E.horizon_aware_values, (r["values"], r["next_values"].abs(), steps), dict(horizon=8, gamma=0.9)
        ),
        "horizon_aware_value_targets": (
            E.horizon_aware_value_targets,
            (r["rewards"], r["terminated"], r["truncated"], steps),
            dict(horizon=8, gamma=0.9, next_values=r["next_values"]),
        ),
        "horizon_aware_value_loss": (
            E.horizon_aware_value_loss, (r["values"], r["next_values"], r["rewards"], steps), dict(horizon=8, gamma=0.9)
        ),
        "factorized_action_baseline": (
            E.factorized_action_baseline, (-acts.abs(), adv, bar.unsqueeze(-1).expand(8, 2)), {}
        ),
        "other_action_dimensions": (E.other_action_dimensions, (acts,), {}),
        "kl_sample_estimate": (E.kl_sample_estimate, (sampled, ref_sampled), dict(estimator="k3")),
        "chi2_sample_estimate": (E.chi2_sample_estimate, (sampled, ref_sampled), {}),
        "odds_ratio_cap_penalty": (E.odds_ratio_cap_penalty, (sampled, ref_sampled), dict(cap=1.2)),
        "categorical_divergence": (E.categorical_divergence, (log_pi, ref_pi[0]), dict(divergence="chi2")),
        "diagonal_gaussian_divergence": (
            E.diagonal_gaussian_divergence, (means, 0.2 * bar[:2], acts, 0.2 * adv[:2]), dict(divergence="kl")
        ),
        "capped_log_probs": (E.capped_log_probs, (q, ref_pi[0]), dict(cap=1.5)),
        "discriminator_logistic_loss": (E.discriminator_logistic_loss, (logits_pi, logits_ref), {}),
        "occupancy_penalty_rewards": (
            E.occupancy_penalty_rewards,
            (0.3 * logits_pi, "sqrt_chi2", 0.5),
            dict(mask=torch.arange(18).reshape(6, 3) % 4 != 0),
        ),
        "occupancy_divergence_estimate": (
            E.occupancy_divergence_estimate,
            (0.3 * logits_pi, "chi2"),
            dict(mask=torch.arange(18).reshape(6, 3) % 4 != 0),
        ),
        # integer / boolean inputs only: covered by the numpy test, not the 16-bit one
        "time_to_go_factor": (E.time_to_go_factor, (steps,), dict(horizon=8, gamma=0.9)),
        "horizon_episode_flags": (E.horizon_episode_flags, (r["terminated"], r["truncated"], steps), dict(horizon=8)),
    }


#: functions whose tensor arguments are all integer or boolean: no 16-bit float version to test
NO_FLOAT_INPUT = {"time_to_go_factor", "horizon_episode_flags"}


CASES = _cases()


def _map(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_map(v, fn) for v in value)
    return value


def _tensors(result: Any) -> list[torch.Tensor]:
    return [result] if isinstance(result, torch.Tensor) else list(result)


def test_every_public_estimator_function_is_covered():
    functions = {name for name in E.__all__ if callable(getattr(E, name)) and name[0].islower()}
    assert functions == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_numpy_arrays_are_accepted_and_give_the_tensor_result(name):
    fn, args, kwargs = CASES[name]
    expected = _tensors(fn(*args, **kwargs))
    got = _tensors(fn(*_map(args, lambda t: t.numpy()), **_map(kwargs, lambda t: t.numpy())))
    for a, b in zip(got, expected):
        assert isinstance(a, torch.Tensor)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_16_bit_floats_give_finite_results_in_their_own_dtype(name, dtype):
    if name in NO_FLOAT_INPUT:
        pytest.skip(f"{name} takes integer / boolean tensors only")
    fn, args, kwargs = CASES[name]

    def low(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        if t.dim() >= 1 and t.shape[-1] == 3 and bool((torch.logsumexp(t, -1).abs() < 1e-9).all()):
            return torch.log_softmax(t.to(dtype), -1)  # log-probabilities: renormalized after rounding
        return t.to(dtype)

    expected = _tensors(fn(*args, **kwargs))
    got = _tensors(fn(*_map(args, low), **_map(kwargs, low)))
    tol = 0.1 if dtype == torch.bfloat16 else 0.02
    for a, b in zip(got, expected):
        assert a.dtype == dtype
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "call",
    [
        lambda: E.batch_mean_baseline([1.0, 2.0]),
        lambda: E.normalize_advantages([1.0, 2.0]),
        lambda: E.discounted_returns([[1.0]], torch.zeros(1, 1), gamma=0.9),
        lambda: E.kl_to_reference([[0.0]]),
        lambda: E.qprop_learning_signal((1.0,), torch.ones(1), 1.0),
    ],
)
def test_other_types_raise_value_error_naming_torch_and_numpy(call):
    with pytest.raises(ValueError, match="must be a torch.Tensor or a numpy array"):
        call()


def test_a_numpy_rollout_gives_a_tensor_of_its_dtype():
    rewards = np.ones((4, 2), dtype=np.float32)
    out = E.discounted_returns(rewards, np.zeros((4, 2), dtype=bool), gamma=0.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[:, 0], torch.tensor([1.875, 1.75, 1.5, 1.0]))
