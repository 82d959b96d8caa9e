r"""Regularizing an on-policy algorithm toward a frozen reference policy :math:`\pi_{\text{ref}}`.

:class:`ReferenceRegularizer` is the object a PPO / A2C / TRPO model holds when it is built with ``ref_policy``
(:class:`ReferenceMixin` adds the constructor options, the hooks and save/load). Two placements:

- ``ref_placement="reward"`` (default): before GAE the buffer subtracts :math:`\lambda\, k(s_t, a_t)` from each
  reward, a per-step penalty at the *sampled* action, treated as a constant (reward shaping). With the KL and the
  k1 estimator :math:`k_1 = \log\pi(a_t|s_t) - \log\pi_{\text{ref}}(a_t|s_t)`, the policy gradient is exactly the
  gradient of the KL-regularized return :math:`\mathbb{E}\sum_t \gamma^t(r_t - \lambda\,\mathrm{KL}_t)`
  (``docs/guide/regularization.md``); k2 / k3 are refused there, since they are not.
- ``ref_placement="loss"``: :math:`\lambda\,\overline{D}` (the minibatch mean of a per-state divergence) is added to
  the policy loss of SB3's ``train()``. ``ref_estimator="exact"`` uses the closed form for Categorical and diagonal
  Gaussian policies (:func:`~pgvar.estimators.categorical_divergence`,
  :func:`~pgvar.estimators.diagonal_gaussian_divergence`); ``"k3"`` (KL only) uses k3 at the stored actions, as
  GRPO does, whose gradient at :math:`\pi = \pi_{\text{old}}` is :math:`\nabla\mathrm{KL}(\pi_{\text{ref}}\|\pi)`
  (the reverse KL): :math:`\nabla k_3 = (1 - \pi_{\text{ref}}/\pi)\nabla\log\pi`.

Occupancy measures (``ref_measure="state"`` or ``"state_action"``): the reward penalty comes from a discriminator
between the policy's and the reference's visits (:mod:`pgvar.algos.occupancy`, held as
``reference_regularizer.occupancy``).

Adaptive coefficient (``ref_coef="adaptive"``, Ziegler et al. 2019, arXiv:1909.08593, Sec. 2.2): after each
rollout of :math:`n` transitions (``n_steps * n_envs``) with mean divergence :math:`\hat D`,

.. math::  \lambda \leftarrow \lambda\,\Big(1 + \operatorname{clip}\big(\hat D / D_{\text{target}} - 1,
           -0.2, 0.2\big)\, \frac{n}{H}\Big), \qquad \lambda_0 = 0.2,\ H = \texttt{ref\_horizon} .
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.policies import BasePolicy

from pgvar._sb3_policy import flatten_time_major, policy_log_prob
from pgvar._validation import check_cap, check_choice, check_nonnegative, check_positive
from pgvar.algos.occupancy import (
    OccupancyDiscriminator,
    OccupancyPenalty,
    ReferenceRollouts,
    check_discriminator_kwargs,
    check_measure_options,
    make_reference_env,
)
from pgvar.algos.reference_policy import (
    exact_policy_divergence,
    exact_policy_divergence_supported,
    load_reference_policy,
)
from pgvar.estimators import chi2_sample_estimate, kl_sample_estimate, odds_ratio_cap_penalty

__all__ = [
    "ADAPTIVE_INITIAL_COEF",
    "REF_ESTIMATORS",
    "REF_MEASURES",
    "REF_PLACEMENTS",
    "REF_REGULARIZERS",
    "REFERENCE_OPTIONS",
    "REFERENCE_PARAMETERS",
    "ReferenceOptionsMixin",
    "ReferenceRegularizer",
    "check_reference_option_names",
    "check_reference_options",
    "exact_policy_divergence",
    "load_reference_policy",
]

#: The regularizers: KL, chi-squared, its square root, and the hinge on the log odds ratio above ``log ref_cap``.
REF_REGULARIZERS = ("kl", "chi2", "sqrt_chi2", "odds_ratio_cap")
#: What is compared with the reference: the per-state action distributions, or (a discriminator,
#: :mod:`pgvar.algos.occupancy`) the state or state-action occupancy measures.
REF_MEASURES = ("action", "state", "state_action")
#: Where the regularizer enters: the rewards before GAE, or the policy loss.
REF_PLACEMENTS = ("reward", "loss")
#: ``"k1"``: the per-step penalty at the sampled action (the only choice in the reward); ``"k3"``: Schulman's k3 at
#: the stored actions (loss, KL only); ``"exact"``: the closed-form divergence per state (loss).
REF_ESTIMATORS = ("k1", "k3", "exact")
#: The adaptive coefficient's starting value (``init_kl_coef`` of the RLHF KL controller).
ADAPTIVE_INITIAL_COEF = 0.2
_ADAPTIVE_CLIP = 0.2


def check_reference_options(
    *,
    regularizer: str,
    coef: float | str,
    target: float | None,
    horizon: float,
    estimator: str | None,
    placement: str,
    cap: float,
    measure: str = "action",
    rollout_steps: int | None = None,
    rollout_every: int = 1,
) -> str | None:
    """Validate the ``ref_*`` options (``ValueError`` naming the argument) and return the resolved estimator
    (``None``: ``"k1"`` in the reward, ``"exact"`` in the loss; stays ``None`` for an occupancy measure)."""
    check_choice("ref_placement", placement, REF_PLACEMENTS)
    check_measure_options(
        measure=measure, regularizer=regularizer, estimator=estimator, placement=placement,
        rollout_steps=rollout_steps, every=rollout_every,
    )
    if measure == "action" and regularizer == "tv":
        raise ValueError(
            "ref_regularizer='tv' is only available for an occupancy measure (ref_measure='state' or "
            "'state_action'); for the action distribution use one of "
            f"{', '.join(repr(r) for r in REF_REGULARIZERS)}"
        )
    if measure == "action":
        check_choice("ref_regularizer", regularizer, REF_REGULARIZERS)
    if isinstance(coef, str):
        check_choice("ref_coef", coef, ("adaptive",))
        if target is None:
            raise ValueError("ref_coef='adaptive' needs ref_target, the divergence to hold (a number > 0); got None")
        check_positive("ref_target", target)
    else:
        check_nonnegative("ref_coef", coef)
        if target is not None:
            raise ValueError(f"ref_target={target!r} is only used with ref_coef='adaptive', got ref_coef={coef!r}")
    check_positive("ref_horizon", horizon)
    check_cap("ref_cap", cap)
    if measure != "action":
        return None
    resolved = ("k1" if placement == "reward" else "exact") if estimator is None else estimator
    check_choice("ref_estimator", resolved, REF_ESTIMATORS)
    if placement == "reward":
        if resolved != "k1":
            raise ValueError(
                f"ref_estimator={resolved!r} with ref_placement='reward': only 'k1' (the penalty at the sampled "
                "action) gives the gradient of the regularized return when added to the reward; k3 does not "
                "(docs/guide/regularization.md) and 'exact' needs ref_placement='loss'"
            )
        if regularizer == "sqrt_chi2":
            raise ValueError(
                "ref_regularizer='sqrt_chi2' has no unbiased per-step estimate for ref_placement='reward'; use "
                "ref_placement='loss' (exact for Categorical and diagonal Gaussian policies)"
            )
    elif resolved == "k1":
        raise ValueError(
            "ref_estimator='k1' with ref_placement='loss': the gradient of k1 at the stored actions is zero in "
            "expectation at pi = pi_old; allowed in the loss: 'exact' (closed form) or 'k3' (KL only)"
        )
    elif resolved == "k3" and regularizer != "kl":
        raise ValueError(f"ref_estimator='k3' estimates the KL only, got ref_regularizer={regularizer!r}")
    return resolved


def _sample_penalty(log_probs: th.Tensor, ref_log_probs: th.Tensor, regularizer: str, cap: float) -> th.Tensor:
    """The per-step penalty at the sampled action (``ref_estimator="k1"``)."""
    if regularizer == "kl":
        return kl_sample_estimate(log_probs, ref_log_probs, "k1")
    if regularizer == "chi2":
        return chi2_sample_estimate(log_probs, ref_log_probs)
    return odds_ratio_cap_penalty(log_probs, ref_log_probs, cap)



#: The names of the ``ref_*`` constructor options (QPropPPO / QPropTRPO take them as keywords and pass them on).
REFERENCE_OPTIONS = (
    "ref_policy", "ref_regularizer", "ref_coef", "ref_target", "ref_estimator", "ref_placement", "ref_cap",
    "ref_horizon", "ref_measure", "ref_env", "ref_rollout_steps", "ref_rollout_every", "ref_discriminator_kwargs",
)  # fmt: skip


def check_reference_option_names(owner: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` if every key is one of :data:`REFERENCE_OPTIONS`, else ``TypeError`` naming ``owner``."""
    unknown = sorted(set(options) - set(REFERENCE_OPTIONS))
    if unknown:
        raise TypeError(
            f"{owner}() got unexpected keyword arguments {unknown}; its keyword options beyond its own are the "
            f"reference options {', '.join(REFERENCE_OPTIONS)}"
        )
    return options


#: The ``:param:`` lines of the ``ref_*`` options, appended to the docstrings of PPO, A2C and TRPO.
REFERENCE_PARAMETERS = """:param ref_policy: regularize toward a frozen reference policy (:mod:`pgvar.algos.reference`, off by default):
        ``"initial"`` (a frozen copy of the initial policy), the path of a saved model, or an SB3 policy object
        (copied and frozen); its spaces must be the model's. The ``ref_*`` options below act only with it.
    :param ref_regularizer: ``"kl"`` (default), ``"chi2"``, ``"sqrt_chi2"`` (``ref_placement="loss"`` only) or
        ``"odds_ratio_cap"`` (hinge on ``log pi/pi_ref - log ref_cap``)
    :param ref_coef: the coefficient ``>= 0`` (default 0.1), or ``"adaptive"`` (the RLHF KL controller, starting at
        0.2, driven toward ``ref_target`` with horizon ``ref_horizon`` transitions)
    :param ref_target: the target divergence of ``ref_coef="adaptive"`` (> 0)
    :param ref_estimator: ``"k1"`` (the per-step penalty at the sampled action; the default and the only choice in
        the reward, where k1 gives the exact gradient of the KL-regularized return), ``"exact"`` (closed-form
        divergence per state, Categorical and diagonal Gaussian; the default in the loss) or ``"k3"`` (loss, KL)
    :param ref_placement: ``"reward"`` (default: subtract ``ref_coef`` times the penalty from the rewards before
        GAE) or ``"loss"`` (add ``ref_coef`` times the mean divergence to the policy loss)
    :param ref_cap: the odds-ratio cap ``c >= 1`` of ``ref_regularizer="odds_ratio_cap"`` (default 2)
    :param ref_horizon: the adaptive coefficient's horizon in transitions (> 0, default 10000)
    :param ref_measure: what is held near the reference: ``"action"`` (default: the per-state action
        distributions, as above), ``"state"`` or ``"state_action"`` (the occupancy measure, ORPO: a discriminator
        trained each rollout against rollouts of the reference, :mod:`pgvar.algos.occupancy`; ``ref_regularizer``
        ``"kl"``, ``"chi2"``, ``"sqrt_chi2"`` or ``"tv"``, ``ref_placement="reward"`` only; logs
        ``pgvar/ref_occupancy_<regularizer>`` and ``pgvar/ref_discriminator_accuracy``)
    :param ref_env: the environment the reference acts in for an occupancy measure (``None``: a copy of the
        model's; an env, ``VecEnv`` or env id; not saved)
    :param ref_rollout_steps: reference transitions per collection (> 0; ``None``: ``n_steps * n_envs``)
    :param ref_rollout_every: collect reference transitions every this many rollouts (>= 1, default 1)
    :param ref_discriminator_kwargs: the discriminator's ``net_arch`` (default ``(256, 256)``), ``learning_rate``
        (1e-3), ``n_epochs`` (5), ``batch_size`` (256) and ``logit_clip`` (10)
"""

class _AddGradient(th.autograd.Function):
    """``x + 0`` in the forward pass; in the backward pass ``scale * d(sum term)/d(inputs)`` is added, whatever
    gradient reaches ``x``: the gradient of ``loss + scale * term.sum()`` without changing SB3's loss value."""

    @staticmethod
    def forward(ctx: Any, x: th.Tensor, term: th.Tensor, scale: float) -> th.Tensor:
        ctx.scale = scale
        ctx.term_shape, ctx.term_dtype = term.shape, term.dtype
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: th.Tensor) -> tuple[th.Tensor, th.Tensor, None]:
        return grad, th.full(ctx.term_shape, ctx.scale, dtype=ctx.term_dtype, device=grad.device), None


class ReferenceRegularizer:
    """The frozen reference policy and the regularizer's state (coefficient, last statistics).

    :param reference: the frozen reference policy (:func:`load_reference_policy`)
    :param regularizer: one of :data:`REF_REGULARIZERS`
    :param coef: the current coefficient :math:`\\lambda \\ge 0`
    :param adaptive_target: the target divergence of the adaptive coefficient, or ``None`` (fixed coefficient)
    :param horizon: the adaptive controller's horizon :math:`H` (transitions)
    :param estimator: ``"k1"``, ``"k3"`` or ``"exact"`` (checked by :func:`check_reference_options`)
    :param placement: ``"reward"`` or ``"loss"``
    :param cap: the odds-ratio cap :math:`c \\ge 1`
    :param occupancy: for an occupancy measure, the discriminator and reference rollouts
        (:class:`~pgvar.algos.occupancy.OccupancyPenalty`) that make the reward penalty; ``None``: the action measure
    """

    def __init__(
        self,
        reference: BasePolicy,
        *,
        regularizer: str,
        coef: float,
        adaptive_target: float | None,
        horizon: float,
        estimator: str,
        placement: str,
        cap: float,
        occupancy: OccupancyPenalty | None = None,
    ) -> None:
        self.reference: Any = reference
        self.occupancy = occupancy  # an SB3 policy with get_distribution (ActorCriticPolicy and kin)
        self.regularizer, self.estimator, self.placement = regularizer, estimator, placement
        self.coef, self.adaptive_target, self.horizon, self.cap = float(coef), adaptive_target, float(horizon), cap
        #: ``{"kl": ..., regularizer: ...}``: means over the last rollout (reward) or over the last train() (loss)
        self.stats: dict[str, float] = {}
        #: the statistic the adaptive coefficient follows
        self.controlled = regularizer if occupancy is None else f"occupancy_{regularizer}"
        #: the last reward penalty subtracted (``[T, N]``, ``coef`` included), ``None`` if none (Q-Prop's replay)
        self.last_penalty: th.Tensor | None = None
        self._loss_values: list[th.Tensor] = []
        self._last_actions = th.empty(0)

    def _ref_log_prob(self, observations: Any, actions: th.Tensor) -> th.Tensor:
        with th.no_grad():
            return policy_log_prob(self.reference, observations, actions)

    # ------------------------------------------------------------------------------------------ reward
    def reward_penalty(self, observations: Any, actions: np.ndarray, log_probs: np.ndarray) -> th.Tensor | None:
        """``coef * k(s_t, a_t)``, ``[T, N]`` float64, to subtract from the rewards (``None`` when ``coef == 0``:
        the rewards stay bit for bit); records the rollout's mean penalty and KL estimate in :attr:`stats`."""
        if self.occupancy is not None:
            penalty, self.stats = self.occupancy.reward_penalty(
                observations, actions, regularizer=self.regularizer, coef=1.0
            )
            self.last_penalty = None if self.coef == 0.0 else self.coef * penalty
            return self.last_penalty
        steps, n_envs = actions.shape[:2]
        device = self.reference.device
        obs = flatten_time_major(observations, device)
        ref_log_probs = self._ref_log_prob(obs, flatten_time_major(actions, device).float()).double().cpu()
        log_probs_t = th.from_numpy(np.asarray(log_probs)).double().reshape(-1)
        penalty = _sample_penalty(log_probs_t, ref_log_probs, self.regularizer, self.cap).reshape(steps, n_envs)
        self.stats = {"kl": float(kl_sample_estimate(log_probs_t, ref_log_probs, "k1").mean())}
        self.stats[self.regularizer] = float(penalty.mean())
        self.last_penalty = None if self.coef == 0.0 else self.coef * penalty
        return self.last_penalty

    # -------------------------------------------------------------------------------------------- loss
    def loss_term(self, policy: Any, observations: Any, log_prob: th.Tensor) -> th.Tensor:
        """``log_prob`` unchanged, carrying the gradient of ``coef * mean_B D(s)`` (see :class:`_AddGradient`)."""
        if self.estimator == "k3":
            ref_log_probs = self._ref_log_prob(observations, self._last_actions)
            term = kl_sample_estimate(log_prob, ref_log_probs.to(log_prob.dtype), "k3")
        else:
            with th.no_grad():
                ref_distribution = self.reference.get_distribution(observations)
            term = exact_policy_divergence(policy.get_distribution(observations), ref_distribution, self.regularizer, self.cap)
        self._loss_values.append(term.detach().mean())
        if self.coef == 0.0:
            return log_prob
        carried: th.Tensor = _AddGradient.apply(log_prob, term, self.coef / term.numel())
        return carried

    def wrap_evaluate_actions(self, policy: Any) -> Any:
        """A replacement for ``policy.evaluate_actions`` whose log-probabilities carry the loss term."""
        original = policy.evaluate_actions

        def evaluate_actions(observations: Any, actions: th.Tensor) -> Any:
            values, log_prob, entropy = original(observations, actions)
            self._last_actions = actions
            return values, self.loss_term(policy, observations, log_prob), entropy

        return evaluate_actions

    def finish_loss_stats(self) -> None:
        """Move the mean loss-term value of the last ``train()`` into :attr:`stats`."""
        if self._loss_values:
            value = float(th.stack(self._loss_values).mean())
            self.stats = {self.regularizer: value}
            if self.regularizer == "kl":
                self.stats["kl"] = value
        self._loss_values = []

    # ---------------------------------------------------------------------------------------- adaptive
    def update_coef(self, n_transitions: int) -> None:
        """The adaptive controller's step (module doc); nothing for a fixed coefficient."""
        if self.adaptive_target is None or self.controlled not in self.stats:
            return
        error = float(np.clip(self.stats[self.controlled] / self.adaptive_target - 1.0, -_ADAPTIVE_CLIP, _ADAPTIVE_CLIP))
        self.coef *= 1.0 + error * n_transitions / self.horizon


# --------------------------------------------------------------------------------------------- the mixin
class ReferenceOptionsMixin:
    """The ``ref_*`` constructor options, their hooks and save/load, for :class:`~pgvar.algos._mixin.OnPolicyEstimatorMixin`.

    Saved with the model: the options, the current coefficient ``ref_coef_value``, the reference's class and
    constructor arguments (``ref_policy_class``, ``ref_policy_kwargs``) and, as a torch state dict entry of the zip,
    its parameters (``reference_regularizer.reference``). ``ref_policy`` is saved as a description (``"initial"``,
    the path, or ``"policy"``); the reference itself is rebuilt from the saved entries on load.
    """

    #: whether ``train()`` computes the policy loss through ``policy.evaluate_actions`` (TRPO's does not)
    _ref_loss_supported = True

    ref_policy: str | None
    ref_regularizer: str
    ref_coef: float | str
    ref_target: float | None
    ref_horizon: float
    ref_estimator: str | None
    ref_placement: str
    ref_cap: float
    ref_coef_value: float | None
    ref_policy_class: type | None
    ref_policy_kwargs: dict[str, Any] | None
    ref_measure: str
    ref_env: Any
    ref_rollout_steps: int | None
    ref_rollout_every: int
    ref_discriminator_kwargs: dict[str, Any] | None

    def _init_reference_options(  # noqa: PLR0913
        self,
        *,
        ref_policy: Any,
        ref_regularizer: str,
        ref_coef: float | str,
        ref_target: float | None,
        ref_estimator: str | None,
        ref_placement: str,
        ref_cap: float,
        ref_horizon: float,
        ref_measure: str = "action",
        ref_env: Any = None,
        ref_rollout_steps: int | None = None,
        ref_rollout_every: int = 1,
        ref_discriminator_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Validate and store the options (``ValueError`` naming the argument); the reference is built in setup."""
        self.ref_regularizer, self.ref_coef, self.ref_target = ref_regularizer, ref_coef, ref_target
        self.ref_estimator, self.ref_placement, self.ref_cap = ref_estimator, ref_placement, ref_cap
        self.ref_horizon, self.ref_measure, self.ref_env = ref_horizon, ref_measure, ref_env
        self.ref_rollout_steps, self.ref_rollout_every = ref_rollout_steps, ref_rollout_every
        self.ref_discriminator_kwargs = ref_discriminator_kwargs
        self._check_reference_options()
        if isinstance(ref_policy, str) and ref_policy == "initial":
            self.ref_policy = "initial"
        elif ref_policy is None or isinstance(ref_policy, BasePolicy):
            self.ref_policy = None if ref_policy is None else "policy"
        elif isinstance(ref_policy, str) or hasattr(ref_policy, "__fspath__"):
            self.ref_policy = str(ref_policy)
        else:
            raise ValueError(
                "ref_policy must be None, 'initial', the path of a saved model or an SB3 policy, got "
                f"{type(ref_policy).__name__}"
            )
        self._ref_policy_source = ref_policy
        self.ref_coef_value, self.ref_policy_class, self.ref_policy_kwargs = None, None, None

    def _check_reference_options(self) -> None:
        self.ref_estimator = check_reference_options(
            regularizer=self.ref_regularizer, coef=self.ref_coef, target=self.ref_target, horizon=self.ref_horizon,
            estimator=self.ref_estimator, placement=self.ref_placement, cap=self.ref_cap, measure=self.ref_measure,
            rollout_steps=self.ref_rollout_steps, rollout_every=self.ref_rollout_every,
        )
        check_discriminator_kwargs(self.ref_discriminator_kwargs)
        if self.ref_placement == "loss" and not self._ref_loss_supported:
            raise ValueError(
                f"ref_placement='loss' is not available for {type(self).__name__}: its train() does not compute the "
                "policy loss through policy.evaluate_actions; use ref_placement='reward'"
            )

    def _setup_reference(self) -> None:
        """Build the frozen reference (at construction from ``ref_policy``; on load from the saved class and
        arguments, the parameters then come from the zip) and hook it into the buffer."""
        self.__dict__.pop("reference_regularizer", None)
        source = self.__dict__.pop("_ref_policy_source", None)
        if self.__dict__.get("ref_policy") is None:
            return
        self._check_reference_options()
        model: Any = self
        if source is not None:
            reference = load_reference_policy(model.policy if source == "initial" else source, model.device)
            kwargs = reference._get_constructor_parameters()
            for key in ("observation_space", "action_space", "lr_schedule"):
                kwargs.pop(key, None)
            self.ref_policy_class, self.ref_policy_kwargs = type(reference), kwargs
        else:
            assert self.ref_policy_class is not None
            reference = self.ref_policy_class(
                model.observation_space, model.action_space, lambda _: 0.0, **(self.ref_policy_kwargs or {})
            )
            reference = load_reference_policy(reference, model.device)
        for name in ("observation_space", "action_space"):
            if getattr(reference, name) != getattr(model, name):
                raise ValueError(
                    f"ref_policy has {name} {getattr(reference, name)}, but the model's is {getattr(model, name)}: the "
                    "reference must act in the same spaces"
                )
        adaptive = self.ref_coef == "adaptive"
        if adaptive:
            coef = ADAPTIVE_INITIAL_COEF if self.ref_coef_value is None else self.ref_coef_value
        else:
            coef = float(self.ref_coef)
        regularizer = ReferenceRegularizer(
            reference, regularizer=self.ref_regularizer, coef=coef, adaptive_target=self.ref_target if adaptive else None,
            horizon=self.ref_horizon, estimator=self.ref_estimator or "k1", placement=self.ref_placement,
            cap=self.ref_cap, occupancy=None if self.ref_measure == "action" else self._occupancy_penalty(reference),
        )
        if self.ref_placement == "loss":
            exact_policy_divergence_supported(model.policy, self.ref_regularizer, regularizer.estimator)
        else:
            model.rollout_buffer.reward_penalty_fn = regularizer.reward_penalty
        self.ref_coef_value = coef
        self.reference_regularizer = regularizer

    def _occupancy_penalty(self, reference: BasePolicy) -> OccupancyPenalty:
        """The discriminator (``ref_discriminator_kwargs``) and the reference rollouts of ``ref_measure``; the
        reference environment is built now if the model has an environment (errors at construction), else on the
        first rollout."""
        model: Any = self
        options = check_discriminator_kwargs(self.ref_discriminator_kwargs)
        discriminator = OccupancyDiscriminator(
            model.observation_space, model.action_space if self.ref_measure == "state_action" else None,
            device=model.device, **options,
        )
        rollouts = ReferenceRollouts(reference, lambda: make_reference_env(model, self.ref_env), model.get_env)
        if self.ref_env is not None or model.get_env() is not None:
            rollouts.env, rollouts.synced = rollouts.env_factory()
        steps = self.ref_rollout_steps or model.n_steps * model.n_envs
        return OccupancyPenalty(discriminator, rollouts, rollout_steps=int(steps), rollout_every=int(self.ref_rollout_every))

    def _train_with_reference(self, train: Any) -> None:
        """Run ``train()`` (with the loss term when ``ref_placement="loss"``), log and update the coefficient."""
        regularizer: ReferenceRegularizer | None = self.__dict__.get("reference_regularizer")
        if regularizer is None:
            train()
            return
        model: Any = self
        if regularizer.placement == "loss":
            model.policy.evaluate_actions = regularizer.wrap_evaluate_actions(model.policy)
            try:
                train()
            finally:
                del model.policy.evaluate_actions
            regularizer.finish_loss_stats()
        else:
            train()
        for key, value in regularizer.stats.items():
            model.logger.record(f"pgvar/ref_{key}", value)
        model.logger.record("pgvar/ref_coef", regularizer.coef)
        regularizer.update_coef(model.n_steps * model.n_envs)
        self.ref_coef_value = regularizer.coef

    def _excluded_save_params(self) -> list[str]:
        excluded = ["reference_regularizer", "_ref_policy_source", "ref_env"]
        return [*super()._excluded_save_params(), *excluded]  # type: ignore[misc]

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        state_dicts, torch_variables = super()._get_torch_save_params()  # type: ignore[misc]
        regularizer = self.__dict__.get("reference_regularizer")
        if regularizer is not None:
            state_dicts = [*state_dicts, "reference_regularizer.reference"]
        if regularizer is not None and regularizer.occupancy is not None:
            name = "reference_regularizer.occupancy.discriminator"
            state_dicts = [*state_dicts, name, f"{name}.optimizer"]
        return state_dicts, torch_variables
