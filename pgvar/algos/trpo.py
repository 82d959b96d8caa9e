"""TRPO with a choice of policy-gradient baseline and advantage normalization; sb3-contrib's TRPO otherwise."""

from __future__ import annotations

from typing import Any

import sb3_contrib
import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import GymEnv, Schedule

from pgvar.algos._mixin import OnPolicyEstimatorMixin
from pgvar.algos._save import SaveLoadMixin
from pgvar.algos.reference import REFERENCE_PARAMETERS

__all__ = ["TRPO"]


class TRPO(SaveLoadMixin, OnPolicyEstimatorMixin, sb3_contrib.TRPO):
    """Trust Region Policy Optimization, a drop-in replacement for :class:`sb3_contrib.TRPO`.

    Change ``from sb3_contrib import TRPO`` to ``from pgvar import TRPO``: with the default arguments the
    trained parameters are bit-for-bit those of sb3-contrib (same seed, same environment). Two arguments choose
    the policy-gradient estimator; returns and advantages come from :mod:`pgvar.estimators`.

    Paper: Schulman et al. (2015), arXiv:1502.05477. Every other argument, its default and meaning are those of
    :class:`sb3_contrib.TRPO` (``learning_rate=1e-3, n_steps=2048, batch_size=128, target_kl=0.01, ...``).

    ``ref_placement="loss"`` is refused: sb3-contrib's ``train()`` takes the gradient and the line search on its
    own surrogate, so the reference regularizer enters TRPO through the reward.

    :param normalize_advantage: ``"minibatch"`` (or ``True``, the default: sb3-contrib's standardization in
        ``train()``, over the whole rollout, or its sub-sample with ``sub_sampling_factor > 1``), ``"batch"``
        (standardized once over the whole rollout when it is collected) or ``"none"`` (or ``False``)
    :param baseline: what is subtracted from the return in the policy gradient. ``"value"`` (default):
        GAE(gamma, gae_lambda) advantages with the learned ``V(s)``. ``"none"``: the discounted return-to-go
        ``G_t`` (bootstrapped from ``V`` at time-limit truncations and at the end of the rollout). ``"mean"``:
        ``G_t`` minus the batch mean. ``"optimal"``: ``G_t`` minus the variance-optimal constant
        ``b* = E[||g||^2 G] / E[||g||^2]`` (Greensmith et al. 2004) with per-sample score norms over the actor's
        parameters. ``"horizon"``: GAE advantages with the horizon-aware value of Tucker et al. (2018, Sec. 6; their
        TRPO experiments), ``V(s, t) = V0(s) + (1 - gamma^(T - t)) / (1 - gamma) * r_bar(s)``, ``t`` the step index
        within the episode and ``T`` the time limit: a second head ``r_bar`` on the value torso (SB3's
        ``ActorCriticPolicy``), trained with ``V0`` in the critic updates, and the end at the time limit is a
        termination (:mod:`pgvar.algos.horizon_value`). The value function is trained on the TD(lambda) returns
        whatever the baseline.
    :param horizon_time_limit: ``T`` for ``baseline="horizon"`` (``None``: the environment's
        ``spec.max_episode_steps``; ``ValueError`` when that is unknown too, or when given with another baseline)
    :param gamma: discount factor in ``[0, 1]`` (``ValueError`` otherwise)
    :param gae_lambda: GAE trace decay in ``[0, 1]`` (``ValueError`` otherwise)
    """

    __doc__ = f"{__doc__}{REFERENCE_PARAMETERS}"

    _ref_loss_supported = False

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 1e-3,
        n_steps: int = 2048,
        batch_size: int = 128,
        gamma: float = 0.99,
        cg_max_steps: int = 15,
        cg_damping: float = 0.1,
        line_search_shrinking_factor: float = 0.8,
        line_search_max_iter: int = 10,
        n_critic_updates: int = 10,
        gae_lambda: float = 0.95,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        normalize_advantage: bool | str = True,
        target_kl: float = 0.01,
        sub_sampling_factor: int = 1,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
        *,
        baseline: str = "value",
        horizon_time_limit: int | None = None,
        ref_policy: Any = None,
        ref_regularizer: str = "kl",
        ref_coef: float | str = 0.1,
        ref_target: float | None = None,
        ref_estimator: str | None = None,
        ref_placement: str = "reward",
        ref_cap: float = 2.0,
        ref_horizon: float = 10_000,
        ref_measure: str = "action",
        ref_env: Any = None,
        ref_rollout_steps: int | None = None,
        ref_rollout_every: int = 1,
        ref_discriminator_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self._init_reference_options(
            ref_policy=ref_policy, ref_regularizer=ref_regularizer, ref_coef=ref_coef, ref_target=ref_target,
            ref_estimator=ref_estimator, ref_placement=ref_placement, ref_cap=ref_cap, ref_horizon=ref_horizon,
            ref_measure=ref_measure, ref_env=ref_env, ref_rollout_steps=ref_rollout_steps,
            ref_rollout_every=ref_rollout_every, ref_discriminator_kwargs=ref_discriminator_kwargs,
        )
        normalize_minibatches = self._init_estimator_options(
            gamma=gamma, gae_lambda=gae_lambda, baseline=baseline, normalize_advantage=normalize_advantage,
            horizon_time_limit=horizon_time_limit,
            learning_rate=learning_rate, n_steps=n_steps, batch_size=batch_size, cg_max_steps=cg_max_steps,
            cg_damping=cg_damping, line_search_shrinking_factor=line_search_shrinking_factor,
            line_search_max_iter=line_search_max_iter, n_critic_updates=n_critic_updates, target_kl=target_kl,
            sub_sampling_factor=sub_sampling_factor,
        )
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            batch_size=batch_size,
            gamma=gamma,
            cg_max_steps=cg_max_steps,
            cg_damping=cg_damping,
            line_search_shrinking_factor=line_search_shrinking_factor,
            line_search_max_iter=line_search_max_iter,
            n_critic_updates=n_critic_updates,
            gae_lambda=gae_lambda,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            normalize_advantage=normalize_minibatches,
            target_kl=target_kl,
            sub_sampling_factor=sub_sampling_factor,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=_init_setup_model,
        )
