"""What :class:`~pgvar.algos.qprop.QPropPPO` and :class:`~pgvar.algos.qprop.QPropTRPO` share: the off-policy critic,
its replay feed, the control variate of each rollout, the per-minibatch Q-Prop terms, save/load.

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
3. **Critic step** (:meth:`QPropMixin._train_critic`): one DDPG-style TD step per collected environment step on
   minibatches from the replay buffer, target
   :math:`y = r + \\gamma (1 - \\text{terminated})\\, Q_{w'}(s', \\mu_\\theta(s'))` with the policy's mean action and a
   polyak-averaged target critic :math:`Q_{w'}`.

The critic used in steps 1 and 2 has never seen the rollout it corrects, so the control variate does not depend
on the sampled actions (unbiased for any critic, with an :math:`\\eta` that does not depend on the action either);
see the implementation notes in ``docs/modules/qprop.md``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import pathlib
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch as th
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3.common.buffers import DictReplayBuffer, ReplayBuffer, RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import CategoricalDistribution, DiagGaussianDistribution
from stable_baselines3.common.policies import ActorCriticPolicy, ContinuousCritic
from stable_baselines3.common.save_util import load_from_pkl, save_to_pkl
from stable_baselines3.common.type_aliases import ReplayBufferSamples, TensorDict
from stable_baselines3.common.utils import explained_variance, get_parameters_by_name, polyak_update
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.dqn.policies import QNetwork
from torch import nn

from pgvar._validation import check_choice, check_positive
from pgvar.algos._critic_step import AdamStep, mlp_forward, mlp_mse_gradients, plain_mlp
from pgvar.algos.buffers import EstimatorBufferMixin, EstimatorDictRolloutBuffer, EstimatorRolloutBuffer
from pgvar.estimators.control_variates import (
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

__all__ = [
    "DEFAULT_CRITIC_NET_ARCH",
    "QPropBufferMixin",
    "QPropDictRolloutBuffer",
    "QPropDictRolloutBufferSamples",
    "QPropMixin",
    "QPropRolloutBuffer",
    "QPropRolloutBufferSamples",
]

#: The official critic: two hidden layers of 100 ReLU units (rllab++ ``ContinuousMLPQFunction``).
DEFAULT_CRITIC_NET_ARCH = (100, 100)
#: Critic minibatches drawn from the replay buffer per call of its ``sample`` (bounds the memory of one draw).
_CRITIC_STEPS_PER_DRAW = 256
#: Offset between the model's seed and the seed of Q-Prop's private random streams (critic init, replay draws).
_QPROP_SEED_OFFSET = 7_919


class _CriticHeadBatch(NamedTuple):
    """One critic minibatch as the Q-heads' inputs (see ``QPropMixin._critic_head_minibatches``)."""

    inputs: th.Tensor
    next_inputs: th.Tensor
    #: Discrete: the taken action's column of each row, ``[B, 1]``; Box: None (the action is in ``inputs``)
    taken: th.Tensor | None
    #: Discrete: ``pi(.|s')``, ``[B, n]``; Box: None (``mu(s')`` is in ``next_inputs``)
    next_probs: th.Tensor | None
    rewards: th.Tensor
    discounts: th.Tensor


# ------------------------------------------------------------------------------------------------ buffers
class QPropRolloutBufferSamples(NamedTuple):
    """SB3's ``RolloutBufferSamples`` plus the Q-Prop weight :math:`\\eta` of each sample."""

    observations: th.Tensor
    actions: th.Tensor
    old_values: th.Tensor
    old_log_prob: th.Tensor
    #: the Q-Prop learning signal :math:`\hat A - \eta \bar A` (not yet normalized per minibatch)
    advantages: th.Tensor
    returns: th.Tensor
    #: :math:`\eta` of each sample (already divided by the batch std with ``normalize_advantage="batch"`` and
    #: ``qprop_normalization="consistent"``)
    qprop_etas: th.Tensor


class QPropDictRolloutBufferSamples(NamedTuple):
    """SB3's ``DictRolloutBufferSamples`` plus the Q-Prop weight :math:`\\eta` of each sample."""

    observations: TensorDict
    actions: th.Tensor
    old_values: th.Tensor
    old_log_prob: th.Tensor
    advantages: th.Tensor
    returns: th.Tensor
    qprop_etas: th.Tensor


class QPropBufferMixin(EstimatorBufferMixin):
    """A pgvar estimator buffer that also carries the Q-Prop :math:`\\eta` of each step to the minibatches.

    ``advantages`` hold :math:`\\hat A` after ``compute_returns_and_advantage`` and are replaced by the learning
    signal in ``QPropMixin.train``; ``qprop_etas`` (``[T, N]``, flattened like the other fields by ``get``) hold
    :math:`\\eta`. ``normalize_batch`` is accepted and ignored: Q-Prop normalizes the learning signal
    :math:`\\hat A - \\eta \\bar A` together with :math:`\\eta`, never :math:`\\hat A` alone.
    """

    qprop_etas: np.ndarray

    def __init__(self, *args: Any, normalize_batch: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, normalize_batch=False, **kwargs)

    def reset(self) -> None:
        super().reset()  # type: ignore[misc]
        self.qprop_etas = np.zeros((self.buffer_size, self.n_envs), dtype=np.float32)

    def get(self, batch_size: int | None = None) -> Iterator[Any]:
        if not self.generator_ready:  # type: ignore[attr-defined]
            self.qprop_etas = self.swap_and_flatten(self.qprop_etas)  # type: ignore[attr-defined]
        yield from super().get(batch_size)  # type: ignore[misc]

    def _get_samples(self, batch_inds: np.ndarray, env: Any = None) -> Any:
        samples: Any = super()._get_samples(batch_inds, env)  # type: ignore[misc]
        etas = self.to_torch(self.qprop_etas[batch_inds].flatten())  # type: ignore[attr-defined]
        if isinstance(samples.observations, dict):
            return QPropDictRolloutBufferSamples._make((*samples, etas))
        return QPropRolloutBufferSamples._make((*samples, etas))


class QPropRolloutBuffer(QPropBufferMixin, EstimatorRolloutBuffer):  # type: ignore[misc]
    """:class:`~pgvar.algos.EstimatorRolloutBuffer` with the per-step Q-Prop :math:`\\eta` (see :class:`QPropBufferMixin`)."""


class QPropDictRolloutBuffer(QPropBufferMixin, EstimatorDictRolloutBuffer):  # type: ignore[misc]
    """:class:`~pgvar.algos.EstimatorDictRolloutBuffer` (dict observations) with the per-step Q-Prop :math:`\\eta`."""


# ------------------------------------------------------------------------------------------- replay feed
class _ReplayFeed(BaseCallback):
    """Wraps the callback given to ``collect_rollouts``: stores each transition in the replay buffer, then forwards.

    ``collect_rollouts`` calls ``update_locals`` and ``on_step`` right after ``env.step`` and **before** it adds
    ``gamma * V(final observation)`` to the rewards of truncated episodes (in place), so the rewards seen here
    are the environment's.
    """

    def __init__(self, algorithm: QPropMixin, callback: BaseCallback) -> None:
        super().__init__()
        self.algorithm = algorithm
        self.callback = callback

    def on_rollout_start(self) -> None:
        self.callback.on_rollout_start()

    def update_locals(self, locals_: dict[str, Any]) -> None:
        self.locals = locals_
        self.callback.update_locals(locals_)

    def on_step(self) -> bool:
        self.algorithm._store_qprop_transition(self.locals)
        return self.callback.on_step()

    def on_rollout_end(self) -> None:
        self.callback.on_rollout_end()

    def _on_step(self) -> bool:  # pragma: no cover - on_step is overridden
        return True


def _flatten_time_major(array: np.ndarray, device: th.device) -> th.Tensor:
    """``[T, N, ...]`` numpy array -> ``[T * N, ...]`` tensor, row ``t * N + n``."""
    return th.as_tensor(array.reshape(array.shape[0] * array.shape[1], *array.shape[2:]), device=device)


def _rows(observations: th.Tensor | TensorDict, rows: slice) -> th.Tensor | TensorDict:
    if isinstance(observations, dict):
        return {key: value[rows] for key, value in observations.items()}
    return observations[rows]


# --------------------------------------------------------------------------------------------------- mixin
class QPropMixin(_Base):
    """The Q-Prop parts shared by ``QPropPPO`` and ``QPropTRPO`` (see the module doc).

    Goes first in the bases of a pgvar on-policy algorithm (a subclass of
    :class:`~pgvar.algos.OnPolicyEstimatorMixin` and an SB3 ``OnPolicyAlgorithm``) that defines ``_train_policy``:
    its SB3 ``train()`` with the advantages taken from :meth:`_qprop_minibatch_signal` and the objective
    increased by :meth:`_qprop_correction`.

    Attributes (saved with the model): the ``qprop_*`` options, ``critic`` and ``critic_target`` (SB3
    ``ContinuousCritic`` with one Q-network for ``Box`` actions, DQN's ``QNetwork`` over all actions for
    ``Discrete``), ``critic.optimizer`` (Adam), and the number of critic steps taken so far. ``replay_buffer``
    (SB3 ``ReplayBuffer`` / ``DictReplayBuffer``) is saved separately: :meth:`save_replay_buffer`.
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
    critic: ContinuousCritic | QNetwork
    critic_target: ContinuousCritic | QNetwork
    replay_buffer: ReplayBuffer | DictReplayBuffer
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
    def set_random_seed(self, seed: int | None = None) -> None:
        """SB3's seeding, plus Q-Prop's private random streams (critic initialization and replay minibatches).

        They are separate from the global streams SB3 draws actions and minibatch permutations from, so a Q-Prop
        model with the control variate switched off trains exactly like the plain algorithm with the same seed.
        """
        super().set_random_seed(seed)
        seed_sequence = np.random.SeedSequence(None if seed is None else [seed, _QPROP_SEED_OFFSET])
        self._qprop_np_random_state = np.random.RandomState(np.random.MT19937(seed_sequence)).get_state()
        self._qprop_critic_seed = int(seed_sequence.generate_state(1)[0])

    @contextlib.contextmanager
    def _private_numpy_random(self) -> Iterator[None]:
        """Run SB3's replay sampling (which draws from ``np.random``) on Q-Prop's own stream, then restore the global one."""
        # (The legacy global state on purpose: it is what SB3's buffers draw from.)
        saved = np.random.get_state()  # noqa: NPY002
        np.random.set_state(self._qprop_np_random_state)  # noqa: NPY002
        try:
            yield
        finally:
            self._qprop_np_random_state = np.random.get_state()  # noqa: NPY002
            np.random.set_state(saved)  # noqa: NPY002

    def _setup_model(self) -> None:
        self._check_qprop_options()
        self._check_qprop_spaces()
        # After load(): SB3's _setup_model reseeds, but the replay stream continues where the saved model left it.
        resumed_stream = self.__dict__.get("_qprop_np_random_state")
        super()._setup_model()
        if resumed_stream is not None:
            self._qprop_np_random_state = resumed_stream
        self._check_qprop_policy()
        self._build_critic()
        replay_class: Any = DictReplayBuffer if isinstance(self.observation_space, spaces.Dict) else ReplayBuffer
        self.replay_buffer = replay_class(
            self.qprop_buffer_size,
            self.observation_space,
            self.action_space,
            device=self.device,
            n_envs=self.n_envs,
            optimize_memory_usage=False,
            handle_timeout_termination=True,
        )

    def _make_critic(self) -> ContinuousCritic | QNetwork:
        # The policy's features extractor class and kwargs, with weights of its own (FlattenExtractor for MlpPolicy).
        features_extractor = self.policy.make_features_extractor()
        common: dict[str, Any] = {
            "features_extractor": features_extractor,
            "features_dim": features_extractor.features_dim,
            "net_arch": list(self.qprop_critic_net_arch),
            "activation_fn": nn.ReLU,
            "normalize_images": self.policy.normalize_images,
        }
        if isinstance(self.action_space, spaces.Discrete):
            return QNetwork(self.observation_space, self.action_space, **common)
        return ContinuousCritic(
            self.observation_space, self.action_space, n_critics=1, share_features_extractor=False, **common  # type: ignore[arg-type]
        )

    def _build_critic(self) -> None:
        # Built on its own torch random stream (restored afterwards): the policy's action noise is unchanged.
        with th.random.fork_rng(devices=[]):
            th.default_generator.manual_seed(self._qprop_critic_seed)
            self.critic = self._make_critic().to(self.device)
            self.critic_target = self._make_critic().to(self.device)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.set_training_mode(False)
        self.critic_target.requires_grad_(False)
        # Fused Adam: one kernel for all parameters (about 0.3 ms less per critic step on a CPU than the default).
        self.critic.optimizer = th.optim.Adam(self.critic.parameters(), lr=self.qprop_critic_learning_rate, fused=True)
        self._critic_features_are_fixed = not any(True for _ in self.critic.features_extractor.parameters())
        self._critic_batch_norm_stats = get_parameters_by_name(self.critic, ["running_"])
        self._critic_batch_norm_stats_target = get_parameters_by_name(self.critic_target, ["running_"])

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
            "pgvar.algos._qprop_mixin.QPropRolloutBuffer (QPropDictRolloutBuffer for dict observations)"
        )

    # --------------------------------------------------------------------------------------- rollouts
    def collect_rollouts(self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int) -> bool:
        """SB3's ``collect_rollouts``; every transition also goes to the critic's replay buffer (raw reward, true
        next observation, ``TimeLimit.truncated`` kept apart from termination)."""
        return super().collect_rollouts(env, _ReplayFeed(self, callback), rollout_buffer, n_rollout_steps)

    def _store_qprop_transition(self, step_locals: dict[str, Any]) -> None:
        """Add one vectorized step to the replay buffer, as SB3's ``OffPolicyAlgorithm._store_transition`` does.

        Unnormalized observations and rewards (``VecNormalize`` normalizes them again when the critic samples),
        the action the policy sampled (before clipping to the action bounds: the :math:`a` of
        :math:`a - \\mu(s)`), and for finished episodes the final observation from
        ``infos[i]["terminal_observation"]`` instead of the reset observation.
        """
        new_obs, rewards, dones, infos = (step_locals[key] for key in ("new_obs", "rewards", "dones", "infos"))
        vec_normalize = self._vec_normalize_env
        if vec_normalize is not None:
            new_obs_ = vec_normalize.get_original_obs()
            rewards_ = vec_normalize.get_original_reward()
            last_obs = self._last_original_obs
        else:
            new_obs_, rewards_, last_obs = new_obs, rewards, self._last_obs
        next_obs = copy.deepcopy(new_obs_)
        for index, done in enumerate(dones):
            terminal = infos[index].get("terminal_observation") if done else None
            if terminal is None:
                continue
            if vec_normalize is not None:
                terminal = vec_normalize.unnormalize_obs(terminal)
            if isinstance(next_obs, dict):
                for key in next_obs:
                    next_obs[key][index] = terminal[key]
            else:
                next_obs[index] = terminal
        self.replay_buffer.add(last_obs, next_obs, np.asarray(step_locals["actions"]), rewards_, dones, infos)  # type: ignore[arg-type]
        if vec_normalize is not None:
            self._last_original_obs = new_obs_

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
        if isinstance(buffer.observations, dict):
            observations: th.Tensor | TensorDict = {
                key: _flatten_time_major(value, self.device) for key, value in buffer.observations.items()
            }
        else:
            observations = _flatten_time_major(buffer.observations, self.device)
        return observations, _flatten_time_major(buffer.actions, self.device)

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
    def _critic_td_targets(self, samples: ReplayBufferSamples) -> th.Tensor:
        """DDPG-style targets ``r + gamma * (1 - terminated) * Q_target(s', mu_theta(s'))``, shape ``[B, 1]``.

        ``samples.dones`` from SB3's replay buffer are already ``done * (1 - truncated)``: a time-limit
        truncation bootstraps. Box: the current policy's **mean** action at ``s'`` (the official code's
        ``qprop_use_mean_action``; no target actor). Discrete: the expectation ``sum_a' pi(a'|s') Q_target(s', a')``.
        (The reference form; :meth:`_train_critic` computes the same targets from features computed once per draw.)
        """
        with th.no_grad():
            next_policy = self._critic_next_policy(samples.next_observations)
            next_q = self._critic_expected_q(self.critic_target, samples.next_observations, next_policy)
            return th.addcmul(samples.rewards, self.gamma * (1.0 - samples.dones), next_q)

    def _critic_next_policy(self, next_observations: th.Tensor | TensorDict) -> th.Tensor:
        """The current policy's mean actions (Box) or probabilities (Discrete), ``[B, d]``, no gradient."""
        with th.no_grad():
            distribution = self._policy_distribution(next_observations)
            return distribution.probs if isinstance(self.action_space, spaces.Discrete) else distribution.mean

    def _critic_q(self, module: nn.Module, observations: th.Tensor | TensorDict, actions: th.Tensor) -> th.Tensor:
        """``Q(s, a)`` of ``module`` (the critic or its target) at the stored actions, ``[B, 1]``."""
        if isinstance(self.action_space, spaces.Discrete):
            return module(observations).gather(1, actions.long().reshape(-1, 1))
        return module(observations, actions.float())[0]

    def _critic_expected_q(
        self, module: nn.Module, observations: th.Tensor | TensorDict, policy_out: th.Tensor
    ) -> th.Tensor:
        """``Q(s, mu(s))`` (Box) or ``sum_a pi(a|s) Q(s, a)`` (Discrete) of ``module``, ``[B, 1]``."""
        if isinstance(self.action_space, spaces.Discrete):
            return (policy_out * module(observations)).sum(dim=1, keepdim=True)
        return module(observations, policy_out)[0]

    def _critic_minibatches(self, drawn: ReplayBufferSamples, batch_size: int) -> Iterator[tuple[Any, ...]]:
        """``(q, next_q, rewards, discounts)`` per minibatch of one draw from the replay buffer: callables giving
        ``Q_w(s, a)`` (with gradient) and ``Q_target(s', mu(s'))`` (Box) or ``sum_a' pi(a'|s') Q_target(s', a')``
        (Discrete), ``[B, 1]`` each, and the minibatch's ``r`` and ``gamma * (1 - terminated)``.

        The policy does not change while the critic trains, so ``mu(s')`` (or ``pi(.|s')``) is computed once per
        draw; so are the observation features when the features extractor has no parameters (SB3's
        ``FlattenExtractor``, :meth:`_critic_head_minibatches`): then each TD step runs only the Q-networks' MLPs.
        """
        if self._critic_features_are_fixed:
            discrete = isinstance(self.action_space, spaces.Discrete)
            head: Any = self.critic.q_net if discrete else self.critic.q_networks[0]  # type: ignore[index]
            head_target: Any = self.critic_target.q_net if discrete else self.critic_target.q_networks[0]  # type: ignore[index]
            for batch in self._critic_head_minibatches(drawn, batch_size):
                if batch.taken is None:
                    yield partial(head, batch.inputs), partial(head_target, batch.next_inputs), batch.rewards, batch.discounts
                else:
                    yield (
                        lambda b=batch: head(b.inputs).gather(1, b.taken),
                        lambda b=batch: (b.next_probs * head_target(b.next_inputs)).sum(dim=1, keepdim=True),
                        batch.rewards,
                        batch.discounts,
                    )
            return
        next_policy = self._critic_next_policy(drawn.next_observations)
        rewards, discounts = th.split(drawn.rewards, batch_size), th.split(self.gamma * (1.0 - drawn.dones), batch_size)
        for index, first in enumerate(range(0, len(drawn.rewards), batch_size)):
            rows = slice(first, first + batch_size)
            obs, next_obs = _rows(drawn.observations, rows), _rows(drawn.next_observations, rows)
            yield (
                partial(self._critic_q, self.critic, obs, drawn.actions[rows]),
                partial(self._critic_expected_q, self.critic_target, next_obs, next_policy[rows]),
                rewards[index],
                discounts[index],
            )

    def _critic_head_minibatches(self, drawn: ReplayBufferSamples, batch_size: int) -> Iterator[_CriticHeadBatch]:
        """The Q-heads' inputs per minibatch of one draw, when the features extractor has no parameters: features
        (with the stored actions for Box) and next features (with ``mu(s')``), computed once per draw."""
        discrete = isinstance(self.action_space, spaces.Discrete)
        next_policy = self._critic_next_policy(drawn.next_observations)

        def head_inputs(module: Any, observations: th.Tensor | TensorDict, actions: th.Tensor) -> th.Tensor:
            features = module.extract_features(observations, module.features_extractor)
            return features if discrete else th.cat([features, actions.float()], dim=1)

        split = lambda tensor: th.split(tensor, batch_size)  # noqa: E731 (views, no copies)
        with th.no_grad():
            inputs = split(head_inputs(self.critic, drawn.observations, drawn.actions))
            next_inputs = split(head_inputs(self.critic_target, drawn.next_observations, next_policy))
        rewards, discounts = split(drawn.rewards), split(self.gamma * (1.0 - drawn.dones))
        taken = split(drawn.actions.long().reshape(-1, 1)) if discrete else None
        probs = split(next_policy) if discrete else None
        for index in range(len(inputs)):
            yield _CriticHeadBatch(
                inputs[index],
                next_inputs[index],
                None if taken is None else taken[index],
                None if probs is None else probs[index],
                rewards[index],
                discounts[index],
            )

    def _critic_plain_layers(self) -> tuple[list[tuple[th.Tensor, th.Tensor]], list[tuple[th.Tensor, th.Tensor]]] | None:
        """The critic's and its target's ``(weight, bias)`` layers when :meth:`_train_critic` can take its TD steps by
        hand (:mod:`pgvar.algos._critic_step`): on CPU, parameter-free features, no batch norm, a plain ReLU MLP head
        whose parameters are all of the critic's. None otherwise (autograd; on CUDA the products could round
        differently from autograd's, and that path is not tested here)."""
        if not self._critic_features_are_fixed or self._critic_batch_norm_stats or self.device.type != "cpu":
            return None
        discrete = isinstance(self.action_space, spaces.Discrete)
        head: Any = self.critic.q_net if discrete else self.critic.q_networks[0]  # type: ignore[index]
        head_target: Any = self.critic_target.q_net if discrete else self.critic_target.q_networks[0]  # type: ignore[index]
        layers, target_layers = plain_mlp(head), plain_mlp(head_target)
        if layers is None or target_layers is None:
            return None
        flat = [tensor for pair in layers for tensor in pair]
        params = list(self.critic.parameters())
        if len(flat) != len(params) or not all(a is b for a, b in zip(flat, params)):
            return None
        return layers, target_layers

    def _train_critic(self) -> None:
        """``ceil(qprop_critic_updates_per_step * n_steps * n_envs)`` TD steps once the replay holds
        ``qprop_warmup_steps`` transitions (step 3). Each step: a minibatch of ``qprop_critic_batch_size``
        transitions drawn uniformly (with replacement) from the replay buffer, the MSE to the targets of
        :meth:`_critic_td_targets`, one Adam step, then the polyak update of the target critic.

        With the default critic (parameter-free features, a ReLU MLP head, fused Adam) the forward and backward
        passes and the Adam step are computed by hand (:mod:`pgvar.algos._critic_step`): the same arithmetic
        without autograd's and ``Optimizer.step``'s per-call bookkeeping, which dominate at batch 64 on a CPU."""
        replay = self.replay_buffer
        stored = replay.size() * replay.n_envs
        self.logger.record("pgvar/qprop_replay_size", stored)
        if stored < max(self.qprop_warmup_steps, 1):
            return
        n_updates = math.ceil(self.qprop_critic_updates_per_step * self.n_steps * self.n_envs)
        batch_size = self.qprop_critic_batch_size
        self.critic.set_training_mode(True)
        for group in self.critic.optimizer.param_groups:  # the attribute rules (also after load with custom_objects)
            group["lr"] = self.qprop_critic_learning_rate
        params: list[th.Tensor] = list(self.critic.parameters())
        target_params: list[th.Tensor] = list(self.critic_target.parameters())
        adam_step = AdamStep(self.critic.optimizer, params)
        plain_layers = self._critic_plain_layers()
        losses = []

        def after_step(loss: th.Tensor, grads: Sequence[th.Tensor | None]) -> None:
            adam_step(grads)
            with th.no_grad():  # polyak: target <- (1 - tau) target + tau w, one multi-tensor call
                th._foreach_lerp_(target_params, params, self.qprop_critic_tau)
            if self._critic_batch_norm_stats:
                polyak_update(self._critic_batch_norm_stats, self._critic_batch_norm_stats_target, 1.0)
            losses.append(loss.detach())

        for first in range(0, n_updates, _CRITIC_STEPS_PER_DRAW):
            n_draw = min(_CRITIC_STEPS_PER_DRAW, n_updates - first)
            with self._private_numpy_random():  # n_draw minibatches at once (uniform with replacement, like one by one)
                drawn = replay.sample(n_draw * batch_size, env=self._vec_normalize_env)
            if plain_layers is not None:
                layers, target_layers = plain_layers
                for batch in self._critic_head_minibatches(drawn, batch_size):
                    next_q = mlp_forward(target_layers, batch.next_inputs)
                    if batch.next_probs is not None:
                        next_q = (batch.next_probs * next_q).sum(dim=1, keepdim=True)
                    targets = th.addcmul(batch.rewards, batch.discounts, next_q)  # r + gamma (1 - term) Q'(s', mu(s'))
                    after_step(*mlp_mse_gradients(layers, batch.inputs, targets, batch.taken))
                continue
            for q, next_q, rewards, discounts in self._critic_minibatches(drawn, batch_size):
                with th.no_grad():
                    targets = th.addcmul(rewards, discounts, next_q())  # r + gamma (1 - terminated) Q'(s', mu(s'))
                loss = F.mse_loss(q(), targets)
                # autograd.grad skips the AccumulateGrad nodes of backward(): about 0.1 ms less per step on a CPU
                after_step(loss, th.autograd.grad(loss, params, allow_unused=True))
        self.critic.set_training_mode(False)
        self.critic_n_updates += n_updates
        self.logger.record("pgvar/qprop_critic_loss", float(th.stack(losses).mean()))
        self.logger.record("pgvar/qprop_critic_updates", self.critic_n_updates)

    # -------------------------------------------------------------------------------------------- train
    def train(self) -> None:
        """One Q-Prop iteration: control variate (critic of the previous iterations), policy step, critic step."""
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

    # --------------------------------------------------------------------------------------- save/load
    def _excluded_save_params(self) -> list[str]:
        excluded = super()._excluded_save_params()
        return [*excluded, "critic", "critic_target", "_critic_batch_norm_stats", "_critic_batch_norm_stats_target"]

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        state_dicts, torch_variables = super()._get_torch_save_params()
        return [*state_dicts, "critic", "critic_target", "critic.optimizer"], torch_variables

    def save_replay_buffer(self, path: str | pathlib.Path | io.BufferedIOBase) -> None:
        """Save the critic's replay buffer as a pickle file (SB3's ``OffPolicyAlgorithm.save_replay_buffer``).

        ``save()`` does not include it (it can hold a million transitions); save it next to the model to resume
        training exactly where it stopped.

        :param path: path of the file (``.pkl`` is appended when it has no suffix) or a file object
        """
        save_to_pkl(path, self.replay_buffer, self.verbose)

    def load_replay_buffer(self, path: str | pathlib.Path | io.BufferedIOBase) -> None:
        """Load a replay buffer saved by :meth:`save_replay_buffer` (``ValueError`` if it does not fit the model).

        Without it, a loaded model keeps its trained critic and uses the control variate at once, but trains the
        critic again only when the new replay buffer holds ``qprop_warmup_steps`` transitions.

        :param path: path of the pickle file or a file object
        """
        replay = load_from_pkl(path, self.verbose)
        if not isinstance(replay, ReplayBuffer):  # DictReplayBuffer is a subclass
            raise ValueError(f"the file must hold an SB3 ReplayBuffer or DictReplayBuffer, got {type(replay).__name__}")
        if replay.n_envs != self.n_envs or replay.obs_shape != self.replay_buffer.obs_shape:
            raise ValueError(
                f"the replay buffer has n_envs={replay.n_envs} and observations of shape {replay.obs_shape}, the model "
                f"n_envs={self.n_envs} and {self.replay_buffer.obs_shape}"
            )
        replay.device = self.device
        self.replay_buffer = replay
