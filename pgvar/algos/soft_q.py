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
"""

from __future__ import annotations

import weakref
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple, TypeVar, cast

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.distributions import CategoricalDistribution
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import (
    ActorCriticCnnPolicy,
    ActorCriticPolicy,
    BasePolicy,
    MultiInputActorCriticPolicy,
)
from stable_baselines3.common.torch_layers import (
    BaseFeaturesExtractor,
    CombinedExtractor,
    FlattenExtractor,
    NatureCNN,
    create_mlp,
)
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, PyTorchObs, Schedule
from stable_baselines3.common.utils import explained_variance, obs_as_tensor
from torch import nn

from pgvar._validation import check_positive, check_unit_interval
from pgvar.estimators.normalization import normalize_advantages
from pgvar.estimators.soft_q import (
    boltzmann_log_probs,
    entropy_regularized_pg_loss,
    kl_regularized_n_step_advantages,
    kl_to_reference,
    soft_q_loss,
    soft_q_targets,
    soft_value,
)

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

SelfSoftAlgorithm = TypeVar("SelfSoftAlgorithm", bound="_KLRegularizedOnPolicyAlgorithm")


# ----------------------------------------------------------------------------------------------- validation
def _check_discrete(owner: str, action_space: spaces.Space | None) -> None:
    if action_space is not None and not isinstance(action_space, spaces.Discrete):
        raise ValueError(
            f"{owner} supports only Discrete action spaces (gymnasium.spaces.Discrete: the soft value and the KL "
            f"sum over the actions), got {action_space!r}"
        )


def _check_ref_policy(ref_policy: Any, n_actions: int) -> tuple[float, ...] | None:
    """``None`` (uniform) or the reference probabilities as a tuple: 1-D, ``n_actions`` long, finite, > 0, sum 1."""
    if ref_policy is None or (isinstance(ref_policy, str) and ref_policy == "uniform"):
        return None
    if isinstance(ref_policy, str):
        raise ValueError(
            f"ref_policy must be None, 'uniform' or {n_actions} probabilities, got {ref_policy!r}"
        )
    try:
        probs = np.asarray(
            ref_policy.detach().cpu() if isinstance(ref_policy, th.Tensor) else ref_policy, dtype=np.float64
        )
    except (TypeError, ValueError):
        raise ValueError(
            f"ref_policy must be None, 'uniform' or a sequence of {n_actions} probabilities, got {ref_policy!r}"
        ) from None
    if probs.ndim != 1 or probs.shape[0] != n_actions:
        raise ValueError(
            f"ref_policy must be a distribution over the {n_actions} actions of the action space (1-D, length "
            f"{n_actions}), got shape {probs.shape}: {ref_policy!r}"
        )
    if not np.all(np.isfinite(probs)) or not np.all(probs > 0):
        raise ValueError(
            f"ref_policy must hold finite probabilities > 0 (a zero makes the KL of a softmax policy infinite), "
            f"got {probs.tolist()}"
        )
    if abs(probs.sum() - 1.0) > 1e-6:
        raise ValueError(
            f"ref_policy must sum to 1 (a distribution over the actions), got sum {probs.sum():.8g}"
        )
    return tuple(float(p) for p in probs)


def _ref_log_probs(ref_policy: tuple[float, ...] | None, device: th.device | str = "cpu") -> th.Tensor | None:
    if ref_policy is None:
        return None
    log_probs = th.log(th.as_tensor(ref_policy, dtype=th.float64))
    return (log_probs - th.logsumexp(log_probs, 0)).to(device=device, dtype=th.float32)


# ----------------------------------------------------------------------------------------------- policies
class SoftPolicyOutputs(NamedTuple):
    """What both losses need at a batch of states (all differentiable in the policy's parameters)."""

    log_probs: th.Tensor
    """``[B, A]`` log-probabilities of the acting policy."""
    values: th.Tensor
    """``[B]`` state values :math:`V(s)` (the soft value for a Q-network)."""
    q_values: th.Tensor
    """``[B, A]`` :math:`Q(s, a) = V(s) + \\tau \\log(\\pi(a|s)/\\bar\\pi(a))`."""


class SoftQPolicy(BasePolicy):
    """A Q-network acting with its Boltzmann policy: :math:`\\pi_Q(a|s) \\propto \\bar\\pi(a) e^{Q(s,a)/\\tau}`,
    value :math:`V_Q(s) = \\tau \\log \\mathbb{E}_{\\bar\\pi} e^{Q(s,\\cdot)/\\tau}` (an SB3 policy: ``forward``,
    ``evaluate_actions``, ``predict_values``, ``get_distribution``, ``predict``; Discrete actions only).

    :param observation_space: observation space
    :param action_space: action space (``Discrete``)
    :param lr_schedule: learning-rate schedule (``lr_schedule(1)`` is the initial rate)
    :param net_arch: hidden layer sizes of the Q-network (default ``[64, 64]``, ``[]`` after a NatureCNN)
    :param activation_fn: activation function (default ``nn.Tanh``, like SB3's actor-critic policies)
    :param ortho_init: orthogonal initialization (gain sqrt(2), output layer 0.01: a near-uniform first policy)
    :param use_sde: must be False (no gSDE for discrete actions)
    :param features_extractor_class: features extractor (``FlattenExtractor`` by default)
    :param features_extractor_kwargs: its keyword arguments
    :param normalize_images: divide image observations by 255
    :param optimizer_class: optimizer (``th.optim.Adam`` by default, eps 1e-5)
    :param optimizer_kwargs: its keyword arguments, excluding the learning rate
    :param tau: temperature :math:`\\tau > 0` of the Boltzmann policy (set by :class:`SoftQ`/:class:`EntropyPG`)
    :param ref_policy: reference probabilities :math:`\\bar\\pi` over the actions, or ``None`` (uniform)
    """

    action_space: spaces.Discrete
    ref_log_probs: th.Tensor | None  # a non-persistent buffer: rebuilt from ``ref_policy``, not saved

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        net_arch: list[int] | None = None,
        activation_fn: type[nn.Module] = nn.Tanh,
        ortho_init: bool = True,
        use_sde: bool = False,
        features_extractor_class: type[BaseFeaturesExtractor] = FlattenExtractor,
        features_extractor_kwargs: dict[str, Any] | None = None,
        normalize_images: bool = True,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        tau: float = 1.0,
        ref_policy: Sequence[float] | None = None,
    ) -> None:
        _check_discrete(type(self).__name__, action_space)
        if use_sde:
            raise ValueError(
                "use_sde must be False: gSDE is for continuous actions, SoftQPolicy is discrete-only"
            )
        if optimizer_kwargs is None:
            optimizer_kwargs = {"eps": 1e-5} if optimizer_class == th.optim.Adam else {}
        super().__init__(
            observation_space,
            action_space,
            features_extractor_class,
            features_extractor_kwargs,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            normalize_images=normalize_images,
        )
        n_actions = int(action_space.n)  # type: ignore[attr-defined]
        self.tau = float(check_positive("tau", tau))
        self.ref_policy = _check_ref_policy(ref_policy, n_actions)
        self.register_buffer("ref_log_probs", _ref_log_probs(self.ref_policy), persistent=False)
        if net_arch is None:
            net_arch = [] if features_extractor_class == NatureCNN else [64, 64]
        self.net_arch = list(net_arch)
        self.activation_fn = activation_fn
        self.ortho_init = ortho_init
        self.features_extractor = self.make_features_extractor()
        self.features_dim = self.features_extractor.features_dim
        self.q_net = nn.Sequential(*create_mlp(self.features_dim, n_actions, self.net_arch, activation_fn))
        self.action_dist = CategoricalDistribution(n_actions)
        if ortho_init:
            self.features_extractor.apply(lambda m: self.init_weights(m, gain=np.sqrt(2)))
            self.q_net.apply(lambda m: self.init_weights(m, gain=np.sqrt(2)))
            self.init_weights(self.q_net[-1], gain=0.01)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)  # type: ignore[call-arg]

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            dict(
                net_arch=self.net_arch,
                activation_fn=self.activation_fn,
                ortho_init=self.ortho_init,
                lr_schedule=self._dummy_schedule,
                features_extractor_class=self.features_extractor_class,
                features_extractor_kwargs=self.features_extractor_kwargs,
                optimizer_class=self.optimizer_class,
                optimizer_kwargs=self.optimizer_kwargs,
                tau=self.tau,
                ref_policy=self.ref_policy,
            )
        )
        return data

    def q_values(self, obs: PyTorchObs) -> th.Tensor:
        """``[B, A]`` action values :math:`Q(s, \\cdot)`."""
        return self.q_net(self.extract_features(obs, self.features_extractor))

    def soft_outputs(self, obs: PyTorchObs) -> SoftPolicyOutputs:
        """Boltzmann log-probabilities, soft values and Q-values at ``obs`` (differentiable)."""
        q_values = self.q_values(obs)
        log_probs = boltzmann_log_probs(q_values, self.tau, self.ref_log_probs)
        return SoftPolicyOutputs(log_probs, soft_value(q_values, self.tau, self.ref_log_probs), q_values)

    def _distribution(self, log_probs: th.Tensor) -> CategoricalDistribution:
        return self.action_dist.proba_distribution(action_logits=log_probs)

    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Actions sampled from (or the mode of) the Boltzmann policy, soft values ``[B, 1]``, log-probs ``[B]``."""
        log_probs, values, _ = self.soft_outputs(obs)
        distribution = self._distribution(log_probs)
        actions = distribution.get_actions(deterministic=deterministic)
        return actions, values.unsqueeze(-1), distribution.log_prob(actions)

    def get_distribution(self, obs: PyTorchObs) -> CategoricalDistribution:
        return self._distribution(self.soft_outputs(obs).log_probs)

    def evaluate_actions(self, obs: PyTorchObs, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Soft values ``[B, 1]``, log-probabilities of ``actions`` ``[B]`` and entropies ``[B]``."""
        log_probs, values, _ = self.soft_outputs(obs)
        distribution = self._distribution(log_probs)
        return values.unsqueeze(-1), distribution.log_prob(actions), distribution.entropy()

    def predict_values(self, obs: PyTorchObs) -> th.Tensor:
        """Soft values ``[B, 1]`` (what SB3 bootstraps truncated episodes with)."""
        return self.soft_outputs(obs).values.unsqueeze(-1)

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        return self.get_distribution(observation).get_actions(deterministic=deterministic)


class SoftQCnnPolicy(SoftQPolicy):
    """:class:`SoftQPolicy` with SB3's NatureCNN features extractor (image observations)."""

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        features_extractor_class: type[BaseFeaturesExtractor] = NatureCNN,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            features_extractor_class=features_extractor_class,
            **kwargs,
        )


class MultiInputSoftQPolicy(SoftQPolicy):
    """:class:`SoftQPolicy` with SB3's CombinedExtractor (``Dict`` observations)."""

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        features_extractor_class: type[BaseFeaturesExtractor] = CombinedExtractor,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            features_extractor_class=features_extractor_class,
            **kwargs,
        )


def _actor_critic_outputs(
    policy: ActorCriticPolicy, obs: PyTorchObs, tau: float, ref_log_probs: th.Tensor | None
) -> SoftPolicyOutputs:
    """Softmax policy and value head of an SB3 actor-critic; ``Q = V + tau (log pi - log pi_ref)`` derived."""
    features = policy.extract_features(obs)
    if policy.share_features_extractor:
        latent_pi, latent_vf = policy.mlp_extractor(features)
    else:
        pi_features, vf_features = features
        latent_pi = policy.mlp_extractor.forward_actor(pi_features)
        latent_vf = policy.mlp_extractor.forward_critic(vf_features)
    log_probs = th.log_softmax(policy.action_net(latent_pi), dim=-1)
    values = policy.value_net(latent_vf).squeeze(-1)
    ref = -np.log(log_probs.shape[-1]) if ref_log_probs is None else ref_log_probs
    return SoftPolicyOutputs(log_probs, values, values.unsqueeze(-1) + tau * (log_probs - ref))


# ----------------------------------------------------------------------------------------------- buffers
class _KLRegularizedSignalMixin:
    """Puts the KL-regularized n-step advantages (and returns ``V + Delta``) in the buffer when SB3's
    ``collect_rollouts`` computes advantages, i.e. before ``callback.on_rollout_end()``: callbacks that read
    ``advantages`` (e.g. ``pgvar.callbacks.GradientVarianceCallback``) see the signal the update uses."""

    signal_ready: bool = False
    _signal: weakref.WeakMethod | None = None
    advantages: np.ndarray
    returns: np.ndarray

    def attach(self, signal: Any) -> None:
        self._signal = weakref.WeakMethod(signal)

    def reset(self) -> None:
        super().reset()  # type: ignore[misc]
        self.signal_ready = False

    def compute_returns_and_advantage(self, last_values: th.Tensor, dones: np.ndarray) -> None:
        signal = None if self._signal is None else self._signal()
        if signal is None:
            super().compute_returns_and_advantage(last_values, dones)  # type: ignore[misc]
            return
        advantages, values = signal()
        self.advantages[:] = advantages.cpu().numpy()
        self.returns[:] = (values + advantages).cpu().numpy()
        self.signal_ready = True


class KLRegularizedRolloutBuffer(_KLRegularizedSignalMixin, RolloutBuffer):
    """SB3's ``RolloutBuffer`` whose advantages are :class:`EntropyPG`/:class:`SoftQ`'s KL-regularized signal."""


class KLRegularizedDictRolloutBuffer(_KLRegularizedSignalMixin, DictRolloutBuffer):
    """SB3's ``DictRolloutBuffer`` whose advantages are the KL-regularized signal (``Dict`` observations)."""


# ----------------------------------------------------------------------------------------------- algorithms
_POLICY_ALIASES: dict[str, type[BasePolicy]] = {
    "ActorCriticMlpPolicy": ActorCriticPolicy,
    "ActorCriticCnnPolicy": ActorCriticCnnPolicy,
    "MultiInputActorCriticPolicy": MultiInputActorCriticPolicy,
    "SoftQMlpPolicy": SoftQPolicy,
    "SoftQCnnPolicy": SoftQCnnPolicy,
    "MultiInputSoftQPolicy": MultiInputSoftQPolicy,
}


class _KLRegularizedOnPolicyAlgorithm(OnPolicyAlgorithm):
    """What EntropyPG and SoftQ share: arguments, rollout tensors, the KL-regularized advantages, the update step.

    Subclasses implement :meth:`_loss` (and set ``_log_prefix`` names); everything else is common.
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
        check_positive("n_steps", n_steps, integer=True)
        check_unit_interval("gamma", gamma)
        check_unit_interval("gae_lambda", gae_lambda)
        check_positive("max_grad_norm", max_grad_norm)
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
            ent_coef=ent_coef,
            vf_coef=vf_coef,
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
        _check_discrete(owner, self.action_space)
        self.ref_policy = ref_policy
        if self.action_space is not None:
            self.ref_policy = _check_ref_policy(ref_policy, int(self.action_space.n))  # type: ignore[attr-defined]
        self.policy_kwargs = dict(self.policy_kwargs)  # never mutate the caller's dict
        # A2C's optimizer (the original A2C's), unless the caller chose one.
        if use_rms_prop and "optimizer_class" not in self.policy_kwargs:
            self.policy_kwargs["optimizer_class"] = th.optim.RMSprop
            self.policy_kwargs["optimizer_kwargs"] = dict(alpha=0.99, eps=rms_prop_eps, weight_decay=0)
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        owner = type(self).__name__
        _check_discrete(owner, self.action_space)
        self.ref_policy = _check_ref_policy(self.ref_policy, int(self.action_space.n))  # type: ignore[attr-defined]
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
        self._ref_log_probs = _ref_log_probs(self.ref_policy, self.device)
        if isinstance(self.rollout_buffer, _KLRegularizedSignalMixin):
            self.rollout_buffer.attach(self.kl_regularized_signal)

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_ref_log_probs"]

    # ------------------------------------------------------------------ shared computations
    def soft_outputs(self, observations: PyTorchObs) -> SoftPolicyOutputs:
        """Log-probabilities ``[B, A]``, values ``[B]`` and Q-values ``[B, A]`` of the policy at ``observations``
        (a tensor or dict of tensors on ``self.device``), differentiable in the policy's parameters."""
        if isinstance(self.policy, SoftQPolicy):
            return self.policy.soft_outputs(observations)
        return _actor_critic_outputs(self.policy, observations, self.tau, self._ref_log_probs)

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


class EntropyPG(_KLRegularizedOnPolicyAlgorithm):
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
        **_POLICY_ALIASES,
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
        if vf_coef is None:
            vf_coef = 1.0 / (2.0 * tau)
        elif isinstance(vf_coef, bool) or not isinstance(vf_coef, (int, float)) or not vf_coef >= 0:
            raise ValueError(f"vf_coef must be a number >= 0 or None (= 1/(2 tau)), got {vf_coef!r}")
        if isinstance(ent_coef, bool) or not isinstance(ent_coef, (int, float)) or not ent_coef >= 0:
            raise ValueError(f"ent_coef must be a number >= 0, got {ent_coef!r}")
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
            ent_coef=float(ent_coef),
            vf_coef=float(vf_coef),
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


class SoftQ(_KLRegularizedOnPolicyAlgorithm):
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
        **_POLICY_ALIASES,
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
