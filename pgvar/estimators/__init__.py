"""Pure tensor estimators (torch only): returns, advantages, baselines, normalization, control variates, soft-Q,
regularizers toward a reference policy.

Every function takes time-major ``[T, N]`` tensors where time matters, states its formula and reference in its
docstring, and validates its arguments (``ValueError`` naming the argument, the value and what is allowed).
"""

from pgvar.estimators.baselines import batch_mean_baseline, optimal_constant_baseline
from pgvar.estimators.control_variates import (
    QPROP_ETA_RULES,
    QPROP_ETA_SCOPES,
    QPROP_NORMALIZATION_MODES,
    AllActionControlVariate,
    QPropNormalized,
    all_action_control_variate,
    default_crossfit_folds,
    qprop_action_variance,
    qprop_control_variate,
    qprop_correction_surrogate,
    qprop_eta,
    qprop_learning_signal,
    qprop_normalize,
)
from pgvar.estimators.normalization import NORMALIZATION_MODES, normalize_advantages
from pgvar.estimators.regularizers import (
    DIVERGENCES,
    KL_ESTIMATORS,
    capped_log_probs,
    categorical_divergence,
    check_cap,
    check_coefficient,
    chi2_sample_estimate,
    diagonal_gaussian_divergence,
    discriminator_logistic_loss,
    kl_sample_estimate,
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
    "default_crossfit_folds",
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
    "DIVERGENCES",
    "KL_ESTIMATORS",
    "capped_log_probs",
    "categorical_divergence",
    "check_cap",
    "check_coefficient",
    "chi2_sample_estimate",
    "diagonal_gaussian_divergence",
    "discriminator_logistic_loss",
    "kl_sample_estimate",
    "occupancy_penalty_rewards",
    "odds_ratio_cap_penalty",
]
