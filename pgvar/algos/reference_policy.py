r"""The frozen reference policy of the ``ref_*`` options: loading it, and its exact divergence to the policy.

:func:`load_reference_policy` makes the frozen copy (:class:`~pgvar.algos.reference.ReferenceOptionsMixin` holds
it); :func:`exact_policy_divergence` is the per-state closed form that ``ref_placement="loss"`` with
``ref_estimator="exact"`` adds to the loss (:func:`~pgvar.estimators.categorical_divergence`,
:func:`~pgvar.estimators.diagonal_gaussian_divergence`).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch as th
from stable_baselines3.common.distributions import CategoricalDistribution, DiagGaussianDistribution
from stable_baselines3.common.policies import BasePolicy

from pgvar.estimators import categorical_divergence, diagonal_gaussian_divergence

__all__ = ["exact_policy_divergence", "exact_policy_divergence_supported", "load_reference_policy"]


def load_reference_policy(source: Any, device: th.device | str) -> BasePolicy:
    """A frozen copy of ``source``: an SB3 policy object, or the path of a saved model (its ``policy``)."""
    if isinstance(source, BasePolicy):
        reference = copy.deepcopy(source)
    elif isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        from stable_baselines3.common.save_util import load_from_zip_file

        data, params, _ = load_from_zip_file(source, device=device)
        if data is None or params is None or "policy" not in params:
            raise ValueError(f"ref_policy={source!r} is not a saved model with a policy")
        reference = data["policy_class"](
            data["observation_space"], data["action_space"], lambda _: 0.0, **data.get("policy_kwargs", {})
        )
        reference.load_state_dict(params["policy"])
    else:
        raise ValueError(
            f"ref_policy must be None, 'initial', the path of a saved model or an SB3 policy, got {type(source).__name__}"
        )
    reference = reference.to(device)
    reference.set_training_mode(False)
    for param in reference.parameters():
        param.requires_grad_(False)
    return reference


def exact_policy_divergence(distribution: Any, ref_distribution: Any, regularizer: str, cap: float) -> th.Tensor:
    """Per-state exact divergence ``[B]`` between two SB3 distributions (Categorical or diagonal Gaussian).

    ``sqrt_chi2`` is :math:`\\sqrt{\\max(\\chi^2, 10^{-12})}`, so that its gradient is finite where the policy equals
    the reference. ``odds_ratio_cap`` is :math:`\\sum_a \\pi_a (\\log\\frac{\\pi_a}{c\\,\\pi_{\\text{ref},a}})_+`
    (Categorical only).
    """
    divergence = "chi2" if regularizer == "sqrt_chi2" else regularizer
    if type(distribution) is CategoricalDistribution:
        log_p = distribution.distribution.logits
        log_q = ref_distribution.distribution.logits.to(log_p.dtype)
        if regularizer == "odds_ratio_cap":
            value = (log_p.exp() * (log_p - log_q - math.log(cap)).clamp_min(0.0)).sum(-1)
        else:
            value = categorical_divergence(log_p, log_q, divergence)
    elif type(distribution) is DiagGaussianDistribution and regularizer != "odds_ratio_cap":
        mean, std = distribution.distribution.mean, distribution.distribution.stddev
        ref_mean, ref_std = ref_distribution.distribution.mean, ref_distribution.distribution.stddev
        value = diagonal_gaussian_divergence(mean, std.log(), ref_mean, ref_std.log(), divergence)
    else:
        raise ValueError(
            f"no exact {regularizer!r} for {type(distribution).__name__} (exact: Categorical, and DiagGaussian "
            "except odds_ratio_cap); use ref_placement='reward'"
        )
    return value.clamp_min(1e-12).sqrt() if regularizer == "sqrt_chi2" else value


def exact_policy_divergence_supported(policy: Any, regularizer: str, estimator: str) -> None:
    """Raise ``ValueError`` at construction if ``ref_estimator="exact"`` has no closed form for the policy."""
    if estimator != "exact":
        return
    action_dist = getattr(policy, "action_dist", None)
    if type(action_dist) is CategoricalDistribution or (
        type(action_dist) is DiagGaussianDistribution and regularizer != "odds_ratio_cap"
    ):
        return
    raise ValueError(
        f"ref_estimator='exact' has no closed form {regularizer!r} for the action distribution "
        f"{type(action_dist).__name__} (exact: Categorical, and DiagGaussian except odds_ratio_cap); "
        "use ref_placement='reward'"
    )
