r"""A tabular MDP with a proxy reward, a true reward and a reference policy: exact occupancy measures, exact
divergences to the reference, and the exact regularized optima. The base of
:class:`~pgvar.problems.GoodhartBandit` and :class:`~pgvar.problems.RewardHackingMDP`.

The learner sees the **proxy** reward :math:`\tilde r` (the environment's reward); the **true** reward :math:`r`
is reported in ``info["true_reward"]`` and by :meth:`ReferenceRegularizedMDP.exact_true_return`. Every episode ends
with the same probability :math:`\beta` at every step, so the discounted visitation
:math:`d^\top = \rho_0^\top (I - \gamma P_\pi)^{-1}` has the policy-independent total
:math:`H = \sum_s d(s) = 1 / (1 - \gamma (1 - \beta))` (the *effective horizon*), and the normalized occupancy
measures are

.. math::  \mu_\pi(s) = d(s) / H, \qquad \mu_\pi(s, a) = \mu_\pi(s)\, \pi(a|s), \qquad
           J(\pi) = H\, \mathbb{E}_{(s, a) \sim \mu_\pi}[\tilde r(s, a)].

The regularized objective, per step like a reward penalty, is

.. math::  J_\lambda(\pi) = J(\pi) - \lambda H\, D(\pi), \qquad
           D \in \Big\{ \mathbb{E}_{s \sim \mu_\pi} D\big(\pi(\cdot|s) \,\|\, \pi_{\text{ref}}(\cdot|s)\big)
           \ (\text{``action''}),\ D(\mu_\pi(s) \| \mu_{\text{ref}}(s))\ (\text{``state''}),\
           D(\mu_\pi(s, a) \| \mu_{\text{ref}}(s, a))\ (\text{``state\_action''}) \Big\}

with :math:`D` one of :data:`pgvar.estimators.DIVERGENCES`. For ``"action"`` and the KL this is exactly the
KL-regularized return :math:`\mathbb{E}\sum_t \gamma^t (\tilde r_t - \lambda \mathrm{KL}_t)` of the soft-Q
module. Optionally the policy is the odds-ratio-capped softmax :func:`pgvar.estimators.capped_log_probs`, so
:math:`\pi \le c\, \pi_{\text{ref}}` holds for every parameter value.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from pgvar._validation import check_cap, check_choice, check_nonnegative
from pgvar.estimators import (
    DIVERGENCES,
    capped_log_probs,
    categorical_divergence,
)
from pgvar.estimators import soft_value as _soft_value
from pgvar.problems.base import Params
from pgvar.problems.tabular import TabularMDP

__all__ = ["MEASURES", "ReferenceRegularizedMDP"]

_DTYPE = torch.float64

MEASURES = ("action", "state", "state_action")
"""Where a divergence to the reference is measured: per-state action distributions (averaged over
:math:`\\mu_\\pi(s)`), state occupancy, or state-action occupancy."""


def _as_table(name: str, value: Any, shape: tuple[int, ...]) -> torch.Tensor:
    table = torch.as_tensor(np.asarray(value, dtype=np.float64), dtype=_DTYPE)
    if tuple(table.shape) != shape or not bool(torch.isfinite(table).all()):
        raise ValueError(f"{name} must be a finite array of shape {shape}, got shape {tuple(table.shape)}")
    return table


def _check_distribution(name: str, probs: torch.Tensor, positive: bool) -> None:
    low_ok = bool((probs > 0).all()) if positive else bool((probs >= 0).all())
    if not low_ok or not bool(((probs.sum(-1) - 1).abs() < 1e-9).all()):
        need = "> 0" if positive else ">= 0"
        raise ValueError(
            f"{name} must hold probabilities {need} summing to 1 over the last axis, got {probs}"
        )


class ReferenceRegularizedMDP(TabularMDP):
    r"""A finite MDP with proxy and true rewards and a reference policy; everything exact (a ``gymnasium.Env``).

    A :class:`~pgvar.problems.TabularMDP` with given tables instead of random ones and one termination
    probability :math:`\beta` for every step (see the module docstring for the occupancy measures and the
    regularized objective). ``params = {"logits": [S, A]}`` as for the tabular MDP; every method that takes
    ``params`` also takes the logits tensor itself, and ``cap=c`` evaluates the capped policy
    ``capped_log_probs(logits, log pi_ref, c)`` instead of the softmax.

    :param transition_probs: ``[S, A, S]`` rows :math:`P(\cdot|s, a)` (each sums to 1)
    :param proxy_reward: ``[S, A]`` the reward the learner sees
    :param true_reward: ``[S, A]`` the reward it should get
    :param reference_probs: ``[S, A]`` :math:`\pi_{\text{ref}}(a|s) > 0` (full support: every divergence finite)
    :param initial_state_probs: ``[S]`` :math:`\rho_0`
    :param gamma: discount in ``[0, 1]``
    :param termination_prob: :math:`\beta \in (0, 1]`, the same at every step
    :param max_episode_steps: time limit (``None``: :math:`(1 - \beta)^{T} \le 10^{-10}`)
    """

    def __init__(
        self,
        transition_probs: Any,
        proxy_reward: Any,
        true_reward: Any,
        reference_probs: Any,
        initial_state_probs: Any,
        gamma: float = 0.95,
        termination_prob: float = 0.05,
        max_episode_steps: int | None = None,
    ) -> None:
        proxy = torch.as_tensor(np.asarray(proxy_reward, dtype=np.float64), dtype=_DTYPE)
        if proxy.dim() != 2:
            raise ValueError(f"proxy_reward must have shape [S, A], got shape {tuple(proxy.shape)}")
        n_states, n_actions = (int(n) for n in proxy.shape)
        super().__init__(
            n_states=n_states,
            n_actions=n_actions,
            gamma=gamma,
            termination_prob=termination_prob,
            max_episode_steps=max_episode_steps,
        )
        S, A = n_states, n_actions
        transitions = _as_table("transition_probs", transition_probs, (S, A, S))
        _check_distribution("transition_probs", transitions, positive=False)
        initial = _as_table("initial_state_probs", initial_state_probs, (S,))
        _check_distribution("initial_state_probs", initial, positive=False)
        self.reference_probs = _as_table("reference_probs", reference_probs, (S, A))
        _check_distribution("reference_probs", self.reference_probs, positive=True)
        self.reference_log_probs = self.reference_probs.log()
        self.true_reward_table = _as_table("true_reward", true_reward, (S, A))
        # The tables TabularMDP drew at random are replaced, with the caches its sampling and step() use.
        self.transition_probs = transitions
        self.reward_table = _as_table("proxy_reward", proxy, (S, A))
        self.termination_probs = torch.full((S, A), self.termination_prob, dtype=_DTYPE)
        self.initial_state_probs = initial
        self._transition_cdf = transitions.cumsum(-1)
        self._initial_cdf = initial.cumsum(-1)
        self._np_transition_cdf = self._transition_cdf.numpy()
        self._np_initial_cdf = self._initial_cdf.numpy()
        self._np_rewards = self.reward_table.numpy()
        self._np_termination = self.termination_probs.numpy()
        self._np_true_rewards = self.true_reward_table.numpy()
        self.effective_horizon = 1.0 / (1.0 - self.gamma * (1.0 - self.termination_prob))
        """:math:`H = \\sum_t \\gamma^t (1 - \\beta)^t`, the total discounted visitation of every policy."""

    # ------------------------------------------------------------------ policies
    def policy_log_probs(self, params: Params | torch.Tensor, cap: float | None = None) -> torch.Tensor:
        r""":math:`\log \pi(a|s)`, ``[S, A]``: the softmax of the logits, or its odds-ratio-capped projection.

        :param params: ``{"logits": [S, A]}`` or the logits tensor
        :param cap: ``None`` (softmax) or :math:`c \ge 1` (:func:`pgvar.estimators.capped_log_probs`)
        """
        logits = self._logits(params)
        if cap is None:
            return torch.log_softmax(logits, dim=-1)
        return capped_log_probs(logits, self.reference_log_probs, cap)

    # ------------------------------------------------------------------ occupancy measures and returns
    def exact_state_occupancy(self, params: Params | torch.Tensor, cap: float | None = None) -> torch.Tensor:
        r""":math:`\mu_\pi(s) = d(s) / H`, ``[S]``, sums to 1; differentiable in the logits."""
        return self.exact_discounted_visitation(self.policy_log_probs(params, cap)) / self.effective_horizon

    def exact_state_action_occupancy(
        self, params: Params | torch.Tensor, cap: float | None = None
    ) -> torch.Tensor:
        r""":math:`\mu_\pi(s, a) = \mu_\pi(s)\, \pi(a|s)`, ``[S, A]``, sums to 1; differentiable in the logits."""
        log_probs = self.policy_log_probs(params, cap)
        return self.exact_discounted_visitation(log_probs)[:, None] * log_probs.exp() / self.effective_horizon

    def reference_state_occupancy(self) -> torch.Tensor:
        r""":math:`\mu_{\text{ref}}(s)`, ``[S]``."""
        return self.exact_state_occupancy(self.reference_log_probs)

    def reference_state_action_occupancy(self) -> torch.Tensor:
        r""":math:`\mu_{\text{ref}}(s, a)`, ``[S, A]``."""
        return self.exact_state_action_occupancy(self.reference_log_probs)

    def exact_proxy_return(self, params: Params | torch.Tensor, cap: float | None = None) -> torch.Tensor:
        r""":math:`J(\pi) = H\, \mathbb{E}_{\mu_\pi}[\tilde r]`, the return the learner optimizes (= :meth:`exact_return`)."""
        return (
            self.effective_horizon
            * (self.exact_state_action_occupancy(params, cap) * self.reward_table).sum()
        )

    def exact_true_return(self, params: Params | torch.Tensor, cap: float | None = None) -> torch.Tensor:
        r""":math:`J_{\text{true}}(\pi) = H\, \mathbb{E}_{\mu_\pi}[r]`, the return under the true reward."""
        occupancy = self.exact_state_action_occupancy(params, cap)
        return self.effective_horizon * (occupancy * self.true_reward_table).sum()

    # ------------------------------------------------------------------ divergences
    def exact_divergence(
        self,
        params: Params | torch.Tensor,
        divergence: str = "kl",
        measure: str = "action",
        cap: float | None = None,
    ) -> torch.Tensor:
        r"""The exact divergence :math:`D(\pi)` to the reference (a scalar, differentiable in the logits).

        - ``measure="action"``: :math:`\sum_s \mu_\pi(s)\, D(\pi(\cdot|s) \,\|\, \pi_{\text{ref}}(\cdot|s))`
          (what an action-distribution penalty accumulates, per step);
        - ``"state"``: :math:`D(\mu_\pi(s) \,\|\, \mu_{\text{ref}}(s))`;
        - ``"state_action"``: :math:`D(\mu_\pi(s, a) \,\|\, \mu_{\text{ref}}(s, a))`.

        States the reference never visits would make the occupancy KL infinite; the problems here give the reference
        full support.

        :param params: ``{"logits": [S, A]}`` or the logits tensor
        :param divergence: one of :data:`pgvar.estimators.DIVERGENCES`
        :param measure: one of :data:`MEASURES`
        :param cap: evaluate the capped policy (see :meth:`policy_log_probs`)
        """
        check_choice("divergence", divergence, DIVERGENCES)
        check_choice("measure", measure, MEASURES)
        log_probs = self.policy_log_probs(params, cap)
        if measure == "action":
            per_state = categorical_divergence(log_probs, self.reference_log_probs, divergence)
            return (self.exact_state_occupancy(log_probs) * per_state).sum()
        if measure == "state":
            mu, mu_ref = self.exact_state_occupancy(log_probs), self.reference_state_occupancy()
        else:
            mu = self.exact_state_action_occupancy(log_probs).reshape(-1)
            mu_ref = self.reference_state_action_occupancy().reshape(-1)
        return categorical_divergence(mu.log(), mu_ref.log(), divergence)

    def exact_regularized_objective(
        self,
        params: Params | torch.Tensor,
        coef: float = 0.0,
        divergence: str = "kl",
        measure: str = "action",
        cap: float | None = None,
    ) -> torch.Tensor:
        r""":math:`J_\lambda = J(\pi) - \lambda H D(\pi)` (proxy reward), a scalar differentiable in the logits.

        :param params: ``{"logits": [S, A]}`` or the logits tensor
        :param coef: :math:`\lambda \ge 0`
        :param divergence: one of :data:`pgvar.estimators.DIVERGENCES`
        :param measure: one of :data:`MEASURES`
        :param cap: ``None`` or :math:`c \ge 1`: the policy is the capped softmax
        """
        coef = check_nonnegative("coef", coef)
        objective = self.exact_proxy_return(params, cap)
        if coef == 0.0:
            return objective
        return objective - coef * self.effective_horizon * self.exact_divergence(
            params, divergence, measure, cap
        )

    def exact_regularized_gradient(
        self,
        params: Params | torch.Tensor,
        coef: float = 0.0,
        divergence: str = "kl",
        measure: str = "action",
        cap: float | None = None,
    ) -> Params:
        r""":math:`\nabla_{\text{logits}} J_\lambda`: autograd of :meth:`exact_regularized_objective` (float64, detached)."""
        logits = self._logits(params).detach().clone().requires_grad_(True)
        objective = self.exact_regularized_objective(logits, coef, divergence, measure, cap)
        (grad,) = torch.autograd.grad(objective, logits)
        return {"logits": grad}

    def exact_policy_gradient_for_rewards(
        self, params: Params | torch.Tensor, rewards: torch.Tensor
    ) -> Params:
        r"""The policy-gradient theorem with a given reward table held fixed, as GAE treats a reward penalty.

        .. math::  g(s, a) = d(s)\, \pi(a|s)\, \big(Q'(s, a) - V'(s)\big), \qquad
                   V' = (I - \gamma P_\pi)^{-1} \textstyle\sum_a \pi(a|\cdot) r'(\cdot, a)

        (Sutton et al. 2000, Theorem 1). With :math:`r' = \tilde r + ` a penalty that depends on :math:`\pi` (a
        k3 KL estimate, a discriminator's reward) this is *not* the gradient of the penalized objective in general;
        comparing the two shows which penalties are gradient-consistent (``docs/guide/regularization.md``).

        :param params: ``{"logits": [S, A]}`` or the logits tensor (softmax policy)
        :param rewards: ``[S, A]`` the reward table :math:`r'` (detached)
        :return: ``{"logits": [S, A]}``
        """
        with torch.no_grad():
            rewards = torch.as_tensor(rewards, dtype=_DTYPE)
            probs = self.policy_probs(params)
            eye = torch.eye(self.n_states, dtype=_DTYPE)
            values = torch.linalg.solve(
                eye - self.gamma * self._continuation_matrix(probs), (probs * rewards).sum(-1)
            )
            q_values = rewards + self.gamma * (1.0 - self.termination_probs) * (
                self.transition_probs @ values
            )
            visitation = self.exact_discounted_visitation(params)
            return {"logits": visitation[:, None] * probs * (q_values - values[:, None])}

    # ------------------------------------------------------------------ exact optima
    def _value_iteration(self, state_value: Any, tol: float = 1e-13) -> torch.Tensor:
        """Iterate ``V <- state_value(Q(V))`` (contraction gamma (1 - beta) < 1) to the fixed point; return Q."""
        contraction = self.gamma * (1.0 - self.termination_prob)
        n_iter = 1 if contraction == 0.0 else int(math.ceil(math.log(tol) / math.log(contraction))) + 1
        values = torch.zeros(self.n_states, dtype=_DTYPE)
        continuation = self.gamma * (1.0 - self.termination_probs)
        for _ in range(n_iter):
            q_values = self.reward_table + continuation * (self.transition_probs @ values)
            values = state_value(q_values)
        return self.reward_table + continuation * (self.transition_probs @ values)

    def kl_regularized_optimum(self, coef: float) -> torch.Tensor:
        r"""The exact maximizer of :math:`J_\lambda` with the action KL: :math:`\pi^*(a|s) \propto \pi_{\text{ref}}(a|s)
        e^{Q^*(s, a) / \lambda}`, ``[S, A]`` log-probabilities.

        :math:`Q^*` is the soft Q-function, by soft value iteration
        :math:`V(s) = \lambda \log \mathbb{E}_{\pi_{\text{ref}}}[e^{Q(s, \cdot)/\lambda}]` (Schulman, Chen, Abbeel 2017,
        arXiv:1704.06440; :func:`pgvar.estimators.soft_value`); for a bandit :math:`Q^* = \tilde r`.

        :param coef: :math:`\lambda > 0`
        """
        coef = check_nonnegative("coef", coef)
        if coef == 0.0:
            raise ValueError(
                "coef must be > 0 for the KL-regularized optimum (coef = 0 is the unregularized MDP)"
            )
        ref = self.reference_log_probs
        q_values = self._value_iteration(lambda q: _soft_value(q, coef, ref))
        return torch.log_softmax(ref + q_values / coef, dim=-1)

    def cap_optimum(self, cap: float) -> torch.Tensor:
        r"""The exact maximizer of :math:`J` subject to :math:`\pi(\cdot|s) \le c\, \pi_{\text{ref}}(\cdot|s)` in every
        state: the quantilizer of :math:`Q^*`, ``[S, A]`` probabilities.

        The constraint is a box per state, so Bellman optimality holds with the per-state maximum over the box:
        fill :math:`c\, \pi_{\text{ref}}(a|s)` on the actions in decreasing order of :math:`Q^*(s, a)` until the mass
        is 1 (Kwa et al. 2024, arXiv:2407.14503; for a bandit the quantilizer of the proxy reward). Ties are broken
        by action index.

        :param cap: :math:`c \ge 1`
        """
        cap = check_cap("cap", cap)
        q_values = self._value_iteration(lambda q: (self._quantilize(q, cap) * q).sum(-1))
        return self._quantilize(q_values, cap)

    def _quantilize(self, scores: torch.Tensor, cap: float) -> torch.Tensor:
        """Per row, mass cap * pi_ref on the best-scoring actions until the row's mass is 1."""
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
        budget = (cap * self.reference_probs).gather(-1, order)
        before = torch.cumsum(budget, -1) - budget
        mass = torch.minimum(budget, (1.0 - before).clamp_min(0.0))
        mass = torch.where(mass > 1e-12, mass, torch.zeros_like(mass))  # rounding leftovers of the cumsum
        mass = mass / mass.sum(-1, keepdim=True)
        return torch.zeros_like(mass).scatter(-1, order, mass)

    # ------------------------------------------------------------------ gymnasium API
    def step(self, action: Any) -> tuple[int, float, bool, bool, dict[str, Any]]:
        """:meth:`TabularMDP.step` paying the proxy reward, with ``info["true_reward"]``."""
        state = self._state
        next_state, reward, terminated, truncated, info = super().step(action)
        info["true_reward"] = float(self._np_true_rewards[state, int(action)])
        return next_state, reward, terminated, truncated, info
