"""What :class:`~pgvar.algos.qprop.QPropPPO` and :class:`~pgvar.algos.qprop.QPropTRPO` share: the Q-Prop options and
their checks, the replay feed of the critic, the control variate of each rollout, the per-minibatch Q-Prop terms,
save/load. The critic itself (networks, optimizer, replay buffer, TD steps) is a
:class:`~pgvar.algos.qprop_critic.QPropCritic` the algorithm holds as ``qprop_critic``.

Q-Prop (Gu et al. 2017, arXiv:1611.02247) fits an off-policy critic :math:`Q_w` on every transition the on-policy
algorithm collects, and uses it as a control variate (the estimator math is in
:mod:`pgvar.estimators.control_variates`):

.. math::

    \\nabla_\\theta J = \\mathbb{E}\\big[g\\,(\\hat A - \\eta \\bar A)\\big]
        + \\mathbb{E}\\big[\\eta\\, \\nabla_a Q_w(s, \\mu_\\theta(s)) \\nabla_\\theta \\mu_\\theta(s)\\big],
    \\qquad \\bar A = \\nabla_a Q_w(s, \\mu_\\theta(s)) \\cdot (a - \\mu_\\theta(s)).

One iteration of :meth:`QPropMixin.train`:

1. **Control variate** (:meth:`QPropMixin._prepare_qprop_rollout`): with the critic as trained up to the previous
   iteration, :math:`\\bar A`, :math:`\\eta` and the learning signal :math:`\\hat A - \\eta \\bar A` of every step of
   the rollout replace the buffer's advantages; the per-step :math:`\\eta` goes into the buffer next to them.
2. **Policy step** (the class's ``_train_policy``: SB3's PPO / sb3-contrib's TRPO ``train()``, copied, with two
   calls into this mixin): the signal is normalized per minibatch with :math:`\\eta` scaled as
   ``qprop_normalization`` says (:meth:`QPropMixin._qprop_minibatch_signal`), and the analytic term
   :math:`\\operatorname{mean}(\\eta\\, Q_w(s, \\mu_\\theta(s)))` with the critic frozen is added to the objective
   (:meth:`QPropMixin._qprop_correction`).
3. **Critic step** (:meth:`QPropMixin._train_critic`, :meth:`QPropCritic.train
   <pgvar.algos.qprop_critic.QPropCritic.train>`): one DDPG-style TD step per collected environment step on
   minibatches from the replay buffer, target
   :math:`y = r + \\gamma (1 - \\text{terminated})\\, Q_{w'}(s', \\mu_\\theta(s'))` with the policy's mean action and a
   polyak-averaged target critic :math:`Q_{w'}`.

The critic used in steps 1 and 2 has never seen the rollout it corrects, so the control variate does not depend
on the sampled actions (unbiased for any critic, with an :math:`\\eta` that does not depend on the action either);
see the implementation notes in ``docs/modules/qprop.md``.
"""

from __future__ import annotations

import io
import math
import pathlib
from abc import abstractmethod
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import DictReplayBuffer, ReplayBuffer, RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import CategoricalDistribution, DiagGaussianDistribution
from stable_baselines3.common.policies import ActorCriticPolicy, ContinuousCritic
from stable_baselines3.common.type_aliases import MaybeCallback, TensorDict
from stable_baselines3.common.utils import explained_variance
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.dqn.policies import QNetwork

from pgvar._sb3_policy import flatten_time_major
from pgvar._validation import check_choice, check_positive
from pgvar.algos._replay_feed import ReplayFeed, penalize_replay_rewards
from pgvar.algos.buffers import (
    EstimatorDictRolloutBuffer,
    EstimatorRolloutBuffer,
    QPropBufferMixin,
    QPropDictRolloutBuffer,
    QPropRolloutBuffer,
)
from pgvar.algos.qprop_critic import QPropCritic
from pgvar.estimators import (
    QPROP_ETA_RULES,
    QPROP_ETA_SCOPES,
    QPROP_NORMALIZATION_MODES,
    all_action_control_variate,
    qprop_action_variance,
    qprop_control_variate,
    qprop_correction_surrogate,
    qprop_eta,
    qprop_learning_signal,
    qprop_normalize,
)

if TYPE_CHECKING:
    from stable_baselines3.common.distributions import Distribution as SB3Distribution

    from pgvar.algos._mixin import OnPolicyEstimatorMixin

    _Base = OnPolicyEstimatorMixin
else:
    _Base = object

__all__ = ["DEFAULT_CRITIC_NET_ARCH", "QPropMixin"]

#: The official critic: two hidden layers of 100 ReLU units (rllab++ ``ContinuousMLPQFunction``).
DEFAULT_CRITIC_NET_ARCH = (100, 100)


# --------------------------------------------------------------------------------------------------- mixin
class QPropMixin(_Base):
    """The Q-Prop parts shared by ``QPropPPO`` and ``QPropTRPO`` (see the module doc).

    Goes first in the bases of a pgvar on-policy algorithm (a subclass of
    :class:`~pgvar.algos.OnPolicyEstimatorMixin` and an SB3 ``OnPolicyAlgorithm``) that defines ``_train_policy``:
    its SB3 ``train()`` with the advantages taken from :meth:`_qprop_minibatch_signal` and the objective
    increased by :meth:`_qprop_correction`.

    Attributes: the ``qprop_*`` options, ``qprop_critic`` (a :class:`~pgvar.algos.qprop_critic.QPropCritic`), and
    the number of critic steps taken so far. Shortcuts to the critic's parts: ``critic`` and ``critic_target``
    (SB3 ``ContinuousCritic`` with one Q-network for ``Box`` actions, DQN's ``QNetwork`` over all actions for
    ``Discrete``), ``critic.optimizer`` (Adam), ``replay_buffer`` (SB3 ``ReplayBuffer`` / ``DictReplayBuffer``).
    ``save()`` keeps the options, both networks, the optimizer and the critic's random stream; the replay buffer
    is saved separately: :meth:`save_replay_buffer`.
    """

    qprop_eta: str
    qprop_eta_scope: str
    qprop_normalization: str
    qprop_critic_net_arch: list[int]
    qprop_critic_learning_rate: float
    qprop_critic_batch_size: int
    qprop_critic_updates_per_step: float
    qprop_critic_tau: float
    qprop_buffer_size: int
    qprop_warmup_steps: int
    qprop_critic: QPropCritic
    #: Critic gradient steps taken so far; the control variate is used once it is > 0.
    critic_n_updates: int = 0

    # ------------------------------------------------------------------------------------------ options
    def _init_qprop_options(
        self,
        *,
        qprop_eta: str,
        qprop_eta_scope: str,
        qprop_normalization: str,
        qprop_critic_net_arch: Sequence[int],
        qprop_critic_learning_rate: float,
        qprop_critic_batch_size: int,
        qprop_critic_updates_per_step: float,
        qprop_critic_tau: float,
        qprop_buffer_size: int,
        qprop_warmup_steps: int,
    ) -> None:
        """Store and validate the Q-Prop arguments (``ValueError`` naming the argument, the value, what is allowed)."""
        self.qprop_eta = qprop_eta
        self.qprop_eta_scope = qprop_eta_scope
        self.qprop_normalization = qprop_normalization
        self.qprop_critic_net_arch = qprop_critic_net_arch  # type: ignore[assignment]
        self.qprop_critic_learning_rate = qprop_critic_learning_rate
        self.qprop_critic_batch_size = qprop_critic_batch_size
        self.qprop_critic_updates_per_step = qprop_critic_updates_per_step
        self.qprop_critic_tau = qprop_critic_tau
        self.qprop_buffer_size = qprop_buffer_size
        self.qprop_warmup_steps = qprop_warmup_steps
        self._check_qprop_options()

    def _check_qprop_options(self) -> None:
        check_choice("qprop_eta", self.qprop_eta, QPROP_ETA_RULES)
        check_choice("qprop_eta_scope", self.qprop_eta_scope, QPROP_ETA_SCOPES)
        check_choice("qprop_normalization", self.qprop_normalization, QPROP_NORMALIZATION_MODES)
        arch = self.qprop_critic_net_arch
        if (
            isinstance(arch, (str, bytes))
            or not isinstance(arch, Sequence)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in arch)
        ):
            raise ValueError(
                f"qprop_critic_net_arch must be a sequence of layer widths (integers > 0), e.g. [100, 100], got {arch!r}"
            )
        self.qprop_critic_net_arch = [int(n) for n in arch]
        check_positive("qprop_critic_learning_rate", self.qprop_critic_learning_rate)
        check_positive("qprop_critic_batch_size", self.qprop_critic_batch_size, integer=True)
        check_positive("qprop_critic_updates_per_step", self.qprop_critic_updates_per_step)
        tau = self.qprop_critic_tau
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 < tau <= 1.0:
            raise ValueError(f"qprop_critic_tau must be a number in (0, 1] (soft target update rate), got {tau!r}")
        check_positive("qprop_buffer_size", self.qprop_buffer_size, integer=True)
        warmup = self.qprop_warmup_steps
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"qprop_warmup_steps must be an integer >= 0 (transitions in the replay buffer), got {warmup!r}")
        self.qprop_critic_batch_size = int(self.qprop_critic_batch_size)
        self.qprop_buffer_size = int(self.qprop_buffer_size)

    def _check_qprop_spaces(self) -> None:
        """Box actions with a plain Gaussian policy (Taylor control variate) or Discrete (all-action control variate)."""
        action_space = self.action_space
        name = type(self).__name__
        if isinstance(action_space, spaces.Box):
            if self.use_sde:
                raise ValueError(
                    f"{name} does not support use_sde=True (got use_sde={self.use_sde!r}): the Taylor control variate "
                    "needs a Gaussian policy whose action is mean + state-independent noise; use use_sde=False"
                )
        elif isinstance(action_space, spaces.Discrete):
            if self.qprop_eta == "adaptive":
                raise ValueError(
                    f"qprop_eta='adaptive' is for Box action spaces only (it divides by the closed-form Var_a of the "
                    f"Taylor control variate of a Gaussian policy), got action space {action_space!r}; use one of "
                    "'fixed', 'conservative', 'aggressive' with Discrete actions"
                )
        else:
            raise ValueError(
                f"{name} supports Box actions (Q-Prop's Taylor control variate) and Discrete actions (the all-action "
                f"control variate), got action space {action_space!r}"
            )

    def _check_qprop_policy(self) -> None:
        distribution = self.policy.action_dist
        if isinstance(self.action_space, spaces.Box):
            supported = type(distribution) is DiagGaussianDistribution
            wanted = "a DiagGaussianDistribution (SB3's default for Box actions, without squash_output)"
        else:
            supported = isinstance(distribution, CategoricalDistribution)
            wanted = "a CategoricalDistribution"
        if not supported:
            raise ValueError(
                f"{type(self).__name__} needs a policy whose action distribution is {wanted}, got "
                f"{type(distribution).__name__} from {type(self.policy).__name__}"
            )

    # -------------------------------------------------------------------------------------------- model
    @property
    def critic(self) -> ContinuousCritic | QNetwork:
        """The critic :math:`Q_w` (``qprop_critic.q_net``)."""
        return self.qprop_critic.q_net

    @property
    def critic_target(self) -> ContinuousCritic | QNetwork:
        """The target critic :math:`Q_{w'}` (``qprop_critic.q_net_target``)."""
        return self.qprop_critic.q_net_target

    @property
    def replay_buffer(self) -> ReplayBuffer | DictReplayBuffer:
        """The critic's replay buffer (``qprop_critic.replay_buffer``)."""
        return self.qprop_critic.replay_buffer

    def set_random_seed(self, seed: int | None = None) -> None:
        """SB3's seeding, plus the critic's private random streams (critic initialization and replay minibatches).

        They are separate from the global streams SB3 draws actions and minibatch permutations from, so a Q-Prop
        model with the control variate switched off trains exactly like the plain algorithm with the same seed.
        """
        super().set_random_seed(seed)
        critic = self.__dict__.get("qprop_critic")
        if critic is not None:  # (while the model is set up, the critic is built with the seed)
            critic.set_random_seed(seed)

    def _setup_model(self) -> None:
        self._check_qprop_options()
        self._check_qprop_spaces()
        # After load(): the replay stream continues where the saved model left it (see save()).
        saved_stream = self.__dict__.pop("_qprop_random_state", None)
        legacy_stream = self.__dict__.pop("_qprop_np_random_state", None)  # models saved before QPropCritic
        super()._setup_model()
        self._check_qprop_policy()
        self.qprop_critic = self._make_qprop_critic()
        if saved_stream is not None or legacy_stream is not None:
            self.qprop_critic.random_state = saved_stream if saved_stream is not None else legacy_stream

    def _make_qprop_critic(self, *, by_hand: bool = True) -> QPropCritic:
        """A new critic for this model (features extractor: a separate instance of the policy's class).

        :param by_hand: take the TD steps by hand where the critic allows it (False: autograd, the reference)
        """
        return QPropCritic(
            self.observation_space,
            self.action_space,
            self.policy.make_features_extractor,
            normalize_images=self.policy.normalize_images,
            net_arch=self.qprop_critic_net_arch,
            learning_rate=self.qprop_critic_learning_rate,
            batch_size=self.qprop_critic_batch_size,
            tau=self.qprop_critic_tau,
            gamma=self.gamma,
            buffer_size=self.qprop_buffer_size,
            n_envs=self.n_envs,
            device=self.device,
            seed=self.seed,
            by_hand=by_hand,
        )

    def _estimator_buffer_class(self) -> type[RolloutBuffer]:
        chosen = super()._estimator_buffer_class()
        if chosen is EstimatorRolloutBuffer:
            return QPropRolloutBuffer
        if chosen is EstimatorDictRolloutBuffer:
            return QPropDictRolloutBuffer
        if chosen is not None and issubclass(chosen, QPropBufferMixin):
            return chosen
        requested = self.rollout_buffer_class
        raise ValueError(
            f"rollout_buffer_class={getattr(requested, '__name__', requested)} cannot carry the Q-Prop weights eta to "
            f"the minibatches; pass rollout_buffer_class=None or a subclass of "
            "pgvar.algos.QPropRolloutBuffer (QPropDictRolloutBuffer for dict observations)"
        )

    # --------------------------------------------------------------------------------------- rollouts
    def collect_rollouts(self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int) -> bool:
        """SB3's ``collect_rollouts``; every transition also goes to the critic's replay buffer (raw reward, true
        next observation, ``TimeLimit.truncated`` kept apart from termination)."""
        feed = ReplayFeed(self, self.qprop_critic.replay_buffer, callback)
        self._replay_rollout_start = self.qprop_critic.replay_buffer.pos
        return super().collect_rollouts(env, feed, rollout_buffer, n_rollout_steps)

    # ------------------------------------------------------------------------------------------- policy
    def _policy_distribution(self, observations: th.Tensor | TensorDict) -> Any:
        """The torch distribution of the policy at ``observations`` (a fresh object: SB3 reuses its wrapper)."""
        return self.policy.get_distribution(observations).distribution

    def _evaluated_distribution(self) -> SB3Distribution | None:
        """The distribution of the last ``policy.evaluate_actions`` call, with its graph, when the policy is SB3's.

        SB3's ``ActorCriticPolicy.evaluate_actions`` builds it in place in ``policy.action_dist``, so PPO's analytic
        term can reuse it instead of a second actor forward pass. ``None`` for a policy that overrides it.
        """
        if type(self.policy).evaluate_actions is ActorCriticPolicy.evaluate_actions:
            return self.policy.action_dist
        return None

    def _rollout_tensors(self) -> tuple[th.Tensor | TensorDict, th.Tensor]:
        """The rollout's observations and actions, ``[T * N, ...]`` in time-major row order."""
        buffer = self.rollout_buffer
        return flatten_time_major(buffer.observations, self.device), flatten_time_major(buffer.actions, self.device)

    def _prepare_qprop_rollout(self) -> None:
        """Replace the rollout's advantages :math:`\\hat A` by the learning signal and store :math:`\\eta` (step 1).

        Before the critic's first update (the warm-up) :math:`\\eta = 0`: the plain estimator.
        """
        buffer = self.rollout_buffer
        assert isinstance(buffer, QPropBufferMixin) and not buffer.generator_ready
        steps, n_envs = buffer.buffer_size, buffer.n_envs
        adv_hat = th.as_tensor(buffer.advantages, device=self.device)
        self._qprop_cv_active = self.critic_n_updates > 0
        if not self._qprop_cv_active:
            etas = th.zeros_like(adv_hat)
            signal = adv_hat
        else:
            observations, actions = self._rollout_tensors()
            with th.no_grad():
                distribution = self._policy_distribution(observations)
            if isinstance(self.action_space, spaces.Discrete):
                with th.no_grad():
                    q_values = self.critic(observations)
                taken = actions.long().flatten()
                all_action = all_action_control_variate(
                    q_values, distribution.logits, taken, adv_hat.flatten(), from_logits=True
                )
                adv_bar = (adv_hat.flatten() - all_action.learning_signal).reshape(steps, n_envs)
                action_variance = None
                q_taken = q_values.gather(1, taken.unsqueeze(1)).flatten()
            else:
                mean = distribution.mean.detach()
                mean_leaf = mean.clone().requires_grad_(True)
                (grad_q,) = th.autograd.grad(self.critic(observations, mean_leaf)[0].sum(), mean_leaf)
                adv_bar = qprop_control_variate(grad_q, actions.float(), mean).reshape(steps, n_envs)
                action_variance = (
                    qprop_action_variance(grad_q, distribution.stddev).reshape(steps, n_envs)
                    if self.qprop_eta == "adaptive"
                    else None
                )
                with th.no_grad():
                    q_taken = self.critic(observations, actions.float())[0].flatten()
            etas = qprop_eta(adv_hat, adv_bar, self.qprop_eta, self.qprop_eta_scope, action_variance=action_variance)
            signal = qprop_learning_signal(adv_hat, adv_bar, etas)
            self.logger.record(
                "pgvar/qprop_critic_explained_variance",
                float(explained_variance(q_taken.cpu().numpy(), buffer.returns.flatten())),
            )
        self.logger.record("pgvar/qprop_eta_mean", float(etas.mean()))
        self.logger.record("pgvar/signal_var_before", float(adv_hat.var()))
        self.logger.record("pgvar/signal_var_after", float(signal.var()))
        if self.advantage_normalization == "batch":
            signal, etas = qprop_normalize(signal, etas, self.qprop_normalization)
        buffer.advantages = signal.detach().cpu().numpy().astype(np.float32, copy=False)
        buffer.qprop_etas = etas.detach().expand(steps, n_envs).cpu().numpy().astype(np.float32)

    def _qprop_minibatch_signal(self, rollout_data: Any, normalize: bool) -> tuple[th.Tensor, th.Tensor]:
        """The minibatch's learning signal and :math:`\\eta`, normalized together when ``normalize`` (step 2).

        With ``qprop_normalization="consistent"`` :math:`\\eta` is divided by the signal's std like the signal;
        ``"as_published"`` leaves it (the official code); ``"none"`` normalizes neither. A minibatch of one sample
        is left alone (SB3's rule).
        """
        advantages, etas = rollout_data.advantages, rollout_data.qprop_etas
        if normalize and len(advantages) > 1:
            advantages, etas = qprop_normalize(advantages, etas, self.qprop_normalization)
        return advantages, etas

    def _qprop_correction(
        self,
        observations: th.Tensor | TensorDict,
        actions: th.Tensor,
        etas: th.Tensor,
        distribution: SB3Distribution | None = None,
    ) -> th.Tensor | None:
        """The analytic term to add to the policy objective (``None`` while the control variate is off).

        ``mean(eta * Q_w(s, mu_theta(s)))`` for Box actions (:func:`~pgvar.estimators.qprop_correction_surrogate`),
        ``mean(eta * sum_a pi_theta(a|s) Q_w(s, a))`` for Discrete actions (the surrogate of
        :func:`~pgvar.estimators.all_action_control_variate`). The critic is frozen (``QPropMixin.train`` turns
        off its gradients), so the gradient goes to the policy only.

        :param distribution: the SB3 distribution of the current policy at ``observations`` when the caller has
            it (TRPO); otherwise it is computed
        """
        if not getattr(self, "_qprop_cv_active", False):
            return None
        torch_distribution: Any = (
            distribution.distribution if distribution is not None else self._policy_distribution(observations)
        )
        if isinstance(self.action_space, spaces.Discrete):
            with th.no_grad():
                weighted_q = etas.unsqueeze(1) * self.critic(observations)
            return all_action_control_variate(
                weighted_q, torch_distribution.logits, actions.long().flatten(), th.zeros_like(etas), from_logits=True
            ).surrogate
        q_at_mean = self.critic(observations, torch_distribution.mean)[0].flatten()
        return qprop_correction_surrogate(q_at_mean, etas)

    # ------------------------------------------------------------------------------------------- critic
    def _train_critic(self) -> None:
        """``ceil(qprop_critic_updates_per_step * n_steps * n_envs)`` TD steps of the critic (step 3; see
        :meth:`QPropCritic.train <pgvar.algos.qprop_critic.QPropCritic.train>`) once the replay buffer holds
        ``qprop_warmup_steps`` transitions, with the model's current critic options (they rule, also after
        ``load(custom_objects=...)``)."""
        critic = self.qprop_critic
        stored = critic.replay_size
        self.logger.record("pgvar/qprop_replay_size", stored)
        if stored < max(self.qprop_warmup_steps, 1):
            return
        critic.learning_rate = self.qprop_critic_learning_rate
        critic.batch_size = self.qprop_critic_batch_size
        critic.tau = self.qprop_critic_tau
        critic.gamma = self.gamma
        n_updates = math.ceil(self.qprop_critic_updates_per_step * self.n_steps * self.n_envs)
        stats = critic.train(n_updates, self.policy, env=self._vec_normalize_env)
        self.critic_n_updates += stats.n_updates
        self.logger.record("pgvar/qprop_critic_loss", stats.loss)
        self.logger.record("pgvar/qprop_critic_updates", self.critic_n_updates)

    # -------------------------------------------------------------------------------------------- train
    def train(self) -> None:
        """One Q-Prop iteration: control variate (critic of the previous iterations), policy step, critic step.

        With a reference regularizer in the reward (``ref_placement="reward"``), the rollout's penalty is first
        subtracted from its transitions in the replay buffer: the critic learns :math:`Q` of the penalized reward
        whose advantages :math:`\\hat A` the control variate corrects. (The estimator stays unbiased for any critic;
        a critic of the raw reward would only correlate less with :math:`\\hat A`.)
        """
        regularizer = self.__dict__.get("reference_regularizer")
        start = self.__dict__.pop("_replay_rollout_start", None)
        if regularizer is not None and regularizer.last_penalty is not None and start is not None:
            penalize_replay_rewards(self.qprop_critic.replay_buffer, start, regularizer.last_penalty, self._vec_normalize_env)
        self._train_with_reference(self._qprop_iteration)

    def _qprop_iteration(self) -> None:
        self._prepare_qprop_rollout()
        self.critic.requires_grad_(False)  # frozen: the analytic term's gradient goes to the policy only
        try:
            self._train_policy()
        finally:
            self.critic.requires_grad_(True)
        self._train_critic()
        constant_baseline = getattr(self.rollout_buffer, "constant_baseline", None)
        if constant_baseline is not None:
            self.logger.record("pgvar/constant_baseline", constant_baseline)

    @abstractmethod
    def _train_policy(self) -> None:
        """The algorithm's own policy step with the Q-Prop terms (QPropPPO: clipped epochs; QPropTRPO: the
        natural-gradient step), implemented by each class."""

    def learn(
        self,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str | None = None,
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> Any:
        """SB3's ``learn``; TensorBoard runs are named after the class (``QPropPPO_1``, ``QPropTRPO_1``, ...), not
        ``PPO_N`` / ``TRPO_N``, so they do not share numbering with the plain algorithms' runs."""
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=type(self).__name__ if tb_log_name is None else tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )

    # --------------------------------------------------------------------------------------- save/load
    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "qprop_critic"]

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        state_dicts, torch_variables = super()._get_torch_save_params()
        return [*state_dicts, "critic", "critic_target", "critic.optimizer"], torch_variables

    def save(
        self,
        path: str | pathlib.Path | io.BufferedIOBase,
        exclude: Iterable[str] | None = None,
        include: Iterable[str] | None = None,
    ) -> None:
        """Save like the other pgvar models (SB3's zip, atomically), with the critic's networks, its optimizer and
        the state of its replay stream (JSON in the zip's ``data``); not the replay buffer: :meth:`save_replay_buffer`.
        """
        self._qprop_random_state = self.qprop_critic.random_state_json
        try:
            super().save(path, exclude=exclude, include=include)
        finally:
            del self._qprop_random_state

    def save_replay_buffer(self, path: str | pathlib.Path | io.BufferedIOBase) -> None:
        """Save the critic's replay buffer (numpy arrays and JSON metadata in one zip, no pickle), atomically.

        ``save()`` does not include it (it can hold a million transitions); save it next to the model to resume
        training exactly where it stopped.

        :param path: path of the file (``.npz`` is appended when it has no suffix) or a file object
        """
        self.qprop_critic.save_replay_buffer(path)

    def load_replay_buffer(self, path: str | pathlib.Path | io.BufferedIOBase) -> None:
        """Load a replay buffer saved by :meth:`save_replay_buffer` (``ValueError`` if it does not fit the model, or
        if the file is not such a file: a pickle is refused and never run).

        Without it, a loaded model keeps its trained critic and uses the control variate at once, but trains the
        critic again only when the new replay buffer holds ``qprop_warmup_steps`` transitions.

        :param path: path of the file (``.npz`` is tried too) or a file object
        """
        self.qprop_critic.load_replay_buffer(path)

