"""PPO with a choice of policy-gradient baseline and advantage normalization; SB3's PPO otherwise."""

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

__all__ = ["PPO"]


class PPO(SaveLoadMixin, OnPolicyEstimatorMixin, stable_baselines3.PPO):
    """Proximal Policy Optimization (clip), a drop-in replacement for :class:`stable_baselines3.PPO`.

    Change ``from stable_baselines3 import PPO`` to ``from pgvar import PPO``: with the default arguments the
    trained parameters are bit-for-bit those of SB3 (same seed, same environment). Two arguments choose the
    policy-gradient estimator; returns and advantages come from :mod:`pgvar.estimators`.

    Paper: Schulman et al. (2017), arXiv:1707.06347. Every other argument, its default and meaning are those of
    :class:`stable_baselines3.PPO` (``learning_rate=3e-4, n_steps=2048, batch_size=64, n_epochs=10,
    gamma=0.99, gae_lambda=0.95, clip_range=0.2, ...``).

    :param normalize_advantage: ``"minibatch"`` (or ``True``, the default: SB3's standardization of each
        minibatch in ``train()``), ``"batch"`` (standardize once over the whole rollout, so every minibatch of
        every epoch uses the same scale) or ``"none"`` (or ``False``)
    :param baseline: what is subtracted from the return in the policy gradient. ``"value"`` (default, SB3's):
        GAE(gamma, gae_lambda) advantages with the learned ``V(s)``. ``"none"``: the discounted return-to-go
        ``G_t`` (bootstrapped from ``V`` at time-limit truncations and at the end of the rollout).
        ``"mean"``: ``G_t`` minus the batch mean. ``"optimal"``: ``G_t`` minus the variance-optimal constant
        ``b* = E[||g||^2 G] / E[||g||^2]`` (Greensmith et al. 2004), with per-sample score norms
        ``||grad_theta log pi(a|s)||^2`` over the actor's parameters (policies built from ``nn.Linear`` layers;
        another policy raises ``ValueError`` at construction if its per-sample gradients cannot be computed).
        ``"horizon"``: GAE(gamma, gae_lambda) advantages with the horizon-aware value of Tucker et al. (2018,
        Sec. 6), ``V(s, t) = V0(s) + (1 - gamma^(T - t)) / (1 - gamma) * r_bar(s)``, ``t`` the step index within
        the episode and ``T`` the time limit: a second head ``r_bar`` on the value torso (SB3's ``ActorCriticPolicy``
        and its MlpPolicy / CnnPolicy / MultiInputPolicy), and the end at the time limit is a termination
        (:mod:`pgvar.algos.horizon_value`). The value function is trained on the TD(lambda) returns whatever the
        baseline.
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
        learning_rate: float | Schedule = 3e-4,
        n_steps: int = 2048,
        batch_size: int = 64,
        n_epochs: int = 10,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        clip_range: float | Schedule = 0.2,
        clip_range_vf: float | Schedule | None = None,
        normalize_advantage: bool | str = True,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
        max_grad_norm: float = 0.5,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        target_kl: float | None = None,
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
            learning_rate=learning_rate, n_steps=n_steps, batch_size=batch_size, n_epochs=n_epochs,
            clip_range=clip_range, ent_coef=ent_coef, vf_coef=vf_coef, max_grad_norm=max_grad_norm, target_kl=target_kl,
        )
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            batch_size=batch_size,
            n_epochs=n_epochs,
            gamma=gamma,
            gae_lambda=gae_lambda,
            clip_range=clip_range,
            clip_range_vf=clip_range_vf,
            normalize_advantage=normalize_minibatches,
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            target_kl=target_kl,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=_init_setup_model,
        )
