"""Q-Prop on top of PPO and TRPO: drop-in SB3 algorithms with an off-policy critic as a control variate.

:class:`QPropPPO` and :class:`QPropTRPO` are :class:`pgvar.PPO <pgvar.algos.PPO>` and
:class:`pgvar.TRPO <pgvar.algos.TRPO>` plus the Q-Prop estimator (Gu et al. 2017, arXiv:1611.02247, Eq. 8-9)
and Tucker et al.'s consistent normalization (2018, arXiv:1802.10031). Everything they share is
:class:`~pgvar.algos._qprop_mixin.QPropMixin`, which holds the critic as a
:class:`~pgvar.algos.qprop_critic.QPropCritic`; each class here adds its constructor and ``_train_policy``, which
is SB3's PPO / sb3-contrib's TRPO ``train()`` copied with the changes marked ``# Q-Prop`` (the advantages become the
normalized learning signal, and the analytic term joins the objective). The copies are forced by SB3's structure:
the objective is a local variable of ``train()``, with no hook to extend it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.utils import conjugate_gradient_solver
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.distributions import kl_divergence
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import GymEnv, Schedule
from stable_baselines3.common.utils import explained_variance
from torch.nn import functional as F

from pgvar.algos._qprop_mixin import DEFAULT_CRITIC_NET_ARCH, QPropMixin
from pgvar.algos.ppo import PPO
from pgvar.algos.reference import REFERENCE_PARAMETERS, check_reference_option_names
from pgvar.algos.trpo import TRPO

__all__ = ["QPropPPO", "QPropTRPO"]

_QPROP_PARAMETERS = """
    :param qprop_eta: the weight rule of the control variate (Gu et al. 2017, Sec. 3.2): ``"conservative"``
        (default, :math:`\\eta = 1[\\widehat{\\mathrm{Cov}}(\\hat A, \\bar A) > 0]`, the paper's c-Q-Prop),
        ``"aggressive"`` (:math:`\\operatorname{sign}(\\widehat{\\mathrm{Cov}})`), ``"fixed"`` (:math:`\\eta = 1`,
        the official code's default) or ``"adaptive"`` (:math:`\\widehat{\\mathrm{Cov}} /
        \\operatorname{Var}_a(\\bar A)`, Box actions only); see :func:`~pgvar.estimators.qprop_eta`
    :param qprop_eta_scope: where the covariance is estimated: ``"crossfit"`` (default: each half of the rollout,
        environments or else time steps, gets the :math:`\\eta` of the other half, so :math:`\\eta` is independent
        of the samples it weights: unbiased), ``"batch"`` (one estimate from the whole rollout, which each sample
        enters: biased by :math:`O(1/\\sqrt N)` when the covariance is near 0) or ``"sample"`` (the single-sample
        product of the official code: :math:`\\eta` depends on the action, which biases the estimator)
    :param qprop_normalization: how :math:`\\eta` follows the normalization of the learning signal
        :math:`\\hat A - \\eta \\bar A` (where and whether the signal is normalized is ``normalize_advantage``):
        ``"consistent"`` (default: :math:`\\eta` is divided by the same std, Tucker et al.'s fix: the update is the
        Q-Prop gradient scaled by 1/std), ``"as_published"`` (the official code: :math:`\\eta` is not divided, so
        the critic's DDPG-style gradient gets weight 1 - 1/std) or ``"none"`` (neither is normalized, whatever
        ``normalize_advantage`` says); see :func:`~pgvar.estimators.qprop_normalize`
    :param qprop_critic_net_arch: hidden layers of the critic :math:`Q_w` (ReLU; default ``(100, 100)``, the
        official critic). Box actions: SB3's ``ContinuousCritic`` with one Q-network, the action concatenated
        to the observation features; Discrete: DQN's ``QNetwork`` (:math:`Q_w(s, \\cdot)` over all actions).
        The features extractor is a separate instance of the policy's.
    :param qprop_critic_learning_rate: Adam learning rate of the critic (default ``1e-3``)
    :param qprop_critic_batch_size: minibatch size of the critic's TD steps (default 64)
    :param qprop_critic_updates_per_step: critic TD steps per collected environment step (default 1.0:
        ``n_steps * n_envs`` steps per rollout, the official ``qf_updates_ratio=1``)
    :param qprop_critic_tau: soft (polyak) update rate of the target critic, in ``(0, 1]`` (default ``1e-3``)
    :param qprop_buffer_size: capacity of the critic's replay buffer in transitions (default ``1_000_000``;
        reserved at construction: ``ValueError`` if it is larger than the machine's memory, a warning if larger
        than the memory available, see :func:`~pgvar.algos.qprop_critic.replay_buffer_nbytes`)
    :param qprop_warmup_steps: transitions the replay buffer must hold before the critic is trained (default
        1000, the official ``min_pool_size``); until the critic's first update the plain estimator is used
        (:math:`\\eta = 0`)
"""

_COMMON_NOTES = """
    Q-Prop trains an off-policy critic :math:`Q_w` on a replay buffer of every transition collected (raw
    rewards, true final observations at time-limit truncations, which bootstrap) with DDPG-style targets
    :math:`r + \\gamma (1 - \\text{terminated}) Q_{w'}(s', \\mu_\\theta(s'))`, and uses it as a control variate:
    the advantages become :math:`\\hat A - \\eta \\bar A` with
    :math:`\\bar A = \\nabla_a Q_w(s, \\mu_\\theta(s)) \\cdot (a - \\mu_\\theta(s))` (Discrete actions:
    :math:`Q_w(s, a) - \\sum_{a'} \\pi(a'|s) Q_w(s, a')`), and the analytic term
    :math:`\\operatorname{mean}(\\eta\\, Q_w(s, \\mu_\\theta(s)))` (Discrete: :math:`\\operatorname{mean}(\\eta
    \\sum_a \\pi_\\theta(a|s) Q_w(s, a))`), with the critic frozen, is added to the policy objective.
    Logs ``pgvar/qprop_eta_mean``, ``pgvar/signal_var_before`` / ``pgvar/signal_var_after`` (variance of
    :math:`\\hat A` and of the learning signal over the rollout), ``pgvar/qprop_critic_loss`` and
    ``pgvar/qprop_critic_explained_variance`` (of the rollout's TD(lambda) returns by :math:`Q_w(s_t, a_t)`,
    before the critic trains on that rollout). The critic, its optimizer and replay buffer are
    ``model.qprop_critic`` (:class:`~pgvar.algos.qprop_critic.QPropCritic`); the replay buffer of
    ``qprop_buffer_size`` transitions is reserved when the model is built (its memory is checked first). Save the
    replay buffer with ``save_replay_buffer`` (numpy arrays and JSON, no pickle; ``save()`` keeps the policy, the
    critic, its target and both optimizers).

    The ``ref_*`` options (keywords, passed on to :class:`pgvar.PPO <pgvar.algos.PPO>` / :class:`pgvar.TRPO
    <pgvar.algos.TRPO>`) compose with Q-Prop: in the reward (``ref_placement="reward"``, every ``ref_measure``) the
    penalty is also subtracted from the rollout's transitions in the replay buffer, so the critic learns :math:`Q`
    of the penalized reward whose advantages the control variate corrects; in the loss (QPropPPO only) the
    regularizer's gradient joins the policy loss and the critic keeps the environment's reward.

    Papers: Gu, Lillicrap, Ghahramani, Turner, Levine (2017), "Q-Prop: Sample-Efficient Policy Gradient with an
    Off-Policy Critic", ICLR, arXiv:1611.02247; Tucker, Bhupatiraju, Gu, Turner, Ghahramani, Levine (2018), "The
    Mirage of Action-Dependent Baselines in Reinforcement Learning", ICML, arXiv:1802.10031.
"""


class QPropPPO(QPropMixin, PPO):
    __doc__ = (
        """PPO with the Q-Prop control variate, a drop-in replacement for :class:`stable_baselines3.PPO`.
"""
        + _COMMON_NOTES
        + """
    The analytic term is recomputed on every minibatch (the policy mean moves between epochs) and added outside
    the clipped ratio. Every other argument is :class:`pgvar.PPO <pgvar.algos.PPO>`'s (SB3's PPO arguments plus
    ``baseline`` and the ``normalize_advantage`` modes: ``"minibatch"`` normalizes the learning signal per
    minibatch, ``"batch"`` once per rollout).
"""
        + _QPROP_PARAMETERS
        + "    "
        + REFERENCE_PARAMETERS
    )

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
        qprop_eta: str = "conservative",
        qprop_eta_scope: str = "crossfit",
        qprop_normalization: str = "consistent",
        qprop_critic_net_arch: Sequence[int] = DEFAULT_CRITIC_NET_ARCH,
        qprop_critic_learning_rate: float = 1e-3,
        qprop_critic_batch_size: int = 64,
        qprop_critic_updates_per_step: float = 1.0,
        qprop_critic_tau: float = 1e-3,
        qprop_buffer_size: int = 1_000_000,
        qprop_warmup_steps: int = 1000,
        **reference_options: Any,
    ) -> None:
        self._init_qprop_options(
            qprop_eta=qprop_eta,
            qprop_eta_scope=qprop_eta_scope,
            qprop_normalization=qprop_normalization,
            qprop_critic_net_arch=qprop_critic_net_arch,
            qprop_critic_learning_rate=qprop_critic_learning_rate,
            qprop_critic_batch_size=qprop_critic_batch_size,
            qprop_critic_updates_per_step=qprop_critic_updates_per_step,
            qprop_critic_tau=qprop_critic_tau,
            qprop_buffer_size=qprop_buffer_size,
            qprop_warmup_steps=qprop_warmup_steps,
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
            normalize_advantage=normalize_advantage,
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
            baseline=baseline,
            **check_reference_option_names(type(self).__name__, reference_options),
        )

    def _train_policy(self) -> None:
        """SB3's ``PPO.train()`` (stable-baselines3 2.9.2), with the Q-Prop signal and analytic term."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)  # type: ignore[operator]
        if self.clip_range_vf is not None:
            clip_range_vf = self.clip_range_vf(self._current_progress_remaining)  # type: ignore[operator]

        entropy_losses = []
        pg_losses, value_losses = [], []
        clip_fractions = []

        continue_training = True
        for epoch in range(self.n_epochs):
            approx_kl_divs = []
            for rollout_data in self.rollout_buffer.get(self.batch_size):
                actions = rollout_data.actions
                if isinstance(self.action_space, spaces.Discrete):
                    actions = rollout_data.actions.long().flatten()

                values, log_prob, entropy = self.policy.evaluate_actions(rollout_data.observations, actions)
                values = values.flatten()
                # Q-Prop: the learning signal, normalized per minibatch together with eta (SB3: the advantages)
                advantages, etas = self._qprop_minibatch_signal(rollout_data, self.normalize_advantage)

                ratio = th.exp(log_prob - rollout_data.old_log_prob)

                policy_loss_1 = advantages * ratio
                policy_loss_2 = advantages * th.clamp(ratio, 1 - clip_range, 1 + clip_range)
                policy_loss = -th.min(policy_loss_1, policy_loss_2).mean()

                pg_losses.append(policy_loss.item())
                clip_fraction = th.mean((th.abs(ratio - 1) > clip_range).float()).item()
                clip_fractions.append(clip_fraction)

                if self.clip_range_vf is None:
                    values_pred = values
                else:
                    values_pred = rollout_data.old_values + th.clamp(
                        values - rollout_data.old_values, -clip_range_vf, clip_range_vf
                    )
                value_loss = F.mse_loss(rollout_data.returns, values_pred)
                value_losses.append(value_loss.item())

                if entropy is None:
                    entropy_loss = -th.mean(-log_prob)
                else:
                    entropy_loss = -th.mean(entropy)

                entropy_losses.append(entropy_loss.item())

                loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss
                # Q-Prop: the analytic term (an objective: subtracted from the loss), outside the clipped ratio
                correction = self._qprop_correction(
                    rollout_data.observations, actions, etas, self._evaluated_distribution()
                )
                if correction is not None:
                    loss = loss - correction

                with th.no_grad():
                    log_ratio = log_prob - rollout_data.old_log_prob
                    approx_kl_div = th.mean((th.exp(log_ratio) - 1) - log_ratio).cpu().numpy()
                    approx_kl_divs.append(approx_kl_div)

                if self.target_kl is not None and approx_kl_div > 1.5 * self.target_kl:
                    continue_training = False
                    if self.verbose >= 1:
                        print(f"Early stopping at step {epoch} due to reaching max kl: {approx_kl_div:.2f}")
                    break

                self.policy.optimizer.zero_grad()
                loss.backward()
                th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                self.policy.optimizer.step()

            self._n_updates += 1
            if not continue_training:
                break

        explained_var = explained_variance(self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten())

        self.logger.record("train/entropy_loss", np.mean(entropy_losses))
        self.logger.record("train/policy_gradient_loss", np.mean(pg_losses))
        self.logger.record("train/value_loss", np.mean(value_losses))
        self.logger.record("train/approx_kl", np.mean(approx_kl_divs))
        self.logger.record("train/clip_fraction", np.mean(clip_fractions))
        self.logger.record("train/loss", loss.item())
        self.logger.record("train/explained_variance", explained_var)
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())

        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/clip_range", clip_range)
        if self.clip_range_vf is not None:
            self.logger.record("train/clip_range_vf", clip_range_vf)


class QPropTRPO(QPropMixin, TRPO):
    __doc__ = (
        """TRPO with the Q-Prop control variate (the paper's TR-Q-Prop), a drop-in replacement for
    :class:`sb3_contrib.TRPO`.
"""
        + _COMMON_NOTES
        + """
    The analytic term is part of the surrogate whose gradient the conjugate-gradient step follows and which the
    line search must improve (the official code's ``qprop_surr_loss``). Every other argument is
    :class:`pgvar.TRPO <pgvar.algos.TRPO>`'s. The official Q-Prop settings are ``n_steps=5000``,
    ``gae_lambda=0.97``, ``target_kl=0.01`` and a 100x50 tanh policy.
"""
        + _QPROP_PARAMETERS
        + "    "
        + REFERENCE_PARAMETERS
    )

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
        qprop_eta: str = "conservative",
        qprop_eta_scope: str = "crossfit",
        qprop_normalization: str = "consistent",
        qprop_critic_net_arch: Sequence[int] = DEFAULT_CRITIC_NET_ARCH,
        qprop_critic_learning_rate: float = 1e-3,
        qprop_critic_batch_size: int = 64,
        qprop_critic_updates_per_step: float = 1.0,
        qprop_critic_tau: float = 1e-3,
        qprop_buffer_size: int = 1_000_000,
        qprop_warmup_steps: int = 1000,
        **reference_options: Any,
    ) -> None:
        self._init_qprop_options(
            qprop_eta=qprop_eta,
            qprop_eta_scope=qprop_eta_scope,
            qprop_normalization=qprop_normalization,
            qprop_critic_net_arch=qprop_critic_net_arch,
            qprop_critic_learning_rate=qprop_critic_learning_rate,
            qprop_critic_batch_size=qprop_critic_batch_size,
            qprop_critic_updates_per_step=qprop_critic_updates_per_step,
            qprop_critic_tau=qprop_critic_tau,
            qprop_buffer_size=qprop_buffer_size,
            qprop_warmup_steps=qprop_warmup_steps,
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
            normalize_advantage=normalize_advantage,
            target_kl=target_kl,
            sub_sampling_factor=sub_sampling_factor,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=_init_setup_model,
            baseline=baseline,
            **check_reference_option_names(type(self).__name__, reference_options),
        )

    def _train_policy(self) -> None:
        """sb3-contrib's ``TRPO.train()`` (sb3-contrib 2.9.2), with the Q-Prop signal and analytic term."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)

        policy_objective_values = []
        kl_divergences = []
        line_search_results = []
        value_losses = []

        for rollout_data in self.rollout_buffer.get(batch_size=None):
            if self.sub_sampling_factor > 1:
                step = self.sub_sampling_factor
                samples: Any = rollout_data  # a QPropRolloutBufferSamples
                rollout_data = samples._replace(  # Q-Prop: keeps eta (sb3-contrib builds a new tuple without it)
                    observations=rollout_data.observations[::step],
                    actions=rollout_data.actions[::step],
                    old_values=None,
                    old_log_prob=rollout_data.old_log_prob[::step],
                    advantages=rollout_data.advantages[::step],
                    returns=None,
                    qprop_etas=samples.qprop_etas[::step],
                )

            actions = rollout_data.actions
            if isinstance(self.action_space, spaces.Discrete):
                actions = rollout_data.actions.long().flatten()

            with th.no_grad():
                old_distribution = copy.copy(self.policy.get_distribution(rollout_data.observations))

            distribution = self.policy.get_distribution(rollout_data.observations)
            log_prob = distribution.log_prob(actions)

            # Q-Prop: the learning signal, normalized together with eta (sb3-contrib: the advantages)
            advantages, etas = self._qprop_minibatch_signal(rollout_data, self.normalize_advantage)

            ratio = th.exp(log_prob - rollout_data.old_log_prob)

            policy_objective = (advantages * ratio).mean()
            # Q-Prop: the analytic term joins the surrogate
            correction = self._qprop_correction(rollout_data.observations, actions, etas, distribution)
            if correction is not None:
                policy_objective = policy_objective + correction

            kl_div = kl_divergence(distribution, old_distribution).mean()

            self.policy.optimizer.zero_grad()

            actor_params, policy_objective_gradients, grad_kl, grad_shape = self._compute_actor_grad(kl_div, policy_objective)

            hessian_vector_product_fn = partial(self.hessian_vector_product, actor_params, grad_kl)

            search_direction = conjugate_gradient_solver(
                hessian_vector_product_fn,
                policy_objective_gradients,
                max_iter=self.cg_max_steps,
            )

            line_search_max_step_size = 2 * self.target_kl
            line_search_max_step_size /= float(
                th.matmul(search_direction, hessian_vector_product_fn(search_direction, retain_graph=False))
            )
            line_search_max_step_size = np.sqrt(line_search_max_step_size)

            line_search_backtrack_coeff = 1.0
            original_actor_params = [param.detach().clone() for param in actor_params]

            is_line_search_success = False
            with th.no_grad():
                for _ in range(self.line_search_max_iter):
                    start_idx = 0
                    for param, original_param, shape in zip(actor_params, original_actor_params, grad_shape, strict=True):
                        n_params = param.numel()
                        param.data = (
                            original_param.data
                            + line_search_backtrack_coeff
                            * line_search_max_step_size
                            * search_direction[start_idx : (start_idx + n_params)].view(shape)
                        )
                        start_idx += n_params

                    distribution = self.policy.get_distribution(rollout_data.observations)
                    log_prob = distribution.log_prob(actions)

                    ratio = th.exp(log_prob - rollout_data.old_log_prob)
                    new_policy_objective = (advantages * ratio).mean()
                    # Q-Prop: the analytic term at the candidate parameters
                    correction = self._qprop_correction(rollout_data.observations, actions, etas, distribution)
                    if correction is not None:
                        new_policy_objective = new_policy_objective + correction

                    kl_div = kl_divergence(distribution, old_distribution).mean()

                    if (kl_div < self.target_kl) and (new_policy_objective > policy_objective):
                        is_line_search_success = True
                        break

                    line_search_backtrack_coeff *= self.line_search_shrinking_factor

                line_search_results.append(is_line_search_success)

                if not is_line_search_success:
                    for param, original_param in zip(actor_params, original_actor_params, strict=True):
                        param.data = original_param.data.clone()

                    policy_objective_values.append(policy_objective.item())
                    kl_divergences.append(0.0)
                else:
                    policy_objective_values.append(new_policy_objective.item())
                    kl_divergences.append(kl_div.item())

        for _ in range(self.n_critic_updates):
            for rollout_data in self.rollout_buffer.get(self.batch_size):
                values_pred = self.policy.predict_values(rollout_data.observations)
                value_loss = F.mse_loss(rollout_data.returns, values_pred.flatten())
                value_losses.append(value_loss.item())

                self.policy.optimizer.zero_grad()
                value_loss.backward()
                for param in actor_params:
                    param.grad = None
                self.policy.optimizer.step()

        self._n_updates += 1
        explained_var = explained_variance(self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten())

        self.logger.record("train/policy_objective", np.mean(policy_objective_values))
        self.logger.record("train/value_loss", np.mean(value_losses))
        self.logger.record("train/kl_divergence_loss", np.mean(kl_divergences))
        self.logger.record("train/explained_variance", explained_var)
        self.logger.record("train/is_line_search_success", np.mean(line_search_results))
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())

        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
