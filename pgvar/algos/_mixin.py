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

``baseline="horizon"`` (the horizon-aware value of Tucker et al. 2018, :mod:`pgvar.algos.horizon_value`) replaces
the policy's ``value_net`` in ``_setup_model``, counts the in-episode step index of every environment in
``collect_rollouts`` (``_horizon_timesteps``, saved with the model) and hands the buffer the functions it needs.

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
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.type_aliases import MaybeCallback
from stable_baselines3.common.vec_env import VecEnv

from pgvar._sb3_policy import (
    actor_parameter_names,
    flatten_time_major,
    log_prob_loss,
    preprocess_actor_observations,
)
from pgvar._validation import check_choice, check_positive, check_unit_interval
from pgvar.algos._checks import RolloutChecksMixin, check_sb3_arguments
from pgvar.algos.buffers import (
    BASELINES,
    EstimatorBufferMixin,
    EstimatorDictRolloutBuffer,
    EstimatorRolloutBuffer,
    QPropBufferMixin,
)
from pgvar.algos.horizon_value import (
    EpisodeStepCounter,
    HorizonValueNet,
    attach_horizon_value,
    env_time_limit,
    horizon_values_fn,
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

    Attributes set here (saved with the model): ``baseline`` (``"value"``, ``"none"``, ``"mean"``,
    ``"optimal"`` or ``"horizon"``), ``advantage_normalization`` (``"minibatch"``, ``"batch"`` or ``"none"``),
    SB3's flag ``normalize_advantage`` (a bool, ``True`` only for ``"minibatch"``: whether SB3's ``train()``
    normalizes each minibatch), and for ``baseline="horizon"`` ``horizon_time_limit`` (the time limit ``T``,
    resolved from the environment when not given) and ``_horizon_timesteps`` (each environment's in-episode step
    index).
    """

    baseline: str
    advantage_normalization: str
    normalize_advantage: bool
    horizon_time_limit: int | None
    _horizon_timesteps: np.ndarray | None

    # ------------------------------------------------------------------------------------------ options
    def _init_estimator_options(
        self,
        *,
        gamma: float,
        gae_lambda: float,
        baseline: str,
        normalize_advantage: bool | str,
        horizon_time_limit: int | None = None,
        **sb3_arguments: Any,
    ) -> bool:
        """Validate the estimator arguments and ``sb3_arguments`` (SB3 arguments SB3 does not check:
        :func:`~pgvar.algos._checks.check_sb3_arguments`), store the estimator options, and return SB3's
        per-minibatch normalization flag."""
        check_unit_interval("gamma", gamma)
        check_unit_interval("gae_lambda", gae_lambda)
        check_sb3_arguments(**sb3_arguments)
        self.baseline = check_choice("baseline", baseline, BASELINES)
        self.horizon_time_limit = _check_horizon_time_limit(horizon_time_limit, self.baseline)
        self._horizon_timesteps = None
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
        self.horizon_time_limit = _check_horizon_time_limit(getattr(self, "horizon_time_limit", None), self.baseline)
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
            if self.baseline == "horizon":
                self.rollout_buffer_kwargs["horizon"] = self._resolve_time_limit()
        try:
            super()._setup_model()
        finally:  # what is saved is what the user asked for (SB3's own None, so SB3 can load the file)
            self.rollout_buffer_class, self.rollout_buffer_kwargs = requested_class, requested_kwargs
        if self.baseline == "optimal":
            assert isinstance(self.rollout_buffer, EstimatorBufferMixin)
            self.rollout_buffer.score_sq_norms_fn = self._score_sq_norms
            self._check_score_sq_norms_supported()
        if self.baseline == "horizon":
            self._setup_horizon_value()
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

    # ------------------------------------------------------------------------ horizon-aware value
    def _resolve_time_limit(self) -> int:
        """``T`` for ``baseline="horizon"``: ``horizon_time_limit``, else the env's ``spec.max_episode_steps``
        (stored in ``horizon_time_limit``, so a loaded model keeps it)."""
        if self.horizon_time_limit is None:
            limit = None if self.env is None else env_time_limit(self.env)
            if limit is None:
                where = "no env was given" if self.env is None else "env.spec.max_episode_steps is None"
                raise ValueError(
                    f"baseline='horizon' needs the environment's time limit T, and {where}: wrap the environment in "
                    "a gymnasium TimeLimit (gymnasium.make(..., max_episode_steps=T)) or pass horizon_time_limit=T"
                )
            self.horizon_time_limit = limit
        return self.horizon_time_limit

    def _setup_horizon_value(self) -> None:
        """Give the policy its horizon-aware value net and the buffer the functions it calls."""
        if isinstance(self.rollout_buffer, QPropBufferMixin):
            raise ValueError(
                f"baseline='horizon' is supported by pgvar's PPO, A2C and TRPO, not by {type(self).__name__} (its "
                "train() computes values of its own); use baseline='value'"
            )
        assert self.horizon_time_limit is not None and isinstance(self.rollout_buffer, EstimatorBufferMixin)
        value_net = attach_horizon_value(
            self.policy, horizon=self.horizon_time_limit, gamma=self.gamma, learning_rate=self.lr_schedule(1)
        )
        self.rollout_buffer.horizon_values_fn = horizon_values_fn(self.policy, value_net)
        self.rollout_buffer.sample_timesteps_fn = lambda timesteps: setattr(value_net, "timesteps", timesteps)

    def _horizon_value_net(self) -> HorizonValueNet | None:
        value_net = getattr(self.policy, "value_net", None)
        return value_net if isinstance(value_net, HorizonValueNet) else None

    def _setup_learn(
        self,
        total_timesteps: int,
        callback: MaybeCallback = None,
        reset_num_timesteps: bool = True,
        tb_log_name: str = "run",
        progress_bar: bool = False,
    ) -> tuple[int, BaseCallback]:
        resets = reset_num_timesteps or self._last_obs is None
        result = super()._setup_learn(total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar)
        if self.baseline == "horizon":
            counts = getattr(self, "_horizon_timesteps", None)
            if resets or counts is None or np.shape(counts) != (self.n_envs,):
                self._horizon_timesteps = np.zeros(self.n_envs, dtype=np.int64)
            else:
                self._horizon_timesteps = np.asarray(counts, dtype=np.int64)
        return result

    def collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int
    ) -> bool:
        """SB3's ``collect_rollouts``; with ``baseline="horizon"`` each step's ``t`` is counted and recorded."""
        value_net = self._horizon_value_net()
        if value_net is not None and self._horizon_timesteps is not None:
            value_net.timesteps = None  # SB3's calls while collecting get V0; the buffer recomputes V(s, t)
            assert isinstance(rollout_buffer, EstimatorBufferMixin)
            callback = EpisodeStepCounter(callback, self._horizon_timesteps, rollout_buffer)
        return super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)

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
        try:
            self._train_with_reference(super().train)
        finally:
            value_net = self._horizon_value_net()
            if value_net is not None:  # the step indices of the last minibatch
                value_net.timesteps = None
        constant_baseline = getattr(self.rollout_buffer, "constant_baseline", None)
        if constant_baseline is not None:
            self.logger.record("pgvar/constant_baseline", constant_baseline)


def _check_horizon_time_limit(horizon_time_limit: Any, baseline: str) -> int | None:
    """``horizon_time_limit`` as an int (or ``None``); only ``baseline="horizon"`` takes one."""
    if horizon_time_limit is None:
        return None
    if baseline != "horizon":
        raise ValueError(
            f"horizon_time_limit={horizon_time_limit!r} is the time limit of baseline='horizon' and has no effect with "
            f"baseline={baseline!r}; drop it or pass baseline='horizon'"
        )
    return int(check_positive("horizon_time_limit", horizon_time_limit, integer=True))
