"""The Mirage decomposition of policy-gradient variance into trajectory, action and state terms.

Tucker et al. 2018, "The Mirage of Action-Dependent Baselines in Reinforcement Learning" (arXiv:1802.10031),
Sec. 3, and their ``calc_variance.py`` (brain-research/mirage-rl-trpo). For the single-sample estimator with a
baseline :math:`b(s, a)` (state-only or action-dependent, with its analytic correction),

.. math::

    \\hat g = (\\hat A(s, a, \\tau) - b(s, a))\\, g + \\nabla_\\theta \\mathbb{E}_{a \\sim \\pi}[b(s, a)],
    \\qquad g = \\nabla_\\theta \\log \\pi(a \\mid s),

the law of total variance, conditioning first on :math:`(s, a)` and then on :math:`s`, splits
:math:`\\operatorname{tr}\\operatorname{Cov}(\\hat g) = \\Sigma_\\tau + \\Sigma_a + \\Sigma_s`:

.. math::

    \\Sigma_\\tau = \\mathbb{E}_{s,a}\\big[\\operatorname{Var}_{\\tau \\mid s,a}(\\hat A\\, g)\\big],\\quad
    \\Sigma_a^b = \\mathbb{E}_s\\big[\\operatorname{Var}_{a \\mid s}\\big((Q(s,a) - b(s,a))\\, g\\big)\\big],\\quad
    \\Sigma_s = \\operatorname{Var}_s\\big(\\mathbb{E}_{a \\mid s}[Q(s, a)\\, g]\\big).

Only :math:`\\Sigma_a` depends on the baseline: that term is all an action-dependent baseline can remove beyond
a state baseline. Each term is estimated from *nested rollouts* at sampled states (the simulator state restored,
independent continuations): two returns :math:`R_1, R_2` after the same :math:`(s, a)`, one return :math:`R'`
after a fresh action :math:`a' \\sim \\pi(\\cdot \\mid s)` with score :math:`g'`, and the baseline's values.
Per state, with :math:`b_1, b_2` the baseline at :math:`a` (two independent draws for a Monte Carlo baseline,
the same number otherwise) and :math:`b_3` at :math:`a'`,

.. math::

    \\Sigma_\\tau &\\approx \\tfrac12 (R_1 - R_2)^2 \\lVert g \\rVert^2, \\\\
    \\Sigma_a^b &\\approx (R_1 - b_1)(R_2 - b_2) \\lVert g \\rVert^2
        - \\tfrac12 \\big[(R_1 - b_1) + (R_2 - b_2)\\big] (R' - b_3)\\, g^\\top g', \\\\
    \\Sigma_s + \\lVert \\nabla J \\rVert^2 &\\approx \\tfrac12 \\big[(R_1 - b_1) + (R_2 - b_2)\\big] (R' - b_3)\\,
        g^\\top g' \\quad (b \\text{ state-only}),

each unbiased because the factors of every product are independent given :math:`s` (or :math:`s, a`). The paper's
code computes the same products (its ``term_1 - term_2``, ``term_2_b - term_3``, ``term_3``). Traces are summed
over parameter coordinates (the paper's code averages them: divide by the number of parameters to compare).
Estimates are means over states, with standard errors from their spread; differences can come out negative.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from pgvar._validation import check_choice, check_float_tensor, check_same_shape

__all__ = ["VarianceDecomposition", "variance_decomposition"]


@dataclass(frozen=True)
class VarianceDecomposition:
    """Trajectory, action and state variance terms (traces, per sample) with standard errors.

    ``total(name)`` is the estimated :math:`\\operatorname{tr}\\operatorname{Cov}(\\hat g)` of the single-sample
    estimator with baseline ``name``, up to :math:`\\lVert \\nabla J \\rVert^2` (``state_bound`` includes it).
    Divide by the batch size for the variance of a batch mean of independent samples.
    """

    #: number of sampled states the estimates average over
    n_states: int
    #: :math:`\Sigma_\tau`, the variance from the continuation after ``(s, a)``
    trajectory: float
    trajectory_se: float
    #: :math:`\Sigma_a^b` for each baseline (``"none"``: :math:`b = 0`)
    action: dict[str, float] = field(default_factory=dict)
    action_se: dict[str, float] = field(default_factory=dict)
    #: :math:`\Sigma_s + \lVert \nabla J \rVert^2 = \mathbb{E}_s \lVert \mathbb{E}_a[Q g] \rVert^2`, an upper bound on
    #: :math:`\Sigma_s`, estimated with the baseline named ``state_baseline``
    state_bound: float = 0.0
    state_bound_se: float = 0.0
    state_baseline: str = "none"

    def total(self, baseline: str = "none") -> float:
        """:math:`\\Sigma_\\tau + \\Sigma_a^b + (\\Sigma_s + \\lVert \\nabla J \\rVert^2)` for baseline ``baseline``."""
        return self.trajectory + self.action[baseline] + self.state_bound

    def as_dict(self) -> dict[str, object]:
        """Plain numbers, for JSON."""
        return {
            "n_states": self.n_states,
            "trajectory": self.trajectory,
            "trajectory_se": self.trajectory_se,
            "action": dict(self.action),
            "action_se": dict(self.action_se),
            "state_bound": self.state_bound,
            "state_bound_se": self.state_bound_se,
            "state_baseline": self.state_baseline,
        }


def _mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    n = values.numel()
    mean = values.mean()
    se = values.std(unbiased=True) / n**0.5 if n > 1 else torch.tensor(float("nan"))
    return float(mean), float(se)


def variance_decomposition(
    scores: torch.Tensor,
    returns: torch.Tensor,
    fresh_scores: torch.Tensor,
    fresh_returns: torch.Tensor,
    baselines: Mapping[str, torch.Tensor] | None = None,
    state_baseline: str | None = None,
) -> VarianceDecomposition:
    """Estimate :math:`\\Sigma_\\tau`, :math:`\\Sigma_a^b` per baseline and the bound on :math:`\\Sigma_s` from
    nested rollouts at ``S`` sampled states (Tucker et al. 2018, Sec. 3; formulas in the module docstring).

    :param scores: ``[S, P]`` score :math:`g = \\nabla_\\theta \\log \\pi(a_i \\mid s_i)` at the sampled action
    :param returns: ``[S, 2]`` two independent returns after the same ``(s_i, a_i)`` (the first reward included)
    :param fresh_scores: ``[S, P]`` score :math:`g'` at a fresh action :math:`a'_i \\sim \\pi(\\cdot \\mid s_i)`
        drawn independently of :math:`a_i`
    :param fresh_returns: ``[S]`` a return after ``(s_i, a'_i)``, independent of ``returns``
    :param baselines: name to ``[S, 3]`` values: the baseline at ``(s_i, a_i)`` for the first and the second
        return, and at ``(s_i, a'_i)``. A deterministic state baseline may be given as ``[S]`` (used three
        times); a Monte Carlo one needs three independent draws. ``"none"`` (zero) is always included.
    :param state_baseline: the baseline whose products estimate the state bound (a state-only one: its value
        reduces the estimate's noise, not its mean); default the first of ``baselines``, else ``"none"``
    :return: a :class:`VarianceDecomposition`
    """
    scores = check_float_tensor("scores", scores, "[S, P]")
    returns = check_float_tensor("returns", returns, "[S, 2]")
    fresh_scores = check_float_tensor("fresh_scores", fresh_scores, "[S, P]")
    fresh_returns = check_float_tensor("fresh_returns", fresh_returns, "[S]")
    if scores.dim() != 2:
        raise ValueError(f"scores must be [S, P] (sampled states x parameters), got shape {tuple(scores.shape)}")
    n_states = scores.shape[0]
    check_same_shape("fresh_scores", fresh_scores, "scores", scores)
    if returns.shape != (n_states, 2):
        raise ValueError(
            f"returns must be [S, 2] (two independent returns after each sampled (s, a)), S={n_states}, "
            f"got shape {tuple(returns.shape)}"
        )
    if fresh_returns.shape != (n_states,):
        raise ValueError(f"fresh_returns must be [S] with S={n_states}, got shape {tuple(fresh_returns.shape)}")
    named: dict[str, torch.Tensor] = {"none": torch.zeros(n_states, 3, dtype=returns.dtype, device=returns.device)}
    for name, values in (baselines or {}).items():
        if name == "none":
            raise ValueError('baselines must not contain "none": the zero baseline is always included')
        values = check_float_tensor(f"baselines[{name!r}]", values, "[S] or [S, 3]")
        if values.shape == (n_states,):
            values = values[:, None].expand(n_states, 3)
        if values.shape != (n_states, 3):
            raise ValueError(
                f"baselines[{name!r}] must be [S] (a state baseline) or [S, 3] (values for the two returns at a and "
                f"the return at a'), S={n_states}, got shape {tuple(values.shape)}"
            )
        named[name] = values.to(returns.dtype)
    if state_baseline is None:
        state_baseline = next((name for name in named if name != "none"), "none")
    check_choice("state_baseline", state_baseline, sorted(named))

    dtype = torch.float64  # products of returns and squared norms: accumulate in double
    sq_norms = scores.to(dtype).square().sum(dim=1)
    cross = (scores.to(dtype) * fresh_scores.to(dtype)).sum(dim=1)
    r1, r2, r_fresh = returns[:, 0].to(dtype), returns[:, 1].to(dtype), fresh_returns.to(dtype)

    trajectory, trajectory_se = _mean_and_se(0.5 * (r1 - r2).square() * sq_norms)
    action: dict[str, float] = {}
    action_se: dict[str, float] = {}
    state_terms: dict[str, torch.Tensor] = {}
    for name, values in named.items():
        b = values.to(dtype)
        centred_1, centred_2, centred_fresh = r1 - b[:, 0], r2 - b[:, 1], r_fresh - b[:, 2]
        second_moment = centred_1 * centred_2 * sq_norms
        squared_mean = 0.5 * (centred_1 + centred_2) * centred_fresh * cross
        action[name], action_se[name] = _mean_and_se(second_moment - squared_mean)
        state_terms[name] = squared_mean
    state_bound, state_bound_se = _mean_and_se(state_terms[state_baseline])
    return VarianceDecomposition(
        n_states=n_states,
        trajectory=trajectory,
        trajectory_se=trajectory_se,
        action=action,
        action_se=action_se,
        state_bound=state_bound,
        state_bound_se=state_bound_se,
        state_baseline=state_baseline,
    )
