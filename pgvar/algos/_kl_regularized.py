"""What :class:`~pgvar.algos.soft_q.EntropyPG` and :class:`~pgvar.algos.soft_q.SoftQ` share: their SB3 base class.

:class:`KLRegularizedOnPolicyAlgorithm` is an SB3 ``OnPolicyAlgorithm`` with the arguments of both (``tau``,
``ref_policy``, ``n_step``), the rollout tensors, the KL-regularized n-step advantages
(:func:`pgvar.estimators.soft_q.kl_regularized_n_step_advantages`) and the one-step update; a subclass implements
only ``_loss``. Save/load is :class:`~pgvar.algos.SaveLoadMixin`'s, like every pgvar algorithm.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, TypeVar, cast

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import (
    ActorCriticCnnPolicy,
    ActorCriticPolicy,
    BasePolicy,
    MultiInputActorCriticPolicy,
)
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, PyTorchObs, Schedule
from stable_baselines3.common.utils import explained_variance, obs_as_tensor

from pgvar._validation import check_positive, check_unit_interval
from pgvar.algos._checks import RolloutChecksMixin, check_rewards_finite, check_sb3_arguments
from pgvar.algos._save import SaveLoadMixin
from pgvar.algos.soft_q_buffers import (
    KLRegularizedDictRolloutBuffer,
    KLRegularizedRolloutBuffer,
    KLRegularizedSignalMixin,
)
from pgvar.algos.soft_q_policies import (
    MultiInputSoftQPolicy,
    SoftPolicyOutputs,
    SoftQCnnPolicy,
    SoftQPolicy,
    actor_critic_soft_outputs,
    check_discrete_actions,
    check_ref_policy,
    reference_log_probs,
)
from pgvar.estimators.soft_q import (
    kl_regularized_n_step_advantages,
    kl_to_reference,
)

__all__ = ["KLRegularizedOnPolicyAlgorithm"]

SelfSoftAlgorithm = TypeVar("SelfSoftAlgorithm", bound="KLRegularizedOnPolicyAlgorithm")


POLICY_ALIASES: dict[str, type[BasePolicy]] = {
    "ActorCriticMlpPolicy": ActorCriticPolicy,
    "ActorCriticCnnPolicy": ActorCriticCnnPolicy,
    "MultiInputActorCriticPolicy": MultiInputActorCriticPolicy,
    "SoftQMlpPolicy": SoftQPolicy,
    "SoftQCnnPolicy": SoftQCnnPolicy,
    "MultiInputSoftQPolicy": MultiInputSoftQPolicy,
}


class KLRegularizedOnPolicyAlgorithm(SaveLoadMixin, RolloutChecksMixin, OnPolicyAlgorithm):
    """What EntropyPG and SoftQ share: arguments, rollout tensors, the KL-regularized advantages, the update step.

    Subclasses implement :meth:`_loss` (and set ``_log_prefix`` names); everything else is common. SB3's
    arguments, ``learn``'s ``total_timesteps``, observations and rewards are checked like those of every pgvar
    algorithm (:mod:`pgvar.algos._checks`).
    """

    policy: ActorCriticPolicy | SoftQPolicy  # type: ignore[assignment]

    def __init__(
        self,
        policy: str | type[BasePolicy],
        env: GymEnv | str | None,
        *,
        learning_rate: float | Schedule,
        n_steps: int,
        gamma: float,
        gae_lambda: float,
        ent_coef: float,
        vf_coef: float,
        max_grad_norm: float,
        rms_prop_eps: float,
        use_rms_prop: bool,
        use_sde: bool,
        sde_sample_freq: int,
        rollout_buffer_class: type[RolloutBuffer] | None,
        rollout_buffer_kwargs: dict[str, Any] | None,
        stats_window_size: int,
        tensorboard_log: str | None,
        policy_kwargs: dict[str, Any] | None,
        verbose: int,
        seed: int | None,
        device: th.device | str,
        _init_setup_model: bool,
        tau: float,
        ref_policy: Sequence[float] | None,
        n_step: int | None,
    ) -> None:
        owner = type(self).__name__
        self.tau = float(check_positive("tau", tau))
        self.n_step = None if n_step is None else int(check_positive("n_step", n_step, integer=True))
        check_unit_interval("gamma", gamma)
        check_unit_interval("gae_lambda", gae_lambda)
        check_sb3_arguments(
            learning_rate=learning_rate,
            n_steps=n_steps,
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm,
        )
        if use_sde:
            raise ValueError(
                f"use_sde must be False for {owner}: gSDE is for continuous actions, got {use_sde!r}"
            )
        super().__init__(
            policy,  # type: ignore[arg-type]
            env,  # type: ignore[arg-type]
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=float(ent_coef),
            vf_coef=float(vf_coef),
            max_grad_norm=max_grad_norm,
            use_sde=False,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            device=device,
            seed=seed,
            _init_setup_model=False,
        )
        # load() builds the model without an env (no action_space yet) and sets the saved attributes afterwards.
        action_space = getattr(self, "action_space", None)
        check_discrete_actions(owner, action_space)
        self.ref_policy = ref_policy
        if action_space is not None:
            self.ref_policy = check_ref_policy(ref_policy, int(action_space.n))
        self.policy_kwargs = dict(self.policy_kwargs)  # never mutate the caller's dict
        # A2C's optimizer (the original A2C's), unless the caller chose one.
        if use_rms_prop and "optimizer_class" not in self.policy_kwargs:
            self.policy_kwargs["optimizer_class"] = th.optim.RMSprop
            self.policy_kwargs["optimizer_kwargs"] = dict(alpha=0.99, eps=rms_prop_eps, weight_decay=0)
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        owner = type(self).__name__
        check_discrete_actions(owner, self.action_space)
        self.ref_policy = check_ref_policy(self.ref_policy, int(self.action_space.n))  # type: ignore[attr-defined]
        if issubclass(self.policy_class, SoftQPolicy):
            for key, value in (("tau", self.tau), ("ref_policy", self.ref_policy)):
                if key in self.policy_kwargs and self.policy_kwargs[key] != value:
                    raise ValueError(
                        f"policy_kwargs[{key!r}] = {self.policy_kwargs[key]!r} differs from {owner}'s {key} = "
                        f"{value!r}: leave it out of policy_kwargs, {owner} passes its own"
                    )
                self.policy_kwargs[key] = value
        elif not issubclass(self.policy_class, ActorCriticPolicy):
            raise ValueError(
                f"{owner} needs a SoftQPolicy (Q-network) or an SB3 ActorCriticPolicy, got {self.policy_class!r}"
            )
        if self.rollout_buffer_class is None:
            dict_obs = isinstance(self.observation_space, spaces.Dict)
            self.rollout_buffer_class = (
                KLRegularizedDictRolloutBuffer if dict_obs else KLRegularizedRolloutBuffer
            )
        super()._setup_model()
        self._ref_log_probs = reference_log_probs(self.ref_policy, self.device)
        if isinstance(self.rollout_buffer, KLRegularizedSignalMixin):
            self.rollout_buffer.attach(self.kl_regularized_signal)

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_ref_log_probs"]

    # ------------------------------------------------------------------ shared computations
    def soft_outputs(self, observations: PyTorchObs) -> SoftPolicyOutputs:
        """Log-probabilities ``[B, A]``, values ``[B]`` and Q-values ``[B, A]`` of the policy at ``observations``
        (a tensor or dict of tensors on ``self.device``), differentiable in the policy's parameters."""
        if isinstance(self.policy, SoftQPolicy):
            return self.policy.soft_outputs(observations)
        return actor_critic_soft_outputs(self.policy, observations, self.tau, self._ref_log_probs)

    def compute_loss(
        self, observations: PyTorchObs, actions: th.Tensor | None, advantages: th.Tensor
    ) -> tuple[th.Tensor, dict[str, th.Tensor]]:
        """The training loss on given data: what :meth:`train` minimizes on the rollout.

        :param observations: ``[B, *obs_shape]`` observations (tensor or dict of tensors on ``self.device``)
        :param actions: ``[B]`` integer actions taken, or ``None`` to enumerate every action with the policy's
            own probabilities as weights (the exact expectation over the action)
        :param advantages: ``[B]`` KL-regularized advantages :math:`\\Delta` of the taken actions, or ``[B, A]``
            (one per action) when ``actions is None``
        :return: ``(loss, parts)``: the scalar loss and its named parts (for logging)
        """
        return self._loss(self.soft_outputs(observations), actions, advantages)

    @abstractmethod
    def _loss(
        self, outputs: SoftPolicyOutputs, actions: th.Tensor | None, advantages: th.Tensor
    ) -> tuple[th.Tensor, dict[str, th.Tensor]]:
        """The learner's loss (EntropyPG: the entropy-regularized PG loss; SoftQ: the soft Q regression)."""

    def _rollout_observations(self, with_last: bool) -> PyTorchObs:
        """The rollout's ``T * N`` observations (time-major, flattened), then the ``N`` last ones if ``with_last``."""
        buffer = self.rollout_buffer
        n_rows, n_envs = buffer.buffer_size * buffer.n_envs, buffer.n_envs
        if isinstance(buffer.observations, dict):
            shapes = cast(dict[str, tuple[int, ...]], buffer.obs_shape)
            last_obs = cast(dict[str, np.ndarray], self._last_obs)
            obs: Any = {
                key: np.concatenate(
                    [array.reshape(n_rows, *shapes[key])]
                    + (
                        [np.asarray(last_obs[key]).reshape(n_envs, *shapes[key]).astype(array.dtype)]
                        if with_last
                        else []
                    )
                )
                for key, array in buffer.observations.items()
            }
        else:
            rows = buffer.observations.reshape(n_rows, *buffer.obs_shape)
            last = np.asarray(self._last_obs).reshape(n_envs, *buffer.obs_shape).astype(rows.dtype)
            obs = np.concatenate([rows, last]) if with_last else rows
        return obs_as_tensor(obs, self.device)

    def kl_regularized_signal(self) -> tuple[th.Tensor, th.Tensor]:
        """The KL-regularized n-step advantages :math:`\\Delta_t` and values :math:`V(s_t)` of the full rollout
        buffer, ``[T, N]`` each, with the current policy (no gradient).

        SB3's ``collect_rollouts`` has already added ``gamma * V(final observation)`` to the reward of truncated
        steps and marked the next step as an episode start, so every episode end is passed on as ``terminated``
        (no second bootstrap) and the sum stops there; the last row bootstraps from the last observation's value.
        """
        buffer = self.rollout_buffer
        n_time, n_envs = buffer.buffer_size, buffer.n_envs
        check_rewards_finite(buffer.rewards)
        with th.no_grad():
            outputs = self.soft_outputs(self._rollout_observations(with_last=True))
        log_probs = outputs.log_probs.reshape(n_time + 1, n_envs, -1)[:n_time]
        values = outputs.values.reshape(n_time + 1, n_envs)
        episode_ends = np.concatenate(
            [buffer.episode_starts[1:], np.asarray(self._last_episode_starts)[None]]
        )
        advantages = kl_regularized_n_step_advantages(
            th.as_tensor(buffer.rewards, device=self.device).to(values.dtype),
            kl_to_reference(log_probs, self._ref_log_probs),
            values[:n_time],
            values[1:],
            th.as_tensor(episode_ends, device=self.device).to(values.dtype),
            gamma=self.gamma,
            tau=self.tau,
            n_step=self.n_step,
            gae_lambda=self.gae_lambda,
        )
        return advantages, values[:n_time]

    def train(self) -> None:
        """One gradient step on the whole rollout (like SB3's A2C) on the KL-regularized n-step advantages
        (:meth:`kl_regularized_signal`; already in the buffer when it is pgvar's, computed here otherwise)."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        buffer = self.rollout_buffer
        n_time, n_envs = buffer.buffer_size, buffer.n_envs
        if getattr(buffer, "signal_ready", False):
            advantages = th.as_tensor(buffer.advantages, device=self.device)
        else:  # a rollout_buffer_class of the caller's: SB3's GAE is in its advantages
            advantages, values_now = self.kl_regularized_signal()
            buffer.advantages[:] = advantages.cpu().numpy()
            buffer.returns[:] = (values_now + advantages).cpu().numpy()
        outputs = self.soft_outputs(self._rollout_observations(with_last=False))
        n_actions = outputs.log_probs.shape[-1]
        head = SoftPolicyOutputs(
            outputs.log_probs.reshape(n_time, n_envs, n_actions),
            outputs.values.reshape(n_time, n_envs),
            outputs.q_values.reshape(n_time, n_envs, n_actions),
        )
        actions = th.as_tensor(buffer.actions, device=self.device).long().reshape(n_time, n_envs)
        loss, parts = self._loss(head, actions, advantages.to(head.values.dtype))

        self.policy.optimizer.zero_grad()
        loss.backward()
        th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
        self.policy.optimizer.step()
        self._n_updates += 1

        log_probs = head.log_probs.detach()
        entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record(
            "train/explained_variance", explained_variance(buffer.values.flatten(), buffer.returns.flatten())
        )
        self.logger.record("train/entropy_loss", -entropy.item())
        self.logger.record(
            "train/kl_to_reference", kl_to_reference(log_probs, self._ref_log_probs).mean().item()
        )
        self.logger.record("train/loss", loss.item())
        for name, value in parts.items():
            self.logger.record(f"train/{name}", value.item())

    def learn(
        self: SelfSoftAlgorithm,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 100,
        tb_log_name: str | None = None,
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfSoftAlgorithm:
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=type(self).__name__ if tb_log_name is None else tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )
