"""Entropy-regularized policy gradient and n-step soft Q-learning: two drop-in SB3 algorithms, one gradient.

:class:`EntropyPG` is an A2C on the KL-regularized return (its policy and value can be any SB3
``ActorCriticPolicy``); :class:`SoftQ` is on-policy n-step soft Q-learning: the network outputs
:math:`Q(s, \\cdot)`, acts with the Boltzmann policy :math:`\\pi_Q \\propto \\bar\\pi\\, e^{Q/\\tau}` and regresses
:math:`Q(s_t, a_t)` on the n-step soft target (Schulman, Chen, Abbeel 2017, arXiv:1704.06440, Sec. 4). Both
collect rollouts with SB3's ``collect_rollouts``, compute the same KL-regularized n-step advantages
(:func:`pgvar.estimators.soft_q.kl_regularized_n_step_advantages`) and differ only in the loss:

* ``EntropyPG``: :func:`~pgvar.estimators.soft_q.entropy_regularized_pg_loss`
  ``= -Delta log pi + tau KL + vf_coef * (V - (V + Delta))^2``;
* ``SoftQ``: :func:`~pgvar.estimators.soft_q.soft_q_loss` ``= 1/2 (Q(s, a) - (V + tau KL + Delta))^2``.

With the same network (``EntropyPG("SoftQMlpPolicy")`` and ``SoftQ("MlpPolicy")``, or ``EntropyPG("MlpPolicy")``
and ``SoftQ("DuelingMlpPolicy")`` (SB3's actor-critic network), the paper's Sec. 6.3 "dueling" form :math:`Q = V + \\tau \\log(\\pi/\\bar\\pi)`)
and ``vf_coef = 1/(2 tau)`` (the default), the SoftQ gradient is ``tau`` times the EntropyPG gradient in
expectation over the sampled actions, and exactly when the actions are enumerated (:meth:`compute_loss` with
``actions=None``). Discrete action spaces only.

Where the pieces live: the networks in :mod:`pgvar.algos.soft_q_policies`, the rollout buffers in
:mod:`pgvar.algos.soft_q_buffers` (both re-exported here), the shared base class (arguments, rollout tensors,
advantages, update step) in ``pgvar.algos._kl_regularized``; this module holds the two losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.policies import (
    ActorCriticCnnPolicy,
    ActorCriticPolicy,
    BasePolicy,
    MultiInputActorCriticPolicy,
)
from stable_baselines3.common.type_aliases import GymEnv, Schedule

from pgvar._validation import check_positive
from pgvar.algos._kl_regularized import POLICY_ALIASES, KLRegularizedOnPolicyAlgorithm
from pgvar.algos.soft_q_buffers import KLRegularizedDictRolloutBuffer, KLRegularizedRolloutBuffer
from pgvar.algos.soft_q_policies import (
    MultiInputSoftQPolicy,
    SoftPolicyOutputs,
    SoftQCnnPolicy,
    SoftQPolicy,
)
from pgvar.estimators.normalization import normalize_advantages
from pgvar.estimators.soft_q import (
    entropy_regularized_pg_loss,
    kl_to_reference,
    soft_q_loss,
    soft_q_targets,
)

# The policies and buffers live in soft_q_policies / soft_q_buffers; re-exported here, where they used to be.
__all__ = [
    "EntropyPG",
    "KLRegularizedDictRolloutBuffer",
    "KLRegularizedRolloutBuffer",
    "MultiInputSoftQPolicy",
    "SoftPolicyOutputs",
    "SoftQ",
    "SoftQCnnPolicy",
    "SoftQPolicy",
]


class EntropyPG(KLRegularizedOnPolicyAlgorithm):
    """Entropy/KL-regularized advantage actor-critic (A2C on the KL-regularized return).

    Schulman, Chen, Abbeel 2017, arXiv:1704.06440, Sec. 4 and 6.1 ("proper" entropy regularization: the KL
    enters the return, not only a one-step bonus). One gradient step per rollout on

    .. math::  L = -\\Delta_t \\log\\pi(a_t|s_t) + \\tau\\,\\mathrm{KL}_t + c\\, (V(s_t) - (V(s_t) + \\Delta_t))^2
               - c_H H(\\pi(\\cdot|s_t))

    (:func:`~pgvar.estimators.soft_q.entropy_regularized_pg_loss`; ``c = vf_coef`` on SB3's mean squared error,
    ``c_H = ent_coef``), with :math:`\\Delta_t` from
    :func:`~pgvar.estimators.soft_q.kl_regularized_n_step_advantages`. With ``vf_coef = 1/(2 tau)`` (the
    default), ``ent_coef = 0`` and no advantage normalization, ``tau`` times its gradient is the gradient of n-step
    soft Q-learning (:class:`SoftQ`) with the same network, in expectation over the sampled actions.

    Takes SB3 A2C's arguments (same names and defaults except ``vf_coef``; see
    ``stable_baselines3.A2C``) plus ``tau``, ``ref_policy`` and ``n_step``. Discrete action spaces only.
    Policies: ``"MlpPolicy"``/``"CnnPolicy"``/``"MultiInputPolicy"`` (SB3's actor-critic policies) or
    ``"SoftQMlpPolicy"`` (a Q-network: pi and V derived from Q, the parametrization of :class:`SoftQ`).

    :param vf_coef: value-loss coefficient on the mean squared error (SB3's convention); ``None`` = ``1/(2 tau)``,
        the coefficient :math:`1/\\tau` on :math:`\\tfrac12 (V - \\hat V)^2` that the equivalence needs
    :param normalize_advantage: normalize :math:`\\Delta` over the batch in the policy term only (breaks the
        equivalence; default False like A2C)
    :param tau: temperature :math:`\\tau > 0` of the KL/entropy regularization (reward units)
    :param ref_policy: reference policy :math:`\\bar\\pi`: ``None``/``"uniform"`` (the entropy bonus up to a
        constant) or a sequence of ``A`` probabilities > 0 summing to 1 (state-independent)
    :param n_step: number of TD errors in :math:`\\Delta_t`; ``None`` sums up to the end of the rollout (A2C's
        n-step return with ``n_steps`` steps)
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": ActorCriticPolicy,
        "CnnPolicy": ActorCriticCnnPolicy,
        "MultiInputPolicy": MultiInputActorCriticPolicy,
        **POLICY_ALIASES,
    }

    def __init__(
        self,
        policy: str | type[BasePolicy],
        env: GymEnv | str | None,
        learning_rate: float | Schedule = 7e-4,
        n_steps: int = 5,
        gamma: float = 0.99,
        gae_lambda: float = 1.0,
        ent_coef: float = 0.0,
        vf_coef: float | None = None,
        max_grad_norm: float = 0.5,
        rms_prop_eps: float = 1e-5,
        use_rms_prop: bool = True,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        normalize_advantage: bool = False,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
        tau: float = 0.01,
        ref_policy: Sequence[float] | None = None,
        n_step: int | None = None,
    ) -> None:
        tau = float(check_positive("tau", tau))
        if vf_coef is None:  # ent_coef and a given vf_coef are checked with the other SB3 arguments
            vf_coef = 1.0 / (2.0 * tau)
        if not isinstance(normalize_advantage, bool):
            raise ValueError(f"normalize_advantage must be True or False, got {normalize_advantage!r}")
        self.normalize_advantage = normalize_advantage
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
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=_init_setup_model,
            tau=tau,
            ref_policy=ref_policy,
            n_step=n_step,
        )

    def _loss(
        self, outputs: SoftPolicyOutputs, actions: th.Tensor | None, advantages: th.Tensor
    ) -> tuple[th.Tensor, dict[str, th.Tensor]]:
        def regularized(signal: th.Tensor):
            return entropy_regularized_pg_loss(
                outputs.log_probs,
                outputs.values,
                actions,
                signal,
                tau=self.tau,
                ref_log_probs=self._ref_log_probs,
                # SB3's vf_coef multiplies (V - R)^2, the estimator's value_coef 1/2 (V - R)^2.
                value_coef=2.0 * self.vf_coef,
            )

        parts = regularized(advantages)
        loss, policy_loss = parts.loss, parts.policy_loss
        if self.normalize_advantage and advantages.numel() > 1:
            policy_loss = regularized(normalize_advantages(advantages, mode="batch")).policy_loss
            loss = loss - parts.policy_loss + policy_loss
        if self.ent_coef > 0:
            entropy = -(outputs.log_probs.exp() * outputs.log_probs).sum(-1).mean()
            loss = loss - self.ent_coef * entropy
        return loss, {"policy_loss": policy_loss, "value_loss": 2.0 * parts.value_loss}


class SoftQ(KLRegularizedOnPolicyAlgorithm):
    """On-policy n-step soft Q-learning with a Boltzmann policy (Schulman, Chen, Abbeel 2017, arXiv:1704.06440,
    Sec. 4; the Sec. 6.3 setting: no target network, no epsilon-greedy schedule).

    The network outputs :math:`Q(s, \\cdot)`; the agent acts with
    :math:`\\pi_Q(a|s) \\propto \\bar\\pi(a)\\, e^{Q(s,a)/\\tau}` and, once per rollout, takes one gradient step on

    .. math::  L = \\tfrac12 \\big(Q(s_t, a_t) - \\hat Q_t\\big)^2, \\qquad
               \\hat Q_t = V_Q(s_t) + \\tau\\,\\mathrm{KL}_t + \\Delta_t
               = r_t + \\sum_{d=1}^{n-1} \\gamma^d (r_{t+d} - \\tau \\mathrm{KL}_{t+d}) + \\gamma^n V_Q(s_{t+n})

    (:func:`~pgvar.estimators.soft_q.soft_q_loss`, target held constant). Its gradient is ``tau`` times the
    :class:`EntropyPG` gradient of the same network in expectation over the sampled actions.

    Takes SB3 A2C's arguments except ``ent_coef``, ``vf_coef`` and ``normalize_advantage`` (the temperature
    ``tau`` plays their role; see ``stable_baselines3.A2C`` for the rest) plus ``tau``, ``ref_policy`` and
    ``n_step``. Discrete action spaces only. Policies: ``"MlpPolicy"``/``"CnnPolicy"``/``"MultiInputPolicy"``
    (:class:`SoftQPolicy` Q-networks) or ``"DuelingMlpPolicy"`` (= ``"ActorCriticMlpPolicy"``: SB3's actor-critic
    network read as the dueling
    :math:`Q = V + \\tau \\log(\\pi/\\bar\\pi)`, the paper's Sec. 6.3).

    :param tau: temperature :math:`\\tau > 0` of the KL/entropy regularization (reward units)
    :param ref_policy: reference policy :math:`\\bar\\pi`: ``None``/``"uniform"`` (the entropy bonus up to a
        constant) or a sequence of ``A`` probabilities > 0 summing to 1 (state-independent)
    :param n_step: number of TD errors in :math:`\\Delta_t`; ``None`` sums up to the end of the rollout (A2C's
        n-step return with ``n_steps`` steps)
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": SoftQPolicy,
        "CnnPolicy": SoftQCnnPolicy,
        "MultiInputPolicy": MultiInputSoftQPolicy,
        "DuelingMlpPolicy": ActorCriticPolicy,
        **POLICY_ALIASES,
    }

    def __init__(
        self,
        policy: str | type[BasePolicy],
        env: GymEnv | str | None,
        learning_rate: float | Schedule = 7e-4,
        n_steps: int = 5,
        gamma: float = 0.99,
        gae_lambda: float = 1.0,
        max_grad_norm: float = 0.5,
        rms_prop_eps: float = 1e-5,
        use_rms_prop: bool = True,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
        tau: float = 0.01,
        ref_policy: Sequence[float] | None = None,
        n_step: int | None = None,
    ) -> None:
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=0.0,
            vf_coef=0.0,
            max_grad_norm=max_grad_norm,
            rms_prop_eps=rms_prop_eps,
            use_rms_prop=use_rms_prop,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=_init_setup_model,
            tau=tau,
            ref_policy=ref_policy,
            n_step=n_step,
        )

    def _loss(
        self, outputs: SoftPolicyOutputs, actions: th.Tensor | None, advantages: th.Tensor
    ) -> tuple[th.Tensor, dict[str, th.Tensor]]:
        kls = kl_to_reference(outputs.log_probs, self._ref_log_probs)
        targets = soft_q_targets(outputs.values, kls, advantages, tau=self.tau)
        weights = outputs.log_probs.exp() if actions is None else None
        loss = soft_q_loss(outputs.q_values, actions, targets, action_weights=weights)
        return loss, {"soft_q_loss": loss}
