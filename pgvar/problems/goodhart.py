r"""The Goodhart bandit: many arms, a proxy reward = true reward + an error that is light- or heavy-tailed, and a
reference policy; the exact KL-regularized and odds-ratio-capped optima and their true utility.

Kwa, Thomas, Garriga-Alonso (2024), "Catastrophic Goodhart: regularizing RLHF with KL divergence does not
mitigate heavy-tailed reward misspecification" (arXiv:2407.14503): with proxy :math:`\tilde r = r + e`, a light-tailed
error leaves the KL-regularized optimum with a true gain, while a heavy-tailed error lets it reach a high proxy
reward at small KL with (in the limit) no true gain; a quantilizer (an odds-ratio cap) is proposed instead. On a
finite bandit both optima are exact, so the frontier of true utility against KL can be computed, not sampled
(``examples/regularization_frontier.py``; ``docs/guide/regularization.md`` reports what it shows).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from pgvar._validation import check_choice, check_positive
from pgvar.estimators import categorical_divergence
from pgvar.problems.regularized import ReferenceRegularizedMDP

__all__ = ["ERROR_DISTRIBUTIONS", "GoodhartBandit", "GoodhartPoint"]

_DTYPE = torch.float64

ERROR_DISTRIBUTIONS = ("gaussian", "student_t", "pareto")
"""Proxy-error families of :class:`GoodhartBandit`: light-tailed, and two heavy-tailed ones."""

_DEFAULT_TAIL_INDEX = {"student_t": 2.0, "pareto": 1.5}


class GoodhartPoint(NamedTuple):
    """Exact utilities of one policy of a :class:`GoodhartBandit` (float64 scalars)."""

    true_utility: torch.Tensor
    """:math:`\\mathbb{E}_\\pi[r]`."""
    proxy_utility: torch.Tensor
    """:math:`\\mathbb{E}_\\pi[\\tilde r]`."""
    kl: torch.Tensor
    """:math:`\\mathrm{KL}(\\pi \\| \\pi_{\\text{ref}})`."""


class GoodhartBandit(ReferenceRegularizedMDP):
    r"""A ``K``-armed bandit whose proxy reward has a light- or heavy-tailed error (a ``gymnasium.Env``).

    Drawn once from ``seed``: the true rewards :math:`r_k \sim \mathcal{N}(0, 1)` and the errors
    :math:`e_k = \sigma \varepsilon_k` with :math:`\varepsilon_k` standard normal (``"gaussian"``), Student-t with
    ``tail_index`` degrees of freedom (``"student_t"``, default 2: infinite variance) or Lomax/Pareto II with shape
    ``tail_index`` (``"pareto"``, :math:`\Pr(\varepsilon > x) = (1 + x)^{-\alpha}`, default 1.5; nonnegative, not
    centred). The proxy reward :math:`\tilde r = r + e` is the environment's reward; ``info["true_reward"]`` is
    :math:`r`. The reference policy is uniform. One step per episode (``gamma = 1``, observation always 0).

    With a softmax policy :math:`\pi = \operatorname{softmax}(\theta)` (``params = {"logits": [1, K]}``):

    - KL-regularized optimum of :math:`\mathbb{E}_\pi[\tilde r] - \beta\, \mathrm{KL}(\pi \| \pi_{\text{ref}})`:
      :math:`\pi_\beta \propto \pi_{\text{ref}}\, e^{\tilde r / \beta}` (:meth:`kl_optimum`);
    - odds-ratio-capped optimum of :math:`\mathbb{E}_\pi[\tilde r]` s.t. :math:`\pi \le c\, \pi_{\text{ref}}`: the
      quantilizer, mass :math:`c\, \pi_{\text{ref}}` on the arms with the highest proxy reward until the mass is used
      up (:meth:`quantilizer`); its KL is :math:`\log c` when :math:`1/c` arms' worth of mass fills exactly;
    - exact gradient of the KL-regularized objective,
      :math:`\partial / \partial \theta_k = \pi_k (g_k - \mathbb{E}_\pi g)` with
      :math:`g = \tilde r - \beta \log(\pi / \pi_{\text{ref}})`
      (:meth:`~pgvar.problems.ReferenceRegularizedMDP.exact_regularized_gradient`, autograd of the closed form).

    :param n_arms: number of arms ``K`` (> 1)
    :param error: one of :data:`ERROR_DISTRIBUTIONS`
    :param error_scale: :math:`\sigma > 0`
    :param tail_index: degrees of freedom (Student-t) or shape (Pareto) > 0; ignored for ``"gaussian"``
    :param seed: seed of the rewards and errors

    >>> bandit = GoodhartBandit(n_arms=100, error="gaussian", seed=0)
    >>> pi = bandit.kl_optimum(beta=0.5)
    >>> point = bandit.evaluate(pi)
    >>> bool(point.proxy_utility > point.true_utility > 0)
    True
    >>> q = bandit.quantilizer(cap=10.0)  # the best 10 arms by proxy reward, 1/10 each
    >>> int((q > 0).sum()), round(float(bandit.evaluate(q).kl), 4)  # KL = log 10
    (10, 2.3026)
    """

    def __init__(
        self,
        n_arms: int = 1000,
        error: str = "gaussian",
        error_scale: float = 1.0,
        tail_index: float | None = None,
        seed: int = 0,
    ) -> None:
        n_arms = int(check_positive("n_arms", n_arms, integer=True))
        if n_arms < 2:
            raise ValueError(f"n_arms must be an integer >= 2, got {n_arms!r}")
        self.error = check_choice("error", error, ERROR_DISTRIBUTIONS)
        self.error_scale = float(check_positive("error_scale", error_scale))
        if tail_index is None:
            tail_index = _DEFAULT_TAIL_INDEX.get(error, 1.0)
        index = float(check_positive("tail_index", tail_index))
        self.tail_index = None if error == "gaussian" else index
        rng = np.random.default_rng(seed)
        true = rng.standard_normal(n_arms)
        if error == "gaussian":
            noise = rng.standard_normal(n_arms)
        elif error == "student_t":
            noise = rng.standard_t(index, n_arms)
        else:
            noise = rng.pareto(index, n_arms)
        super().__init__(
            transition_probs=np.ones((1, n_arms, 1)),
            proxy_reward=(true + self.error_scale * noise)[None, :],
            true_reward=true[None, :],
            reference_probs=np.full((1, n_arms), 1.0 / n_arms),
            initial_state_probs=np.ones(1),
            gamma=1.0,
            termination_prob=1.0,
        )
        self.n_arms = n_arms
        self.problem_seed = seed

    @property
    def true_rewards(self) -> torch.Tensor:
        """:math:`r_k`, ``[K]``."""
        return self.true_reward_table[0]

    @property
    def proxy_rewards(self) -> torch.Tensor:
        r""":math:`\tilde r_k = r_k + e_k`, ``[K]``."""
        return self.reward_table[0]

    def kl_optimum(self, beta: float) -> torch.Tensor:
        r"""``[K]`` probabilities :math:`\pi_\beta \propto \pi_{\text{ref}} e^{\tilde r/\beta}` (the maximizer of
        :math:`\mathbb{E}_\pi \tilde r - \beta \mathrm{KL}`).

        :param beta: KL coefficient :math:`\beta > 0`
        """
        beta = float(check_positive("beta", beta))
        # the closed form (kl_regularized_optimum's soft value iteration gives the same in one step; this is faster)
        return torch.softmax(self.reference_log_probs[0] + self.proxy_rewards / beta, dim=-1)

    def kl_optimum_with_kl(self, kl: float, tol: float = 1e-10) -> torch.Tensor:
        r"""``[K]`` probabilities of the KL-regularized optimum :math:`\pi_\beta` whose KL to the reference is ``kl``.

        :math:`\mathrm{KL}(\pi_\beta \| \pi_{\text{ref}})` decreases from :math:`\log(K / \#\arg\max)` to 0 as
        :math:`\beta` grows, so :math:`\beta` is found by bisection on :math:`\log \beta`. This compares the KL penalty
        and the cap at the *same* divergence (the frontier of ``docs/guide/regularization.md``).

        :param kl: the target KL, in ``[0, log K)`` and below the KL of the greedy policy
        :param tol: tolerance on the KL
        """
        target = float(kl)
        ref = self.reference_log_probs[0]

        def kl_of(probs: torch.Tensor) -> float:  # evaluate()'s KL without its argument checks (a hot loop)
            return float(torch.special.xlogy(probs, probs).sum() - probs @ ref)

        greedy_kl = kl_of(self.kl_optimum(1e-12 * float(self.proxy_rewards.std())))
        if not 0.0 <= target < greedy_kl:
            raise ValueError(f"kl must be in [0, {greedy_kl:.6g}) (the KL of the greedy policy), got {kl!r}")
        if target == 0.0:
            return self.reference_probs[0].clone()
        scale = float(self.proxy_rewards.std())
        low, high = math.log(1e-12 * scale), math.log(1e12 * scale)  # KL(low) > target > KL(high)
        probs = self.reference_probs[0]
        for _ in range(200):
            middle = 0.5 * (low + high)
            probs = self.kl_optimum(math.exp(middle))
            value = kl_of(probs)
            if abs(value - target) <= tol:
                break
            low, high = (middle, high) if value > target else (low, middle)
        return probs

    def quantilizer(self, cap: float) -> torch.Tensor:
        r"""``[K]`` probabilities of the maximizer of :math:`\mathbb{E}_\pi \tilde r` subject to
        :math:`\pi \le c\, \pi_{\text{ref}}`.

        :param cap: :math:`c \ge 1`
        """
        return self.cap_optimum(cap)[0]

    def evaluate(self, probs: torch.Tensor) -> GoodhartPoint:
        """Exact true and proxy utilities and KL to the reference of the policy ``probs`` (``[K]``, sums to 1)."""
        probs = torch.as_tensor(probs, dtype=_DTYPE).reshape(self.n_arms)
        kl = categorical_divergence(probs.log(), self.reference_log_probs[0], "kl")
        return GoodhartPoint(probs @ self.true_rewards, probs @ self.proxy_rewards, kl)
