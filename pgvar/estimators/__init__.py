"""Pure tensor estimators (torch only): returns, advantages, baselines, normalization, control variates, soft-Q,
regularizers toward a reference policy.

Every function takes time-major ``[T, N]`` tensors where time matters, states its formula and reference in its
docstring, and validates its arguments (``ValueError`` naming the argument, the value and what is allowed).

One input rule for every function of this package:

* **Arrays**: a tensor argument may be a ``torch.Tensor`` or a numpy array; arrays are converted with
  ``torch.as_tensor`` (no copy) and the result is a tensor. Anything else (a list, a number where a tensor is
  expected) raises ``ValueError``.
* **dtypes**: float64, float32, float16 and bfloat16. Where precision matters (the return recursions, the
  standardization, the regularizers) 16-bit inputs are computed in float32 and the result is cast back to the
  input's dtype.
* **Masks** are bool tensors of the documented shape that select at least one entry. An integer or float 0/1
  mask raises ``TypeError``: used to index, it would select elements 0 and 1 instead of the entries marked 1.
* **Log-probabilities** of whole distributions (``log_probs``, ``ref_log_probs`` with an action axis) must be
  normalized over that axis (``logsumexp`` = 0 within the dtype's rounding): logits or probabilities raise
  ``ValueError``. Log-probabilities of sampled actions (one per entry, as in ``kl_sample_estimate``) are not.
* Checks that read values (finite, 0/1, normalized) are skipped inside ``torch.func`` transforms.

The checks themselves live in ``pgvar._validation``, shared with the other layers.
"""

from pgvar.estimators.action_dependent import (
    FactorizedBaselineEstimate,
    factorized_action_baseline,
    other_action_dimensions,
)
from pgvar.estimators.baselines import (
    CONSTANT_BASELINES,
    batch_mean_baseline,
    constant_baseline,
    optimal_constant_baseline,
)
from pgvar.estimators.control_variates import (
    QPROP_NORMALIZATION_MODES,
    AllActionControlVariate,
    QPropNormalized,
    all_action_control_variate,
    qprop_action_variance,
    qprop_control_variate,
    qprop_correction_surrogate,
    qprop_learning_signal,
    qprop_normalize,
)
from pgvar.estimators.horizon import (
    horizon_aware_value_loss,
    horizon_aware_value_targets,
    horizon_aware_values,
    horizon_episode_flags,
    time_to_go_factor,
)
from pgvar.estimators.normalization import NORMALIZATION_MODES, normalize_advantages
from pgvar.estimators.qprop_eta import QPROP_ETA_RULES, QPROP_ETA_SCOPES, qprop_eta
from pgvar.estimators.regularizers import (
    DIVERGENCES,
    KL_ESTIMATORS,
    capped_log_probs,
    categorical_divergence,
    chi2_sample_estimate,
    diagonal_gaussian_divergence,
    discriminator_logistic_loss,
    kl_sample_estimate,
    occupancy_divergence_estimate,
    occupancy_penalty_rewards,
    odds_ratio_cap_penalty,
)
from pgvar.estimators.returns import discounted_returns, gae_advantages, td_lambda_returns
from pgvar.estimators.soft_q import (
    EntropyRegularizedPGLoss,
    boltzmann_log_probs,
    entropy_regularized_pg_loss,
    kl_regularized_n_step_advantages,
    kl_to_reference,
    soft_q_loss,
    soft_q_targets,
    soft_value,
)

__all__ = [
    "CONSTANT_BASELINES",
    "NORMALIZATION_MODES",
    "QPROP_ETA_RULES",
    "QPROP_ETA_SCOPES",
    "QPROP_NORMALIZATION_MODES",
    "AllActionControlVariate",
    "EntropyRegularizedPGLoss",
    "QPropNormalized",
    "all_action_control_variate",
    "batch_mean_baseline",
    "boltzmann_log_probs",
    "constant_baseline",
    "discounted_returns",
    "entropy_regularized_pg_loss",
    "gae_advantages",
    "kl_regularized_n_step_advantages",
    "kl_to_reference",
    "normalize_advantages",
    "optimal_constant_baseline",
    "qprop_action_variance",
    "qprop_control_variate",
    "qprop_correction_surrogate",
    "qprop_eta",
    "qprop_learning_signal",
    "qprop_normalize",
    "soft_q_loss",
    "soft_q_targets",
    "soft_value",
    "td_lambda_returns",
    "FactorizedBaselineEstimate",
    "factorized_action_baseline",
    "horizon_aware_value_loss",
    "horizon_aware_value_targets",
    "horizon_aware_values",
    "horizon_episode_flags",
    "other_action_dimensions",
    "time_to_go_factor",
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
