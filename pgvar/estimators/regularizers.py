r"""Regularizing a policy toward a reference policy: divergences, their sample estimators, the odds-ratio cap,
and occupancy-measure penalties from a discriminator.

Three families, one per question of issue 14 (``docs/guide/regularization.md`` has the whole story):

- **Action-distribution divergences** per state, :math:`D(\pi(\cdot|s) \,\|\, \pi_{\text{ref}}(\cdot|s))`:
  exact for Categorical (:func:`categorical_divergence`) and diagonal Gaussian
  (:func:`diagonal_gaussian_divergence`) policies; from the log-probabilities of the *sampled* actions
  :math:`a \sim \pi` with Schulman's k1 / k2 / k3 estimators of the KL (:func:`kl_sample_estimate`) and the
  unbiased :math:`\chi^2` estimator (:func:`chi2_sample_estimate`).
- **The odds-ratio cap** :math:`\pi(a|s) \le c\, \pi_{\text{ref}}(a|s)` (a quantilizer, Kwa et al. 2024): as a
  hinge penalty on :math:`\log(\pi/\pi_{\text{ref}}) - \log c` (:func:`odds_ratio_cap_penalty`) and as a
  projection that satisfies it exactly (:func:`capped_log_probs`).
- **Occupancy-measure (OM) divergences** (Laidlaw, Singhal, Dragan 2024, ORPO): a discriminator trained with
  :func:`discriminator_logistic_loss` has logits :math:`d \approx \log(\mu_\pi / \mu_{\text{ref}})`, and
  :func:`occupancy_penalty_rewards` turns them into per-step rewards added before GAE, and
  :func:`occupancy_divergence_estimate` into an estimate of the divergence itself (for logging and control).

All functions are elementwise over any leading shape: time-major ``[T, N]`` rollouts and flat ``[B]`` batches
alike (``[*, A]`` with an action axis last for the exact Categorical divergences). The exact Categorical KL is
:func:`pgvar.estimators.kl_to_reference` (the soft-Q module's), which :func:`categorical_divergence` calls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pgvar._validation import (
    check_action_tensor,
    check_cap,
    check_choice,
    check_float_tensor,
    check_log_normalized,
    check_mask,
    check_nonnegative,
    check_reference_log_probs,
    check_shape,
    check_unit_interval,
    working_dtype,
)
from pgvar.estimators.soft_q import kl_to_reference

__all__ = [
    "DIVERGENCES",
    "KL_ESTIMATORS",
    "capped_log_probs",
    "categorical_divergence",
    "chi2_sample_estimate",
    "diagonal_gaussian_divergence",
    "discriminator_logistic_loss",
    "kl_sample_estimate",
    "occupancy_divergence_estimate",
    "occupancy_penalty_rewards",
    "odds_ratio_cap_penalty",
]

KL_ESTIMATORS = ("k1", "k2", "k3")
"""Names of the sample estimators of :math:`\\mathrm{KL}(\\pi \\| \\pi_{\\text{ref}})` (:func:`kl_sample_estimate`)."""

DIVERGENCES = ("kl", "chi2", "sqrt_chi2", "tv")
"""Names of the divergences :math:`D(p \\| q)`: KL, :math:`\\chi^2`, :math:`\\sqrt{\\chi^2}` and total variation."""


# ------------------------------------------------------------------------------------------------ checks
def _sampled_pair(log_probs: object, ref_log_probs: object) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """The log-probabilities of sampled actions under both policies (any shape, numpy accepted, not normalized:
    one action per entry), in the dtype to compute in, and the dtype to return."""
    log_probs = check_float_tensor("log_probs", log_probs, "[...] (sampled actions)", finite=False)
    ref = check_float_tensor(
        "ref_log_probs", ref_log_probs, f"{tuple(log_probs.shape)} (like log_probs)", finite=False
    )
    ref = check_shape("ref_log_probs", ref, log_probs.shape, like="log_probs")
    dtype = torch.promote_types(log_probs.dtype, ref.dtype)
    return log_probs.to(working_dtype(dtype)), ref.to(working_dtype(dtype)), dtype


# ------------------------------------------------------------------------------------------------ sampled
def kl_sample_estimate(
    log_probs: torch.Tensor, ref_log_probs: torch.Tensor, estimator: str = "k3"
) -> torch.Tensor:
    r"""Per-sample estimates of :math:`\mathrm{KL}(\pi \,\|\, \pi_{\text{ref}})` from actions :math:`a \sim \pi`.

    With :math:`r = \pi_{\text{ref}}(a|s) / \pi(a|s)` (Schulman 2020, "Approximating KL Divergence",
    http://joschu.net/blog/kl-approx.html):

    .. math::

        k_1 = -\log r, \qquad k_2 = \tfrac12 (\log r)^2, \qquad k_3 = (r - 1) - \log r.

    :math:`k_1` is unbiased, can be negative, and has the largest variance; :math:`k_3` is unbiased
    (:math:`\mathbb{E}_\pi[r] = 1`) and :math:`\ge 0`; :math:`k_2` is biased (its mean is
    :math:`\mathrm{KL} + O(\text{ratio spread}^3)`, an f-divergence with :math:`f = \tfrac12 (\log x)^2`) and has
    low variance when :math:`\pi \approx \pi_{\text{ref}}`. These estimate the KL's *value*; differentiating their
    mean does not give an unbiased gradient of the KL in general (only :math:`k_1` added to the reward, treated as a
    constant, gives the gradient of the KL-regularized return: see ``docs/guide/regularization.md``).

    Elementwise over any shape (time-major ``[T, N]`` or flat). Differentiable in both arguments.

    :param log_probs: :math:`\log \pi(a|s)` of the sampled actions
    :param ref_log_probs: :math:`\log \pi_{\text{ref}}(a|s)` of the same actions, same shape
    :param estimator: ``"k1"``, ``"k2"`` or ``"k3"``
    :return: per-sample estimates, the shape of ``log_probs``

    >>> lp = torch.tensor([-0.5, -1.0], dtype=torch.float64)
    >>> ref = torch.tensor([-1.0, -0.5], dtype=torch.float64)
    >>> kl_sample_estimate(lp, ref, "k1")
    tensor([ 0.5000, -0.5000], dtype=torch.float64)
    >>> kl_sample_estimate(lp, ref, "k3")  # e^{-0.5} - 1 + 0.5 and e^{0.5} - 1 - 0.5
    tensor([0.1065, 0.1487], dtype=torch.float64)
    """
    check_choice("estimator", estimator, KL_ESTIMATORS)
    log_p, log_ref, dtype = _sampled_pair(log_probs, ref_log_probs)
    log_ratio = log_ref - log_p  # log r
    if estimator == "k1":
        estimate = -log_ratio
    elif estimator == "k2":
        estimate = 0.5 * log_ratio.square()
    else:
        estimate = torch.expm1(log_ratio) - log_ratio
    return estimate.to(dtype)


def chi2_sample_estimate(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    r"""Per-sample unbiased estimates of :math:`\chi^2(\pi \,\|\, \pi_{\text{ref}})` from actions :math:`a \sim \pi`.

    .. math::

        \chi^2(p \,\|\, q) = \mathbb{E}_{q}\Big[\Big(\frac{p}{q}\Big)^2\Big] - 1
                           = \mathbb{E}_{a \sim p}\Big[\frac{p(a)}{q(a)}\Big] - 1,
        \qquad \hat\chi^2(a) = \frac{\pi(a|s)}{\pi_{\text{ref}}(a|s)} - 1 .

    The estimate is :math:`\ge -1` and unbiased, but its variance is
    :math:`\mathbb{E}_p[(p/q)^2] - (1 + \chi^2)^2`, infinite when :math:`\mathbb{E}_q[(p/q)^3]` is (for instance a
    Gaussian :math:`\pi` much wider than :math:`\pi_{\text{ref}}`). The square root of its mean estimates
    :math:`\sqrt{\chi^2}` with a downward bias (Jensen). Laidlaw, Singhal, Dragan 2024 (arXiv:2403.03185) regularize
    with :math:`\sqrt{\chi^2}`; their occupancy penalty is this estimator with :math:`p/q = e^{d}`
    (:func:`occupancy_penalty_rewards`).

    :param log_probs: :math:`\log \pi(a|s)` of the sampled actions
    :param ref_log_probs: :math:`\log \pi_{\text{ref}}(a|s)` of the same actions, same shape
    :return: per-sample estimates, the shape of ``log_probs`` (differentiable)

    >>> chi2_sample_estimate(torch.tensor([0.5, 0.5]).log(), torch.tensor([0.25, 1.0]).log())
    tensor([ 1.0000, -0.5000])
    """
    log_p, log_ref, dtype = _sampled_pair(log_probs, ref_log_probs)
    return torch.expm1(log_p - log_ref).to(dtype)


# ------------------------------------------------------------------------------------------------ exact
def categorical_divergence(
    log_probs: torch.Tensor, ref_log_probs: torch.Tensor, divergence: str = "kl"
) -> torch.Tensor:
    r"""Exact divergence between two Categorical distributions over the last axis.

    .. math::

        \mathrm{KL} = \sum_a p_a \log\frac{p_a}{q_a}, \quad
        \chi^2 = \sum_a \frac{p_a^2}{q_a} - 1 = \sum_a \frac{(p_a - q_a)^2}{q_a}, \quad
        \sqrt{\chi^2}, \quad
        \mathrm{TV} = \tfrac12 \sum_a |p_a - q_a| .

    Actions with :math:`p_a = 0` contribute 0. The reference must give every action a probability > 0 (finite
    ``ref_log_probs``, as in :func:`pgvar.estimators.kl_to_reference`). ``"kl"`` is :func:`pgvar.estimators.kl_to_reference`. Differentiable in both
    arguments (the gradient of :math:`\sqrt{\chi^2}` is infinite where :math:`\chi^2 = 0`). Used for the exact
    occupancy-measure divergences of :class:`pgvar.problems.RewardHackingMDP` (ORPO's action-distribution
    baselines use the same closed forms: Laidlaw et al. 2024, code ``occupancy_measures/agents/orpo.py``).

    :param log_probs: ``[*, A]`` :math:`\log p`
    :param ref_log_probs: :math:`\log q`, broadcastable to ``[*, A]``, normalized
    :param divergence: one of :data:`DIVERGENCES`
    :return: ``[*]`` divergences (>= 0)

    >>> p = torch.tensor([0.5, 0.5], dtype=torch.float64).log()
    >>> q = torch.tensor([0.25, 0.75], dtype=torch.float64).log()
    >>> [round(float(categorical_divergence(p, q, d)), 4) for d in DIVERGENCES]
    [0.1438, 0.3333, 0.5774, 0.25]
    """
    check_choice("divergence", divergence, DIVERGENCES)
    log_probs = check_log_normalized("log_probs", check_action_tensor("log_probs", log_probs))
    ref = check_reference_log_probs("ref_log_probs", ref_log_probs, log_probs)
    if divergence == "kl":
        return kl_to_reference(log_probs, ref)
    dtype = log_probs.dtype
    log_p, log_q = log_probs.to(working_dtype(dtype)), ref.to(working_dtype(dtype))
    if divergence == "tv":
        return (0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)).to(dtype)
    # sum_a p^2 / q - 1 in log space (ref is finite, so p = 0 terms are exp(-inf) = 0).
    chi2 = torch.expm1(torch.logsumexp(2.0 * log_p - log_q, dim=-1)).clamp_min(0.0)
    return (chi2 if divergence == "chi2" else chi2.sqrt()).to(dtype)


def diagonal_gaussian_divergence(
    mean: torch.Tensor,
    log_std: torch.Tensor,
    ref_mean: torch.Tensor,
    ref_log_std: torch.Tensor,
    divergence: str = "kl",
) -> torch.Tensor:
    r"""Exact KL, :math:`\chi^2` or :math:`\sqrt{\chi^2}` between diagonal Gaussians :math:`p = \mathcal{N}(m_1,
    \operatorname{diag} s_1^2)` and :math:`q = \mathcal{N}(m_2, \operatorname{diag} s_2^2)`, summed over the last axis.

    .. math::

        \mathrm{KL}(p \| q) = \sum_i \Big[\log\frac{s_{2,i}}{s_{1,i}}
            + \frac{s_{1,i}^2 + (m_{1,i} - m_{2,i})^2}{2 s_{2,i}^2} - \frac12\Big],

        1 + \chi^2(p \| q) = \prod_i \frac{s_{2,i}^2}{s_{1,i} \sqrt{2 s_{2,i}^2 - s_{1,i}^2}}
            \exp\Big(\frac{(m_{1,i} - m_{2,i})^2}{2 s_{2,i}^2 - s_{1,i}^2}\Big).

    **The** :math:`\chi^2` **is finite only if** :math:`s_{1,i}^2 < 2 s_{2,i}^2` **in every coordinate** (the policy
    may not be :math:`\sqrt2` times wider than the reference: :math:`\int p^2/q` diverges otherwise); where the
    condition fails the result is ``inf`` (with a zero, not NaN, gradient). ORPO's action-distribution
    :math:`\chi^2` (Laidlaw et al. 2024, ``orpo.py: chi2_divergence``) has the same closed form and falls back to the
    KL where it is not finite; here that choice is left to the caller. The formula is computed in log space
    (``expm1``), so small divergences keep their precision.

    :param mean: ``[*, d]`` :math:`m_1`
    :param log_std: ``[*, d]`` :math:`\log s_1` (or broadcastable: a state-independent ``[d]``)
    :param ref_mean: ``[*, d]`` :math:`m_2`
    :param ref_log_std: :math:`\log s_2`, broadcastable like ``log_std``
    :param divergence: ``"kl"``, ``"chi2"`` or ``"sqrt_chi2"`` (no closed form for the total variation in ``d > 1``)
    :return: ``[*]`` divergences (>= 0, possibly ``inf`` for the :math:`\chi^2` family)

    >>> zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    >>> diagonal_gaussian_divergence(one, zero, zero, zero, "kl")  # (m1 - m2)^2 / 2
    tensor(0.5000, dtype=torch.float64)
    >>> diagonal_gaussian_divergence(one, zero, zero, zero, "chi2")  # e^{(m1 - m2)^2} - 1
    tensor(1.7183, dtype=torch.float64)
    >>> diagonal_gaussian_divergence(zero, one, zero, zero, "chi2")  # s1 = e > sqrt(2) s2
    tensor(inf, dtype=torch.float64)
    """
    check_choice("divergence", divergence, ("kl", "chi2", "sqrt_chi2"))
    names = ("mean", "log_std", "ref_mean", "ref_log_std")
    mean, log_std, ref_mean, ref_log_std = (
        _gaussian_parameter(name, tensor) for name, tensor in zip(names, (mean, log_std, ref_mean, ref_log_std))
    )
    try:
        shape = torch.broadcast_shapes(mean.shape, log_std.shape, ref_mean.shape, ref_log_std.shape)
    except RuntimeError:
        raise ValueError(
            "mean, log_std, ref_mean and ref_log_std must broadcast to one shape [*, d], got "
            f"{tuple(mean.shape)}, {tuple(log_std.shape)}, {tuple(ref_mean.shape)}, {tuple(ref_log_std.shape)}"
        ) from None
    dtype = torch.promote_types(mean.dtype, log_std.dtype)
    dtype = torch.promote_types(dtype, torch.promote_types(ref_mean.dtype, ref_log_std.dtype))
    # 16-bit floats in float32: exp(2 log s) and the product over d overflow float16
    compute = working_dtype(dtype)
    mean, log_std, ref_mean, ref_log_std = (t.to(compute) for t in (mean, log_std, ref_mean, ref_log_std))
    gap_sq = (mean - ref_mean).square().expand(shape)
    log_std, ref_log_std = log_std.expand(shape), ref_log_std.expand(shape)
    if divergence == "kl":
        variance_ratio = torch.exp(2.0 * (log_std - ref_log_std))
        kl = ref_log_std - log_std + 0.5 * (variance_ratio + gap_sq * torch.exp(-2.0 * ref_log_std)) - 0.5
        return kl.sum(-1).to(dtype)
    # d = 2 s2^2 - s1^2 = s2^2 (2 - e^{2 (log s1 - log s2)}); finite iff d > 0.
    rel = 2.0 - torch.exp(2.0 * (log_std - ref_log_std))
    finite = rel > 0
    safe_rel = torch.where(finite, rel, torch.ones_like(rel))
    log_d = 2.0 * ref_log_std + torch.log(safe_rel)
    log_terms = 2.0 * ref_log_std - log_std - 0.5 * log_d + gap_sq * torch.exp(-log_d)
    chi2 = torch.expm1(torch.where(finite, log_terms, torch.zeros_like(log_terms)).sum(-1)).clamp_min(0.0)
    chi2 = torch.where(finite.all(-1), chi2, torch.full_like(chi2, math.inf))
    return (chi2 if divergence == "chi2" else chi2.sqrt()).to(dtype)


def _gaussian_parameter(name: str, tensor: object) -> torch.Tensor:
    tensor = check_float_tensor(name, tensor, "[*, d]")
    if tensor.dim() < 1:
        raise ValueError(f"{name} must be a floating-point tensor of shape [*, d] (keep d = 1), got shape ()")
    return tensor


# ------------------------------------------------------------------------------------------------ the cap
def odds_ratio_cap_penalty(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, cap: float) -> torch.Tensor:
    r"""Hinge penalty on the log odds ratio above :math:`\log c`, per sampled action: a *soft* version of the cap.

    .. math::  h(a) = \big(\log \pi(a|s) - \log \pi_{\text{ref}}(a|s) - \log c\big)_+ ,
               \qquad \mathbb{E}_{a \sim \pi}[h] = \sum_a \pi(a|s) \Big(\log\frac{\pi(a|s)}{c\,\pi_{\text{ref}}(a|s)}\Big)_+

    It is zero exactly on the policies that satisfy the cap :math:`\pi \le c\, \pi_{\text{ref}}` (Kwa et al. 2024,
    "Catastrophic Goodhart", arXiv:2407.14503, the quantilizer's constraint) and works from sampled actions of any
    distribution, continuous ones included. It does **not** guarantee the cap: a penalty only discourages
    violations, in proportion to its coefficient. Where the policy is Categorical and its logits are at hand,
    :func:`capped_log_probs` enforces the cap exactly; use the penalty for continuous actions, or to keep the
    policy's own parametrization. Differentiable (subgradient 0 at the kink).

    :param log_probs: :math:`\log \pi(a|s)` of the sampled actions (any shape)
    :param ref_log_probs: :math:`\log \pi_{\text{ref}}(a|s)`, same shape
    :param cap: :math:`c \ge 1`
    :return: per-sample penalties (>= 0), the shape of ``log_probs``

    >>> odds_ratio_cap_penalty(torch.tensor([0.9, 0.1]).log(), torch.tensor([0.5, 0.5]).log(), cap=1.5)
    tensor([0.1823, 0.0000])
    """
    cap = check_cap("cap", cap)
    log_p, log_ref, dtype = _sampled_pair(log_probs, ref_log_probs)
    return F.relu(log_p - log_ref - math.log(cap)).to(dtype)


def capped_log_probs(logits: torch.Tensor, ref_log_probs: torch.Tensor, cap: float) -> torch.Tensor:
    r"""Log-probabilities of the Categorical policy projected onto the odds-ratio cap :math:`\pi \le c\, \pi_{\text{ref}}`:
    a *hard* constraint that the returned policy provably satisfies.

    With :math:`p = \operatorname{softmax}(\text{logits})` and :math:`q = \pi_{\text{ref}}`, the projection is
    ``min(p, c q)`` renormalized by water-filling: the mass cut from capped actions goes to the others in
    proportion to :math:`p`, repeatedly, until no action exceeds its cap. In closed form

    .. math::  \tilde\pi(a) = \min\big(c\, q(a),\; t\, p(a)\big), \qquad t \ge 1 \text{ solves }
               \sum_a \min\big(c\, q(a), t\, p(a)\big) = 1,

    which exists for :math:`c \ge 1` (at :math:`t \to \infty` the sum is :math:`c \ge 1`) and is the information
    projection :math:`\arg\min_{\pi' \le c q} \mathrm{KL}(\pi' \| p)` (KKT: :math:`\log(\pi'/p)` is constant on
    the uncapped actions). :math:`\tilde\pi \le c q` holds by construction, so a policy parametrized as
    ``capped_log_probs(logits, ...)`` can never break the cap, and its best-proxy-reward policy is the quantilizer
    (Kwa et al. 2024, arXiv:2407.14503; Taylor 2016, "Quantilizers"): :math:`c q` on the best actions until the
    mass is used up. The capped set is found by sorting the ratios :math:`c q / p`; :math:`t` is differentiable in
    both arguments (autograd through the sort's gather).

    :param logits: ``[*, A]`` policy logits (or log-probabilities)
    :param ref_log_probs: ``log pi_ref``, broadcastable to ``[*, A]``, normalized
    :param cap: :math:`c \ge 1` (``c = 1`` returns the reference)
    :return: ``[*, A]`` log-probabilities of :math:`\tilde\pi` (``-inf`` where :math:`q = 0`)

    >>> logits = torch.tensor([0.8, 0.15, 0.05], dtype=torch.float64).log()
    >>> ref = torch.full((3,), 1 / 3, dtype=torch.float64).log()
    >>> capped_log_probs(logits, ref, cap=1.5).exp()  # 0.5 = 1.5 / 3 on the top action; the rest scaled by 2.5
    tensor([0.5000, 0.3750, 0.1250], dtype=torch.float64)
    """
    cap = check_cap("cap", cap)
    logits = check_action_tensor("logits", logits)
    ref = check_reference_log_probs("ref_log_probs", ref_log_probs, logits)  # normalized in the input's dtype
    dtype, compute = logits.dtype, working_dtype(logits.dtype)  # 16-bit floats: sort, sums and t in float32
    log_p = torch.log_softmax(logits.to(compute), dim=-1)
    log_cap_q = ref.to(compute).expand_as(log_p) + math.log(cap)
    # Sorting by the log ratio log(c q / p) ascending: the capped set is always a prefix of this order.
    log_ratio = log_cap_q - log_p
    order = torch.argsort(log_ratio.detach(), dim=-1)
    sorted_log_ratio = log_ratio.gather(-1, order)
    sorted_cap_q = log_cap_q.exp().gather(-1, order)
    sorted_p = log_p.exp().gather(-1, order)
    capped_mass = torch.cumsum(sorted_cap_q, -1) - sorted_cap_q  # mass of the first k capped actions
    free_mass = torch.flip(torch.cumsum(torch.flip(sorted_p, [-1]), -1), [-1])  # p of actions k, k+1, ...
    # t_k solves sum_{j<k} c q_j + t sum_{j>=k} p_j = 1; the first k with t_k <= ratio_k is the solution
    # (for a smaller k the capped set is too small and t_k overshoots ratio_k).
    # (masked logs: a log of 0 in an unselected entry would still turn the backward pass into NaN)
    remaining = 1.0 - capped_mass
    valid = (remaining > 0) & (free_mass > 0)
    one = torch.ones_like(remaining)
    log_t = torch.log(torch.where(valid, remaining, one)) - torch.log(torch.where(valid, free_mass, one))
    # no mass left to fill (only after the solution, never selected first) / nothing left to scale (reject)
    log_t = torch.where(valid, log_t, torch.where(remaining > 0, math.inf, -math.inf))
    accept = log_t <= sorted_log_ratio + 1e-12
    first = torch.argmax(accept.to(torch.int8), dim=-1, keepdim=True)  # the last k always accepts
    log_t_star = log_t.gather(-1, first).clamp_min(0.0)  # t >= 1 (rounding)
    return torch.minimum(log_cap_q, log_t_star + log_p).to(dtype)


# ------------------------------------------------------------------------------------------------ occupancy
def discriminator_logistic_loss(policy_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    r"""Logistic loss of a discriminator between the policy's and the reference policy's samples (ORPO's KL/:math:`\chi^2`
    discriminator).

    .. math::  L(d) = \mathbb{E}_{x \sim \mu_\pi}\big[\operatorname{softplus}(-d(x))\big]
                     + \mathbb{E}_{x \sim \mu_{\text{ref}}}\big[\operatorname{softplus}(d(x))\big]

    with :math:`x = s` or :math:`(s, a)`. Its minimizer over all functions is
    :math:`d^*(x) = \log \mu_\pi(x) / \mu_{\text{ref}}(x)` (setting the pointwise derivative
    :math:`-\mu_\pi \sigma(-d) + \mu_{\text{ref}} \sigma(d)` to 0), the log density ratio that
    :func:`occupancy_penalty_rewards` needs. Laidlaw, Singhal, Dragan 2024 (arXiv:2403.03185), code
    ``occupancy_measures/agents/orpo.py: _kl_discriminator_loss``. (Their TV discriminator uses a tanh loss
    and their Wasserstein one a WGAN loss; not provided here.)

    :param policy_logits: discriminator logits on samples of the current policy (any shape)
    :param reference_logits: logits on samples of the reference policy (any shape)
    :return: scalar loss, differentiable in both

    >>> discriminator_logistic_loss(torch.zeros(3), torch.zeros(2))  # 2 log 2
    tensor(1.3863)
    """
    policy_logits = check_float_tensor("policy_logits", policy_logits, "[...] (non-empty)")
    reference_logits = check_float_tensor("reference_logits", reference_logits, "[...] (non-empty)")
    for name, tensor in (("policy_logits", policy_logits), ("reference_logits", reference_logits)):
        if tensor.numel() == 0:
            raise ValueError(f"{name} must be a non-empty floating-point tensor, got shape {tuple(tensor.shape)}")
    dtype = torch.promote_types(policy_logits.dtype, reference_logits.dtype)
    compute = working_dtype(dtype)  # 16-bit floats: the means in float32
    loss = F.softplus(-policy_logits.to(compute)).mean() + F.softplus(reference_logits.to(compute)).mean()
    return loss.to(dtype)


def occupancy_penalty_rewards(
    discriminator_logits: torch.Tensor,
    divergence: str,
    coef: float,
    *,
    trim_fraction: float = 0.01,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Per-step rewards (``<= 0`` on average) that penalize the occupancy-measure divergence, from discriminator logits
    :math:`d \approx \log(\mu_\pi / \mu_{\text{ref}})`; add them to the environment's rewards before GAE.

    Following ORPO's code (Laidlaw, Singhal, Dragan 2024, arXiv:2403.03185, ``orpo.py: _*_discriminator_rewards``):

    .. math::

        \text{kl}: -\lambda d, \qquad
        \text{chi2}: -\lambda (e^{d} - 1), \qquad
        \text{sqrt\_chi2}: -\lambda \frac{e^{d} - 1}{\sqrt{\bar\chi^2}}, \qquad
        \text{tv}: -\lambda \operatorname{sign}(d),

    where :math:`\bar\chi^2` is the mean of :math:`e^d - 1` over the batch after dropping the
    ``trim_fraction`` smallest and largest values (ORPO: 1%); if :math:`\bar\chi^2 \le 0` the chi2 reward is used
    unscaled, as in ORPO. With exact logits and :math:`x \sim \mu_\pi`, the *expected* penalty per step is
    :math:`\lambda` times KL, :math:`\chi^2` and (untrimmed) :math:`\sqrt{\chi^2}`, but for ``tv`` it is
    :math:`\lambda\, \mathbb{E}_{\mu_\pi}[\operatorname{sign}(\mu_\pi - \mu_{\text{ref}})]`, not the TV. The
    *policy gradient* obtained by treating the penalty as a fixed reward (what GAE does) is that of
    :math:`\lambda` times KL, :math:`\chi^2 / 2`, :math:`\sqrt{\chi^2}` and :math:`\sum_x |\mu_\pi -
    \mu_{\text{ref}}| = 2\,\mathrm{TV}` of the normalized occupancy measures, each multiplied by the effective
    horizon :math:`\sum_t \gamma^t` (the :math:`\chi^2` loses half because the penalty itself depends on
    :math:`\pi`; for the KL that term has mean zero). ``tests/problems/test_problem_reward_hacking.py`` checks each
    factor exactly.

    Two departures from ORPO's numpy code: the trimmed mean keeps the whole batch when ``trim_fraction * n < 1``
    (ORPO's ``sorted[i:-i]`` with ``i = 0`` is empty, its mean NaN, and NaN penalties are then zeroed, so its
    sqrt-chi2 penalty vanishes for batches under 100 steps), and ``mask`` excludes padding from the mean.

    :param discriminator_logits: :math:`d` at each visited ``s`` or ``(s, a)``: time-major ``[T, N]`` or flat
    :param divergence: one of :data:`DIVERGENCES`
    :param coef: :math:`\lambda \ge 0`
    :param trim_fraction: fraction trimmed from each end for :math:`\bar\chi^2`, in ``[0, 0.5)``
    :param mask: boolean, the shape of the logits: real steps (``None``: all)
    :return: penalty rewards, the shape of the logits, **detached** (a reward is a constant of the policy loss and
        must not train the discriminator); 0 on masked-out steps

    >>> d = torch.tensor([0.0, math.log(2.0), -math.log(2.0)])
    >>> occupancy_penalty_rewards(d, "chi2", coef=1.0)
    tensor([-0.0000, -1.0000,  0.5000])
    >>> occupancy_penalty_rewards(d, "tv", coef=0.5)
    tensor([-0.0000, -0.5000,  0.5000])
    """
    check_choice("divergence", divergence, DIVERGENCES)
    coef = check_nonnegative("coef", coef)
    trim_fraction = check_unit_interval("trim_fraction", trim_fraction)
    if trim_fraction >= 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
    logits = check_float_tensor("discriminator_logits", discriminator_logits, "[T, N] or [B]")
    mask = check_mask("mask", mask, logits.shape)
    dtype = logits.dtype
    d = logits.detach().to(working_dtype(dtype))  # 16-bit floats: e^d and the trimmed mean in float32
    if divergence == "kl":
        distance = d
    elif divergence == "tv":
        distance = torch.sign(d)
    else:
        distance = torch.expm1(d)
        if divergence == "sqrt_chi2":
            values = distance[mask] if mask is not None else distance.reshape(-1)
            ordered = torch.sort(values).values
            cut = int(trim_fraction * ordered.numel())
            trimmed_mean = ordered[cut : ordered.numel() - cut].mean()
            if bool(trimmed_mean > 0):
                distance = distance / trimmed_mean.sqrt()
    penalty = -coef * distance
    if mask is not None:
        penalty = torch.where(mask, penalty, torch.zeros_like(penalty))
    return penalty.to(dtype)


def occupancy_divergence_estimate(
    discriminator_logits: torch.Tensor, divergence: str, *, mask: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Estimate of the occupancy divergence :math:`D(\mu_\pi \| \mu_{\text{ref}})` from discriminator logits at
    samples of the *policy*'s occupancy measure, :math:`x_i \sim \mu_\pi`.

    With :math:`d \approx \log(\mu_\pi / \mu_{\text{ref}})` (the optimum of
    :func:`discriminator_logistic_loss`), each divergence is an expectation under :math:`\mu_\pi`, estimated by the
    sample mean:

    .. math::

        \mathrm{KL} = \mathbb{E}_{\mu_\pi}[d], \qquad
        \chi^2 = \mathbb{E}_{\mu_\pi}[e^{d}] - 1, \qquad
        \sqrt{\chi^2} = \sqrt{\max(\widehat{\chi^2}, 0)}, \qquad
        \mathrm{TV} = \tfrac12 \mathbb{E}_{\mu_\pi}\big|1 - e^{-d}\big|

    (:math:`\mathbb{E}_{\mu_\pi}[\mu_\pi/\mu_{\text{ref}}] = \sum_x \mu_\pi^2/\mu_{\text{ref}}` and
    :math:`\mathbb{E}_{\mu_\pi}|1 - \mu_{\text{ref}}/\mu_\pi| = \sum_x |\mu_\pi - \mu_{\text{ref}}|`). With
    exact logits the KL, :math:`\chi^2` and TV estimates are unbiased and :math:`\sqrt{\chi^2}` is biased low
    (Jensen); with learned logits all carry the discriminator's error. This is the quantity the penalties of
    :func:`occupancy_penalty_rewards` stand for (its ``tv`` penalty's mean is not the TV, see there), the
    density-ratio route to f-divergences of Nguyen, Wainwright, Jordan (2010, arXiv:0809.0853), as in ORPO
    (Laidlaw, Singhal, Dragan 2024, arXiv:2403.03185).

    :param discriminator_logits: :math:`d` at samples of :math:`\mu_\pi`, any shape (``[T, N]`` or flat)
    :param divergence: one of :data:`DIVERGENCES`
    :param mask: boolean, the shape of the logits: the samples to average (``None``: all)
    :return: a scalar, detached, in the logits' dtype

    >>> # mu_pi = (2/3, 1/3), mu_ref = (1/3, 2/3): three samples of mu_pi in proportion, at the exact logits
    >>> d = torch.tensor([math.log(2.0), math.log(2.0), math.log(0.5)])
    >>> round(float(occupancy_divergence_estimate(d, "chi2")), 4)  # sum mu_pi^2 / mu_ref - 1
    0.5
    """
    check_choice("divergence", divergence, DIVERGENCES)
    logits = check_float_tensor("discriminator_logits", discriminator_logits, "[T, N] or [B]")
    mask = check_mask("mask", mask, logits.shape)
    d = logits.detach().to(working_dtype(logits.dtype))
    d = d[mask] if mask is not None else d.reshape(-1)
    if d.numel() == 0:
        raise ValueError("discriminator_logits must hold at least one (unmasked) sample, got none")
    if divergence == "kl":
        value = d.mean()
    elif divergence == "tv":
        value = 0.5 * (-torch.expm1(-d)).abs().mean()
    else:
        value = torch.expm1(d).mean()
        if divergence == "sqrt_chi2":
            value = value.clamp_min(0.0).sqrt()
    return value.to(logits.dtype)
