"""The one piece pgvar's on-policy algorithms share: estimator options and the rollout buffer (save/load: ``_save``).

:class:`OnPolicyEstimatorMixin` goes first in the bases of a subclass of an SB3 ``OnPolicyAlgorithm`` whose
``train()`` reads the advantages from ``self.rollout_buffer`` and the SB3 flag ``self.normalize_advantage``
(PPO, A2C, sb3-contrib's TRPO, or any A2C-like class). It changes no ``train()``: the estimator math runs in the
rollout buffer (:mod:`pgvar.algos.buffers`, which calls :mod:`pgvar.estimators`) before SB3's ``train()``
reads the advantages, and per-minibatch normalization stays SB3's own line in ``train()``.

A subclass's ``__init__`` calls :meth:`OnPolicyEstimatorMixin._init_estimator_options` **before**
``super().__init__``, with the SB3 arguments that SB3 does not check (:func:`pgvar.algos._checks.check_sb3_arguments`),
and passes the returned flag on as SB3's ``normalize_advantage``::

    class PPO(OnPolicyEstimatorMixin, stable_baselines3.PPO):
        def __init__(self, policy, env, ..., normalize_advantage=True, ..., *, baseline="value"):
            minibatch = self._init_estimator_options(
                gamma=gamma, gae_lambda=gae_lambda, baseline=baseline, normalize_advantage=normalize_advantage,
                learning_rate=learning_rate, n_steps=n_steps, ...,
            )
            super().__init__(policy, env, ..., normalize_advantage=minibatch, ...)

The ``ref_*`` options (regularization toward a frozen reference policy) come from
:class:`~pgvar.algos.reference.ReferenceOptionsMixin`: ``_init_reference_options`` in ``__init__``, the reference
built at the end of ``_setup_model`` and ``train()`` run through ``_train_with_reference``.

The mixin also brings :class:`~pgvar.algos._checks.RolloutChecksMixin`: ``learn(total_timesteps)`` is checked and
every observation the environments return must be finite.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer

from pgvar._sb3_policy import (
    actor_parameter_names,
    flatten_time_major,
    log_prob_loss,
    preprocess_actor_observations,
)
from pgvar._validation import check_choice, check_unit_interval
from pgvar.algos._checks import RolloutChecksMixin, check_sb3_arguments
from pgvar.algos.buffers import (
    BASELINES,
    EstimatorBufferMixin,
    EstimatorDictRolloutBuffer,
    EstimatorRolloutBuffer,
)
from pgvar.algos.reference import ReferenceOptionsMixin
from pgvar.estimators import NORMALIZATION_MODES
from pgvar.measure import per_sample_grad_sq_norms

__all__ = ["OnPolicyEstimatorMixin", "advantage_normalization_mode"]

#: Values ``normalize_advantage`` accepts: SB3's booleans (``True`` = per minibatch, ``False`` = none) and the modes.
NORMALIZE_ADVANTAGE_VALUES = (True, False, *NORMALIZATION_MODES)


def advantage_normalization_mode(normalize_advantage: bool | str) -> str:
    """Map a ``normalize_advantage`` argument to ``"minibatch"``, ``"batch"`` or ``"none"``.

    >>> advantage_normalization_mode(True), advantage_normalization_mode(False), advantage_normalization_mode("batch")
    ('minibatch', 'none', 'batch')
    """
    check_choice("normalize_advantage", normalize_advantage, NORMALIZE_ADVANTAGE_VALUES)
    if isinstance(normalize_advantage, str):
        return normalize_advantage
    return "minibatch" if normalize_advantage else "none"


class OnPolicyEstimatorMixin(RolloutChecksMixin, ReferenceOptionsMixin):
    """Adds ``baseline`` and the ``normalize_advantage`` modes to an SB3 on-policy algorithm (see module doc).

    Attributes set here (saved with the model): ``baseline`` (``"value"``, ``"none"``, ``"mean"`` or
    ``"optimal"``), ``advantage_normalization`` (``"minibatch"``, ``"batch"`` or ``"none"``) and SB3's flag
    ``normalize_advantage`` (a bool, ``True`` only for ``"minibatch"``: whether SB3's ``train()`` normalizes each
    minibatch).
    """

    baseline: str
    advantage_normalization: str
    normalize_advantage: bool

    # ------------------------------------------------------------------------------------------ options
    def _init_estimator_options(
        self,
        *,
        gamma: float,
        gae_lambda: float,
        baseline: str,
        normalize_advantage: bool | str,
        **sb3_arguments: Any,
    ) -> bool:
        """Validate the estimator arguments and ``sb3_arguments`` (SB3 arguments SB3 does not check:
        :func:`~pgvar.algos._checks.check_sb3_arguments`), store the estimator options, and return SB3's
        per-minibatch normalization flag."""
        check_unit_interval("gamma", gamma)
        check_unit_interval("gae_lambda", gae_lambda)
        check_sb3_arguments(**sb3_arguments)
        self.baseline = check_choice("baseline", baseline, BASELINES)
        self.advantage_normalization = advantage_normalization_mode(normalize_advantage)
        if self.baseline in ("mean", "optimal") and self.advantage_normalization != "none":
            warnings.warn(
                f"baseline={self.baseline!r} with normalize_advantage={self.advantage_normalization!r} is the same "
                "estimator as baseline='none': the normalization subtracts the (mini)batch mean of G - b, which "
                "cancels any constant b. Pass normalize_advantage='none' for the constant baseline to matter.",
                UserWarning,
                stacklevel=3,
            )
        return self.advantage_normalization == "minibatch"

    def _resolve_estimator_options(self) -> None:
        """Make ``advantage_normalization`` and SB3's ``normalize_advantage`` agree, and re-validate.

        ``load()`` overwrites the attributes with the saved ones (and its keyword arguments): a file saved by
        stable-baselines3 has a bool ``normalize_advantage`` and no pgvar keys, so the bool decides.
        """
        check_unit_interval("gamma", self.gamma)
        check_unit_interval("gae_lambda", self.gae_lambda)
        self.baseline = check_choice("baseline", getattr(self, "baseline", "value"), BASELINES)
        requested = self.normalize_advantage
        mode = getattr(self, "advantage_normalization", "minibatch")
        if isinstance(requested, str):
            mode = advantage_normalization_mode(requested)
        elif requested:
            mode = "minibatch"
        elif mode == "minibatch":
            mode = "none"
        self.advantage_normalization = mode
        self.normalize_advantage = mode == "minibatch"

    # -------------------------------------------------------------------------------------------- model
    def _setup_model(self) -> None:
        self._resolve_estimator_options()
        requested_class, requested_kwargs = self.rollout_buffer_class, self.rollout_buffer_kwargs
        estimator_class = self._estimator_buffer_class()
        if estimator_class is not None:
            self.rollout_buffer_class = estimator_class
            self.rollout_buffer_kwargs = {
                **requested_kwargs,
                "baseline": self.baseline,
                "normalize_batch": self.advantage_normalization == "batch",
            }
        try:
            super()._setup_model()
        finally:  # what is saved is what the user asked for (SB3's own None, so SB3 can load the file)
            self.rollout_buffer_class, self.rollout_buffer_kwargs = requested_class, requested_kwargs
        if self.baseline == "optimal":
            assert isinstance(self.rollout_buffer, EstimatorBufferMixin)
            self.rollout_buffer.score_sq_norms_fn = self._score_sq_norms
            self._check_score_sq_norms_supported()
        self._setup_reference()

    def _estimator_buffer_class(self) -> type[RolloutBuffer] | None:
        """The estimator buffer to build, or ``None`` to keep a user's own buffer class unchanged.

        ``None`` builds the estimator buffer for the observation space, as SB3 picks its own. SB3's
        ``RolloutBuffer`` and ``DictRolloutBuffer`` are replaced by their estimator subclasses whatever the space,
        so SB3's own checks still run (``DictRolloutBuffer`` on a ``Box`` space fails as in SB3). A subclass of
        the estimator buffers is used as is, with the options. Any other buffer class (or factory) is used as is:
        it computes SB3's GAE, which is exactly pgvar's default estimator, so it is refused only with a
        non-default ``baseline`` or ``normalize_advantage="batch"``, which it could not apply.
        """
        requested = self.rollout_buffer_class
        if requested is None:
            if isinstance(self.observation_space, spaces.Dict):
                return EstimatorDictRolloutBuffer
            return EstimatorRolloutBuffer
        if requested is RolloutBuffer:
            return EstimatorRolloutBuffer
        if requested is DictRolloutBuffer:
            return EstimatorDictRolloutBuffer
        if isinstance(requested, type) and issubclass(requested, EstimatorBufferMixin):
            return requested
        if self.baseline != "value" or self.advantage_normalization == "batch":
            raise ValueError(
                f"rollout_buffer_class={getattr(requested, '__name__', requested)} computes its own advantages, so "
                f"baseline={self.baseline!r} and normalize_advantage={self.advantage_normalization!r} cannot take "
                "effect; pass a subclass of pgvar.algos.buffers.EstimatorRolloutBuffer (or "
                "EstimatorDictRolloutBuffer), or rollout_buffer_class=None"
            )
        return None

    # --------------------------------------------------------------------- variance-optimal baseline
    def _score_sq_norms(self, observations: np.ndarray | dict[str, np.ndarray], actions: np.ndarray) -> th.Tensor:
        """``||grad_theta log pi(a_t|s_t)||^2`` over the actor's parameters, for ``[T, N, ...]`` buffer arrays.

        For SB3's ``ActorCriticPolicy`` (``get_distribution`` not overridden) the parameter-free observation
        preprocessing (one-hot encoding of discrete observations, image scaling) runs once outside the
        differentiated function, which then follows ``get_distribution`` step by step: features extractor, actor
        MLP, distribution (``torch.func`` cannot trace the one-hot encoding; see
        :func:`pgvar._sb3_policy.preprocess_actor_observations`). Other policies go through their own
        ``get_distribution``.

        :return: ``[T, N]`` float64
        """
        policy = self.policy
        steps, n_envs = actions.shape[:2]
        obs, preprocessed = preprocess_actor_observations(policy, flatten_time_major(observations, self.device))
        keys = sorted(obs) if isinstance(obs, dict) else None
        obs_inputs = [obs[key] for key in keys] if isinstance(obs, dict) and keys is not None else [obs]
        loss_fn = log_prob_loss(keys, weighted=False, preprocessed=preprocessed)
        with th.enable_grad():
            sq_norms = per_sample_grad_sq_norms(
                policy,
                loss_fn,
                (flatten_time_major(actions, self.device).float(), *obs_inputs),
                params=actor_parameter_names(policy),
            )
        return sq_norms.reshape(steps, n_envs)

    def _check_score_sq_norms_supported(self) -> None:
        """Raise ``ValueError`` at construction if ``baseline="optimal"`` cannot get per-sample score norms."""
        buffer = self.rollout_buffer
        rows = slice(0, min(2, buffer.buffer_size))
        observations = (
            {key: value[rows] for key, value in buffer.observations.items()}
            if isinstance(buffer.observations, dict)
            else buffer.observations[rows]
        )
        try:
            sq_norms = self._score_sq_norms(observations, buffer.actions[rows])
            if not bool(th.isfinite(sq_norms).all()):
                raise ValueError(f"got non-finite squared norms {sq_norms.flatten().tolist()}")
        except Exception as error:
            raise ValueError(
                f"baseline='optimal' needs per-sample gradients of log pi(a|s) through the policy "
                f"{type(self.policy).__name__}, which failed on a test batch: {error}. Use baseline='mean' (the "
                "batch mean return) or 'value', or a policy built from nn.Linear layers (SB3's MlpPolicy)."
            ) from error

    # ------------------------------------------------------------------------------------------- train
    def train(self) -> None:
        self._train_with_reference(super().train)
        constant_baseline = getattr(self.rollout_buffer, "constant_baseline", None)
        if constant_baseline is not None:
            self.logger.record("pgvar/constant_baseline", constant_baseline)
