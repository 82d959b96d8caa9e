"""A2C with a choice of policy-gradient baseline and advantage normalization; SB3's A2C otherwise."""

from __future__ import annotations

from typing import Any

import stable_baselines3
import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import GymEnv, Schedule

from pgvar.algos._mixin import OnPolicyEstimatorMixin
from pgvar.algos._save import SaveLoadMixin
from pgvar.algos.reference import REFERENCE_PARAMETERS

__all__ = ["A2C"]


class A2C(SaveLoadMixin, OnPolicyEstimatorMixin, stable_baselines3.A2C):
    """Advantage Actor-Critic, a drop-in replacement for :class:`stable_baselines3.A2C`.

    Change ``from stable_baselines3 import A2C`` to ``from pgvar import A2C``: with the default arguments the
    trained parameters are bit-for-bit those of SB3 (same seed, same environment). Two arguments choose the
    policy-gradient estimator; returns and advantages come from :mod:`pgvar.estimators`.

    Paper: Mnih et al. (2016), arXiv:1602.01783. Every other argument, its default and meaning are those of
    :class:`stable_baselines3.A2C` (``learning_rate=7e-4, n_steps=5, gamma=0.99, gae_lambda=1.0``, RMSprop, ...).

    :param normalize_advantage: ``"none"`` (or ``False``, the default), ``"minibatch"`` (or ``True``: SB3's
        standardization in ``train()``; A2C's ``train()`` uses the whole rollout as one batch) or ``"batch"``
        (standardized once over the rollout when it is collected; the same statistic as ``"minibatch"`` for
        A2C, up to float rounding)
    :param baseline: what is subtracted from the return in the policy gradient. ``"value"`` (default, SB3's):
        GAE(gamma, gae_lambda) advantages with the learned ``V(s)`` (with A2C's ``gae_lambda=1``: the
        bootstrapped n-step return minus ``V``). ``"none"``: the discounted return-to-go ``G_t`` (bootstrapped
        from ``V`` at time-limit truncations and at the end of the rollout). ``"mean"``: ``G_t`` minus the batch
        mean. ``"optimal"``: ``G_t`` minus the variance-optimal constant ``b* = E[||g||^2 G] / E[||g||^2]``
        (Greensmith et al. 2004) with per-sample score norms over the actor's parameters. ``"horizon"``: GAE
        advantages with the horizon-aware value of Tucker et al. (2018, Sec. 6),
        ``V(s, t) = V0(s) + (1 - gamma^(T - t)) / (1 - gamma) * r_bar(s)``, ``t`` the step index within the episode
        and ``T`` the time limit: a second head ``r_bar`` on the value torso (SB3's ``ActorCriticPolicy``), and the
        end at the time limit is a termination (:mod:`pgvar.algos.horizon_value`). The value function is trained
        on the TD(lambda) returns whatever the baseline.
    :param horizon_time_limit: ``T`` for ``baseline="horizon"`` (``None``: the environment's
        ``spec.max_episode_steps``; ``ValueError`` when that is unknown too, or when given with another baseline)
    :param gamma: discount factor in ``[0, 1]`` (``ValueError`` otherwise)
    :param gae_lambda: GAE trace decay in ``[0, 1]`` (``ValueError`` otherwise)
    """

    __doc__ = f"{__doc__}{REFERENCE_PARAMETERS}"

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 7e-4,
        n_steps: int = 5,
        gamma: float = 0.99,
        gae_lambda: float = 1.0,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
        max_grad_norm: float = 0.5,
        rms_prop_eps: float = 1e-5,
        use_rms_prop: bool = True,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        normalize_advantage: bool | str = False,
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
            learning_rate=learning_rate, n_steps=n_steps, ent_coef=ent_coef, vf_coef=vf_coef,
            max_grad_norm=max_grad_norm,
        )
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm,
            rms_prop_eps=rms_prop_eps,
            use_rms_prop=use_rms_prop,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            normalize_advantage=normalize_minibatches,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=_init_setup_model,
        )
